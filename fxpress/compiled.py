"""One call to a compiled model: :func:`compile` runs ``torch.compile`` (Inductor) on a
compressed graph, a loaded artifact or any module, with the settings that make fxpress's
runtime modules fast and whole.

>>> fast = fxpress.compile(res.module, example_inputs=(x,))     # doctest: +SKIP
>>> fast(x2)          # any batch size: one graph, compiled with dynamic shapes

What it does:

* every runtime module traces as one graph (``fullgraph=True``; no graph breaks): dynamic
  int8 linears take their traceable form (:mod:`fxpress.passes.int8_traced`), codebook,
  binary and low-bit modules decode their weight in the graph;
* shapes are dynamic (``dynamic=True``): a second batch size or sequence length reuses
  the compiled graph instead of compiling again (:attr:`CompiledModel.compiles` counts);
* ``freeze=True`` (default) lets Inductor treat the weights as constants: int8 products
  run aten's ``_int_mm`` on the stored codes with the input quantisation and the scales
  fused around it, and a weight stored as codes
  (4-bit, codebook, binary) is decoded once at compile time into a float constant - fast,
  but that float copy stays in memory for the compiled model's life (4-bit: 8x the stored
  weight). ``freeze=False`` keeps only the stored form and decodes on every call.

The caller's model is never modified: the compiled model runs a structural copy (own
module objects, shared tensors; nothing writes into a tensor) in eval mode, without
gradients.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as _inductor_config
import torch.fx.experimental._config as _shape_config

from fxpress.errors import CompileError, InputError

__all__ = ["compile", "CompiledModel"]


class CompiledModel(torch.nn.Module):
    """A compiled copy of a model (see :func:`compile`).

    ``module``: the copy that is compiled (eval mode); ``compiles``: how many graphs
    Inductor has compiled so far (1 after the first call; more means a recompile);
    ``compile_seconds``: wall time of the calls that compiled.
    """

    def __init__(self, module: torch.nn.Module, *, dynamic: bool, freeze: bool, mode: str | None,
                 backend: str = "inductor"):
        super().__init__()
        self.module = module
        self.compiles = 0
        self.compile_seconds = 0.0
        self.freeze = freeze
        self.backend = backend
        inner = torch._dynamo.lookup_backend(backend)

        def counted(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
            self.compiles += 1
            return inner(gm, example_inputs)

        # the compiled callable is not a submodule: state_dict stays the copy's own
        object.__setattr__(self, "_compiled", torch.compile(
            _own_frame(module), backend=counted if mode is None else backend, fullgraph=True,
            dynamic=dynamic, mode=mode))
        if mode is not None:
            self.compiles = -1  # Inductor's own mode handling: not counted

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        before = self.compiles
        start = time.perf_counter()
        try:
            # size-oblivious: a dimension of size 1 (one sentence) is not specialised, so
            # batch 1 runs the graph compiled for any batch size instead of compiling again
            # freezing is read while Dynamo traces (which inputs are weights) and while
            # Inductor compiles: set for the call (torch's config is process-wide; restored)
            # allow_rnn: LSTM/GRU/RNN (fused calls) are traced, not refused; specialize_float:
            # a module's float attribute (an LSTM's dropout) is a constant, not a symbol
            # whose specialisation makes Dynamo trace the whole model a second time
            with torch.no_grad(), _shape_config.patch(backed_size_oblivious=True), \
                    _inductor_config.patch(freezing=self.freeze), \
                    torch._dynamo.config.patch(allow_rnn=True, specialize_float=True):
                out = self._compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:
            raise CompileError(
                f"fxpress.compile: torch.compile failed on {type(self.module).__name__} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); try "
                f"freeze=False, or backend='aot_eager' to see whether tracing or code "
                f"generation fails, or run the model uncompiled") from e
        if self.compiles != before:
            self.compile_seconds += time.perf_counter() - start
        return out

    def extra_repr(self) -> str:
        return f"compiles={self.compiles}, freeze={self.freeze}"


def _own_frame(module: torch.nn.Module) -> Any:
    """``module(*args, **kwargs)`` from a code object of its own, for ``torch.compile``.

    Dynamo keeps its compiled graphs on the code object of the frame it starts from, at
    most ``recompile_limit`` (8) per code object, and fails past them under
    ``fullgraph=True``. Compiling a module directly starts at frames other compiled models
    share: its class's ``forward`` and its forward pre-hooks (an exported graph's input
    size check), so the ninth model compiled in one process failed. From a frame of its
    own the module's call, hooks included, is one graph of this compiled model's."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return module(*args, **kwargs)

    call.__code__ = call.__code__.replace()  # a new code object: Dynamo's cache is per object
    return call


def _unfuse_rnns(copy: torch.nn.Module) -> None:
    """Give each compressed LSTM/GRU/RNN of ``copy`` (a :class:`FusedCall`) its decoded
    matrices as its own parameters. The fused call hands them in anew on every call, and an
    RNN checks by identity whether its weights changed: compiled, that check fails on every
    call and recompiles. Frozen, the decoded matrices are constants of the compiled graph
    anyway, so this costs no memory the compiled model would not hold; the caller's model
    keeps its fused calls (``copy`` owns its module objects)."""
    from fxpress.graph.capture import clone_structure
    from fxpress.graph.fused import FusedCall

    for name, module in list(copy.named_modules()):
        if not (isinstance(module, FusedCall) and isinstance(module.host, torch.nn.RNNBase)):
            continue
        host = clone_structure(module.host)
        with torch.no_grad():
            for param, weight in module.decoded().items():
                owner_name, _, attr = param.rpartition(".")
                owner = host.get_submodule(owner_name)
                owner._parameters[attr] = torch.nn.Parameter(weight, requires_grad=False)
        host._init_flat_weights()
        parent_name, _, child = name.rpartition(".")
        setattr(copy.get_submodule(parent_name), child, host)


class _TimeMajor(torch.nn.Module):
    """A batch-first LSTM/GRU/RNN run time-major on a contiguous copy of its input.

    torch's RNN decomposition makes a batch-first input contiguous after transposing it,
    and whether that transposed view is contiguous depends on the batch being 1: compiled,
    the graph guarded batch != 1 and one sentence compiled a second graph. Here the input
    is copied time-major first (a fresh contiguous tensor: nothing to test), and the output
    copied back batch-first. The wrapped RNN is a shallow copy (the same weights) with
    ``batch_first=False``; unbatched and packed inputs, where the flag means nothing, go
    straight to it."""

    def __init__(self, rnn: torch.nn.RNNBase):
        super().__init__()
        import copy as _copy

        self.rnn = _copy.copy(rnn)
        self.rnn.batch_first = False

    def forward(self, x: Any, hx: Any = None) -> Any:
        if not (isinstance(x, torch.Tensor) and x.dim() == 3):
            return self.rnn(x, hx)
        out, h = self.rnn(x.transpose(0, 1).clone(memory_format=torch.contiguous_format), hx)
        # back batch-first, contiguous as the RNN gives it (a transposed view's reshape in
        # the next layer would test the batch for 1 in turn)
        return out.transpose(0, 1).clone(memory_format=torch.contiguous_format), h


def _time_major_rnns(copy: torch.nn.Module) -> None:
    """Wrap each batch-first RNN module of ``copy`` (its own module objects) in
    :class:`_TimeMajor`, so that batch 1 runs the graph compiled for any batch."""
    for name, module in list(copy.named_modules()):
        if isinstance(module, torch.nn.RNNBase) and module.batch_first and name:
            parent_name, _, child = name.rpartition(".")
            setattr(copy.get_submodule(parent_name), child, _TimeMajor(module))


def compile(model: Any, example_inputs: Any = None, *, dynamic: bool = True, freeze: bool = True,
            mode: str | None = None, backend: str = "inductor",
            max_bytes: int | None = None) -> CompiledModel:
    """``torch.compile`` a compressed model in one call; returns a :class:`CompiledModel`.

    ``model``: a module (a ``compress`` result's ``.module``, a loaded artifact, any
    ``nn.Module``), a :class:`~fxpress.PipelineResult`, or the path of an artifact
    (loaded with :func:`fxpress.load`, ``max_bytes`` passed on). ``example_inputs``
    (a tensor or a tuple): compile now, on them, instead of at the first call (the
    compile time is then in ``compile_seconds``; errors surface here). ``dynamic``:
    compile for any batch size and sequence length at once. ``freeze``: weights as
    constants (see the module docstring for the memory it costs). ``mode``: Inductor's
    mode (e.g. ``"max-autotune"``; then recompiles are not counted). ``backend``: another
    ``torch.compile`` backend (``"aot_eager"`` traces the same whole graph in seconds,
    without generating code: a quick check that a model compiles).

    Compiling MiniLM takes tens of seconds on two cores (see README "Compiled models").
    """
    from fxpress.graph.capture import clone_structure
    from fxpress.passes.records import PipelineResult

    if isinstance(model, (str, Path)):
        import fxpress

        model = fxpress.load(model, max_bytes=max_bytes)
    elif isinstance(model, PipelineResult):
        model = model.module
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"fxpress.compile: model must be a torch.nn.Module, a PipelineResult "
                         f"or an artifact path; got {type(model).__name__}")
    if mode is not None and not isinstance(mode, str):
        raise InputError(f"fxpress.compile: mode must be an Inductor mode name such as "
                         f"'max-autotune', got {mode!r}")
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise InputError(f"fxpress.compile: unknown backend {backend!r}; one of {sorted(known)}")
    if mode is not None and backend != "inductor":
        raise InputError("fxpress.compile: mode= is Inductor's; give it with backend='inductor'")
    from fxpress.passes.int8_traced import define_stored_op

    define_stored_op()
    copy = clone_structure(model).train(False)
    if freeze:
        _unfuse_rnns(copy)
    _time_major_rnns(copy)
    compiled = CompiledModel(copy, dynamic=dynamic, freeze=freeze, mode=mode, backend=backend)
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        compiled(*args)
    return compiled
