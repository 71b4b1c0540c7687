"""Linears written as matrix products become linear ops, so every pass sees them.

A layer may compute ``x @ W.T`` (transformers' ``FalconLinear``, hand-written attention
and heads) instead of calling ``F.linear``. Captured, that is a matmul of the input with a
transposed parameter: no linear, conv or embedding op reads the weight, so no pass would
compress it. :func:`canonical_linears` rewrites each such product into ``linear(x, W)``
(the same matrix product: torch computes ``linear`` as ``x @ W.T``), in fx graphs
(``operator.matmul`` / ``torch.matmul`` of ``W.T``, ``W.t()``, ``W.transpose(0, 1)``) and in
exported ones (``aten.matmul`` / ``aten.mm`` of ``aten.t``, ``aten.numpy_T``,
``aten.transpose``, ``aten.permute(W, [1, 0])``). A product with the weight on the left,
``W @ x`` (Mamba's ``dt_proj``), becomes ``linear(x.mT, W).mT`` where the graph recorded
``x``'s rank. :func:`canonical_weights` points a weighted op whose weight is a view chain
that gives the parameter back (Mamba's ``conv1d.weight.squeeze(1).unsqueeze(1)``) at the
parameter. :func:`canonical_embeddings` makes every other read of an ``nn.Embedding``'s
table a lookup (Whisper's ``W[positions]``, DETR's whole query table).
:func:`fxpress.graph.capture.capture` runs them on every graph it captures,
before checking the graph against the model, and ``canonical_linears`` again once the
graph's shapes are recorded (a symbolically traced graph has no ranks before).
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


def _float_attr(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    """The floating-point tensor a ``get_attr`` node reads, else None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
        return None
    owner, _, attr = str(node.target).rpartition(".")
    try:
        t = getattr(gm.get_submodule(owner) if owner else gm, attr)
    except AttributeError:
        return None
    return t if isinstance(t, torch.Tensor) and t.is_floating_point() else None


def _param(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    t = _float_attr(gm, node)
    return t if t is not None and t.dim() == 2 else None


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


def _rank(node) -> int | None:
    """The number of dimensions of ``node``'s value, when capture recorded it (export's
    ``val``, ShapeProp's ``tensor_meta``)."""
    meta = getattr(node, "meta", {}) or {}
    val = meta.get("val", meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    return len(shape) if shape is not None else None


def canonical_linears(gm: torch.fx.GraphModule) -> int:
    """Rewrite every ``x @ W.T`` of a 2-D float parameter ``W`` into ``linear(x, W)``, and
    every ``W @ x`` (Mamba's ``dt_proj``) into ``linear(x.mT, W).mT`` (``linear(x, W)`` for
    a vector ``x``; only where the graph recorded ``x``'s rank); return how many (the graph
    is recompiled when any)."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target in _MATMULS and len(node.args) == 2
                and not node.kwargs):
            continue
        x, wt = node.args
        aten = isinstance(node.target, torch._ops.OpOverload)
        linear = _aten.linear.default if aten else torch.nn.functional.linear
        w = transposed_weight(gm, wt)
        if w is None and _param(gm, x) is not None and isinstance(wt, torch.fx.Node) \
                and _param(gm, wt) is None:
            rank = _rank(wt)  # W @ x: the weight on the left
            if rank is None or rank < 1:
                continue
            w, x = x, wt
            transpose = _aten.transpose.int if aten else torch.transpose
            with graph.inserting_before(node):
                if rank == 1:
                    new = graph.call_function(linear, (x, w))
                else:
                    xt = graph.call_function(transpose, (x, -1, -2))
                    new = graph.call_function(transpose, (graph.call_function(linear, (xt, w)),
                                                          -1, -2))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            count += 1
            continue
        if w is None or not isinstance(x, torch.fx.Node):
            continue
        with graph.inserting_before(node):
            new = graph.call_function(linear, (x, w))
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


#: ops that give a view of their first argument with the same elements in the same order
#: (a reshape of a contiguous weight); a chain of them that ends in the weight's own shape
#: and strides is the weight itself
_VIEW_FUNCTIONS = {torch.squeeze, torch.unsqueeze, torch.reshape, torch.flatten,
                   _aten.squeeze.dim, _aten.squeeze.default, _aten.unsqueeze.default,
                   _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default,
                   _aten.alias.default, _aten.detach.default}
if hasattr(_aten.squeeze, "dims"):
    _VIEW_FUNCTIONS.add(_aten.squeeze.dims)
_VIEW_METHODS = {"squeeze", "unsqueeze", "view", "reshape", "flatten", "unflatten",
                 "contiguous", "detach"}


def _view_root(gm: torch.fx.GraphModule, node) -> torch.fx.Node | None:
    """The ``get_attr`` node of a float parameter ``W`` when ``node`` computes a chain of
    view ops of ``W`` that gives back ``W``'s shape and strides on ``W``'s storage (Mamba's
    ``conv1d.weight.squeeze(1)`` then ``.unsqueeze(1)`` before its conv)."""
    chain = []
    while isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_method") and (
            node.target in _VIEW_FUNCTIONS if node.op == "call_function"
            else node.target in _VIEW_METHODS):
        if not node.args or any(isinstance(a, torch.fx.Node) for a in
                                (*node.args[1:], *node.kwargs.values())):
            return None
        chain.append(node)
        node = node.args[0]
    w = _float_attr(gm, node) if chain else None
    if w is None:
        return None
    t = w.detach()
    try:
        for n in reversed(chain):
            f = getattr(t, n.target) if n.op == "call_method" else n.target
            t = f(*n.args[1:], **n.kwargs) if n.op == "call_method" else f(t, *n.args[1:], **n.kwargs)
    except Exception:  # noqa: BLE001 - a chain that does not run on the weight is left alone
        return None
    same = (isinstance(t, torch.Tensor) and t.shape == w.shape and t.stride() == w.stride()
            and t.data_ptr() == w.data_ptr())
    return node if same else None


def canonical_weights(gm: torch.fx.GraphModule) -> int:
    """Point weighted ops whose weight argument is a view chain of a parameter that gives
    the parameter back (see :func:`_view_root`) at the parameter itself, so every pass sees
    the op; return how many (the graph is recompiled when any)."""
    from fxpress.graph.weights import _FUNCTIONS

    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        try:
            entry = _FUNCTIONS.get(node.target)
        except TypeError:
            continue
        if entry is None:
            continue
        names = entry[1]
        where = names.index("weight")
        if len(node.args) > where:
            arg, put = node.args[where], lambda r: node.update_arg(where, r)
        elif "weight" in node.kwargs:
            arg, put = node.kwargs["weight"], lambda r: node.update_kwarg("weight", r)
        else:
            continue
        root = _view_root(gm, arg)
        if root is None:
            continue
        put(root)
        while isinstance(arg, torch.fx.Node) and arg is not root and not arg.users:
            up = arg.args[0]
            graph.erase_node(arg)
            arg = up
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def _reads_as_weight(node, w) -> bool:
    from fxpress.graph.weights import _FUNCTIONS, _bind

    if node.op != "call_function":
        return False
    try:
        entry = _FUNCTIONS.get(node.target)
    except TypeError:
        return False
    return entry is not None and _bind(entry[1], node).get("weight") is w


def canonical_embeddings(gm: torch.fx.GraphModule, tables: set[str]) -> int:
    """Make every read of an ``nn.Embedding``'s table (``tables``: weight names) a lookup:
    ``W[ids]`` (Whisper's positions) becomes ``embedding(W, ids)``, and any other read
    (DETR's object queries, ``W.unsqueeze(0).repeat(...)``; a slice ``W[:n]``) reads
    ``embedding(W, arange(len(W)))``, the same rows, so a pass that compresses embeddings
    sees the table. Return how many reads (the graph is recompiled when any)."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if not (node.op == "get_attr" and str(node.target) in tables):
            continue
        w = _param(gm, node)
        if w is None:
            continue
        aten = any(isinstance(u.target, torch._ops.OpOverload) for u in node.users
                   if u.op == "call_function")
        lookup = _aten.embedding.default if aten else None
        whole = None
        for user in list(node.users):
            if _reads_as_weight(user, node) or user.op == "output":
                continue
            if (aten and user.target is _aten.index.Tensor and user.args[0] is node
                    and len(user.args) == 2 and len(user.args[1]) == 1
                    and isinstance(user.args[1][0], torch.fx.Node)):
                with graph.inserting_before(user):
                    new = graph.call_function(lookup, (node, user.args[1][0]))
                new.meta = dict(user.meta)
                user.replace_all_uses_with(new)
                graph.erase_node(user)
                count += 1
                continue
            if whole is None:
                with graph.inserting_after(node):
                    if aten:
                        ids = graph.call_function(_aten.arange.default, (w.shape[0],),
                                                  {"dtype": torch.int64, "device": w.device})
                        with graph.inserting_after(ids):
                            whole = graph.call_function(lookup, (node, ids))
                    else:
                        ids = graph.call_function(torch.arange, (w.shape[0],),
                                                  {"device": w.device})
                        with graph.inserting_after(ids):
                            whole = graph.call_function(torch.nn.functional.embedding, (ids, node))
            user.replace_input_with(node, whole)
            count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def embedding_tables(model: torch.nn.Module) -> set[str]:
    """The weight names of ``model``'s ``nn.Embedding`` layers (without ``max_norm``)."""
    return {f"{n}.weight" if n else "weight" for n, m in model.named_modules()
            if isinstance(m, torch.nn.Embedding) and m.max_norm is None}


def _written_arg(node: torch.fx.Node):
    """The argument an ATen op of ``node`` writes into in place (``copy_``'s ``self``), else None."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return None
    for i, a in enumerate(t._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            return node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
    return None


def _aliases_input(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an ATen view of its first argument (``select``, ``slice``, ...)."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or not node.args:
        return False
    r = t._schema.returns
    return bool(r) and r[0].alias_info is not None and not r[0].alias_info.is_write \
        and _written_arg(node) is None


def autograd_safe(gm: torch.nn.Module) -> torch.nn.Module:
    """``gm`` as a graph autograd can differentiate when the graph writes in place into
    tensors it also reads (RWKV's exported recurrence copies each step's state into a
    slice of a state tensor that earlier steps read: backward found the values it saved
    overwritten). A new GraphModule over the same modules and parameters, where every
    read of a tensor that some op of the graph writes into (or of a view of one) reads a
    clone taken at that point; ``gm`` itself when nothing is written (or not a graph).
    The values are those of ``gm``; only autograd's saved tensors differ."""
    if not isinstance(gm, torch.fx.GraphModule):
        return gm

    def root(n):
        while isinstance(n, torch.fx.Node) and _aliases_input(n):
            n = n.args[0]
        return n

    if not any(isinstance(_written_arg(n), torch.fx.Node) for n in gm.graph.nodes):
        return gm
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    written = {root(m) for n in graph.nodes if isinstance(m := _written_arg(n), torch.fx.Node)}
    for n in list(graph.nodes):
        if n.op == "output" or _aliases_input(n):
            continue
        target = _written_arg(n)
        for a in list(n.all_input_nodes):
            if a is target or a.op == "get_attr" or root(a) not in written:
                continue
            with graph.inserting_before(n):
                clone = graph.call_function(_aten.clone.default, (a,))
            clone.meta = dict(a.meta)
            n.replace_input_with(a, clone)
    out = torch.fx.GraphModule(gm, graph, type(gm).__name__)
    out.meta = gm.meta
    return out


__all__ = ["autograd_safe", "canonical_embeddings", "canonical_linears", "canonical_weights", "embedding_tables",
           "transposed_weight"]


def zeroed_allocations(gm: torch.fx.GraphModule) -> int:
    """Rewrite every allocation of uninitialised memory (``torch.empty``, ``new_empty``,
    ``empty_like`` and their ATen ops) into its zero-filled twin; returns how many.

    An uninitialised tensor's contents are undefined: a model that reads it back only
    after writing it (WavLM's relative position buckets, DeepSeek-V3's rotary halves)
    computes the same with zeros. Artifacts refuse such allocations (a crafted graph
    could return the process's heap), so without this the graph could not be saved.
    """
    aten = torch.ops.aten
    functions = {torch.empty: torch.zeros, torch.empty_like: torch.zeros_like,
                 aten.empty.memory_format: aten.zeros.default,
                 aten.new_empty.default: aten.new_zeros.default,
                 aten.empty_like.default: aten.zeros_like.default}
    # torch.zeros and aten.zeros take no memory_format (their result is contiguous)
    drop_format = {torch.empty, aten.empty.memory_format}
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in functions:
            if node.target in drop_format:
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "memory_format"}
            node.target = functions[node.target]
        elif node.op == "call_method" and node.target == "new_empty":
            node.target = "new_zeros"
        else:
            continue
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
