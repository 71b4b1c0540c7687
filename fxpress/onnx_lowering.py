"""The ONNX side of :mod:`fxpress.onnx_export`: the nodes that stand in for fxpress's
compressed layers (``MatMulInteger`` on fxpress's int8 codes and scales, ``MatMulNBits``
on its group codes, ``GatherBlockQuantized`` of quantized embedding rows), filled into the graph that
``torch.onnx.export`` wrote around placeholder ops.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

#: The custom op that stands for a compressed layer during export, and its ONNX node.
_DOMAIN = "fxpress.onnx"
_PLACEHOLDER = "CompressedLayer"
#: The custom op that stands for multi-head attention over projected q, k, v.
_ATTENTION = "FxpressAttention"  # a name no ONNX domain uses (onnx.reference wants unique names)


@dataclass(frozen=True)
class AttentionSpec:
    """One attention the exporter fuses: heads, softmax scale, whether its mask is boolean
    (True: attend) rather than additive, and whether its output has the heads merged
    (``[B, S, H*d]``, else ``[B, H, S, d]``)."""

    heads: int
    scale: float
    bool_mask: bool
    merged: bool

def _nbits_block(mod) -> int | None:
    """MatMulNBits block size that represents ``mod``'s scales exactly, or None."""
    if mod.bits not in (2, 4, 8):
        return None
    cols = mod.cols
    if mod.granularity == "group":
        g = mod.group_size
        return g if g >= 16 and g & (g - 1) == 0 else None
    for block in (128, 64, 32, 16):  # channel / tensor scales repeat per block
        if cols % block == 0:
            return block
    return 32 if cols >= 32 else None


class _Builder:
    """Adds nodes and initializers to an ONNX graph under unique names."""

    def __init__(self, graph):
        from onnx import helper, numpy_helper

        self.graph, self.helper, self.numpy_helper = graph, helper, numpy_helper
        self.names = {v.name for v in itertools.chain(graph.input, graph.output,
                                                       graph.initializer, graph.value_info)}
        for n in graph.node:
            self.names.update(n.output)
        self.nodes: list = []
        self.shared: dict[tuple, tuple] = {}

    def name(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.]", "_", base)
        out, i = base, 0
        while out in self.names:
            i += 1
            out = f"{base}_{i}"
        self.names.add(out)
        return out

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.graph.initializer.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], base: str, outputs: int = 1,
             domain: str = "", **attrs) -> list[str]:
        outs = [self.name(f"{base}.{op}" + (f".{i}" if i else "")) for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op, list(inputs), outs, name=self.name(base + "/" + op),
                                                domain=domain or None, **attrs))
        return outs


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


#: Zero point of the uint8 weights that stand for fxpress's symmetric int8 codes (code
#: + 128). ONNX Runtime's integer matmuls (MLAS) multiply uint8 inputs by int8 weights with
#: ``vpmaddubsw`` on x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake), which adds
#: two u8 x s8 products in int16 and saturates: a full-range input (the 255 levels
#: ``DynamicQuantizeLinear`` and the per-token codes use) came out wrong there, measured on
#: an AVX2-only AMD EPYC at 0.99 relative error on random full-range codes and 0.09 on
#: fxpress's int8 models. uint8 x uint8 is exact on every CPU (MLAS widens both to int16
#: and adds pairs in int32), at the full 255 input levels fxpress's exact integer product
#: (its reference kernel, and fbgemm and oneDNN on VNNI CPUs) uses; a file exported on one
#: machine runs on others.
U8_WEIGHT_ZERO = 128


def _unsigned_codes(codes: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 codes as the uint8 weights of :data:`U8_WEIGHT_ZERO`."""
    return (codes.to(torch.int16) + U8_WEIGHT_ZERO).to(torch.uint8)


def _weight_zero(b: _Builder) -> str:
    """The scalar uint8 weight zero point :data:`U8_WEIGHT_ZERO`, one per graph."""
    key = ("u8_weight_zero",)
    if key not in b.shared:
        b.shared[key] = (b.const("u8_weight_zero_point", np.array(U8_WEIGHT_ZERO, np.uint8)),)
    return b.shared[key][0]


def _int8_linear(b: _Builder, mod, x: str, y: str, base: str, fold: _Fold) -> str:
    """``y = mod(x)`` for a dynamic int8 QuantizedLinear: fxpress's codes and scales."""
    codes = mod.codes()  # int32 [N, K]
    zero = mod.zero()
    n = mod.shape[0]
    scale = mod.scale.reshape(-1).float()
    scale = (scale.expand(n) if scale.numel() == 1 else scale) * fold.out
    if zero is None:  # symmetric codes -127..127: uint8 with zero point 128 (see U8_WEIGHT_ZERO)
        w = b.const(base + ".qweight", _np(_unsigned_codes(codes.t())))
        wzp = _weight_zero(b)
    else:  # affine codes 0..2^bits-1 with an integer zero point per channel (or tensor)
        w = b.const(base + ".qweight", _np(codes.t().to(torch.uint8)))
        z = zero.reshape(-1)
        wzp = b.const(base + ".zero_point", _np((z.expand(n) if z.numel() == 1 else z).to(torch.uint8)))
    sw = b.const(base + ".scale", _np(scale))
    src = x
    if mod.smooth is not None and not fold.smooth_into:  # the stored weight is w * smooth:
        src = _smoothed_input(b, x, mod.smooth, base)  # divide x
    if mod.act_scale == "tensor":
        key = ("dql", src)
        if key not in b.shared:  # q, k and v read one input: quantise it once, as fxpress does
            b.shared[key] = tuple(b.node("DynamicQuantizeLinear", [src], base, outputs=3))
        xq, sx, zx = b.shared[key]
        acc = b.node("MatMulInteger", [xq, w, zx] + ([wzp] if wzp else []), base)[0]
        prod = b.node("Mul", [sx, sw], base + ".scales")[0]
    else:  # per token: one symmetric scale per row, offset by 128 into uint8
        # amax = max|x| per row (at least 1e-12), codes round(x * (127 / amax)) + 128 by
        # QuantizeLinear (round half to even, as torch.round), then one integer matmul
        # to float with the channel scales; the row scales amax / 127 after it
        last = b.const(base + ".last_axis", np.array([-1], np.int64))
        amax = b.node("Max", [b.node("ReduceMax", [b.node("Abs", [src], base)[0], last], base,
                                     keepdims=1)[0],
                              b.const(base + ".tiny", np.array(1e-12, np.float32))], base)[0]
        inv127 = b.node("Div", [b.const(base + ".c127", np.array(127.0, np.float32)), amax], base)[0]
        one = b.const(base + ".one", np.array(1.0, np.float32))
        zx = b.const(base + ".x_zero_point", np.array(128, np.uint8))
        xq = b.node("QuantizeLinear", [b.node("Mul", [src, inv127], base)[0], one, zx], base)[0]
        rowscale = b.node("Div", [amax, b.const(base + ".c127b", np.array(127.0, np.float32))], base)[0]
        # MatMulIntegerToFloat takes a per-tensor input scale: 1 here, the row scales after
        acc = b.node("MatMulIntegerToFloat", [xq, w, one, sw, zx] + ([wzp] if wzp else []), base,
                     domain="com.microsoft")[0]
        return _finish(b, mod, b.node("Mul", [acc, rowscale], base)[0], y, base, fold)
    accf = b.node("Cast", [acc], base, to=1)[0]
    return _finish(b, mod, b.node("Mul", [accf, prod], base)[0], y, base, fold)


def _smoothed_input(b: _Builder, x: str, smooth: torch.Tensor, base: str) -> str:
    """``x / smooth`` (one ``Mul`` by the inverse), made once for the layers that read
    ``x`` with equal factors (q, k and v smoothed as a group by the quantize pass)."""
    inv = _np(smooth.reciprocal().float())
    key = ("smoothed", x, inv.tobytes())
    if key not in b.shared:
        b.shared[key] = tuple(b.node("Mul", [x, b.const(base + ".inv_smooth", inv)], base))
    return b.shared[key][0]


@dataclass
class _Fold:
    """What a layer's export takes over from its neighbours: ``out`` multiplies its output
    channels (the next layer's 1/smooth, moved into this layer's scales and bias), and
    ``smooth_into``: where its own 1/smooth was moved (the layer or norm before it)."""

    out: Any = 1.0
    smooth_into: str = ""


def _finish(b: _Builder, mod, out: str, y: str, base: str, fold: _Fold) -> str:
    bias = getattr(mod, "bias", None)
    if bias is not None:
        bias = bias.float() * fold.out
    if bias is None:
        b.nodes.append(b.helper.make_node("Identity", [out], [y], name=b.name(base + "/Identity")))
    else:
        bb = b.const(base + ".bias", _np(bias))
        b.nodes.append(b.helper.make_node("Add", [out, bb], [y], name=b.name(base + "/Add")))
    return y


def _nbits_linear(b: _Builder, mod, x: str, y: str, base: str, accuracy_level: int,
                  fold: _Fold) -> str:
    """``y = mod(x)`` for a weight-only QuantizedLinear as com.microsoft.MatMulNBits."""
    from fxpress.passes.quantize_grid import code_range

    bits, block = mod.bits, _nbits_block(mod)
    n, k = mod.shape[0], mod.cols
    lo, _ = code_range(bits, mod.scheme)
    u = (mod.codes() - lo).to(torch.uint8)  # unsigned codes [N, K]
    zero = mod.zero()
    zu = None if zero is None else (zero - lo)  # unsigned zero point
    blocks = -(-k // block)
    # scales (and zero points) per (row, block): a group's own, or exact repeats of channel /
    # tensor scales (a group layer's block is its group, the last one perhaps shorter)
    if mod.granularity == "group":
        col_of_block = torch.arange(blocks)
    else:
        col_of_block = torch.arange(blocks) * block // (k // mod.scale.shape[1])
    scale = mod.scale.float().expand(n, -1)[:, col_of_block]
    if isinstance(fold.out, torch.Tensor):
        scale = scale * fold.out[:, None]
    if zu is None:
        zu = torch.full((n, blocks), 1 << (bits - 1), dtype=torch.int32)  # symmetric: q + 2^(b-1)
        u = (mod.codes() + (1 << (bits - 1))).to(torch.uint8)
    else:
        zu = zu.expand(n, -1)[:, col_of_block]
    pad = blocks * block - k
    if pad:
        u = torch.cat([u, zu.repeat_interleave(block, 1)[:, k:].to(torch.uint8)], 1)
    per_byte = 8 // bits
    blob = block * bits // 8
    u3 = u.reshape(n, blocks, blob, per_byte).to(torch.int32)
    packed = sum(u3[..., i] << (bits * i) for i in range(per_byte)).to(torch.uint8)
    zpad = (-blocks) % per_byte
    zz = torch.cat([zu, zu.new_zeros(n, zpad)], 1) if zpad else zu
    z3 = zz.reshape(n, -1, per_byte).to(torch.int32)
    zpacked = sum(z3[..., i] << (bits * i) for i in range(per_byte)).to(torch.uint8).reshape(-1)
    src = x
    if mod.smooth is not None and not fold.smooth_into:  # activation-aware scaling (the
        # stored weight is w * smooth)
        src = _smoothed_input(b, x, mod.smooth, base)
    inputs = [src, b.const(base + ".qweight", _np(packed)), b.const(base + ".scales", _np(scale.reshape(-1)))]
    if zero is not None:  # symmetric codes use MatMulNBits' default zero point 2^(bits-1)
        inputs.append(b.const(base + ".zero_points", _np(zpacked)))
    out = b.node("MatMulNBits", inputs, base, domain="com.microsoft", K=k, N=n, bits=bits,
                 block_size=block, accuracy_level=accuracy_level)[0]
    return _finish(b, mod, out, y, base, fold)


def _embedding_block(mod) -> int | None:
    """GatherBlockQuantized's block for a quantized embedding (a power of two >= 16): its
    group, or for per-row scales any block (a row's scale repeats over its blocks, which is
    exact); None where it takes no block (per-tensor scales, other group sizes)."""
    if mod.granularity == "group":
        g = mod.group_size
        return g if g >= 16 and g & (g - 1) == 0 else None
    if mod.scale.shape[0] > 1:
        block = 16
        while block * 2 <= min(mod.cols, 128):
            block *= 2
        return block
    return None


def _pack4(u: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte along the last axis, low nibble first (padded with 0)."""
    if u.shape[-1] % 2:
        u = torch.cat([u, u.new_zeros(*u.shape[:-1], 1)], -1)
    u = u.to(torch.int32)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def _gather_embedding(b: _Builder, mod, x: str, y: str, base: str) -> str:
    """``y = mod(indices)``: the integer rows looked up and decoded with their scales in one
    node: per row or per group, ``com.microsoft.GatherBlockQuantized`` (4-bit codes packed
    two to a byte, other widths one); per tensor, ``Gather`` then ``DequantizeLinear``."""
    from fxpress.passes.quantize_grid import code_range

    codes = mod.codes()
    zero = mod.zero()
    rows, cols = codes.shape
    # unsigned codes and zero points: affine codes are 0..2^bits-1 already, symmetric ones
    # are offset by 2^(bits-1) (8 bits: by 128, as the 8-bit container holds them)
    bits = 4 if mod.bits == 4 and cols % 2 == 0 else 8
    lo, _ = code_range(mod.bits, mod.scheme)
    shift = -lo if zero is not None else 1 << (bits - 1)
    u = (codes + shift).to(torch.uint8)
    zp = (torch.zeros_like(mod.scale, dtype=torch.int32) if zero is None else zero.to(torch.int32)) + shift
    block = _embedding_block(mod)
    if block is None:  # one scale for the table
        table = b.const(base + ".qweight", _np(u))
        got = b.node("Gather", [table, x], base, axis=0)[0]
        b.nodes.append(b.helper.make_node(
            "DequantizeLinear", [got, b.const(base + ".scale", _np(mod.scale.float().reshape(()))),
                                 b.const(base + ".zero_point", _np(zp.reshape(()).to(torch.uint8)))],
            [y], name=b.name(base + "/DequantizeLinear")))
        return y
    blocks = -(-cols // block)
    scale = mod.scale.float().reshape(rows, -1).expand(rows, blocks)
    zps = zp.reshape(rows, -1).expand(rows, blocks).to(torch.uint8)
    if bits == 4:
        u, zps = _pack4(u), _pack4(zps)
    b.nodes.append(b.helper.make_node(
        "GatherBlockQuantized", [b.const(base + ".qweight", _np(u)), x,
                                 b.const(base + ".scales", _np(scale.contiguous())),
                                 b.const(base + ".zero_points", _np(zps.contiguous()))],
        [y], name=b.name(base + "/GatherBlockQuantized"), domain="com.microsoft",
        gather_axis=0, quantize_axis=1, block_size=block, bits=bits))
    return y


def _attention(b: _Builder, spec: AttentionSpec, inputs: Sequence[str], y: str, base: str) -> str:
    """``y = sdpa(q, k, v, mask)`` with heads split (``[B, H, S, d]``) from projected
    ``[B, S, H*d]`` inputs, as ``com.microsoft.MultiHeadAttention`` (output ``[B, S, H*d]``;
    split into heads again by ``Reshape`` + ``Transpose`` where the graph does not merge
    them right after). A boolean mask becomes an additive bias (0 or the lowest float), computed
    once for the layers that share it."""
    q, k, v = inputs[:3]
    mha = [q, k, v]
    mask = inputs[3] if len(inputs) > 3 and inputs[3] else None
    if mask is not None:
        if spec.bool_mask:
            key = ("attention_bias", mask)
            if key not in b.shared:
                b.shared[key] = tuple(b.node("Where", [
                    mask, b.const("attention_bias.zero", np.array(0.0, np.float32)),
                    b.const("attention_bias.masked", np.array(np.finfo(np.float32).min, np.float32))],
                    "attention_bias"))
            mask = b.shared[key][0]
        mha += ["", "", mask]  # bias, key_padding_mask, attention_bias
    if spec.merged:
        b.nodes.append(b.helper.make_node("MultiHeadAttention", mha, [y], name=b.name(base + "/MultiHeadAttention"),
                                          domain="com.microsoft", num_heads=spec.heads, scale=spec.scale))
        return y
    out = b.node("MultiHeadAttention", mha, base, domain="com.microsoft", num_heads=spec.heads,
                 scale=spec.scale)[0]
    split = b.node("Reshape", [out, b.const(base + ".heads_shape", np.array([0, 0, spec.heads, -1], np.int64))],
                   base)[0]
    b.nodes.append(b.helper.make_node("Transpose", [split], [y], name=b.name(base + "/Transpose"),
                                      perm=[0, 2, 1, 3]))
    return y


def _smooth_folds(graph, keys: dict[int, tuple[str, Any]]) -> dict[int, _Fold]:
    """Smoothed layers that read a fused attention's output (BERT's attention output
    projection): attention is linear in its values, so the layer's 1/smooth moves into the
    value projection's output scales and bias (when that projection is integer and feeds
    only this attention), and the layer's own ``Mul`` goes."""
    from fxpress.onnx_padding import producer_through

    key_of = _key_of
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    for o in graph.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    folds: dict[int, _Fold] = {}
    for node in graph.node:
        key = key_of(node)
        if key is None or keys[key][1][1] not in ("int8", "nbits") or keys[key][1][0].smooth is None:
            continue
        att = producer_through(producer, node.input[0])  # padding's gather: see through
        att_key = None if att is None else key_of(att)
        if att_key is None or keys[att_key][1][1] != "attention" or not keys[att_key][1][0].merged:
            continue
        value = producer_through(producer, att.input[2])
        v_key = None if value is None else key_of(value)
        if v_key is None or keys[v_key][1][1] not in ("int8", "nbits") or readers.get(att.input[2]) != 1 \
                or readers.get(value.output[0]) != 1 or v_key in folds:
            continue
        folds[v_key] = _Fold(out=keys[key][1][0].smooth.reciprocal().float())
        folds[key] = _Fold(smooth_into="the value projection")
    return folds


def _norm_folds(b: _Builder, keys: dict[int, tuple[str, Any]], folds: dict[int, _Fold]) -> None:
    """Smoothing moved into the ``LayerNormalization`` before the smoothed layers: when
    every reader of a norm's output is a smoothed integer layer and all share one factor
    (a pre-norm block's fused or single projection), the norm's scale and bias are divided
    by it, ``(norm(x)·γ + β) / s = norm(x)·(γ/s) + β/s``, and the layers' own ``Mul`` goes.
    A norm whose output is read by anything else (a post-norm block's residual: BERT's)
    or by layers smoothed differently keeps it."""
    from onnx import numpy_helper

    graph = b.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    replaced: set[str] = set()
    for node in graph.node:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") \
                or node.output[0] in outputs or len(node.input) < 2 or node.input[1] not in inits:
            continue
        users = readers.get(node.output[0], [])
        ks = [_key_of(u) for u in users]
        if not users or any(k is None or keys[k][1][1] not in ("int8", "nbits")
                            or keys[k][1][0].smooth is None for k in ks):
            continue
        smooth = keys[ks[0]][1][0].smooth.float()
        if any(not torch.equal(keys[k][1][0].smooth.float(), smooth) for k in ks[1:]):
            continue
        gamma = numpy_helper.to_array(inits[node.input[1]])
        has_bias = len(node.input) > 2 and node.input[2] in inits
        if gamma.shape != (smooth.numel(),) or (len(node.input) > 2 and node.input[2] and not has_bias):
            continue
        inv = _np(smooth.reciprocal())
        name = keys[ks[0]][0]
        replaced.update(node.input[1:3])
        node.input[1] = b.const(name + ".norm_scale_smoothed", (gamma * inv).astype(gamma.dtype))
        if has_bias:
            beta = numpy_helper.to_array(inits[node.input[2]])
            node.input[2] = b.const(name + ".norm_bias_smoothed", (beta * inv).astype(beta.dtype))
        for k in ks:
            folds.setdefault(k, _Fold()).smooth_into = "the LayerNorm"
    if replaced:  # the norms' own scales and biases, unless something else reads them
        used = {i for n in graph.node for i in n.input} | outputs
        kept = [i for i in graph.initializer if i.name not in replaced or i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _dims(graph, name: str) -> list | None:
    """The dims of value ``name`` (``dim_param`` or ``dim_value`` each) that the export
    recorded, or None."""
    for vi in itertools.chain(graph.input, graph.value_info, graph.output):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
    return None


def _qattention_groups(graph, keys: dict[int, tuple[str, Any]],
                       folds: dict[int, _Fold]) -> dict[int, tuple[int, int, int]]:
    """Attentions whose q, k and v are int8 layers that one ``com.microsoft.QAttention``
    node computes with the attention itself: per-tensor inputs read from one tensor (the
    same ``DynamicQuantizeLinear``), no smoothing or one factor for all three (or all
    moved into the LayerNorm before), symmetric int8 codes, equal widths, outputs read by
    the attention only, heads merged after it, and no mask or a boolean ``[batch, 1, S, S]``
    one. Its one integer matmul over the concatenated weights writes q, k and v in the
    layout attention reads (no three matmuls, bias adds and head transposes), with exactly
    MultiHeadAttention's results. ``{attention key: (q key, k key, v key)}``."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    for o in graph.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    groups: dict[int, tuple[int, int, int]] = {}
    for node in graph.node:
        key = _key_of(node)
        if key is None or keys[key][1][1] != "attention" or not keys[key][1][0].merged:
            continue
        spec = keys[key][1][0]
        projs = [producer.get(i) for i in node.input[:3]]
        pkeys = [None if p is None else _key_of(p) for p in projs]
        if any(k is None or keys[k][1][1] != "int8" for k in pkeys) or len(set(pkeys)) != 3 \
                or any(readers.get(i) != 1 for i in node.input[:3]):
            continue
        mods = [keys[k][1][0] for k in pkeys]
        if len({p.input[0] for p in projs}) != 1 or any(
                m.act_scale != "tensor" or m.zero() is not None or m.shape[0] != mods[0].shape[0]
                for m in mods):
            continue
        folded = {bool(folds.get(k, _Fold()).smooth_into) for k in pkeys}
        smooths = [m.smooth for m in mods]
        if len(folded) != 1 or (not folded.pop() and not (
                all(s is None for s in smooths) or (all(s is not None for s in smooths) and all(
                    torch.equal(s, smooths[0]) for s in smooths[1:])))):
            continue
        mask = node.input[3] if len(node.input) > 3 and node.input[3] else None
        if mask is not None:
            md, xd = _dims(graph, mask), _dims(graph, projs[0].input[0])
            if not spec.bool_mask or md is None or xd is None or len(md) != 4 or md[1] != 1 \
                    or md[0] != xd[0] or md[2] != md[3]:
                continue
        groups[key] = tuple(pkeys)  # type: ignore[assignment]
    return groups


def _qattention(b: _Builder, spec: AttentionSpec, mods: Sequence, folds: Sequence[_Fold],
                x: str, mask: str | None, y: str, base: str) -> str:
    """``y = attention(q(x), k(x), v(x), mask)`` as one ``com.microsoft.QAttention``: x
    quantised once by ``DynamicQuantizeLinear`` (shared as for the separate layers), the
    three layers' int8 codes side by side ``[K, 3N]``, their channel scales (a value
    projection's times the smoothing moved into it) and biases; a boolean mask as its
    ``[batch, S, S]`` 1/0 mask, masked scores set to the lowest float as the additive bias
    of MultiHeadAttention does."""
    src = x
    if mods[0].smooth is not None and not folds[0].smooth_into:  # one factor for all three
        src = _smoothed_input(b, x, mods[0].smooth, base)
    key = ("dql", src)
    if key not in b.shared:
        b.shared[key] = tuple(b.node("DynamicQuantizeLinear", [src], base, outputs=3))
    xq, sx, zx = b.shared[key]
    codes, scales, biases = [], [], []
    for mod, fold in zip(mods, folds):
        n = mod.shape[0]
        codes.append(_unsigned_codes(mod.codes().t()))  # exact on every CPU: U8_WEIGHT_ZERO
        scale = mod.scale.reshape(-1).float()
        scales.append((scale.expand(n) if scale.numel() == 1 else scale) * fold.out)
        bias = getattr(mod, "bias", None)
        biases.append(torch.zeros(n) if bias is None else bias.float() * fold.out)
    inputs = [xq, b.const(base + ".qkv_weight", _np(torch.cat(codes, 1))),
              b.const(base + ".qkv_bias", _np(torch.cat(biases))),
              sx, b.const(base + ".qkv_scale", _np(torch.cat(scales)))]
    if mask is not None:
        key = ("mask_index", mask)
        if key not in b.shared:
            squeezed = b.node("Squeeze", [mask, b.const("mask_index.axis", np.array([1], np.int64))],
                              "mask_index")[0]
            b.shared[key] = tuple(b.node("Cast", [squeezed], "mask_index", to=6))  # int32
        inputs.append(b.shared[key][0])
    else:
        inputs.append("")
    inputs += [zx, _weight_zero(b)]
    b.nodes.append(b.helper.make_node(
        "QAttention", inputs, [y], name=b.name(base + "/QAttention"), domain="com.microsoft",
        num_heads=spec.heads, scale=spec.scale, mask_filter_value=float(np.finfo(np.float32).min)))
    return y


def _key_of(node) -> int | None:
    """The registry key of a placeholder node (None for any other node)."""
    if node.domain != _DOMAIN:
        return None
    return next(a.i for a in node.attribute if a.name == "key")


def _fill_placeholders(model, keys: dict[int, tuple[str, Any]], accuracy_level: int,
                       qattention: bool = True) -> dict[str, str]:
    """Replace every placeholder node of ``model`` (an onnx ModelProto) by its integer
    subgraph; return ``{layer: form}``."""
    from onnx import helper

    graph = model.graph
    b = _Builder(graph)
    forms: dict[str, str] = {}
    new_nodes = []
    folds = _smooth_folds(graph, keys)
    _norm_folds(b, keys, folds)
    qatt = _qattention_groups(graph, keys, folds) if qattention else {}
    in_qatt = {k: a for a, ks in qatt.items() for k in ks}
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.domain != _DOMAIN:
            new_nodes.append(node)
            continue
        key = next(a.i for a in node.attribute if a.name == "key")
        qualname, (mod, form) = keys[key]
        b.nodes = []
        x, y = node.input[0], node.output[0]
        if key in in_qatt:  # computed by its attention's QAttention
            forms[qualname] = "QAttention (int8 q, k, v with the attention, per-tensor input" + (
                ", smoothed)" if mod.smooth is not None else ")")
            continue
        if key in qatt:
            pkeys = qatt[key]
            _qattention(b, mod, [keys[k][1][0] for k in pkeys], [folds.get(k, _Fold()) for k in pkeys],
                        producer[node.input[0]].input[0],
                        node.input[3] if len(node.input) > 3 and node.input[3] else None, y, qualname)
        elif form == "attention":
            _attention(b, mod, list(node.input), y, qualname)
        elif form == "int8":
            fold = folds.get(key, _Fold())
            _int8_linear(b, mod, x, y, qualname, fold)
            forms[qualname] = f"MatMulInteger (per-{mod.act_scale} input" + (
                ", smoothed" + (f" in {fold.smooth_into}" if fold.smooth_into else "") + ")"
                if mod.smooth is not None else ")")
        elif form == "nbits":
            _nbits_linear(b, mod, x, y, qualname, accuracy_level, folds.get(key, _Fold()))
            forms[qualname] = f"MatMulNBits ({mod.bits}-bit, block {_nbits_block(mod)})"
        else:
            _gather_embedding(b, mod, x, y, qualname)
            forms[qualname] = ("Gather + DequantizeLinear" if _embedding_block(mod) is None else
                               f"GatherBlockQuantized ({mod.bits}-bit, "
                               + ("group scales)" if mod.granularity == "group" else "row scales)"))
        new_nodes.extend(b.nodes)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for name, (_mod, form) in keys.values():
        if form != "attention":
            forms.setdefault(name, "decoded float")
    opsets = {o.domain: o for o in model.opset_import}
    opsets.pop(_DOMAIN, None)
    if "com.microsoft" not in opsets:
        opsets["com.microsoft"] = helper.make_opsetid("com.microsoft", 1)
    del model.opset_import[:]
    model.opset_import.extend(opsets.values())
    return forms


# -- the public function -----------------------------------------------------------------------
