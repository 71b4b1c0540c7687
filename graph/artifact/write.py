"""Save: walk a GraphModule into the header and the payload's streams, write atomically."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.fx

from fxpress.errors import ArtifactError, UnsupportedGraphError
from fxpress.graph.artifact.compact import CRC8_MIN, crc8
from fxpress.graph.artifact.files import _target, os_failure, write_atomic
from fxpress.graph.artifact.format import BLOB_KEY, BLOB_STREAM_BYTES, VERSION, _pack_header
from fxpress.graph.artifact.modules import TORCH_NN, plain
from fxpress.graph.artifact.kernels import fxpress_kernel_guard
from fxpress.graph.artifact.rnn import fxpress_lstm_guard
from fxpress.graph.artifact.schema import Allowlist, _join, class_name
from fxpress.graph.artifact.specs import spec_for_file
from fxpress.graph.artifact import arith
from fxpress.graph.artifact.limits import DEFAULT_LIMITS
from fxpress.graph.artifact.tensors import BlockStream, _as_ints, encode_tensor, encode_tensor_blocks
from fxpress.graph.artifact.values import _Encoder, dtype_name
from fxpress.graph.capture import node_shape
from fxpress.graph.custom_functions import inference_graph
from fxpress.graph.outputs import dataclass_fields, named_outputs
from fxpress.graph.runtime import RuntimeModule

_BASE_MODULE_KEYS = frozenset(vars(torch.nn.Module()).keys())
_HOOK_KEYS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")


def _is_guards_fn(m: torch.nn.Module) -> bool:
    # torch.export's input guards: generated Python, re-derivable, never data
    return type(m).__name__ == "GuardsFn" and type(m).__module__.startswith("torch.export")


class _Writer:
    """Walks a GraphModule into the header's parts; hands each encoded stream to ``store``."""

    def __init__(self, gm: torch.fx.GraphModule, entropy: bool, store: "_Store"):
        self.gm, self.entropy, self.store = gm, entropy, store
        self.allow = Allowlist()
        self.tensors: dict[str, dict] = {}
        self.streams: dict[str, tuple[torch.dtype, list[int], int]] = {}  # key -> dtype, shape, bytes
        self.blob: list[tuple[str, int]] = []  # small streams (key, bytes), in blob order
        self.crc8: list[str] = []  # the damage locator of every stream of >= CRC8_MIN bytes
        self.storage_keys: dict[tuple, str] = {}
        self.modules: list[dict] = []
        self.dropped: list[str] = []
        self.skip_modules: set[str] = set()
        #: decoded bytes the file's acW streams may still take (the reader's default bound)
        self.arith_left = DEFAULT_LIMITS.arith_bytes

    def tensor_ref(self, qualname: str, t: torch.Tensor) -> str:
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype) if t.numel() else None
        if ident is not None and ident in self.storage_keys:
            return self.storage_keys[ident]  # tied weights are stored once
        # streams are named by number: safetensors keeps its own JSON index of them, and
        # long qualified names there are a fixed cost that dominates small artifacts
        key, entropy, arith_left = str(len(self.tensors)), self.entropy, self.arith_left
        entry, streams = encode_tensor_blocks(key, t, entropy, arith_left)
        self.arith_left -= sum(info["raw_bytes"] for info in entry["streams"].values()
                               if arith.width(info.get("codec")))
        self.tensors[qualname] = entry
        for info in entry["streams"].values():
            skey = info["key"]
            st = streams[skey]
            blocks = isinstance(st, BlockStream)
            n = st.nbytes if blocks else st.numel() * st.element_size()
            if n < BLOB_STREAM_BYTES:
                info["blob"] = True
                self.blob.append((skey, n))
            else:
                self.streams[skey] = (st.dtype, list(st.shape), n)
            if blocks:  # a large sparse tensor's stream: never held whole
                crc = self.store.put_blocks(skey, st)
                if n >= CRC8_MIN:
                    self.crc8.append(f"{crc & 0xFF:02x}")  # compact.crc8 of its bytes
                continue
            # a stream that is a view of the model's tensor costs nothing to keep
            shared = st.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            data = _as_ints(st)
            if n >= CRC8_MIN:
                self.crc8.append(crc8(data))
            self.store.put(skey, data, shared, lambda: encode_tensor(key, t, entropy, arith_left)[1])
        del streams
        if ident is not None:
            self.storage_keys[ident] = qualname
        return qualname

    def module_entry(self, path: str, m: torch.nn.Module) -> dict:
        where = f"module {path!r} ({class_name(type(m))})"
        if path:
            for k in _HOOK_KEYS:
                if getattr(m, k, None):
                    raise UnsupportedGraphError(f"{where} has {k.strip('_')}; hooks are code and "
                                                "cannot be stored. Remove them before saving.")
        entry: dict[str, Any] = {"path": path, "training": bool(m.training), "tensors": {}}
        if isinstance(m, RuntimeModule):
            entry["kind"] = "runtime"
            entry["class"] = class_name(type(m))
            encode = _Encoder(self.allow, where)
            config = m.config()
            bad = [k for k in config if not isinstance(k, str) or not k.isidentifier()
                   or k.startswith("_")]
            if bad:
                raise UnsupportedGraphError(f"{where}: config() keys must be public names, got {bad}")
            entry["config"] = {k: encode(v) for k, v in config.items()}
            params = {n for n, _ in m.named_parameters()}
            for name, t in m.state_dict(keep_vars=True).items():
                if t is None or "." in name:  # a child's tensors are in the child's entry
                    continue
                entry["tensors"][name] = {"ref": self.tensor_ref(_join(path, name), t),
                                          "kind": "parameter" if name in params else "buffer",
                                          "requires_grad": bool(t.requires_grad)}
            return entry
        if isinstance(m, torch.fx.GraphModule) and path:
            raise UnsupportedGraphError(f"{where}: nested GraphModules are not supported; "
                                        "inline it into the parent graph first")
        public, derived = frozenset(), frozenset()
        if path:
            cls = type(m)
            torch_name = self.allow.module_name_of(cls)
            if cls is torch.nn.Module:
                entry["kind"], entry["class"] = "container", "torch.nn.Module"
            elif torch_name is not None:
                entry["kind"], entry["class"] = "torch.nn", torch_name
                public, derived = TORCH_NN[torch_name.removeprefix("torch.nn.")]
            else:
                raise UnsupportedGraphError(
                    f"{where}: only torch.nn modules (the reviewed classes) and RuntimeModule "
                    "subclasses can be stored; capture the model so this module's code becomes "
                    "graph nodes (torch.export does), or make it a RuntimeModule with "
                    "config()/from_state()")
        config = {}
        encode = _Encoder(self.allow, where)
        for k, v in vars(m).items():
            if k in _BASE_MODULE_KEYS:
                continue
            if isinstance(v, torch.Tensor):
                entry["tensors"][k] = {"ref": self.tensor_ref(_join(path, k), v), "kind": "attr",
                                       "requires_grad": bool(v.requires_grad)}
                continue
            if not path or entry["kind"] == "container":
                continue  # a container's plain attributes take no part in the graph
            if k in derived:  # recomputed on load; stored when plain, for older readers
                try:
                    config[k] = encode(plain(v, where))
                except (UnsupportedGraphError, ArtifactError):
                    pass
                continue
            if k not in public:
                raise UnsupportedGraphError(
                    f"{where}: attribute {k!r} is not one of {cls.__name__}'s constructor fields "
                    f"({', '.join(sorted(public)) or 'none'}); artifacts store torch.nn modules "
                    "as those fields only. Delete the attribute before saving")
            config[k] = encode(v)
        if path:
            entry["config"] = config
        for name, p in m._parameters.items():
            entry["tensors"][name] = ({"ref": self.tensor_ref(_join(path, name), p),
                                       "kind": "parameter", "requires_grad": bool(p.requires_grad)}
                                      if p is not None else {"ref": None, "kind": "parameter"})
        for name, b in m._buffers.items():
            entry["tensors"][name] = ({"ref": self.tensor_ref(_join(path, name), b), "kind": "buffer",
                                       "persistent": name not in m._non_persistent_buffers_set}
                                      if b is not None else {"ref": None, "kind": "buffer"})
        return entry

    def walk(self) -> None:
        seen: dict[int, str] = {}

        def visit(path: str, m: torch.nn.Module) -> None:
            if id(m) in seen:
                self.modules.append({"path": path, "alias": seen[id(m)]})
                return
            seen[id(m)] = path
            entry = self.module_entry(path, m)
            self.modules.append(entry)
            for name, child in m._modules.items():
                if child is None:
                    continue
                cpath = _join(path, name)
                if _is_guards_fn(child):
                    self.skip_modules.add(cpath)
                    continue
                visit(cpath, child)

        visit("", self.gm)

    def nodes(self) -> list[dict]:
        out = []
        for node in self.gm.graph.nodes:
            where = f"node {node.name!r} ({node.op} {node.target})"
            if node.op == "call_module" and str(node.target) in self.skip_modules:
                if node.users:
                    raise UnsupportedGraphError(f"{where}: export guards with users")
                self.dropped.append(f"{node.name}: torch.export input guards (generated code)")
                continue
            target: Any = node.target
            if node.op == "call_function" and target in (fxpress_lstm_guard, fxpress_kernel_guard):
                continue  # the loader inserts them again (see .rnn, .kernels)
            args, kwargs = tuple(node.args), dict(node.kwargs)
            fields = dataclass_fields(target, args, kwargs) if node.op == "call_function" else None
            if fields is not None:
                # a dataclass output (a user's, not a ModelOutput): stored as ModelOutputs,
                # the same fields by name, so loading needs no model code
                target, args, kwargs = named_outputs, (), fields
            if node.op == "call_function":
                name = self.allow.name_of(target)
                if name is None:
                    raise UnsupportedGraphError(
                        f"cannot save {where}: {getattr(target, '__module__', '?')}."
                        f"{getattr(target, '__qualname__', target)} is not an allowlisted function "
                        "(torch, torch.nn.functional, aten, operator, math)")
                target = name
            elif node.op == "call_method" and not self.allow.method_allowed(target):
                raise UnsupportedGraphError(f"cannot save {where}: Tensor method {target!r} is "
                                            "not allowlisted")
            encode = _Encoder(self.allow, where)
            entry: dict[str, Any] = {"name": node.name, "op": node.op, "target": str(target),
                                     "args": encode(args), "kwargs": encode(kwargs)}
            shape, dtype = node_shape(node)
            if shape is not None:
                entry["shape"] = [s if isinstance(s, int) else None for s in shape]
                entry["dtype"] = dtype_name(dtype)
            if "fxpress_pass" in node.meta:
                entry["pass"] = str(node.meta["fxpress_pass"])
            out.append(entry)
        return out


def _codegen(gm: torch.fx.GraphModule) -> dict | None:
    cg = gm.graph._codegen
    if type(cg) is torch.fx.graph.CodeGen:
        return None
    if isinstance(cg, torch.fx.graph._PyTreeCodeGen):
        info = cg.pytree_info
        return {"kind": "pytree", "orig_args": list(info.orig_args),
                "in_spec": spec_for_file(info.in_spec), "out_spec": spec_for_file(info.out_spec)}
    raise UnsupportedGraphError(f"graph code generator {type(cg).__name__} is not supported")


#: capture diagnostics of the run that made the graph (its timing, its error against the
#: model): the pipeline's records hold them; the artifact does not (~130 header bytes of a
#: small transformer's file)
_RUN_ONLY_META = frozenset({"seconds", "capture_error"})


def _json_safe(obj: Any, digits: int | None = None) -> Any:
    """``obj`` as plain JSON data (non-finite floats as null); with ``digits``, floats
    rounded to that many significant digits (timings and errors in metadata: their last
    digits cost header bytes and mean nothing)."""
    try:
        out = json.loads(json.dumps(obj, default=lambda o: None, allow_nan=False))
    except ValueError:
        out = json.loads(json.dumps(obj, default=lambda o: None).replace("NaN", "null")
                         .replace("-Infinity", "null").replace("Infinity", "null"))
    return out if digits is None else _round_floats(out, digits)


def _round_floats(obj: Any, digits: int) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, list):
        return [_round_floats(v, digits) for v in obj]
    if isinstance(obj, dict):
        return {k: _round_floats(v, digits) for k, v in obj.items()}
    return obj


# The header holds the payload's sha256 and comes before the payload, so the payload is
# read twice after each tensor is encoded once: for the digest, then to be written (save)
# or not at all (artifact_size). A store keeps the encoded streams in between. Streams that
# are views of the model's own tensors (dense, no codec) are kept by reference in every
# store: they cost no memory.

_CHUNK = 1 << 22


class _Store:
    """Streams by key, kept by reference when they are views of the model's tensors."""

    def __init__(self) -> None:
        self.views: dict[str, np.ndarray] = {}

    def put(self, key: str, data: np.ndarray, shared: bool,
            rebuild: Callable[[], Mapping[str, torch.Tensor]]) -> None:
        """``data``: the stream's bytes; ``shared``: a view of a model tensor; ``rebuild``:
        encodes the stream's tensor again (every stream of it, by key)."""
        if shared:
            self.views[key] = data
        else:
            self._put(key, data, rebuild)

    def _put(self, key, data, rebuild) -> None:
        raise NotImplementedError

    def chunks(self, key: str) -> Iterable[Any]:
        if key in self.views:
            return _pieces(self.views[key])
        return self._chunks(key)

    def _chunks(self, key: str) -> Iterable[Any]:
        raise NotImplementedError

    def put_blocks(self, key: str, stream: BlockStream) -> int:
        """Take a stream produced a block at a time; return the CRC-32 of its bytes."""
        crc = 0
        for piece in self._put_blocks(key, stream):
            crc = zlib.crc32(piece, crc)
        return crc

    def _put_blocks(self, key: str, stream: BlockStream) -> Iterable[np.ndarray]:
        raise NotImplementedError


def _pieces(a: np.ndarray) -> Iterable[memoryview]:
    view = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return (view[i:i + _CHUNK] for i in range(0, len(view), _CHUNK))


class _Keep(_Store):
    """Every stream in memory (:func:`dumps`, which returns the whole file anyway)."""

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, np.ndarray] = {}

    def _put(self, key, data, rebuild) -> None:
        self.data[key] = data

    def _chunks(self, key):
        return _pieces(self.data[key])

    def _put_blocks(self, key, stream):
        parts = list(stream.chunks())
        self.data[key] = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        return parts


class _Spool(_Store):
    """Encoded streams in an anonymous temporary file next to the artifact (:func:`save`)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.file = tempfile.TemporaryFile(dir=folder)
        self.at: dict[str, tuple[int, int]] = {}

    def _put(self, key, data, rebuild) -> None:
        start = self.file.tell()
        for piece in _pieces(data):
            self.file.write(piece)
        self.at[key] = (start, self.file.tell() - start)

    def _put_blocks(self, key, stream):
        start = self.file.tell()
        for piece in stream.chunks():
            self.file.write(piece.data)
            yield piece
        self.at[key] = (start, self.file.tell() - start)

    def _chunks(self, key):
        self.file.flush()
        start, n = self.at[key]
        fd = self.file.fileno()
        for i in range(0, n, _CHUNK):
            piece = os.pread(fd, min(_CHUNK, n - i), start + i)
            if len(piece) != min(_CHUNK, n - i):
                raise ArtifactError(f"the temporary stream file was cut short at stream {key!r}")
            yield piece

    def close(self) -> None:
        self.file.close()


class _Recompute(_Store):
    """Nothing but the views: a stream is encoded again when the payload reaches it
    (:func:`artifact_size`). The other streams of that tensor wait until read."""

    def __init__(self) -> None:
        super().__init__()
        self.rebuild: dict[str, Callable[[], Mapping[str, torch.Tensor]]] = {}
        self.sizes: dict[str, int] = {}
        self.ready: dict[str, np.ndarray] = {}
        self.blocks: dict[str, BlockStream] = {}

    def _put(self, key, data, rebuild) -> None:
        self.rebuild[key], self.sizes[key] = rebuild, data.nbytes

    def _put_blocks(self, key, stream):
        self.blocks[key] = stream  # encoded again, block by block, when the payload reaches it
        return stream.chunks()

    def _chunks(self, key):
        if key in self.blocks:
            return self.blocks[key].chunks()
        if key not in self.ready:
            for k, st in self.rebuild[key]().items():
                if k in self.rebuild and k not in self.views:
                    self.ready[k] = _as_ints(st)
        data = self.ready.pop(key)
        if data.nbytes != self.sizes[key]:  # encoding is deterministic; never expected
            raise ArtifactError(f"stream {key!r} encoded to {data.nbytes} bytes, then to "
                                f"{self.sizes[key]}")
        return _pieces(data)


# safetensors' names, in the order it lays tensors out in its payload (widest first; then
# by name). test_artifact checks the payload against safetensors.torch.save byte for byte.
_ST_DTYPES = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64",
              torch.complex64: "C64", torch.float32: "F32", torch.uint32: "U32",
              torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.uint16: "U16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3",
              torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_RANK = {d: i for i, d in enumerate(_ST_DTYPES)}


def _safetensors_index(streams: Mapping[str, tuple[torch.dtype, list[int], int]]
                       ) -> tuple[bytes, list[str]]:
    """The safetensors payload's 8-byte length and JSON index for ``streams`` (key -> dtype,
    shape, bytes), and the keys in payload order: what ``safetensors.torch.save`` writes
    before the tensors' bytes."""
    for key, (dtype, _, _) in streams.items():
        if dtype not in _ST_DTYPES:
            raise UnsupportedGraphError(f"stream {key!r}: safetensors cannot store {dtype}")
    order = sorted(streams, key=lambda k: (_ST_RANK[streams[k][0]], k))
    items, at = [], 0
    for key in order:
        dtype, shape, n = streams[key]
        items.append(f'{json.dumps(key)}:{{"dtype":"{_ST_DTYPES[dtype]}","shape":'
                     f'[{",".join(str(s) for s in shape)}],"data_offsets":[{at},{at + n}]}}')
        at += n
    index = ("{" + ",".join(items) + "}").encode()
    index += b" " * (-len(index) % 8)
    return struct.pack("<Q", len(index)) + index, order


@dataclass
class _Layout:
    """What :func:`save` writes: the file's head (prefix + header, final) and its payload,
    produced piece by piece from the store."""

    header: dict
    head: bytes
    payload_bytes: int
    index: bytes
    order: list[str]
    store: _Store
    blob: list[tuple[str, int]]

    @property
    def size(self) -> int:
        return len(self.head) + self.payload_bytes

    def payload(self) -> Iterable[Any]:
        if not self.order:
            return
        yield self.index
        for key in self.order:
            if key == BLOB_KEY:
                for skey, _ in self.blob:
                    yield from self.store.chunks(skey)
            else:
                yield from self.store.chunks(key)

    def chunks(self) -> Iterable[Any]:
        yield self.head
        yield from self.payload()


def _layout(gm: torch.fx.GraphModule, entropy: bool, report: Any, store: _Store) -> _Layout:
    if not isinstance(gm, torch.fx.GraphModule):
        raise UnsupportedGraphError(f"save: expected a torch.fx.GraphModule, got {type(gm).__name__}; "
                                    "capture the model first (fxpress.capture)")
    gm = inference_graph(gm, "save")  # a model's autograd.Function: its forward's ops
    w = _Writer(gm, entropy, store)
    w.walk()
    nodes = w.nodes()
    streams = dict(w.streams)
    blob_bytes = sum(n for _, n in w.blob)
    if w.blob:
        streams[BLOB_KEY] = (torch.uint8, [blob_bytes], blob_bytes)
    index, order = _safetensors_index(streams)
    lay = _Layout({}, b"", len(index) + sum(n for _, _, n in streams.values()) if order else 0,
                  index, order, store, w.blob)
    digest = hashlib.sha256()
    for piece in lay.payload():
        digest.update(piece)
    lay.header = {
        "format": "fxpress", "version": VERSION,
        "torch": torch.__version__,
        "graph": {"class_name": type(gm).__name__ if type(gm).__name__.isidentifier()
                  else "GraphModule", "nodes": nodes, "codegen": _codegen(gm)},
        "modules": w.modules,
        "tensors": w.tensors,
        "meta": _json_safe({k: v for k, v in gm.meta.get("fxpress", {}).items()
                            if k not in _RUN_ONLY_META}, digits=4),
        "dropped": w.dropped,
        "entropy": bool(entropy),
        "payload": {"length": lay.payload_bytes, "sha256": digest.hexdigest()},
        "crc8": "".join(w.crc8), "crc8_min": CRC8_MIN,
    }
    if w.blob:
        lay.header["blob"] = {"key": BLOB_KEY, "bytes": blob_bytes}
    if report is not None:
        lay.header["report"] = _json_safe(report)
    lay.head = _pack_header(lay.header)
    return lay


def dumps(gm: torch.fx.GraphModule, *, entropy: bool = False, report: Any = None) -> bytes:
    """The artifact as bytes (what :func:`save` writes).

    >>> len(dumps(torch.fx.symbolic_trace(torch.nn.Linear(4, 2)))) > PREFIX_SIZE
    True
    """
    return b"".join(_layout(gm, entropy, report, _Keep()).chunks())


def artifact_header(gm: torch.fx.GraphModule, entropy: bool = False) -> dict:
    """The header ``save(gm)`` would write, with ``file_bytes``: the file's exact size.

    Nothing is written and the payload is never held: each stream is encoded, counted and
    dropped, then encoded again when the payload digest reaches it; dense tensors are read
    in place, and a large sparse tensor's streams are encoded a block at a time both times
    (:func:`~fxpress.graph.artifact.tensors.encode_tensor_blocks`), never held whole.
    """
    lay = _layout(gm, entropy, None, _Recompute())
    lay.header["file_bytes"] = lay.size
    return lay.header


def artifact_size(gm: torch.fx.GraphModule, entropy: bool = False) -> int:
    """Bytes ``save(gm)`` would write (see :func:`artifact_header`)."""
    return artifact_header(gm, entropy)["file_bytes"]


def save(gm: torch.fx.GraphModule, path: str | os.PathLike, *, entropy: bool = False,
         report: Any = None) -> int:
    """Write ``gm`` to ``path`` atomically; return the file's size in bytes.

    >>> fxpress.save(gm, "mlp.fxp")                     # doctest: +SKIP
    41372

    ``entropy=True`` also compresses the bitmap, index and 8-bit streams (slower).
    ``report`` is any JSON-able data to embed (``fxpress report`` reads pipeline records
    from it). The bytes go to a temporary file in the same directory, are fsynced and
    renamed over ``path``: an interrupted save never leaves a broken file there. The file
    is written stream by stream: encoded streams wait in an anonymous temporary file, dense
    ones are read from the model, so no copy of the whole artifact is held in memory.
    """
    path, parent = _target(path)
    try:
        spool = _Spool(parent)
    except OSError as e:
        raise os_failure(path, e) from None
    try:
        lay = _layout(gm, entropy, report, spool)
        write_atomic(path, lay.chunks())
    except OSError as e:  # the spool's writes (disk full): the earlier file is untouched
        raise os_failure(path, e) from None
    finally:
        spool.close()
    return lay.size
