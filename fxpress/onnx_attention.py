"""Multi-head attention in an fxpress graph, found for :mod:`fxpress.onnx_export`: each
``scaled_dot_product_attention`` over heads split from projected ``[B, S, H*d]`` inputs
becomes a placeholder op that the export turns into ``com.microsoft.MultiHeadAttention``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx

from fxpress.onnx_lowering import AttentionSpec

# the ops as torch.export records them, and as symbolic tracing does (functions, methods)
_SDPA = (torch.ops.aten.scaled_dot_product_attention.default,
         torch.nn.functional.scaled_dot_product_attention)
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default,
          torch.ops.aten._unsafe_view.default, torch.reshape, "view", "reshape")
_TRANSPOSES = (torch.ops.aten.transpose.int, torch.transpose, "transpose")
_PERMUTES = (torch.ops.aten.permute.default, torch.permute, "permute")


def _shape(node) -> tuple | None:
    """A node's shape from capture's metadata (None: not a node, or not recorded)."""
    from fxpress.graph.capture import node_shape

    return node_shape(node)[0] if isinstance(node, torch.fx.Node) else None


def _same(a, b) -> bool:
    """Two dims are the same: the same symbol, or the same size."""
    return str(a) == str(b)


def _is_call(node, targets) -> bool:
    """``node`` calls one of ``targets`` (functions or method names) with positional args."""
    return isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_method") \
        and not node.kwargs and any(node.target is t if not isinstance(t, str) else
                                    node.op == "call_method" and node.target == t for t in targets)


def _swaps_1_2(node) -> bool:
    """``node`` is ``transpose(x, 1, 2)`` or ``permute(x, [0, 2, 1, 3])`` of a 4-d ``x``."""
    if _is_call(node, _TRANSPOSES) and len(node.args) == 3 and \
            all(isinstance(a, int) for a in node.args[1:]):
        return sorted(a % 4 for a in node.args[1:3]) == [1, 2]
    if _is_call(node, _PERMUTES):
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        return isinstance(dims, (list, tuple)) and all(isinstance(a, int) for a in dims) \
            and [a % 4 for a in dims] == [0, 2, 1, 3]
    return False


def _heads_of(node) -> tuple[torch.fx.Node, int] | None:
    """``(x, heads)`` when ``node`` is ``x [B, S, H*d]`` split into heads ``[B, H, S, d]``
    (a view or reshape to ``[B, S, H, d]``, then ``transpose(1, 2)``); else None."""
    if not _swaps_1_2(node) or not _is_call(node.args[0], _VIEWS):
        return None
    view = node.args[0]
    x, split, flat = view.args[0], _shape(view), _shape(view.args[0])
    if split is None or flat is None or len(split) != 4 or len(flat) != 3:
        return None
    heads, dim = split[2], split[3]
    if not (isinstance(heads, int) and isinstance(dim, int)) or not _same(flat[2], heads * dim):
        return None
    if not (_same(split[0], flat[0]) and _same(split[1], flat[1])):  # batch, sequence kept
        return None
    return x, heads


def _merged(node) -> torch.fx.Node | None:
    """The node that merges ``node``'s heads back (``[B, H, S, d]`` -> ``[B, S, H*d]``:
    ``transpose(1, 2)`` then a view or reshape, after an optional view to the same
    shape), when that is ``node``'s only use; else None."""
    shape = _shape(node)
    user = next(iter(node.users)) if len(node.users) == 1 else None
    if _is_call(user, _VIEWS) and shape is not None and _shape(user) is not None and \
            all(_same(a, b) for a, b in zip(_shape(user), shape)) and len(_shape(user)) == 4:
        user = next(iter(user.users)) if len(user.users) == 1 else None
    if not _swaps_1_2(user) or len(user.users) != 1:
        return None
    out = next(iter(user.users))
    flat = _shape(out) if _is_call(out, _VIEWS) else None
    if shape is None or flat is None or len(flat) != 3 or not (
            _same(flat[0], shape[0]) and _same(flat[1], shape[2])
            and _same(flat[2], shape[1] * shape[3])):
        return None
    return out


def fuse_attention(graph: torch.fx.Graph, register: Callable[[AttentionSpec, str], int],
                   op: Any) -> None:
    """Replace each ``scaled_dot_product_attention`` over heads split from projected
    ``[B, S, H*d]`` inputs (BERT's, and most encoders') by the attention placeholder, which
    becomes one ``com.microsoft.MultiHeadAttention`` node in ONNX (with the merge of its
    heads that follows, when there is one). Causal, dropout, grouped-query attention and
    masks that are not ``[B or 1, H or 1, S, T]`` stay as they are. ``register(spec, name)``
    returns the key the placeholder ``op(q, k, v, mask, key)`` is called with."""
    for node in list(graph.nodes):
        if node.op != "call_function" or not any(node.target is t for t in _SDPA):
            continue
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
        bound = dict(zip(names, node.args)) | dict(node.kwargs)
        if bound.get("dropout_p", 0.0) or bound.get("is_causal", False) or bound.get("enable_gqa", False):
            continue
        split = [_heads_of(bound[n]) for n in names[:3]]
        if any(s is None for s in split) or len({s[1] for s in split}) != 1:
            continue
        heads = split[0][1]
        q, k, out = _shape(bound["query"]), _shape(bound["key"]), _shape(node)
        if q is None or k is None or out is None or len(out) != 4:
            continue
        mask = bound.get("attn_mask")
        m_shape, m_dtype = (_shape(mask), _dtype(mask)) if mask is not None else (None, None)
        if mask is not None and not (
                m_shape is not None and len(m_shape) == 4 and m_dtype in (torch.bool, torch.float32)
                and str(m_shape[0]) in ("1", str(q[0])) and str(m_shape[1]) in ("1", str(heads))
                and _same(m_shape[2], q[2]) and _same(m_shape[3], k[2])):
            continue
        scale = bound.get("scale")
        merged = _merged(node)
        spec = AttentionSpec(heads, float(scale) if scale is not None else q[3] ** -0.5,
                             m_dtype == torch.bool, merged is not None)
        key = register(spec, node.name)
        with graph.inserting_before(node):
            new = graph.call_function(op, (split[0][0], split[1][0], split[2][0], mask, key))
        new.meta = dict((merged or node).meta)
        (merged or node).replace_all_uses_with(new)
        if merged is not None:
            graph.erase_node(merged)


def _dtype(node) -> torch.dtype | None:
    from fxpress.graph.capture import node_shape

    return node_shape(node)[1] if isinstance(node, torch.fx.Node) else None
