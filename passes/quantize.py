"""quantize: store weights as packed integers with a scale per channel, tensor or group.

``quantize{bits=8}`` rewrites every linear, conv and embedding into a runtime module that
stores ``q = clamp(round(w / s))`` (symmetric) or ``q = clamp(round(w / s) + z)`` (affine,
with an integer zero point ``z``), packed at its real width (int8 as int8, 4-bit two per
byte, 3/5/6/7-bit through :func:`~fxpress.graph.packing.pack_bits`), plus the scales
and the bias. Decoding is ``w ≈ s · (q - z)``; ``scale="unit"`` is the seed article's
``round(w)`` (s = 1). Zeros stay exactly zero in both schemes (``z`` is an integer).

Linear layers with ``activations="dynamic"`` run as an integer matmul with the input
quantised to 8 bits at run time, in one of two ways chosen per layer (``act_scale``):
``"tensor"``, one affine scale for the whole input (three elementwise passes; layers that
read one input, such as q, k and v, share one quantisation of it), or ``"token"``, one
scale per row, so an outlier in one token does not flatten the others (two more passes
over the input and one over the output). Where a few input *channels* carry outliers
(after LayerNorm in BERT), SmoothQuant-style migration (``smooth``) divides them out of
the input and into the weight (one more pass). ``act_scale="auto"`` (the default)
measures, per layer on the calibration inputs, the output error of per-tensor, smoothed
per-tensor and per-token activations, and keeps the cheapest whose error is at most
``act_error`` (or within :data:`AUTO_SLACK` of the best); the stats show every
candidate's error. The integer product runs in oneDNN's int8 linear (AMX/VNNI), else
fbgemm's, else ``torch._int_mm``, else a float64 reference.

Weight-only layers (``activations="none"``, convs, embeddings) decode their weight on
the fly (embeddings decode only the rows they look up). Weight-only linear layers also
try activation-aware scaling (AWQ-style: input columns that carry large activations get
finer steps, folded back when the weight is decoded) and keep the most faithful.

>>> res = fxpress.compress(model, "quantize{bits=8}", calibration=batches)     # doctest: +SKIP
>>> res.records[0].stats["layers"]["fc1.weight"]                               # doctest: +SKIP
{'kind': 'linear', 'bits': 8, 'kernel': 'onednn', 'act_scale': 'tensor', 'rel_error': 0.0042,
 'act_errors': {'tensor': 0.0042, 'tensor+smooth0.5': 0.0051, ...}, 'bytes_after': 19400, ...}

Fine-tuning (the distill pass's recovery step): :meth:`QuantizedWeight.begin_training`
adds a float latent weight used through a straight-through estimator, so every forward
in training stays on the quantisation grid; :meth:`QuantizedWeight.end_training`
re-quantises it into the packed storage with the same scales and drops it.
"""
from __future__ import annotations

import contextlib
import math
import operator
import os
import threading
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
#: Layers with fewer input or output features than this skip the oneDNN kernel (see
#: :meth:`QuantizedLinear.kernels`; on the 64-300-100-10 digits MLP it was 1.3x slower
#: than fbgemm, on MiniLM's 384/1536-wide layers 1.2x faster).
ONEDNN_MIN_WIDTH = 256
#: Order in which dynamic int8 linear kernels are tried; the first that works is used
#: (oneDNN's, which Inductor uses for x86 int8 and which runs on AMX/VNNI, takes
#: symmetric weights only; layers with affine weights start at fbgemm).
INT8_BACKENDS = ("onednn", "fbgemm", "int_mm", "reference")
_backend_override: list[str] = []
_broken: set[str] = set()
_prepacked: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def int8_backend(name: str) -> Iterator[None]:
    """Force one dynamic int8 kernel in the block ("onednn", "fbgemm", "int_mm" or
    "reference").

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
    if ("onednn" not in _broken and hasattr(torch.ops, "onednn")
            and hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available()):
        out.append("onednn")
    if "fbgemm" not in _broken and hasattr(torch.ops.quantized, "linear_dynamic"):
        out.append("fbgemm")
    if "int_mm" not in _broken and hasattr(torch, "_int_mm"):
        out.append("int_mm")
    out.append("reference")
    return out


def quantize_per_tensor(x2: torch.Tensor, levels: int = 255, signed: bool = True,
                        col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """Affine 8-bit codes of all of ``x2`` with one scale, as fbgemm's dynamic linear
    quantises its input: the range ``[min(x, 0), max(x, 0)]`` in ``levels`` steps with an
    integer zero point, so ``x ≈ scale · (codes - zero)``. ``signed``: codes and zero
    point shifted by -128 into int8 (for ``torch._int_mm``); else uint8 (oneDNN's input).
    Returns ``(codes, scale, zero)``; rounds half up.

    ``col_scale`` (positive, one per column): quantise ``x2 · col_scale`` (SmoothQuant's
    ``x / s``) without building it: the range comes from per-column minima and maxima.

    Three passes over ``x2``: ``x/scale + zero`` lies in ``[0, levels]`` (up to float
    rounding), so adding 0.5 and truncating in the conversion to uint8 rounds it with no
    clamp pass.
    """
    if col_scale is None:
        lo, hi = torch.aminmax(x2)
    else:
        # amin/amax along dim 0 are ~7x faster here than aminmax(dim=0)
        lo, hi = (x2.amin(0) * col_scale).min(), (x2.amax(0) * col_scale).max()
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / levels, 1e-12)
    zero = min(max(round(-lo / scale), 0), levels)
    if col_scale is None:
        q = torch.add(torch.tensor(zero + 0.5), x2, alpha=1.0 / scale)
    else:
        q = torch.addcmul(torch.tensor(zero + 0.5), x2, col_scale / scale)
    if signed:
        return q.floor_().clamp_(0, levels).sub_(128).to(torch.int8), scale, zero - 128
    return q.to(torch.uint8), scale, zero


_local = threading.local()
_ROUNDED_ZERO = torch.tensor(128.5)


def _shared_input(x2: torch.Tensor, source: torch.Tensor | None, signed: bool
                  ) -> tuple[torch.Tensor, float, int]:
    """:func:`quantize_per_tensor` of ``x2``, reused when the previous layer quantised the
    very same input (q, k and v of an attention block read one LayerNorm output).

    ``source`` is the layer's input tensor, given only by layers the quantize pass marked
    ``shares_input`` (their input node has no in-place users); the codes are reused while
    it is the same live object at the same version. One entry per thread.
    """
    hit = getattr(_local, "last", None)
    if source is not None and hit is not None:
        ref, version, was_signed, value = hit
        if ref() is source and was_signed == signed and (
                version is None or version == source._version):
            return value
    value = quantize_per_tensor(x2, 255, signed)
    if source is not None:
        version = None if source.is_inference() else source._version
        _local.last = (weakref.ref(source), version, signed, value)
    return value


def _smoothed(x2: torch.Tensor, inv: torch.Tensor | None) -> torch.Tensor:
    """``x2`` with its columns divided by the smoothing factors (``inv`` = their inverses)."""
    return x2 if inv is None else x2 * inv


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
    #: how a dynamic linear quantises its input: "token" (a scale per row) or "tensor"
    #: (one affine scale); artifacts written before the option existed are per-token
    act_scale = "token"

    def __init__(self, kind: str, spec: dict, shape: tuple[int, ...], codes: torch.Tensor,
                 scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
                 bits: int, scheme: str, granularity: str, group_size: int = 0,
                 activations: str = "none", smooth: torch.Tensor | None = None,
                 act_scale: str = "token", stored: bool = False):
        super().__init__(kind, spec)
        self.act_scale = act_scale
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
                "group_size": self.group_size, "activations": self.activations,
                "act_scale": self.act_scale}

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
                + f", activations={self.activations}"
                + (f", act_scale={self.act_scale}" if self.activations == "dynamic" else ""))


class QuantizedLinear(QuantizedWeight):
    """A linear layer with integer weights.

    ``activations="dynamic"``: the input is quantised to 8 bits at run time, with one
    affine scale for the whole input (``act_scale="tensor"``) or one scale per row
    (``"token"``), and multiplied in integers by the first kernel of
    :data:`INT8_BACKENDS` that runs here (oneDNN, fbgemm, ``torch._int_mm``, or a float64
    reference of the same integer product). ``"none"``: the weight is decoded and
    multiplied in float.
    """

    #: set by the quantize pass when the input node has no in-place users, so layers
    #: reading one input (q, k, v) may reuse its per-tensor codes (:func:`_shared_input`)
    shares_input = False

    def __init__(self, *args: Any, shares_input: bool = False, **kwargs: Any):
        super().__init__(LINEAR, {}, *args, **kwargs)
        self.shares_input = bool(shares_input)

    def config(self) -> dict:
        return {**super().config(), "shares_input": self.shares_input}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations != "dynamic" or self._training_path() or x.requires_grad:
            return F.linear(x, self.weight_float(), self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        source = x if self.shares_input and self.act_scale == "tensor" else None
        # smoothing divides the input's columns by ``smooth``: the kernels multiply by its
        # inverse, folded into the quantisation where they can (per-tensor scales)
        inv = None if self.smooth is None else self.smooth.reciprocal()
        if inv is not None:
            source = None
        if x2.dtype != torch.float32:
            x2, source = x2.float(), None
        for backend in self.kernels():
            try:
                y = getattr(self, f"_mm_{backend}")(x2, source, inv)
                break
            except (RuntimeError, NotImplementedError):
                if _backend_override or backend == "reference":
                    raise
                _broken.add(backend)  # the operator is missing or refuses: try the next
        return y.to(x.dtype).reshape(*shape[:-1], -1)

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

    def _int8_weight_sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`_int8_weight` and each code row's sum (what removing an input zero point
        needs), summed a block of rows at a time: ``sum(dtype=int32)`` converts the whole
        tensor first, a 4x copy of the codes (150 MB on GPT-2's head)."""
        codes, scale, zero = self._int8_weight()
        rowsum = torch.empty(codes.shape[0], dtype=torch.int32)
        step = max(1, (1 << 20) // max(codes.shape[1], 1))
        for start in range(0, codes.shape[0], step):
            torch.sum(codes[start:start + step], 1, dtype=torch.int32, out=rowsum[start:start + step])
        return codes, scale, zero, rowsum

    def _cached(self, backend: str, build):
        bias = self.bias  # fbgemm's per-tensor prepack holds a copy of it
        key = (backend, self.act_scale, self.qweight.data_ptr(), self.qweight._version,
               self.scale._version, id(bias),
               None if bias is None or bias.is_inference() else bias._version)
        hit = _prepacked.get(self)
        if hit is None or hit[0] != key:
            hit = (key, build())
            if caches_enabled():
                _prepacked[self] = hit
        return hit[1]

    def kernels(self) -> list[str]:
        """The dynamic int8 kernels this layer tries, in order. oneDNN's needs symmetric
        weights, and only pays off on wide layers: it takes the input already quantised,
        and the three elementwise passes that does cost more than its faster matmul saves
        when the layer is narrow (fbgemm quantises inside its kernel)."""
        kernels = _available_backends()
        if kernels[0] == "onednn" and not _backend_override and (
                self.zero_point is not None or min(self.shape[0], self.cols) < ONEDNN_MIN_WIDTH):
            return kernels[1:]
        return kernels

    def _packed_product(self, backend: str, build, apply) -> torch.Tensor:
        """``apply(packed, rows)`` over the prepacked weight ``build(weight, rows)``: cached
        whole, or, when runtime caches are off and the weight is large, prepacked a block
        of output channels at a time and dropped (a language model's head is never copied
        whole for one call); channels are independent, so the result is the same."""
        rows, cols = self.shape[0], self.cols
        if caches_enabled() or _prepacked.get(self) is not None or rows * cols <= 1 << 22:
            return apply(self._cached(backend, build), slice(None))
        step = max(1, (1 << 20) // max(cols, 1))
        weight = self._int8_weight()
        y = None
        for start in range(0, rows, step):
            block = slice(start, start + step)
            part = apply(build(weight, block), block)
            if y is None:
                y = part.new_empty((part.shape[0], rows))
            y[:, block] = part
        return y

    def _mm_onednn(self, x2: torch.Tensor, source: torch.Tensor | None,
                   inv: torch.Tensor | None) -> torch.Tensor:
        if self.zero_point is not None:
            raise NotImplementedError("oneDNN's int8 linear takes symmetric weights only")

        def build(weight=None, rows: slice = slice(None)):
            wq, scale, _ = weight or self._int8_weight()
            return (torch.ops.onednn.qlinear_prepack(wq[rows], None),
                    scale[rows].float().contiguous(), torch.zeros(len(scale[rows]), dtype=torch.long))

        if self.act_scale == "tensor":
            xq, sx, zx = (_shared_input(x2, source, signed=False) if inv is None else
                          quantize_per_tensor(x2, 255, signed=False, col_scale=inv))
            bias = self.bias
            return self._packed_product("onednn", build, lambda p, rows: (
                torch.ops.onednn.qlinear_pointwise(xq, sx, zx, p[0], p[1], p[2],
                                                   None if bias is None else bias[rows],
                                                   1.0, 0, torch.float32, "none", [], "")))
        x2 = _smoothed(x2, inv)
        # per token: each row divided by its absmax spans [-1, 1], one fixed scale 1/127;
        # 128.5 + 127·x/amax lies in [1.5, 255.5], so truncating to uint8 rounds it
        amax = per_token_absmax(x2)
        xq = torch.addcmul(_ROUNDED_ZERO, x2, 127.0 / amax).to(torch.uint8)
        y = self._packed_product("onednn", build, lambda p, rows: (
            torch.ops.onednn.qlinear_pointwise(xq, 1.0 / 127, 128, p[0], p[1], p[2], None,
                                               1.0, 0, torch.float32, "none", [], "")))
        if self.bias is None:
            return y.mul_(amax)
        return torch.addcmul(self.bias, y, amax, out=y)

    def _mm_fbgemm(self, x2: torch.Tensor, source: torch.Tensor | None,
                   inv: torch.Tensor | None) -> torch.Tensor:
        per_tensor = self.act_scale == "tensor"
        x2 = _smoothed(x2, inv)  # fbgemm quantises inside its kernel: smooth first

        def build(weight=None, rows: slice = slice(None)):
            wq, scale, zero = weight or self._int8_weight()
            zp = torch.zeros(len(scale), dtype=torch.long) if zero is None else zero.long()
            bias = self.bias[rows] if per_tensor and self.bias is not None else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized-tensor creation warns of deprecation
                qw = torch._make_per_channel_quantized_tensor(wq[rows], scale[rows].double(),
                                                              zp[rows], 0)
                return torch.ops.quantized.linear_prepack(qw, bias)

        if per_tensor:  # fbgemm quantises the input with one affine scale and adds the bias
            return self._packed_product("fbgemm", build, lambda p, rows: (
                torch.ops.quantized.linear_dynamic(x2, p, _REDUCE_RANGE)))
        # dividing each row by its own absmax first makes fbgemm's one scale a per-token
        # one (every row then spans [-1, 1])
        amax = per_token_absmax(x2)
        xs = x2 / amax
        y = self._packed_product("fbgemm", build, lambda p, rows: (
            torch.ops.quantized.linear_dynamic(xs, p, _REDUCE_RANGE)))
        if self.bias is None:
            return y.mul_(amax)
        return torch.addcmul(self.bias, y, amax, out=y)

    def _quantize_input(self, x2: torch.Tensor, source: torch.Tensor | None,
                        inv: torch.Tensor | None):
        """int8 codes of the (smoothed) input, their scale ([rows, 1] or 0-d) and zero point
        (or None)."""
        if self.act_scale == "tensor":
            xq, sx, zx = (_shared_input(x2, source, signed=True) if inv is None else
                          quantize_per_tensor(x2, 255, signed=True, col_scale=inv))
            return xq, torch.tensor(sx), torch.tensor(zx, dtype=torch.int32)
        xq, sx = quantize_per_token(_smoothed(x2, inv))
        return xq, sx, None

    def _finish(self, acc: torch.Tensor, xq: torch.Tensor, sx: torch.Tensor,
                zx: torch.Tensor | None, sw: torch.Tensor, zw: torch.Tensor | None,
                rowsum: torch.Tensor) -> torch.Tensor:
        """Scale an integer product ``xq @ wq.T`` into the output, removing the zero points:
        sum (x - zx)(w - zw) = sum x·w - zw·sum x - zx·sum (w - zw)."""
        if zw is not None:
            acc = acc - xq.sum(1, keepdim=True, dtype=acc.dtype) * zw.to(acc.dtype)
            rowsum = rowsum - xq.shape[1] * zw
        if zx is not None:
            acc = acc - zx.to(acc.dtype) * rowsum.to(acc.dtype)
        if self.bias is None:
            return acc * (sx * sw)
        bias = self.bias.double() if acc.dtype == torch.float64 else self.bias
        return torch.addcmul(bias, acc, sx * sw)

    def _mm_int_mm(self, x2: torch.Tensor, source: torch.Tensor | None,
                   inv: torch.Tensor | None) -> torch.Tensor:
        wq, sw, zw, rowsum = self._cached("int_mm", self._int8_weight_sums)
        xq, sx, zx = self._quantize_input(x2, source, inv)
        return self._finish(torch._int_mm(xq, wq.t()), xq, sx, zx, sw, zw, rowsum)

    def _mm_reference(self, x2: torch.Tensor, source: torch.Tensor | None,
                      inv: torch.Tensor | None) -> torch.Tensor:
        wq, sw, zw, rowsum = self._int8_weight_sums()
        xq, sx, zx = self._quantize_input(x2, source, inv)
        # float64 holds every int8 x int8 sum exactly
        acc = (xq.double() @ wq.double().t()).round_()
        y = self._finish(acc, xq, sx.double(), zx, sw.double(), zw, rowsum)
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
    activations = option("auto", "'dynamic': linear layers quantise their input to 8 bits at "
                         "run time and multiply in integers; 'none': weight-only (decode, float "
                         "matmul); 'auto': dynamic, or none with granularity=group",
                         choices=("auto", "dynamic", "none"))
    scale = option(None, "'absmax': scale from each channel/group's full range; 'mse': the "
                   "clipped range with the least squared error; 'unit': s = 1, the seed article's "
                   "round(w). Default: absmax at 8 bits, mse below", type=(str, _NONE),
                   choices=("absmax", "mse", "unit", None))
    smooth = option(None, "SmoothQuant migration strength alpha in [0, 1] for dynamic linear "
                    "layers: divides input columns by absmax(x)^a / absmax(w)^(1-a) measured on "
                    "the calibration batches, and multiplies the weight by it", type=(float, _NONE),
                    low=0.0, high=1.0)
    act_scale = option("auto", "how dynamic linear layers quantise their input at run time: "
                       "'tensor' (one affine scale: the fastest), 'token' (a scale per row), or "
                       "'auto': per layer, the cheapest of per-tensor, smoothed per-tensor and "
                       "per-token whose output error on the calibration inputs is at most "
                       "act_error (else within AUTO_SLACK of the best); "
                       "stats['layers'][...]['act_errors'] lists every candidate's error",
                       choices=("auto", "tensor", "token"))
    act_error = option(0.03, "with act_scale=auto: the layer output error (relative L2) up to "
                       "which the cheapest activation scaling is good enough; lower it for "
                       "fidelity, raise it for speed", type=float, low=0.0)
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
        if self.activations == "auto":
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
        if self.act_scale != "auto" and self.activations != "dynamic":
            raise OptionError(self.name, "act_scale", "chooses how int8 activations are "
                              "scaled; it needs activations=dynamic")
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
            x = rec.sample.get(op._input) if isinstance(op._input, torch.fx.Node) else None
            module = built.get((op.name, op.kind))
            if module is not None:
                module = _share(module)
            else:
                module, stats = self._choose(op, rec, x, self.bits, codes)
                if (self.max_layer_error is not None and self.bits < 8
                        and stats["rel_error"] > self.max_layer_error):
                    # the most sensitive layers keep 8 bits (per channel: the integer
                    # kernel can still run them)
                    low = stats["rel_error"]
                    module, stats = self._choose(op, rec, x, 8, codes)
                    stats["error_at_low_bits"] = low
                    promoted.append(op.name)
                built[(op.name, op.kind)] = module
                layers[op.name] = stats
                if len(op.tied) == 1:  # only a tied weight's other ops can reuse its codes
                    for key in [k for k in codes if k[0] == op.name]:
                        del codes[key]
            del x
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

    def _dynamic(self, op, bits: int) -> bool:
        # a promoted layer (bits != self.bits) gets 8-bit channel scales and the integer kernel
        return op.kind == LINEAR and (self.activations == "dynamic" or bits != self.bits)

    def _candidates(self, op, bits: int) -> list[tuple[str, float | None]]:
        """(act_scale, smoothing alpha) variants for one layer, cheapest first. A weight
        tied to another op (GPT-2's head and token embedding) is never smoothed: its
        codes are shared, and a smoothed copy would be stored beside them."""
        cands = self._all_candidates(op, bits)
        if len(op.tied) > 1:
            cands = [c for c in cands if c[1] is None] or cands
        return cands

    def _all_candidates(self, op, bits: int) -> list[tuple[str, float | None]]:
        if not self._dynamic(op, bits):
            # weight-only: activation-aware scaling (AWQ-style) costs nothing at run time,
            # since the weight is decoded anyway: try it on linear layers
            if op.kind == LINEAR and self.act_scale == "auto" and self.smooth is None:
                return [("token", None)] + [("token", a) for a in WEIGHT_ONLY_ALPHAS]
            return [("token", None)]
        alphas = [self.smooth] if self.smooth is not None else [None]
        if self.act_scale != "auto":
            return [(self.act_scale, alphas[0])]
        if self.smooth is None:
            return [("tensor", None)] + [("tensor", a) for a in AUTO_ALPHAS] + [("token", None)]
        return [("tensor", self.smooth), ("token", self.smooth)]

    def _choose(self, op, rec: _InputRecorder, x: torch.Tensor | None, bits: int,
                codes: dict[tuple, tuple]) -> tuple[QuantizedWeight, dict]:
        """The layer's runtime module and its stats: with several candidates, the cheapest
        whose output error on the calibration sample ``x`` is at most ``act_error`` or
        within :data:`AUTO_SLACK` of the best (per-token, the safest, when there is no
        sample)."""
        w, b = op.weight().detach(), op.bias()
        cands = self._candidates(op, bits)
        if x is not None and op.kind != EMBEDDING and x.shape[0] * w.shape[0] > CANDIDATE_OUTPUTS:
            # a wide layer (a language model's head) is measured on fewer rows, so that the
            # candidates' outputs stay small
            x = x[:max(16, CANDIDATE_OUTPUTS // w.shape[0])]
        if len(cands) > 1 and x is None:
            cands = [c for c in cands if c == ("token", self.smooth)]
        ref = None
        if x is not None:
            with torch.no_grad():
                ref = op_forward(op.kind, op.spec, x, w, b)
        tried = []
        for act, alpha in cands:
            module = self._build(op, rec, bits, act, alpha, codes)
            tried.append((module, _output_error(module, x, ref), act, alpha))
        best = min(t[1] for t in tried)
        # candidates of a weight-only layer cost the same: keep the best
        good = max(self.act_error, best * (1 + AUTO_SLACK)) if self._dynamic(op, bits) else best
        module, err, act, alpha = next(t for t in tried if not t[1] > good)
        stats = self._layer_stats(op, module, w, b, err)
        if len(tried) > 1:
            dynamic = self._dynamic(op, bits)
            stats["act_errors"] = {_label(a if dynamic else "weight", al): e for _, e, a, al in tried}
        if alpha is not None:
            stats["smooth_alpha"] = alpha
        return module, stats

    def _build(self, op, rec: _InputRecorder, bits: int, act: str = "token",
               alpha: float | None = None, codes: dict[tuple, tuple] | None = None
               ) -> QuantizedWeight:
        """The module for ``op`` with activation scaling ``act`` and smoothing ``alpha``;
        ``codes`` remembers each unsmoothed weight's quantisation by (weight, bits), so
        candidates and modules of different kinds over one weight share it."""
        w = op.weight().detach().float()
        w2 = w.reshape(w.shape[0], -1)
        granularity = "channel" if bits != self.bits else self.granularity
        scale_mode = "absmax" if bits != self.bits else self.scale
        dynamic = self._dynamic(op, bits)
        smooth = None
        if op.kind == LINEAR and alpha is not None and op._input in rec.absmax:
            a = alpha
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
            shares = (dynamic and smooth is None and isinstance(op._input, torch.fx.Node)
                      and _never_written(op.node.graph.owning_module, op._input))
            return QuantizedLinear(*args, activations="dynamic" if dynamic else "none",
                                   smooth=smooth, act_scale=act, shares_input=shares, stored=True)
        if op.kind == CONV:
            return QuantizedConv(op.spec, *args, stored=True)
        return QuantizedEmbedding(op.spec, *args, stored=True)

    @staticmethod
    def _layer_stats(op, module: QuantizedWeight, w, b, err: float) -> dict:
        """Bits, bytes, kernel and the layer's own output error on a calibration sample."""
        bytes_before = w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
        kernel = "decode+float"
        if op.kind == LINEAR and module.activations == "dynamic":
            kernel = module.kernels()[0]
        elif op.kind == EMBEDDING:
            kernel = "gather+decode"
        return {"kind": op.kind, "bits": module.bits, "granularity": module.granularity,
                "activations": module.activations if op.kind == LINEAR else "none",
                "act_scale": module.act_scale if module.activations == "dynamic" else None,
                "kernel": kernel, "smoothed": module.smooth is not None,
                "bytes_before": bytes_before, "bytes_after": stored_bytes(module),
                "rel_error": err}


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul,
                      operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.iconcat, operator.setitem, operator.delitem}
_READ_ONLY_MODULES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.modules.conv._ConvNd,
                      CompressedModule)


def _never_written(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """True when no user of ``node`` can write into its value in place (so layers that
    read it may share one quantisation of it)."""
    for user in node.users:
        t = user.target
        if user.op == "call_module":
            if not isinstance(gm.get_submodule(t), _READ_ONLY_MODULES):
                return False
        elif user.op in ("call_function", "call_method"):
            if user.kwargs.get("inplace") or "out" in user.kwargs:
                return False
            if isinstance(t, torch._ops.OpOverload):
                if t._schema.is_mutable:
                    return False
                continue
            name = t if isinstance(t, str) else getattr(t, "__name__", "")
            if name in ("setitem", "__setitem__") or t in _INPLACE_OPERATORS or (
                    name.endswith("_") and not name.endswith("__")):
                return False
    return True


#: Output values (rows x channels) a layer's candidates are measured on at most: a wide
#: layer (a language model's head) gets fewer calibration rows, so that the float and
#: candidate outputs held during the search stay a few MB.
CANDIDATE_OUTPUTS = 1 << 20
#: act_scale="auto" keeps the cheapest candidate whose error is at most (1 + AUTO_SLACK)
#: times the best candidate's.
AUTO_SLACK = 0.25
#: SmoothQuant strengths act_scale="auto" tries with per-tensor activations.
AUTO_ALPHAS = (0.5, 0.75)
#: Activation-aware scaling strengths tried on weight-only linear layers (the most
#: faithful on the calibration sample is kept).
WEIGHT_ONLY_ALPHAS = (0.25, 0.5)


def _label(act: str, alpha: float | None) -> str:
    return act if alpha is None else f"{act}+smooth{alpha:g}"  # e.g. tensor+smooth0.5


def _output_error(module: QuantizedWeight, x: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """Relative L2 error of ``module(x)`` against the float layer's output ``ref``."""
    if x is None:
        return float("nan")
    with torch.no_grad():
        out = module(x)
        denom = float(torch.linalg.vector_norm(ref, dtype=torch.float64))
        err = float(torch.linalg.vector_norm(out.sub_(ref), dtype=torch.float64))
    return err / denom if denom > 0 else 0.0


def _share(module: QuantizedWeight) -> QuantizedWeight:
    """A second module object over the same buffers (a weight tied between two ops)."""
    return type(module).from_state(module.config(), dict(module.named_buffers()))


__all__ = ["Quantize", "QuantizedWeight", "QuantizedLinear", "QuantizedConv",
           "QuantizedEmbedding", "quantize_weight", "quantize_stored", "dequantize_weight",
           "store_codes", "load_codes", "code_range", "quantize_per_token", "quantize_per_tensor",
           "per_token_absmax", "AUTO_SLACK", "AUTO_ALPHAS", "WEIGHT_ONLY_ALPHAS",
           "int8_backend", "INT8_BACKENDS", "RUNTIME_MODULES"]
