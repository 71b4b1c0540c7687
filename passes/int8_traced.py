"""The dynamic int8 linear of :class:`~fxpress.passes.int8.Int8Kernels` as plain tensor ops,
for ``torch.compile`` (:func:`fxpress.compile`).

The eager kernels pick a backend at run time (probing, ``try``/``except``), keep prepacked
weights in a cache filled on the first call, reuse one input's codes between layers through
a thread-local and read scales with ``float()``: each of those breaks a graph. Here the
same arithmetic is written so that Dynamo traces it whole, with any batch size:

* the input is quantised in the graph, without leaving tensors (per token: symmetric
  codes of each row; per tensor: affine codes with one scale and zero point, signed as
  ``torch._int_mm`` takes them);
* the product is ``torch._int_mm(codes, weight.T)`` (aten's s8 x s8 kernel), its int32
  result multiplied by ``x_scale`` then ``w_scale`` with no separate float conversion:
  that conversion completes the pattern which Inductor's freezing rewrites into oneDNN's
  int8 linear, and oneDNN takes the signed input as it is - on CPUs without AMX through
  its reference kernel, 3-7 s a call for one MiniLM layer at batch 32 (the 607 s
  "compile" of MiniLM int8 measured before was mostly its first run);
* zero points (an affine input, affine weights) are removed afterwards, as
  :meth:`~fxpress.passes.int8.Int8Kernels._finish` removes them;
* q, k and v of an attention block quantise the same input three times in the graph;
  Inductor's common-subexpression elimination computes it once (what the eager
  ``shares_input`` cache does by hand).

The result equals the eager integer product up to float rounding (per-token codes are
exactly the eager ``int_mm``/``reference`` backends'; oneDNN's and fbgemm's eager paths
round their inputs slightly differently).
"""
from __future__ import annotations

import torch

__all__ = ["define_stored_op", "traced_int8_linear", "traced_quantize_per_tensor"]


def traced_quantize_per_tensor(x2: torch.Tensor, col_scale: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed affine codes of ``x2`` (times ``col_scale`` along its last axis) with one
    scale and zero point, as :func:`~fxpress.passes.int8.quantize_per_tensor` with
    ``signed=True``, computed in tensors: ``(codes int8, scale 0-d, zero 0-d float)``."""
    if col_scale is not None:
        x2 = x2 * col_scale
    zero_t = x2.new_zeros(())
    lo = torch.minimum(x2.amin(), zero_t)
    hi = torch.maximum(x2.amax(), zero_t)
    scale = ((hi - lo) / 255).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, 255)
    codes = torch.floor(x2 / scale + (zero + 0.5)).clamp(0, 255) - 128
    return codes.to(torch.int8), scale, zero - 128


def _product_weight(wq: torch.Tensor) -> torch.Tensor:
    """``wq.T`` as ``torch._int_mm`` takes it. Frozen (Inductor's ``freezing``, what
    :func:`fxpress.compile` sets by default) the weight is a constant and ``contiguous()``
    is folded at compile time into a ``[in, out]`` copy: oneDNN's s8 matmul behind
    ``_int_mm`` reads a transposed view 3-5x slower than that layout on MiniLM's layers at
    576 rows (384x1536: 5.7 ms against 1.7 ms, one thread). Not frozen, the view is kept
    (a copy would be made on every call)."""
    import torch._inductor.config as inductor_config

    return wq.t().contiguous() if inductor_config.freezing else wq.t()


_STORED: list = []


def _stored(x: torch.Tensor) -> torch.Tensor:
    """``x``, computed once into a buffer of its own when Inductor compiles it.

    The input is read twice (its range, then its codes), and Inductor recomputes a cheap
    elementwise producer in each reader instead of storing it: MiniLM's GELU (``erf``,
    which Inductor's store-or-recompute heuristic does not count as costly on CPU) ran
    twice per layer, where oneDNN applies it once inside torchao's matmul. This goes
    through ``fxpress::stored`` (:func:`define_stored_op`, which :func:`fxpress.compile`
    calls before tracing; without it ``x`` is read as it is)."""
    return _STORED[0](x) if _STORED else x


def define_stored_op() -> None:
    """Define ``fxpress::stored`` once per process: an identity op (a copy in eager and
    other backends, as a custom op may not alias its input) whose Inductor lowering only
    realizes its input. No layout is asked for, so no guard on the sizes: Inductor's
    ``inductor_force_stride_order`` compared the input's strides and guarded batch >= 2
    (MiniLM at batch 1 compiled a second graph, which hung in sympy)."""
    if _STORED:
        return

    @torch.library.custom_op("fxpress::stored", mutates_args=())
    def stored(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @stored.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    try:
        from torch._inductor.lowering import register_lowering
    except ImportError:  # no Inductor in this build: the copy is what runs
        pass
    else:
        @register_lowering(torch.ops.fxpress.stored.default, type_promotion_kind=None)
        def _lower(x):
            x.realize()
            return x

    _STORED.append(torch.ops.fxpress.stored.default)


def traced_int8_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a :class:`~fxpress.passes.quantize_modules.QuantizedLinear` with
    dynamic activations, in traceable tensor ops (see the module docstring)."""
    # quantised in the input's own shape, flattened after: the codes are a new contiguous
    # tensor, where flattening ``x`` itself (a view, an expanded tensor) would make
    # torch.compile specialise a batch of 1
    shape = x.shape
    xf = _stored(x if x.dtype == torch.float32 else x.float())
    inv = None if layer.smooth is None else layer.smooth.reciprocal()
    wq, sw, zw = layer._int8_weight()
    if layer.act_scale == "tensor":
        xq, sx, zx = traced_quantize_per_tensor(xf, inv)
    else:
        if inv is not None:
            xf = xf * inv
        amax = torch.maximum(xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True).neg()).clamp(min=1e-12)
        xq = torch.round(xf * (127.0 / amax)).to(torch.int8)
        sx, zx = (amax / 127.0).reshape(-1, 1), None
    xq = xq.reshape(-1, shape[-1])
    # int32 times the float scales, with no conversion node of its own: Inductor's freezing
    # rewrites mul(mul(float(_int_mm(x, w)), x_scale), w_scale) into oneDNN's int8 linear
    # with the signed input as it is, and on CPUs without AMX oneDNN runs signed 8-bit
    # inputs through its reference kernel (MiniLM's 384x384 layer on 640 rows: 3-7 s a
    # call, against 1 ms for aten's _int_mm, which this keeps)
    y = torch._int_mm(xq, _product_weight(wq)) * sx * sw
    if zw is not None or zx is not None:
        # sum (x - zx)(w - zw) = sum x·w - zw·sum x - zx·sum (w - zw)
        fix = 0
        rowsum = wq.sum(1, dtype=torch.int32).float()
        if zw is not None:
            zwf = zw.float()
            fix = xq.sum(1, keepdim=True, dtype=torch.int32).float() * zwf
            rowsum = rowsum - xq.shape[1] * zwf
        if zx is not None:
            fix = fix + zx * rowsum
        y = y - fix * sx * sw
    if layer.bias is not None:
        y = y + layer.bias
    return y.to(x.dtype).reshape(*shape[:-1], -1)
