"""The dynamic int8 linear of :class:`~fxpress.passes.int8.Int8Kernels` as plain tensor ops,
for ``torch.compile`` (:func:`fxpress.compile`).

The eager kernels pick a backend at run time (probing, ``try``/``except``), keep prepacked
weights in a cache filled on the first call, reuse one input's codes between layers through
a thread-local and read scales with ``float()``: each of those breaks a graph. Here the
same arithmetic is written so that Dynamo traces it whole, with any batch size:

* the input is quantised in the graph, without leaving tensors (per token: symmetric
  codes of each row; per tensor: affine codes with one scale and zero point);
* the product (:func:`choose_product`, fixed per compiled model): where oneDNN's int8
  linear runs, ``onednn::qlinear_pointwise`` on uint8 codes (:func:`_onednn_product`),
  the weight prepacked by ``fxpress::qlinear_prepack`` - with frozen weights, once, at
  compile time - and the weight scales (per tensor: the bias too) applied inside it;
  that is the kernel torchao's PT2E int8 runs. aten's ``torch._int_mm`` on an AVX2 CPU
  without VNNI ran 50-60x slower than it (MiniLM's 576x384x1536 product: 237 ms against
  4 ms, one thread). Elsewhere (no oneDNN, a kernel forced, Inductor without freezing)
  ``torch._int_mm(codes, weight.T)`` on signed codes, its int32 result multiplied by
  ``x_scale`` then ``w_scale`` with no separate float conversion: that conversion
  completes the pattern which Inductor's freezing rewrites into oneDNN's int8 linear
  with the signed input as it is - on CPUs without AMX its reference kernel, 3-7 s a
  call for one MiniLM layer at batch 32;
* zero points (an affine input, affine weights) are removed afterwards, as
  :meth:`~fxpress.passes.int8.Int8Kernels._finish` removes them;
* q, k and v of an attention block quantise the same input three times in the graph;
  Inductor's common-subexpression elimination computes it once (what the eager
  ``shares_input`` cache does by hand).

The ``_int_mm`` form equals the eager integer product of the ``int_mm``/``reference``
backends up to float rounding; the oneDNN form is the exact integer product of its own
uint8 codes (127 levels on CPUs without VNNI, see :func:`_onednn_product`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["choose_product", "define_stored_op", "define_traced_ops", "traced_int8_linear",
           "traced_product", "traced_quantize_per_tensor"]


def traced_quantize_per_tensor(x2: torch.Tensor, col_scale: torch.Tensor | None = None,
                               levels: int = 255, signed: bool = True
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine codes of ``x2`` (times ``col_scale`` along its last axis) with one scale and
    zero point over ``[min(x, 0), max(x, 0)]`` in ``levels`` steps, as
    :func:`~fxpress.passes.int8.quantize_per_tensor`, computed in tensors: ``(codes,
    scale 0-d, zero 0-d float)``. ``signed``: codes and zero shifted by -128 into int8
    (``torch._int_mm``'s input); else uint8 (oneDNN's)."""
    if col_scale is not None:
        x2 = x2 * col_scale
    zero_t = x2.new_zeros(())
    lo = torch.minimum(x2.amin(), zero_t)
    hi = torch.maximum(x2.amax(), zero_t)
    scale = ((hi - lo) / levels).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, levels)
    codes = torch.floor(x2 / scale + (zero + 0.5)).clamp(0, levels)
    if signed:
        return (codes - 128).to(torch.int8), scale, zero - 128
    return codes.to(torch.uint8), scale, zero


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


_PREPACK: list = []
#: the product the traced form writes, for the call being traced (:func:`traced_product`):
#: ("onednn", activation levels) or ("int_mm", 255)
#: (a plain list: Dynamo reads it while tracing and guards its value)
_PRODUCT: list = [None]


def _define_prepack_op() -> None:
    """``fxpress::qlinear_prepack``: oneDNN's weight prepack for its int8 linear, as an op
    Dynamo can trace (torch registers no fake kernel for ``onednn::qlinear_prepack``). Its
    fake result has the packed weight's sizes (``[in, out]``, what the fake kernel of
    ``onednn::qlinear_pointwise`` reads); frozen, Inductor's constant folding runs it once
    at compile time and the generated code holds the packed weight as a constant."""
    if _PREPACK or not hasattr(torch.ops.onednn, "qlinear_prepack"):
        return

    @torch.library.custom_op("fxpress::qlinear_prepack", mutates_args=())
    def qlinear_prepack(w: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qlinear_prepack(w, None)

    @qlinear_prepack.register_fake
    def _(w: torch.Tensor) -> torch.Tensor:
        return w.new_empty((w.shape[1], w.shape[0]))

    _PREPACK.append(torch.ops.fxpress.qlinear_prepack.default)


def define_traced_ops() -> None:
    """Define fxpress's custom ops for the traced form, once per process (``fxpress::stored``,
    ``fxpress::qlinear_prepack``); :func:`fxpress.compile` calls it before tracing."""
    define_stored_op()
    try:
        _define_prepack_op()
    except (AttributeError, RuntimeError):  # no oneDNN ops in this build: _int_mm it is
        pass


_ONEDNN_RUNS: list = []


def _onednn_runs() -> bool:
    """Whether oneDNN's int8 linear runs in this torch build on this CPU: a 4x4 product
    tried once per process against the exact one (a build without oneDNN, another
    architecture, an operator that raises: no)."""
    if not _ONEDNN_RUNS:
        ok = False
        if _PREPACK and torch.backends.mkldnn.is_available():
            try:
                w = torch.tensor([[1, -2, 3, -4], [5, 6, -7, 8]] * 2, dtype=torch.int8)
                x = torch.tensor([[0, 1, 2, 3], [127, 100, 3, 0]], dtype=torch.uint8)
                y = torch.ops.onednn.qlinear_pointwise.default(
                    x, 1.0, 0, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(4),
                    torch.zeros(4, dtype=torch.long), None, 1.0, 0, torch.float32, "none", [], "")
                ok = torch.equal(y, x.float() @ w.float().t())
            except (RuntimeError, NotImplementedError, AttributeError):
                ok = False
        _ONEDNN_RUNS.append(ok)
    return _ONEDNN_RUNS[0]


def choose_product(freeze: bool = True, backend: str = "inductor") -> tuple[str, int]:
    """The int8 product a model compiled now traces: oneDNN's int8 linear on uint8 codes
    where it runs (what torchao's PT2E int8 runs), else ``torch._int_mm``; a kernel forced
    with :func:`~fxpress.passes.int8.int8_backend` ("onednn", or any other for
    ``_int_mm``) is taken. The activation codes span 255 levels on CPUs with VNNI or AMX
    and 127 without (see :func:`_onednn_product`). Inductor without ``freeze`` keeps
    ``_int_mm``: its oneDNN lowering takes the prepacked weight only as a constant
    (generating code for a per-call prepack failed)."""
    from fxpress.passes.int8 import _REDUCE_RANGE, _backend_override

    forced = _backend_override[-1] if _backend_override else None
    if forced not in (None, "onednn") or not _onednn_runs() or (backend == "inductor" and not freeze):
        return ("int_mm", 255)
    return ("onednn", 127 if _REDUCE_RANGE else 255)


@contextlib.contextmanager
def traced_product(choice: tuple[str, int]) -> Iterator[None]:
    """Trace (and run) the int8 product ``choice`` (:func:`choose_product`) in this thread."""
    outer = _PRODUCT[0]
    _PRODUCT[0] = choice
    try:
        yield
    finally:
        _PRODUCT[0] = outer


def _onednn_product(layer, xf: torch.Tensor, inv: torch.Tensor | None, wq: torch.Tensor,
                    sw: torch.Tensor, levels: int) -> torch.Tensor:
    """``layer``'s product through oneDNN's int8 linear (``onednn::qlinear_pointwise``) on
    uint8 codes of ``xf``, its weight prepacked by ``fxpress::qlinear_prepack`` (frozen:
    once, at compile time), the weight scales and, per tensor, the bias applied inside it.

    On CPUs without VNNI oneDNN adds pairs of u8 x s8 products in int16 and saturates
    (a 384-wide row of codes 255 times weights 127 gave 6,291,264 instead of 12,435,840;
    full-range random codes were off by up to 11%), so there the codes span 127 levels
    (per token 64 +- 63), whose pairs stay below 2^15: the integer product is then exact,
    at half the activation resolution - what fbgemm's eager kernel (``reduce_range``)
    does on such CPUs. With VNNI or AMX oneDNN accumulates in int32 and the codes span
    255 levels, as eager oneDNN's."""
    rows = xf.shape[-1]
    wzp = torch.zeros(wq.shape[0], dtype=torch.long)
    packed = _PREPACK[0](wq)
    if layer.act_scale == "tensor":
        xq, sx, zx = traced_quantize_per_tensor(xf, inv, levels, signed=False)
        return torch.ops.onednn.qlinear_pointwise.tensor(
            xq.reshape(-1, rows), sx, zx.to(torch.long), packed, sw, wzp, layer.bias, 1.0, 0,
            torch.float32, "none", [], "")
    if inv is not None:
        xf = xf * inv
    # each row over its absmax spans [-1, 1]: codes mid + step·x/amax with one fixed scale
    # 1/step and zero point mid; + 0.5 and truncation to uint8 round it
    step, mid = levels // 2, levels // 2 + 1
    amax = torch.maximum(xf.amax(-1, keepdim=True), xf.amin(-1, keepdim=True).neg()).clamp(min=1e-12)
    xq = (xf * (step / amax) + (mid + 0.5)).to(torch.uint8)
    y = torch.ops.onednn.qlinear_pointwise.default(
        xq.reshape(-1, rows), 1.0 / step, mid, packed, sw, wzp, None, 1.0, 0, torch.float32,
        "none", [], "")
    y = y * amax.reshape(-1, 1)
    return y if layer.bias is None else y + layer.bias


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
    kind, levels = _PRODUCT[0] or ("int_mm", 255)
    if kind == "onednn" and zw is None:
        y = _onednn_product(layer, xf, inv, wq, sw, levels)
        return y.to(x.dtype).reshape(*shape[:-1], -1)
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
