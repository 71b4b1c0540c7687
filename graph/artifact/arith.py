"""``ac1`` .. ``ac8``: adaptive binary arithmetic coding of a stream's ``w``-bit symbols.

The general-purpose codecs (zlib, bz2, lzma) pay tens of bytes per stream for their own
headers and code tables, and code whole bytes: on a compressed model's small streams (a
layer's 4-bit centroid indices, its position index, a mask of a few hundred bytes) they
win little. ``acW`` reads the stream as the little-endian bit stream of ``graph.packing``
cut into ``W``-bit symbols (``W`` = the stream's code width: 4 for 4-bit centroid indices,
the index width for relative indices, 1 for a bitmap), codes each symbol as ``W`` binary
decisions down a binary tree (as LZMA codes its literals), each node with its own adaptive
probability: the Krichevsky-Trofimov estimate ``(zeros + 1/2) / (seen + 1)`` of the
symbols seen so far, so it stores no table and costs the symbols' empirical entropy plus
about ``log2(n) / 2`` bits per tree node. The range coder is LZMA's (32-bit range, carry
propagation through a cached byte), with 16-bit probabilities; its first byte (always 0)
and trailing zero bytes are not stored (the decoder reads zeros past the end).

:func:`estimate` computes the coded size of every width in closed form (the estimate is
the coder's output up to a few bytes), so the writer encodes only the best width.

Decoding is a Python loop over the decoded bits, so streams are bounded: the writer uses
these codecs only for streams of at most :data:`MAX_RAW` bytes, the reader refuses larger
ones and bounds the sum of a file's ``acW`` streams (``Limits.arith_bytes``).
"""
from __future__ import annotations

import functools
import math

import numpy as np

#: the largest stream (decoded bytes) ``acW`` codes; larger ones stay with zlib/bz2/lzma
MAX_RAW = 1 << 16
CODECS = tuple(f"ac{w}" for w in range(1, 9))
_TOP = 1 << 24
_MASK32 = 0xFFFFFFFF


def width(codec) -> int:
    """The symbol width of an ``acW`` codec name (0 for another codec or no codec)."""
    return int(codec[2:]) if codec in CODECS else 0


def _symbols(data: bytes, w: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    pad = (-bits.size) % w
    if pad:
        bits = np.concatenate([bits, np.zeros(pad, dtype=np.uint8)])
    return bits.reshape(-1, w).astype(np.int64) @ (1 << np.arange(w, dtype=np.int64))


def _from_symbols(symbols: list[int], w: int, nbytes: int) -> bytes:
    s = np.asarray(symbols, dtype=np.int64)
    bits = ((s[:, None] >> np.arange(w, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bits, bitorder="little").tobytes()[:nbytes]


def _log_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``ln Γ(k + 1)`` and ``ln Γ(k + 1/2)`` for k = 0..n (cumulative sums of logs)."""
    k = np.arange(1, n + 1, dtype=np.float64)
    whole = np.concatenate([[0.0], np.cumsum(np.log(k))])
    half = math.lgamma(0.5) + np.concatenate([[0.0], np.cumsum(np.log(k - 0.5))])
    return whole, half


def estimate(data: bytes, w: int, tables: tuple[np.ndarray, np.ndarray] | None = None) -> int:
    """The bytes ``acW`` codes ``data`` into (within a few bytes of :func:`encode`): the
    KT estimator's cost in closed form, ``log2(π Γ(n+1) / (Γ(z+1/2) Γ(o+1/2)))`` bits for a
    node that sees z zeros and o ones."""
    s = _symbols(data, w)
    whole, half = tables or _log_tables(s.size)
    total = 0.0
    for d in range(w):
        node = (s >> (w - d)) | (1 << d)          # the tree node deciding bit d (MSB first)
        bit = (s >> (w - 1 - d)) & 1
        ones = np.bincount(node[bit == 1], minlength=1 << (d + 1))
        seen = np.bincount(node, minlength=1 << (d + 1))
        used = seen > 0
        z, o, n = (seen - ones)[used], ones[used], seen[used]
        total += float(np.sum(whole[n] + math.log(math.pi) - half[z] - half[o]))
    return math.ceil(total / math.log(2) / 8) + 2


def best_width(data: bytes, widths=(1, 2, 4, 8)) -> tuple[int, int]:
    """(width, estimated bytes) of the ``acW`` of ``widths`` that codes ``data`` smallest
    (a stream of codes of another width, e.g. 5-bit relative indices, adds its width)."""
    tables = _log_tables(len(data) * 8)
    return min(((w, estimate(data, w, tables)) for w in sorted(set(widths))),
               key=lambda we: (we[1], we[0]))


def encode(data: bytes, w: int) -> bytes:
    """``data`` coded as ``w``-bit symbols (``acW``)."""
    return _encode(bytes(data), w)


@functools.lru_cache(maxsize=64)  # a writer may ask twice for a stream (write.py's store)
def _encode(data: bytes, w: int) -> bytes:
    symbols = _symbols(data, w).tolist()
    zeros = [0] * (1 << w)
    seen = [0] * (1 << w)
    low, rng, cache, cache_size = 0, _MASK32, 0, 1
    out = bytearray()

    def shift_low() -> None:  # LZMA's: emit the cached byte (plus a carry) once it is final
        nonlocal low, cache, cache_size
        if (low & _MASK32) < 0xFF000000 or low >> 32:
            carry, temp = low >> 32, cache
            while True:
                out.append((temp + carry) & 0xFF)
                temp = 0xFF
                cache_size -= 1
                if not cache_size:
                    break
            cache = (low >> 24) & 0xFF
        cache_size += 1
        low = (low & 0x00FFFFFF) << 8

    for sym in symbols:
        node = 1
        for d in range(w - 1, -1, -1):
            bit = (sym >> d) & 1
            n = seen[node]
            p = ((2 * zeros[node] + 1) << 16) // (2 * n + 2)  # KT estimate of a zero, 16 bits
            bound = (rng >> 16) * (1 if p < 1 else 65535 if p > 65535 else p)
            seen[node] = n + 1
            if bit:
                low += bound
                rng -= bound
            else:
                zeros[node] += 1
                rng = bound
            while rng < _TOP:  # once per output byte
                rng = (rng << 8) & _MASK32
                shift_low()
            node = (node << 1) | bit
    for _ in range(5):
        shift_low()
    return bytes(out[1:]).rstrip(b"\0")  # the first byte is always 0; the decoder pads zeros


def decode(data: bytes, w: int, nbytes: int) -> bytes:
    """The ``nbytes`` bytes :func:`encode` coded into ``data`` at width ``w``."""
    count = -(-nbytes * 8 // w)
    zeros = [0] * (1 << w)
    seen = [0] * (1 << w)
    data = bytes(data)
    code = int.from_bytes((data + b"\0" * 4)[:4], "big")
    pos, end = 4, len(data)
    rng = _MASK32
    out = [0] * count
    top = 1 << w
    for i in range(count):
        node = 1
        while node < top:
            n = seen[node]
            p = ((2 * zeros[node] + 1) << 16) // (2 * n + 2)
            bound = (rng >> 16) * (1 if p < 1 else 65535 if p > 65535 else p)
            seen[node] = n + 1
            if code < bound:
                zeros[node] += 1
                rng = bound
                node <<= 1
            else:
                code -= bound
                rng -= bound
                node = (node << 1) | 1
            while rng < _TOP:
                rng = (rng << 8) & _MASK32
                code = ((code << 8) | (data[pos] if pos < end else 0)) & _MASK32
                pos += 1
        out[i] = node - top
    return _from_symbols(out, w, nbytes)


__all__ = ["CODECS", "MAX_RAW", "width", "estimate", "best_width", "encode", "decode"]
