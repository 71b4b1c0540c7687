"""The int8 matmul behind dynamic activation quantisation: the kernels (oneDNN, fbgemm,
``torch._int_mm`` and a float64 reference of the same integer product), which of them runs
here (:data:`INT8_BACKENDS`, :func:`int8_backend`), and the run-time quantisation of the
input (per tensor, per token, shared between layers that read one input).

:class:`Int8Kernels` is the part of :class:`~fxpress.passes.quantize_modules.QuantizedLinear`
that multiplies: it needs the layer's ``qweight``, ``scale``, ``zero_point``, ``bias``,
``smooth``, ``shape``, ``bits``, ``scheme``, ``act_scale`` and ``shares_input``, and its
``codes()`` and ``zero()``.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from typing import Iterator

import torch

from fxpress.graph.memory import caches_enabled
from fxpress.passes.int8_traced import traced_int8_linear

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
#: Levels of the uint8 input codes of oneDNN's eager int8 linear. Without VNNI (AVX2, or
#: AVX-512 before Cascade Lake) oneDNN adds pairs of u8 x s8 products in int16, which
#: saturates at full range: measured on an AVX2-only AMD EPYC, codes 255 against weights
#: 127 gave 8,160 instead of 1,032,256 and random full-range codes were off by up to 64,802
#: in a 256-wide row. 127 levels keep every pair below 2^15, so the integer product is
#: exact there, at half the input resolution: what fbgemm's ``reduce_range`` does on such
#: CPUs and what the compiled path does (:func:`~fxpress.passes.int8_traced.choose_product`).
ONEDNN_LEVELS = 127 if _REDUCE_RANGE else 255
#: Layers with fewer input or output features than this skip the oneDNN kernel (see
#: :meth:`QuantizedLinear.kernels`; on the 64-300-100-10 digits MLP it was 1.3x slower
#: than fbgemm, on MiniLM's 384/1536-wide layers 1.2x faster).
ONEDNN_MIN_WIDTH = 256
#: Calls with fewer input rows than this (one short sentence, a decoding step) run
#: fbgemm's dynamic linear first even where oneDNN's is preferred: fbgemm quantises the
#: input inside its one call, while oneDNN needs three elementwise ops before its own.
#: Measured on MiniLM's 384x384 / 384x1536 / 1536x384 layers at 1-64 rows: fbgemm
#: 1.4-1.9x the speed of the oneDNN path; at 576 rows they are within noise of each other.
ONEDNN_MIN_ROWS = 128
#: Order in which dynamic int8 linear kernels are tried; the first that works is used
#: (oneDNN's, which Inductor uses for x86 int8 and which runs on AMX/VNNI, takes
#: symmetric weights only; layers with affine weights start at fbgemm).
INT8_BACKENDS = ("onednn", "fbgemm", "int_mm", "reference")
_backend_override: list[str] = []
_broken: set[str] = set()
#: module -> {backend: (key, prepacked weight)}: one entry per kernel a layer has run
_prepacked: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
#: module -> (ids of its tensors, their versions, the tensors, {small call?: (backend,
#: prepacked weight, smoothing inverse)}): the kernel each call size took last time, which
#: :meth:`Int8Kernels._fast_int8` calls directly (outside the module: a structural copy of
#: the module must not inherit it)
_plans: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
# fbgemm's dynamic linear takes a packed-weight object, which makes torch.ops check every
# argument for a fake one (a tracing-only object) on each call; the C++ operator itself
# skips that (eager calls never hold fake objects)
_LINEAR_DYNAMIC = getattr(torch.ops.quantized.linear_dynamic.default, "_op",
                          torch.ops.quantized.linear_dynamic.default) \
    if hasattr(torch.ops.quantized, "linear_dynamic") else None


def prepacked_backends(module: torch.nn.Module) -> list[str]:
    """The kernels whose prepacked copy of ``module``'s weight is held now."""
    return sorted(_prepacked.get(module, {}))


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


_available: dict[int, tuple[str, ...]] = {}  # len(_broken) -> backends (_broken only grows)


def _available_backends() -> tuple[str, ...]:
    if _backend_override:
        return (_backend_override[-1],)
    hit = _available.get(len(_broken))
    if hit is None:
        hit = _available[len(_broken)] = tuple(_probe_backends())
    return hit


def _probe_backends() -> list[str]:
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


def _version(t: torch.Tensor | None) -> int:
    """``t``'s version counter (-1: no tensor, or an inference tensor, which has none)."""
    return -1 if t is None or t.is_inference() else t._version


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
    clamp pass. Except where the zero point rounds up by exactly half a step (a range
    symmetric about 0, such as saturated tanh's [-1, 1] or a per-token row over its
    absmax: 127.5 rounds to 128): the top of the range then lands at ``levels + 0.5``,
    which would round to ``levels + 1`` (256 wraps to 0 in uint8: the largest input read
    as the smallest); there a clamp pass keeps it at ``levels``, as fbgemm's own
    quantisation (round, then clamp) does with the same zero point.
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
    if zero + lo / scale >= 0.5 - 1e-6:  # the top would round past levels (see above)
        q.clamp_(max=levels)
    if signed:
        return q.floor_().clamp_(0, levels).sub_(128).to(torch.int8), scale, zero - 128
    return q.to(torch.uint8), scale, zero


_local = threading.local()
#: step -> the per-token codes' zero point plus 0.5 (rounding by truncation)
_ROUNDED_ZERO = {127: torch.tensor(128.5), 63: torch.tensor(64.5)}


def _shared_input(x2: torch.Tensor, source: torch.Tensor | None, signed: bool,
                  col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """:func:`quantize_per_tensor` of ``x2`` (its columns times ``col_scale``: a
    smoothing's inverse), reused when the previous layer quantised the very same input
    with equal column factors (q, k and v of an attention block read one LayerNorm output,
    smoothed by one factor).

    ``source`` is the layer's input tensor, given only by layers the quantize pass marked
    ``shares_input`` (their input node has no in-place users); the codes are reused while
    it is the same live object at the same version. One entry per thread.
    """
    hit = getattr(_local, "last", None)
    if source is not None and hit is not None:
        ref, version, was_signed, cols, value = hit
        if ref() is source and was_signed == signed and (
                version is None or version == source._version) and (
                cols is col_scale or (cols is not None and col_scale is not None
                                      and cols.shape == col_scale.shape
                                      and torch.equal(cols, col_scale))):
            return value
    # oneDNN's uint8 input (unsigned) spans 127 levels on CPUs without VNNI (see
    # :data:`ONEDNN_LEVELS`); torch._int_mm's int8 input (signed) always spans 255
    value = quantize_per_tensor(x2, 255 if signed else ONEDNN_LEVELS, signed, col_scale=col_scale)
    if source is not None:
        version = None if source.is_inference() else source._version
        _local.last = (weakref.ref(source), version, signed, col_scale, value)
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


def quantize_per_token(x2: torch.Tensor, step: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of ``x2`` (``step`` per side) and the row scales
    ``[rows, 1]``."""
    amax = per_token_absmax(x2)
    return torch.mul(x2, step / amax).round_().to(torch.int8), amax / step


class Int8Kernels:
    """Dynamic int8 linear: quantise the input at run time, multiply in integers, rescale."""

    def int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(x)`` through the first kernel of :meth:`kernels` that runs here (under
        ``torch.compile``: the same product in traceable ops, :mod:`fxpress.passes.int8_traced`)."""
        if torch.compiler.is_compiling():
            return traced_int8_linear(self, x)
        y = self._fast_int8(x)
        if y is not None:
            return y
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        source = x if self.shares_input and self.act_scale == "tensor" else None
        # smoothing divides the input's columns by ``smooth``: the kernels multiply by its
        # inverse, folded into the quantisation where they can (per-tensor scales)
        inv = None if self.smooth is None else self.smooth.reciprocal()
        if x2.dtype != torch.float32:
            x2, source = x2.float(), None
        for backend in self.kernels(x2.shape[0]):
            try:
                y = getattr(self, f"_mm_{backend}")(x2, source, inv)
                break
            except (RuntimeError, NotImplementedError):
                if _backend_override or backend == "reference":
                    raise
                _broken.add(backend)  # the operator is missing or refuses: try the next
        if x2.dtype == x.dtype:
            self._remember_plan(backend, x2.shape[0], inv)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], -1)

    def _weight_state(self) -> tuple[tuple, tuple, tuple]:
        """(ids, versions, tensors) of every buffer the layer holds (codes, scale, zero
        point, smoothing factors, bias): what its prepacked weights, kernel plans and small
        calls' float weight are built from. Every buffer, so that none is left out: an
        in-place edit of the zero point left all three stale (outputs off by 0.04)."""
        tensors = tuple(self._buffers.values())
        return tuple(map(id, tensors)), tuple(map(_version, tensors)), tensors

    def _remember_plan(self, backend: str, rows: int, inv: torch.Tensor | None) -> None:
        """Keep the kernel this call took (and its prepacked weight) for calls of the same
        size class, which then skip choosing it (:meth:`_fast_int8`)."""
        if backend not in ("fbgemm", "onednn") or self._parameters or not caches_enabled():
            return
        held = _prepacked.get(self, {}).get(backend)
        if held is None:
            return
        ids, versions, tensors = self._weight_state()
        plan = _plans.get(self)
        if plan is None or plan[0] != ids or plan[1] != versions:
            plan = _plans[self] = (ids, versions, tensors, {})
        plan[3][rows < ONEDNN_MIN_ROWS] = (backend, held[1], inv)

    def _fast_int8(self, x: torch.Tensor) -> torch.Tensor | None:
        """``linear(x)`` by the kernel a call of this size class took last time, with its
        prepacked weight, or None (no such call yet, the weights changed since, a kernel
        forced by :func:`int8_backend`, a non-float32 input, fine-tuning). At batch 1 a
        linear's matmul takes tens of microseconds: choosing the kernel and checking the
        prepack cache again on each call cost as much as the product (MiniLM: 37 calls)."""
        plan = _plans.get(self)
        if plan is None or _backend_override or x.dtype != torch.float32 or self._parameters:
            return None
        cols = x.shape[-1] if x.dim() else 0
        entry = plan[3].get(x.numel() < ONEDNN_MIN_ROWS * cols) if cols else None
        if entry is None:
            return None
        ids, versions, _ = self._weight_state()
        if ids != plan[0] or versions != plan[1]:
            _plans.pop(self, None)
            return None
        backend, packed, inv = entry
        if backend == "fbgemm" and self.act_scale == "tensor":
            # fbgemm's dynamic linear takes any leading dims: no reshape either way
            try:
                return _LINEAR_DYNAMIC(x if inv is None else x * inv, packed, _REDUCE_RANGE)
            except (RuntimeError, NotImplementedError):
                return None
        x2 = x.reshape(-1, cols)
        source = x if self.shares_input and self.act_scale == "tensor" else None
        try:
            y = (self._mm_fbgemm if backend == "fbgemm" else self._mm_onednn)(x2, source, inv, packed)
        except (RuntimeError, NotImplementedError):
            return None  # the full path tries the next kernel
        return y.reshape(*x.shape[:-1], -1)

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
        # inference tensors (a decoded twin built in inference mode) have no version
        # counter: reading one raised, and every kernel was marked broken for the process
        ids, versions, tensors = self._weight_state()
        key = (backend, self.act_scale, ids, versions, id(bias))
        held = _prepacked.get(self)
        hit = None if held is None else held.get(backend)
        if hit is None or hit[0] != key:
            hit = (key, build(), tensors)  # the tensors held: their ids stay theirs
            if caches_enabled():
                if held is None:
                    held = _prepacked[self] = {}
                held[backend] = hit
        return hit[1]

    def kernels(self, rows: int | None = None) -> list[str]:
        """The dynamic int8 kernels this layer tries for a call with ``rows`` input rows,
        in order. oneDNN's needs symmetric weights, and only pays off on wide layers and
        many rows: it takes the input already quantised, and the three elementwise passes
        that does cost more than its faster matmul saves when the layer is narrow or the
        call small (fbgemm quantises inside its kernel; see :data:`ONEDNN_MIN_ROWS`)."""
        kernels = list(_available_backends())
        if _backend_override or kernels[0] != "onednn":
            return kernels
        small = rows is not None and rows < ONEDNN_MIN_ROWS
        memo = self.__dict__.setdefault("_kernel_order", {})  # per call size, per _broken
        hit = memo.get((small, len(_broken)))
        if hit is None:
            if self.zero_point is not None or min(self.shape[0], self.cols) < ONEDNN_MIN_WIDTH:
                hit = kernels[1:]
            elif small and "fbgemm" in kernels:
                hit = ["fbgemm", "onednn"] + kernels[2:]
            else:
                hit = kernels
            memo[(small, len(_broken))] = hit
        return list(hit)

    def _packed_product(self, backend: str, build, apply) -> torch.Tensor:
        """``apply(packed, rows)`` over the prepacked weight ``build(weight, rows)``: cached
        whole, or, when runtime caches are off and the weight is large, prepacked a block
        of output channels at a time and dropped (a language model's head is never copied
        whole for one call); channels are independent, so the result is the same."""
        rows, cols = self.shape[0], self.cols
        if caches_enabled() or backend in _prepacked.get(self, {}) or rows * cols <= 1 << 22:
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

    def _product(self, backend: str, build, apply, packed) -> torch.Tensor:
        """:meth:`_packed_product`, or ``apply`` over ``packed`` when the caller holds it."""
        if packed is not None:
            return apply(packed, slice(None))
        return self._packed_product(backend, build, apply)

    def _mm_onednn(self, x2: torch.Tensor, source: torch.Tensor | None,
                   inv: torch.Tensor | None, packed=None) -> torch.Tensor:
        if self.zero_point is not None:
            raise NotImplementedError("oneDNN's int8 linear takes symmetric weights only")

        def build(weight=None, rows: slice = slice(None)):
            wq, scale, _ = weight or self._int8_weight()
            return (torch.ops.onednn.qlinear_prepack(wq[rows], None),
                    scale[rows].float().contiguous(), torch.zeros(len(scale[rows]), dtype=torch.long))

        if self.act_scale == "tensor":
            xq, sx, zx = _shared_input(x2, source, signed=False, col_scale=inv)
            bias = self.bias
            return self._product("onednn", build, lambda p, rows: (
                torch.ops.onednn.qlinear_pointwise.default(xq, sx, zx, p[0], p[1], p[2],
                                                   None if bias is None else bias[rows],
                                                   1.0, 0, torch.float32, "none", [], "")), packed)
        x2 = _smoothed(x2, inv)
        # per token: each row divided by its absmax spans [-1, 1], one fixed scale 1/step;
        # (mid + 0.5) + step·x/amax lies in [1.5, 2·step + 1.5], so truncating to uint8
        # rounds it (step 127, mid 128 with VNNI; 63 and 64 without, see ONEDNN_LEVELS)
        step = ONEDNN_LEVELS // 2
        amax = per_token_absmax(x2)
        xq = torch.addcmul(_ROUNDED_ZERO[step], x2, step / amax).to(torch.uint8)
        y = self._product("onednn", build, lambda p, rows: (
            torch.ops.onednn.qlinear_pointwise.default(xq, 1.0 / step, step + 1, p[0], p[1], p[2],
                                               None, 1.0, 0, torch.float32, "none", [], "")),
            packed)
        if self.bias is None:
            return y.mul_(amax)
        return torch.addcmul(self.bias, y, amax, out=y)

    def _mm_fbgemm(self, x2: torch.Tensor, source: torch.Tensor | None,
                   inv: torch.Tensor | None, packed=None) -> torch.Tensor:
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
            return self._product("fbgemm", build, lambda p, rows: (
                _LINEAR_DYNAMIC(x2, p, _REDUCE_RANGE)), packed)
        # dividing each row by its own absmax first makes fbgemm's one scale a per-token
        # one (every row then spans [-1, 1])
        amax = per_token_absmax(x2)
        xs = x2 / amax
        y = self._product("fbgemm", build, lambda p, rows: (
            _LINEAR_DYNAMIC(xs, p, _REDUCE_RANGE)), packed)
        if self.bias is None:
            return y.mul_(amax)
        return torch.addcmul(self.bias, y, amax, out=y)

    def _quantize_input(self, x2: torch.Tensor, source: torch.Tensor | None,
                        inv: torch.Tensor | None):
        """int8 codes of the (smoothed) input, their scale ([rows, 1] or 0-d) and zero point
        (or None)."""
        if self.act_scale == "tensor":
            xq, sx, zx = _shared_input(x2, source, signed=True, col_scale=inv)
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


__all__ = ["INT8_BACKENDS", "ONEDNN_MIN_WIDTH", "ONEDNN_MIN_ROWS", "prepacked_backends", "Int8Kernels", "int8_backend",
           "quantize_per_tensor", "quantize_per_token", "per_token_absmax"]
