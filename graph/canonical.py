"""Linears written as matrix products become linear ops, so every pass sees them.

A layer may compute ``x @ W.T`` (transformers' ``FalconLinear``, hand-written attention
and heads) instead of calling ``F.linear``. Captured, that is a matmul of the input with a
transposed parameter: no linear, conv or embedding op reads the weight, so no pass would
compress it. :func:`canonical_linears` rewrites each such product into ``linear(x, W)``
(the same matrix product: torch computes ``linear`` as ``x @ W.T``), in fx graphs
(``operator.matmul`` / ``torch.matmul`` of ``W.T``, ``W.t()``, ``W.transpose(0, 1)``) and in
exported ones (``aten.matmul`` / ``aten.mm`` of ``aten.t``, ``aten.numpy_T``,
``aten.transpose``, ``aten.permute(W, [1, 0])``). :func:`fxpress.graph.capture.capture` runs
it on every graph it captures, before checking the graph against the model.
"""
from __future__ import annotations

import builtins
import operator

import torch
import torch.fx

_aten = torch.ops.aten

#: products ``a @ b`` (fx and ATen spellings)
_MATMULS = (operator.matmul, torch.matmul, _aten.matmul.default, _aten.mm.default)
#: ops that transpose a 2-D tensor whatever their other arguments
_TRANSPOSES = (torch.t, _aten.t.default, _aten.numpy_T.default)


def _param(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return None
    owner, _, attr = str(node.target).rpartition(".")
    try:
        t = getattr(gm.get_submodule(owner) if owner else gm, attr)
    except AttributeError:
        return None
    return t if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2 else None


def _swaps_two_dims(dims) -> bool:
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % 2 for d in dims} == {0, 1}


def transposed_weight(gm: torch.fx.GraphModule, node) -> torch.fx.Node | None:
    """The ``get_attr`` node of a 2-D float weight ``W`` when ``node`` computes ``W.T``."""
    if not isinstance(node, torch.fx.Node) or len(node.args) < 1 or node.kwargs:
        return None
    src, args = node.args[0], node.args[1:]
    ok = False
    if node.op == "call_function":
        t = node.target
        ok = (t in _TRANSPOSES and not args
              or t in (torch.transpose, _aten.transpose.int) and _swaps_two_dims(args)
              or t is _aten.permute.default and len(args) == 1 and list(args[0]) == [1, 0]
              or t is builtins.getattr and args in (("T",), ("mT",)))
    elif node.op == "call_method":
        ok = (node.target == "t" and not args
              or node.target == "transpose" and _swaps_two_dims(args)
              or node.target == "permute" and list(args) in ([1, 0], [[1, 0]], [(1, 0)]))
    return src if ok and _param(gm, src) is not None else None


def canonical_linears(gm: torch.fx.GraphModule) -> int:
    """Rewrite every ``x @ W.T`` of a 2-D float parameter ``W`` into ``linear(x, W)``;
    return how many (the graph is recompiled when any)."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target in _MATMULS and len(node.args) == 2
                and not node.kwargs):
            continue
        x, wt = node.args
        w = transposed_weight(gm, wt)
        if w is None or not isinstance(x, torch.fx.Node):
            continue
        aten = isinstance(node.target, torch._ops.OpOverload)
        with graph.inserting_before(node):
            new = graph.call_function(_aten.linear.default if aten else torch.nn.functional.linear,
                                      (x, w))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if not wt.users:
            graph.erase_node(wt)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


__all__ = ["canonical_linears", "transposed_weight"]
