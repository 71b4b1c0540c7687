"""ONNX export: every built-in pass's output runs in stock onnxruntime and matches fxpress.

The compressed layers keep fxpress's integers: int8 layers are MatMulInteger over the very
codes fxpress stores, 4-bit group layers MatMulNBits; the rest are decoded. Axes stay
dynamic, so the model runs at batch sizes and lengths it was not exported with.
"""
from __future__ import annotations

import builtins
import contextlib

import numpy as np
import pytest
import torch

import fxpress
from fxpress.errors import ExportError, FxpressError, InputError, MissingExtraError

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from fxpress.onnx_export import export_onnx, session  # noqa: E402
from fxpress.passes.decode import int8_kernels_only  # noqa: E402
from fxpress.passes.int8 import int8_backend  # noqa: E402
from fxpress.passes.verify import compare  # noqa: E402
from tests.helpers import assert_unchanged, state_snapshot  # noqa: E402


def _run(out, *inputs) -> torch.Tensor:
    sess = session(out.model, threads=1)
    names = [i.name for i in sess.get_inputs()]
    return torch.as_tensor(sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])


def _ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _initializer(model, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def _fx(module, *inputs, exact: bool = True):
    """fxpress's own output with its int8 layers on their kernels at every call size
    (decode=auto runs small calls of an int8 layer in float); ``exact``: on its exact
    integer product (the reference kernel, 255 input levels), what the export computes on
    every CPU. (Without VNNI fbgemm and oneDNN take 127-level input codes: ``exact=False``
    differs from the export by that rounding.)"""
    with torch.no_grad(), int8_kernels_only(), (
            int8_backend("reference") if exact else contextlib.nullcontext()):
        return module(*inputs)


#: ONNX Runtime against fxpress's exact integer product where the input has values on
#: rounding ties: the digits features are multiples of 1/16, and DynamicQuantizeLinear
#: (float32 scale, halves to even) and fxpress's quantisation (float64 scale, halves up)
#: then give a few codes one step apart (measured 1.4e-3 to 2.0e-3 on the digits MLP); a
#: saturating product was off by 9e-2
TIES = 5e-3


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4):
    m = compare([got], [ref], top1=False)
    assert m.rel_l2 <= rel and m.nonfinite == 0, m


# -- every pass on the digits models ----------------------------------------------------------

MLP_PIPELINES = [
    "prune{sparsity=0.5},distill{taps=[layers.*]}",
    "quantize{bits=8}",
    "quantize{bits=8,act_scale=token,scheme=affine}",
    "quantize{bits=4,granularity=group,group_size=16,tol.min_cosine=0,tol.min_top1=0}",
    "share{bits=4,bias_bits=8}",
]


def test_every_pass_on_the_mlp_runs_in_onnxruntime(small_mlp, calib, digits):
    x = digits.x_test[:37]  # a batch size the graph was not exported with
    for text in MLP_PIPELINES:
        res = fxpress.compress(small_mlp, text, calibration=calib[:1], policy="warn")
        out = export_onnx(res)
        got = _run(out, x)
        # fxpress's exact integer product, on any CPU; its kernels here within the
        # rounding of their input codes (127 levels without VNNI, fbgemm's per-token
        # rounding)
        _close(got, _fx(res.module, x), TIES)
        _close(got, _fx(res.module, x, exact=False), 3e-2)
        ops = _ops(out.model)
        if text.startswith("quantize{bits=8"):
            assert ops.get("MatMulInteger", 0) + ops.get("MatMulIntegerToFloat", 0) == 2, (text, ops)
            assert "MatMul" not in ops and "Gemm" not in ops
        if "group_size" in text:
            assert ops.get("MatMulNBits") == 2, (text, ops)
        assert out.check["rel_l2"] < 3e-2


@pytest.mark.parametrize("act_scale", ["tensor", "token"])
def test_int8_export_is_exact_at_full_range_inputs_on_every_cpu(act_scale):
    # a uniformly initialised layer has codes across -127..127 and an input spanning its
    # range uses all 255 levels: ONNX Runtime's uint8 x int8 product added two such
    # products in int16 on x86 CPUs without VNNI and saturated (0.3-1.0 relative error on
    # an AVX2-only EPYC); the export multiplies uint8 by uint8 (zero point 128), exact there
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 192), torch.nn.ReLU(), torch.nn.Linear(192, 64)).eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(64, 256, generator=g),)]
    res = fxpress.compress(model, f"quantize{{bits=8,act_scale={act_scale},tol.min_top1=0}}",
                           calibration=calib, policy="warn")
    assert all(res.module.get_submodule(n).act_scale == act_scale for n in ("0", "2"))
    x = torch.randn(48, 256, generator=g) * 3
    out = export_onnx(res, example_inputs=(x,))
    _close(_run(out, x), _fx(res.module, x), 1e-5)


def test_group_layers_with_a_shorter_last_group_run_as_matmulnbits(mlp, calib, digits):
    # group_size 64: one group over layers.0's 64 inputs, 4 + a last of 44 over layers.1's
    # 300, 1 + a last of 36 over the head's 100
    res = fxpress.compress(mlp, "quantize{bits=4,granularity=group,group_size=64,scheme=affine,"
                           "tol.min_cosine=0,tol.min_top1=0}", calibration=calib[:1])
    out = export_onnx(res)
    assert _ops(out.model).get("MatMulNBits") == 3, out.layers
    x = digits.x_test[:5]
    with torch.no_grad():
        _close(_run(out, x), _fx(res.module, x), 1e-5)


def test_int8_layers_keep_fxpress_codes_and_scales(small_mlp, calib):
    res = fxpress.compress(small_mlp, "quantize{bits=8}", calibration=calib[:1])
    out = export_onnx(res)
    for name, form in out.layers.items():
        assert form.startswith("MatMulInteger"), out.layers
        mod = res.module.get_submodule(name)
        w = _initializer(out.model, f"{name}.qweight")
        # uint8 with zero point 128: ONNX Runtime's uint8 x int8 product saturates on x86
        # CPUs without VNNI
        assert w.dtype == np.uint8 and np.array_equal(w.astype(np.int32) - 128, mod.codes().t().numpy())
        assert _initializer(out.model, "u8_weight_zero_point") == 128
        assert np.array_equal(_initializer(out.model, f"{name}.scale"), mod.scale.reshape(-1).numpy())


def test_cnn_quantized_shared_and_binarized_layers(cnn, digits):
    x = digits.images(digits.x_test[:9])
    for text in ("quantize{bits=8}", "share{bits=5}",
                 "binarize{mode=ternary,tol.min_cosine=0,tol.min_top1=0}"):
        res = fxpress.compress(cnn, text, example_inputs=(x,), policy="warn")
        out = export_onnx(res, example_inputs=(x,))
        assert out.layers and all(f == "decoded float" or f.startswith("MatMulInteger")
                                  for f in out.layers.values()), out.layers
        with torch.no_grad():
            ref = _fx(res.module, x[:3])
        _close(_run(out, x[:3]), ref, 1e-4)


# -- a tiny BERT: integer layers, embeddings, dynamic batch and sequence ---------------------

class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(3)
        self.bert = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, vocab_size=300,
                                         max_position_embeddings=64)).train(False)

    def forward(self, ids, mask):
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


def _bert_batch(b: int, s: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s // 2:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def encoder():
    return _Encoder().train(False)


def test_tiny_bert_int8_and_4bit(encoder, tmp_path):
    calib = [_bert_batch(4, 12, 0), _bert_batch(4, 12, 1)]
    held_out = _bert_batch(3, 19, 7)  # other batch size and sequence length
    # the word embeddings as 4-bit affine groups (GatherBlockQuantized, two codes a byte),
    # the other tables per row at 8 bits, the linears int8 and smoothed, but for layer 1's
    # q, k and v: per-tensor, unsmoothed, and layer 0's value: per token
    qkv0, qkv1 = "bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"
    res = fxpress.compress(encoder, "quantize{bits=4,granularity=group,group_size=16,scheme=affine,"
                           "include=[bert.embeddings.word_embeddings],tol.min_cosine=0,"
                           f"tol.min_top1=0}},quantize{{bits=8,act_scale=tensor,include=[{qkv1}.*]}},"
                           f"quantize{{bits=8,act_scale=token,smooth=0.5,include=[{qkv0}.value]}},"
                           "quantize{bits=8,smooth=0.5}", calibration=calib, policy="warn")
    before = state_snapshot(res.module)
    # the padded graph: QAttention reads the padded input (test_pad_tokens_skipped_... for
    # the default, which skips pad tokens)
    out = export_onnx(res, tmp_path / "bert8.onnx", calib[0], skip_padding=False)
    assert_unchanged(res.module, before)
    assert out.path.stat().st_size > 0
    forms = set(out.layers.values())
    assert any(f.startswith("MatMulInteger") for f in forms) and "GatherBlockQuantized (8-bit, row scales)" in forms
    assert out.layers["bert.embeddings.word_embeddings"] == "GatherBlockQuantized (4-bit, group scales)"
    table = _initializer(out.model, "bert.embeddings.word_embeddings.qweight")
    assert table.dtype == np.uint8 and table.shape == (300, 32)  # 64 columns, two codes a byte
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in out.model.graph.input]
    assert dims == [["batch", "sequence"], ["batch", "sequence"]]
    # attention fused: layer 0's com.microsoft.MultiHeadAttention over the integer q, k and
    # v (the padded row's mask its additive bias); layer 1's q, k and v read one quantised
    # input, so they and the attention are one QAttention (one integer matmul over the
    # three layers' codes; the mask its 1/0 mask); each output projection's 1/smooth moved
    # into the value projection's scales, so that it has no Mul of its own
    ops = _ops(out.model)
    # layer 0's q and k read one input and were smoothed as a group, by one factor: one
    # Mul and one DynamicQuantizeLinear for both
    q0, k0 = res.module.get_submodule(f"{qkv0}.query"), res.module.get_submodule(f"{qkv0}.key")
    assert torch.equal(q0.smooth, k0.smooth) and q0.act_scale == k0.act_scale == "tensor"
    assert f"{qkv0}.query.inv_smooth" in {i.name for i in out.model.graph.initializer}
    assert f"{qkv0}.key.inv_smooth" not in {i.name for i in out.model.graph.initializer}
    node = {n.name: n for n in out.model.graph.node}
    q0_in = node[f"{qkv0}.query_MatMulInteger"].input[0]
    norm = node[f"{qkv0}.query_Mul"].input[0]  # the LayerNorm's output, divided once for q and k
    assert node[f"{qkv0}.key_MatMulInteger"].input[0] == q0_in and sorted(
        n.input[1] for n in out.model.graph.node if n.op_type == "Mul" and n.input[0] == norm) == [
        f"{qkv0}.query.inv_smooth", f"{qkv0}.value.inv_smooth"]
    assert ops.get("MultiHeadAttention") == 1 and ops.get("QAttention") == 1 and "Softmax" not in ops, ops
    assert all(out.layers[f"{qkv1}.{p}"].startswith("QAttention") for p in ("query", "key", "value"))
    names = {i.name for i in out.model.graph.initializer}
    for layer in (0, 1):
        out_proj = f"bert.encoder.layer.{layer}.attention.output.dense"
        assert out.layers[out_proj].endswith("smoothed in the value projection)"), out.layers
        assert f"{out_proj}.inv_smooth" not in names
    assert "bert.encoder.layer.0.attention.self.query.inv_smooth" in names
    with torch.no_grad():
        ref = _fx(res.module, *held_out)
    m = compare([_run(out, *held_out)], [ref], top1=False)
    assert m.cosine_min >= 0.9999 and m.rel_l2 < 5e-3, m  # per-token rounding may differ by one step


class _TokenEncoder(_Encoder):
    """The tiny BERT's every token's state as output, pad tokens' too."""

    def forward(self, ids, mask):
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state


def _padded_more(batch, extra: int):
    """The same sentences with ``extra`` more pad tokens each (id 0, mask 0)."""
    ids, mask = batch
    return (torch.cat([ids, ids.new_zeros(ids.shape[0], extra)], 1),
            torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1))


def test_pad_tokens_skipped_where_no_output_reads_them(encoder):
    calib = [_bert_batch(4, 12, 0), _bert_batch(4, 12, 1)]
    held_out = _bert_batch(3, 19, 7)  # row 0 half pad tokens
    held_out[1][2, 5:] = 0  # row 2 mostly pad tokens
    captured = fxpress.capture(encoder, calib[0])
    four = fxpress.compress(captured, "quantize{bits=4,granularity=group,group_size=16,tol.min_cosine=0,"
                            "tol.min_top1=0}", calibration=calib, policy="warn")
    eight = fxpress.compress(captured, "quantize{bits=8}", calibration=calib, policy="warn")
    for res in (captured, four, eight):
        module = getattr(res, "module", res)
        out = export_onnx(res, example_inputs=calib[0])
        # the mean pooling multiplies by the mask and the attention masks pad keys: the
        # per-token layers run on the real tokens, gathered once per call
        assert out.padding == "mask", out.summary()
        ops = _ops(out.model)
        assert ops.get("NonZero") == 1 and ops.get("MultiHeadAttention") == 2 and "QAttention" not in ops, ops
        got = _run(out, *held_out)
        if res is not eight:  # float and weight-only layers: the padded graph's results exactly
            _close(got, _fx(module, *held_out), 1e-5)
            continue
        # int8 per-tensor inputs take their range over the real tokens only: close to
        # fxpress's own padded run, equal to it without pad tokens, and the same however
        # much padding a batch carries
        _close(got, _fx(module, *held_out), 1e-2)
        full = (held_out[0], torch.ones_like(held_out[1]))
        _close(_run(out, *full), _fx(module, *full), 1e-5)
        _close(_run(out, *_padded_more(held_out, 21)), got, 1e-6)
        assert "real tokens of 'mask'" in out.summary()


class _UnmaskedMean(_Encoder):
    """Mean pooling over the mask plus a mean over every token, pad tokens too."""

    def forward(self, ids, mask):
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1) + h.mean(1)


@pytest.mark.parametrize("model", [_TokenEncoder, _UnmaskedMean])
def test_pad_tokens_kept_where_an_output_reads_them(model):
    # every token's state as output; or a mean over pad tokens too, whose last block's
    # pad rows would come from an attention over scattered zeros (exact only for real rows)
    model = model().train(False)
    batch = _bert_batch(3, 10, 4)
    gm = fxpress.capture(model, batch)
    out = export_onnx(gm, example_inputs=batch)
    assert out.padding == "" and "NonZero" not in _ops(out.model)
    x = _bert_batch(2, 13, 5)  # pad tokens' rows too
    with torch.no_grad():
        _close(_run(out, *x), gm(*x), 1e-5)


class _Attention(torch.nn.Module):
    """Self-attention over projected q, k, v (heads split by view + transpose)."""

    def __init__(self, causal: bool = False):
        super().__init__()
        torch.manual_seed(5)
        self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))
        self.causal = causal

    def forward(self, x):
        b, s, _ = x.shape

        def split(t):
            return t.view(b, s, 2, 4).transpose(1, 2)

        o = torch.nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=self.causal)
        return o.transpose(1, 2).reshape(b, s, 8)


class _PreNorm(torch.nn.Module):
    """A pre-norm block (ln1 read by fc1 alone) beside a norm read by two layers (ln2)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.ln1, self.ln2 = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        with torch.no_grad():
            for ln in (self.ln1, self.ln2):
                ln.weight.uniform_(0.5, 2.0)
                ln.bias.normal_()

    def forward(self, x):
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln1(x))))
        h = self.ln2(x)
        return x + self.a(h) * self.b(h)


def test_smoothing_moves_into_a_layernorm_read_only_by_its_layers():
    model = _PreNorm().eval()
    calib = [(torch.randn(4, 6, 16) * torch.linspace(0.1, 8, 16),)]  # outlier columns
    res = fxpress.compress(model, "quantize{bits=8,smooth=0.5,act_scale=tensor}", calibration=calib)
    # the fold is not one of the fusions; the check is the comparison below
    out = export_onnx(res, example_inputs=calib[0], fuse=False, check=False)
    # ln1 feeds fc1 alone: its scale and bias take fc1's 1/smooth (no Mul); ln2 feeds a and
    # b, which read one input and so were smoothed as a group, by one factor: it takes
    # theirs too; fc2 reads the GELU and keeps its Mul
    assert out.layers["fc1"].endswith("smoothed in the LayerNorm)"), out.layers
    assert out.layers["a"].endswith("smoothed in the LayerNorm)"), out.layers
    names = {i.name for i in out.model.graph.initializer}
    assert not names & {"fc1.inv_smooth", "a.inv_smooth", "b.inv_smooth"} and "fc2.inv_smooth" in names
    x = torch.randn(3, 6, 16) * torch.linspace(0.1, 8, 16)  # another batch size
    with torch.no_grad():
        _close(_run(out, x), _fx(res.module, x), 1e-5)


def test_attention_that_onnxruntime_refuses_falls_back_to_plain_ops(monkeypatch):
    # (the fused form itself: test_tiny_bert_int8_and_4bit)
    from fxpress import onnx_lowering
    from fxpress.onnx_export import _lowered

    x = torch.randn(2, 5, 8)
    # causal attention is not fused (MultiHeadAttention's mask would be another one)
    lowered, _ = _lowered(fxpress.capture(_Attention(causal=True), (x,)), attention=True)
    assert not any("fxpress_onnx.attention" in str(n.target) for n in lowered.graph.nodes)
    gm = fxpress.capture(_Attention(), (x,))
    real = onnx_lowering._attention

    def broken(b, spec, inputs, y, base):  # a head count ONNX Runtime refuses (8 % 3)
        return real(b, type(spec)(3, spec.scale, spec.bool_mask, spec.merged), inputs, y, base)

    monkeypatch.setattr(onnx_lowering, "_attention", broken)
    out = export_onnx(gm, example_inputs=(x,))
    assert "MultiHeadAttention" not in _ops(out.model) and out.check["rel_l2"] < 1e-5
    x = torch.randn(3, 5, 8)  # another batch size
    with torch.no_grad():
        _close(_run(out, x), gm(x), 1e-5)


def test_artifact_exports_without_example_inputs(small_mlp, calib, tmp_path, digits):
    res = fxpress.compress(small_mlp, "prune{sparsity=0.5},quantize{bits=8}", calibration=calib[:1])
    fxpress.save(res, tmp_path / "m.fxp")
    out = export_onnx(str(tmp_path / "m.fxp"), tmp_path / "m.onnx")
    x = digits.x_test[:5]
    with torch.no_grad():
        ref = _fx(fxpress.load(tmp_path / "m.fxp"), x)
    _close(_run(out, x), ref, TIES)
    stored = sum(onnx.numpy_helper.to_array(i).nbytes for i in out.model.graph.initializer)
    assert stored < 0.35 * 4 * sum(p.numel() for p in small_mlp.parameters())  # int8, not float


def test_cli_export_onnx(small_mlp, calib, tmp_path, capsys):
    from fxpress.cli import main

    res = fxpress.compress(small_mlp, "quantize{bits=8}", calibration=calib[:1])
    fxpress.save(res, tmp_path / "m.fxp")
    assert main(["export-onnx", str(tmp_path / "m.fxp"), "-o", str(tmp_path / "m.onnx")]) == 0
    assert "MatMulInteger" in capsys.readouterr().out
    assert onnx.load(str(tmp_path / "m.onnx")).graph.node
    assert main(["export-onnx", str(tmp_path / "none.fxp"), "-o", str(tmp_path / "x.onnx")]) == 2
    assert "none.fxp" in capsys.readouterr().err


class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a, self.b = torch.nn.Linear(64, 10), torch.nn.Linear(64, 3)

    def forward(self, x):
        return self.a(x), {"aux": self.b(x)}


def test_outputs_are_named_after_the_models_outputs(small_mlp, calib, tmp_path):
    """ONNX Runtime users fetch outputs by name: they were torch.onnx's names for the graph's
    last nodes ("compressed_layer_2", MiniLM's "div_1", a BERT classifier's
    "compressed_layer_16"), which say nothing and change with the pipeline."""
    from transformers import BertConfig, BertForSequenceClassification

    x = calib[0][0]
    res = fxpress.compress(small_mlp, "quantize{bits=8}", calibration=calib[:1])
    fxpress.save(res, tmp_path / "m.fxp")
    for model in (res, str(tmp_path / "m.fxp")):  # the graph, and the artifact (no example inputs)
        out = export_onnx(model, tmp_path / "m.onnx")
        assert out.output_names == ["output"]
        assert [o.name for o in session(out.model, threads=1).get_outputs()] == ["output"]
    two = fxpress.compress(_TwoHeads().eval(), "quantize{bits=8}", calibration=[(x,)])
    out = export_onnx(two, tmp_path / "two.onnx")
    assert out.output_names == ["output_0", "output_1_aux"]
    got = session(out.model, threads=1).run(["output_1_aux"], {out.input_names[0]: x.numpy()})[0]
    _close(torch.as_tensor(got), _fx(two.module, x)[1]["aux"], TIES)
    # a transformers ModelOutput: its fields' names, None fields (loss) left out
    torch.manual_seed(0)
    clf = BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=300, max_position_embeddings=64, num_labels=3)).train(False)
    ids, mask = _bert_batch(4, 10, 0)
    res = fxpress.compress(clf, "quantize{bits=8}", policy="warn",
                           calibration=[{"input_ids": ids, "attention_mask": mask}])
    out = export_onnx(res, tmp_path / "clf.onnx")
    assert out.output_names == ["logits"] and out.check["cosine"] > 0.99
    # names the caller gives still win
    assert export_onnx(res, None, output_names=["scores"]).output_names == ["scores"]


# -- bad input ---------------------------------------------------------------------------------

def test_bad_inputs_get_typed_errors(small_mlp, tmp_path):
    with pytest.raises(InputError, match="nothing.fxp"):
        export_onnx(str(tmp_path / "nothing.fxp"))
    with pytest.raises(InputError, match="GraphModule"):
        export_onnx(small_mlp)
    gm = fxpress.capture(small_mlp, (torch.randn(2, 64),))
    with pytest.raises(InputError, match="accuracy_level"):
        export_onnx(gm, accuracy_level=9)
    with pytest.raises(ExportError, match="cannot write"):
        export_onnx(gm, tmp_path / "no" / "such" / "dir" / "m.onnx")
    assert issubclass(ExportError, FxpressError)


def test_missing_extra_names_the_install_command(small_mlp, monkeypatch):
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError("no onnxruntime")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(MissingExtraError, match=r"pip install 'fxpress\[onnx\]'"):
        export_onnx(fxpress.capture(small_mlp, (torch.randn(2, 64),)))


def test_check_metric_on_one_value_per_sample_and_zero_rows():
    from fxpress.onnx_export import _check

    class Session:  # what onnxruntime returned
        def __init__(self, out):
            self.out = out

        def run(self, _names, _feeds):
            return [self.out]

    x = torch.zeros(4, 2)
    # one value per sample: a near-zero output whose sign differs is not a cosine of -1
    ref = torch.tensor([[3.0], [-2.0], [1e-9], [5.0]])
    got = torch.tensor([[3.0], [-2.0], [-1e-9], [5.0]])
    m = _check(Session(got.numpy()), ["x"], (x,), [ref])
    assert m["cosine_min"] > 0.999 and m["rel_l2"] < 1e-9, m
    # a sample that is zero in both (a ReLU'd or padded row) is equal
    ref = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    m = _check(Session(ref.numpy().copy()), ["x"], (x[:2],), [ref])
    assert m["cosine_min"] > 1 - 1e-12 and m["rel_l2"] == 0.0, m
