"""binarize: 1-bit, ternary and power-of-two weights, stored at their real bit width.

Three modes (``binarize{mode=...}``), each per output channel (row of ``[out, ...]``,
one token's vector for an embedding):

* ``sign`` (XNOR-Net): ``w ≈ α·sign(w)`` with ``α = mean|w|`` of the channel, the
  least-squares scale for fixed signs. 1 bit per weight, packed 8 per byte, plus α.
  There is no zero: ``sign(0)`` is +1 (use ``ternary`` to keep pruned zeros).
* ``ternary`` (Ternary Weight Networks): ``w ∈ {-α, 0, +α}``; the threshold is
  ``Δ = 0.7·mean|w|`` and ``α`` is the mean of ``|w|`` above it. 2 bits per weight plus α.
* ``pow2`` (the seed article's formula): ``w ≈ sign(w)·2^round(log2|w|)``, no scale.
  The exponents are clamped to a window per layer so that sign + exponent pack into
  ``bits`` bits (default 4). **Window rule**: ``e_max = round(log2 max|w|)``; the window
  holds the ``2^(bits-1) - 1`` exponents ``e_min = e_max - 2^(bits-1) + 2 .. e_max``
  (4 bits: 7 exponents, from 1/64 of the largest power up to it); exponent field 0
  encodes zero. A weight whose rounded exponent falls below the
  window becomes the nearer of ``0`` and ``±2^e_min`` (zero when ``|w| < 2^(e_min-1)``);
  zero stays zero. Inside the window the result is exactly the seed's formula.

The first and last weighted layers stay in float by default (``keep_first_last``), as
the literature does: they are small and binarizing them costs most.

One-shot binarization loses accuracy (on the digits models one binarized layer costs a
little; a transformer collapses); the fine-tuning hooks (:meth:`BinaryModule.begin_training`)
let the distill pass win it back with a straight-through estimator.

Example::

    res = fxpress.compress(model, "binarize{mode=ternary}", calibration=batches)
"""
from __future__ import annotations

import dataclasses
import math

import torch

from fxpress.errors import OptionError
from fxpress.graph.packing import (pack_bits, packed_size, rows_byte_aligned, unpack_bits,
                                   unpack_rows)
from fxpress.graph.runtime import CompressedModule, StateCheck, kind_classes
from fxpress.passes.decode import DecodeStrategy
from fxpress.graph.weights import CONV, EMBEDDING, LINEAR, select, weighted_ops
from fxpress.passes.base import (Pass, PassContext, PassResult, PassTraits, Tolerance,
                                 check_glob_matches, check_op_kinds, option)

MODES = ("sign", "ternary", "pow2")
MODE_BITS = {"sign": 1, "ternary": 2}
TERNARY_RATIO = 0.7
#: default tolerance per mode (the verifier's limits on the pass's own effect)
MODE_TOLERANCE = {"sign": Tolerance(min_cosine=0.6, min_top1=0.6),
                  "ternary": Tolerance(min_cosine=0.9, min_top1=0.9),
                  "pow2": Tolerance(min_cosine=0.95, min_top1=0.97)}

# -- the three encoders (pure functions: the pass, the runtime module and tests use them) --


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1) if w.dim() > 1 else w.detach().reshape(1, -1)


def sign_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, α): code 1 for ``w >= 0``, 0 for ``w < 0``; ``α`` = mean|w| per output channel.

    >>> codes, alpha = sign_encode(torch.tensor([[0.5, -1.5], [-0.2, 0.0]]))
    >>> codes.tolist(), alpha.tolist()
    ([[1, 0], [0, 1]], [1.0, 0.10000000149011612])
    """
    rows = _rows(w)
    alpha = rows.abs().mean(1)
    return (rows >= 0).to(torch.uint8).view(w.shape), alpha


def ternary_encode(w: torch.Tensor, ratio: float = TERNARY_RATIO
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, α, Δ) per output channel: ``Δ = ratio·mean|w|``; code 1 for ``w > Δ``,
    2 for ``w < -Δ``, 0 otherwise; ``α`` = mean of ``|w|`` over the weights above ``Δ``."""
    rows = _rows(w)
    a = rows.abs()
    delta = ratio * a.mean(1, keepdim=True)
    big = a > delta
    count = big.sum(1)
    alpha = torch.where(count > 0, (a * big).sum(1) / count.clamp(min=1), torch.zeros_like(count,
                        dtype=a.dtype))
    codes = torch.zeros(rows.shape, dtype=torch.uint8)
    codes[big & (rows > 0)] = 1
    codes[big & (rows < 0)] = 2
    return codes.view(w.shape), alpha, delta.squeeze(1)


def pow2_window(w: torch.Tensor, bits: int) -> tuple[int, int]:
    """(e_min, e_max) of the layer's exponent window (see the module docstring)."""
    peak = float(w.detach().abs().max()) if w.numel() else 0.0
    e_max = int(torch.round(torch.log2(torch.tensor(peak)))) if peak > 0 else 0
    return e_max - (1 << (bits - 1)) + 2, e_max


def pow2_encode(w: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, int]:
    """(codes, e_max): code = sign bit (bit ``bits-1``) | exponent field, field 0 = zero,
    field f >= 1 = exponent ``e_min + f - 1``.

    >>> codes, e_max = pow2_encode(torch.tensor([0.3, -1.1, 0.0, 0.001]), bits=3)
    >>> pow2_decode(codes, 3, e_max).tolist()
    [0.25, -1.0, 0.0, 0.0]
    """
    e_min, e_max = pow2_window(w, bits)
    wd = w.detach()
    a = wd.abs()
    e = torch.round(torch.log2(a))  # the seed's round(log2|w|); -inf for zeros
    field = (e.clamp(max=e_max) - e_min + 1).clamp(min=1)
    below = e < e_min
    # below the window: the nearer of 0 and 2^e_min
    field = torch.where(below & (a < 2.0 ** (e_min - 1)), torch.zeros_like(field), field)
    field = torch.where(a == 0, torch.zeros_like(field), field)
    sign = ((wd < 0) & (field > 0)).to(torch.int64) << (bits - 1)
    return (sign | field.to(torch.int64)).to(torch.uint8), e_max


def pow2_table(bits: int, e_max: int) -> torch.Tensor:
    """The value of every ``bits``-bit pow2 code of a layer with window top ``e_max``."""
    half = 1 << (bits - 1)
    e_min = e_max - half + 2
    field = torch.arange(half, dtype=torch.float64)
    mag = torch.where(field > 0, torch.exp2(e_min + field - 1), torch.zeros_like(field))
    return torch.cat([mag, -mag]).float()


def pow2_decode(codes: torch.Tensor, bits: int, e_max: int) -> torch.Tensor:
    return pow2_table(bits, e_max)[codes.long()]


def _table(mode: str, bits: int, e_max: int) -> torch.Tensor:
    """code -> value (times α) of ``mode``. The values are literals: torch.compile takes them
    as constants, where floats read from
    a module-level tuple become symbolic and get the model traced twice."""
    if mode == "sign":
        return torch.tensor((-1.0, 1.0))
    if mode == "ternary":
        return torch.tensor((0.0, 1.0, -1.0, 0.0))  # code 3 unused
    return pow2_table(bits, e_max)


def encode(w: torch.Tensor, mode: str, bits: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(codes, α or None, e_max) of ``w`` in ``mode``."""
    if mode == "sign":
        codes, alpha = sign_encode(w)
        return codes, alpha.to(w.dtype), 0
    if mode == "ternary":
        codes, alpha, _ = ternary_encode(w)
        return codes, alpha.to(w.dtype), 0
    codes, e_max = pow2_encode(w, bits)
    return codes, None, e_max


def decode(codes: torch.Tensor, mode: str, bits: int, e_max: int,
           alpha: torch.Tensor | None) -> torch.Tensor:
    """The float weight (same shape as ``codes``) of codes encoded by :func:`encode`."""
    w = _table(mode, bits, e_max).to(alpha.dtype if alpha is not None else torch.float32)[codes.long()]
    if alpha is not None:
        w = w * alpha.view(-1, *([1] * (codes.dim() - 1)))
    return w


# -- runtime modules ------------------------------------------------------------------------


class _STE(torch.autograd.Function):
    """Forward: the binarized weight; backward: the gradient passes straight to the latent."""

    @staticmethod
    def forward(ctx, latent, mode, bits):
        codes, alpha, e_max = encode(latent, mode, bits)
        return decode(codes, mode, bits, e_max, alpha).to(latent.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class BinaryModule(DecodeStrategy, CompressedModule):
    """A linear/conv/embedding with binarized weights: ``codes`` packed at ``bits`` bits
    per weight (1 sign, 2 ternary, ``bits`` pow2), ``alpha`` per output channel (sign,
    ternary) and ``bias``. The pow2 window top ``e_max`` is in :meth:`config`.
    """

    technique = "binarize"
    optional_tensors = ("bias", "alpha")

    def __init__(self, kind: str, spec: dict, mode: str, bits: int, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, cache_weight: bool = False):
        super().__init__(kind, spec)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.bits = int(MODE_BITS.get(mode, bits))
        self.shape = [int(d) for d in weight.shape]
        self.cache_weight = bool(cache_weight)
        self._store(weight)
        if bias is None:
            self.register_buffer("bias", None)
        else:
            self.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)

    def _store(self, weight: torch.Tensor) -> None:
        codes, alpha, e_max = encode(weight.detach(), self.mode, self.bits)
        self.e_max = int(e_max)
        self.register_buffer("codes", pack_bits(codes, self.bits))
        self.register_buffer("alpha", alpha)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def weight_float(self) -> torch.Tensor:
        latent = self._parameters.get("latent")
        if latent is not None:  # fine-tuning: forward on the grid, gradient to the latent
            return _STE.apply(self.keep_zeros(latent), self.mode, self.bits)
        codes = unpack_bits(self.codes, self.bits, self.numel).view(self.shape)
        return decode(codes, self.mode, self.bits, self.e_max, self.alpha)

    def gathers_rows(self) -> bool:
        return rows_byte_aligned(self.shape[1], self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.kind == EMBEDDING and "latent" not in self._parameters and self.gathers_rows()
                and self.decode_path() == "per_call"):
            # a lookup touches a few rows: unpack only those
            codes = unpack_rows(self.codes, self.bits, self.shape[1], x)
            w = _table(self.mode, self.bits, self.e_max).to(
                self.alpha.dtype if self.alpha is not None else torch.float32)[codes.long()]
            return w * self.alpha[x].unsqueeze(-1) if self.alpha is not None else w
        return super().forward(x)

    def config(self) -> dict:
        return {**super().config(), "mode": self.mode, "bits": self.bits, "shape": self.shape,
                "e_max": self.e_max}

    def check_state(self, check: StateCheck) -> None:
        """Also refuse a mode, bit width, window, codes or α that do not fit each other:
        every call would otherwise fail, or decode on other shapes, long after the file
        loaded."""
        super().check_state(check)
        mode = check.choice("mode", MODES)
        bits = check.integer("bits", 2 if mode == "pow2" else 1, 8)
        if bits != MODE_BITS.get(mode, bits):
            check.fail("config 'bits'", f"mode={mode!r} with bits={bits!r}: expected sign (1 "
                       "bit), ternary (2 bits) or pow2 (2-8 bits)")
        check.integer("e_max", -126, 127)  # a float32 exponent
        rows, n = self.shape[0], math.prod(self.shape)
        codes = check.tensor("codes", dtypes=(torch.uint8,))
        if codes.numel() != packed_size(n, bits):
            check.fail("tensor 'codes'", f"codes do not hold {n} codes of {bits} bits")
        if mode == "pow2":
            if self._buffers.get("alpha") is not None:
                check.fail("tensor 'alpha'", "pow2 stores no α")
        else:
            check.tensor("alpha", dtypes=(torch.float32, torch.float64), shape=[rows], finite=True)

    # -- fine-tuning -------------------------------------------------------------------
    def begin_training(self) -> list[torch.nn.Parameter]:
        """Start fine-tuning with a straight-through estimator; return the parameters.

        A float ``latent`` weight (initialised to the decoded weight) is trained: every
        forward binarizes it afresh (codes, α, window), and the gradient of the binarized
        weight passes to the latent unchanged. :meth:`end_training` binarizes the latent
        and drops it, so ``state_dict`` is the packed form again.

        Example::

            params = module.begin_training()
            opt = torch.optim.Adam(params, lr=1e-3)
            ...                                   # forward, loss.backward(), opt.step()
            module.end_training()
        """
        if "latent" not in self._parameters:
            self.drop_cache()
            with torch.no_grad():
                latent = self.weight_float().clone()
            self.remember_zeros(latent)  # pruned (and ternary/pow2 zero) weights stay zero
            self.latent = torch.nn.Parameter(latent)
            if self.bias is not None:  # an own copy: an optimizer writes in place
                self.bias = torch.nn.Parameter(self.bias.detach().clone())
        return [p for p in (self.latent, self.bias) if p is not None]

    def end_training(self) -> None:
        """Binarize the trained latent weight into the packed storage and drop it."""
        latent = self._parameters.pop("latent", None)
        if latent is None:
            return
        self._store(self.keep_zeros(latent.detach()))
        if self.bias is not None:
            self.bias = torch.nn.Parameter(self.bias.detach(), requires_grad=False)
        self.drop_cache()

    def extra_repr(self) -> str:
        return f"mode={self.mode}, bits={self.bits}, shape={tuple(self.shape)}, cache_weight={self.cache_weight}"


#: BinaryLinear, BinaryConv and BinaryEmbedding (an embedding lookup unpacks only its rows)
BINARY_CLASSES = kind_classes(BinaryModule, "Binary", "with binarized weights")
BinaryLinear, BinaryConv, BinaryEmbedding = (BINARY_CLASSES[k] for k in (LINEAR, CONV, EMBEDDING))


# -- the pass -----------------------------------------------------------------------------


class Binarize(Pass):
    """1-bit sign (XNOR-Net), ternary (TWN) or power-of-two weights, packed."""

    name = "binarize"
    summary = ("Binarize weights: sign (1 bit + α per channel), ternary (2 bits, threshold "
               "0.7·mean|w|) or pow2 (sign + exponent window); first/last layers kept.")
    # One-shot binarization is lossy by design, sign most: on the digits CNN it keeps
    # ~75% of the predictions; ternary ~99%, pow2 all. The default tolerance follows the
    # mode (MODE_TOLERANCE; the class value is sign's). Deeper models need fine-tuning
    # (distill); a pipeline with a recovery step defers this check to it.
    traits = PassTraits(tolerance=Tolerance(min_cosine=0.6, min_top1=0.6), replaces_tensors=True,
                        runtime_modules=tuple(BINARY_CLASSES.values()))

    mode = option("sign", "'sign': α·sign(w), 1 bit; 'ternary': {-α, 0, α}, 2 bits; "
                  "'pow2': ±2^k with a per-layer exponent window", choices=MODES)
    bits = option(None, "bits per pow2 weight, sign included (2-8; default 4); only for "
                  "mode=pow2", type=(int, type(None)), low=2, high=8)
    keep_first_last = option(True, "leave the model's first and last weighted layers in float")
    include = option(["*"], "glob patterns on weight or layer names to binarize")
    exclude = option([], "glob patterns to leave alone")
    ops = option(["linear", "conv"], "kinds of weighted ops to binarize (linear, conv, embedding)")
    decode = option("per_call", "'per_call': decode on every forward (memory); 'once': decode "
                    "at the first forward and keep it (speed, not stored)",
                    choices=("per_call", "once"))

    def configure_traits(self, traits: PassTraits) -> PassTraits:
        # the default tolerance depends on the mode; tol.* overrides still apply on top
        return dataclasses.replace(traits, tolerance=MODE_TOLERANCE.get(self.mode, traits.tolerance))

    def check_options(self) -> None:
        if self.bits is not None and self.mode != "pow2":
            raise OptionError(self.name, "bits", f"mode={self.mode} stores "
                              f"{MODE_BITS[self.mode]} bit(s) per weight; bits=... only applies "
                              "to mode=pow2: drop bits or use mode=pow2")
        check_op_kinds(self.name, self.ops)

    def run(self, gm, ctx: PassContext) -> PassResult:
        every = weighted_ops(gm, fused=True)
        all_ops = [op for op in every if op.kind in self.ops]
        chosen, unmatched = select(all_ops, self.include, self.exclude)
        check_glob_matches(self.name, unmatched, [op.name for op in all_ops])
        kept: list[str] = []
        if self.keep_first_last and every:
            ends = {every[0].name, every[-1].name}
            kept = sorted(n for n in ends if any(op.name == n for op in chosen))
            chosen = [op for op in chosen if op.name not in ends]
        bits = self.bits if self.bits is not None else MODE_BITS.get(self.mode, 4)
        layers: dict[str, dict] = {}
        built: dict[str, BinaryModule] = {}
        with torch.no_grad():
            for op in chosen:
                w = op.weight().detach()
                first = built.get(op.key)
                module = BINARY_CLASSES[op.kind](op.kind, op.spec, self.mode, bits, w, op.bias(),
                                                 self.decode == "once")
                if first is not None:  # a tied weight: point at the same stored tensors
                    module.codes, module.alpha = first.codes, first.alpha
                else:
                    built[op.key] = module
                    stats = {"bytes_before": w.numel() * w.element_size(),
                             "bytes_after": module.weight_bits() // 8}
                    if self.mode == "pow2":
                        stats["e_max"] = module.e_max
                    elif self.mode == "ternary":
                        stats["zeros"] = float((module.weight_float() == 0).float().mean())
                    layers[op.name] = stats
                op.replace_with(module)
        n = sum(m.numel for m in built.values())
        stored_bits = sum(m.weight_bits() for m in built.values())
        return PassResult(gm, changed=bool(chosen), stats={
            "layers": layers, "mode": self.mode, "bits": bits, "kept_float": kept,
            "weights": n, "bits_per_weight": stored_bits / n if n else 0.0})
