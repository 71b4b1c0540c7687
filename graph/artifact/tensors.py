"""Tensor codecs: each tensor in the smallest of dense / bitmap / relative-index / bit-index
storage, streams optionally entropy-coded."""
from __future__ import annotations

import bz2
import lzma
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from fxpress.errors import (ArtifactFormatError, ArtifactIntegrityError, ArtifactLimitError,
                            UnsupportedGraphError)
from fxpress.graph.artifact import arith
from fxpress.graph.artifact.format import _sha64
from fxpress.graph.artifact.values import _dtype, _short_repr, dtype_name

SPARSE_MIN_NUMEL = 16
GENERAL_CODECS = ("zlib", "bz2", "lzma")
#: every codec a stream may name: the general ones and the ``acW`` ones (:mod:`.arith`)
CODECS = GENERAL_CODECS + arith.CODECS
#: streams smaller than this are stored as they are (acW's least output is a byte or two)
MIN_CODED_BYTES = 16

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
    nnz = sum(int(np.count_nonzero(mask[i:i + _BLOCK])) for i in range(0, n, _BLOCK))
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


class _NonZero:
    """``a != 0`` of a large tensor's bits, computed a block at a time where it is read
    (``mask[i:j]`` and ``mask.size``, all the encoders use): the whole mask would be a byte
    per element, a quarter of a float tensor's bytes held through its encoding."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.size = a, a.size

    def __getitem__(self, sl: slice) -> np.ndarray:
        return self.a[sl] != 0


def _nonzero(a: np.ndarray) -> "np.ndarray | _NonZero":
    return a != 0 if a.size <= _BLOCK else _NonZero(a)


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
    """Relative indices of ``a``'s non-zeros (``mask``) at ``bits`` bits, and their values:
    each non-zero is preceded by its fillers (code span-1, a step of ``span``) and then its
    own step code; the tail contributes fillers only. Built a block of positions at a time
    into the preallocated codes and values, so the only arrays of the tensor's size are
    the output (positions are 8 bytes each: all at once they outweighed the tensor twice
    over, GPT-2's 38M-entry embedding held 2.4x its bytes while saved)."""
    from fxpress.graph.packing import pack_bits

    span = 1 << bits
    # every block's entries, then the tail's fillers: the arrays are sized once
    blocks, total, last = [], 0, -1
    for start in range(0, mask.size, _BLOCK):
        pos = np.flatnonzero(mask[start:start + _BLOCK])
        if pos.size:
            pos += start
            fillers = (np.diff(pos, prepend=last) - 1) >> bits
            blocks.append((start, total))
            total += int(fillers.sum()) + pos.size
            last = int(pos[-1])
    total += (mask.size - last - 1) >> bits  # the tail: fillers alone
    codes = np.full(total, span - 1, dtype=np.uint8)
    values = np.zeros(total, dtype=a.dtype)
    last = -1
    for start, offset in blocks:
        m = mask[start:start + _BLOCK]
        pos = np.flatnonzero(m) + start
        gaps = np.diff(pos, prepend=last)
        fillers = (gaps - 1) >> bits
        real = np.cumsum(fillers + 1) - 1 + offset
        codes[real] = gaps - 1 - fillers * span
        values[real] = a[start:start + _BLOCK][m]
        last = int(pos[-1])
    return pack_bits(torch.from_numpy(codes), bits), values, total


def _encode_bitmap(a: np.ndarray, mask: "np.ndarray | _NonZero", nnz: int) -> tuple[np.ndarray, np.ndarray]:
    """The bitmap (numpy's little-endian packbits: graph.packing's 1-bit layout) and the
    ``nnz`` non-zero values of ``a``, filled a block at a time (blocks of a multiple of 8
    elements, so each block's bits end on a byte)."""
    step = max(8, _BLOCK - _BLOCK % 8)
    bitmap = np.empty(_packed_size(a.size, 1), dtype=np.uint8)
    values = np.empty(nnz, dtype=a.dtype)
    at = 0
    for i in range(0, a.size, step):
        m = mask[i:i + step]
        bitmap[i // 8:i // 8 + _packed_size(m.size, 1)] = np.packbits(m, bitorder="little")
        v = a[i:i + step][m]
        values[at:at + v.size] = v
        at += v.size
    if at != nnz:  # the plan counted the same mask; never expected
        raise ArtifactIntegrityError(f"bitmap encoding found {at} non-zeros, the plan {nnz}")
    return bitmap, values


def _decode_relidx(index: torch.Tensor, values: np.ndarray, bits: int, entries: int,
                   n: int, where: str) -> np.ndarray:
    out = np.zeros(n, dtype=values.dtype)
    for at, pos, _ in _code_blocks(index, bits, entries, fillers=False):
        if int(pos[-1]) >= n:
            raise ArtifactIntegrityError(f"{where}: relative indices run past the tensor's end")
        out[pos] = values[at:at + pos.size]
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


def _code_blocks(index: np.ndarray | torch.Tensor, bits: int, entries: int, fillers: bool):
    """(first entry, positions, real) of the ``entries`` ``bits``-bit relative indices packed
    in ``index``, :data:`~fxpress.graph.packing.CHUNK` at a time: each code ``c`` steps
    ``c + 1`` positions (with ``fillers``, the code ``2**bits - 1`` steps that far less one
    and marks no position: bit indices), ``positions`` are int64 from position -1, ``real``
    the positions marked (None: every one). Decoding never holds more than a block of
    8-byte positions (all at once, a crafted index held 200x its tensor's bytes)."""
    from fxpress.graph.packing import CHUNK, unpack_bits

    p = torch.as_tensor(index).reshape(-1)
    span = CHUNK * bits // 8  # CHUNK is a multiple of 8: every block starts on a byte
    last = -1
    for j, at in enumerate(range(0, entries, CHUNK)):
        codes = unpack_bits(p[j * span:(j + 1) * span], bits, min(CHUNK, entries - at)).numpy()
        step = codes.astype(np.int32) + 1  # a block steps at most CHUNK * 256 < 2**31
        real = None
        if fillers:
            real = codes != (1 << bits) - 1
            step -= ~real
        pos = np.cumsum(step, dtype=np.int32).astype(np.int64) + last
        last = int(pos[-1])
        yield at, pos, real


def _decode_bitidx(index: np.ndarray, bits: int, entries: int, nbytes: int, where: str) -> np.ndarray:
    out = np.zeros(nbytes, dtype=np.uint8)
    for _, pos, real in _code_blocks(index, bits, entries, fillers=True):
        ones = pos[real]
        if not ones.size:
            continue
        if int(ones[-1]) >= nbytes * 8:
            raise ArtifactIntegrityError(f"{where}: bit indices run past the tensor's end")
        lo = int(ones[0]) >> 3
        if int(ones[-1]) - 8 * lo < 16 * ones.size:  # dense: the block's bits, packed
            bits_on = np.zeros(int(ones[-1]) - 8 * lo + 1, dtype=bool)
            bits_on[ones - 8 * lo] = True
            packed = np.packbits(bits_on, bitorder="little")
            out[lo:lo + packed.size] |= packed
        else:
            np.bitwise_or.at(out, ones >> 3, np.left_shift(np.uint8(1), (ones & 7).astype(np.uint8)))
    return out


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
    if arith.width(codec):
        if size > arith.MAX_RAW:
            raise ArtifactLimitError(f"{where}: an {codec} stream of {size} bytes; {codec} codes "
                                     f"streams of at most {arith.MAX_RAW} bytes")
        return arith.decode(bytes(data), arith.width(codec), size)
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


#: float32 tensors whose every value is exactly a float16 (or bfloat16) are stored at 2
#: bytes a value (``"narrow"`` in the entry) and widened back bit for bit at load
NARROW = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: ... checked on tensors of at most this many elements (codebooks, grids, scales)
NARROW_MAX_NUMEL = 1 << 16


def _narrow(t: torch.Tensor) -> tuple[str | None, torch.Tensor]:
    """(``"float16"``/``"bfloat16"``, the 2-byte tensor) when ``t`` is float32 and that
    type holds each of its values exactly (bit for bit: -0.0 kept, NaN payloads not
    assumed); else (None, ``t``)."""
    if t.dtype != torch.float32 or not 0 < t.numel() <= NARROW_MAX_NUMEL:
        return None, t
    bits = t.reshape(-1).view(torch.int32)
    for name, dtype in NARROW.items():
        small = t.to(dtype)
        if torch.equal(small.to(torch.float32).reshape(-1).view(torch.int32), bits):
            return name, small
    return None, t


def _code_stream(data: np.ndarray, arith_left: int, width: int = 0
                 ) -> tuple[str | None, bytes | None]:
    """The codec that stores ``data`` smallest and its output, or (None, None) when none
    beats the raw bytes. ``acW`` (:mod:`.arith`) is tried on streams of at most
    ``arith.MAX_RAW`` and ``arith_left`` bytes, at the width its closed-form estimate
    prefers (``width``: the stream's own code width, when it has one)."""
    raw = data.tobytes()
    best: tuple[str | None, bytes | None] = (None, None)
    size = len(raw)
    for c in GENERAL_CODECS if len(raw) >= 64 else ():  # their own headers cost tens of bytes
        z = _compress(raw, c)
        if len(z) < size:
            best, size = (c, z), len(z)
    if len(raw) <= min(arith.MAX_RAW, arith_left):
        w, est = arith.best_width(raw, (1, 2, 4, 8, width or 8))
        if est < size:
            z = arith.encode(raw, w)
            if len(z) < size:
                best = (f"ac{w}", z)
    return best


def encode_tensor(key: str, t: torch.Tensor, entropy: bool = False,
                  arith_left: int = arith.MAX_RAW) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header entry and payload streams for one tensor, in the encoding that stores it smallest.

    A dense stream without a codec is a view of ``t`` itself (no copy). With ``entropy``,
    a one-byte tensor small enough for the ``acW`` codecs is also coded dense (a bitmap or
    packed codes coded bit by bit often beat their relative indices coded), and the
    smaller of the two is kept. ``arith_left``: the decoded bytes the file's ``acW``
    streams may still take (the reader bounds their sum, ``Limits.arith_bytes``).
    """
    t = t.detach().to("cpu")
    narrow, t_stored = _narrow(t)
    if narrow is not None:
        entry, streams = encode_tensor(key, t_stored, entropy, arith_left)
        entry["dtype"], entry["narrow"] = "float32", narrow
        return entry, streams
    a = _as_ints(t)
    mask = _nonzero(a)
    plan = _plan(a, mask, t.element_size())
    positions = None
    if t.dtype == torch.uint8:
        bplan, positions = _plan_bitidx(a, plan.size)
        if positions is not None and bplan.encoding == "bitidx":
            plan = bplan
    out = _encode_plan(key, t, a, mask, plan, positions, entropy, arith_left)
    if entropy and plan.encoding != "dense" and t.element_size() == 1 \
            and a.nbytes <= min(arith.MAX_RAW, arith_left):
        dense = _encode_plan(key, t, a, mask, _Plan("dense", a.nbytes), None, entropy, arith_left)
        if dense[0]["stored_bytes"] < out[0]["stored_bytes"]:
            out = dense
    return out


@dataclass
class BlockStream:
    """One stream of a tensor's encoding, produced a block of the tensor at a time instead
    of held whole: ``chunks()`` yields its bytes (uint8 arrays) in order, each call
    encoding it again from the tensor. What :func:`encode_tensor_blocks` hands the writer
    for a large sparse tensor, so counting and hashing an artifact (and spooling it while
    saved) never holds a tensor's whole values or index stream."""

    dtype: torch.dtype
    shape: list[int]
    nbytes: int
    make: Callable[[], Iterator[np.ndarray]]
    where: str = ""

    def chunks(self) -> Iterator[np.ndarray]:
        n = 0
        for piece in self.make():
            piece = np.ascontiguousarray(piece).reshape(-1).view(np.uint8)
            n += piece.size
            if piece.size:
                yield piece
        if n != self.nbytes:  # the plan counted the same mask; never expected
            raise ArtifactIntegrityError(f"stream {self.where!r} encoded to {n} bytes block by "
                                         f"block, {self.nbytes} planned")


def _relidx_pieces(a: np.ndarray, mask: "np.ndarray | _NonZero", bits: int, what: str
                   ) -> Iterator[np.ndarray]:
    """The codes (``what="codes"``) or the values of :func:`_encode_relidx`'s arrays, one
    block of positions at a time (then the tail's fillers, a block at a time)."""
    span = 1 << bits
    last = -1
    for start in range(0, mask.size, _BLOCK):
        m = mask[start:start + _BLOCK]
        pos = np.flatnonzero(m)
        if not pos.size:
            continue
        pos += start
        gaps = np.diff(pos, prepend=last)
        fillers = (gaps - 1) >> bits
        real = np.cumsum(fillers + 1) - 1
        if what == "codes":
            out = np.full(int(real[-1]) + 1, span - 1, dtype=np.uint8)
            out[real] = gaps - 1 - fillers * span
        else:
            out = np.zeros(int(real[-1]) + 1, dtype=a.dtype)
            out[real] = a[start:start + _BLOCK][m]
        yield out
        last = int(pos[-1])
    tail = (mask.size - last - 1) >> bits  # fillers alone
    for i in range(0, tail, _BLOCK):
        n = min(_BLOCK, tail - i)
        yield (np.full(n, span - 1, dtype=np.uint8) if what == "codes"
               else np.zeros(n, dtype=a.dtype))


def _packed_pieces(codes: Iterator[np.ndarray], bits: int) -> Iterator[np.ndarray]:
    """:func:`~fxpress.graph.packing.pack_bits` of the concatenated ``codes``, packed as they
    come: a multiple of 8 codes always fills whole bytes, so the rest waits for the next
    piece and the packed bytes are the same as packing all the codes at once."""
    from fxpress.graph.packing import pack_bits

    carry = np.zeros(0, dtype=np.uint8)
    for c in codes:
        if carry.size:
            c = np.concatenate([carry, c])
        cut = c.size - c.size % 8
        carry = c[cut:]
        if cut:
            yield pack_bits(torch.from_numpy(c[:cut]), bits).numpy()
    if carry.size:
        yield pack_bits(torch.from_numpy(np.ascontiguousarray(carry)), bits).numpy()


def _bitmap_pieces(a: np.ndarray, mask: "np.ndarray | _NonZero", what: str) -> Iterator[np.ndarray]:
    """The bitmap (``what="bitmap"``) or the values of :func:`_encode_bitmap`, a block at
    a time (blocks of a multiple of 8 elements: each block's bits end on a byte)."""
    step = max(8, _BLOCK - _BLOCK % 8)
    for i in range(0, a.size, step):
        m = mask[i:i + step]
        yield np.packbits(m, bitorder="little") if what == "bitmap" else a[i:i + step][m]


def encode_tensor_blocks(key: str, t: torch.Tensor, entropy: bool = False,
                         arith_left: int = arith.MAX_RAW
                         ) -> tuple[dict[str, Any], dict[str, "torch.Tensor | BlockStream"]]:
    """:func:`encode_tensor`, with the streams of a large tensor stored as a bitmap or
    relative indices given as :class:`BlockStream` (bytes produced a block at a time, the
    same bytes as :func:`encode_tensor`'s streams) instead of arrays. Entropy-coded
    streams (``entropy``), small tensors and the other encodings come from
    :func:`encode_tensor` (their streams are views of the tensor, or small).

    Encoding GPT-2 124M's 50257 x 768 tied embedding held its whole values stream (0.15x
    the tensor's bytes at 85% zeros) and its codes while the artifact's size and digest
    were computed; block by block, a few MB."""
    t = t.detach().to("cpu")
    if entropy or t.numel() <= _BLOCK or t.dtype == torch.uint8 or _narrow(t)[0] is not None:
        return encode_tensor(key, t, entropy, arith_left)
    a = _as_ints(t)
    plan = _plan(a, _nonzero(a), t.element_size())
    del a
    if plan.encoding not in ("bitmap", "relidx"):
        return encode_tensor(key, t, entropy, arith_left)
    item = t.element_size()
    vdtype = t.dtype if t.dtype != torch.bool else torch.uint8

    def source(fn, *args):
        def make():
            a = _as_ints(t)  # per call: a non-contiguous tensor's copy lives only while read
            return fn(a, _nonzero(a), *args)
        return make

    if plan.encoding == "bitmap":
        nnz = (plan.size - _packed_size(t.numel(), 1)) // item
        parts = {"bitmap": (torch.uint8, _packed_size(t.numel(), 1), source(_bitmap_pieces, "bitmap")),
                 "values": (vdtype, nnz, source(_bitmap_pieces, "values"))}
    else:
        def index(a, mask):
            return _packed_pieces(_relidx_pieces(a, mask, plan.bits, "codes"), plan.bits)
        parts = {"index": (torch.uint8, _packed_size(plan.entries, plan.bits), source(index)),
                 "values": (vdtype, plan.entries, source(_relidx_pieces, plan.bits, "values"))}
    entry: dict[str, Any] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                             "encoding": plan.encoding, "streams": {}}
    if plan.encoding == "relidx":
        entry["bits"], entry["entries"] = plan.bits, plan.entries
    else:
        entry["nnz"] = nnz
    streams: dict[str, torch.Tensor | BlockStream] = {}
    for sname, (dtype, numel, make) in parts.items():
        skey = f"{key}::{sname}"
        nbytes = numel * (1 if dtype == torch.uint8 else item)
        entry["streams"][sname] = {"key": skey, "dtype": dtype_name(dtype), "raw_bytes": nbytes,
                                   "bytes": nbytes}
        streams[skey] = BlockStream(dtype, [numel], nbytes, make, skey)
    entry["stored_bytes"] = sum(s["bytes"] for s in entry["streams"].values())
    return entry, streams


def _encode_plan(key: str, t: torch.Tensor, a: np.ndarray, mask: np.ndarray, plan: _Plan,
                 positions: np.ndarray | None, entropy: bool, arith_left: int
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    raw: dict[str, tuple[torch.Tensor, bool]] = {}  # stream -> (tensor, may be entropy-coded)
    vdtype = t.dtype if t.dtype != torch.bool else torch.uint8
    one_byte = t.element_size() == 1  # 8-bit values (int8 weights, codes) are entropy-coded too
    if plan.encoding == "bitidx":
        raw["index"] = (_encode_bitidx(positions, a.size * 8, plan.bits, plan.entries), True)
    elif plan.encoding == "dense":
        raw["data"] = (t.reshape(-1), t.element_size() == 1)
    elif plan.encoding == "bitmap":
        # numpy's little-endian packbits is graph.packing's 1-bit layout
        bitmap, values = _encode_bitmap(a, mask, (plan.size - _packed_size(a.size, 1)) // t.element_size())
        raw["bitmap"] = (torch.from_numpy(bitmap), True)
        raw["values"] = (_from_ints(values, vdtype), one_byte)
    else:
        index, values, total = _encode_relidx(a, mask, plan.bits)
        raw["index"] = (index, True)
        raw["values"] = (_from_ints(values, vdtype), one_byte)
    entry: dict[str, Any] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                             "encoding": plan.encoding, "streams": {}}
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
        if entropy and codable and data.nbytes >= MIN_CODED_BYTES:
            codec, packed = _code_stream(data, arith_left, plan.bits if sname == "index" else 0)
            if codec is not None and arith.width(codec):
                arith_left -= data.nbytes
            if codec is not None:
                info["codec"] = codec
                data = np.frombuffer(packed, dtype=np.uint8)
                st = torch.from_numpy(data.copy())
        info["bytes"] = data.nbytes
        entry["streams"][sname] = info
        streams[skey] = st
    entry["stored_bytes"] = sum(s["bytes"] for s in entry["streams"].values())
    return entry, streams


def _count_field(entry: dict, name: str, lo: int, hi: int, where: str) -> int:
    v = entry.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ArtifactFormatError(f"{where}: {name} must be an int in [{lo}, {hi}], got "
                                  f"{_short_repr(v)}")
    return v


def _expected_stream_bytes(entry: dict, item: int, numel: int, where: str) -> dict[str, int]:
    """The raw bytes of each stream ``entry``'s encoding implies, its counts bounded by the
    tensor's size (so declared sizes can never exceed what the tensor needs)."""
    enc = entry.get("encoding")
    if enc == "dense":
        return {"data": numel * item}
    if enc == "bitmap":
        nnz = _count_field(entry, "nnz", 0, numel, where)
        return {"bitmap": _packed_size(numel, 1), "values": nnz * item}
    if enc == "relidx":
        bits = _count_field(entry, "bits", 1, 8, where)
        # one entry per non-zero plus a filler per 2**bits zeros, the tail's included
        entries = _count_field(entry, "entries", 0, numel + (numel >> bits) + 1, where)
        # fillers cover every gap, the tail included, so a claimed size has to be paid for
        if numel > (entries + 1) << bits:
            raise ArtifactFormatError(f"{where}: claims {numel} elements but its {entries} "
                                      f"relative indices of {bits} bits cannot reach that far")
        return {"index": _packed_size(entries, bits), "values": entries * item}
    if enc == "bitidx":
        if entry.get("dtype") != "uint8":
            raise ArtifactFormatError(f"{where}: bit indices store uint8 tensors only")
        bits = _count_field(entry, "bits", 1, 8, where)
        step = (1 << bits) - 1
        entries = _count_field(entry, "entries", 0, numel * 8 + numel * 8 // step + 1, where)
        # every entry steps at most 2**bits - 1 positions, fillers cover the tail
        if numel * 8 > entries * step:
            raise ArtifactFormatError(f"{where}: claims {numel} bytes but its {entries} bit "
                                      f"indices of {bits} bits cannot reach that far")
        # a writer stores bit indices only when they are smaller than the bytes (decoding
        # costs time per index: a crafted 1-bit index of 8 codes a byte took 12 s a 4 MB)
        if _packed_size(entries, bits) >= numel:
            raise ArtifactFormatError(f"{where}: {entries} bit indices of {bits} bits take "
                                      f"{_packed_size(entries, bits)} bytes, no fewer than the "
                                      f"{numel} bytes they index (a writer never makes this)")
        return {"index": _packed_size(entries, bits)}
    raise ArtifactFormatError(f"{where}: unknown encoding {_short_repr(enc)}")


_ENTRY_KEYS = {"dtype", "shape", "encoding", "sha256", "streams", "bits", "entries", "nnz",
               "stored_bytes", "narrow"}


def stored_dtype(entry: dict, dtype: torch.dtype, where: str) -> torch.dtype:
    """The dtype the entry's values are stored in: its own, or a float32 tensor's
    ``narrow`` 2-byte type (refused, typed, on any other tensor or value)."""
    narrow = entry.get("narrow")
    if narrow is None:
        return dtype
    if dtype != torch.float32 or not isinstance(narrow, str) or narrow not in NARROW:
        raise ArtifactFormatError(f"{where}: narrow={_short_repr(narrow)}; only a float32 tensor "
                                  f"may be stored narrow, as one of {sorted(NARROW)}")
    return NARROW[narrow]
_STREAM_KEYS = {"key", "dtype", "raw_bytes", "bytes", "sha256", "codec", "blob"}


def _check_tensor_entry(key: str, entry: Any) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, decoded bytes, bytes of every decoded stream) of a tensor entry, after
    checking that its fields have their types and its sizes add up."""
    where = f"tensor {_short_repr(key)}"
    if not isinstance(entry, dict) or not set(entry) <= _ENTRY_KEYS:
        raise ArtifactFormatError(f"{where}: malformed entry")
    dtype = _dtype(entry.get("dtype"), where)
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > 16 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < (1 << 48) for s in shape):
        raise ArtifactFormatError(f"{where}: bad shape {_short_repr(shape)}")
    numel = math.prod(shape)
    if numel >= 1 << 48:
        raise ArtifactLimitError(f"{where}: shape {shape} holds {numel} elements")
    if not isinstance(entry.get("sha256", ""), str):  # version 1 files hold digests
        raise ArtifactFormatError(f"{where}: malformed digest")
    item = torch.empty((), dtype=dtype).element_size()
    expected = _expected_stream_bytes(
        entry, torch.empty((), dtype=stored_dtype(entry, dtype, where)).element_size(), numel, where)
    streams = entry.get("streams")
    if not isinstance(streams, dict) or set(streams) != set(expected):
        raise ArtifactFormatError(f"{where}: expected streams {sorted(expected)}")
    for sname, info in streams.items():
        if not isinstance(info, dict) or not set(info) <= _STREAM_KEYS                 or info.get("raw_bytes") != expected[sname]:
            raise ArtifactFormatError(
                f"{where}: stream {sname!r} should hold {expected[sname]} bytes, header says "
                f"{_short_repr(info.get('raw_bytes') if isinstance(info, dict) else info)}")
        n = info.get("bytes", 0)
        if not isinstance(info.get("key"), str) or not isinstance(info.get("sha256", ""), str) \
                or not isinstance(n, int) or isinstance(n, bool) or n < 0 \
                or info.get("codec") not in (None, *CODECS) \
                or not isinstance(info.get("blob", False), bool):
            raise ArtifactFormatError(f"{where}: stream {sname!r} is malformed")
        if arith.width(info.get("codec")) and expected[sname] > arith.MAX_RAW:
            raise ArtifactLimitError(f"{where}: stream {sname!r} is {info['codec']}-coded at "
                                     f"{expected[sname]} bytes; {info['codec']} codes at most "
                                     f"{arith.MAX_RAW} (a writer never makes this)")
        _dtype(info.get("dtype"), where)
    return dtype, shape, numel * item, sum(expected.values())


def decode_tensor(key: str, entry: dict, payload: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild one tensor bit for bit (the payload's sha256 is checked before; a version 1
    file's 64-bit digests of every stream and of the result are checked too)."""
    where = f"tensor {key!r}"
    wide, shape, _, _ = _check_tensor_entry(key, entry)
    dtype = stored_dtype(entry, wide, where)  # the values as stored
    item = torch.empty((), dtype=dtype).element_size()
    raw: dict[str, np.ndarray] = {}
    for sname, info in entry["streams"].items():
        st = payload.get(info.get("key"))
        if st is None:
            raise ArtifactFormatError(f"{where}: stream {info.get('key')!r} missing from the payload")
        data = _as_ints(st)
        if "sha256" in info and _sha64(data) != info["sha256"]:  # version 1 files
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
        want = 1 if sname in ("index", "bitmap") or dtype == torch.bool else item
        if data.itemsize != want:
            raise ArtifactFormatError(f"{where}: stream {sname!r} has {data.itemsize}-byte "
                                      f"elements, the tensor {want}-byte ones")
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
    if "sha256" in entry and _sha64(flat) != entry["sha256"]:
        raise ArtifactIntegrityError(f"{where}: decoded tensor fails its sha256 check")
    return _from_ints(flat, dtype).to(wide).reshape(shape)
