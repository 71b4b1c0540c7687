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
    if bias is not None and bias.dtype != weight.dtype:  # a float64 model's bias, float32 codebook
        bias = bias.to(weight.dtype)
    if kind == LINEAR:
        return F.linear(x, weight, bias)
    if kind == CONV:
        return conv_forward(x, weight, bias, spec)
    if kind == EMBEDDING:
        return F.embedding(x, weight, spec.get("padding_idx"))
    raise ValueError(f"unknown weighted op kind {kind!r}")



# -- checking a module rebuilt from a file: shared by every runtime module's from_state ----

class StateError(ValueError):
    """A runtime module's config disagrees with itself or with its stored tensors; raised by
    ``from_state`` (the artifact loader reports it as an ``ArtifactFormatError`` naming the
    module), so a crafted file is refused at load, not at the module's first call."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class StateCheck:
    """Checks of one module's config fields and stored tensors, each naming the field.

    ``from_state`` runs them after rebuilding the module: every field is read from the
    module (where the file's config put it), and the first that does not fit raises
    :class:`StateError` ``"<field>: <what>"``.

    >>> m = torch.nn.Module(); m.bits = 9
    >>> StateCheck(m).integer("bits", 2, 8)
    Traceback (most recent call last):
    ...
    fxpress.graph.runtime.StateError: config 'bits': is 9, expected an int in [2, 8]
    """

    def __init__(self, module: torch.nn.Module):
        self.m = module

    def fail(self, field: str, what: str) -> None:
        raise StateError(f"{field}: {what}")

    def value(self, name: str) -> Any:
        return getattr(self.m, name, None)

    def choice(self, name: str, choices: Iterable[Any]) -> Any:
        return self.choice_of(name, self.value(name), tuple(choices))

    def flag(self, name: str) -> bool:
        return self.choice(name, (False, True))

    def integer(self, name: str, low: int | None = None, high: int | None = None) -> int:
        v = self.value(name)
        if not _is_int(v) or (low is not None and v < low) or (high is not None and v > high):
            self.fail(f"config {name!r}", f"is {v!r}, expected an int in [{low}, {high}]"
                      if high is not None else f"is {v!r}, expected an int >= {low}")
        return v

    def sizes(self, name: str, dims: Iterable[int], low: int = 1, value: Any = None) -> list[int]:
        """A list of ints >= ``low`` whose length is one of ``dims`` (``value``: check that
        instead of the attribute, e.g. an entry of a nested config)."""
        v = self.value(name) if value is None else value
        dims = tuple(dims)
        if not (isinstance(v, (list, tuple)) and len(v) in dims
                and all(_is_int(d) and d >= low for d in v)):
            self.fail(f"config {name!r}", f"is {v!r}, expected {'/'.join(map(str, dims))} "
                      f"ints >= {low}")
        return list(v)

    def tensor(self, name: str, *, dtypes: Iterable[torch.dtype] | None = None,
               floating: bool = False, shape: Iterable[int] | None = None,
               numel: int | None = None, optional: bool = False,
               finite: bool = False, positive: bool = False) -> torch.Tensor | None:
        """The stored tensor ``name`` (a buffer or parameter), checked: present unless
        ``optional``, of one of ``dtypes`` (or any floating type), exactly ``shape`` or
        ``numel`` elements, and (``finite``/``positive``) its values."""
        t = self.m._parameters.get(name, self.m._buffers.get(name))
        field = f"tensor {name!r}"
        if t is None:
            if not optional:
                self.fail(field, "is missing")
            return None
        dtypes = tuple(dtypes) if dtypes is not None else None
        if (dtypes is not None and t.dtype not in dtypes) or (floating and not t.is_floating_point()):
            self.fail(field, f"is {str(t.dtype).removeprefix('torch.')}, expected "
                      + ("/".join(str(d).removeprefix("torch.") for d in dtypes) if dtypes
                         else "a floating type"))
        if shape is not None and list(t.shape) != list(shape):
            self.fail(field, f"has shape {list(t.shape)}, expected {list(shape)}")
        if numel is not None and t.numel() != numel:
            self.fail(field, f"has {t.numel()} elements, expected {numel}")
        if finite or positive:
            with torch.no_grad():
                # positive is finite too: an inf smoothing factor or scale passed ``t > 0``
                bad = ~torch.isfinite(t)
                if positive:
                    bad = bad | ~(t > 0)
            if bool(bad.any()):
                self.fail(field, "holds " + ("non-finite or non-positive" if positive
                                             else "non-finite") + " values")
        return t

    def weight_shape(self, kind: str) -> list[int]:
        """``shape`` of a compressed weighted op: 2 positive sizes (a linear's or
        embedding's), or a conv's 3-5 (as many as its ``spec``'s dims + 2)."""
        if kind == CONV:
            return self.sizes("shape", (3, 4, 5))
        return self.sizes("shape", (2,))

    def conv_spec(self, spec: Any, shape: list[int]) -> None:
        """A conv's ``spec`` (as :func:`conv_forward` reads it) against its weight's shape."""
        field = "config 'spec'"
        dims = len(shape) - 2
        if not isinstance(spec, dict) or spec.get("dims") != dims or isinstance(spec.get("dims"), bool):
            self.fail(field, f"dims {spec.get('dims') if isinstance(spec, dict) else spec!r} does "
                      f"not fit a weight of shape {shape}")
        for key, low in (("stride", 1), ("dilation", 1)):
            self.sizes(f"spec.{key}", (dims,), low, value=spec.get(key))
        padding = spec.get("padding")
        if not (padding in ("same", "valid") and not spec.get("transposed")):
            self.sizes("spec.padding", (dims,), 0, value=padding)
        groups = spec.get("groups")
        transposed = self.choice_of("spec.transposed", spec.get("transposed", False), (False, True))
        if not _is_int(groups) or groups < 1 or shape[0] % groups:
            self.fail("config 'spec.groups'", f"is {groups!r}, expected a positive int that "
                      f"divides the {shape[0]} output channels")
        if transposed:
            self.sizes("spec.output_padding", (dims,), 0, value=spec.get("output_padding"))
        mode = self.choice_of("spec.padding_mode", spec.get("padding_mode", "zeros"),
                              ("zeros", "reflect", "replicate", "circular"))
        if mode != "zeros":
            if transposed:
                self.fail("config 'spec.padding_mode'", f"{mode!r} with a transposed conv")
            self.sizes("spec.reversed_padding", (2 * dims,), 0, value=spec.get("reversed_padding"))

    def choice_of(self, field: str, v: Any, choices: tuple) -> Any:
        """``v`` (config field ``field``) if it is one of ``choices``, of the same type."""
        if not any(type(v) is type(c) and v == c for c in choices):
            self.fail(f"config {field!r}", f"is {v!r}, expected one of {choices}")
        return v

    def op_spec(self, kind: str, spec: Any, shape: list[int]) -> None:
        """The ``spec`` of a compressed op of ``kind`` (a conv's fields; an embedding's
        ``padding_idx`` inside its rows)."""
        if not isinstance(spec, dict):
            self.fail("config 'spec'", f"is {type(spec).__name__}, expected a dict")
        if kind == CONV:
            self.conv_spec(spec, shape)
        elif kind == EMBEDDING:
            pi = spec.get("padding_idx")
            if pi is not None and not (_is_int(pi) and -shape[0] <= pi < shape[0]):
                self.fail("config 'spec.padding_idx'", f"is {pi!r}, outside the table's "
                          f"{shape[0]} rows")


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

    def check_loaded(self, check: StateCheck) -> None:
        """Refuse (:class:`StateError`) a module whose children, as the file built them,
        do not fit its config; the loader calls it once the whole module tree is built
        (``from_state`` runs before the children exist). The default checks nothing."""

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
    #: the op kind of this class's modules (``kind_classes`` sets it); None: any of KINDS
    _op_kind: str | None = None
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

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor],
                   parameters: Iterable[str] = ()) -> "CompressedModule":
        m = super().from_state(config, tensors, parameters)
        m.check_state(StateCheck(m))
        return m

    def check_state(self, check: StateCheck) -> None:
        """Refuse (:class:`StateError`, naming the field) a module rebuilt from a file whose
        config does not fit itself or its stored tensors, which every call would otherwise
        fail on (or compute past) long after the file loaded. The base checks ``kind``
        (the class's own), ``cache_weight``, and with a ``shape``: its sizes, the op's
        ``spec`` and ``bias``; subclasses add their tensors, calling this first."""
        kind = check.choice("kind", (self._op_kind,) if self._op_kind else KINDS)
        check.flag("cache_weight")
        if "shape" in self.__dict__:
            shape = check.weight_shape(kind)
            check.op_spec(kind, self.spec, shape)
            check.tensor("bias", optional=True, floating=True, shape=[shape[0]])
        elif not isinstance(self.spec, dict):
            check.fail("config 'spec'", f"is {type(self.spec).__name__}, expected a dict")

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
            "__module__": base.__module__, "__qualname__": name, "_op_kind": kind,
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


__all__ = ["RuntimeModule", "CompressedModule", "StateCheck", "StateError", "compressed_modules", "trainable_modules", "kind_classes", "op_forward",
           "conv_forward"]
