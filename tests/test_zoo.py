"""The zoo in the suite: a representative cell per architecture and failure class.

The full matrix (every zoo model x every built-in pass, plus held-out models) is
``python -m bench zoo``; these cells run it on a subset within the suite's budget. Each
cell captures the model, runs the pipeline, checks coverage, metrics, outputs on new
inputs and shapes, and save/load bit-exact in this process; then ONE fresh Python process
(importing neither transformers nor the zoo) loads every artifact and must reproduce the
outputs bit for bit. See tests/zoo_matrix.py.

A cell that is known to fail is marked xfail(strict=True) with its failure class, so a
fix flips it and the marker must go.
"""
from __future__ import annotations

import pytest

from tests.zoo_matrix import CLASSES, run_matrix

#: (model, pipeline column) -> None if it must pass, else the failure class it has today
SUITE: dict[tuple[str, str], str | None] = {
    ("bert", "quantize8"): None,
    ("distilbert", "share4"): None,
    ("gpt2", "prune"): None,
    ("llama", "quantize8"): None,
    ("t5", "share4"): None,
    ("vit", "ternary"): None,
    ("whisper_encoder", "prune+quantize8"): None,
    ("wav2vec2", "pow2"): None,
    ("resnet", "quantize8"): None,
    ("convnext", "share4"): None,
    ("transformer_encoder", "quantize8"): None,
    ("multihead_attention", "share4"): None,
    ("lstm", "prune"): None,
    ("gru", "quantize8"): None,
    ("conv_transpose", "quantize8"): None,
    ("tied_embeddings", "share4"): None,
    ("module_twice", "ternary"): None,
    ("inplace_ops", "prune+quantize8"): None,
    ("dict_outputs", "distill"): None,
    ("grucell_loop", "quantize8"): None,
    ("ssm_mixer", "share4"): None,
    ("mixed_f64", "quantize8"): None,
    ("llama_f64", "quantize4g"): None,
    ("timm_like", "distill"): None,
}

#: failure classes of today's code, cell by cell (strict xfails: a fix must remove them)
KNOWN: dict[tuple[str, str], str] = {
}


class KnownFailure(AssertionError):
    """A cell failed with exactly the class KNOWN expects (anything else is a real failure)."""


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    cells = run_matrix([], cells=list(SUITE), workdir=tmp_path_factory.mktemp("zoo"))
    return {(c.model, c.column): c for c in cells}


def _params():
    for key in SUITE:
        marks = []
        if key in KNOWN:
            marks.append(pytest.mark.xfail(strict=True, raises=KnownFailure,
                                           reason=f"{KNOWN[key]}: {CLASSES.get(KNOWN[key], '')}"))
        yield pytest.param(key, id=f"{key[0]}-{key[1]}", marks=marks)


@pytest.mark.parametrize("key", list(_params()))
def test_zoo_cell(matrix, key):
    cell = matrix[key]
    if key in KNOWN and cell.status == "fail" and cell.failure == KNOWN[key]:
        raise KnownFailure(f"{cell.label()} at {cell.stage}: {cell.detail}")
    assert cell.status == "ok", f"{cell.label()} at {cell.stage}: {cell.detail}"


def test_fresh_process_imports_neither_transformers_nor_the_zoo(matrix):
    # run_matrix raises if the fresh process imported transformers, tests or examples;
    # every passing cell went through that process, transformers models among them
    ok = [c for c in matrix.values() if c.status == "ok"]
    assert ok and all(c.fresh for c in ok)
    reached = {c.model for c in matrix.values() if c.fresh or c.stage == "fresh"}
    assert {"bert", "dict_outputs"} <= reached


# -- the mechanisms the zoo's fixes rest on, attacked directly ------------------------------

def test_transposed_conv_weights_are_read_output_channel_first():
    import torch

    from fxpress.graph.weights import (stored_conv_transpose_weight, transposed_conv_layout,
                                       weighted_ops)

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2,
                                                         output_padding=1)).eval()
    gm = torch.fx.symbolic_trace(model)
    (op,) = weighted_ops(gm)
    w = model[0].weight  # [in=4, out/groups=3, 3, 3]
    rows = op.weight()
    assert rows.shape == (6, 2, 3, 3) and op.spec["transposed"] and op.spec["output_padding"] == (1, 1)
    for o in range(6):  # output channel o of group o // 3 reads that group's 2 inputs
        g, oc = divmod(o, 3)
        assert torch.equal(rows[o], w[2 * g:2 * g + 2, oc])
    assert torch.equal(stored_conv_transpose_weight(rows, 2), w)
    assert torch.equal(transposed_conv_layout(stored_conv_transpose_weight(rows, 2), 2), rows)


def test_grouped_transposed_conv_quantized_like_the_model():
    import torch

    import fxpress

    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                                torch.nn.ReLU(), torch.nn.Conv2d(6, 2, 1)).eval()
    x = torch.randn(2, 2, 5, 5)
    res = fxpress.compress(model, "quantize{bits=8}", example_inputs=(x,), progress=False)
    assert "2.weight" in res.records[0].stats["layers"]
    y = torch.randn(3, 2, 7, 7)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(res.module(y).flatten(), model(y).flatten(), 0)
    assert cos > 0.999


def test_module_called_twice_is_one_op_with_every_call_site():
    import torch

    from fxpress.graph.weights import weighted_ops
    from tests.zoo import module_twice

    gm = torch.fx.symbolic_trace(module_twice().model)
    ops = [op for op in weighted_ops(gm) if op.name == "block.weight"]
    assert len(ops) == 1 and len(ops[0].calls) == 1


def test_causal_lm_with_default_cache_captures_one_call_and_says_so():
    import torch

    import fxpress
    from tests.zoo import llama

    spec = llama()
    assert spec.model.config.use_cache  # the default, left as it is
    gm = fxpress.capture(spec.model, spec.inputs)
    info = gm.meta["fxpress"]
    assert info["call_kwargs"] == {"use_cache": False} and "use_cache=False" in info["why"]
    assert spec.model.config.use_cache  # the caller's model is not modified
    with torch.no_grad():
        got = gm(*spec.reshaped).logits
        ref = spec.model(*spec.reshaped).logits  # with its cache, as the user calls it
    assert torch.allclose(got, ref, atol=1e-5)


def test_non_persistent_buffers_stay_non_persistent_after_load(tmp_path):
    import torch

    import fxpress

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

        def forward(self, x):
            return self.fc(x) * self.scale

    model = Scaled().eval()
    gm = fxpress.capture(model, (torch.randn(2, 4),), method="export")  # keeps the flag
    fxpress.save(gm, tmp_path / "m.fxp")
    loaded = fxpress.load(tmp_path / "m.fxp")
    assert set(loaded.state_dict()) == set(gm.state_dict()) == {"fc.weight", "fc.bias"}
    assert torch.equal(loaded.scale, model.scale)


def test_mixture_of_experts_captures_with_plain_aten_and_compresses_its_experts(tmp_path):
    """transformers' default experts kernel calls a library custom op on CPU, which no
    artifact can store: capture switches to its pure-ATen kernel for the one call and puts
    the caller's config back; the 3-D expert tensors are then compressed like linears."""
    import torch

    import fxpress
    from fxpress.graph.fused import DecodedWeight
    from tests.zoo import mixtral

    from fxpress.graph.capture import _experts_configs
    from tests.zoo import bert

    assert _experts_configs(bert().model) == []  # a model without experts is left alone
    spec = mixtral()
    before = spec.model.config._experts_implementation
    gm = fxpress.capture(spec.model, spec.inputs)
    assert spec.model.config._experts_implementation == before != "batched_mm"
    assert "batched_mm" in gm.meta["fxpress"]["why"]
    assert not any(n.op == "call_function" and "transformers" in str(n.target)
                   for n in gm.graph.nodes)
    res = fxpress.compress(gm, "quantize{bits=8}", example_inputs=spec.inputs, progress=False)
    experts = {n: m for n, m in res.module.named_modules() if isinstance(m, DecodedWeight)}
    assert len(experts) == 4 and all(m.experts[0] == 4 for m in experts.values())
    assert not any(t.dim() == 3 and t.is_floating_point() for t in res.module.state_dict().values())
    fxpress.save(res, tmp_path / "moe.fxp")
    loaded = fxpress.load(tmp_path / "moe.fxp")
    with torch.no_grad():
        ref, got, back = (m(*spec.new) for m in (spec.model, res.module, loaded))
    assert torch.equal(got.logits, back.logits)
    assert torch.nn.functional.cosine_similarity(got.logits.flatten(), ref.logits.flatten(), 0) > 0.999
    # a crafted file's expert shape that does not describe the stored matrix is refused
    decoded = next(m for m in loaded.modules() if isinstance(m, DecodedWeight))
    for experts, layout in (([4, 1, 10**6], "oi"), ([4, -128, -32], "oi"), ([True, 128, 32], "oi"),
                            (decoded.experts, "ji"), ("4x128x32", "oi")):
        decoded.experts, decoded.layout = experts, layout
        with pytest.raises(TypeError, match="do not describe"):
            decoded()


def test_a_model_taking_use_cache_through_kwargs_is_captured_without_its_cache():
    """Newer transformers models (GraniteMoE, ...) take ``use_cache`` through ``**kwargs``
    only: capture still calls them with use_cache=False (export used to refuse the
    DynamicCache in the outputs), and leaves the caller's model as it was."""
    import torch
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    import fxpress
    from tests.zoo import VOCAB, _ids, _mask

    torch.manual_seed(0)
    model = GraniteMoeForCausalLM(GraniteMoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    assert "use_cache" not in __import__("inspect").signature(model.forward).parameters
    gm = fxpress.capture(model, (_ids(2, 8, 1), _mask(2, 8)))
    assert gm.meta["fxpress"]["call_kwargs"] == {"use_cache": False}
    assert "forward" not in vars(model) and model.config.use_cache
    x = (_ids(3, 12, 2), _mask(3, 12))
    with torch.no_grad():
        got, ref = gm(*x).logits, model(*x).logits
    assert torch.allclose(got, ref, atol=1e-5)


def test_a_forward_that_casts_a_submodule_to_its_own_dtype_is_exported():
    """Switch Transformers' router runs ``self.classifier = self.classifier.to(dtype)`` at every
    call: export failed to swap the traced weight back ("Couldn't swap Linear.weight")
    although nothing changes. Such a call converts nothing and returns the module."""
    import torch
    from torch import nn

    import fxpress

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.classifier = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            self.classifier = self.classifier.to(torch.float32)
            return torch.softmax(self.classifier(h), -1)

    torch.manual_seed(0)
    model = Router().eval()
    classifier = model.classifier
    gm = fxpress.capture(model, (torch.randn(2, 5, 16),), method="export")
    assert model.classifier is classifier and torch.nn.Module.to.__qualname__ == "Module.to"
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-6)
