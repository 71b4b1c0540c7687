"""Padding skipped in an exported encoder, for :mod:`fxpress.onnx_export`.

A batch of sentences padded to one length spends most of its work on pad tokens (32
sentences of 10-30 tokens padded to 128: four fifths). Every op that works on each token
alone (the linear layers, LayerNorm, GELU, residual adds, bias adds) then runs on the real
tokens only: their rows are gathered out of ``[batch, sequence, C]`` by the attention
mask (``NonZero`` once per call) into ``[tokens, C]``, and scattered back into zeros only
where something reads the whole sequence. That is allowed only where pad rows cannot
reach a real token's result, so the export applies it only when every such place is one
of:

* a fused attention (``MultiHeadAttention``) whose mask is computed from the mask input:
  pad keys are masked (their scores get the lowest float, their softmax weight is 0 exactly
  whatever their values), and the pad queries' outputs are not gathered again;
* a ``Mul`` by the mask itself (``Cast`` / ``Unsqueeze`` / ``Reshape`` / ``Expand`` of it):
  mean pooling over the mask, where a pad row counts 0 times either way.

Any other reader of a per-token value (a graph output of per-token values, an unfused
attention, a convolution over the sequence, pooling that ignores the mask), or of what an
attention computed for its pad queries from the zero rows, keeps the graph as it was, and so does a graph with no fused attention or no single ``[batch, sequence]``
integer input that every attention's mask comes from. Real tokens' results are then the
padded graph's exactly, but for per-tensor int8 inputs (``DynamicQuantizeLinear``), whose
range is taken over the real tokens only instead of real and pad tokens.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fxpress.onnx_lowering import _DOMAIN, _Builder, _key_of

#: Name prefix of the nodes this module adds (``producer_through`` walks back over them).
PREFIX = "fxpress.padding/"

# ops that compute each token's row from that row alone, given operands constant over
# batch and sequence (the "x" inputs listed; the rest must be such constants)
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Relu", "Sigmoid",
                "Gelu", "Cast", "Identity", "Abs", "Max", "Min", "Neg", "Reciprocal", "Clip",
                "Softplus", "LeakyRelu", "Elu", "HardSigmoid", "Exp", "Log", "Mish"}
_MASK_CHAIN = {"Cast", "Unsqueeze", "Reshape", "Expand", "Identity"}


def producer_through(producer: dict, name: str):
    """The node that makes ``name``, looking through the gathers and scatters of padding."""
    node = producer.get(name)
    while node is not None and node.name.startswith(PREFIX):
        data = node.input[2] if node.op_type == "ScatterND" else node.input[0]
        node = producer.get(data)
    return node


def _dims(graph) -> dict[str, list]:
    out = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_param or d.dim_value for d in tt.shape.dim]
    return out


def _const_dims(graph) -> dict[str, tuple]:
    from onnx import numpy_helper

    out = {i.name: tuple(i.dims) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = tuple(numpy_helper.to_array(a.t).shape)
                elif a.name in ("value_float", "value_int"):
                    out[n.output[0]] = ()
    return out


def _token(dims) -> bool:
    return dims is not None and len(dims) == 3 and dims[0] == "batch" and dims[1] == "sequence"


def padding_plan(graph, keys: dict[int, tuple[str, Any]]) -> dict | None:
    """What :func:`skip_padding` rewrites in ``graph`` (the export's graph with placeholder
    nodes): ``{"mask": input name, "region": node indices, "pack": tensors, "unpack":
    tensors}``, or None where padding cannot be skipped exactly (see the module's doc)."""
    dims, consts = _dims(graph), _const_dims(graph)
    producer = {o: n for n in graph.node for o in n.output}
    nodes = list(graph.node)
    attentions = [n for n in nodes if (k := _key_of(n)) is not None and keys[k][1][1] == "attention"]
    if not attentions or any(len(n.input) < 4 or not n.input[3] for n in attentions):
        return None

    def sources(name: str) -> set[str]:  # graph inputs a value is computed from (not via Shape)
        seen, todo, found = set(), [name], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            node = producer.get(t)
            if node is None:
                found.add(t)
            elif node.op_type not in ("Shape", "Size"):
                todo.extend(i for i in node.input if i)
        return found

    candidates = [i.name for i in graph.input if i.type.tensor_type.elem_type in (6, 7, 9)
                  and dims.get(i.name) == ["batch", "sequence"]]
    masks = [c for c in candidates if all(c in sources(a.input[3]) for a in attentions)]
    if len(masks) != 1:
        return None
    mask = masks[0]

    def mask_only(name: str) -> bool:  # a Cast / Unsqueeze / ... chain of the mask
        while name != mask:
            node = producer.get(name)
            if node is None or node.op_type not in _MASK_CHAIN or any(
                    i not in consts for i in node.input[1:] if i):
                return False
            name = node.input[0]
        return True

    def broadcast(name: str) -> bool:  # constant over batch and sequence
        shape = consts.get(name)
        return shape is not None and all(d == 1 for d in shape[:-1])

    region: set[int] = set()
    token: set[str] = {n for n, d in dims.items() if _token(d)}
    for i, n in enumerate(nodes):
        xs = [t for t in n.input if t in token]
        if not xs or not all(_token(dims.get(o)) for o in n.output):
            continue
        rest = [t for t in n.input if t and t not in token]
        k = _key_of(n)
        if k is not None:
            ok = keys[k][1][1] in ("int8", "nbits", "decoded") and len(n.input) == 1
        elif n.domain not in ("", "ai.onnx"):
            ok = False
        elif n.op_type in _ELEMENTWISE:
            ok = all(broadcast(t) for t in rest)
        elif n.op_type == "LayerNormalization":
            axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
            ok = axis in (-1, 2) and n.input[0] in token and all(broadcast(t) for t in rest) \
                and len(n.output) == 1
        elif n.op_type == "MatMul":
            ok = n.input[0] in token and len(consts.get(n.input[1], ())) == 2
        else:
            ok = False
        if ok:
            region.add(i)

    readers: dict[str, list[tuple[int, int]]] = {}
    for i, n in enumerate(nodes):
        for j, t in enumerate(n.input):
            readers.setdefault(t, []).append((i, j))
    outputs = {o.name for o in graph.output}
    att_ids = {id(a) for a in attentions}

    def safe(i: int, j: int) -> bool:  # reading a per-token value padded with zeros is exact
        n = nodes[i]
        if id(n) in att_ids:
            return j < 3
        if n.op_type == "Mul" and n.domain in ("", "ai.onnx") and len(n.input) == 2:
            other = n.input[1 - j]
            return mask_only(other) and (dims.get(other) or [None])[-1:] == [1]
        return False

    changed = True
    while changed:  # a node whose result something else reads unsafely runs padded
        changed = False
        for i in sorted(region):
            n = nodes[i]
            if any(o in outputs or any(r not in region and not safe(r, j) for r, j in readers.get(o, []))
                   for o in n.output):
                region.discard(i)
                changed = True
        # a value made padded (outside the region) and read inside it is gathered: that
        # is always exact; nothing more to check
    if not region:
        return None
    # the values outside the region that read scattered rows have pad rows unlike the
    # padded graph's (an attention's pad queries saw zero rows): only a gather into the
    # region, another attention's q, k, v or a Mul by the mask may read them
    dirty = {o for i in region for o in nodes[i].output
             if any(r not in region for r, _ in readers.get(o, []))}
    for i, n in enumerate(nodes):
        if i in region or not any(t in dirty for t in n.input):
            continue
        reads = [j for j, t in enumerate(n.input) if t in dirty]
        if not all(safe(i, j) for j in reads):
            return None
        if id(n) in att_ids:
            dirty.update(n.output)
    if dirty & outputs:
        return None
    pack = sorted({t for i in region for t in nodes[i].input
                   if t in token and (producer.get(t) is None or nodes.index(producer[t]) not in region)})
    unpack = sorted({o for i in region for o in nodes[i].output
                     if any(r not in region for r, _ in readers.get(o, []))})
    return {"mask": mask, "region": region, "pack": pack, "unpack": unpack}


def skip_padding(model, plan: dict) -> None:
    """Rewrite ``model`` (ONNX, placeholders not yet filled) by ``plan``: each value in
    ``pack`` gathered to its real tokens' rows for the region's nodes, each in ``unpack``
    scattered back into zeros ``[batch, sequence, C]`` for the nodes outside it."""
    graph = model.graph
    b = _Builder(graph)
    nodes = list(graph.node)
    region = plan["region"]
    base = PREFIX.rstrip("/")
    flat_mask = b.node("Reshape", [plan["mask"], b.const(base + ".flat", np.array([-1], np.int64))],
                       PREFIX + "mask")[0]
    nz = b.node("NonZero", [flat_mask], PREFIX + "mask")[0]  # [1, tokens]
    rows = b.node("Squeeze", [nz, b.const(base + ".axis0", np.array([0], np.int64))], PREFIX + "rows")[0]
    rows2 = b.node("Transpose", [nz], PREFIX + "rows", perm=[1, 0])[0]  # [tokens, 1]
    bs_shape = b.node("Shape", [plan["mask"]], PREFIX + "mask")[0]
    bs = b.node("ReduceProd", [bs_shape], PREFIX + "mask", keepdims=1)[0]
    head = list(b.nodes)
    rename: dict[str, str] = {}
    for t in plan["pack"]:
        flat = b.node("Flatten", [t], PREFIX + t, axis=2)[0]
        rename[t] = b.node("Gather", [flat, rows], PREFIX + t, axis=0)[0]
    packs = list(b.nodes[len(head):])
    unpacks: dict[str, list] = {}
    dims = _dims(graph)
    by_width: dict[int, tuple[str, str]] = {}
    for t in plan["unpack"]:
        b.nodes = []
        packed = b.name(t + ".packed")
        c = (dims.get(t) or [None])[-1]
        if isinstance(c, int) and c > 0:  # zeros and shape once per width (q, k, v share them)
            if c not in by_width:
                b.nodes = []
                width = b.const(base + f".width{c}", np.array([c], np.int64))
                by_width[c] = (
                    b.node("ConstantOfShape", [b.node("Concat", [bs, width], PREFIX + "zeros", axis=0)[0]],
                           PREFIX + "zeros", value=_zero())[0],
                    b.node("Concat", [bs_shape, width], PREFIX + "shape", axis=0)[0])
                head.extend(b.nodes)
                b.nodes = []
            zeros, shape = by_width[c]
        else:
            width = b.node("Shape", [packed], PREFIX + t, start=1)[0]
            zeros = b.node("ConstantOfShape", [b.node("Concat", [bs, width], PREFIX + t, axis=0)[0]],
                           PREFIX + t, value=_zero())[0]
            shape = b.node("Concat", [bs_shape, width], PREFIX + t + ".shape", axis=0)[0]
        full = b.node("ScatterND", [zeros, rows2, packed], PREFIX + t)[0]
        b.nodes.append(b.helper.make_node("Reshape", [full, shape], [t], name=b.name(PREFIX + t + "/Reshape")))
        unpacks[t] = (packed, list(b.nodes))
    out = []
    for i, n in enumerate(nodes):
        if i in region:
            for j, t in enumerate(n.input):
                if t in rename:
                    n.input[j] = rename[t]
                elif t in unpacks:  # made in the region: read packed
                    n.input[j] = unpacks[t][0]
            for a in n.attribute:  # [tokens, C] has one axis less: the last one by its -1
                if n.op_type == "LayerNormalization" and a.name == "axis":
                    a.i = -1
            for j, t in enumerate(n.output):
                if t in unpacks:
                    n.output[j] = unpacks[t][0]
            out.append(n)
            out.extend(node for t in n.output for node in _after(unpacks, t))
        else:
            out.append(n)
    # the mask's rows first, the gathers right after what they read (graph order kept)
    placed = _place(out, head + packs, {i.name for i in graph.input} | {i.name for i in graph.initializer})
    del graph.node[:]
    graph.node.extend(placed)
    # the region's values changed shape: drop what the export recorded for them
    changed = {o for i in region for o in nodes[i].output} | set(rename.values())
    kept = [vi for vi in graph.value_info if vi.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _after(unpacks: dict, packed_name: str) -> list:
    for _t, (packed, nodes) in unpacks.items():
        if packed == packed_name:
            return nodes
    return []


def _zero():
    from onnx import TensorProto, helper

    return helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])


def _place(nodes: list, extra: list, ready: set[str]) -> list:
    """``nodes`` with ``extra`` inserted, each as soon as its inputs exist."""
    out, pending = [], list(extra)
    have = set(ready)

    def flush():
        progress = True
        while progress:
            progress = False
            for n in list(pending):
                if all(not i or i in have for i in n.input):
                    out.append(n)
                    have.update(n.output)
                    pending.remove(n)
                    progress = True

    flush()
    for n in nodes:
        out.append(n)
        have.update(n.output)
        flush()
    out.extend(pending)
    return out


__all__ = ["PREFIX", "padding_plan", "producer_through", "skip_padding", "_DOMAIN"]
