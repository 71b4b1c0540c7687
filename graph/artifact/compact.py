"""The fields a version 2 or 3 header leaves out because the reader derives them.

A header is handled in its *full* form everywhere (what :func:`.read_header` and
:func:`.artifact_header` return, what the schema checks): every tensor entry with its
streams' keys, dtypes and sizes, every module tensor reference with its flags, every
node with its target and arguments. On disk, version 2 drops each field whose value is
the one the reader would derive (:func:`minimize`), and the reader puts them back
(:func:`fill`) before anything checks the header:

* a stream's ``key`` (``"<position in the tensor table>::<stream>"``), ``dtype`` (``uint8``
  for indices and bitmaps, the tensor's own for values and data), ``raw_bytes`` (what the
  encoding implies for the tensor's shape), ``bytes`` (``raw_bytes`` when no codec) and
  ``blob`` (a stream under ``BLOB_STREAM_BYTES`` lives in the blob); a tensor's
  ``stored_bytes`` (the sum of its streams');
* a module tensor reference's ``ref`` (the module's path joined with the tensor's name),
  ``requires_grad`` (true for parameters, false otherwise) and ``persistent`` (true); a
  module's ``training`` (false) and empty ``tensors``/``config``;
* a node's ``target`` (its name), empty ``args`` and ``kwargs``; a graph's ``codegen``
  (none); an empty ``dropped`` list.

Version 3 also leaves out each node name the reader derives from the node's target
(:class:`_NodeNames`: torch.fx's naming, placeholders and the output excepted) and stores
a reference to an earlier node as its distance back (an integer ``v`` in ``{"$": "node"}``):
in a stack of identical layers the references repeat where the names do not. The reader
turns distances back into names; one that reaches no earlier node is left for the schema
to refuse.

A field present in the file is kept as written and checked as before, so a file that
states a field differently from its derived value (a crafted one) is judged on what it
states. Filling never raises: a malformed part is left as it is for the schema to refuse
with its own message.

Version 2 stores no per-stream or per-tensor digest (version 1 held a 64-bit sha256 prefix
of each, 16 incompressible characters apiece: ~1.6 KB of a small model's 4.4 KB header);
the full sha256 of the header (prefix) and of the payload (header) guard the file. To
still name a damaged stream, ``crc8`` holds one byte per stream (the low byte of its
CRC-32, in table order; 2 hex characters each): it locates damage the payload digest has
already detected, and misses a damaged stream with probability 1/256. Since ``crc8_min``
(a header field, bytes) the locator lists only the streams of at least that many stored
bytes (:data:`CRC8_MIN`, 64): a stream under it is a bias or a codebook whose damage the
payload digest still refuses, unnamed; on the 48-wide, 3-layer digits transformer that is
half of its 105 streams' bytes of locator. A file without the field lists every stream.
"""
from __future__ import annotations

import copy
import math
import zlib
from typing import Any, Iterable

import numpy as np

from fxpress.errors import ArtifactError

_EMPTY_ARGS = {"$": "tuple", "v": []}
_EMPTY_KWARGS = {"$": "dict", "v": []}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _stream_defaults(position: int, entry: dict) -> dict[str, dict] | None:
    """The derived fields of each of ``entry``'s streams, or None when the entry is too
    malformed to derive them (the schema refuses it then)."""
    from fxpress.graph.artifact.format import BLOB_STREAM_BYTES
    from fxpress.graph.artifact.tensors import _expected_stream_bytes

    from fxpress.graph.artifact.values import _DTYPES

    dtype, shape = entry.get("dtype"), entry.get("shape")
    if not isinstance(dtype, str) or dtype not in _DTYPES or not isinstance(shape, list) or len(shape) > 16 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < (1 << 48) for s in shape):
        return None
    numel = math.prod(shape)
    if numel >= 1 << 48:
        return None
    narrow = entry.get("narrow")
    if narrow is not None:  # a float32 tensor's values stored in a 2-byte float
        if dtype != "float32" or not isinstance(narrow, str) or narrow not in _DTYPES:
            return None
        dtype = narrow
    try:
        expected = _expected_stream_bytes(entry, _DTYPES[dtype].itemsize, numel, "")
    except ArtifactError:
        return None
    streams = entry.get("streams")
    if not isinstance(streams, dict):
        return None
    out = {}
    for sname, raw in expected.items():
        info = streams.get(sname)
        if not isinstance(info, dict):
            continue
        d = {"key": f"{position}::{sname}", "raw_bytes": raw,
             "dtype": "uint8" if sname in ("index", "bitmap") or dtype == "bool" and sname == "values"
             else dtype}
        n = info.get("bytes", raw if "codec" not in info else None)
        if "codec" not in info:
            d["bytes"] = raw
        if isinstance(n, int) and not isinstance(n, bool):
            d["blob"] = n < BLOB_STREAM_BYTES
        out[sname] = d
    return out


def _version(header: dict) -> int:
    v = header.get("version")
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


#: ops whose node names version 3 derives from their targets (placeholders and the output
#: keep theirs: they are the graph's interface)
_DERIVED_OPS = ("call_module", "call_function", "call_method", "get_attr")


#: bases torch.fx never uses bare (Python's keywords and built-in functions: ``getattr_1``
#: is the first ``getattr`` node), frozen here so that every Python derives the same names
_SUFFIXED = frozenset((
    "False None True and as assert async await break class continue def del elif else except "
    "finally for from global if import in is lambda nonlocal not or pass raise return try while "
    "with yield abs aiter all anext any ascii bin bool breakpoint bytearray bytes callable chr "
    "classmethod compile complex delattr dict dir divmod enumerate eval exec filter float format "
    "frozenset getattr globals hasattr hash help hex id input int isinstance issubclass iter len "
    "list locals map max memoryview min next object oct open ord pow print property range repr "
    "reversed round set setattr slice sorted staticmethod str sum super tuple type vars zip").split())


class _NodeNames:
    """The node names version 3 leaves out, derived the way torch.fx names nodes: a
    module's path or attribute's qualified name with ``_`` for ``.``, a function's or
    method's name (an ATen op's packet name), made unique by ``_1``, ``_2``... in graph
    order (from ``_1`` for a Python keyword or built-in, :data:`_SUFFIXED`). Writer and reader walk the nodes with one instance each and derive the same
    names; a name that differs from its derivation is stored. Linear in the nodes: each
    base's counter only grows, so each taken name is stepped over at most once per base."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.count: dict[str, int] = {}

    @staticmethod
    def base(op: Any, target: str) -> str:
        if op in ("call_module", "get_attr"):
            return target.replace(".", "_")
        parts = target.split(".")
        if op == "call_function" and target.startswith("torch.ops.") and len(parts) >= 4:
            return parts[3]
        return parts[-1]

    def _next(self, base: str) -> tuple[str, int]:
        k = self.count.get(base, 1 if base in _SUFFIXED else 0)
        name = f"{base}_{k}" if k else base
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        return name, k

    def derive(self, n: dict) -> str:
        """The name of node ``n`` (its ``op`` one of :data:`_DERIVED_OPS`, a string
        ``target``), taken."""
        base = self.base(n.get("op"), n["target"])
        name, self.count[base] = self._next(base)
        self.used.add(name)
        return name

    def add(self, n: dict, name: str) -> bool:
        """Take node ``n``'s ``name``; True when the reader would derive it from ``n``'s
        target (the writer leaves it out)."""
        target = n.get("target")
        if n.get("op") in _DERIVED_OPS and isinstance(target, str):
            base = self.base(n["op"], target)
            derived, k = self._next(base)
            if derived == name:
                self.count[base] = k
                self.used.add(name)
                return True
        self.used.add(name)
        return False


def _walk_refs(v: Any, swap) -> Any:
    """``v`` (a tagged value) with each node reference ``{"$": "node", "v": x}`` replaced by
    ``swap(x)``'s; without recursion (the reader calls it on unchecked input)."""
    if not isinstance(v, (dict, list)):
        return v
    root = [v]
    stack: list[tuple[Any, Any]] = [(root, 0)]
    while stack:
        parent, key = stack.pop()
        x = parent[key]
        if isinstance(x, dict):
            if x.get("$") == "node" and set(x) == {"$", "v"}:
                parent[key] = {"$": "node", "v": swap(x["v"])}
            else:
                stack.extend((x, k) for k in x)
        elif isinstance(x, list):
            stack.extend((x, i) for i in range(len(x)))
    return root[0]


def _refs_by_distance(v: Any, i: int, seen: dict[str, int]) -> Any:
    """Version 3 stores a reference to an earlier node as its distance back (1: the node
    just before), which repeats from one layer to the next where names do not."""
    v = copy.deepcopy(v)
    return _walk_refs(v, lambda x: i - seen[x] if isinstance(x, str) and x in seen else x)


def _refs_by_name(v: Any, names: list[Any]) -> Any:
    """Distances back to the names of the nodes they reach; anything else is left for the
    schema to refuse (a reference must name a node defined before it)."""
    def swap(x: Any) -> Any:
        if isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= len(names):
            return names[len(names) - x]
        return x
    return _walk_refs(v, swap)


def minimize(header: dict) -> dict:
    """A copy of the full ``header`` without the fields :func:`fill` derives."""
    h = copy.deepcopy(header)
    tensors = h.get("tensors")
    if isinstance(tensors, dict):
        for i, entry in enumerate(tensors.values()):
            if not isinstance(entry, dict):
                continue
            defaults = _stream_defaults(i, entry) or {}
            streams = entry["streams"] if isinstance(entry.get("streams"), dict) else {}
            total = 0
            for sname, info in streams.items():
                if isinstance(info, dict):
                    n = info.get("bytes", 0)
                    total += n if isinstance(n, int) and not isinstance(n, bool) else 0
                    # bytes last: blob's default depends on it
                    for k in ("key", "dtype", "raw_bytes", "blob", "bytes"):
                        if k in info and k in defaults.get(sname, {}) \
                                and info[k] == defaults[sname][k] and type(info[k]) is type(defaults[sname][k]):
                            del info[k]
            if entry.get("stored_bytes") == total:
                del entry["stored_bytes"]
    for m in h.get("modules") if isinstance(h.get("modules"), list) else ():
        if not isinstance(m, dict) or "alias" in m:
            continue
        if m.get("training") is False:
            del m["training"]
        if m.get("config") == {} and m.get("kind") == "container":
            del m["config"]
        refs = m.get("tensors")
        if isinstance(refs, dict):
            for name, r in refs.items():
                if not isinstance(r, dict):
                    continue
                if isinstance(m.get("path"), str) and r.get("ref") == _join(m["path"], name):
                    del r["ref"]
                if r.get("requires_grad") is (r.get("kind") == "parameter"):
                    del r["requires_grad"]
                if r.get("persistent") is True:
                    del r["persistent"]
            if not refs:
                del m["tensors"]
    graph = h.get("graph")
    if isinstance(graph, dict):
        if "codegen" in graph and graph["codegen"] is None:
            del graph["codegen"]
        nodes = graph.get("nodes") if isinstance(graph.get("nodes"), list) else []
        derived = _NodeNames() if _version(h) >= 3 else None
        seen: dict[str, int] = {}
        for i, n in enumerate(nodes):
            if not isinstance(n, dict):
                continue
            name = n.get("name")
            if derived is not None:
                for k in ("args", "kwargs"):
                    if k in n:
                        n[k] = _refs_by_distance(n[k], i, seen)
            if n.get("args") == _EMPTY_ARGS:
                del n["args"]
            if n.get("kwargs") == _EMPTY_KWARGS:
                del n["kwargs"]
            if derived is not None and isinstance(name, str) and derived.add(n, name):
                del n["name"]  # the reader derives it from the target
            elif "target" in n and n["target"] == name and isinstance(n["target"], str):
                del n["target"]
            if isinstance(name, str):
                seen.setdefault(name, i)
    if h.get("dropped") == []:
        del h["dropped"]
    return h


def fill(header: Any) -> Any:
    """``header`` (parsed from a file) with the fields :func:`minimize` left out put back,
    in place; never raises."""
    if not isinstance(header, dict):
        return header
    tensors = header.get("tensors")
    if isinstance(tensors, dict):
        for i, entry in enumerate(tensors.values()):
            if not isinstance(entry, dict) or not isinstance(entry.get("streams"), dict):
                continue
            for sname, d in (_stream_defaults(i, entry) or {}).items():
                info = entry["streams"][sname]
                for k, v in d.items():
                    info.setdefault(k, v)
            if "stored_bytes" not in entry:
                sizes = [s.get("bytes") for s in entry["streams"].values() if isinstance(s, dict)]
                if all(isinstance(n, int) and not isinstance(n, bool) for n in sizes):
                    entry["stored_bytes"] = sum(sizes)
    for m in header.get("modules") if isinstance(header.get("modules"), list) else ():
        if not isinstance(m, dict) or "alias" in m:
            continue
        m.setdefault("training", False)
        if m.get("kind") == "container":
            m.setdefault("config", {})
        refs = m.setdefault("tensors", {})
        if isinstance(refs, dict):
            for name, r in refs.items():
                if not isinstance(r, dict):
                    continue
                if "ref" not in r and isinstance(m.get("path"), str):
                    r["ref"] = _join(m["path"], name)
                if r.get("kind") == "parameter":
                    r.setdefault("requires_grad", True)
                elif r.get("kind") == "buffer":
                    r.setdefault("persistent", True)
    graph = header.get("graph")
    if isinstance(graph, dict):
        graph.setdefault("codegen", None)
        derived = _NodeNames() if _version(header) >= 3 else None
        names: list[Any] = []
        for n in graph.get("nodes") if isinstance(graph.get("nodes"), list) else ():
            if isinstance(n, dict):
                n.setdefault("args", dict(_EMPTY_ARGS, v=[]))
                n.setdefault("kwargs", dict(_EMPTY_KWARGS, v=[]))
                if derived is not None:
                    if "name" not in n and isinstance(n.get("target"), str) \
                            and n.get("op") in _DERIVED_OPS:
                        n["name"] = derived.derive(n)
                    elif isinstance(n.get("name"), str):
                        derived.used.add(n["name"])
                    for k in ("args", "kwargs"):
                        n[k] = _refs_by_name(n[k], names)
                if "name" in n:
                    n.setdefault("target", n["name"])
            names.append(n.get("name") if isinstance(n, dict) else None)
    header.setdefault("dropped", [])
    return header


#: the smallest stream (stored bytes) the writer gives a ``crc8`` locator byte
CRC8_MIN = 64


def crc8_min(header: dict, where: str = "artifact") -> int:
    """The header's ``crc8_min`` (0 when absent: every stream has a locator byte); a value
    that is not an integer in [0, 2**32] is refused (:class:`ArtifactFormatError`)."""
    from fxpress.errors import ArtifactFormatError

    v = header.get("crc8_min", 0)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1 << 32:
        raise ArtifactFormatError(f"{where}: header field 'crc8_min' must be an integer in "
                                  f"[0, 2**32] (bytes), got {str(v)[:40]!r}; the file was not "
                                  "written by fxpress or was altered")
    return v


def crc8(data: Any) -> str:
    """The damage locator of one stored stream: the low byte of its CRC-32, 2 hex digits."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1).data
    return f"{zlib.crc32(data) & 0xFF:02x}"


def stream_order(header: dict) -> Iterable[tuple[str, str, dict]]:
    """(tensor, stream name, info) of every stream ``crc8`` lists, in its order: those of at
    least ``crc8_min`` stored bytes (:func:`crc8_min`)."""
    least = crc8_min(header)
    for key, entry in header["tensors"].items():
        for sname, info in entry.get("streams", {}).items():
            n = info.get("bytes", 0)
            if least == 0 or (isinstance(n, int) and n >= least):
                yield key, sname, info


__all__ = ["minimize", "fill", "crc8", "crc8_min", "stream_order", "CRC8_MIN"]
