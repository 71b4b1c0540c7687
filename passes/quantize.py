"""quantize: store weights as packed integers with a scale per channel, tensor or group.

``quantize{bits=8}`` rewrites every linear, conv and embedding into a runtime module that
stores ``q = clamp(round(w / s))`` (symmetric) or ``q = clamp(round(w / s) + z)`` (affine,
with an integer zero point ``z``), packed at its real width (int8 as int8, 4-bit two per
byte, 3/5/6/7-bit through :func:`~fxpress.graph.packing.pack_bits`), plus the scales
and the bias. Decoding is ``w ≈ s · (q - z)``; ``scale="unit"`` is the seed article's
``round(w)`` (s = 1). Zeros stay exactly zero in both schemes (``z`` is an integer).

Linear layers with ``activations="dynamic"`` run as an integer matmul: each token (row
of the input) is quantised to int8 with its own scale at run time, so an outlier
channel in one token does not flatten the others, and the result is independent of what
else is in the batch. Weight-only layers (``activations="none"``, convs, embeddings)
decode their weight on the fly (embeddings decode only the rows they look up).

>>> res = fxpress.compress(model, "quantize{bits=8}", calibration=batches)     # doctest: +SKIP
>>> res.records[0].stats["layers"]["fc1.weight"]                               # doctest: +SKIP
{'kind': 'linear', 'bits': 8, 'kernel': 'fbgemm', 'bytes_before': 76800, 'bytes_after': 19400,
 'rel_error': 0.0042, ...}

Fine-tuning (the distill pass's recovery step): :meth:`QuantizedWeight.begin_training`
adds a float latent weight used through a straight-through estimator, so every forward
in training stays on the quantisation grid; :meth:`QuantizedWeight.end_training`
re-quantises it into the packed storage with the same scales and drops it.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from collections import Counter
from typing import Any, Iterator

import torch
import torch.fx
import torch.nn.functional as F

from fxpress.errors import OptionError
from fxpress.graph.capture import _flat_graph_inputs, eval_mode
from fxpress.graph.packing import pack_bits, unpack_bits
from fxpress.graph.weights import (CONV, EMBEDDING, LINEAR, CompressedModule, caches_enabled,
                                   op_forward, select, stored_bytes)
from fxpress.graph.weights import weighted_ops as _weighted_ops
from fxpress.passes.base import Pass, PassContext, PassResult, Tolerance, check_glob_matches, option

_NONE = type(None)
SCHEMES = ("symmetric", "affine")
GRANULARITIES = ("channel", "tensor", "group")


# -- the quantisation grid -------------------------------------------------------------------

def code_range(bits: int, scheme: str) -> tuple[int, int]:
    """Smallest and largest integer code: symmetric ``±(2^(b-1) - 1)`` (zero exact and the
    grid symmetric), affine ``0 .. 2^b - 1``."""
    if scheme == "symmetric":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _grouped(w2: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    """``w2`` [rows, cols] viewed as [rows or 1, groups, group] for per-group statistics."""
    rows, cols = w2.shape
    if granularity == "tensor":
        return w2.reshape(1, 1, -1)
    if granularity == "channel":
        return w2.reshape(rows, 1, cols)
    return w2.reshape(rows, cols // group_size, group_size)


#: Clipping ratios tried by scale="mse" (1.0 = the absmax range).
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(9))


def _grid(g: torch.Tensor, bits: int, scheme: str, ratio: float
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes, scale and zero point of grouped weights ``g`` with the range clipped by ``ratio``."""
    lo, hi = code_range(bits, scheme)
    if scheme == "symmetric":
        amax = g.abs().amax(-1) * ratio
        scale = torch.where(amax > 0, amax / hi, torch.ones_like(amax))
        return torch.round(g / scale.unsqueeze(-1)).clamp(lo, hi), scale, None
    # the range always includes 0, so an integer zero point represents 0 exactly
    wmin = g.amin(-1).clamp(max=0) * ratio
    wmax = g.amax(-1).clamp(min=0) * ratio
    span = wmax - wmin
    scale = torch.where(span > 0, span / (hi - lo), torch.ones_like(span))
    zero = torch.round(-wmin / scale).clamp(lo, hi)
    codes = torch.clamp(torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1), lo, hi)
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
    return (codes.reshape(w2.shape).to(torch.int32), s.float(),
            None if zero is None else zero.to(torch.int32))


def _sq_error(g, codes, scale, zero):
    zz = 0.0 if zero is None else zero.unsqueeze(-1)
    return ((codes - zz) * scale.unsqueeze(-1) - g).pow(2).sum(-1)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
                      ) -> torch.Tensor:
    """``scale · (codes - zero)`` as float32 ``[rows, cols]`` (the inverse grid of
    :func:`quantize_weight`)."""
    rows, cols = codes.shape
    groups = scale.shape[1]
    g = codes.reshape(codes.shape[0] if scale.shape[0] > 1 else 1, groups, -1).float()
    if zero is not None:
        g = g - zero.unsqueeze(-1).float()
    return (g * scale.unsqueeze(-1)).reshape(rows, cols)


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


def quantize_stored(w2: torch.Tensor, bits: int, scheme: str = "symmetric",
                    granularity: str = "channel", group_size: int = 0, scale: str = "absmax"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`quantize_weight` then :func:`store_codes`, about a million weights at a time
    when rows have their own scales: the float temporaries and int32 codes of a large
    weight (an embedding table) never exist whole. Returns (stored codes, scale, zero)."""
    rows, cols = w2.shape
    step = max(1, (1 << 20) // max(cols, 1))
    if granularity == "tensor" or rows <= step:  # one scale for every row: all at once
        codes, s, zero = quantize_weight(w2, bits, scheme, granularity, group_size, scale)
        return store_codes(codes, bits, scheme), s, zero
    out, scales, zeros = None, [], []
    for start in range(0, rows, step):
        codes, s, zero = quantize_weight(w2[start:start + step], bits, scheme, granularity,
                                         group_size, scale)
        block = store_codes(codes, bits, scheme)
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


# -- the integer matmul behind dynamic activation quantisation -------------------------------

def _cpu_has_vnni() -> bool:
    # fbgemm's AVX2/AVX512 kernels without VNNI add u8*s8 pairs in int16 and can saturate
    # at full 8-bit range; with VNNI (or AMX) they accumulate in int32.
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


_REDUCE_RANGE = not _cpu_has_vnni()
#: Order in which dynamic int8 linear kernels are tried; the first that works is used.
INT8_BACKENDS = ("fbgemm", "int_mm", "reference")
_backend_override: list[str] = []
_broken: set[str] = set()
_prepacked: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def int8_backend(name: str) -> Iterator[None]:
    """Force one dynamic int8 kernel in the block ("fbgemm", "int_mm" or "reference").

    >>> with int8_backend("reference"):                     # doctest: +SKIP
    ...     y = quantized_linear(x)
    """
    if name not in INT8_BACKENDS:
        raise ValueError(f"backend must be one of {INT8_BACKENDS}, got {name!r}")
    _backend_override.append(name)
    try:
        yield
    finally:
        _backend_override.pop()


def _available_backends() -> list[str]:
    if _backend_override:
        return [_backend_override[-1]]
    out = []
    if "fbgemm" not in _broken and hasattr(torch.ops.quantized, "linear_dynamic"):
        out.append("fbgemm")
    if "int_mm" not in _broken and hasattr(torch, "_int_mm"):
        out.append("int_mm")
    out.append("reference")
    return out


def per_token_absmax(x2: torch.Tensor) -> torch.Tensor:
    """``max |x|`` of each row as ``[rows, 1]``, at least a tiny positive number.

    Two reductions (max and min) read ``x`` twice but write nothing, which measured
    faster on CPU than ``x.abs().amax()`` or ``aminmax``.
    """
    return torch.maximum(x2.amax(1, keepdim=True), x2.amin(1, keepdim=True).neg_()).clamp_(min=1e-12)


def quantize_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of ``x2`` and the row scales ``[rows, 1]``."""
    amax = per_token_absmax(x2)
    return torch.mul(x2, 127.0 / amax).round_().to(torch.int8), amax / 127.0


# -- runtime modules ---------------------------------------------------------------------------

class QuantizedWeight(CompressedModule):
    """A weighted op whose weight is stored as packed integer codes and scales.

    Buffers (the whole state_dict): ``qweight`` (int8 ``[rows, cols]`` for 8-bit
    symmetric, else uint8 codes packed per row), ``scale`` (float32 per channel, tensor
    or group), ``zero_point`` (uint8, affine only), ``bias`` (float, optional) and
    ``smooth`` (float32 per input column, when the pass migrated activation outliers
    into the weight, SmoothQuant-style: the stored weight is ``w · smooth``).
    """

    technique = "quantize"
    optional_tensors = ("bias", "zero_point", "smooth")

    def __init__(self, kind: str, spec: dict, shape: tuple[int, ...], codes: torch.Tensor,
                 scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
                 bits: int, scheme: str, granularity: str, group_size: int = 0,
                 activations: str = "none", smooth: torch.Tensor | None = None,
                 stored: bool = False):
        super().__init__(kind, spec)
        self.shape = list(shape)
        self.bits, self.scheme, self.granularity = int(bits), scheme, granularity
        self.group_size = int(group_size)
        self.activations = activations
        # ``stored``: ``codes`` are already what store_codes returns (see quantize_stored)
        self.register_buffer("qweight", codes if stored else store_codes(codes, bits, scheme))
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero_point", None if zero is None else
                             (zero - code_range(bits, scheme)[0]).to(torch.uint8))
        self.register_buffer("smooth", None if smooth is None else smooth.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def config(self) -> dict:
        return {**super().config(), "shape": list(self.shape), "bits": self.bits,
                "scheme": self.scheme, "granularity": self.granularity,
                "group_size": self.group_size, "activations": self.activations}

    # -- decoding ------------------------------------------------------------------------
    @property
    def cols(self) -> int:
        return int(math.prod(self.shape[1:]))

    def codes(self) -> torch.Tensor:
        """Integer codes ``[rows, cols]`` (int32)."""
        return load_codes(self.qweight, self.bits, self.scheme, self.cols)

    def zero(self) -> torch.Tensor | None:
        if self.zero_point is None:
            return None
        return self.zero_point.to(torch.int32) + code_range(self.bits, self.scheme)[0]

    def stored_weight(self) -> torch.Tensor:
        """The decoded 2-D weight as stored (``w · smooth`` when smoothed)."""
        latent = getattr(self, "latent", None)
        if latent is not None:
            return self._on_grid(self.keep_zeros(latent))
        return dequantize_weight(self.codes(), self.scale, self.zero())

    def weight_float(self) -> torch.Tensor:
        if self._training_path():
            w2 = self.stored_weight()
            if self.smooth is not None:
                w2 = w2 / self.smooth
            return w2.reshape(self.shape)
        # decoded a block of rows at a time into the result: the int32 codes and float
        # temporaries of a whole embedding table would weigh several times the result
        out = torch.empty(self.shape[0], self.cols, dtype=torch.float32, device=self.scale.device)
        for start, w2 in self._decoded_rows():
            out[start:start + w2.shape[0]] = w2
        return out.reshape(self.shape)

    def count_weights(self) -> tuple[int, int]:
        if self._training_path():
            return super().count_weights()
        nonzeros = sum(int(torch.count_nonzero(w2)) for _, w2 in self._decoded_rows())
        return self.shape[0] * self.cols, nonzeros

    def _decoded_rows(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, decoded float rows) of the stored weight, ``w / smooth`` when
        smoothed, about a million weights at a time (codes are packed row by row)."""
        rows, cols = self.shape[0], self.cols
        step = max(1, (1 << 20) // max(cols, 1))
        per_row = self.scale.shape[0] > 1
        zero = self.zero()
        with torch.no_grad():
            for start in range(0, rows, step):
                end = min(rows, start + step)
                codes = load_codes(self.qweight[start:end], self.bits, self.scheme, cols)
                w2 = dequantize_weight(codes, self.scale[start:end] if per_row else self.scale,
                                       zero[start:end] if per_row and zero is not None else zero)
                yield start, (w2 / self.smooth if self.smooth is not None else w2)

    # -- fine-tuning -------------------------------------------------------------------------
    def _on_grid(self, w2: torch.Tensor) -> torch.Tensor:
        """Straight-through fake quantisation of ``w2`` on this module's fixed grid."""
        lo, hi = code_range(self.bits, self.scheme)
        rows_s = self.scale.shape[0]
        g = w2.reshape(rows_s if rows_s > 1 else 1, self.scale.shape[1], -1)
        s = self.scale.unsqueeze(-1)
        z = self.zero()
        zz = 0.0 if z is None else z.unsqueeze(-1).float()
        q = torch.clamp(torch.round(g.detach() / s) + zz, lo, hi)
        snapped = ((q - zz) * s).reshape(w2.shape)
        return w2 + (snapped - w2).detach()

    def begin_training(self) -> list[torch.nn.Parameter]:
        """Add a float latent weight (``latent``, the decoded weight) and make the bias
        trainable; return both for an optimizer. Forward then snaps the latent onto the
        stored grid (same scales and zero points) with a straight-through estimator, so
        what is trained is exactly what :meth:`end_training` will store."""
        if getattr(self, "latent", None) is None:
            w2 = dequantize_weight(self.codes(), self.scale, self.zero())
            self.remember_zeros(w2)  # pruned weights stay exactly zero
            self.latent = torch.nn.Parameter(w2, requires_grad=True)
        params = [self.latent]
        if self.bias is not None:
            bias = self._buffers.pop("bias")
            self.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=True)
            params.append(self.bias)
        return params

    def end_training(self) -> None:
        """Re-quantise the latent weight into ``qweight`` with the same scales, drop it."""
        latent = getattr(self, "latent", None)
        if latent is None:
            return
        with torch.no_grad():
            lo, hi = code_range(self.bits, self.scheme)
            rows_s = self.scale.shape[0]
            g = self.keep_zeros(latent.detach()).reshape(
                rows_s if rows_s > 1 else 1, self.scale.shape[1], -1)
            z = self.zero()
            zz = 0.0 if z is None else z.unsqueeze(-1).float()
            q = torch.clamp(torch.round(g / self.scale.unsqueeze(-1)) + zz, lo, hi)
            self.qweight = store_codes(q.reshape(latent.shape).to(torch.int32), self.bits, self.scheme)
        del self.latent
        if isinstance(self.bias, torch.nn.Parameter):
            bias = self._parameters.pop("bias")
            self.register_buffer("bias", bias.detach())
        _prepacked.pop(self, None)

    def _training_path(self) -> bool:
        return getattr(self, "latent", None) is not None

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, shape={tuple(self.shape)}, bits={self.bits}, "
                f"scheme={self.scheme}, granularity={self.granularity}"
                + (f", group_size={self.group_size}" if self.granularity == "group" else "")
                + f", activations={self.activations}")


class QuantizedLinear(QuantizedWeight):
    """A linear layer with integer weights.

    ``activations="dynamic"``: each input row is quantised to int8 with its own scale and
    multiplied in integers (fbgemm's prepacked kernel, else ``torch._int_mm``, else a
    float reference of the same integer product). ``"none"``: the weight is decoded and
    multiplied in float.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(LINEAR, {}, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations != "dynamic" or self._training_path() or x.requires_grad:
            return F.linear(x, self.weight_float(), self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.smooth is not None:
            x2 = x2 / self.smooth
        if x2.dtype != torch.float32:
            x2 = x2.float()
        for backend in _available_backends():
            try:
                y = getattr(self, f"_mm_{backend}")(x2)
                break
            except (RuntimeError, NotImplementedError):
                if _backend_override or backend == "reference":
                    raise
                _broken.add(backend)  # the operator is missing or refuses: try the next
        return y.to(x.dtype).reshape(*shape[:-1], -1)

    # the int8 weight and its per-output-channel scale and zero point, for the kernels
    def _int8_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # 8-bit symmetric codes are stored as int8 already: no int32 detour (4x their size)
        codes = self.qweight if self.bits == 8 and self.scheme == "symmetric" else self.codes()
        zero = self.zero()
        rows = codes.shape[0]
        scale = self.scale.reshape(-1).expand(rows) if self.scale.numel() == 1 else self.scale.reshape(-1)
        if zero is not None:
            zero = zero.reshape(-1).expand(rows) if zero.numel() == 1 else zero.reshape(-1)
            if self.bits == 8:  # affine codes 0..255 shift into int8 with the zero point
                codes, zero = codes - 128, zero - 128
        return codes.to(torch.int8), scale.contiguous(), None if zero is None else zero.contiguous()

    def _cached(self, backend: str, build):
        key = (backend, self.qweight.data_ptr(), self.qweight._version, self.scale._version)
        hit = _prepacked.get(self)
        if hit is None or hit[0] != key:
            hit = (key, build())
            if caches_enabled():
                _prepacked[self] = hit
        return hit[1]

    def _mm_fbgemm(self, x2: torch.Tensor) -> torch.Tensor:
        def build(weight=None, rows: slice = slice(None)):
            wq, scale, zero = weight or self._int8_weight()
            zp = torch.zeros(len(scale), dtype=torch.long) if zero is None else zero.long()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized-tensor creation warns of deprecation
                qw = torch._make_per_channel_quantized_tensor(wq[rows], scale[rows].double(),
                                                              zp[rows], 0)
                return torch.ops.quantized.linear_prepack(qw, None)
        # fbgemm quantises its input with one scale; dividing each row by its own absmax
        # first makes that scale a per-token one (every row then spans [-1, 1])
        amax = per_token_absmax(x2)
        xs = x2 / amax
        rows, cols = self.shape[0], self.cols
        if caches_enabled() or _prepacked.get(self) is not None or rows * cols <= 1 << 22:
            y = torch.ops.quantized.linear_dynamic(xs, self._cached("fbgemm", build), _REDUCE_RANGE)
        else:
            # nothing kept: prepack a block of output channels at a time, so that a large
            # weight (a language model's head) is never copied whole, twice, for one call;
            # channels are independent, the result is the same
            step = max(1, (1 << 20) // max(cols, 1))
            weight = self._int8_weight()
            y = xs.new_empty((xs.shape[0], rows))
            for start in range(0, rows, step):
                y[:, start:start + step] = torch.ops.quantized.linear_dynamic(
                    xs, build(weight, slice(start, start + step)), _REDUCE_RANGE)
        if self.bias is None:
            return y.mul_(amax)
        return torch.addcmul(self.bias, y, amax, out=y)

    def _int_product(self, xq: torch.Tensor, sx: torch.Tensor, acc: torch.Tensor,
                     sw: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        if zero is not None:
            acc = acc - xq.sum(1, keepdim=True, dtype=torch.int32) * zero.to(torch.int32)
        if self.bias is None:
            return acc * (sx * sw)
        return torch.addcmul(self.bias, acc, sx * sw)

    def _mm_int_mm(self, x2: torch.Tensor) -> torch.Tensor:
        wq, sw, zero = self._cached("int_mm", self._int8_weight)
        xq, sx = quantize_per_token(x2)
        return self._int_product(xq, sx, torch._int_mm(xq, wq.t()), sw, zero)

    def _mm_reference(self, x2: torch.Tensor) -> torch.Tensor:
        wq, sw, zero = self._int8_weight()
        xq, sx = quantize_per_token(x2)
        # float64 holds every int8 x int8 sum exactly
        acc = (xq.double() @ wq.double().t()).round_().to(torch.int64)
        if zero is not None:
            acc = acc - xq.sum(1, keepdim=True, dtype=torch.int64) * zero.to(torch.int64)
        y = acc.double() * (sx.double() * sw.double())
        if self.bias is not None:
            y = y + self.bias.double()
        return y.float()


class QuantizedConv(QuantizedWeight):
    """A conv with integer weights, decoded on the fly (weight-only)."""

    def __init__(self, spec: dict, *args: Any, **kwargs: Any):
        super().__init__(CONV, spec, *args, **kwargs)


class QuantizedEmbedding(QuantizedWeight):
    """An embedding table with integer rows; a lookup decodes only the rows it reads."""

    def __init__(self, spec: dict, *args: Any, **kwargs: Any):
        super().__init__(EMBEDDING, spec, *args, **kwargs)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self._training_path() or self.granularity == "tensor" or self.smooth is not None:
            return F.embedding(indices, self.weight_float(), self.spec.get("padding_idx"))
        flat = indices.reshape(-1)
        rows = self.qweight.index_select(0, flat)
        codes = load_codes(rows, self.bits, self.scheme, self.cols)
        zero = self.zero()
        out = dequantize_weight(codes, self.scale.index_select(0, flat),
                                None if zero is None else zero.index_select(0, flat))
        return out.reshape(*indices.shape, self.cols)


RUNTIME_MODULES = (QuantizedLinear, QuantizedConv, QuantizedEmbedding)


# -- calibration: what each op sees --------------------------------------------------------

class _InputRecorder(torch.fx.Interpreter):
    """Runs a graph and keeps, for chosen nodes, the per-column absmax over every batch
    and a sample of rows from the first batch (to measure each layer's output error)."""

    def __init__(self, gm, nodes: dict[torch.fx.Node, str], sample_rows: int):
        super().__init__(gm)
        self.watch = nodes  # node -> kind of the op it feeds
        self.sample_rows = sample_rows
        self.absmax: dict[torch.fx.Node, torch.Tensor] = {}
        self.sample: dict[torch.fx.Node, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        kind = self.watch.get(n)
        if kind is not None and isinstance(out, torch.Tensor):
            if kind == LINEAR:
                x2 = out.detach().reshape(-1, out.shape[-1]).float()
                a = x2.abs().amax(0)
                self.absmax[n] = a if n not in self.absmax else torch.maximum(self.absmax[n], a)
                if n not in self.sample:
                    step = max(1, x2.shape[0] // self.sample_rows)
                    self.sample[n] = x2[::step][: self.sample_rows].clone()
            elif n not in self.sample:
                self.sample[n] = out.detach()[: max(1, min(len(out), 64))].clone()
        return out


def _record_inputs(gm, ops, batches, sample_rows=512):
    nodes = {}
    for op in ops:
        if isinstance(op._input, torch.fx.Node):
            nodes.setdefault(op._input, op.kind)
    rec = _InputRecorder(gm, nodes, sample_rows)
    with torch.no_grad(), eval_mode(gm):
        for b in batches:
            rec.run(*_flat_graph_inputs(gm, b))
    return rec


# -- the pass ------------------------------------------------------------------------------

class Quantize(Pass):
    """Integer weights with scales per channel/tensor/group; int8 dynamic activations."""

    name = "quantize"
    summary = ("Store weights as packed integers (2-8 bits) with per-channel/tensor/group scales; "
               "linear layers run int8 x int8 with per-token activation scales.")
    # int8 keeps sentence-embedding cosine >= 0.99 and 4-bit groups >= 0.97 on MiniLM;
    # narrower widths lose more and must say so with tol.* overrides
    tolerance = Tolerance(min_cosine=0.97, min_top1=0.95)
    replaces_tensors = True
    runtime_modules = RUNTIME_MODULES

    bits = option(8, "bits per weight code (2-8)", type=int, low=2, high=8)
    granularity = option("channel", "one scale per output 'channel', per 'tensor', or per "
                         "'group' of group_size input columns", choices=GRANULARITIES)
    group_size = option(None, "input columns per scale with granularity=group (must divide "
                        "every selected layer's input width)", type=(int, _NONE), low=1)
    scheme = option("symmetric", "'symmetric' (q in ±(2^(b-1)-1), zero point 0) or 'affine' "
                    "(q in 0..2^b-1 with an integer zero point)", choices=SCHEMES)
    activations = option(None, "'dynamic': linear layers quantise each input row to int8 at run "
                         "time and multiply in integers; 'none': weight-only (decode, float "
                         "matmul). Default: dynamic, or none with granularity=group",
                         type=(str, _NONE), choices=("dynamic", "none", None))
    scale = option(None, "'absmax': scale from each channel/group's full range; 'mse': the "
                   "clipped range with the least squared error; 'unit': s = 1, the seed article's "
                   "round(w). Default: absmax at 8 bits, mse below", type=(str, _NONE),
                   choices=("absmax", "mse", "unit", None))
    smooth = option(None, "SmoothQuant migration strength alpha in [0, 1] for dynamic linear "
                    "layers: divides input columns by absmax(x)^a / absmax(w)^(1-a) measured on "
                    "the calibration batches, and multiplies the weight by it", type=(float, _NONE),
                    low=0.0, high=1.0)
    max_layer_error = option(None, "re-quantize at 8 bits every layer whose own output error "
                             "(relative L2 on the calibration inputs) exceeds this; the "
                             "layers kept at 8 bits are listed in stats['promoted']",
                             type=(float, _NONE), low=0.0, low_open=True)
    embeddings = option(True, "quantize embedding tables too")
    include = option(["*"], "glob patterns on weight or layer names to quantize")
    exclude = option([], "glob patterns to leave in float")

    def check_options(self) -> None:
        if self.granularity == "group" and self.group_size is None:
            raise OptionError(self.name, "group_size", "granularity=group needs group_size=N "
                              "(e.g. 64 or 128)")
        if self.group_size is not None and self.granularity != "group":
            raise OptionError(self.name, "group_size", "only applies with granularity=group")
        if self.scale is None:
            self.scale = "absmax" if self.bits == 8 else "mse"
            self.options["scale"] = self.scale
        if self.activations is None:
            self.activations = "none" if self.granularity == "group" else "dynamic"
            self.options["activations"] = self.activations
        if self.activations == "dynamic" and self.granularity == "group":
            raise OptionError(self.name, "activations", "dynamic int8 activations need one "
                              "weight scale per output channel (an integer matmul cannot apply "
                              "per-group scales); use activations=none with granularity=group")
        if self.scale == "unit" and (self.scheme != "symmetric" or self.granularity == "group"):
            raise OptionError(self.name, "scale", "scale=unit is round(w) with s = 1: use it "
                              "with scheme=symmetric and granularity channel or tensor")
        if self.smooth is not None and self.activations != "dynamic":
            raise OptionError(self.name, "smooth", "smoothing moves activation outliers into "
                              "the weights for int8 activations; it needs activations=dynamic")
        if self.smooth is not None and self.scale == "unit":
            raise OptionError(self.name, "smooth", "a smoothed weight needs a real scale, not scale=unit")

    def run(self, gm, ctx: PassContext) -> PassResult:
        kinds = [LINEAR, CONV] + ([EMBEDDING] if self.embeddings else [])
        all_ops = _weighted_ops(gm, kinds)
        chosen, unmatched = select(all_ops, self.include, self.exclude)
        check_glob_matches(self.name, unmatched, [op.name for op in all_ops])
        for op in chosen:
            cols = int(math.prod(op.weight().shape[1:]))
            if self.granularity == "group" and cols % self.group_size:
                raise OptionError(self.name, "group_size", f"{self.group_size} does not divide the "
                                  f"input width {cols} of layer '{op.module_name}' "
                                  f"({op.node.format_node()}); choose a divisor of {cols} or "
                                  f"exclude=['{op.module_name}']")
        batches = ctx.calibration or [ctx.example_inputs]
        rec = _record_inputs(gm, chosen, batches)

        # one module per distinct weight and kind; ops of one kind that share a weight
        # share its module's buffers, and a weight tied between an embedding and a linear
        # (GPT-2's) gets one module of each kind over the same codes and scales
        built: dict[tuple[str, str], QuantizedWeight] = {}
        codes: dict[tuple, tuple] = {}
        layers: dict[str, dict] = {}
        promoted: list[str] = []
        readers = Counter(op._input for op in chosen if isinstance(op._input, torch.fx.Node))
        for op in chosen:
            module = built.get((op.name, op.kind))
            if module is None:
                module = self._build(op, rec, codes=codes)
                built[(op.name, op.kind)] = module
            else:
                module = _share(module)
            x = rec.sample.get(op._input) if isinstance(op._input, torch.fx.Node) else None
            w, b = op.weight().detach(), op.bias()
            if op.name not in layers:
                layers[op.name] = self._layer_stats(op, module, w, b, x)
                if (self.max_layer_error is not None and self.bits < 8
                        and layers[op.name]["rel_error"] > self.max_layer_error):
                    # the most sensitive layers keep 8 bits (per channel: the integer
                    # kernel can still run them)
                    module = self._build(op, rec, bits=8, codes=codes)
                    built[(op.name, op.kind)] = module
                    layers[op.name] = dict(self._layer_stats(op, module, w, b, x),
                                           error_at_low_bits=layers[op.name]["rel_error"])
                    promoted.append(op.name)
            if isinstance(op._input, torch.fx.Node) and op._input in readers:
                readers[op._input] -= 1
                if not readers[op._input]:  # its last reader is built: drop the recorded input
                    rec.sample.pop(op._input, None)
                    rec.absmax.pop(op._input, None)
            op.replace_with(module)
        before = sum(v["bytes_before"] for v in layers.values())
        after = sum(v["bytes_after"] for v in layers.values())
        worst = max(layers, key=lambda k: layers[k]["rel_error"], default=None)
        return PassResult(gm, changed=bool(chosen), stats={
            "layers": layers, "quantized_layers": len(layers), "bits": self.bits,
            "bytes_before": before, "bytes_after": after,
            "worst_layer": worst, "promoted": promoted, "kernels": sorted({v["kernel"] for v in layers.values()})})

    def _build(self, op, rec: _InputRecorder, bits: int | None = None,
               codes: dict[tuple, tuple] | None = None) -> QuantizedWeight:
        """The module for ``op``; ``codes`` remembers each weight's quantisation by
        (weight, bits) so that modules of different kinds over one weight share it."""
        w = op.weight().detach().float()
        w2 = w.reshape(w.shape[0], -1)
        bits = bits or self.bits
        # a promoted layer (bits given) gets 8-bit channel scales and the integer kernel
        granularity = "channel" if bits != self.bits else self.granularity
        scale_mode = "absmax" if bits != self.bits else self.scale
        dynamic = op.kind == LINEAR and (self.activations == "dynamic" or bits != self.bits)
        smooth = None
        if dynamic and self.smooth is not None and op._input in rec.absmax:
            a = self.smooth
            xmax = rec.absmax[op._input].clamp(min=1e-5)
            wmax = w2.abs().amax(0).clamp(min=1e-5)
            smooth = (xmax.pow(a) / wmax.pow(1 - a)).clamp(min=1e-5)
            w2 = w2 * smooth
        key = (min(op.tied or (op.name,)), bits, tuple(w2.shape))  # the weight, however named
        if smooth is None and codes is not None and key in codes:
            stored, scale, zero = codes[key]
        else:
            stored, scale, zero = quantize_stored(w2, bits, self.scheme, granularity,
                                                  self.group_size or 0, scale=scale_mode)
            if smooth is None and codes is not None:  # a smoothed weight is the op's own
                codes[key] = (stored, scale, zero)
        args = (tuple(w.shape), stored, scale, zero, op.bias(), bits, self.scheme,
                granularity, (self.group_size or 0) if granularity == "group" else 0)
        if op.kind == LINEAR:
            return QuantizedLinear(*args, activations="dynamic" if dynamic else "none",
                                   smooth=smooth, stored=True)
        if op.kind == CONV:
            return QuantizedConv(op.spec, *args, stored=True)
        return QuantizedEmbedding(op.spec, *args, stored=True)

    @staticmethod
    def _layer_stats(op, module: QuantizedWeight, w, b, x) -> dict:
        """Bits, bytes and the layer's own output error on a calibration sample."""
        bytes_before = w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
        err = float("nan")
        if x is not None:
            with torch.no_grad():
                ref = op_forward(op.kind, op.spec, x, w, b)
                out = module(x)
                denom = float(ref.double().norm())
                err = float((out.double() - ref.double()).norm()) / denom if denom > 0 else 0.0
        kernel = "decode+float"
        if op.kind == LINEAR and module.activations == "dynamic":
            kernel = _available_backends()[0]
        elif op.kind == EMBEDDING:
            kernel = "gather+decode"
        return {"kind": op.kind, "bits": module.bits, "granularity": module.granularity,
                "activations": module.activations if op.kind == LINEAR else "none",
                "kernel": kernel, "smoothed": module.smooth is not None,
                "bytes_before": bytes_before, "bytes_after": stored_bytes(module),
                "rel_error": err}


def _share(module: QuantizedWeight) -> QuantizedWeight:
    """A second module object over the same buffers (a weight tied between two ops)."""
    return type(module).from_state(module.config(), dict(module.named_buffers()))


__all__ = ["Quantize", "QuantizedWeight", "QuantizedLinear", "QuantizedConv",
           "QuantizedEmbedding", "quantize_weight", "quantize_stored", "dequantize_weight",
           "store_codes",
           "load_codes", "code_range", "quantize_per_token", "per_token_absmax",
           "int8_backend", "INT8_BACKENDS", "RUNTIME_MODULES"]
