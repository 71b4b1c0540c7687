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
* ``dispatch="fastest"`` (default): a compiled call has a fixed cost (Dynamo's guards and
  wrappers: 0.15-0.2 ms on an AVX2 EPYC core), more than a small model's whole eager
  forward at batch 1. For each size of input (its elements, by powers of two, and the
  thread count) the first calls run the compiled graph and the compiled model's own
  uncompiled copy in turn, timed, and later calls of that size run the faster
  (:attr:`CompiledModel.choices`); ``dispatch="compiled"`` runs every call compiled.

The caller's model is never modified: the compiled model runs a structural copy (own
module objects, shared tensors; nothing writes into a tensor) in eval mode, without
gradients.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as _inductor_config
import torch.fx.experimental._config as _shape_config

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass as _CustomGraphPass
except ImportError:  # an older torch: the pass only keys Inductor's cache
    _CustomGraphPass = object

from fxpress.errors import CompileError, FxpressError, InputError
from fxpress.graph.artifact.values import escape_controls
from fxpress.passes.int8_traced import (choose_product, define_traced_ops, small_calls_allowed,
                                        traced_product)

__all__ = ["compile", "CompiledModel", "choose_path", "size_key"]


class CompiledModel(torch.nn.Module):
    """A compiled copy of a model (see :func:`compile`).

    ``module``: the copy that is compiled (eval mode); ``compiles``: how many graphs
    Inductor has compiled so far (1 after the first call; more means a recompile);
    ``compile_seconds``: wall time of the calls that compiled.
    """

    def __init__(self, module: torch.nn.Module, *, dynamic: bool, freeze: bool, mode: str | None,
                 backend: str = "inductor", product: tuple[str, int] = ("int_mm", 255),
                 small_calls: bool = False, dispatch: str = "fastest"):
        super().__init__()
        self.module = module
        #: "fastest" (each size of call runs compiled or eager, whichever its first calls
        #: timed faster) or "compiled" (every call compiled)
        self.dispatch = dispatch
        #: (threads, size) -> "compiled" or "eager": the path chosen for calls of that size
        #: (:func:`size_key`); filled as sizes are first seen, with ``dispatch="fastest"``
        self.choices: dict[tuple[int, int], str] = {}
        #: (threads, size) -> ([eager seconds], [compiled seconds]) of the calls timed so far
        self._trials: dict[tuple[int, int], tuple[list, list]] = {}
        self._called = False
        #: the int8 product its dynamic int8 linears trace (:func:`~fxpress.passes.int8_traced.choose_product`)
        self.product = product
        #: whether its int8 layers run small calls in float, as eager (decode=auto)
        self.small_calls = small_calls
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
        if self.dispatch == "compiled" or not self._called:
            self._called = True
            return self._run_compiled(args, kwargs)
        key = size_key(args, kwargs)
        choice = self.choices.get(key)
        if choice == "eager":
            return self._run_eager(args, kwargs)
        if choice == "compiled":
            return self._run_compiled(args, kwargs)
        return self._trial(key, args, kwargs)

    def _run_eager(self, args: tuple, kwargs: dict) -> Any:
        """The call on the uncompiled copy, without gradients (as compiled calls run)."""
        try:
            with torch.no_grad():
                return self.module(*args, **kwargs)
        except FxpressError:
            raise
        except Exception as e:  # noqa: BLE001 - typed, named, cause kept
            raise self._eager_failure(e) from e

    def _trial(self, key: tuple[int, int], args: tuple, kwargs: dict) -> Any:
        """One call of a size not yet decided: the compiled graph and the eager copy run in
        turn (compiled first, so that a size that needs a new graph compiles it at once),
        each timed (wall time: what the caller waits); after ``TRIAL_CALLS`` timed calls of
        each, beyond a first untimed one (caches, prepacking), the faster minimum is chosen
        for this size. A compiled call that compiled a graph is not timed."""
        eager_s, compiled_s = self._trials.setdefault(key, ([], []))
        compiled_turn = len(compiled_s) <= len(eager_s)
        before = self.compiles
        start = _clock()
        out = self._run_compiled(args, kwargs) if compiled_turn else self._run_eager(args, kwargs)
        took = _clock() - start
        if not (compiled_turn and self.compiles != before):
            (compiled_s if compiled_turn else eager_s).append(took)
        if min(len(eager_s), len(compiled_s)) > TRIAL_CALLS:
            self.choices[key] = choose_path(eager_s[1:], compiled_s[1:])
            del self._trials[key]
        return out

    def _run_compiled(self, args: tuple, kwargs: dict) -> Any:
        if self.compiles > 0:
            # a call that runs a graph compiled already needs none of the settings below that
            # only tracing and code generation read (torch's config patches took 140 us a
            # call, more than the digits MLP's whole eager forward at batch 1): tried
            # under Dynamo's "fail_on_recompile" stance, which refuses, before running
            # anything, a call that would trace; that call then takes the full path
            try:
                with torch.inference_mode(False), torch.no_grad(), \
                        torch.compiler.set_stance("fail_on_recompile"), \
                        traced_product(self.product, self.small_calls):
                    args, kwargs = _plain(args), _plain(kwargs)
                    return self._compiled(*args, **kwargs)
            except FxpressError:
                raise
            except Exception as e:  # noqa: BLE001 - a recompile, or typed below
                if not (isinstance(e, RuntimeError) and _RECOMPILE in str(e)):
                    raise self._failure(e, args, kwargs) from e
        before = self.compiles
        start = time.perf_counter()
        try:
            # size-oblivious: a dimension of size 1 (one sentence) is not specialised, so
            # batch 1 runs the graph compiled for any batch size instead of compiling again
            # no duck sizes: two dimensions of one size in the example (32 sentences of 32
            # tokens, an 8x8 input of an 8-wide linear) are not made one symbol, whose
            # equality Dynamo guarded: the next batch size compiled a second graph
            # freezing is read while Dynamo traces (which inputs are weights) and while
            # Inductor compiles: set for the call (torch's config is process-wide; restored)
            # allow_rnn: LSTM/GRU/RNN (fused calls) are traced, not refused; specialize_float:
            # a module's float attribute (an LSTM's dropout) is a constant, not a symbol
            # whose specialisation makes Dynamo trace the whole model a second time
            # inference mode off and inference tensors copied (see _plain): Dynamo guards
            # each input's dispatch keys, which inference mode changes, and a call under
            # torch.inference_mode() (or on a tensor made there) compiled a graph of its own
            # small_work_serial: generated kernels fork threads only for enough work (its
            # pass keys Inductor's cache)
            with torch.inference_mode(False), torch.no_grad(), \
                    _shape_config.patch(backed_size_oblivious=True, use_duck_shape=False), \
                    _inductor_config.patch(freezing=self.freeze,
                                           post_grad_custom_post_pass=_serial_pass()), \
                    torch._dynamo.config.patch(allow_rnn=True, specialize_float=True), \
                    small_work_serial(), traced_product(self.product, self.small_calls):
                args, kwargs = _plain(args), _plain(kwargs)
                out = self._compiled(*args, **kwargs)
        except FxpressError:
            raise
        except Exception as e:  # noqa: BLE001 - typed, named, cause kept
            raise self._failure(e, args, kwargs) from e
        if self.compiles != before:
            self.compile_seconds += time.perf_counter() - start
        return out

    def _failure(self, error: Exception, args: tuple, kwargs: dict) -> FxpressError:
        """The typed error for a raw ``error`` of a compiled call (tracing, code generation
        or the generated code): the model's copy runs the same call uncompiled (no
        gradients, eval mode, the caller's RNG untouched) to say whose fault it is. A
        loaded artifact's graph raises its own typed error there, naming the file, node and
        module (:func:`fxpress.graph.artifact.calls.diagnose`: a crafted layer of other
        widths); another model failing there too is the inputs' (or the model's) fault,
        :class:`InputError` naming the node; a model that runs uncompiled is torch.compile's,
        :class:`CompileError` naming the model and the node its tracing failed at."""
        from fxpress.graph.artifact.calls import describe_node, error_text, failing_node

        module = self.module
        label = getattr(module, "fxpress_file", None) or type(module).__name__
        graph = module if isinstance(module, torch.fx.GraphModule) else None
        node = failing_node(graph, error) if graph is not None else None
        at = f" at {describe_node(node, graph)}" if node is not None else ""
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                module(*args, **kwargs)
        except FxpressError as typed:
            return typed
        except Exception as eager:  # noqa: BLE001 - located, then reported typed
            return self._eager_failure(eager, " too")
        return CompileError(escape_controls(
            f"fxpress.compile: torch.compile failed on {label}{at} ({error_text(error)}), "
            f"which runs uncompiled on these inputs; try freeze=False, or backend='aot_eager' "
            f"to see whether tracing or code generation fails, or run the model uncompiled"))

    def _eager_failure(self, eager: Exception, too: str = "") -> InputError:
        """The typed error for a raw ``eager`` error of the uncompiled copy's call (the
        path ``dispatch="fastest"`` chose for a size, or :meth:`_failure`'s check): the
        inputs' or the model's fault, the failing node named."""
        from fxpress.graph.artifact.calls import describe_node, error_text, failing_node

        module = self.module
        label = getattr(module, "fxpress_file", None) or type(module).__name__
        graph = module if isinstance(module, torch.fx.GraphModule) else None
        node = failing_node(graph, eager) if graph is not None else None
        at = f" at {describe_node(node, graph)}" if node is not None else ""
        return InputError(escape_controls(
            f"fxpress.compile: {label} fails uncompiled{too}{at} on these inputs "
            f"({error_text(eager)}); the compiled model computes what the model computes: "
            f"check the inputs' shapes and dtypes against the model's"))

    def extra_repr(self) -> str:
        return (f"compiles={self.compiles}, freeze={self.freeze}, int8={self.product[0]}, "
                f"dispatch={self.dispatch}")


#: the clock the trial calls are timed with (wall time: what a caller waits)
_clock = time.perf_counter
#: timed calls of each path (after one untimed call of each) before a size's path is chosen
TRIAL_CALLS = 3
DISPATCH = ("fastest", "compiled")


def size_key(args: tuple, kwargs: dict) -> tuple[int, int]:
    """The size class of a call, which :class:`CompiledModel` chooses a path for: (torch's
    thread count, bit length of the number of elements of its tensor arguments, those in a
    list or tuple argument included): sizes within a factor of two share a choice."""
    elements = 0
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            elements += value.numel()
        elif isinstance(value, (tuple, list)):
            elements += sum(v.numel() for v in value if isinstance(v, torch.Tensor))
    return torch.get_num_threads(), elements.bit_length()


def choose_path(eager_s: list[float], compiled_s: list[float]) -> str:
    """"eager" where the fastest timed eager call took no longer than the fastest compiled one
    (the least of a few wall times: a call that waited for a core is not the one kept), else
    "compiled"."""
    return "eager" if min(eager_s) <= min(compiled_s) else "compiled"


#: how Dynamo's "fail_on_recompile" stance words its refusal (a RuntimeError)
_RECOMPILE = "Detected recompile when torch.compile stance is 'fail_on_recompile'"


def _plain(values: Any) -> Any:
    """``values`` (a tuple or dict of call arguments, nested) with every inference tensor
    (one made under ``torch.inference_mode()``) replaced by a copy made outside it: its
    dispatch keys differ from an ordinary tensor's, and Dynamo guards them, so each kind
    of input compiled a graph of its own. Other values are passed as they are."""
    from torch.utils._pytree import tree_map_only

    flat = values.values() if isinstance(values, dict) else values
    if not any(isinstance(v, (tuple, list, dict)) or isinstance(v, torch.Tensor) and v.is_inference()
               for v in flat):
        return values  # the common call: tensors made outside inference mode (microseconds)
    return tree_map_only(torch.Tensor, lambda t: t.clone() if t.is_inference() else t, values)


#: elements of work below which a generated kernel runs on the calling thread: aten's own
#: ``at::internal::GRAIN_SIZE``, below which its kernels do not fork threads either
GRAIN = 32768
_PENDING = threading.local()


class _SerialSmallKernels(_CustomGraphPass):
    """A no-op post-grad pass whose only role is its ``uuid``: Inductor's graph cache keys
    on it, so code generated without :func:`small_work_serial` (an earlier version, or a
    plain ``torch.compile``) is not served to :func:`compile`. It runs the pass it
    replaces, if any."""

    def __init__(self, previous: Any):
        self.previous = previous

    def __call__(self, graph: Any) -> None:
        if self.previous is not None:
            self.previous(graph)

    def uuid(self) -> Any:
        previous = None if self.previous is None else getattr(self.previous, "uuid", lambda: None)()
        return ("fxpress.compile: omp parallel if(work >= GRAIN)", GRAIN, previous)


def _serial_pass() -> Any:
    """The post-grad pass a :class:`CompiledModel` call sets: the caller's own, wrapped in
    :class:`_SerialSmallKernels` (made once per pass it wraps)."""
    previous = _inductor_config.post_grad_custom_post_pass
    if isinstance(previous, _SerialSmallKernels):
        return previous
    held = _SERIAL_PASSES.get(id(previous))
    if held is None or held.previous is not previous:
        held = _SERIAL_PASSES[id(previous)] = _SerialSmallKernels(previous)
    return held


_SERIAL_PASSES: dict = {}


@contextlib.contextmanager
def small_work_serial() -> Iterator[None]:
    """While Inductor generates C++ in this thread (here: the calls of a
    :class:`CompiledModel`), give every ``#pragma omp parallel`` of a kernel whose size
    depends on the input an ``if(elements >= GRAIN)`` clause.

    Inductor decides once, from the size it compiled at, whether a loop forks threads:
    compiled at batch 128, a one-row call forked an OpenMP team in every kernel, and on a
    machine whose cores other processes hold each fork waits for a time slice (the digits
    MLP's compiled int8 layers: 25 ms a call at batch 1 against 0.9 ms with the clause;
    aten's eager kernels run such sizes on the calling thread). With the clause the
    decision is taken per call, as aten takes it. A static size keeps Inductor's own
    decision. The code generator is patched once per process and acts only inside this
    context, in this thread (other compiles are untouched); where it is not as expected
    (another torch), nothing is patched."""
    if not _patch_codegen():
        yield
        return
    outer = getattr(_PENDING, "active", False)
    _PENDING.active = True
    try:
        yield
    finally:
        _PENDING.active = outer


_PATCHED: list = []


def _patch_codegen() -> bool:
    """Wrap Inductor's C++ loop generation (once): see :func:`small_work_serial`."""
    if _PATCHED:
        return _PATCHED[0]
    try:
        from torch._inductor.codegen import cpp as cg
        from torch._inductor.codegen.cpp_utils import cexpr_index
        from torch._inductor.utils import sympy_product

        loops, parallel = cg.CppKernel.codegen_loops_impl, cg.WorkSharing.parallel
    except (ImportError, AttributeError):
        _PATCHED.append(False)
        return False

    def codegen_loops_impl(self: Any, loop_nest: Any, code: Any, worksharing: Any) -> Any:
        if not getattr(_PENDING, "active", False):
            return loops(self, loop_nest, code, worksharing)
        work = sympy_product(self.call_ranges or ())
        _PENDING.work = None if getattr(work, "is_number", True) else \
            cexpr_index(self.rename_indexing(work))
        try:
            return loops(self, loop_nest, code, worksharing)
        finally:
            _PENDING.work = None

    def serial_if_small(self: Any, threads: int) -> None:
        opening = not self.in_parallel or threads != self.num_threads
        parallel(self, threads)
        work, lines = getattr(_PENDING, "work", None), getattr(self.code, "_lines", None)
        if not (opening and work and lines):
            return
        # the pragma, then "{" and "int tid = ..." that open the region
        for i in range(len(lines) - 1, max(len(lines) - 4, -1), -1):
            if isinstance(lines[i], str) and lines[i].lstrip().startswith("#pragma omp parallel"):
                lines[i] = f"{lines[i]} if({work} >= {GRAIN})"
                break

    cg.CppKernel.codegen_loops_impl, cg.WorkSharing.parallel = codegen_loops_impl, serial_if_small
    _PATCHED.append(True)
    return True


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
            max_bytes: int | None = None, dispatch: str = "fastest") -> CompiledModel:
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
    without generating code: a quick check that a model compiles). ``dispatch``:
    ``"fastest"`` runs each size of call compiled or uncompiled, whichever its first calls
    timed faster (with ``example_inputs``, their size is decided here); ``"compiled"``
    runs every call compiled.

    Compiling MiniLM takes tens of seconds on two cores (see README "Compiled models").
    """
    from fxpress.graph.capture import clone_structure
    from fxpress.graph.custom_functions import inference_graph
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
    if dispatch not in DISPATCH:
        raise InputError(f"fxpress.compile: dispatch must be one of {list(DISPATCH)}, got {dispatch!r}")
    if mode is not None and backend != "inductor":
        raise InputError("fxpress.compile: mode= is Inductor's; give it with backend='inductor'")
    define_traced_ops()
    # a model's autograd.Function nodes as their forward's ops (dynamo cannot call them
    # through fxpress's node target; a compiled model is for inference)
    copy = clone_structure(inference_graph(model, "fxpress.compile")).train(False)
    if getattr(model, "fxpress_file", None):  # a loaded artifact's errors name its file
        copy.fxpress_file = model.fxpress_file
    if freeze:
        _unfuse_rnns(copy)
    _time_major_rnns(copy)
    product = choose_product(freeze, backend)
    compiled = CompiledModel(copy, dynamic=dynamic, freeze=freeze, mode=mode, backend=backend,
                             product=product, small_calls=product[0] == "onednn" and small_calls_allowed(),
                             dispatch=dispatch)
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        compiled(*args)
        # the path for the example's size, chosen now (the calls of the trial; bounded: a
        # graph that compiled again on every call would never be timed)
        key = size_key(args, {})
        for _ in range(4 * (TRIAL_CALLS + 1)):
            if dispatch != "fastest" or key in compiled.choices:
                break
            compiled(*args)
    return compiled
