"""Capture a model as a torch.fx GraphModule, with shapes and dtypes on every node.

Two methods: ``fx`` (``torch.fx.symbolic_trace``) gives a readable graph of modules and
functions; ``export`` (``torch.export.export(...).module()``) captures what symbolic tracing
cannot (transformers' BERT and GPT-2) as ATen ops, with dynamic batch and sequence
dimensions. ``auto`` tries fx, checks the traced graph reproduces the model, and falls
back to export, recording in ``gm.meta["fxpress"]`` which method ran and why.

The caller's model is never modified: the returned graph owns its module objects
(parameters are shared, never written in place; see :func:`clone_structure`).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from fxpress.errors import CaptureError, FxpressError, InputError
from fxpress.graph.canonical import (canonical_embeddings, canonical_linears, canonical_weights,
                                     embedding_tables, zeroed_allocations)
from fxpress.graph import custom_functions
from fxpress.graph.input_sizes import guard_input_sizes
from fxpress.graph.outputs import plain_outputs

METHODS = ("auto", "fx", "export")


class TraceLock:
    """Tracing excludes running models in other threads, running models excludes tracing.

    ``torch.fx.symbolic_trace`` (and export's tracing) patch ``nn.Module.__call__`` for the
    whole process while they trace: a module called from another thread in that window
    would be recorded into the trace (or fail). fxpress holds :meth:`tracing` while it
    captures and :meth:`running` while a pipeline runs graphs, so concurrent pipelines
    stay independent. Both are re-entrant within a thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}
        self._writer: int | None = None
        self._depth = 0

    @contextlib.contextmanager
    def tracing(self):
        me = threading.get_ident()
        with self._cond:
            # a thread that is running graphs steps back while it traces, so two threads
            # that both trace from inside a run cannot wait on each other forever
            mine = self._readers.pop(me, 0)
            while self._writer not in (None, me) or self._readers:
                self._cond.wait()
            self._writer = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                if mine:
                    self._readers[me] = mine
                self._cond.notify_all()

    @contextlib.contextmanager
    def running(self):
        me = threading.get_ident()
        with self._cond:
            while self._writer not in (None, me):
                self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                self._cond.notify_all()


#: The process-wide lock between tracing and running models (see :class:`TraceLock`).
TRACE_LOCK = TraceLock()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put every submodule in eval mode for the block, then restore each flag as it was."""
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:  # not model.train(False): exported graphs refuse train()
        m.training = False
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def as_input_tuple(example_inputs: Any, what: str = "example_inputs",
                   model: torch.nn.Module | None = None) -> tuple:
    """Normalise example inputs to a tuple of positional arguments.

    A mapping (a tokenizer's ``BatchEncoding``, a dict of named tensors) is bound to
    ``model.forward``'s arguments by name, in their order; arguments it skips before the
    last one it names get their defaults.

    >>> as_input_tuple(torch.zeros(2, 3))[0].shape
    torch.Size([2, 3])
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        return _bind_by_name(_without_labels(example_inputs, model), what, model)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(
            f"{what} must be a tuple of positional inputs (e.g. (x,)) or a mapping of the "
            f"model's argument names to inputs, got {type(example_inputs).__name__}")
    return example_inputs


def _without_labels(named: Mapping, model: torch.nn.Module | None) -> Mapping:
    """Inputs without a data collator's label (``labels``/``label``, :data:`LABEL_KEYS`)
    where ``forward`` takes it only optionally: calibration and example inputs are what the
    model runs on, and a transformers model given ``labels`` computes a loss into its
    outputs (capture then held ``aten.cross_entropy_loss``, which no artifact may name, and
    the verifier compared the loss). A required label argument stays."""
    if model is None or not any(k in named for k in LABEL_KEYS):
        return named
    optional = {p.name for p in forward_parameters(model) if p.default is not p.empty}
    return {k: v for k, v in named.items() if k not in LABEL_KEYS or k not in optional}


def _label_hint(model: torch.nn.Module, inputs: tuple) -> str:
    """A hint where the inputs are one tensor more than ``forward`` takes and the last is
    a label (integers, one per sample): calibration given the labelled batches of training,
    ``DataLoader(TensorDataset(x, y))``, which runs the model on ``(x, y)``."""
    params = forward_parameters(model)
    if not params or _takes_varargs(model) or len(inputs) != len(params) + 1:
        return ""
    first, last = inputs[0], inputs[-1]
    if not (isinstance(first, torch.Tensor) and isinstance(last, torch.Tensor)
            and not last.is_floating_point() and last.dim() == 1 and first.dim() >= 1
            and len(last) == len(first)):
        return ""
    return (f" The inputs are {len(inputs)} tensors and {type(model).__name__}.forward takes "
            f"{len(params)}: the last looks like a label. Calibration and example inputs hold "
            f"inputs only: give [(x,) for x, y in loader] (labelled batches go to train_data).")


def forward_parameters(model: torch.nn.Module) -> list[inspect.Parameter]:
    """``model.forward``'s arguments that can be given by position, in order."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    out = []
    for prm in sig.parameters.values():
        if prm.kind not in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD):
            break
        out.append(prm)
    return out


def _bind_by_name(named: Mapping, what: str, model: torch.nn.Module | None) -> tuple:
    if model is None:
        raise InputError(f"{what} is a mapping of names to inputs; give the model too, or a "
                         "tuple of positional inputs (e.g. (x,))")
    if not named:
        raise InputError(f"{what} is an empty mapping: name at least one of the model's "
                         "arguments")
    params = forward_parameters(model)
    names = [prm.name for prm in params]
    for key in named:
        if key not in names:
            raise InputError(
                f"{what}: {type(model).__name__}.forward has no argument {key!r} that can be "
                f"given by position (its arguments: {', '.join(names) or 'none'}); drop the key "
                "or pass a tuple of positional inputs")
    last = max(names.index(k) for k in named)
    out = []
    for prm in params[:last + 1]:
        if prm.name in named:
            out.append(named[prm.name])
        elif prm.default is not prm.empty:
            out.append(prm.default)
        else:
            raise InputError(f"{what}: {type(model).__name__}.forward's required argument "
                             f"{prm.name!r} is missing from the mapping; add it")
    return tuple(out)


def _is_dict_input(named: Mapping, model: torch.nn.Module) -> bool:
    """Whether ``named``, first in a batch tuple, is a dict the model takes as an input
    (``forward(self, batch)`` reading ``batch["ids"]``), not its arguments by name: no key
    (labels aside) names one of forward's positional arguments, and forward takes one."""
    names = {prm.name for prm in forward_parameters(model)}
    keys = [k for k in named if k not in LABEL_KEYS]
    return bool(names) and bool(keys) and not any(k in names for k in keys)


#: The keys under which a mapping batch (transformers' data collators) holds its label.
LABEL_KEYS = ("labels", "label")


def positional_batch(batch: Any, model: torch.nn.Module, what: str = "train_data batch") -> Any:
    """A training batch with named inputs as positional ones, its label last.

    ``{"input_ids": ..., "attention_mask": ..., "labels": y}`` (a data collator's batch) ->
    ``(input_ids, attention_mask, y)``; ``(mapping, y)`` -> ``(*bound, y)``; the inputs
    grouped as calibration gives them, ``((x, mask), y)``, -> ``(x, mask, y)`` when forward
    takes that many positional arguments; anything else unchanged.
    """
    if isinstance(batch, Mapping):
        labels = [k for k in LABEL_KEYS if k in batch]
        named = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        return (*_bind_by_name(named, what, model), *(batch[k] for k in labels[:1]))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Mapping) \
            and not _is_dict_input(batch[0], model):
        return (*_bind_by_name(batch[0], what, model), *batch[1:])
    if _grouped_inputs(batch, model):
        return (*batch[0], *batch[1:])
    _check_arity(batch, model, what)
    return batch


def _check_arity(batch: Any, model: torch.nn.Module, what: str) -> None:
    """Refuse a batch of more inputs than ``model.forward`` takes: ``((x1, x2, x3), y)``
    for a forward of two required arguments (grouped), or more tensors than its arguments
    and a label (flat). Such a batch failed inside distill as a PassError."""
    if not isinstance(batch, (tuple, list)) or _takes_varargs(model):
        return
    params = forward_parameters(model)
    if not params:
        return
    required = [p for p in params if p.default is p.empty]
    grouped = (len(batch) == 2 and isinstance(batch[0], (tuple, list)) and len(batch[0]) > 1
               and all(isinstance(t, torch.Tensor) for t in batch[0]) and len(required) >= 2)
    flat = all(isinstance(t, torch.Tensor) for t in batch) and len(batch) > len(params) + 1
    if grouped or flat:
        k = len(batch[0]) if grouped else len(batch) - 1
        raise InputError(
            f"{what} holds {k} inputs{' grouped as its first element' if grouped else ' and a label'}, "
            f"but {type(model).__name__}.forward takes {len(params)} "
            f"({', '.join(p.name for p in params)}); give at most {len(params)} inputs, then "
            "the label: (x, ..., y) or ((x, ...), y)")


def _grouped_inputs(batch: Any, model: torch.nn.Module) -> bool:
    """Whether ``batch`` is ``((x1, x2, ...), y)``: several tensors grouped as one first
    element, for a forward that takes at least that many positional arguments (a forward
    of one argument may take a tuple, an RNN's ``(h, c)``: that stays as it is)."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2
            and isinstance(batch[0], (tuple, list)) and len(batch[0]) > 1
            and all(isinstance(t, torch.Tensor) for t in batch[0])):
        return False
    params = forward_parameters(model)
    return len(params) >= len(batch[0]) or _takes_varargs(model)


def _takes_varargs(model: torch.nn.Module) -> bool:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return False
    return any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())


class _PositionalCollate:
    """A DataLoader's collate function followed by :func:`positional_batch`."""

    def __init__(self, collate: Any, model: torch.nn.Module):
        self.collate, self.model = collate, model

    def __call__(self, items: Any) -> Any:
        return positional_batch(self.collate(items), self.model)


class _Positional:
    """An iterable of training batches re-read on every pass, each made positional."""

    def __init__(self, data: Any, model: torch.nn.Module):
        self.data, self.model = data, model

    def __iter__(self):
        return (positional_batch(b, self.model) for b in self.data)


def positional_batches(data: Any, model: torch.nn.Module) -> Any:
    """``data`` whose batches are made positional by :func:`positional_batch`.

    A list or tuple becomes a list; a DataLoader stays one (same dataset, sampler and
    settings), its collate function followed by the binding; another iterable is wrapped.
    Data whose first batch neither names nor groups its inputs is returned as it is.
    """
    from torch.utils.data import DataLoader

    if data is None or isinstance(data, (str, bytes, torch.Tensor)) or not hasattr(data, "__iter__"):
        return data
    if isinstance(data, (list, tuple)):
        if not any(isinstance(b, Mapping) or _grouped_inputs(b, model) or (
                isinstance(b, (tuple, list)) and b and isinstance(b[0], Mapping)) for b in data[:1]):
            for i, b in enumerate(data):
                _check_arity(b, model, f"train_data batch {i}")
            return data
        return [positional_batch(b, model, f"train_data batch {i}") for i, b in enumerate(data)]
    if isinstance(data, DataLoader):
        loader = copy.copy(data)  # same dataset, sampler and settings
        loader.collate_fn = _PositionalCollate(data.collate_fn, model)
        return loader
    return _Positional(data, model)


def tensors_of(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of a module (each tensor once)."""
    seen: dict[int, torch.Tensor] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


def clone_structure(module: torch.nn.Module, copy_tensors: bool = False) -> torch.nn.Module:
    """A copy of ``module`` with its own module objects and graph, sharing its tensors.

    Passes replace tensors instead of writing into them, so a pipeline step can work on a
    structural copy: rewiring the copy's graph or swapping its submodules never touches
    the original, and no weight is duplicated. ``copy_tensors=True`` makes a full deep
    copy (for passes that do not promise to leave tensors alone).
    """
    memo: dict[int, Any] = {}
    if not copy_tensors:
        for t in tensors_of(module):
            memo[id(t)] = t
    with warnings.catch_warnings():
        # torch's own pytree specs of exported graphs warn about a deprecated LeafSpec check
        warnings.simplefilter("ignore", FutureWarning)
        out = copy.deepcopy(module, memo)
    if isinstance(out, torch.fx.GraphModule):
        guard_input_sizes(out)  # GraphModule's deep copy drops forward pre-hooks
    return out


def node_shape(node: torch.fx.Node) -> tuple[tuple[int, ...] | None, torch.dtype | None]:
    """(shape, dtype) of a node's tensor value, from capture's metadata; (None, None) if not a tensor."""
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) if isinstance(s, int) else s for s in tm.shape), tm.dtype
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape), val.dtype
    return None, None


def annotate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    """Run the graph once on ``example_inputs``, store each node's shape and dtype, and
    return the graph's outputs (flattened for export graphs: the same tensor leaves).
    """
    flat = _flat_graph_inputs(gm, example_inputs)
    with torch.no_grad():
        return ShapeProp(gm).propagate(*flat)


def _flat_graph_inputs(gm: torch.fx.GraphModule, args: Sequence[Any]) -> list[Any]:
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is None:
        return list(args)
    return pytree.tree_leaves((tuple(args), {}))


def _dynamic_shapes(example_inputs: tuple) -> tuple:
    # Dim.AUTO lets export keep a dimension dynamic where the model allows and specialise
    # it where the model needs a fixed size (e.g. hidden width); it never fails on its own.
    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(x.dim())}
        return None
    return tuple(pytree.tree_map(spec, x) if not isinstance(x, torch.Tensor) else spec(x)
                 for x in example_inputs)


def _runs_at_other_size(model, example_inputs: tuple, kwargs: dict, i: int, d: int) -> bool:
    """Whether ``model`` runs with flat input ``i``'s dimension ``d`` (and that dimension of
    every other input of the same size there) one longer or twice as long: a size the
    model's own code needs (image channels, a feature width, ViT's image size) fails."""
    flat, spec = pytree.tree_flatten(tuple(example_inputs))
    size = flat[i].shape[d]
    for new in (size + 1, 2 * size):
        grown = [x.repeat_interleave(2, d).narrow(d, 0, new)
                 if isinstance(x, torch.Tensor) and x.dim() > d and x.shape[d] == size else x
                 for x in flat]
        try:
            with torch.no_grad(), quiet():  # a refused size's warnings are not the user's
                model(*pytree.tree_unflatten(grown, spec), **kwargs)
            return True
        except Exception:  # noqa: BLE001 - the model refuses that size: it is its design
            continue
    return False


def _fixed_note(fixed: dict[int, dict[int, int]], example_inputs: tuple, model=None,
                kwargs: dict | None = None) -> str:
    """What the user needs to know of the dimensions export fixed: a size the model itself
    accepts only so (its image channels, feature width, ViT's image size: checked by
    running the model one longer and twice as long) is said in one calm clause; a size the
    model runs at but the graph does not (a batch, a sequence length, an image size its
    code tests) is the one to act on."""
    flat = pytree.tree_leaves(tuple(example_inputs))
    design, act = [], []
    for i, dims in fixed.items():
        for d, s in dims.items():
            if i >= len(flat) or not isinstance(flat[i], torch.Tensor):
                continue
            by_design = model is not None and not _runs_at_other_size(model, example_inputs,
                                                                       kwargs or {}, i, d)
            (design if by_design else act).append(f"input {i} dim {d} = {s}")
    note = ""
    if act:
        note += ("; export fixed " + ", ".join(act) + " though the model runs at other sizes "
                 "there (its code depends on that size): the graph runs only at that size; "
                 "capture with example inputs of the size you will run, or make the model's "
                 "code size-independent")
    if design:
        note += ("; " + ", ".join(design) + " fixed as the model itself requires (it does not "
                 "run at other sizes there): nothing to do")
    return note


def dtype_hint(model: torch.nn.Module, inputs: Any) -> str:
    """A sentence for a model that does not run on its inputs when their floating dtype is
    none of its weights' (a float32 batch for a ``model.double()``), else ""."""
    weights = {p.dtype for p in model.parameters() if p.is_floating_point()}
    given = {t.dtype for t in pytree.tree_leaves(inputs)
             if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if not weights or not given or given & weights:
        return ""
    name = lambda ds: "/".join(sorted(str(d).removeprefix("torch.") for d in ds))  # noqa: E731
    return (f" The model's weights are {name(weights)} and the float inputs {name(given)}: cast "
            f"the inputs (x.to(torch.{name(weights).split('/')[0]})) or the model.")


def _outputs_match(a: Any, b: Any) -> bool:
    # a dataclass output is compared field by field (pytree sees it as one opaque leaf)
    la, lb = pytree.tree_leaves(plain_outputs(a)), pytree.tree_leaves(plain_outputs(b))
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or not torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5,
                                                        equal_nan=True):
                return False
    return True


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaf_modules: tuple[type, ...]):
        super().__init__()
        self._leaves = leaf_modules

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def _is_cache(x: Any) -> bool:
    # transformers' KV caches (DynamicCache, EncoderDecoderCache, ...) derive from a class
    # named Cache; they hold tensors but are no pytree node, so no graph can return them
    return any(c.__name__ == "Cache" for c in type(x).__mro__[:-1])


def cache_free_kwargs(model: torch.nn.Module, outputs: Any) -> dict[str, Any]:
    """``{"use_cache": False}`` when ``outputs`` hold a KV-cache object and ``model.forward``
    takes ``use_cache`` (transformers' causal LMs and encoder-decoders by default), else {}.

    A cache only speeds up generation step by step; a captured graph computes one call,
    and its outputs must be tensors and plain structures to be stored and compared.
    """
    if not any(_is_cache(leaf) for leaf in pytree.tree_leaves(outputs)):
        return {}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    # newer transformers models take use_cache through **kwargs (TransformersKwargs)
    takes = "use_cache" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if takes else {}


#: transformers' mixture-of-experts kernel that runs as plain ATen ops (each token's expert
#: matrices gathered, then one batched matmul). Its default, ``grouped_mm``, calls the library
#: custom op ``torch.ops.transformers.grouped_mm_fallback`` on CPU, which no artifact can
#: store, and ``eager`` loops over experts with data-dependent Python that export refuses.
TRACEABLE_EXPERTS = "batched_mm"


def _is_experts(m: torch.nn.Module) -> bool:
    # transformers' @use_experts_implementation sets these on every experts module it wraps
    return all(hasattr(m, a) for a in ("_is_expert_parallel", "is_concatenated", "config"))


def _experts_configs(model: torch.nn.Module) -> list:
    """The configs of ``model``'s mixture-of-experts modules whose kernel is not traceable."""
    out, seen = [], set()
    for m in model.modules():
        cfg = getattr(m, "config", None) if _is_experts(m) else None
        if cfg is None or id(cfg) in seen or not hasattr(type(cfg), "_experts_implementation"):
            continue
        seen.add(id(cfg))
        impl = getattr(cfg, "_experts_implementation", None)
        if isinstance(impl, str) and impl != TRACEABLE_EXPERTS:
            out.append((cfg, impl))
    return out


@contextlib.contextmanager
def traceable_experts(model: torch.nn.Module):
    """Run the block with every mixture-of-experts layer of ``model`` (transformers'
    Mixtral, Qwen-MoE, OLMoE, ...) on :data:`TRACEABLE_EXPERTS`; yields what was switched,
    as ``[(config class, previous kernel)]``; the caller's configs are restored after."""
    changed = _experts_configs(model)
    switched = []
    try:
        for cfg, impl in changed:
            try:
                cfg._experts_implementation = TRACEABLE_EXPERTS
            except Exception:  # noqa: BLE001 - an older transformers without that kernel
                continue
            switched.append((cfg, impl))
        yield [(type(cfg).__name__, impl) for cfg, impl in switched]
    finally:
        for cfg, impl in reversed(switched):
            cfg._experts_implementation = impl


def _drop_bound_inputs(gm: torch.fx.GraphModule, bound: dict[str, Any], example_inputs: tuple) -> None:
    """Make an exported graph take only the positional inputs: the keyword arguments it was
    exported with (constants such as ``use_cache=False``) leave its signature."""
    graph = gm.graph
    for node in list(graph.nodes):
        # export's generated input guards read every input; they are code, never stored
        # in an artifact either, and would still expect the dropped ones
        if node.op == "call_module" and str(node.target) == "_guards_fn" and not node.users:
            graph.erase_node(node)
            gm._modules.pop("_guards_fn", None)
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.target in bound:
            if node.users:
                raise CaptureError(f"export: the graph reads the keyword argument {node.target!r} "
                                   "it was captured with as an input")
            graph.erase_node(node)
    spec = pytree.tree_structure((tuple(example_inputs), {}))
    info = graph._codegen.pytree_info
    graph._codegen.pytree_info = info._replace(
        orig_args=[a for a in info.orig_args if a not in bound], in_spec=spec)
    gm._in_spec = spec
    gm.recompile()


@contextlib.contextmanager
def _packed_rnn_calls(model: torch.nn.Module):
    """Yield the list of the RNN modules (by path) that the block calls with a PackedSequence
    (hooks on ``model``, which is capture's own structural copy)."""
    found: list[str] = []
    handles = []
    for path, m in model.named_modules():
        if isinstance(m, torch.nn.RNNBase):
            def hook(mod, args, name=f"{path or type(model).__name__} ({type(m).__name__})"):
                if args and isinstance(args[0], torch.nn.utils.rnn.PackedSequence) and name not in found:
                    found.append(name)
            handles.append(m.register_forward_pre_hook(hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def _capture_fx(model, example_inputs, concrete_args, leaf_modules):
    tracer = _LeafTracer(tuple(leaf_modules or ()))
    with custom_functions.recording(tracer):  # a model's autograd.Function: one node, its backward kept
        graph = tracer.trace(model, concrete_args=concrete_args)
    name = model.__class__.__name__
    gm = torch.fx.GraphModule(tracer.root, graph, name)
    return gm


@contextlib.contextmanager
def _plain_attribute_copies(model: torch.nn.Module):
    """Tensors kept as plain module attributes (neither parameter nor buffer: VideoMAE's
    sinusoid position table), while the pipeline holds them as read-only views, become
    private copies for the block: export lifts such a tensor as a constant, and its fake
    tensor conversion cannot go through the view's ``__torch_function__`` ("Unable to cast
    NotImplemented to Tensor"). The caller's tensor is never written either way."""
    from fxpress.graph.guard import ReadOnlyParameter, ReadOnlyTensor  # guard imports this module

    swapped = []
    for m in model.modules():
        for k, t in list(vars(m).items()):
            if isinstance(t, (ReadOnlyTensor, ReadOnlyParameter)) and not k.startswith("__"):
                with torch._C.DisableTorchFunctionSubclass():
                    vars(m)[k] = torch.Tensor.clone(t).detach()
                swapped.append((m, k, t))
    try:
        yield
    finally:
        for m, k, t in swapped:
            vars(m)[k] = t


def _converts_nothing(module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether ``module.to(*args, **kwargs)`` leaves every parameter and buffer as it is
    (same device, dtype and layout)."""
    try:
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    except Exception:  # noqa: BLE001 - let the real call raise its own error
        return False
    for t in (*module.parameters(), *module.buffers()):
        if device is not None and t.device != torch.device(device):
            return False
        if dtype is not None and (t.is_floating_point() or t.is_complex()) and t.dtype != dtype:
            return False
        if memory_format is not None and t.dim() == 4 and not t.is_contiguous(memory_format=memory_format):
            return False
    return True


@contextlib.contextmanager
def _idle_module_to(model: torch.nn.Module):
    """A forward that calls ``submodule.to(dtype)`` (Switch Transformers' router casts its
    classifier at every call): export swaps each parameter for a traced one and ``.to``
    then fails to swap it back ("Couldn't swap Linear.weight"), although nothing changes.
    While exporting, such a call on one of the model's modules that converts nothing
    returns the module, as eager ``.to`` does; one that would convert runs as it is."""
    ours = {id(m) for m in model.modules()}
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if id(self) in ours and _converts_nothing(self, args, kwargs):
            return self
        return original(self, *args, **kwargs)

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


def _capture_export(model, example_inputs, dynamic, bound=None):
    with _plain_attribute_copies(model), _idle_module_to(model), custom_functions.noting() as functions:
        gm = _capture_export_as_is(model, example_inputs, dynamic, bound)
    if functions:  # export records their forward's ops only: distill says so
        gm.meta["fxpress_functions"] = [custom_functions.class_label(c) for c in functions]
    return gm


def _capture_export_as_is(model, example_inputs, dynamic, bound=None):
    shapes = _dynamic_shapes(example_inputs) if dynamic else None
    if not bound:
        ep = torch.export.export(model, example_inputs, dynamic_shapes=shapes, strict=False)
        gm = ep.module()
        gm.meta["fxpress_fixed"] = _fixed_dims(ep)
        gm.meta["fxpress_bounded"] = _bounded_dims(ep)
        return gm
    params = inspect.signature(model.forward).parameters
    if any(k not in params for k in bound):
        # a keyword the forward takes through **kwargs (transformers' TransformersKwargs):
        # export cannot shape a constant inside **kwargs, so the call binds it instead
        with _forward_binding(model, bound):
            ep = torch.export.export(model, example_inputs, dynamic_shapes=shapes, strict=False)
        gm = ep.module()
        gm.meta["fxpress_fixed"] = _fixed_dims(ep)
        gm.meta["fxpress_bounded"] = _bounded_dims(ep)
        return gm
    if shapes is not None:  # with keyword arguments, shapes are given by argument name
        names = list(params)[:len(example_inputs)]
        shapes = {**dict(zip(names, shapes)), **{k: None for k in bound}}
    ep = torch.export.export(model, example_inputs, kwargs=dict(bound), dynamic_shapes=shapes,
                             strict=False)
    gm = ep.module()
    gm.meta["fxpress_fixed"] = _fixed_dims(ep)
    gm.meta["fxpress_bounded"] = _bounded_dims(ep)
    _drop_bound_inputs(gm, bound, example_inputs)
    return gm


@contextlib.contextmanager
def _forward_binding(model, bound: dict):
    """``model``'s calls made with the keywords ``bound`` (an instance attribute for the
    duration, removed after: the caller's model is left as it was)."""
    had = "forward" in vars(model)
    old = vars(model).get("forward")
    model.forward = functools.partial(model.forward, **bound)
    try:
        yield
    finally:
        if had:
            model.forward = old
        else:
            del model.forward


def _fixed_dims(ep) -> dict[int, dict[int, int]]:
    """Positional input index -> {dimension: size} of every input dimension the exported
    program fixed (``Dim.AUTO`` specialises a dimension the model's Python code depends on:
    a hidden width, but also a sequence length a loop runs over, or a batch of 1)."""
    from torch.export.graph_signature import InputKind

    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    users = [s.arg.name for s in ep.graph_signature.input_specs
             if s.kind == InputKind.USER_INPUT and hasattr(s.arg, "name")]
    out: dict[int, dict[int, int]] = {}
    for i, name in enumerate(users):
        val = vals.get(name)
        if isinstance(val, torch.Tensor):
            fixed = {d: size for d, s in enumerate(val.shape)
                     if (size := _fixed_size(s, ep.range_constraints)) is not None}
            if fixed:
                out[i] = fixed
    return out


def _user_input_vals(ep) -> list:
    from torch.export.graph_signature import InputKind

    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    return [vals.get(s.arg.name) for s in ep.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT and hasattr(s.arg, "name")]


def _bounded_dims(ep) -> dict[int, dict[int, tuple[int, int | None]]]:
    """Positional input index -> {dimension: (low, high)} of every dynamic input dimension
    whose range the exported program narrowed (the model's Python branches on that size:
    ``if ids.shape[1] > 10``; export keeps the branch the example took and guards its
    range). ``high`` is None when unbounded; a plain dynamic dimension (``[2, inf]``) is
    not listed."""
    out: dict[int, dict[int, tuple[int, int | None]]] = {}
    for i, val in enumerate(_user_input_vals(ep)):
        if not isinstance(val, torch.Tensor):
            continue
        for d, s in enumerate(val.shape):
            try:
                vr = ep.range_constraints.get(s.node.expr)
                lo, hi = int(vr.lower), vr.upper
                hi = int(hi) if bool(getattr(hi, "is_Integer", False)) or isinstance(hi, int) else None
            except (AttributeError, TypeError, ValueError, OverflowError):
                continue
            if hi == lo or (lo <= 2 and hi is None):
                continue
            out.setdefault(i, {})[d] = (lo, hi)
    return out


def _bounded_note(bounded: dict[int, dict[int, tuple[int, int | None]]]) -> str:
    if not bounded:
        return ""
    named = [f"input {i} dim {d} in [{lo}, {'inf' if hi is None else hi}]"
             for i, dims in bounded.items() for d, (lo, hi) in dims.items()]
    return ("; export kept the branch the example inputs took where the model's code tests a "
            "size, and the graph runs only for " + ", ".join(named) + " (another size fails "
            "the graph's guard); capture with example inputs of the size you will run, or "
            "make the model's code size-independent")


def _fixed_size(s, ranges) -> int | None:
    """``s``'s one possible value: an int, or a symbol whose range is a single value."""
    if isinstance(s, int):
        return s
    try:
        if s.node.expr.is_number:
            return int(s.node.expr)
        vr = ranges.get(s.node.expr)
        if vr is not None and vr.lower == vr.upper:
            return int(vr.lower)
    except (AttributeError, TypeError, ValueError):
        pass
    return None


#: floating dtypes a model is compressed from in float32 (see :func:`capture_copy`)
HALF_DTYPES = (torch.bfloat16, torch.float16)


def capture_copy(model: torch.nn.Module, widen: bool = True
                 ) -> tuple[torch.nn.Module, torch.dtype | None, list[str]]:
    """The model fxpress captures: ``model`` itself, or a copy when it holds
    half-precision tensors, parametrized weights or embeddings with ``max_norm``; with the
    half dtype (or None) and what was baked (``["0.weight (_WeightNorm)", ...]``).

    - bfloat16/float16: compressed layers compute in float32 (int8 kernels, decoded
      codebooks) and a pass's statistics need float32; a half model captured as it is
      would mix dtypes at every compressed layer. Each half tensor becomes a float32 one
      directly, so the model's code reads float32 wherever it asks for a dtype.
    - parametrizations (``weight_norm``, ``spectral_norm``, ``orthogonal``, a user's own):
      the weight a layer computes with is baked into a plain parameter
      (``remove_parametrizations(leave_parametrized=True)``), so passes see it and an
      artifact stores a plain layer (a parametrized class is generated code with hooks).
    - ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``max_norm``: their forward renormalises
      the rows it looks up *in place* (``embedding_renorm_``), so running the model writes
      into its weights. The copy gets every row renormalised once, as a lookup would leave
      it, and ``max_norm=None``: the same outputs for every input, and no pass, calibration
      or verifier run writes into the caller's table.
    The copy shares every other tensor with ``model`` (read only), which stays untouched.
    ``widen=False`` keeps half-precision tensors as they are (the verifier's reference).
    """
    from torch.nn.utils import parametrize

    tensors = [*model.parameters(), *model.buffers()]
    half = {t.dtype for t in tensors if t.dtype in HALF_DTYPES} if widen else set()
    parametrized = [(path, m) for path, m in model.named_modules() if parametrize.is_parametrized(m)]
    renormed = [(path, m) for path, m in model.named_modules()
                if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                and m.max_norm is not None and not parametrize.is_parametrized(m)]
    if not half and not parametrized and not renormed:
        return model, None, []
    memo: dict[int, Any] = {}
    for _, m in renormed:  # a renormalised copy of the table (float32 if it was half)
        w = (m.weight.detach().float() if widen and m.weight.dtype in HALF_DTYPES
             else m.weight.detach().clone())
        with torch.no_grad():
            torch.embedding_renorm_(w, torch.arange(w.shape[0]), m.max_norm, m.norm_type)
        memo[id(m.weight)] = torch.nn.Parameter(w, requires_grad=m.weight.requires_grad)
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for t in store.values():
                if t is None or id(t) in memo:
                    continue
                if t.dtype not in HALF_DTYPES or not widen:
                    memo[id(t)] = t  # shared, never written
                    continue
                wide = t.detach().float()
                memo[id(t)] = (torch.nn.Parameter(wide, requires_grad=t.requires_grad)
                               if isinstance(t, torch.nn.Parameter) else wide)
    copied = copy.deepcopy(model, memo)
    baked = []
    for path, _ in parametrized:
        m = copied.get_submodule(path)
        plain = _without_parametrizations(m)
        baked += [f"{path + '.' if path else ''}{name} ("
                  + ", ".join(type(p).__name__ for p in m.parametrizations[name]) + ")"
                  for name in m.parametrizations]
        if path:
            parent, _, child = path.rpartition(".")
            setattr(copied.get_submodule(parent), child, plain)
        else:
            copied = plain
    for path, m in renormed:
        copied.get_submodule(path).max_norm = None
        baked.append(f"{path + '.' if path else ''}weight (max_norm={m.max_norm:g})")
    dtype = (torch.bfloat16 if torch.bfloat16 in half else torch.float16) if half else None
    return copied, dtype, baked


def _without_parametrizations(m: torch.nn.Module) -> torch.nn.Module:
    """A plain instance of a parametrized module's own class holding the weights it
    computes with. (torch's ``remove_parametrizations`` edits the generated class, which a
    deep copy shares with the caller's module: the caller's would lose its weights.)"""
    from torch.nn.utils import parametrize

    base = type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)
    plain = base.__new__(base)
    torch.nn.Module.__init__(plain)
    internal = set(vars(plain))
    for k, v in vars(m).items():
        if k not in internal:
            object.__setattr__(plain, k, v)
    plain.training = m.training
    for n, t in m._buffers.items():
        plain.register_buffer(n, t, persistent=n not in m._non_persistent_buffers_set)
    for n, p in m._parameters.items():
        plain.register_parameter(n, p)
    for n, child in m._modules.items():
        if n != "parametrizations":
            plain.add_module(n, child)
    # computed as in eval mode (capture's mode): spectral_norm's power iteration would
    # write into its u and v buffers, which the copy shares with the caller's model
    m.parametrizations.eval()
    with torch.no_grad():
        for name in m.parametrizations:
            w = getattr(m, name).detach().clone()
            original = m.parametrizations[name].original if hasattr(
                m.parametrizations[name], "original") else None
            trainable = original.requires_grad if isinstance(original, torch.nn.Parameter) else True
            plain.register_parameter(name, torch.nn.Parameter(w, requires_grad=trainable))
    return plain


def capture_private_on_write(reference: torch.nn.Module, example_inputs: Any, method: str,
                             kw: dict | None = None) -> tuple[torch.fx.GraphModule, torch.nn.Module]:
    """``capture(reference, guard=False)``; when its forward writes into its own (read-only)
    tensors, the capture of a private, writable copy instead, noted in ``meta["why"]``.
    Returns the graph and the module it was traced from."""
    from fxpress.graph.guard import shared_write  # guard imports this module

    try:
        return capture(reference, example_inputs, method, guard=False, **(kw or {})), reference
    except FxpressError as e:
        wrote = shared_write(e)
        if wrote is None:
            raise
    private = clone_structure(reference, copy_tensors=True)
    gm = capture(private, example_inputs, method, guard=False, **(kw or {}))
    gm.meta["fxpress"]["why"] += (
        f"; the model's forward writes into its own tensors (in-place {wrote.operation} into "
        f"'{wrote.tensor}'): captured from a private copy, the caller's model untouched")
    return gm, private


def _capture_guarded(model: torch.nn.Module, example_inputs: Any, method: str,
                     kw: dict) -> torch.fx.GraphModule:
    from fxpress.graph.guard import Guard  # guard imports this module

    try:
        reference = clone_structure(model)
    except Exception:  # a module tree that cannot be copied: traced as it is
        return capture(model, example_inputs, method, guard=False, **kw)
    views = Guard()
    views.protect(reference)
    gm = None
    try:
        gm, _ = capture_private_on_write(reference, example_inputs, method, kw)
        return gm
    finally:
        views.release(gm)  # the caller's own tensor objects in the graph handed out


def _widen_inputs(example_inputs: tuple) -> tuple[tuple, list[int]]:
    """The inputs with half-precision tensors as float32, and which positions those were."""
    widened = [i for i, x in enumerate(example_inputs)
               if isinstance(x, torch.Tensor) and x.dtype in HALF_DTYPES]
    return tuple(x.float() if i in widened else x for i, x in enumerate(example_inputs)), widened


def _cast_inputs_to_float32(gm: torch.fx.GraphModule, positions: list[int]) -> None:
    """Make the graph take half-precision inputs at ``positions`` (as the model did) by
    casting them to float32 first."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in positions:
        if i >= len(inputs):
            continue
        ph = inputs[i]
        with gm.graph.inserting_after(ph):
            cast = gm.graph.call_method("to", (ph, torch.float32))
        ph.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        cast.meta.update({k: v for k, v in ph.meta.items() if k in ("val", "tensor_meta")})
    gm.recompile()


def _private_inputs(inputs: tuple) -> tuple:
    """``inputs`` with each plain tensor cloned: capture runs the model on its own copies,
    so a forward that writes into its inputs (``x.mul_(2)``) never changes the caller's."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor)
                           and t.layout == torch.strided else t, inputs)


def _input_copies(inputs: tuple) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(leaf position, tensor, copy) of each plain tensor among ``inputs``, to tell whether
    the model's forward writes into them."""
    return [(i, t, t.detach().clone()) for i, t in enumerate(pytree.tree_leaves(inputs))
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta"]


def _same_bits(t: torch.Tensor, c: torch.Tensor) -> bool:
    if t.shape != c.shape or t.dtype != c.dtype:
        return False
    if t.is_floating_point() or t.is_complex():
        return bool((t.eq(c) | (t.isnan() & c.isnan())).all())
    return torch.equal(t, c)


def _input_writes(copies: list[tuple[int, torch.Tensor, torch.Tensor]]) -> list[int]:
    """The inputs the forward wrote into, put back as they were (later runs see the same
    inputs as the first)."""
    changed = [i for i, t, c in copies if not _same_bits(t, c)]
    with torch.no_grad():
        for i, t, c in copies:
            if i in changed and t.shape == c.shape:
                t.copy_(c)
    return changed


def capture(model: torch.nn.Module, example_inputs: Any, method: str = "auto", *,
            dynamic: bool = True, concrete_args: dict[str, Any] | None = None,
            leaf_modules: Iterable[type] = (), guard: bool = True) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule.

    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = capture(mlp, (torch.randn(3, 4),))
    >>> gm.meta["fxpress"]["method"]
    'fx'

    ``method``: "fx", "export" or "auto" (fx, falling back to export). ``dynamic`` marks
    every input dimension of an exported graph as dynamic where the model allows.
    ``concrete_args`` and ``leaf_modules`` are handed to symbolic tracing.
    Raises :class:`~fxpress.errors.CaptureError` showing each method's cause when none works.

    The caller's model is never changed: it is traced as a structural copy holding
    read-only views of its tensors (flags and attributes its forward sets land on the
    copy), and a forward that writes into its own tensors (transformers' RWKV rescales its
    weights at its first call) is traced from a private copy, which ``meta["why"]`` says.
    ``guard=False`` traces ``model`` itself (for callers that protect it already).
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"capture: expected a torch.nn.Module, got {type(model).__name__}; "
                         "wrap plain functions in a Module")
    if method not in METHODS:
        raise InputError(f"capture: method must be one of {METHODS}, got {method!r}")
    kw = dict(dynamic=dynamic, concrete_args=concrete_args, leaf_modules=leaf_modules)
    if guard:
        from fxpress.graph.guard import preserved_rng  # guard imports this module

        with preserved_rng():  # the caller's RNG, threads, grad mode and torch's switches
            return _capture_guarded(model, example_inputs, method, kw)
    example_inputs = as_input_tuple(example_inputs, model=model)
    model, half, baked = capture_copy(model)
    example_inputs, half_inputs = _widen_inputs(example_inputs) if half else (example_inputs, [])
    example_inputs = _private_inputs(example_inputs)  # the forward may write into them

    with TRACE_LOCK.tracing(), eval_mode(model), torch.no_grad(), \
            traceable_experts(model) as experts:
        copies = _input_copies(example_inputs)
        try:
            with _packed_rnn_calls(model) as packed:  # for the hint when neither method works
                expected = model(*example_inputs)
        except Exception as e:  # the inputs do not fit the model: say so before tracing
            shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                      for x in example_inputs]
            from fxpress.graph.guard import forward_write_error  # guard imports this module

            writes = forward_write_error(e, model)
            if writes:
                raise InputError(f"capture: {writes}") from e
            raise InputError(
                f"capture: {type(model).__name__} does not run on the example inputs {shapes}: "
                f"{type(e).__name__}: {e}. Pass inputs shaped like real model inputs."
                f"{dtype_hint(model, example_inputs)}{_label_hint(model, example_inputs)}") from e

        written = _input_writes(copies)
        # a KV cache in the outputs (transformers' default use_cache=True): capture the one
        # call without it, and say so in the capture report
        bound = cache_free_kwargs(model, expected)
        if bound:
            expected = model(*example_inputs, **bound)
        cache = next((type(x).__name__ for x in pytree.tree_leaves(expected) if _is_cache(x)), None)
        if cache:
            raise CaptureError(
                f"capture: {type(model).__name__} returns a {cache} (a KV cache, which no graph can "
                "return) " + ("even when called with use_cache=False" if bound else
                              "and its forward takes no use_cache argument") +
                ": wrap the model in a module whose forward returns its tensors (e.g. the logits) "
                "and capture that")
        causes: dict[str, BaseException] = {}
        details: dict[str, str] = {}
        order = ("fx", "export") if method == "auto" else (method,)
        for m in order:
            start = time.perf_counter()
            try:
                with quiet() as (noise, caught):  # torch's warnings and graph dumps: into details
                    if m == "fx":
                        gm = _capture_fx(model, example_inputs, {**(concrete_args or {}), **bound}
                                         if bound else concrete_args, leaf_modules)
                        gm = clone_structure(gm)  # never share module objects with the caller
                    else:
                        gm = _capture_export(model, example_inputs, dynamic, bound)
                    linears = canonical_linears(gm)
                    views = canonical_weights(gm)
                    tables = canonical_embeddings(gm, embedding_tables(model))
                    zeroed = zeroed_allocations(gm)
                    annotate_shapes(gm, example_inputs)
                    left = canonical_linears(gm)  # W @ x needs x's rank: fx graphs have it now
                    if left:
                        linears += left
                        annotate_shapes(gm, example_inputs)
                    got = gm(*example_inputs)
                    if not _outputs_match(got, expected):
                        raise CaptureError(f"the {m} graph's outputs differ from the model's on the "
                                           "example inputs (data-dependent control flow was specialised?)")
            except Exception as e:
                causes[m] = e
                details[m] = _details(noise, caught)
                continue
            gm.meta["fxpress"] = {
                "method": m,
                "seconds": time.perf_counter() - start,
                "why": ("requested" if method != "auto" else
                        "symbolic_trace succeeded" if m == "fx" else
                        f"symbolic_trace failed: {type(causes['fx']).__name__}: {_short(causes['fx'])}"),
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "input_count": len(example_inputs),
                "passes": [],
            }
            if linears:
                gm.meta["fxpress"]["linears_from_matmul"] = linears
            if views:
                gm.meta["fxpress"]["weights_from_views"] = views
            if tables:
                gm.meta["fxpress"]["embedding_reads"] = tables
            if zeroed:
                gm.meta["fxpress"]["allocations_zeroed"] = zeroed
            functions = gm.meta.pop("fxpress_functions", None)
            if functions:
                gm.meta["fxpress"]["autograd_functions_inlined"] = functions
                gm.meta["fxpress"]["why"] += (
                    f"; torch.autograd.Function(s) {', '.join(functions)} recorded as their "
                    "forward's ops (export keeps no custom backward: training this graph "
                    "differentiates those ops)")
            kept = custom_functions.function_nodes(gm)
            if kept:
                gm.meta["fxpress"]["why"] += (
                    f"; {len(kept)} torch.autograd.Function call(s) kept as node(s) (" +
                    ", ".join(f"{n}: {c}" for n, c in list(kept.items())[:3]) +
                    (", ..." if len(kept) > 3 else "") + "): training runs their backward, "
                    "save stores their forward's ops")
            fixed = gm.meta.pop("fxpress_fixed", None)
            bounded = gm.meta.pop("fxpress_bounded", None)
            if bounded and dynamic:
                gm.meta["fxpress"]["bounded_dims"] = bounded
                gm.meta["fxpress"]["why"] += _bounded_note(bounded)
            if fixed is not None and dynamic:
                gm.meta["fxpress"]["fixed_dims"] = fixed
                gm.meta["fxpress"]["why"] += _fixed_note(fixed, example_inputs, model, bound)
            guard_input_sizes(gm)  # export's own guards are code no artifact stores
            if bound:
                gm.meta["fxpress"]["call_kwargs"] = dict(bound)
                gm.meta["fxpress"]["why"] += ("; the model returns a KV cache (use_cache=True): "
                                              "captured one call with use_cache=False, outputs "
                                              "without the cache")
            if experts:
                gm.meta["fxpress"]["why"] += (
                    "; mixture-of-experts layers captured with transformers' "
                    f"experts_implementation={TRACEABLE_EXPERTS!r} (plain ATen ops) instead of "
                    + ", ".join(sorted({repr(impl) for _, impl in experts}))
                    + " (a library custom op no artifact can store)")
            if half is not None:
                _cast_inputs_to_float32(gm, half_inputs)
                gm.meta["fxpress"]["widened_from"] = str(half).removeprefix("torch.")
                gm.meta["fxpress"]["why"] += (
                    f"; the model's {str(half).removeprefix('torch.')} weights were captured as "
                    "float32 (compressed layers compute in float32; half-precision inputs are "
                    "cast to float32, outputs are float32; the caller's model is unchanged)")
            if baked:
                gm.meta["fxpress"]["parametrizations_baked"] = baked
                gm.meta["fxpress"]["why"] += (
                    f"; {len(baked)} weight(s) computed in forward (parametrizations, "
                    "embedding max_norm) baked into plain parameters ("
                    + ", ".join(baked[:3]) + (", ..." if len(baked) > 3 else "") + ")")
            for sub in gm.modules():
                sub.training = False
            return gm

    lines = [f"  {m}: {type(e).__name__}: {_short(e)}" for m, e in causes.items()]
    if "export" in causes:  # export was tried: suggesting it again would send the user in a circle
        hint = ("\nData-dependent Python control flow defeats both: express it with torch.cond "
                "or tensor ops (torch.where), pass concrete_args={...} to fix non-tensor "
                "arguments for symbolic tracing, or leaf_modules=[SomeModule] to keep an "
                "untraceable submodule whole. The full output of each attempt is in the "
                "error's .details.")
    else:
        hint = ("\nTry method='export' (or 'auto') for models with data-dependent Python control "
                "flow, concrete_args={...} to fix non-tensor arguments, or leaf_modules=[SomeModule] "
                "to keep an untraceable submodule whole.")
    if packed:
        hint += (f"\n{', '.join(packed)} {'is' if len(packed) == 1 else 'are'} called with a "
                 "PackedSequence (pack_padded_sequence / pack_sequence): a packed batch's step "
                 "sizes are data (the lengths), which neither method can capture. Run the RNN "
                 "on the padded batch and zero the outputs past each length (out * mask[..., None]; "
                 "for a unidirectional RNN padded at the end the outputs within each length are "
                 "the same, the final state is out[b, length-1]), or compress the layers around it.")
    if written:  # each run saw the inputs the run before had changed
        hint += (f"\nIts forward writes into its input(s) {written} in place (mul_, add_, +=, "
                 "index assignment), so each run sees other inputs: make it compute out of "
                 "place (x = x * 2 instead of x.mul_(2)).")
    err = CaptureError(f"capture: could not capture {type(model).__name__} with "
                       f"{' or '.join(causes)}:\n" + "\n".join(lines) + hint, causes)
    err.details = {m: d for m, d in details.items() if d}
    raise err


@contextlib.contextmanager
def quiet():
    """Keep torch's (and its exporters') warnings, log records and prints out of the
    caller's terminal for the block; yields a StringIO that collects what was printed and
    a list that collects the warnings, for an error's ``details``."""
    import io
    import logging

    buf, caught = io.StringIO(), []
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("always")
            yield buf, caught
    finally:
        logging.disable(previous)


def _details(buf, caught) -> str:
    lines = [f"{w.category.__name__}: {w.message}" for w in caught]
    return "\n".join(lines + ([buf.getvalue().strip()] if buf.getvalue().strip() else []))


def _short(e: BaseException, limit: int = 300) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    return s if len(s) <= limit else s[:limit] + "..."


def capture_method(gm: torch.fx.GraphModule) -> str | None:
    """Which method captured ``gm`` ("fx" or "export"), if fxpress captured it."""
    return gm.meta.get("fxpress", {}).get("method")
