"""The quantize pass's runtime modules: a linear, conv or embedding whose weight is stored
as packed integer codes and scales (:mod:`fxpress.passes.quantize_grid`), decoded on the
fly or multiplied in int8 (:mod:`fxpress.passes.int8`).

Artifacts name these classes ``fxpress.passes.quantize.<class>`` (where they were first
defined): ``__module__`` keeps that name, so old and new artifacts load alike.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from fxpress.graph.runtime import CompressedModule, StateCheck, op_forward
from fxpress.graph.weights import CONV, EMBEDDING, LINEAR
from fxpress.graph.memory import caches_enabled
from fxpress.passes.decode import AUTO_INT8_MIN_WORK, DecodeStrategy, small_calls_in_float
from fxpress.passes.int8 import Int8Kernels, _backend_override, _prepacked
from fxpress.passes.quantize_grid import (code_range, dequantize_weight, from_groups, group_count,
                                          load_codes, store_codes, to_groups)

#: the module the artifact format names these classes by
ARTIFACT_MODULE = "fxpress.passes.quantize"

#: the least smoothing factor the quantize pass writes (it clamps to it): the loader
#: refuses smaller ones
SMOOTH_MIN = 1e-5


class QuantizedWeight(DecodeStrategy, CompressedModule):
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

    def check_state(self, check: StateCheck) -> None:
        """Also refuse what the quantize pass never writes (bits outside 2-8: bits=2**40
        loaded, then its first call never returned), codes of another size than ``bits``
        and ``shape`` give, and scales, zero points, smoothing or a bias that do not fit the
        weight: the native int8 kernels read one scale per output channel, and oneDNN's
        read past a shorter tensor (a crafted file's 2 scales for 256 channels gave
        outputs of 1e33)."""
        super().check_state(check)
        bits = check.integer("bits", 2, 8)
        scheme = check.choice("scheme", ("symmetric", "affine"))
        check.choice("activations", ("none", "dynamic"))
        check.choice("act_scale", ("token", "tensor"))
        granularity = check.choice("granularity", ("tensor", "channel", "group"))
        group_size = check.integer("group_size", 1) if granularity == "group" else \
            check.integer("group_size", 0, 0)
        rows, cols = int(self.shape[0]), self.cols
        if bits == 8:
            check.tensor("qweight", dtypes=(torch.int8 if scheme == "symmetric" else torch.uint8,),
                         shape=[rows, cols])
        else:
            check.tensor("qweight", dtypes=(torch.uint8,), shape=[rows, -(-cols // 8) * bits])
        grid = {"tensor": [1, 1], "channel": [rows, 1],
                "group": [rows, group_count(cols, group_size)]}[granularity]
        check.tensor("scale", dtypes=(torch.float32,), shape=grid, positive=True)
        check.tensor("zero_point", dtypes=(torch.uint8,), shape=grid, optional=scheme != "affine")
        if scheme != "affine" and self.zero_point is not None:
            check.fail("tensor 'zero_point'", "is stored for a symmetric scheme")
        smooth = check.tensor("smooth", dtypes=(torch.float32,), shape=[cols], optional=True,
                              positive=True)
        # the stored weight is divided by it: a flipped exponent bit (1e-38) made every
        # output inf; the pass never writes one under SMOOTH_MIN
        if smooth is not None and bool((smooth < torch.tensor(SMOOTH_MIN)).any()):
            check.fail("tensor 'smooth'", f"holds factors under {SMOOTH_MIN}, the least the "
                       "quantize pass writes")
        check.tensor("bias", optional=True, dtypes=(torch.float32,))

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
        return dequantize_weight(self.codes(), self.scale, self.zero(), self.group_size)

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
                                       zero[start:end] if per_row and zero is not None else zero,
                                       self.group_size)
                yield start, (w2 / self.smooth if self.smooth is not None else w2)

    # -- fine-tuning -------------------------------------------------------------------------
    def _snap(self, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, decoded) of ``w2`` on this module's fixed grid (its scales and zero
        points), both as float ``[rows, cols]``; no gradient."""
        lo, hi = code_range(self.bits, self.scheme)
        flat = w2.detach().reshape(self.scale.shape[0] if self.scale.shape[0] > 1 else 1, -1)
        g = to_groups(flat, self.scale.shape[1], self.group_size)
        s = self.scale.unsqueeze(-1)
        z = self.zero()
        zz = 0.0 if z is None else z.unsqueeze(-1).float()
        q = torch.clamp(torch.round(g / s) + zz, lo, hi)
        cols = flat.shape[1]
        return (from_groups(q, cols).reshape(w2.shape),
                from_groups((q - zz) * s, cols).reshape(w2.shape))

    def _on_grid(self, w2: torch.Tensor) -> torch.Tensor:
        """Straight-through fake quantisation of ``w2`` on this module's fixed grid."""
        return w2 + (self._snap(w2)[1] - w2).detach()

    def begin_training(self) -> list[torch.nn.Parameter]:
        """Add a float latent weight (``latent``, the decoded weight) and make the bias
        trainable; return both for an optimizer. Forward then snaps the latent onto the
        stored grid (same scales and zero points) with a straight-through estimator, so
        what is trained is exactly what :meth:`end_training` will store."""
        if getattr(self, "latent", None) is None:
            w2 = dequantize_weight(self.codes(), self.scale, self.zero(), self.group_size)
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
            q = self._snap(self.keep_zeros(latent.detach()))[0]
            self.qweight = store_codes(q.to(torch.int32), self.bits, self.scheme)
        del self.latent
        if isinstance(self.bias, torch.nn.Parameter):
            bias = self._parameters.pop("bias")
            self.register_buffer("bias", bias.detach())
        _prepacked.pop(self, None)
        self.drop_cache()

    def _training_path(self) -> bool:
        return getattr(self, "latent", None) is not None

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, shape={tuple(self.shape)}, bits={self.bits}, "
                f"scheme={self.scheme}, granularity={self.granularity}"
                + (f", group_size={self.group_size}" if self.granularity == "group" else "")
                + f", activations={self.activations}"
                + (f", act_scale={self.act_scale}" if self.activations == "dynamic" else ""))


class QuantizedLinear(Int8Kernels, QuantizedWeight):
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

    _op_kind = LINEAR

    def __init__(self, *args: Any, shares_input: bool = False, **kwargs: Any):
        super().__init__(LINEAR, {}, *args, **kwargs)
        self.shares_input = bool(shares_input)

    def check_state(self, check: StateCheck) -> None:
        super().check_state(check)
        check.flag("shares_input")

    def config(self) -> dict:
        return {**super().config(), "shares_input": self.shares_input}

    def native_int8(self) -> bool:
        return self.activations == "dynamic"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the common case first, in the fewest Python steps (at batch 1 each call's
        # matmul takes tens of microseconds): stored int8 codes, no parameter (neither
        # fine-tuned nor trained), the int8 path chosen already. _small_call_ok before the
        # size test: compiled, the size test made Dynamo guard on the batch (a second graph)
        d = self.__dict__
        if (not self._parameters and self.activations == "dynamic" and not x.requires_grad
                and d.get("_decode_path") == "int8"):
            if self._small_call_ok(x) and x.numel() < d.get("_float_below", 0):
                return F.linear(x, self._small_call_weight(), self._buffers["bias"])
            return self.int8_forward(x)
        if self._training_path() or x.requires_grad:
            return op_forward(LINEAR, self.spec, x, self.weight_float(), self.bias)
        if self.decode_path() == "int8":
            if self.activations != "dynamic":  # other weights run through their int8 twin
                return self._twin().int8_forward(x)
            if self._small_call_ok(x) and x.numel() < d.get("_float_below", 0):
                return F.linear(x, self._small_call_weight(), self.bias)
            return self.int8_forward(x)
        return op_forward(LINEAR, self.spec, x, self.dense_weight(), self.bias)

    def _choose_path(self) -> str:
        path = super()._choose_path()
        self.__dict__["_float_below"] = self.float_call_below() if path == "int8" else 0
        return path

    def float_call_below(self) -> int:
        """The input size (elements) below which ``auto`` runs a call of this layer in
        float, from a copy decoded once: its work ``max(rows, 4) x in x out`` is below
        AUTO_INT8_MIN_WORK. 0: never (a strategy other than ``auto``, a layer too large, or
        activations not dynamic). The compiled form takes the same rule, decided per call
        (:func:`~fxpress.passes.int8_traced.traced_int8_linear`)."""
        out, cols = int(self.shape[0]), self.cols
        small = (self.native_int8() and self._requested() == "auto"
                 and 4 * cols * out < AUTO_INT8_MIN_WORK)
        return -(-AUTO_INT8_MIN_WORK // out) if small else 0

    @staticmethod
    def _small_call_ok(x: torch.Tensor) -> bool:
        """Whether a small call (see :meth:`_choose_path`) may run in float: a float32
        input, runtime caches on, no kernel forced by :func:`~fxpress.passes.int8.
        int8_backend`, not inside :func:`~fxpress.passes.decode.int8_kernels_only`, not
        under ``torch.compile`` (one graph for every batch size)."""
        # compiling first: the rest is then never read while Dynamo traces (it guarded
        # the int8_backend override, and a model compiled inside one compiled again outside)
        return (not torch.compiler.is_compiling() and x.dtype == torch.float32
                and not _backend_override and caches_enabled() and small_calls_in_float())

    def _small_call_weight(self) -> torch.Tensor:
        """The float weight of a small call, decoded at the first such call and kept as a
        run-time cache (never in ``state_dict``; dropped with the other caches, decoded
        again when the stored tensors are written)."""
        ids, versions, tensors = self._weight_state()  # every buffer, the zero point too
        held = self.__dict__.get("small_call_weight")
        if held is None or held[0] != (ids, versions):
            with torch.no_grad():
                held = self.__dict__["small_call_weight"] = ((ids, versions), self.weight_float(),
                                                             tensors)
        return held[1]

    def drop_cache(self) -> None:
        super().drop_cache()
        for key in ("small_call_weight", "_float_below"):
            self.__dict__.pop(key, None)


class QuantizedConv(QuantizedWeight):
    """A conv with integer weights, decoded on the fly (weight-only)."""

    _op_kind = CONV

    def __init__(self, spec: dict, *args: Any, **kwargs: Any):
        super().__init__(CONV, spec, *args, **kwargs)


class QuantizedEmbedding(QuantizedWeight):
    """An embedding table with integer rows; a lookup decodes only the rows it reads."""

    _op_kind = EMBEDDING

    def __init__(self, spec: dict, *args: Any, **kwargs: Any):
        super().__init__(EMBEDDING, spec, *args, **kwargs)

    def gathers_rows(self) -> bool:
        return self.granularity != "tensor" and self.smooth is None

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self._training_path() or self.decode_path() != "per_call" or not self.gathers_rows():
            return F.embedding(indices, self.dense_weight(), self.spec.get("padding_idx"))
        # indexing, then flattening the (contiguous) result: flattening the indices first
        # would make torch.compile specialise a batch of 1 (BERT's expanded token types)
        rows = self.qweight[indices].reshape(-1, self.qweight.shape[1])
        codes = load_codes(rows, self.bits, self.scheme, self.cols)
        zero = self.zero()
        out = dequantize_weight(codes, self.scale[indices].reshape(-1, self.scale.shape[1]),
                                None if zero is None else
                                zero[indices].reshape(-1, *zero.shape[1:]),
                                self.group_size)
        return out.reshape(*indices.shape, self.cols)


RUNTIME_MODULES = (QuantizedLinear, QuantizedConv, QuantizedEmbedding)
for _cls in RUNTIME_MODULES + (QuantizedWeight,):
    _cls.__module__ = ARTIFACT_MODULE


__all__ = ["QuantizedWeight", "QuantizedLinear", "QuantizedConv", "QuantizedEmbedding",
           "RUNTIME_MODULES"]
