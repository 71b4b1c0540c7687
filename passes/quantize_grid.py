"""The quantisation grid: integer codes, scales and zero points of a weight, and how the
codes are stored (int8, or packed row by row at 2-7 bits).

Pure functions on tensors, shared by the quantize pass (:mod:`fxpress.passes.quantize`),
its runtime modules (:mod:`fxpress.passes.quantize_modules`) and share's bias grid.
"""
from __future__ import annotations

import torch

from fxpress.graph.packing import pack_bits, unpack_bits

SCHEMES = ("symmetric", "affine")
GRANULARITIES = ("channel", "tensor", "group")

# -- the quantisation grid -------------------------------------------------------------------

def code_range(bits: int, scheme: str) -> tuple[int, int]:
    """Smallest and largest integer code: symmetric ``±(2^(b-1) - 1)`` (zero exact and the
    grid symmetric), affine ``0 .. 2^b - 1``."""
    if scheme == "symmetric":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def group_count(cols: int, group_size: int) -> int:
    """Groups of ``group_size`` columns in a row of ``cols`` (the last may be shorter)."""
    return max(1, -(-cols // max(int(group_size), 1)))


def to_groups(w2: torch.Tensor, groups: int, group_size: int = 0) -> torch.Tensor:
    """``w2`` ``[rows, cols]`` as ``[rows, groups, size]``.

    ``size`` is ``group_size`` (or ``cols / groups`` when not given); a last group shorter
    than ``size`` (a width ``group_size`` does not divide) is padded with zeros. Padding is
    exact on both grids: every range includes 0 (it changes no scale), and 0 has an exact
    code (it adds no error to a clipping search). :func:`from_groups` drops it again.
    """
    rows, cols = w2.shape
    if groups == 1:
        return w2.reshape(rows, 1, cols)
    size = int(group_size) or cols // groups
    if size * groups < cols or size * (groups - 1) >= cols:
        raise ValueError(f"{groups} groups of {size} columns do not cover {cols} columns")
    pad = size * groups - cols
    if pad:
        w2 = torch.nn.functional.pad(w2, (0, pad))
    return w2.reshape(rows, groups, size)


def from_groups(g: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_groups`: ``[rows, cols]`` without the padding."""
    flat = g.reshape(g.shape[0], -1)
    return flat if flat.shape[1] == cols else flat[:, :cols]


def _grouped(w2: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """``w2`` [rows, cols] viewed as [rows or 1, groups, group] for per-group statistics."""
    rows, cols = w2.shape
    if granularity == "tensor":
        return w2.reshape(1, 1, -1)
    if granularity == "channel":
        return w2.reshape(rows, 1, cols)
    return to_groups(w2, group_count(cols, group_size), group_size)


#: Clipping ratios tried by scale="mse" (1.0 = the absmax range).
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(9))


def _grid(g: torch.Tensor, bits: int, scheme: str, ratio: float
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes, scale and zero point of grouped weights ``g`` with the range clipped by ``ratio``."""
    lo, hi = code_range(bits, scheme)
    if scheme == "symmetric":
        amax = torch.maximum(g.amax(-1), g.amin(-1).neg_()) * ratio  # |g|'s max, no |g| copy
        scale = torch.where(amax > 0, amax / hi, torch.ones_like(amax))
        # one temporary the size of ``g``, rounded and clamped in place
        return (g / scale.unsqueeze(-1)).round_().clamp_(lo, hi), scale, None
    # the range always includes 0, so an integer zero point represents 0 exactly
    wmin = g.amin(-1).clamp(max=0) * ratio
    wmax = g.amax(-1).clamp(min=0) * ratio
    span = wmax - wmin
    scale = torch.where(span > 0, span / (hi - lo), torch.ones_like(span))
    zero = torch.round(-wmin / scale).clamp(lo, hi)
    codes = (g / scale.unsqueeze(-1)).round_().add_(zero.unsqueeze(-1)).clamp_(lo, hi)
    return codes, scale, zero


def quantize_weight(w2: torch.Tensor, bits: int, scheme: str = "symmetric",
                    granularity: str = "channel", group_size: int = 0, scale: str = "absmax"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes, scales and zero points of a 2-D weight ``[rows, cols]``.

    ``scale``: "absmax" (each channel/group's full range), "mse" (per channel/group, the
    clipped range of :data:`CLIP_RATIOS` with the least squared error: fewer levels wasted
    on rare large weights, which matters at 4 bits and below), "unit" (s = 1: ``round(w)``).
    Returns ``codes`` (int32, ``[rows, cols]``), ``scale`` (float32, ``[rows or 1,
    groups]``) and ``zero`` (int32 like ``scale``, affine only, else None).

    >>> q, s, z = quantize_weight(torch.tensor([[0.5, -1.0, 0.0, 0.25]]), bits=8)
    >>> q.tolist(), round(float(s), 6)
    ([[64, -127, 0, 32]], 0.007874)
    """
    codes, s, zero = _quantize(w2, bits, scheme, granularity, group_size, scale)
    return (codes.to(torch.int32), s.float(),
            None if zero is None else zero.to(torch.int32))


def _quantize(w2: torch.Tensor, bits: int, scheme: str, granularity: str, group_size: int,
              scale: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`quantize_weight` with the codes still float (whole numbers) ``[rows, cols]``
    and the scale and zero point as computed."""
    w2 = w2.detach().float()
    lo, hi = code_range(bits, scheme)
    g = _grouped(w2, granularity, group_size)
    if scale == "unit":
        codes, s, zero = torch.round(g).clamp(lo, hi), torch.ones(g.shape[:2]), None
    else:
        codes, s, zero = _grid(g, bits, scheme, 1.0)
        if scale == "mse":
            best = _sq_error(g, codes, s, zero)
            for ratio in CLIP_RATIOS[1:]:
                c, s2, z2 = _grid(g, bits, scheme, ratio)
                err = _sq_error(g, c, s2, z2)
                better = err < best
                best = torch.where(better, err, best)
                codes = torch.where(better.unsqueeze(-1), c, codes)
                s = torch.where(better, s2, s)
                if zero is not None:
                    zero = torch.where(better, z2, zero)
    return from_groups(codes, w2.numel() // codes.shape[0]).reshape(w2.shape), s, zero


def _sq_error(g, codes, scale, zero):
    zz = 0.0 if zero is None else zero.unsqueeze(-1)
    return ((codes - zz) * scale.unsqueeze(-1) - g).pow(2).sum(-1)


def tensor_grid(w2: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int32, ``w2``'s shape) and the ``[scale, zero]`` grid (float32) of one
    per-tensor affine grid of ``bits`` bits over the 2-D ``w2``, with the scale rounded up to
    the nearest float16 (at most 2**-10 of it coarser): both grid values are then float16
    numbers, which the artifact stores in 2 bytes each instead of 4 (a grid costs 4 bytes,
    not 8; on a small model's dozens of bias and norm grids that is ~1-2% of its file). A
    scale outside float16's normal range keeps its float32 value."""
    codes, scale, zero = quantize_weight(w2, bits, "affine", "tensor")
    half = scale.half()
    up = torch.where(half.float() < scale, torch.nextafter(half, torch.tensor(float("inf"),
                                                                               dtype=torch.half)), half)
    up = up.float()
    if torch.isfinite(up).all() and (up >= 2 ** -14).all() and not torch.equal(up, scale):
        lo, hi = code_range(bits, "affine")
        codes = (w2.detach().float() / up).round_().add_(zero.float()).clamp_(lo, hi).to(torch.int32)
        scale = up
    return codes, torch.cat([scale.reshape(1), zero.reshape(1).float()])


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                      group_size: int = 0) -> torch.Tensor:
    """``scale · (codes - zero)`` as float32 ``[rows, cols]`` (the inverse grid of
    :func:`quantize_weight`); ``group_size`` is needed where it does not divide ``cols``."""
    rows, cols = codes.shape
    flat = codes.reshape(rows if scale.shape[0] > 1 else 1, -1)
    g = to_groups(flat, scale.shape[1], group_size).float()
    if zero is not None:
        g = g - zero.unsqueeze(-1).float()
    return from_groups(g * scale.unsqueeze(-1), flat.shape[1]).reshape(rows, cols)


def store_codes(codes: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
    """Codes as they are stored: 8-bit symmetric as int8 ``[rows, cols]``; any other
    width as unsigned codes packed row by row (each row padded to whole bytes, so one
    row can be unpacked alone: embeddings decode only the rows they look up)."""
    if bits == 8 and scheme == "symmetric":
        return codes.to(torch.int8)
    lo, _ = code_range(bits, scheme)
    u = codes - lo  # unsigned
    if bits == 8:
        return u.to(torch.uint8)
    rows, cols = u.shape
    pad = (-cols) % 8
    if pad:
        u = torch.cat([u, u.new_zeros(rows, pad)], 1)
    return pack_bits(u, bits).view(rows, -1)


def _stored(w2: torch.Tensor, bits: int, scheme: str, granularity: str, group_size: int,
            scale: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One block of :func:`quantize_stored`: 8-bit codes go from the float codes straight
    to their stored byte (no int32 copy between)."""
    if bits != 8:
        codes, s, zero = quantize_weight(w2, bits, scheme, granularity, group_size, scale)
        return store_codes(codes, bits, scheme), s, zero
    codes, s, zero = _quantize(w2, bits, scheme, granularity, group_size, scale)
    stored = codes.to(torch.int8 if scheme == "symmetric" else torch.uint8)  # lo is 0 when affine
    return stored, s.float(), None if zero is None else zero.to(torch.int32)


def quantize_stored(w2: torch.Tensor, bits: int, scheme: str = "symmetric",
                    granularity: str = "channel", group_size: int = 0, scale: str = "absmax"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`quantize_weight` then :func:`store_codes`, about a million weights at a time
    when rows have their own scales: the float temporaries and int32 codes of a large
    weight (an embedding table) never exist whole. Returns (stored codes, scale, zero)."""
    rows, cols = w2.shape
    step = max(1, (1 << 20) // max(cols, 1))
    if granularity == "tensor" or rows <= step:  # one scale for every row: all at once
        return _stored(w2, bits, scheme, granularity, group_size, scale)
    out, scales, zeros = None, [], []
    for start in range(0, rows, step):
        block, s, zero = _stored(w2[start:start + step], bits, scheme, granularity,
                                 group_size, scale)
        if out is None:
            out = block.new_empty((rows, *block.shape[1:]))
        out[start:start + block.shape[0]] = block
        scales.append(s)
        zeros.append(zero)
    return out, torch.cat(scales), None if zeros[0] is None else torch.cat(zeros)


def load_codes(stored: torch.Tensor, bits: int, scheme: str, cols: int) -> torch.Tensor:
    """Inverse of :func:`store_codes`: int32 codes ``[rows, cols]``."""
    if bits == 8 and scheme == "symmetric":
        return stored.to(torch.int32)
    lo, _ = code_range(bits, scheme)
    if bits == 8:
        return stored.to(torch.int32) + lo
    rows = stored.shape[0]
    padded = cols + (-cols) % 8
    u = unpack_bits(stored, bits, rows * padded).view(rows, padded)[:, :cols]
    return u.to(torch.int32) + lo


__all__ = ["SCHEMES", "GRANULARITIES", "CLIP_RATIOS", "code_range", "group_count", "to_groups",
           "from_groups", "quantize_weight",
           "dequantize_weight", "store_codes", "quantize_stored", "load_codes"]
