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
  the weight prepacked once, at the first call, and the weight scales (per tensor: the
  bias too) applied inside it; that is the kernel torchao's PT2E int8 runs. It is called
  through ``fxpress::int8_linear`` (:func:`_int8_linear`), which decides per call what
  the eager layer decides: a small call (``decode=auto``) in float, and a small product
  on the calling thread (:data:`SERIAL_WORK`). aten's ``torch._int_mm`` on an AVX2 CPU
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
import weakref
from collections.abc import Iterator

import torch

__all__ = ["SERIAL_WORK", "choose_product", "define_stored_op", "define_traced_ops",
           "small_calls_allowed", "traced_int8_linear", "traced_product", "traced_quantize_per_tensor"]


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


#: the product the traced form writes, for the call being traced (:func:`traced_product`):
#: ("onednn", activation levels) or ("int_mm", 255)
#: (a plain list: Dynamo reads it while tracing and guards its value)
_PRODUCT: list = [None]
#: whether the call being traced runs small calls in float (:func:`small_calls_allowed`)
_SMALL_CALLS: list = [False]


#: A oneDNN int8 product of fewer multiply-adds than this (rows x in x out) runs on the
#: calling thread. oneDNN forks its OpenMP team at any size (aten's kernels and MKL's small
#: GEMMs do not): one row of the digits MLP's 64x300 layer at 2 threads took 58 us of the
#: calling thread's CPU and 32 ms wall on the loaded 2-core machine (load ~13), 52 us
#: serial. 2^22 multiply-adds are about 50 us of one core's int8 work on an AVX2 EPYC
#: (MiniLM's 32x384x384: 114 us serial, 106 us at 2 threads).
SERIAL_WORK = 1 << 22

_LINEAR: list = []
_LIBRARY: list = []  # the torch.library.Library defining fxpress::int8_linear (kept alive)
_WEIGHT_ZEROS: dict = {}  # out features -> oneDNN's weight zero points (all 0, symmetric)
#: id of a compiled graph's int8 weight codes -> (weak reference to them, oneDNN's
#: prepacked copy); an entry goes when its codes are freed
_PACKED: dict = {}


def _packed(wq: torch.Tensor) -> torch.Tensor:
    """oneDNN's prepacked copy of the int8 weight codes ``wq`` (``[out, in]``), made at the
    first call and kept while ``wq`` lives: frozen, ``wq`` is a constant of the compiled
    graph, so each weight is packed once (one byte per weight). The packed tensor is an
    opaque oneDNN tensor, which Inductor can hold as a constant only for its own lowering
    of ``onednn::qlinear_pointwise``: handed to an operator of fxpress's, its generated code
    read it as a strided tensor and failed, so it is kept here, out of the graph."""
    key = id(wq)
    hit = _PACKED.get(key)
    if hit is not None and hit[0]() is wq:
        return hit[1]
    packed = torch.ops.onednn.qlinear_prepack(wq, None)
    _PACKED[key] = (weakref.ref(wq, lambda _, key=key: _PACKED.pop(key, None)), packed)
    return packed


def _int8_linear(x: torch.Tensor, codes: torch.Tensor, x_scale: torch.Tensor,
                 x_zero: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, weight: torch.Tensor | None, step: int,
                 float_below: int) -> torch.Tensor:
    """``fxpress::int8_linear``: one dynamic int8 linear of the compiled form, chosen per
    call as the eager layer chooses (:meth:`~fxpress.passes.quantize_modules.
    QuantizedLinear.forward`): an input of fewer than ``float_below`` elements in float
    (``F.linear`` on ``weight``, the decoded float weight; the layer's small-call rule,
    ``decode=auto``), else oneDNN's int8 linear on the uint8 ``codes`` of ``x``: per tensor
    (``step`` 0) with their scale and zero point (0-d tensors) and the bias inside it; per
    token with one fixed scale ``1/step`` and zero point ``step + 1``, each row then times
    its absmax (``x_scale``, ``[rows, 1]``) plus the bias; ``wq``: the int8 weight codes
    (``[out, in]``, prepacked at the first call, :func:`_packed`). A product of fewer than
    :data:`SERIAL_WORK` multiply-adds runs on the calling thread."""
    if weight is not None and x.numel() < float_below:
        return torch.nn.functional.linear(x, weight, bias)
    rows, cols = codes.shape
    out = w_scale.shape[0]
    packed = _packed(wq)
    wzp = _WEIGHT_ZEROS.get(out)
    if wzp is None:
        wzp = _WEIGHT_ZEROS[out] = torch.zeros(out, dtype=torch.long)
    threads = torch.get_num_threads()
    serial = threads > 1 and rows * cols * out < SERIAL_WORK
    if serial:
        torch.set_num_threads(1)
    try:
        if step:
            y = torch.ops.onednn.qlinear_pointwise.default(
                codes, 1.0 / step, step + 1, packed, w_scale, wzp, None, 1.0, 0, torch.float32,
                "none", [], "")
        else:
            y = torch.ops.onednn.qlinear_pointwise.tensor(
                codes, x_scale, x_zero, packed, w_scale, wzp, bias, 1.0, 0, torch.float32,
                "none", [], "")
    finally:
        if serial:
            torch.set_num_threads(threads)
    if not step:
        return y
    return y.mul_(x_scale) if bias is None else torch.addcmul(bias, y, x_scale, out=y)


def _define_linear_op() -> None:
    """``fxpress::int8_linear`` (:func:`_int8_linear`), once per process. A plain
    ``torch.library`` operator: Inductor's generated code calls it as an external kernel,
    with the weight codes and the float copy as frozen constants (its dispatch costs
    about 3 us a call; ``torch.library.custom_op``'s wrapper 18 us)."""
    if _LINEAR or not hasattr(torch.ops.onednn, "qlinear_prepack"):
        return
    lib = torch.library.Library("fxpress", "FRAGMENT")
    lib.define("int8_linear(Tensor x, Tensor codes, Tensor x_scale, Tensor x_zero, Tensor wq, "
               "Tensor w_scale, Tensor? bias, Tensor? weight, int step, int float_below) -> Tensor")
    lib.impl("int8_linear", _int8_linear, "CPU")

    def fake(x, codes, x_scale, x_zero, wq, w_scale, bias, weight, step, float_below):
        return codes.new_empty((codes.shape[0], w_scale.shape[0]), dtype=torch.float32)

    torch.library.register_fake("fxpress::int8_linear", fake, lib=lib)
    _LIBRARY.append(lib)
    _LINEAR.append(torch.ops.fxpress.int8_linear.default)


def define_traced_ops() -> None:
    """Define fxpress's custom ops for the traced form, once per process (``fxpress::stored``,
    ``fxpress::int8_linear``); :func:`fxpress.compile` calls it before tracing."""
    define_stored_op()
    try:
        _define_linear_op()
    except (AttributeError, RuntimeError):  # no oneDNN ops in this build: _int_mm it is
        pass


_ONEDNN_RUNS: list = []


def _onednn_runs() -> bool:
    """Whether oneDNN's int8 linear runs in this torch build on this CPU: a 4x4 product
    tried once per process against the exact one (a build without oneDNN, another
    architecture, an operator that raises: no)."""
    if not _ONEDNN_RUNS:
        ok = False
        if _LINEAR and torch.backends.mkldnn.is_available():
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


def small_calls_allowed() -> bool:
    """Whether a model compiled now runs its int8 layers' small calls in float, as the eager
    layers do (``decode=auto``): not with a kernel forced by :func:`~fxpress.passes.int8.
    int8_backend`, runtime caches off, or inside :func:`~fxpress.passes.decode.
    int8_kernels_only` (read once, at compile time: read while Dynamo traces, they were
    guarded, and a model compiled inside one of them compiled again outside)."""
    from fxpress.graph.memory import caches_enabled
    from fxpress.passes.decode import small_calls_in_float
    from fxpress.passes.int8 import _backend_override

    return not _backend_override and caches_enabled() and small_calls_in_float()


@contextlib.contextmanager
def traced_product(choice: tuple[str, int], small_calls: bool = False) -> Iterator[None]:
    """Trace (and run) the int8 product ``choice`` (:func:`choose_product`) in this thread;
    ``small_calls``: with the small-call rule (:func:`small_calls_allowed`)."""
    outer = _PRODUCT[0], _SMALL_CALLS[0]
    _PRODUCT[0], _SMALL_CALLS[0] = choice, small_calls
    try:
        yield
    finally:
        _PRODUCT[0], _SMALL_CALLS[0] = outer


def _onednn_product(layer, xf: torch.Tensor, inv: torch.Tensor | None, wq: torch.Tensor,
                    sw: torch.Tensor, levels: int, small_calls: bool) -> torch.Tensor:
    """``layer``'s product through oneDNN's int8 linear (``onednn::qlinear_pointwise``) on
    uint8 codes of ``xf``, its weight prepacked once (at the first call), the weight
    scales and, per tensor, the bias applied inside it;
    called through ``fxpress::int8_linear`` (:func:`_int8_linear`), which runs small
    products on the calling thread and, with ``small_calls``, a call below the layer's
    small-call size in float as the eager layer does.

    On CPUs without VNNI oneDNN adds pairs of u8 x s8 products in int16 and saturates
    (a 384-wide row of codes 255 times weights 127 gave 6,291,264 instead of 12,435,840;
    full-range random codes were off by up to 11%), so there the codes span 127 levels
    (per token 64 +- 63), whose pairs stay below 2^15: the integer product is then exact,
    at half the activation resolution - what fbgemm's eager kernel (``reduce_range``)
    does on such CPUs. With VNNI or AMX oneDNN accumulates in int32 and the codes span
    255 levels, as eager oneDNN's."""
    cols = xf.shape[-1]
    below = layer.float_call_below() if small_calls and xf.dtype == torch.float32 else 0
    # the float copy a small call multiplies by (folded into a constant when frozen)
    weight = layer.weight_float().reshape(wq.shape) if below else None
    x2 = xf.reshape(-1, cols)
    if layer.act_scale == "tensor":
        xq, sx, zx = traced_quantize_per_tensor(xf, inv, levels, signed=False)
        return _LINEAR[0](x2, xq.reshape(-1, cols), sx, zx.to(torch.long), wq, sw, layer.bias,
                          weight, 0, below)
    xs = xf if inv is None else xf * inv
    # each row over its absmax spans [-1, 1]: codes mid + step·x/amax with one fixed scale
    # 1/step and zero point mid; + 0.5 and truncation to uint8 round it
    step, mid = levels // 2, levels // 2 + 1
    amax = torch.maximum(xs.amax(-1, keepdim=True), xs.amin(-1, keepdim=True).neg()).clamp(min=1e-12)
    xq = (xs * (step / amax) + (mid + 0.5)).to(torch.uint8)
    return _LINEAR[0](x2, xq.reshape(-1, cols), amax.reshape(-1, 1), amax.new_zeros((), dtype=torch.long),
                      wq, sw, layer.bias, weight, step, below)


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
        y = _onednn_product(layer, xf, inv, wq, sw, levels, _SMALL_CALLS[0])
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
