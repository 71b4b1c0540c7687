"""The file system side of saving artifacts: atomic writes and our temporary files
(reading refuses what is not a regular file: ``format.open_regular``).

A save writes ``.<name>.<random>.tmp`` next to the target, or for a name too long for
that, ``.fxpress-<8 hex of the name>-<random>.tmp`` (a 250-character name still saves),
fsyncs it and renames it over the target. A save killed with SIGKILL leaves its temporary
file behind; the next save to the same path removes the ones it can tell are its own and
stale: matching that exact pattern for this name, a regular file of this user, untouched
for a minute. Nothing else in the folder is touched. A failed write (disk full, read-only
folder) raises an :class:`~fxpress.errors.ArtifactError` naming the file, and the file that
was there before is left as it was.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from fxpress.errors import ArtifactError
from fxpress.graph.artifact.format import as_path

_CHUNK = 1 << 22
#: how long a temporary file must have been left alone before a later save removes it
STALE_SECONDS = 60.0


def _temp_prefix(path: Path) -> str:
    """``.<name>.``, or ``.fxpress-<8 hex of the name>-`` where that would not fit the
    file system's limit on a name (with the random part and ``.tmp``)."""
    prefix = f".{path.name}."
    if len(os.fsencode(prefix)) + 12 <= _name_max(path):
        return prefix
    return f".fxpress-{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:8]}-"


def _name_max(path: Path) -> int:
    try:
        return os.pathconf(path.parent if str(path.parent) else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _ours(path: Path) -> re.Pattern:
    """Our temporary files for ``path`` (either naming of :func:`_temp_prefix`)."""
    hashed = f".fxpress-{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:8]}-"
    return re.compile(rf"(?:{re.escape(hashed)}|\.{re.escape(path.name)}\.)[A-Za-z0-9_]{{8}}\.tmp")


def remove_stale_temporaries(path: Path, older_than: float = STALE_SECONDS) -> list[str]:
    """Remove the temporary files that earlier, killed saves to ``path`` left behind;
    return their names. Only regular files of this user matching our naming for this
    very name and unmodified for ``older_than`` seconds."""
    pattern, now, removed = _ours(path), time.time(), []
    try:
        entries = list(os.scandir(path.parent if str(path.parent) else "."))
    except OSError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
                    and now - st.st_mtime > older_than):
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed


def check_name(path: Path) -> None:
    """Refuse a file name the file system cannot hold, before anything is written."""
    limit = _name_max(path)
    size = len(os.fsencode(path.name))
    if size > limit:
        raise ArtifactError(f"cannot write {path}: its file name is {size} bytes and this file "
                            f"system allows {limit}; choose a shorter name")


def os_failure(path: Path, e: OSError, action: str = "write") -> ArtifactError:
    """An :class:`ArtifactError` naming ``path`` for an OS error while saving it."""
    why = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied",
           errno.ENAMETOOLONG: "the file name is too long"}.get(e.errno, e.strerror or str(e))
    try:
        kept = " (the file that was there is unchanged)" if path.exists() else ""
    except OSError:
        kept = ""
    return ArtifactError(f"cannot {action} {path}: {why}{kept}")


_SPECIAL = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
            (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"))


def _target(path: Any) -> tuple[Path, Path]:
    """``path`` and its folder, refused when it is no file path, its name is too long,
    ``path`` is a folder, a device, a FIFO or a socket (the rename would replace the node
    itself: run as root, saving to /dev/null replaced the device with a regular file), or
    its folder is missing. A symbolic link is replaced, never written through."""
    path = as_path(path, "write")
    check_name(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; give a file name such as {path / 'model.fxp'}")
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = None
    kind = next((k for test, k in _SPECIAL if mode is not None and test(mode)), None)
    if kind is not None:
        raise ArtifactError(f"cannot write {path}: it is a {kind}, not a regular file, and saving "
                            "would replace it; give the path of a regular file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ArtifactError(f"cannot write {path}: directory {parent} does not exist")
    return path, parent


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (setting it
    for a moment changes it for every thread of the process)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
        return umask


def _mode_for(path: Path) -> int:
    """The permission bits a write to ``path`` leaves: those of the regular file it
    replaces (not of a symbolic link's target: the link itself is replaced), else
    ``0o666`` less the umask."""
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


def write_atomic(path: str | os.PathLike, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (bytes, or byte strings in order) to ``path`` via a temporary file in
    the same directory + fsync + os.replace; see the module docs."""
    path, parent = _target(path)
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent)
    except OSError as e:
        raise os_failure(path, e) from None
    try:
        # mkstemp makes the file private (0600): give it the mode of the file it replaces
        # (a 0600 file had become 0644, readable by everyone, when saved again), else the
        # mode a plain open() would
        os.chmod(tmp, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
            for piece in pieces:
                view = memoryview(piece)
                for i in range(0, len(view), _CHUNK):
                    f.write(view[i:i + _CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise os_failure(path, e) from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


__all__ = ["write_atomic", "remove_stale_temporaries", "check_name", "os_failure",
           "STALE_SECONDS"]
