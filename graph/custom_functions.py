"""A model's own ``torch.autograd.Function`` subclasses (a straight-through estimator, a
clipped or scaled gradient) in captured graphs.

Symbolic tracing (and torch.export) run a Function's ``forward`` and record its ops: the
graph then differentiates those ops (``torch.round``: zero gradient), not the model's
``backward``, and training it (``distill``) silently cannot move the layers before it.
fx capture therefore records each call as ONE node whose target is the Function's
``apply`` (:func:`recording`), so the captured graph trains through the model's own
backward. Such a node is the model's code, which no artifact can name: ``save`` stores its
``forward`` as graph ops (:func:`decompose`; an artifact is for inference, which needs no
backward), and records which nodes were decomposed. torch.export cannot keep the call: an
exported graph records which Functions it ran through (:func:`noting`), and ``distill``
warns, naming the nodes (:func:`function_nodes`)."""
from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.autograd.function import Function, _is_setup_context_defined

from fxpress.errors import UnsupportedGraphError

_APPLY = Function.__dict__["apply"]  # the classmethod object every subclass inherits
_LOCAL = threading.local()


_CALLERS: dict[type, Any] = {}


def caller(cls: type) -> Any:
    """The node target that applies ``cls`` (one function per class: fx emits the bound
    ``cls.apply`` as ``torch.autograd.function.apply``, which is no name)."""
    fn = _CALLERS.get(cls)
    if fn is None:
        def fn(*args, **kwargs):
            return _APPLY.__get__(None, cls)(*args, **kwargs)

        fn.__name__ = fn.__qualname__ = f"{cls.__name__}_apply"
        fn.autograd_function = cls
        _CALLERS[cls] = fn
    return fn


def function_class(target: Any) -> type | None:
    """The ``torch.autograd.Function`` subclass a node target applies, else None."""
    cls = getattr(target, "autograd_function", None)
    return cls if _CALLERS.get(cls) is target else None


def class_label(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _touches_graph(tracer: torch.fx.Tracer, args: tuple, kwargs: dict) -> bool:
    flat = torch.utils._pytree.tree_leaves((args, kwargs))
    return any(isinstance(a, torch.fx.Proxy) and a.tracer is tracer or isinstance(a, torch.nn.Parameter)
               for a in flat)


def _recording_apply(cls, *args, **kwargs):
    tracer = getattr(_LOCAL, "tracer", None)
    if tracer is not None and _touches_graph(tracer, args, kwargs):
        return tracer.create_proxy("call_function", caller(cls), args, kwargs)
    return _APPLY.__get__(None, cls)(*args, **kwargs)


@contextlib.contextmanager
def recording(tracer: torch.fx.Tracer):
    """While ``tracer`` traces: a Function applied to graph values (or to the model's
    parameters) becomes one ``call_function`` node calling its ``apply``."""
    outer = getattr(_LOCAL, "tracer", None)
    with _patched(classmethod(_recording_apply)):
        _LOCAL.tracer = tracer
        try:
            yield
        finally:
            _LOCAL.tracer = outer


@contextlib.contextmanager
def noting():
    """Yield the list of Function classes applied inside the block (export's tracing runs
    through their forward; the classes are noted, not kept)."""
    seen: list[type] = []

    def apply(cls, *args, **kwargs):
        if cls not in seen:
            seen.append(cls)
        return _APPLY.__get__(None, cls)(*args, **kwargs)

    with _patched(classmethod(apply)):
        yield seen


@contextlib.contextmanager
def _patched(replacement: classmethod):
    # Function.apply is looked up on each call (RoundSTE.apply -> Function's classmethod);
    # the capture holds TRACE_LOCK.tracing() meanwhile, and the wrappers call through for
    # every call that is not the current trace's (other threads: _LOCAL)
    if Function.__dict__["apply"] is not _APPLY:  # a nested block keeps the outer's patch
        yield
        return
    Function.apply = replacement
    try:
        yield
    finally:
        Function.apply = _APPLY


def function_nodes(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Node name -> Function class for every Function call kept as a node."""
    return {n.name: class_label(cls) for n in gm.graph.nodes
            if n.op == "call_function" and (cls := function_class(n.target)) is not None}


class _Ctx:
    """What a Function's forward may do with ``ctx`` when only its forward is recorded."""

    needs_input_grad: tuple = ()
    materialize_grads = True

    def save_for_backward(self, *tensors: Any) -> None:
        pass

    save_for_forward = save_for_backward
    mark_dirty = save_for_backward
    mark_non_differentiable = save_for_backward

    def set_materialize_grads(self, value: bool) -> None:
        pass


def decompose(gm: torch.fx.GraphModule, where: str = "save") -> dict[str, str]:
    """Replace every Function node of ``gm`` (in place) by the ops of its ``forward``;
    return node name -> Function class of the nodes replaced. Raises
    :class:`UnsupportedGraphError` naming the node when its forward does not trace (Python
    control flow on tensor values, tensors built inside it)."""
    done: dict[str, str] = {}
    graph = gm.graph
    for node in list(graph.nodes):
        cls = function_class(node.target) if node.op == "call_function" else None
        if cls is None:
            continue
        tracer = torch.fx.proxy.GraphAppendingTracer(graph)

        def proxy(a):
            return torch.fx.Proxy(a, tracer) if isinstance(a, torch.fx.Node) else a

        args = torch.fx.node.map_aggregate(node.args, proxy)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, proxy)
        before = set(graph.nodes)
        try:
            with graph.inserting_before(node):
                if _is_setup_context_defined(cls.setup_context):
                    out = cls.forward(*args, **kwargs)
                else:
                    out = cls.forward(_Ctx(), *args, **kwargs)
                out = torch.fx.node.map_aggregate(
                    out, lambda v: v.node if isinstance(v, torch.fx.Proxy) else v)
        except Exception as e:
            for n in reversed([n for n in graph.nodes if n not in before]):
                graph.erase_node(n)
            raise UnsupportedGraphError(
                f"{where}: node {node.name!r} calls {class_label(cls)}, a custom "
                "torch.autograd.Function (the model's code, which no artifact can name), and "
                f"its forward does not trace into graph ops ({type(e).__name__}: {e}); write "
                "its forward with tensor ops only (torch.where instead of Python if on "
                "tensor values), or compute it outside the Function") from e
        _replace(node, out, where, cls)
        done[node.name] = class_label(cls)
    if done:
        graph.lint()
        gm.recompile()
    return done


def inference_graph(gm: torch.fx.GraphModule, where: str = "save") -> torch.fx.GraphModule:
    """``gm``, or a structural copy of it (its tensors shared) whose Function nodes are their
    forward's ops, its meta naming them (``autograd_functions_decomposed``): what ``save``,
    ``export_onnx`` and ``fxpress.compile`` run, which name no model code and need no
    backward. The caller's graph keeps its nodes (training it still runs their backward)."""
    if not isinstance(gm, torch.fx.GraphModule) or not function_nodes(gm):
        return gm
    from fxpress.graph.capture import clone_structure  # capture imports this module

    gm = clone_structure(gm)
    done = decompose(gm, where)
    gm.meta["fxpress"] = {**gm.meta.get("fxpress", {}), "autograd_functions_decomposed": done}
    return gm


def _replace(node: torch.fx.Node, out: Any, where: str, cls: type) -> None:
    import operator

    if isinstance(out, torch.fx.Node):
        node.replace_all_uses_with(out)
    else:  # several outputs: the graph reads them with getitem
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem \
                    and isinstance(user.args[1], int) and isinstance(out, (tuple, list)):
                user.replace_all_uses_with(out[user.args[1]])
                node.graph.erase_node(user)
            else:
                raise UnsupportedGraphError(
                    f"{where}: node {node.name!r} ({class_label(cls)}, a custom "
                    f"torch.autograd.Function) returns {type(out).__name__}, which node "
                    f"{user.name!r} reads as a whole; return a tensor or a tuple of tensors")
    node.graph.erase_node(node)
