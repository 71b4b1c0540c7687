"""The runtime-module contract: the modules a pass writes into a graph.

:class:`RuntimeModule` is what an artifact can store as data (tensors + a JSON config,
rebuilt without ``__init__`` or pickle); :class:`CompressedModule` is a runtime module that
replaces a weighted op (linear, conv, embedding) whose weight it stores compressed and
decodes on demand, and that a recovery step can fine-tune (``begin_training`` /
``end_training``). :func:`op_forward` computes any weighted op from a decoded weight.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F

from fxpress.graph.memory import caches_enabled
from fxpress.graph.weights import CONV, EMBEDDING, KINDS, LINEAR, stored_conv_transpose_weight

# -- computing an op from a (decoded) weight: shared by every runtime module -----------------

def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 spec: dict) -> torch.Tensor:
    """Compute a conv exactly as ``nn.ConvNd`` (or ``nn.ConvTransposeNd``) would, from a spec
    of :class:`WeightedOp` and a weight in its layout (output channels first)."""
    if spec.get("transposed"):
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spec["dims"] - 1]
        return fn(x, stored_conv_transpose_weight(weight, spec["groups"]), bias, spec["stride"],
                  spec["padding"], spec["output_padding"], spec["groups"], spec["dilation"])
    fn = (F.conv1d, F.conv2d, F.conv3d)[spec["dims"] - 1]
    if spec.get("padding_mode", "zeros") != "zeros":
        x = F.pad(x, spec["reversed_padding"], mode=spec["padding_mode"])
        padding: Any = 0
    else:
        padding = spec["padding"]
    return fn(x, weight, bias, spec["stride"], padding, spec["dilation"], spec["groups"])


def op_forward(kind: str, spec: dict, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """Compute a weighted op of ``kind`` with the given weight (layout of :meth:`WeightedOp.weight`).

    A decoded weight is float32 (codes, scales and codebooks are stored so); with another
    floating input (a ``model.double()``) the weight and bias take the input's dtype, as
    the model's own layer computed."""
    if kind != EMBEDDING and x.is_floating_point() and weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    if kind == LINEAR:
        return F.linear(x, weight, bias)
    if kind == CONV:
        return conv_forward(x, weight, bias, spec)
    if kind == EMBEDDING:
        return F.embedding(x, weight, spec.get("padding_idx"))
    raise ValueError(f"unknown weighted op kind {kind!r}")


class RuntimeModule(torch.nn.Module):
    """Base of every module a pass writes into a graph, so artifacts can store it as data.

    The contract: all tensors are parameters or buffers (``state_dict`` holds exactly what
    is stored), and every other attribute the module needs is returned by :meth:`config`
    as JSON-able values (tuples come back as lists). :meth:`from_state` rebuilds the
    module from that config and the tensors without running ``__init__`` and without
    pickle: it sets each config key as an attribute, then registers the tensors.
    Subclasses list tensors that may be ``None`` in ``optional_tensors``.
    """

    #: tensor names that may be None (e.g. "bias"); registered as None buffers on rebuild
    optional_tensors: tuple[str, ...] = ()

    def config(self) -> dict:
        """JSON-able attributes (everything but tensors) needed to rebuild the module."""
        return {}

    @classmethod
    def load_bytes(cls, config: dict) -> int:
        """Bytes :meth:`from_state` allocates from ``config`` beyond its stored tensors
        (tensors it decodes at load); the loader counts them against its decoded-bytes
        limit before any module is built. ``config`` is the file's, checked only as plain
        data: raise on a malformed one."""
        return 0

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor],
                   parameters: Iterable[str] = ()) -> "RuntimeModule":
        """Rebuild from :meth:`config` and the state_dict tensors (``parameters``: which
        of them are trainable parameters rather than buffers)."""
        m = cls.__new__(cls)
        torch.nn.Module.__init__(m)
        for k, v in config.items():
            setattr(m, k, v)
        for name in cls.optional_tensors:
            if name not in tensors:  # a present one is registered below, as what it is
                m.register_buffer(name, None)
        params = set(parameters)
        for name, t in tensors.items():
            if name in params:
                m._buffers.pop(name, None)  # an optional tensor (bias) stored as a parameter
                m.register_parameter(name, torch.nn.Parameter(t, requires_grad=t.is_floating_point()))
            else:
                m.register_buffer(name, t)
        return m


class CompressedModule(RuntimeModule):
    """Base of the runtime modules that replace a weighted op (``Int8Linear``,
    ``CodebookLinear``, ...): a linear, conv or embedding whose weight is stored in a
    compressed form and decoded by :meth:`weight_float`.

    Subclasses store only the compressed tensors (packed integers, codebooks, scales) as
    buffers or parameters, so ``state_dict`` is the compressed size, and implement
    ``weight_float``; ``forward`` computes the op from the decoded weight unless a
    subclass has a faster path. ``config()`` must include everything but tensors.
    """

    #: The pass that writes this module ("quantize", "share", ...).
    technique: str = ""
    optional_tensors = ("bias",)
    #: ``False``: decode the weight on every call (memory: only the compressed tensors are
    #: held). ``True``: decode once and keep the dense weight (speed); the copy is a
    #: non-persistent buffer, so ``state_dict`` (and the artifact) stay the compressed size.
    cache_weight: bool = False

    def __init__(self, kind: str, spec: dict | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.spec = dict(spec or {})

    def weight_float(self) -> torch.Tensor:
        """The decoded weight, in the layout of :meth:`WeightedOp.weight`."""
        raise NotImplementedError

    def count_weights(self) -> tuple[int, int]:
        """(weights, non-zeros) of the decoded weight. This decodes it whole; a subclass
        that can decode a part at a time overrides it, so counting holds no full copy."""
        with torch.no_grad():
            w = self.weight_float()
        return w.numel(), int(torch.count_nonzero(w))

    def dense_weight(self) -> torch.Tensor:
        """The weight to compute with: decoded now, or the copy kept when ``cache_weight``.

        While the module is fine-tuned (a non-bias parameter requires grad) it always
        decodes, so gradients reach what is trained.
        """
        if not self.keeps_decoded() or any(p is not None and p.requires_grad for n, p in
                                           self._parameters.items() if n != "bias"):
            return self.weight_float()
        # a plain attribute, not a buffer: a run-time cache is no tensor of the model
        # (state_dict, named_buffers and checksums never see it); moving the module drops it
        cached = self.__dict__.get("weight_cache")
        if cached is None:
            with torch.no_grad():
                cached = self.weight_float()
            # under torch.compile the decode is part of the graph (a constant once frozen):
            # keeping the copy would change the module and recompile the next call
            if caches_enabled() and not torch.compiler.is_compiling():
                self.__dict__["weight_cache"] = cached
        return cached

    def keeps_decoded(self) -> bool:
        """Whether :meth:`dense_weight` keeps the decoded copy (a subclass with decode
        strategies decides by its strategy)."""
        return self.cache_weight

    def drop_cache(self) -> None:
        """Forget the decoded copy (after the compressed tensors change)."""
        self.__dict__.pop("weight_cache", None)

    def _apply(self, fn, recurse=True):
        self.drop_cache()  # .to(), .half(), ...: decoded again from the moved tensors
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # subclasses register ``bias`` as a parameter or buffer (or leave it None)
        return op_forward(self.kind, self.spec, x, self.dense_weight(), getattr(self, "bias", None))

    def config(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "cache_weight": bool(self.cache_weight)}

    # -- fine-tuning (the distill pass's recovery step) ----------------------------------
    def begin_training(self) -> list[torch.nn.Parameter]:
        """Prepare to be fine-tuned; return the parameters an optimizer may update.

        The default trains nothing (the compressed weight stays frozen). A subclass that
        can be fine-tuned returns e.g. its codebook (gradients of weights sharing a
        centroid sum into it), or a float latent weight used through a straight-through
        estimator; every forward in training must stay on the module's grid.
        """
        return []

    def remember_zeros(self, w: torch.Tensor) -> None:
        """Record which weights are exactly zero as fine-tuning starts: they stay zero
        (pruned weights), whatever a latent float weight learns. See :meth:`keep_zeros`."""
        mask = w.detach() == 0
        self._zero_mask = mask if bool(mask.any()) else None

    def keep_zeros(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` with the weights recorded by :meth:`remember_zeros` forced to zero (their
        gradient is zero too, so an optimizer never moves them)."""
        mask = getattr(self, "_zero_mask", None)
        return w if mask is None else w.masked_fill(mask.view(w.shape), 0)

    def end_training(self) -> None:
        """Leave training: fold what was learned back into the compressed storage (e.g.
        re-quantise a latent weight) so ``state_dict`` is again exactly the compressed form."""

    def weight_bits(self) -> int:
        """Bits this module stores for its weight (bias excluded)."""
        return sum(t.numel() * t.element_size() * 8 for n, t in self.state_dict().items()
                   if n != "bias")

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def kind_classes(base: type[CompressedModule], prefix: str, what: str) -> dict[str, type]:
    """One subclass of ``base`` per op kind, ``{prefix}Linear``, ``{prefix}Conv`` and
    ``{prefix}Embedding``, defined in ``base``'s module (the names artifacts store), so a
    pass's runtime modules say by their class which op they replaced.

    >>> classes = kind_classes(CompressedModule, "Example", "with an example weight")
    >>> classes[LINEAR].__name__, classes[LINEAR].__doc__
    ('ExampleLinear', 'A linear layer with an example weight (see :class:`CompressedModule`).')
    """
    out = {}
    for kind, suffix, noun in ((LINEAR, "Linear", "linear layer"), (CONV, "Conv", "conv layer"),
                               (EMBEDDING, "Embedding", "embedding")):
        name = prefix + suffix
        out[kind] = type(name, (base,), {
            "__module__": base.__module__, "__qualname__": name,
            "__doc__": f"A {noun} {what} (see :class:`{base.__name__}`)."})
    return out


def compressed_modules(gm: torch.nn.Module) -> list[tuple[str, CompressedModule]]:
    """Every runtime module of ``gm`` with its qualified name."""
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, CompressedModule)]


def trainable_modules(gm: torch.nn.Module) -> list[tuple[str, RuntimeModule]]:
    """Every runtime module a recovery step trains through its ``begin_training()`` /
    ``end_training()`` hooks: the compressed modules and any other runtime module that
    defines both (``passes/small.py``'s grid-stored norms and constants)."""
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, RuntimeModule) and (
        isinstance(m, CompressedModule) or (callable(getattr(m, "begin_training", None))
                                            and callable(getattr(m, "end_training", None))))]


__all__ = ["RuntimeModule", "CompressedModule", "compressed_modules", "trainable_modules", "kind_classes", "op_forward",
           "conv_forward"]
