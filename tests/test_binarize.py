"""binarize: the three encoders against hand-computed values, the pass on both capture
methods, runtime modules (rebuild, straight-through fine-tuning), options."""
import json

import pytest
import torch

import fxpress
from fxpress.errors import OptionError
from fxpress.graph.runtime import compressed_modules
from fxpress.passes.binarize import (BinaryLinear, decode, pow2_encode, pow2_window, sign_encode,
                                     ternary_encode)
from tests.helpers import assert_unchanged, rebuild, state_snapshot

W = torch.tensor([[0.5, -1.5, 0.1, -0.3],
                  [0.0, 0.2, -0.2, 0.6]])


def test_sign_alpha_and_signs_by_hand():
    codes, alpha = sign_encode(W)
    assert codes.tolist() == [[1, 0, 1, 0], [1, 1, 0, 1]]  # sign(0) -> +1
    assert torch.allclose(alpha, torch.tensor([(0.5 + 1.5 + 0.1 + 0.3) / 4, (0.2 + 0.2 + 0.6) / 4]))
    w = decode(codes, "sign", 1, 0, alpha)
    assert torch.allclose(w, torch.tensor([[0.6, -0.6, 0.6, -0.6], [0.25, 0.25, -0.25, 0.25]]))


def test_ternary_threshold_and_alpha_by_hand():
    codes, alpha, delta = ternary_encode(W)
    # Δ = 0.7·mean|w|: row 0 0.7·0.6 = 0.42 keeps 0.5 and -1.5; row 1 0.7·0.25 = 0.175
    assert torch.allclose(delta, torch.tensor([0.42, 0.175]))
    assert codes.tolist() == [[1, 2, 0, 0], [0, 1, 2, 1]]
    assert torch.allclose(alpha, torch.tensor([(0.5 + 1.5) / 2, (0.2 + 0.2 + 0.6) / 3]))
    w = decode(codes, "ternary", 2, 0, alpha)
    assert torch.equal(w == 0, torch.tensor([[False, False, True, True], [True, False, False, False]]))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_pow2_matches_the_seed_formula_inside_the_window(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 32, generator=g) * torch.rand(64, 32, generator=g) ** 4
    w[0, :5] = 0.0
    codes, e_max = pow2_encode(w, bits)
    got = decode(codes, "pow2", bits, e_max, None)
    seed = torch.sign(w) * 2.0 ** torch.round(torch.log2(w.abs()))  # the article's snippet
    e = torch.round(torch.log2(w.abs()))
    e_min, top = pow2_window(w, bits)
    assert top == e_max == int(torch.round(torch.log2(w.abs().max())))
    assert top - e_min + 1 == 2 ** (bits - 1) - 1
    inside = (e >= e_min) & (e <= e_max)
    assert inside.any() and torch.equal(got[inside], seed[inside])
    below = (e < e_min) & (w != 0)
    nearer_zero = w.abs() < 2.0 ** (e_min - 1)
    assert torch.equal(got[below & nearer_zero], torch.zeros_like(got[below & nearer_zero]))
    assert torch.equal(got[below & ~nearer_zero], torch.sign(w[below & ~nearer_zero]) * 2.0 ** e_min)
    assert (got[w == 0] == 0).all() and int(codes.max()) < 2 ** bits


def _binary(gm):
    return dict(compressed_modules(gm))


@pytest.mark.parametrize("mode, bits", [("sign", 1), ("ternary", 2), ("pow2", 4)])
def test_each_mode_passes_its_default_tolerance_on_fx_digits_models(mode, bits, mlp, cnn, calib):
    for model, first, last in ((mlp, "layers.0", "head"), (cnn, "conv1", "fc2")):
        snap = state_snapshot(model)
        res = fxpress.compress(model, f"binarize{{mode={mode}}}", calibration=calib)
        rec = res.records[0]
        assert rec.status == "ok" and res.capture["method"] == "fx"
        mods = _binary(res.module)
        assert mods and first not in mods and last not in mods  # kept in float by default
        assert rec.stats["kept_float"] == sorted([f"{first}.weight", f"{last}.weight"])
        for m in mods.values():
            out_channels = m.shape[0]
            alpha_bits = 0 if mode == "pow2" else out_channels * 32
            assert m.weight_bits() == 8 * ((m.numel * bits + 7) // 8) + alpha_bits
        assert_unchanged(model, snap)


@pytest.fixture(scope="module")
def mlp_export_gm():
    from examples.digits import calibration, trained_mlp
    gm = fxpress.capture(trained_mlp(hidden=(32,), epochs=30), calibration()[0], method="export")
    assert gm.meta["fxpress"]["method"] == "export"
    return gm


@pytest.mark.parametrize("mode", ["sign", "ternary", "pow2"])
def test_each_mode_runs_on_export_graphs(mode, mlp_export_gm, calib, minilm_gm, minilm_batches):
    res = fxpress.compress(mlp_export_gm, f"binarize{{mode={mode},keep_first_last=false}}",
                           calibration=calib, policy="warn")
    assert len(_binary(res.module)) == 2
    res = fxpress.compress(minilm_gm, f"binarize{{mode={mode},include=[*layer.3.intermediate*]}}",
                           calibration=[tuple(t[:8] for t in minilm_batches[0])], policy="warn")
    (m,) = _binary(res.module).values()
    assert m.mode == mode and res.records[0].cumulative.cosine > 0.5


def test_keep_first_last_false_binarizes_every_layer_and_accuracy_falls(mlp, calib, digits):
    from examples.digits import accuracy
    kept = fxpress.compress(mlp, "binarize", calibration=calib)
    every = fxpress.compress(mlp, "binarize{keep_first_last=false}", calibration=calib, policy="warn")
    assert len(_binary(every.module)) == 3 and len(_binary(kept.module)) == 1
    acc = [accuracy(m, digits.x_test, digits.y_test) for m in (mlp, kept.module, every.module)]
    assert acc[0] - acc[1] < 0.03 and acc[0] - acc[2] > 0.1


@pytest.mark.parametrize("mode", ["sign", "ternary", "pow2"])
def test_modules_rebuild_from_state_bit_exactly(mode, cnn, calib):
    gm = fxpress.compress(cnn, f"binarize{{mode={mode},keep_first_last=false,decode=once}}",
                          calibration=calib, policy="warn").module
    x = calib[0][0]
    out = gm(x)
    for name, m in _binary(gm).items():
        again = rebuild(m)
        assert again.config() == json.loads(json.dumps(m.config()))
        assert "weight_cache" not in m.state_dict()
        before, after = m.state_dict(), again.state_dict()
        assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(again.weight_float(), m.weight_float())
        gm.set_submodule(name, again)
    assert torch.equal(gm(x), out)


def test_straight_through_fine_tuning_trains_a_latent_and_rebinarizes(mlp, calib):
    gm = fxpress.compress(mlp, "binarize{mode=ternary}", calibration=calib).module
    m = _binary(gm)["layers.1"]
    keys, before = set(m.state_dict()), m.weight_float().clone()
    params = m.begin_training()
    assert params[0] is m.latent and m.latent.requires_grad
    w = m.weight_float()
    # forward stays on the ternary grid (α recomputed from the latent: equal to an ulp)
    assert torch.allclose(w.detach(), before, rtol=1e-6, atol=0) and torch.equal(w == 0, before == 0)
    upstream = torch.randn_like(w)
    (w * upstream).sum().backward()
    # straight through, except at zero weights: they stay zero (pruned weights must)
    assert torch.equal(m.latent.grad, upstream.masked_fill(before == 0, 0))
    opt = torch.optim.SGD(params, lr=0.5)
    x, y = calib[0][0], gm(calib[0][0]).argmax(1).roll(1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(gm(x), y).backward()
        opt.step()
    m.end_training()
    assert set(m.state_dict()) == keys and "latent" not in m._parameters
    after = m.weight_float()
    assert not torch.equal(after, before)
    grid = m.alpha[:, None] * torch.tensor([-1.0, 0.0, 1.0])  # back on {-α, 0, α} per row
    assert ((after[:, :, None] - grid[:, None, :]).abs().min(2).values == 0).all()


@pytest.mark.parametrize("text, option", [
    ("binarize{mode=binary}", "mode"), ("binarize{mode=sign,bits=2}", "bits"),
    ("binarize{mode=ternary,bits=3}", "bits"), ("binarize{mode=pow2,bits=1}", "bits"),
    ("binarize{mode=pow2,bits=9}", "bits"), ("binarize{ops=[lstm]}", "ops"),
    ("binarize{keep_first_last=1}", "keep_first_last"), ("binarize{decode=never}", "decode"),
])
def test_bad_options_name_the_option(text, option):
    with pytest.raises(OptionError) as e:
        fxpress.Pipeline.parse(text)
    assert e.value.option == option and f"'{option}'" in str(e.value)


def test_default_tolerance_follows_the_mode():
    sign, pow2, loose = fxpress.Pipeline.parse(
        "binarize,binarize{mode=pow2},binarize{mode=pow2,tol.min_top1=0.5}").passes
    assert pow2.tol.min_top1 > sign.tol.min_top1 and loose.tol.min_top1 == 0.5
    assert fxpress.list_passes()["binarize"]["tolerance"]["min_top1"] == sign.tol.min_top1


def test_binary_linear_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        BinaryLinear("linear", {}, "quaternary", 2, torch.randn(3, 4))
