"""The container: a fixed prefix, a zlib-compressed JSON header, a safetensors payload.

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89FXPRESS"  (the high byte catches 7-bit and text-mode damage)
    8       4     u32 format version (3; versions 1 and 2 still load)
    12      4     u32 flags: 1 = header is zlib-compressed (always set by this version),
                  2 = from a preset dictionary, 8 = the second one, 16 = the third one,
                  4 = small streams in a blob
    16      8     u64 header length H (as stored)
    24      32    sha256 of the H stored header bytes
    56      H     header: UTF-8 JSON (graph, module tree, tensor table, metadata), zlib
    56+H    P     payload: a standard safetensors blob holding every stream

This module packs and unpacks the prefix and the header and computes the checksums; what
the header may say is :mod:`.schema`'s business. Version 2 leaves out of the stored header
every field the reader derives and holds no per-stream digests (:mod:`.compact`): on
small models the header is much of the file. Version 3 also leaves out the node names the
reader derives from their targets and stores references to earlier nodes as distances
back. A reader refuses a newer version by its version number; this reader reads all three.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fxpress.errors import (ArtifactError, ArtifactFormatError, ArtifactIntegrityError,
                            ArtifactLimitError)
from fxpress.graph.artifact.compact import fill, minimize
from fxpress.graph.artifact.header_dict import HEADER_ZDICT, HEADER_ZDICT_V2, HEADER_ZDICT_V3
from fxpress.graph.artifact.limits import DEFAULT_LIMITS, Limits
from fxpress.graph.artifact.values import escape_controls

MAGIC = b"\x89FXPRESS"
VERSION = 3
#: the format versions this fxpress reads (1: every derived field and a 64-bit digest per
#: stream and tensor in the header; 2: node names and references stored as names)
READ_VERSIONS = (1, 2, 3)
_PREFIX = struct.Struct("<8sIIQ32s")
_FLAG_ZLIB_HEADER = 1
#: The header is zlib-compressed from the preset dictionary of graph/artifact/header_dict.py (what
#: save writes; flag 1 alone is what fxpress wrote before, and still loads).
_FLAG_ZDICT_HEADER = 2
#: Streams smaller than BLOB_STREAM_BYTES share one safetensors tensor, BLOB_KEY, in the
#: order of the header's tensor table (see _unblob): safetensors' own JSON index costs
#: ~65 bytes a tensor, most of a small stream's worth.
_FLAG_BLOB_STREAMS = 4
#: With flag 2, the header is compressed from the second dictionary (HEADER_ZDICT_V2, made of
#: version 2 headers) instead of the first.
_FLAG_ZDICT_V2 = 8
#: With flag 2, the header is compressed from the third dictionary (HEADER_ZDICT_V3, made of
#: version 3 headers); never with flag 8.
_FLAG_ZDICT_V3 = 16
_KNOWN_FLAGS = _FLAG_ZLIB_HEADER | _FLAG_ZDICT_HEADER | _FLAG_BLOB_STREAMS | _FLAG_ZDICT_V2 \
    | _FLAG_ZDICT_V3
BLOB_KEY = "blob"
BLOB_STREAM_BYTES = 1 << 16
PREFIX_SIZE = _PREFIX.size  # 56
#: the default limits (see .limits.Limits; kept under their old names)
MAX_HEADER_BYTES = DEFAULT_LIMITS.header_bytes
MIN_DECODED_LIMIT = DEFAULT_LIMITS.floor
EXPANSION_LIMIT = DEFAULT_LIMITS.expansion


def _sha(data: bytes | memoryview | np.ndarray) -> str:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1).data
    return hashlib.sha256(data).hexdigest()


def _sha64(data) -> str:
    """The first 64 bits of a sha256, for streams and tensors: the full sha256 of the header
    (in the prefix) and of the payload (in the header) already guard the whole file; these
    name the damaged tensor and cost 16 characters each instead of 64, which matters in
    small artifacts."""
    return _sha(data)[:16]


def _pack_header(header: dict) -> bytes:
    """Prefix + header. The header is zlib-compressed from a preset dictionary of typical
    header text (flags 1, 2 and 16; see graph/artifact/header_dict.py): its JSON is repetitive, and on
    small models it would otherwise outweigh the tensors."""
    z = zlib.compressobj(9, zdict=HEADER_ZDICT_V3)
    head = z.compress(json.dumps(minimize(header), separators=(",", ":"),
                                 allow_nan=False).encode()) + z.flush()
    flags = _FLAG_ZLIB_HEADER | _FLAG_ZDICT_HEADER | _FLAG_ZDICT_V3 | (
        _FLAG_BLOB_STREAMS if "blob" in header else 0)
    prefix = _PREFIX.pack(MAGIC, VERSION, flags, len(head), hashlib.sha256(head).digest())
    return prefix + head


def pack_artifact(header: dict, payload: bytes) -> bytes:
    """Prefix + header + payload (the header's "payload" entry must describe ``payload``)."""
    return _pack_header(header) + payload


def _parse_header_text(head: bytes, where: str, limits: Limits) -> Any:
    """JSON of the decompressed header: its size and number of objects and arrays bounded
    before it is parsed, its nesting right after (before anything else reads it)."""
    if len(head) > limits.header_text_bytes:
        raise ArtifactLimitError(f"{where}: header decompresses past {limits.header_text_bytes} "
                                 "bytes")
    containers = head.count(b"{") + head.count(b"[")
    if containers > limits.json_containers:
        raise ArtifactLimitError(f"{where}: header holds {containers} JSON objects and arrays, "
                                 f"over the limit of {limits.json_containers}")
    try:
        header = json.loads(head)
    except RecursionError:
        raise ArtifactLimitError(f"{where}: header JSON nests deeper than the parser allows") from None
    except ValueError as e:
        raise ArtifactFormatError(f"{where}: header is not valid JSON: {e}") from None
    # nesting, walked without recursion: what reads the header later may recurse
    stack = [(header, 0)]
    while stack:
        obj, level = stack.pop()
        if level > limits.depth:
            raise ArtifactLimitError(f"{where}: header JSON nests deeper than {limits.depth} levels")
        if isinstance(obj, dict):
            stack.extend((v, level + 1) for v in obj.values() if isinstance(v, (dict, list)))
        elif isinstance(obj, list):
            stack.extend((v, level + 1) for v in obj if isinstance(v, (dict, list)))
    return header


def _split_prefix(data: bytes | memoryview, where: str, file_size: int | None = None,
                  limits: Limits | None = None) -> tuple[dict, memoryview, bytes]:
    limits = limits or DEFAULT_LIMITS
    view = memoryview(data)
    file_size = len(view) if file_size is None else file_size
    if len(view) < PREFIX_SIZE:
        raise ArtifactFormatError(f"{where}: {len(view)} bytes is too short for an fxpress "
                                  "artifact (truncated?)")
    magic, version, flags, hlen, hsha = _PREFIX.unpack(view[:PREFIX_SIZE])
    if magic != MAGIC:
        raise ArtifactFormatError(f"{where}: not an fxpress artifact (bad magic bytes)")
    if version not in READ_VERSIONS:
        raise ArtifactFormatError(f"{where}: format version {version}; this fxpress reads versions "
                                  f"{', '.join(map(str, READ_VERSIONS))}. Upgrade fxpress or save "
                                  "the model again.")
    if PREFIX_SIZE + hlen > len(view):
        raise ArtifactFormatError(f"{where}: header claims {hlen} bytes but the file holds "
                                  f"{file_size - PREFIX_SIZE} after its prefix (limit {limits.header_bytes}): "
                                  "truncated or tampered")
    if hlen > limits.header_bytes:
        raise ArtifactLimitError(f"{where}: header is {hlen} bytes, over the limit of "
                                 f"{limits.header_bytes}")
    head = bytes(view[PREFIX_SIZE:PREFIX_SIZE + hlen])
    if hashlib.sha256(head).digest() != hsha:
        raise ArtifactIntegrityError(f"{where}: header fails its sha256 check; the file is "
                                     "corrupted or was edited")
    if flags & ~_KNOWN_FLAGS or flags & _FLAG_ZDICT_HEADER and not flags & _FLAG_ZLIB_HEADER \
            or flags & (_FLAG_ZDICT_V2 | _FLAG_ZDICT_V3) and not flags & _FLAG_ZDICT_HEADER \
            or flags & _FLAG_ZDICT_V2 and flags & _FLAG_ZDICT_V3:
        raise ArtifactFormatError(f"{where}: unknown flags {flags:#x}; a newer fxpress wrote it")
    if flags & _FLAG_ZLIB_HEADER:
        zdict = HEADER_ZDICT_V3 if flags & _FLAG_ZDICT_V3 else \
            HEADER_ZDICT_V2 if flags & _FLAG_ZDICT_V2 else HEADER_ZDICT
        d = zlib.decompressobj(zdict=zdict) if flags & _FLAG_ZDICT_HEADER else zlib.decompressobj()
        try:
            # stops at one byte past the limit: a bomb never inflates further
            head = d.decompress(head, limits.header_text_bytes + 1)
        except zlib.error as e:
            raise ArtifactFormatError(f"{where}: header does not decompress: {e}") from None
        if not d.eof:
            raise ArtifactLimitError(f"{where}: header decompresses past "
                                     f"{limits.header_text_bytes} bytes (or is cut short)")
    header = _parse_header_text(head, where, limits)
    if not isinstance(header, dict) or header.get("format") != "fxpress" \
            or header.get("version") != version:
        raise ArtifactFormatError(f"{where}: header does not describe an fxpress v{version} artifact")
    fill(header)
    if bool(flags & _FLAG_BLOB_STREAMS) != ("blob" in header):
        raise ArtifactFormatError(f"{where}: the prefix and the header disagree on the blob")
    return header, view[PREFIX_SIZE + hlen:], head


def as_path(path: Any, action: str = "read") -> Path:
    """``path`` (a str, bytes or os.PathLike) as a :class:`Path` the OS can open, or an
    :class:`~fxpress.errors.ArtifactError` naming it: another type, a NUL byte or a name
    this file system's encoding cannot hold raised TypeError, ValueError or
    UnicodeEncodeError from deep inside the open."""
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:
        raise ArtifactError(f"cannot {action} an artifact at {type(path).__name__} "
                            f"{escape_controls(repr(path)[:80])}: give a file path (str or "
                            "pathlib.Path)") from None
    shown = escape_controls(text)
    if "\0" in text:
        raise ArtifactError(f"cannot {action} {shown}: the path holds a NUL byte; give a file path "
                            "without one")
    try:
        os.fsencode(text)
    except UnicodeError:
        raise ArtifactError(f"cannot {action} {shown}: the path has characters this file system's "
                            "encoding cannot hold; give another name") from None
    return Path(text)


def open_regular(path: str | os.PathLike) -> tuple[Any, int]:
    """``path`` opened for reading and its size, refused unless it is a regular file (a FIFO,
    a device such as /dev/zero, or a directory would block or never end)."""
    p = as_path(path)
    shown = escape_controls(str(p))
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise ArtifactError(f"cannot read artifact {shown}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactFormatError(f"{shown} is not a regular file (a directory, FIFO or device); "
                                      "give the path of an .fxp file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_bounded(f: Any, n: int, where: str) -> bytes:
    """Exactly ``n`` bytes of ``f`` (the size fstat gave): a file that grows while it is read
    is read up to its size, one that shrinks is refused."""
    data = f.read(n)
    if len(data) != n:
        raise ArtifactFormatError(f"{where}: the file changed size while it was read")
    return data


def read_header(path: str | os.PathLike, *, limits: Limits | None = None) -> dict:
    """The verified header of an artifact (graph, modules, tensor table), without its tensors.

    >>> read_header("mlp.fxp")["tensors"]["layers.0.weight"]["encoding"]   # doctest: +SKIP
    'relidx'
    """
    limits = limits or DEFAULT_LIMITS
    p = Path(path)
    shown = escape_controls(str(p))
    f, size = open_regular(p)
    try:
        with f:
            data = f.read(PREFIX_SIZE)
            if len(data) == PREFIX_SIZE:
                hlen = _PREFIX.unpack(data)[3]
                if hlen <= limits.header_bytes and PREFIX_SIZE + hlen <= size:
                    data += read_bounded(f, hlen, shown)
    except OSError as e:
        raise ArtifactError(f"cannot read artifact {shown}: {e.strerror or e}") from None
    header, _, _ = _split_prefix(data, shown, file_size=size, limits=limits)
    header["file_bytes"] = size
    return header
