"""Save a GraphModule as one safe, really compressed file, and load it back.

>>> fxpress.save(res.module, "model.fxp")                     # doctest: +SKIP
>>> gm = fxpress.load("model.fxp")                            # doctest: +SKIP

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89FXPRESS"  (the high byte catches 7-bit and text-mode damage)
    8       4     u32 format version (1)
    12      4     u32 flags: bit 0 = header is zlib-compressed (always set by this version)
    16      8     u64 header length H (as stored)
    24      32    sha256 of the H stored header bytes
    56      H     header: UTF-8 JSON (graph, module tree, tensor table, metadata), zlib
    56+H    P     payload: a standard safetensors blob holding every stream

One file, not a directory: a single ``os.replace`` makes the write atomic (a directory
cannot be swapped atomically), one sha256 chain covers everything, and a file is what
people copy, upload and attach. The payload is plain safetensors, so
``safetensors.torch.load(data[header["payload"]["offset"]:])`` reads the streams anywhere.

The header holds data only: nodes with their op, target *name* and arguments (tagged
JSON for tuples, slices, dtypes, devices, ...), the module tree (torch.nn modules by class
name plus their attributes, runtime modules by :meth:`RuntimeModule.config`), export
graphs' pytree specs (``treespec_dumps``, JSON), and one entry per tensor: dtype, shape,
encoding, streams, the first 64 bits of the sha256 of every stream and of the decoded
tensor (the full sha256 of the header and of the payload guard the file as a whole).

Tensors are stored in the smallest of four encodings, chosen per tensor:

* ``dense``: the bytes as they are (packed integer buffers are already at their bit width);
* ``bitmap``: one bit per element (is it non-zero?) plus the non-zero values;
* ``relidx``: Deep Compression's relative indices: for each non-zero, the gap since the
  previous one in ``bits`` bits (1..8, the best width is searched), with a zero "filler"
  entry when a gap does not fit, plus the values;
* ``bitidx`` (uint8 tensors that are bit sets, such as a codebook layer's packed 1-bit
  mask of non-zeros): relative indices of the set *bits*, in ``bits`` bits each, code
  ``2**bits - 1`` being a filler step of ``2**bits - 1`` positions; no values stream (every
  listed bit is 1). A 10%-dense mask costs about 0.5 bits per position instead of 1.

"Zero" means all bits zero, so ``-0.0`` stays dense and decoding is bit-exact.
With ``entropy=True`` the bitmap, index and 8-bit integer streams (values included) are further compressed
with the standard-library codec that makes each one smallest (zlib, bz2 or lzma).

Loading never unpickles and never evaluates text: every call target, method name, module
class and attribute is looked up in an allowlist (torch and torch.nn.functional functions,
ATen overloads, Tensor methods, ``operator``, a few builtins, torch.nn module classes and
the runtime module classes handed in). Everything is checked before anything is built,
so a bad file raises an :class:`~fxpress.errors.ArtifactError` and leaves nothing behind.
"""
from __future__ import annotations

import bz2
import contextlib
import builtins
import hashlib
import io
import json
import keyword
import lzma
import math
import operator
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from fxpress.errors import (ArtifactError, ArtifactFormatError, ArtifactIntegrityError,
                            ForbiddenTargetError, UnsupportedGraphError)
from fxpress.graph.capture import node_shape
from fxpress.graph.header_dict import HEADER_ZDICT
from fxpress.graph.weights import RuntimeModule

MAGIC = b"\x89FXPRESS"
VERSION = 1
_PREFIX = struct.Struct("<8sIIQ32s")
_FLAG_ZLIB_HEADER = 1
#: The header is zlib-compressed from the preset dictionary of graph.header_dict (what
#: save writes; flag 1 alone is what fxpress wrote before, and still loads).
_FLAG_ZDICT_HEADER = 2
#: Streams smaller than BLOB_STREAM_BYTES share one safetensors tensor, BLOB_KEY, in the
#: order of the header's tensor table (see _unblob): safetensors' own JSON index costs
#: ~65 bytes a tensor, most of a small stream's worth.
_FLAG_BLOB_STREAMS = 4
_KNOWN_FLAGS = _FLAG_ZLIB_HEADER | _FLAG_ZDICT_HEADER | _FLAG_BLOB_STREAMS
BLOB_KEY = "blob"
BLOB_STREAM_BYTES = 1 << 16
PREFIX_SIZE = _PREFIX.size  # 56
#: A header larger than this is refused before it is read.
MAX_HEADER_BYTES = 256 << 20
#: Decoded tensors may total at most max(this, EXPANSION x file size) unless load() is told more.
MIN_DECODED_LIMIT = 1 << 30
EXPANSION_LIMIT = 10_000
SPARSE_MIN_NUMEL = 16
CODECS = ("zlib", "bz2", "lzma")

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


# -- allowlist --------------------------------------------------------------------------------

# torch.* callables that touch files, global state or the compiler: never a graph target.
_TORCH_DENY = {"load", "save", "from_file", "compile", "manual_seed", "seed", "initial_seed",
               "get_file_path", "thread_safe_generator", "import_ir_module",
               "import_ir_module_from_buffer", "prepare_multiprocessing_environment",
               "compiled_with_cxx11_abi", "vmap", "cond", "while_loop", "export"}
_TORCH_DENY_PREFIX = ("set_", "get_", "use_", "init_", "is_", "are_", "profiler", "autocast")
# Tensor methods that take callables, install hooks, or expose raw memory.
_METHOD_DENY = {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
                "backward", "share_memory_", "storage", "untyped_storage", "set_", "data_ptr",
                "pin_memory", "from_file", "tolist", "numpy", "record_stream", "module_load"}
_OPERATOR_DENY = {"attrgetter", "itemgetter", "methodcaller", "call"}
_BUILTINS = ("getattr", "len", "int", "float", "bool", "abs", "min", "max", "round", "pow",
             "divmod", "slice")
_ATEN_DENY = {"from_file", "_print", "save", "load"}
# ATen's operator overloads are spelled as dunders; these names, and no other dunder, resolve.
_ATEN_DUNDERS = {f"__{op}__" for op in ("and", "or", "xor", "lshift", "rshift", "iand", "ior",
                                        "ixor", "ilshift", "irshift")}
# fx graphs use these private helpers; they compute on tensors and nothing else.
_EXTRA = {"torch._assert": lambda: torch._assert}


def _public_callables(module: Any, prefix: str, deny: set[str] = frozenset(),
                      deny_prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {}
    for name in dir(module):
        if name.startswith("_") or name in deny or name.startswith(deny_prefix):
            continue
        obj = getattr(module, name, None)
        if callable(obj) and not isinstance(obj, type) and not isinstance(obj, type(os)):
            out[f"{prefix}.{name}"] = obj
    return out


_STATIC: dict[str, Any] | None = None


def _static_functions() -> dict[str, Any]:
    global _STATIC
    if _STATIC is None:
        fns: dict[str, Any] = {}
        fns.update(_public_callables(math, "math"))
        fns.update(_public_callables(operator, "operator", _OPERATOR_DENY))
        fns.update(_public_callables(torch, "torch", _TORCH_DENY, _TORCH_DENY_PREFIX))
        fns.update(_public_callables(F, "torch.nn.functional"))
        for name in _BUILTINS:
            fns[f"builtins.{name}"] = getattr(builtins, name)
        for name, get in _EXTRA.items():
            fns[name] = get()
        _STATIC = fns
    return _STATIC


class Allowlist:
    """What an artifact may name: functions, Tensor methods, module classes.

    >>> allow = Allowlist(runtime_modules=[])
    >>> allow.function("torch.relu") is torch.relu
    True
    """

    def __init__(self, runtime_modules: Iterable[type] = ()):
        self.functions = _static_functions()
        self._names = {}
        for name, fn in self.functions.items():
            try:
                self._names.setdefault(fn, name)
            except TypeError:  # unhashable callables cannot be looked up by identity
                pass
        self.modules: dict[str, type] = {"torch.nn.Module": torch.nn.Module}
        for name in dir(torch.nn):
            cls = getattr(torch.nn, name)
            if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and not name.startswith("_"):
                self.modules[f"torch.nn.{name}"] = cls
        self.runtime: dict[str, type] = {}
        for cls in runtime_modules:
            if not (isinstance(cls, type) and issubclass(cls, RuntimeModule)):
                raise TypeError(f"runtime module {cls!r} is not a RuntimeModule subclass")
            self.runtime[class_name(cls)] = cls

    # save side: object -> name
    def name_of(self, fn: Any) -> str | None:
        if isinstance(fn, torch._ops.OpOverload):
            ns = fn.namespace
            packet, overload = fn._schema.name.split("::")[-1], fn._overloadname
            if ns == "aten" and packet not in _ATEN_DENY:
                return f"torch.ops.aten.{packet}.{overload}"
            return None
        try:
            return self._names.get(fn)
        except TypeError:
            return None

    # load side: name -> object
    def function(self, name: str) -> Any:
        if not isinstance(name, str):
            raise KeyError(name)
        if name.startswith("torch.ops."):
            return _aten_op(name)
        return self.functions[name]

    def method_allowed(self, name: str) -> bool:
        return (isinstance(name, str) and name.isidentifier() and not name.startswith("_")
                and name not in _METHOD_DENY and callable(getattr(torch.Tensor, name, None)))


def _aten_op(name: str) -> Any:
    parts = name.split(".")
    if len(parts) != 5 or parts[:3] != ["torch", "ops", "aten"]:
        raise KeyError(name)
    packet_name, overload = parts[3], parts[4]
    dunder = packet_name.startswith("__") and packet_name not in _ATEN_DUNDERS
    if (not packet_name.isidentifier() or dunder or packet_name in _ATEN_DENY
            or not overload.isidentifier() or overload.startswith("__")):
        raise KeyError(name)
    try:
        packet = getattr(torch.ops.aten, packet_name)
        if overload not in packet.overloads():
            raise KeyError(name)
        op = getattr(packet, overload)
    except (AttributeError, RuntimeError) as e:
        raise KeyError(name) from e
    if not isinstance(op, torch._ops.OpOverload):
        raise KeyError(name)
    return op


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# -- values (node arguments, module attributes) as tagged JSON --------------------------------

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
    torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format,
                   "channels_last": torch.channels_last,
                   "channels_last_3d": torch.channels_last_3d,
                   "preserve_format": torch.preserve_format}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_DEVICE = re.compile(r"^(cpu|cuda|mps|meta|xpu)(:\d{1,3})?$")


def dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _dtype(name: Any, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise ArtifactFormatError(f"{where}: unknown dtype {name!r}")
    return _DTYPES[name]


class _Encoder:
    def __init__(self, allow: Allowlist, where: str):
        self.allow, self.where = allow, where

    def __call__(self, v: Any) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return v if math.isfinite(v) else {"$": "float", "v": repr(v)}
        if isinstance(v, torch.fx.Node):
            return {"$": "node", "v": v.name}
        if isinstance(v, torch.Size):
            return {"$": "size", "v": [int(x) for x in v]}
        if isinstance(v, tuple):
            return {"$": "tuple", "v": [self(x) for x in v]}
        if isinstance(v, list):
            return [self(x) for x in v]
        if isinstance(v, dict):
            return {"$": "dict", "v": [[self(k), self(x)] for k, x in v.items()]}
        if isinstance(v, slice):
            return {"$": "slice", "v": [self(v.start), self(v.stop), self(v.step)]}
        if v is Ellipsis:
            return {"$": "ellipsis"}
        if isinstance(v, complex):
            return {"$": "complex", "v": [v.real, v.imag]}
        if isinstance(v, torch.dtype):
            return {"$": "dtype", "v": dtype_name(v)}
        if isinstance(v, torch.device):
            return {"$": "device", "v": str(v)}
        if isinstance(v, torch.memory_format):
            return {"$": "memory_format", "v": str(v).removeprefix("torch.")}
        if isinstance(v, torch.layout):
            return {"$": "layout", "v": str(v).removeprefix("torch.")}
        if callable(v):
            name = self.allow.name_of(v)
            if name is not None:
                return {"$": "fn", "v": name}
        raise UnsupportedGraphError(
            f"{self.where}: cannot store {type(v).__name__} {_short_repr(v)} as data; "
            "artifacts hold numbers, strings, tuples, dtypes, devices and allowlisted functions")


def _short_repr(v: Any, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


class _Decoder:
    def __init__(self, allow: Allowlist, nodes: Mapping[str, torch.fx.Node] | None, where: str):
        self.allow, self.nodes, self.where = allow, nodes, where

    def __call__(self, v: Any) -> Any:
        if v is None or isinstance(v, (bool, str, int, float)):
            return v
        if isinstance(v, list):
            return [self(x) for x in v]
        if not isinstance(v, dict) or "$" not in v:
            raise ArtifactFormatError(f"{self.where}: malformed value {_short_repr(v)}")
        tag, x = v["$"], v.get("v")
        if tag == "node":
            if self.nodes is None or x not in self.nodes:
                raise ArtifactFormatError(f"{self.where}: refers to node {x!r}, which is not "
                                          "defined before it")
            return self.nodes[x]
        if tag == "tuple":
            return tuple(self(y) for y in self._list(x))
        if tag == "size":
            return torch.Size([self._int(y) for y in self._list(x)])
        if tag == "dict":
            return {self._key(k): self(y) for k, y in (self._pair(p) for p in self._list(x))}
        if tag == "slice":
            a = self._list(x)
            if len(a) != 3:
                raise ArtifactFormatError(f"{self.where}: slice needs 3 parts")
            return slice(*(self(y) for y in a))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "float" and x in ("nan", "inf", "-inf"):
            return float(x)
        if tag == "complex":
            a = self._list(x)
            return complex(float(a[0]), float(a[1]))
        if tag == "dtype":
            return _dtype(x, self.where)
        if tag == "device":
            if not isinstance(x, str) or not _DEVICE.match(x):
                raise ArtifactFormatError(f"{self.where}: bad device {x!r}")
            return torch.device(x)
        if tag == "memory_format" and x in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[x]
        if tag == "layout" and x in _LAYOUTS:
            return _LAYOUTS[x]
        if tag == "fn":
            try:
                return self.allow.function(x)
            except KeyError:
                raise ForbiddenTargetError(f"{self.where}: function {x!r} is not in the allowlist; "
                                           "the file was not loaded") from None
        raise ArtifactFormatError(f"{self.where}: unknown value tag {_short_repr(v)}")

    def _list(self, x: Any) -> list:
        if not isinstance(x, list):
            raise ArtifactFormatError(f"{self.where}: expected a list, got {_short_repr(x)}")
        return x

    def _int(self, x: Any) -> int:
        if not isinstance(x, int) or isinstance(x, bool):
            raise ArtifactFormatError(f"{self.where}: expected an int, got {_short_repr(x)}")
        return x

    def _pair(self, p: Any) -> tuple:
        if not isinstance(p, list) or len(p) != 2:
            raise ArtifactFormatError(f"{self.where}: malformed dict item {_short_repr(p)}")
        return p[0], p[1]

    def _key(self, k: Any) -> Any:
        k = self(k)
        if not isinstance(k, (str, int, float, bool, type(None))):
            raise ArtifactFormatError(f"{self.where}: dict key {_short_repr(k)} is not a scalar")
        return k


# -- tensor encodings ---------------------------------------------------------------------------

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_ints(t: torch.Tensor) -> np.ndarray:
    """The tensor's bits as a flat integer array of the same element size (bit-exact: the
    encodings below work on bit patterns, so -0.0 and NaN payloads survive)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8).numpy()
    size = flat.element_size()
    if size not in _INT_VIEW:
        raise UnsupportedGraphError(f"cannot store dtype {flat.dtype} ({size}-byte elements)")
    return flat.view(_INT_VIEW[size]).numpy()


def _from_ints(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if a.size == 0:
        return torch.empty(a.shape, dtype=dtype)
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(dtype)


def _packed_size(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


@dataclass
class _Plan:
    encoding: str
    size: int
    bits: int = 0
    entries: int = 0


def plan_encoding(t: torch.Tensor) -> _Plan:
    """The smallest of dense / bitmap / relative-index storage for ``t`` (sizes in bytes).

    >>> plan_encoding(torch.tensor([0.0] * 60 + [1.0] * 4)).encoding
    'relidx'
    """
    a = _as_ints(t)
    return _plan(a, a != 0, t.element_size())


def _plan(a: np.ndarray, mask: np.ndarray, item: int) -> _Plan:
    n = a.size
    best = _Plan("dense", n * item)
    if n < SPARSE_MIN_NUMEL:
        return best
    nnz = int(np.count_nonzero(mask))
    if nnz * item + min(n, 8 * nnz) // 8 >= best.size:
        return best  # neither sparse form can win: each value costs its bytes plus >= 1 bit
    bitmap = _Plan("bitmap", _packed_size(n, 1) + nnz * item)
    if bitmap.size < best.size:
        best = bitmap
    for bits, fillers in enumerate(_fillers(mask), 1):
        entries = fillers + nnz
        size = _packed_size(entries, bits) + entries * item
        if size < best.size:
            best = _Plan("relidx", size, bits, entries)
    return best


_BLOCK = 1 << 20


def _fillers(mask: np.ndarray) -> list[int]:
    """Filler entries relative indices need at widths 1..8: the sum over :func:`_gaps` of
    ``(gap - 1) >> bits``. One histogram of the gaps serves every width; it is built a
    block of positions at a time (positions are 8 bytes each: all at once they would
    outweigh the tensor)."""
    hist = np.zeros(0, dtype=np.int64)
    far: list[int] = []  # gaps that start in an earlier block: up to the tensor's size
    last = -1
    for start in range(0, mask.size, _BLOCK):
        pos = np.flatnonzero(mask[start:start + _BLOCK])
        if not pos.size:
            continue
        pos += start
        far.append(int(pos[0]) - last - 1)
        h = np.bincount(np.diff(pos) - 1)
        if h.size > hist.size:
            h[:hist.size] += hist
            hist = h
        else:
            hist[:h.size] += h
        last = int(pos[-1])
    far.append(mask.size - last - 1)  # the tail
    values = np.arange(hist.size, dtype=np.int64)
    return [int(hist @ (values >> bits)) + sum(g >> bits for g in far) for bits in range(1, 9)]


def _gaps(mask: np.ndarray) -> np.ndarray:
    """Distances between consecutive non-zeros, from position -1, and last the distance from
    the last non-zero to the end (the tail carries no value: fillers alone cover it)."""
    pos = np.flatnonzero(mask)
    return np.diff(pos, prepend=-1, append=mask.size)


def _encode_relidx(a: np.ndarray, mask: np.ndarray, bits: int) -> tuple[torch.Tensor, np.ndarray, int]:
    from fxpress.graph.packing import pack_bits

    gaps = _gaps(mask)
    span = 1 << bits
    fillers = (gaps - 1) >> bits
    # each non-zero: its fillers (code span-1, a step of `span`), then its own step code;
    # the tail contributes fillers only
    counts = fillers.copy()
    counts[:-1] += 1
    total = int(counts.sum())
    codes = np.full(total, span - 1, dtype=np.uint8)
    values = np.zeros(total, dtype=a.dtype)
    real = (np.cumsum(counts) - 1)[:-1]
    codes[real] = gaps[:-1] - 1 - fillers[:-1] * span
    values[real] = a[mask]
    return pack_bits(torch.from_numpy(codes), bits), values, total


def _decode_relidx(index: torch.Tensor, values: np.ndarray, bits: int, entries: int,
                   n: int, where: str) -> np.ndarray:
    from fxpress.graph.packing import unpack_bits

    codes = unpack_bits(index, bits, entries).numpy().astype(np.int64)
    pos = np.cumsum(codes + 1) - 1
    out = np.zeros(n, dtype=values.dtype)
    if entries:
        if int(pos[-1]) >= n:
            raise ArtifactIntegrityError(f"{where}: relative indices run past the tensor's end")
        out[pos] = values
    return out


def _plan_bitidx(a: np.ndarray, beat: int) -> tuple[_Plan, np.ndarray | None]:
    """The ``bitidx`` plan for the uint8 array ``a`` if it stores in fewer than ``beat``
    bytes, with the bit positions; else (a plan that loses, None). Costs one popcount
    when no width can win."""
    n = a.size * 8
    ones = int(np.bitwise_count(a).sum(dtype=np.int64))
    # each width needs >= max(ones, n / step) entries of `bits` bits: skip hopeless tensors
    if n < SPARSE_MIN_NUMEL or min(_packed_size(max(ones, -(-n // ((1 << b) - 1))), b)
                                   for b in range(1, 9)) >= beat:
        return _Plan("dense", beat), None
    pos = np.flatnonzero(np.unpackbits(a, bitorder="little"))
    gaps = np.diff(pos, prepend=-1) - 1                 # zeros before each set bit
    tail = n - 1 - int(pos[-1]) if pos.size else n      # zeros after the last one
    best = _Plan("dense", beat)
    for bits in range(1, 9):
        step = (1 << bits) - 1
        entries = int((gaps // step).sum()) + pos.size + -(-tail // step)
        size = _packed_size(entries, bits)
        if size < best.size:
            best = _Plan("bitidx", size, bits, entries)
    return best, pos


def _encode_bitidx(pos: np.ndarray, n: int, bits: int, entries: int) -> torch.Tensor:
    from fxpress.graph.packing import pack_bits

    step = (1 << bits) - 1
    gaps = np.diff(pos, prepend=-1) - 1
    tail = n - 1 - int(pos[-1]) if pos.size else n
    fill = gaps // step
    counts = fill + 1
    codes = np.full(entries, step, dtype=np.uint8)
    real = np.cumsum(counts) - 1
    codes[real] = gaps - fill * step
    return pack_bits(torch.from_numpy(codes), bits)


def _decode_bitidx(index: np.ndarray, bits: int, entries: int, nbytes: int, where: str) -> np.ndarray:
    from fxpress.graph.packing import unpack_bits

    step = (1 << bits) - 1
    codes = unpack_bits(torch.from_numpy(index.copy()), bits, entries).numpy().astype(np.int64)
    real = codes != step
    pos = np.cumsum(np.where(real, codes + 1, step)) - 1
    out = np.zeros(nbytes * 8, dtype=np.uint8)
    ones = pos[real]
    if ones.size:
        if int(ones[-1]) >= out.size:
            raise ArtifactIntegrityError(f"{where}: bit indices run past the tensor's end")
        out[ones] = 1
    return np.packbits(out, bitorder="little")


def _compress(data: bytes, codec: str) -> bytes:
    if codec == "zlib":
        return zlib.compress(data, 9)
    if codec == "bz2":
        return bz2.compress(data, 9)
    if codec == "lzma":
        return lzma.compress(data, preset=6)  # 9 allocates ~700 MB per call for no gain here
    raise ValueError(codec)


def _decompress(data: bytes, codec: str, size: int, where: str) -> bytes:
    # every decoder is bounded by the declared size: a crafted stream cannot balloon
    try:
        if codec == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(data, size)
            ok = d.eof and not d.unconsumed_tail
        elif codec == "bz2":
            d = bz2.BZ2Decompressor()
            out = d.decompress(data, size)
            ok = d.eof
        elif codec == "lzma":
            d = lzma.LZMADecompressor()
            out = d.decompress(data, size)
            ok = d.eof
        else:
            raise ArtifactFormatError(f"{where}: unknown codec {codec!r} (known: {', '.join(CODECS)})")
    except (zlib.error, OSError, lzma.LZMAError, EOFError) as e:
        raise ArtifactIntegrityError(f"{where}: {codec} stream does not decode: {e}") from None
    if not ok or len(out) != size:
        raise ArtifactIntegrityError(f"{where}: {codec} stream decodes to a different size than "
                                     f"the {size} bytes the header declares")
    return out


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


def encode_tensor(key: str, t: torch.Tensor, entropy: bool = False
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header entry and payload streams for one tensor, in the encoding that stores it smallest.

    A dense stream without a codec is a view of ``t`` itself (no copy).
    """
    t = t.detach().to("cpu")
    a = _as_ints(t)
    digest = _sha64(a)
    mask = a != 0
    plan = _plan(a, mask, t.element_size())
    positions = None
    if t.dtype == torch.uint8:
        bplan, positions = _plan_bitidx(a, plan.size)
        if positions is not None and bplan.encoding == "bitidx":
            plan = bplan
    raw: dict[str, tuple[torch.Tensor, bool]] = {}  # stream -> (tensor, may be entropy-coded)
    vdtype = t.dtype if t.dtype != torch.bool else torch.uint8
    one_byte = t.element_size() == 1  # 8-bit values (int8 weights, codes) are entropy-coded too
    if plan.encoding == "bitidx":
        raw["index"] = (_encode_bitidx(positions, a.size * 8, plan.bits, plan.entries), True)
    elif plan.encoding == "dense":
        raw["data"] = (t.reshape(-1), t.element_size() == 1)
    elif plan.encoding == "bitmap":
        # numpy's little-endian packbits is graph.packing's 1-bit layout
        raw["bitmap"] = (torch.from_numpy(np.packbits(mask, bitorder="little")), True)
        raw["values"] = (_from_ints(a[mask], vdtype), one_byte)
    else:
        index, values, total = _encode_relidx(a, mask, plan.bits)
        raw["index"] = (index, True)
        raw["values"] = (_from_ints(values, vdtype), one_byte)
    entry: dict[str, Any] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                             "encoding": plan.encoding, "sha256": digest, "streams": {}}
    if plan.encoding in ("relidx", "bitidx"):
        entry["bits"], entry["entries"] = plan.bits, plan.entries
    if plan.encoding == "bitmap":
        entry["nnz"] = int(raw["values"][0].numel())
    streams: dict[str, torch.Tensor] = {}
    for sname, (st, codable) in raw.items():
        skey = f"{key}::{sname}"
        st = st.contiguous()
        data = _as_ints(st)
        info: dict[str, Any] = {"key": skey, "dtype": dtype_name(st.dtype), "raw_bytes": data.nbytes}
        if entropy and codable and data.nbytes >= 64:
            packed = min(((c, _compress(data.tobytes(), c)) for c in CODECS),
                         key=lambda cz: len(cz[1]))
            if len(packed[1]) < data.nbytes:
                info["codec"] = packed[0]
                data = np.frombuffer(packed[1], dtype=np.uint8)
                st = torch.from_numpy(data.copy())
        info["bytes"] = data.nbytes
        # a dense stream without a codec holds the tensor's own bytes: same digest
        info["sha256"] = digest if sname == "data" and "codec" not in info else _sha64(data)
        entry["streams"][sname] = info
        streams[skey] = st
    entry["stored_bytes"] = sum(s["bytes"] for s in entry["streams"].values())
    return entry, streams


def _expected_stream_bytes(entry: dict, item: int, numel: int, where: str) -> dict[str, int]:
    enc = entry.get("encoding")
    if enc == "dense":
        return {"data": numel * item}
    if enc == "bitmap":
        nnz = entry.get("nnz")
        if not isinstance(nnz, int) or not 0 <= nnz <= numel:
            raise ArtifactFormatError(f"{where}: bad non-zero count {nnz!r}")
        return {"bitmap": _packed_size(numel, 1), "values": nnz * item}
    if enc == "relidx":
        bits, entries = entry.get("bits"), entry.get("entries")
        if not isinstance(bits, int) or not 1 <= bits <= 8 or not isinstance(entries, int) \
                or entries < 0:
            raise ArtifactFormatError(f"{where}: bad relative-index parameters")
        # fillers cover every gap, the tail included, so a claimed size has to be paid for
        if numel > (entries + 1) << bits:
            raise ArtifactFormatError(f"{where}: claims {numel} elements but its {entries} "
                                      f"relative indices of {bits} bits cannot reach that far")
        return {"index": _packed_size(entries, bits), "values": entries * item}
    if enc == "bitidx":
        bits, entries = entry.get("bits"), entry.get("entries")
        if entry.get("dtype") != "uint8" or not isinstance(bits, int) or not 1 <= bits <= 8 \
                or not isinstance(entries, int) or entries < 0:
            raise ArtifactFormatError(f"{where}: bad bit-index parameters")
        # every entry steps at most 2**bits - 1 positions, fillers cover the tail
        if numel * 8 > entries * ((1 << bits) - 1):
            raise ArtifactFormatError(f"{where}: claims {numel} bytes but its {entries} bit "
                                      f"indices of {bits} bits cannot reach that far")
        return {"index": _packed_size(entries, bits)}
    raise ArtifactFormatError(f"{where}: unknown encoding {enc!r}")


def _check_tensor_entry(key: str, entry: Any) -> tuple[torch.dtype, list[int], int]:
    where = f"tensor {key!r}"
    if not isinstance(entry, dict):
        raise ArtifactFormatError(f"{where}: malformed entry")
    dtype = _dtype(entry.get("dtype"), where)
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > 16 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < (1 << 48) for s in shape):
        raise ArtifactFormatError(f"{where}: bad shape {_short_repr(shape)}")
    numel = math.prod(shape)
    item = torch.empty((), dtype=dtype).element_size()
    expected = _expected_stream_bytes(entry, item, numel, where)
    streams = entry.get("streams")
    if not isinstance(streams, dict) or set(streams) != set(expected):
        raise ArtifactFormatError(f"{where}: expected streams {sorted(expected)}")
    for sname, info in streams.items():
        if not isinstance(info, dict) or info.get("raw_bytes") != expected[sname]:
            raise ArtifactFormatError(
                f"{where}: stream {sname!r} should hold {expected[sname]} bytes, header says "
                f"{info.get('raw_bytes') if isinstance(info, dict) else info!r}")
    return dtype, shape, numel * item


def decode_tensor(key: str, entry: dict, payload: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild one tensor bit for bit, checking every stream's and the result's sha256."""
    where = f"tensor {key!r}"
    dtype, shape, _ = _check_tensor_entry(key, entry)
    raw: dict[str, np.ndarray] = {}
    for sname, info in entry["streams"].items():
        st = payload.get(info.get("key"))
        if st is None:
            raise ArtifactFormatError(f"{where}: stream {info.get('key')!r} missing from the payload")
        data = _as_ints(st)
        if _sha64(data) != info.get("sha256"):
            raise ArtifactIntegrityError(f"{where}: stream {sname!r} fails its sha256 check; the "
                                         "file is corrupted or was edited. Save it again.")
        sdtype = _dtype(info.get("dtype"), where)
        if info.get("codec") is not None:
            data = np.frombuffer(_decompress(data.tobytes(), info["codec"], info["raw_bytes"],
                                             f"{where} {sname}"), dtype=np.uint8)
            data = _as_ints(torch.from_numpy(data.copy()).view(sdtype if sdtype != torch.bool
                                                               else torch.uint8))
        if data.nbytes != info["raw_bytes"]:
            raise ArtifactFormatError(f"{where}: stream {sname!r} has {data.nbytes} bytes, "
                                      f"expected {info['raw_bytes']}")
        raw[sname] = data
    numel = math.prod(shape)
    enc = entry["encoding"]
    if enc == "dense":
        flat = raw["data"]
    elif enc == "bitidx":
        flat = _decode_bitidx(raw["index"].view(np.uint8), entry["bits"], entry["entries"], numel,
                              where)
    elif enc == "bitmap":
        mask = np.unpackbits(raw["bitmap"].view(np.uint8), count=numel, bitorder="little").view(bool)
        if int(np.count_nonzero(mask)) != raw["values"].size:
            raise ArtifactIntegrityError(f"{where}: bitmap and values disagree")
        flat = np.zeros(numel, dtype=raw["values"].dtype)
        flat[mask] = raw["values"]
    else:
        flat = _decode_relidx(torch.from_numpy(raw["index"].view(np.uint8).copy()), raw["values"],
                              entry["bits"], entry["entries"], numel, where)
    if _sha64(flat) != entry.get("sha256"):
        raise ArtifactIntegrityError(f"{where}: decoded tensor fails its sha256 check")
    return _from_ints(flat, dtype).reshape(shape)


# -- save ---------------------------------------------------------------------------------------

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
        self.storage_keys: dict[tuple, str] = {}
        self.modules: list[dict] = []
        self.dropped: list[str] = []
        self.skip_modules: set[str] = set()

    def tensor_ref(self, qualname: str, t: torch.Tensor) -> str:
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype) if t.numel() else None
        if ident is not None and ident in self.storage_keys:
            return self.storage_keys[ident]  # tied weights are stored once
        # streams are named by number: safetensors keeps its own JSON index of them, and
        # long qualified names there are a fixed cost that dominates small artifacts
        key, entropy = str(len(self.tensors)), self.entropy
        entry, streams = encode_tensor(key, t, entropy)
        self.tensors[qualname] = entry
        for info in entry["streams"].values():
            skey = info["key"]
            st = streams[skey]
            n = st.numel() * st.element_size()
            if n < BLOB_STREAM_BYTES:
                info["blob"] = True
                self.blob.append((skey, n))
            else:
                self.streams[skey] = (st.dtype, list(st.shape), n)
            # a stream that is a view of the model's tensor costs nothing to keep
            shared = st.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            self.store.put(skey, _as_ints(st), shared, lambda: encode_tensor(key, t, entropy)[1])
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
            bad = [k for k in config if not isinstance(k, str) or k.startswith("__")]
            if bad:
                raise UnsupportedGraphError(f"{where}: config() keys must be plain names, got {bad}")
            entry["config"] = {k: encode(v) for k, v in config.items()}
            params = {n for n, _ in m.named_parameters()}
            for name, t in m.state_dict(keep_vars=True).items():
                if t is None:
                    continue
                entry["tensors"][name] = {"ref": self.tensor_ref(_join(path, name), t),
                                          "kind": "parameter" if name in params else "buffer",
                                          "requires_grad": bool(t.requires_grad)}
            return entry
        if isinstance(m, torch.fx.GraphModule) and path:
            raise UnsupportedGraphError(f"{where}: nested GraphModules are not supported; "
                                        "inline it into the parent graph first")
        if path:
            cls = type(m)
            name = class_name(cls) if cls.__module__.startswith("torch.nn") else None
            torch_name = f"torch.nn.{cls.__name__}"
            if cls is torch.nn.Module:
                entry["kind"], entry["class"] = "container", "torch.nn.Module"
            elif name is not None and self.allow.modules.get(torch_name) is cls:
                entry["kind"], entry["class"] = "torch.nn", torch_name
            else:
                raise UnsupportedGraphError(
                    f"{where}: only torch.nn modules and RuntimeModule subclasses can be stored; "
                    "capture the model so this module's code becomes graph nodes (its default "
                    "for fx), or make it a RuntimeModule with config()/from_state()")
        config = {}
        encode = _Encoder(self.allow, where)
        for k, v in vars(m).items():
            if k in _BASE_MODULE_KEYS or (not path and not isinstance(v, torch.Tensor)):
                continue
            if isinstance(v, torch.Tensor):
                entry["tensors"][k] = {"ref": self.tensor_ref(_join(path, k), v), "kind": "attr",
                                       "requires_grad": bool(v.requires_grad)}
                continue
            if k.startswith("__"):
                raise UnsupportedGraphError(f"{where}: attribute {k!r} is a dunder name")
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
            if entry.get("kind") == "runtime":
                return  # a runtime module's state_dict already holds everything below it
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
                                     "args": encode(tuple(node.args)),
                                     "kwargs": encode(dict(node.kwargs))}
            shape, dtype = node_shape(node)
            if shape is not None:
                entry["shape"] = [s if isinstance(s, int) else None for s in shape]
                entry["dtype"] = dtype_name(dtype)
            if "fxpress_pass" in node.meta:
                entry["pass"] = str(node.meta["fxpress_pass"])
            out.append(entry)
        return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _codegen(gm: torch.fx.GraphModule) -> dict | None:
    cg = gm.graph._codegen
    if type(cg) is torch.fx.graph.CodeGen:
        return None
    if isinstance(cg, torch.fx.graph._PyTreeCodeGen):
        from torch.utils import _pytree as pytree

        info = cg.pytree_info
        return {"kind": "pytree", "orig_args": list(info.orig_args),
                "in_spec": pytree.treespec_dumps(info.in_spec) if info.in_spec is not None else None,
                "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None}
    raise UnsupportedGraphError(f"graph code generator {type(cg).__name__} is not supported")


def _json_safe(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=lambda o: None, allow_nan=False))
    except ValueError:
        return json.loads(json.dumps(obj, default=lambda o: None).replace("NaN", "null")
                          .replace("-Infinity", "null").replace("Infinity", "null"))


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

    def _put(self, key, data, rebuild) -> None:
        self.rebuild[key], self.sizes[key] = rebuild, data.nbytes

    def _chunks(self, key):
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
        "meta": _json_safe(gm.meta.get("fxpress", {})),
        "dropped": w.dropped,
        "entropy": bool(entropy),
        "payload": {"length": lay.payload_bytes, "sha256": digest.hexdigest()},
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


def _pack_header(header: dict) -> bytes:
    """Prefix + header. The header is zlib-compressed from a preset dictionary of typical
    header text (flags 1 and 2; see graph/header_dict.py): its JSON is repetitive, and on
    small models it would otherwise outweigh the tensors."""
    z = zlib.compressobj(9, zdict=HEADER_ZDICT)
    head = z.compress(json.dumps(header, separators=(",", ":"), allow_nan=False).encode()) + z.flush()
    flags = _FLAG_ZLIB_HEADER | _FLAG_ZDICT_HEADER | (_FLAG_BLOB_STREAMS if "blob" in header else 0)
    prefix = _PREFIX.pack(MAGIC, VERSION, flags, len(head), hashlib.sha256(head).digest())
    return prefix + head


def pack_artifact(header: dict, payload: bytes) -> bytes:
    """Prefix + header + payload (the header's "payload" entry must describe ``payload``)."""
    return _pack_header(header) + payload


def artifact_header(gm: torch.fx.GraphModule, entropy: bool = False) -> dict:
    """The header ``save(gm)`` would write, with ``file_bytes``: the file's exact size.

    Nothing is written and the payload is never held: each stream is encoded, counted and
    dropped, then encoded again when the payload digest reaches it; dense tensors are read
    in place.
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
    path, parent = _target(Path(path))
    spool = _Spool(parent)
    try:
        lay = _layout(gm, entropy, report, spool)
        write_atomic(path, lay.chunks())
    finally:
        spool.close()
    return lay.size


def _target(path: Path) -> tuple[Path, Path]:
    """``path`` and its folder, refused when ``path`` is a folder or its folder is missing."""
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; give a file name such as {path / 'model.fxp'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ArtifactError(f"cannot write {path}: directory {parent} does not exist")
    return path, parent


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (bytes, or byte strings in order) to ``path`` via a temp file in the
    same directory + fsync + os.replace."""
    path, parent = _target(Path(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
            for piece in pieces:
                view = memoryview(piece)
                for i in range(0, len(view), _CHUNK):
                    f.write(view[i:i + _CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# -- load ---------------------------------------------------------------------------------------

def _split_prefix(data: bytes | memoryview, where: str, file_size: int | None = None
                  ) -> tuple[dict, memoryview, bytes]:
    view = memoryview(data)
    file_size = len(view) if file_size is None else file_size
    if len(view) < PREFIX_SIZE:
        raise ArtifactFormatError(f"{where}: {len(view)} bytes is too short for an fxpress "
                                  "artifact (truncated?)")
    magic, version, flags, hlen, hsha = _PREFIX.unpack(view[:PREFIX_SIZE])
    if magic != MAGIC:
        raise ArtifactFormatError(f"{where}: not an fxpress artifact (bad magic bytes)")
    if version != VERSION:
        raise ArtifactFormatError(f"{where}: format version {version}; this fxpress reads version "
                                  f"{VERSION}. Upgrade fxpress or save the model again.")
    if hlen > MAX_HEADER_BYTES or PREFIX_SIZE + hlen > len(view):
        raise ArtifactFormatError(f"{where}: header claims {hlen} bytes but the file holds "
                                  f"{file_size - PREFIX_SIZE} after its prefix (limit "
                                  f"{MAX_HEADER_BYTES}): truncated or tampered")
    head = bytes(view[PREFIX_SIZE:PREFIX_SIZE + hlen])
    if hashlib.sha256(head).digest() != hsha:
        raise ArtifactIntegrityError(f"{where}: header fails its sha256 check; the file is "
                                     "corrupted or was edited")
    if flags & ~_KNOWN_FLAGS or flags & _FLAG_ZDICT_HEADER and not flags & _FLAG_ZLIB_HEADER:
        raise ArtifactFormatError(f"{where}: unknown flags {flags:#x}; a newer fxpress wrote it")
    if flags & _FLAG_ZLIB_HEADER:
        d = zlib.decompressobj(zdict=HEADER_ZDICT) if flags & _FLAG_ZDICT_HEADER else zlib.decompressobj()
        try:
            head = d.decompress(head, MAX_HEADER_BYTES)
        except zlib.error as e:
            raise ArtifactFormatError(f"{where}: header does not decompress: {e}") from None
        if not d.eof:
            raise ArtifactFormatError(f"{where}: header decompresses past {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(head)
    except ValueError as e:
        raise ArtifactFormatError(f"{where}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or header.get("format") != "fxpress" \
            or header.get("version") != VERSION:
        raise ArtifactFormatError(f"{where}: header does not describe an fxpress v{VERSION} artifact")
    if bool(flags & _FLAG_BLOB_STREAMS) != ("blob" in header):
        raise ArtifactFormatError(f"{where}: the prefix and the header disagree on the blob")
    return header, view[PREFIX_SIZE + hlen:], head


def read_header(path: str | os.PathLike) -> dict:
    """The verified header of an artifact (graph, modules, tensor table), without its tensors.

    >>> read_header("mlp.fxp")["tensors"]["layers.0.weight"]["encoding"]   # doctest: +SKIP
    'relidx'
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(PREFIX_SIZE)
            if len(data) == PREFIX_SIZE:
                hlen = _PREFIX.unpack(data)[3]
                if hlen <= MAX_HEADER_BYTES and PREFIX_SIZE + hlen <= size:
                    data += f.read(hlen)
    except OSError as e:
        raise ArtifactError(f"cannot read artifact {p}: {e.strerror or e}") from None
    header, _, _ = _split_prefix(data, str(p), file_size=size)
    header["file_bytes"] = size
    return header


_IDENT_PART = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)$")


def _check_qualname(name: Any, where: str, allow_empty: bool = False) -> str:
    if not isinstance(name, str) or (not name and not allow_empty):
        raise ArtifactFormatError(f"{where}: expected a dotted attribute name, got {_short_repr(name)}")
    if not name:
        return name
    for part in name.split("."):
        if not _IDENT_PART.match(part) or keyword.iskeyword(part):
            raise ForbiddenTargetError(f"{where}: {name!r} is not a plain attribute path")
        if part.startswith("__"):
            raise ForbiddenTargetError(f"{where}: dunder name {part!r} in {name!r} is refused")
    return name


def _check_ident(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ForbiddenTargetError(f"{where}: {_short_repr(name)} is not a plain identifier")
    if name.startswith("__"):
        raise ForbiddenTargetError(f"{where}: dunder name {name!r} is refused")
    return name


def _check_config_key(cls: type, key: Any, where: str) -> str:
    _check_ident(key, where)
    attr = getattr(cls, key, None)
    if callable(attr) or isinstance(attr, property):
        raise ForbiddenTargetError(f"{where}: attribute {key!r} would replace a method of "
                                   f"{cls.__name__}")
    return key


@dataclass
class _Checked:
    """Everything validated from the header, before any tensor is decoded or module built."""

    modules: list[dict] = field(default_factory=list)
    classes: dict[str, type] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)


def _validate(header: dict, allow: Allowlist, where: str) -> _Checked:
    plan = _Checked()
    tensors = header.get("tensors")
    modules = header.get("modules")
    graph = header.get("graph")
    if not isinstance(tensors, dict) or not isinstance(modules, list) or not isinstance(graph, dict):
        raise ArtifactFormatError(f"{where}: header lacks graph/modules/tensors")
    paths: set[str] = set()
    attrs: set[str] = set()
    for m in modules:
        if not isinstance(m, dict):
            raise ArtifactFormatError(f"{where}: malformed module entry")
        path = _check_qualname(m.get("path"), f"{where}: module path", allow_empty=True)
        if path in paths or (path and path.rpartition(".")[0] not in paths):
            raise ArtifactFormatError(f"{where}: module {path!r} is duplicated or comes before "
                                      "its parent")
        paths.add(path)
        if "alias" in m:
            if m["alias"] not in paths:
                raise ArtifactFormatError(f"{where}: module {path!r} aliases unknown {m['alias']!r}")
            continue
        mw = f"{where}: module {path!r}"
        kind, cname = m.get("kind"), m.get("class")
        if path:
            if kind == "runtime":
                cls = allow.runtime.get(cname)
                if cls is None:
                    raise ForbiddenTargetError(
                        f"{mw}: runtime module class {cname!r} is not registered by any installed "
                        "pass plugin; install the plugin that wrote it")
            elif kind in ("torch.nn", "container"):
                cls = allow.modules.get(cname)
                if cls is None or (kind == "container") != (cls is torch.nn.Module):
                    raise ForbiddenTargetError(f"{mw}: module class {cname!r} is not a torch.nn "
                                               "module class")
            else:
                raise ArtifactFormatError(f"{mw}: unknown module kind {kind!r}")
            plan.classes[path] = cls
            config = m.get("config", {})
            if not isinstance(config, dict):
                raise ArtifactFormatError(f"{mw}: config must be an object")
            decode = _Decoder(allow, None, mw)
            plan.configs[path] = {_check_config_key(cls, k, f"{mw} config"): decode(v)
                                  for k, v in config.items()}
        ts = m.get("tensors", {})
        if not isinstance(ts, dict):
            raise ArtifactFormatError(f"{mw}: tensors must be an object")
        for tname, ref in ts.items():
            if kind == "runtime":
                _check_qualname(tname, f"{mw} tensor")
            else:
                _check_ident(tname, f"{mw} tensor")
            if not isinstance(ref, dict) or ref.get("kind") not in ("parameter", "buffer", "attr"):
                raise ArtifactFormatError(f"{mw}: tensor {tname!r} malformed")
            if ref.get("ref") is not None and ref["ref"] not in tensors:
                raise ArtifactFormatError(f"{mw}: tensor {tname!r} refers to missing {ref['ref']!r}")
            attrs.add(_join(path, tname))
        plan.modules.append(m)
    # tensors: shapes and streams add up
    for key, entry in tensors.items():
        with _located(where):
            _check_tensor_entry(key, entry)
    # the graph
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        raise ArtifactFormatError(f"{where}: graph has no node list")
    names: set[str] = set()
    for n in nodes:
        if not isinstance(n, dict):
            raise ArtifactFormatError(f"{where}: malformed node")
        name = n.get("name")
        nw = f"{where}: node {name!r} ({n.get('op')} {_short_repr(n.get('target'), 60)})"
        _check_ident(name, nw)
        if name in names:
            raise ArtifactFormatError(f"{nw}: duplicate node name")
        op, target = n.get("op"), n.get("target")
        if op not in _OPS:
            raise ArtifactFormatError(f"{nw}: unknown op {op!r}")
        if op == "placeholder":
            _check_ident(target, nw)
        elif op == "get_attr":
            _check_qualname(target, nw)
            if target not in attrs and target not in paths:
                raise ArtifactFormatError(f"{nw}: no tensor or module named {target!r} in the file")
        elif op == "call_module":
            _check_qualname(target, nw)
            if target not in plan.classes and not any(
                    m.get("path") == target for m in modules if isinstance(m, dict)):
                raise ArtifactFormatError(f"{nw}: no module named {target!r} in the file")
        elif op == "call_method":
            if not allow.method_allowed(target):
                raise ForbiddenTargetError(f"{nw}: Tensor method {target!r} is not allowlisted; "
                                           "the file was not loaded")
        elif op == "call_function":
            try:
                fn = allow.function(target)
            except KeyError:
                raise ForbiddenTargetError(
                    f"{nw}: function {target!r} is not in the allowlist (torch, "
                    "torch.nn.functional, torch.ops.aten, operator, math, a few builtins); "
                    "the file was not loaded") from None
            if fn is getattr:
                args = n.get("args")
                attr = args["v"][1] if isinstance(args, dict) and isinstance(args.get("v"), list) \
                    and len(args["v"]) == 2 else None
                if not isinstance(attr, str) or attr.startswith("_") or not attr.isidentifier():
                    raise ForbiddenTargetError(f"{nw}: getattr is allowed only with a constant "
                                               f"public attribute name, got {_short_repr(attr)}")
        elif op == "output" and target != "output":
            raise ArtifactFormatError(f"{nw}: output node target must be 'output'")
        names.add(name)
    cg = graph.get("codegen")
    if cg is not None:
        if not isinstance(cg, dict) or cg.get("kind") != "pytree":
            raise ArtifactFormatError(f"{where}: unknown code generator {_short_repr(cg)}")
        for a in cg.get("orig_args", []):
            _check_ident(a, f"{where}: graph argument")
    if not isinstance(graph.get("class_name", "GraphModule"), str) or \
            not graph.get("class_name", "GraphModule").isidentifier():
        raise ArtifactFormatError(f"{where}: bad class name")
    return plan


@contextlib.contextmanager
def _located(where: str):
    """Prefix the file's name to errors raised by per-tensor helpers."""
    try:
        yield
    except ArtifactError as e:
        raise type(e)(f"{where}: {e}") from None


def _decoded_limit(header: dict, file_size: int, max_bytes: int | None, where: str) -> None:
    total = 0
    for key, entry in header["tensors"].items():
        total += _check_tensor_entry(key, entry)[2]
    limit = max_bytes if max_bytes is not None else max(MIN_DECODED_LIMIT, EXPANSION_LIMIT * file_size)
    if total > limit:
        raise ArtifactFormatError(f"{where}: tensors would decode to {total} bytes, over the "
                                  f"limit of {limit} for a {file_size}-byte file; pass "
                                  "max_bytes= to load() if you trust it")


# what to do about a refused file, appended to messages that do not say it already
_FIX = {
    ArtifactIntegrityError: "the file is corrupted or was edited; save it again with fxpress.save",
    ForbiddenTargetError: "the file was not loaded and nothing in it ran; load only artifacts "
                          "written by fxpress.save (a plugin's runtime module needs that plugin "
                          "installed)",
    ArtifactFormatError: "the file is damaged, cut short or not an fxpress artifact; copy it "
                         "again or save it again with fxpress.save",
}


def _with_fix(e: ArtifactError) -> ArtifactError:
    msg = str(e)
    fix = next((f for t, f in _FIX.items() if isinstance(e, t)), None)
    if fix is None or any(s in msg for s in ("again", "not loaded", "max_bytes=", "newer fxpress")):
        return e
    return type(e)(f"{msg.rstrip('.')}; {fix}")


def loads(data: bytes | memoryview, runtime_modules: Iterable[type] = (), *,
          max_bytes: int | None = None, where: str = "artifact") -> torch.fx.GraphModule:
    """Rebuild a GraphModule from artifact bytes (see :func:`load`)."""
    try:
        return _loads(data, runtime_modules, max_bytes=max_bytes, where=where)
    except ArtifactError as e:
        fixed = _with_fix(e)
        if fixed is e:
            raise
        raise fixed from None


def _loads(data: bytes | memoryview, runtime_modules: Iterable[type], *,
           max_bytes: int | None, where: str) -> torch.fx.GraphModule:
    import safetensors.torch

    header, payload_view, _ = _split_prefix(data, where)
    allow = Allowlist(runtime_modules)
    plan = _validate(header, allow, where)
    pinfo = header.get("payload", {})
    if not isinstance(pinfo, dict) or pinfo.get("length") != len(payload_view):
        raise ArtifactFormatError(f"{where}: payload is {len(payload_view)} bytes, header declares "
                                  f"{pinfo.get('length') if isinstance(pinfo, dict) else '?'}: "
                                  "truncated or tampered")
    _decoded_limit(header, len(data), max_bytes, where)
    if _sha(payload_view) != pinfo.get("sha256"):
        # name the damaged tensor(s) where the payload still parses
        bad = _damaged_streams(header, payload_view)
        raise ArtifactIntegrityError(
            f"{where}: payload fails its sha256 check" + (f" (damaged: {', '.join(bad[:5])})" if bad
                                                          else "") +
            "; the file is corrupted or was edited. Save it again.")
    try:
        streams = safetensors.torch.load(bytes(payload_view)) if len(payload_view) else {}
    except Exception as e:
        raise ArtifactFormatError(f"{where}: payload is not valid safetensors: {e}") from None
    streams = _unblob(header, streams, where)
    with _located(where):
        decoded = {key: decode_tensor(key, entry, streams) for key, entry in header["tensors"].items()}
    root = _build_modules(plan, decoded, header["tensors"])
    gm = _build_graph(header, root, allow, where)
    return gm


def _blob_streams(header: dict) -> Iterable[tuple[str, str, dict, int, int]]:
    """(tensor, stream name, info, start, end) of each stream stored in the blob, in order."""
    at = 0
    for key, entry in header["tensors"].items():
        for sname, info in entry.get("streams", {}).items():
            if isinstance(info, dict) and info.get("blob"):
                n = info.get("bytes")
                if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < BLOB_STREAM_BYTES:
                    raise ArtifactFormatError(f"tensor {key!r}: blob stream {sname!r} has a bad "
                                              f"size {_short_repr(n)}")
                yield key, sname, info, at, at + n
                at += n


def _unblob(header: dict, streams: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Split the blob tensor back into the small streams it holds, each as a tensor of its
    stored dtype, after checking that the header's stream sizes tile it exactly."""
    blob_info = header.get("blob")
    blob = streams.pop(BLOB_KEY, None)
    if blob_info is None:
        if blob is not None:
            raise ArtifactFormatError(f"{where}: payload holds a blob the header does not declare")
        return streams
    if blob is None or blob.dtype != torch.uint8 or blob.dim() != 1 or not isinstance(
            blob_info, dict) or blob_info.get("bytes") != blob.numel():
        raise ArtifactFormatError(f"{where}: the header's blob and the payload's disagree")
    end = 0
    with _located(where):
        for key, sname, info, a, end in _blob_streams(header):
            skey = info.get("key")
            if not isinstance(skey, str) or skey in streams or end > blob.numel():
                raise ArtifactFormatError(f"tensor {key!r}: blob stream {sname!r} is misplaced")
            dtype = torch.uint8 if info.get("codec") is not None else _dtype(info.get("dtype"), key)
            piece = blob[a:end].clone()
            if piece.numel() % piece.new_empty((), dtype=dtype).element_size():
                raise ArtifactFormatError(f"tensor {key!r}: blob stream {sname!r} is not whole "
                                          f"{dtype_name(dtype)} elements")
            streams[skey] = piece.view(dtype)
    if end != blob.numel():
        raise ArtifactFormatError(f"{where}: the blob holds {blob.numel()} bytes, its streams "
                                  f"{end}")
    return streams


def _damaged_streams(header: dict, payload: memoryview) -> list[str]:
    try:
        n = struct.unpack("<Q", payload[:8])[0]
        st_header = json.loads(bytes(payload[8:8 + n]))
        base = 8 + n
        bad = []
        blob = st_header.get(BLOB_KEY, {}).get("data_offsets", [0, 0])[0]
        for key, sname, info, a, b in _blob_streams(header) if "blob" in header else ():
            if _sha64(payload[base + blob + a: base + blob + b]) != info.get("sha256"):
                bad.append(f"tensor {key!r} stream {sname!r}")
    except Exception:
        return []
    for key, entry in header["tensors"].items():
        for sname, info in entry.get("streams", {}).items():
            rec = st_header.get(info.get("key"))
            if not isinstance(rec, dict) or info.get("blob"):
                continue
            a, b = rec.get("data_offsets", [0, 0])
            if _sha64(payload[base + a: base + b]) != info.get("sha256"):
                bad.append(f"tensor {key!r} stream {sname!r}")
    return bad


def _build_modules(plan: _Checked, decoded: dict[str, torch.Tensor],
                   entries: dict[str, dict]) -> torch.nn.Module:
    built: dict[str, torch.nn.Module] = {}
    root = torch.nn.Module()
    for m in plan.modules:
        path = m["path"]
        refs = m.get("tensors", {})
        if not path:
            mod = root
        elif m.get("kind") == "runtime":
            cls = plan.classes[path]
            tensors = {n: decoded[r["ref"]] for n, r in refs.items() if r.get("ref") is not None}
            params = [n for n, r in refs.items() if r.get("kind") == "parameter"]
            mod = cls.from_state(plan.configs[path], tensors, params)
            for n, r in refs.items():  # from_state decides trainability; restore what was saved
                p = mod.get_parameter(n) if n in params else None
                if p is not None and "requires_grad" in r and p.is_floating_point():
                    p.requires_grad_(bool(r["requires_grad"]))
        else:
            cls = plan.classes[path]
            mod = cls.__new__(cls)
            torch.nn.Module.__init__(mod)
            for k, v in plan.configs[path].items():
                object.__setattr__(mod, k, v)
        if m.get("kind") != "runtime":
            for n, r in refs.items():
                t = decoded[r["ref"]] if r.get("ref") is not None else None
                if r["kind"] == "parameter":
                    mod.register_parameter(n, None if t is None else torch.nn.Parameter(
                        t, requires_grad=bool(r.get("requires_grad", True)) and t.is_floating_point()))
                elif r["kind"] == "buffer":
                    mod.register_buffer(n, t, persistent=bool(r.get("persistent", True)))
                else:
                    object.__setattr__(mod, n, t)
        mod.training = bool(m.get("training", False))
        built[path] = mod
        if path:
            parent, _, name = path.rpartition(".")
            built[parent].add_module(name, mod)
    return root


def _build_graph(header: dict, root: torch.nn.Module, allow: Allowlist, where: str
                 ) -> torch.fx.GraphModule:
    from torch.fx.passes.shape_prop import TensorMetadata

    ginfo = header["graph"]
    for m in header["modules"]:
        if "alias" in m:
            parent, _, name = m["path"].rpartition(".")
            root.get_submodule(parent).add_module(name, root.get_submodule(m["alias"]))
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for n in ginfo["nodes"]:
        nw = f"{where}: node {n['name']!r}"
        decode = _Decoder(allow, env, nw)
        args, kwargs = decode(n.get("args", {"$": "tuple", "v": []})), decode(n.get("kwargs", {"$": "dict", "v": []}))
        if not isinstance(args, tuple) or not isinstance(kwargs, dict) or \
                not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise ArtifactFormatError(f"{nw}: args must be a tuple and kwargs a dict of names")
        op, target = n["op"], n["target"]
        if op == "call_function":
            target = allow.function(target)
        node = graph.create_node(op, target, args, kwargs, name=n["name"])
        env[n["name"]] = node
        if n.get("shape") is not None and "dtype" in n:
            shape = n["shape"]
            if isinstance(shape, list) and all(isinstance(s, int) for s in shape):
                node.meta["tensor_meta"] = TensorMetadata(
                    torch.Size(shape), _dtype(n["dtype"], nw), False, (), None, False, {})
        if isinstance(n.get("pass"), str):
            node.meta["fxpress_pass"] = n["pass"]
    cg = ginfo.get("codegen")
    if cg is not None:
        from torch.utils import _pytree as pytree

        try:
            in_spec = pytree.treespec_loads(cg["in_spec"]) if cg.get("in_spec") else None
            out_spec = pytree.treespec_loads(cg["out_spec"]) if cg.get("out_spec") else None
        except Exception as e:
            raise ArtifactFormatError(f"{where}: bad pytree spec: {e}") from None
        graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(
            list(cg["orig_args"]), in_spec, out_spec))
    try:
        graph.lint()
        gm = torch.fx.GraphModule(root, graph, ginfo.get("class_name", "GraphModule"))
    except Exception as e:
        raise ArtifactFormatError(f"{where}: the stored graph does not rebuild: "
                                  f"{type(e).__name__}: {e}") from None
    gm.training = False
    meta = header.get("meta")
    gm.meta["fxpress"] = dict(meta) if isinstance(meta, dict) else {}
    if isinstance(header.get("report"), dict):
        gm.meta["fxpress_report"] = header["report"]
    return gm


def load(path: str | os.PathLike, runtime_modules: Iterable[type] = (), *,
         max_bytes: int | None = None) -> torch.fx.GraphModule:
    """Load an artifact written by :func:`save`; ``runtime_modules`` are the classes allowed
    besides torch.nn (``fxpress.load`` passes every registered pass's runtime modules).

    >>> gm = load("mlp.fxp")                            # doctest: +SKIP

    Raises :class:`~fxpress.errors.ArtifactError` (format, integrity, forbidden target)
    before building anything; nothing in the file is executed.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read artifact {p}: {e.strerror or e}") from None
    return loads(data, runtime_modules, max_bytes=max_bytes, where=str(p))


__all__ = ["save", "load", "dumps", "loads", "read_header", "artifact_size", "artifact_header",
           "write_atomic",
           "Allowlist", "pack_artifact", "encode_tensor", "decode_tensor", "plan_encoding", "MAGIC", "VERSION",
           "PREFIX_SIZE", "CODECS"]
