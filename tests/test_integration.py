"""Passes together: every runtime module through save/load, and recovery after compression."""
from __future__ import annotations

import pytest
import torch

import fxpress
from examples.digits import accuracy, calibration, train_data
from fxpress.graph.runtime import compressed_modules
from tests.helpers import assert_unchanged, state_snapshot

PIPELINES = [
    "prune{sparsity=0.5,scope=global},share{bits=4}",
    "quantize{bits=8}",
    "quantize{bits=4,granularity=group,group_size=16,scheme=affine}",
    "quantize{bits=3,activations=none}",
    "binarize{mode=sign}",
    "binarize{mode=ternary}",
    "binarize{mode=pow2}",
    "distill{taps=[layers.*]}",
    "prune{sparsity=0.5},quantize{bits=8},distill",
]


@pytest.mark.parametrize("text", PIPELINES)
def test_every_runtime_module_round_trips_bit_exactly(text, small_mlp, digits, tmp_path):
    snap = state_snapshot(small_mlp)
    res = fxpress.compress(small_mlp, text, calibration=calibration(2, 64), policy="warn",
                           progress=False)
    path = tmp_path / "m.fxp"
    fxpress.save(res.module, path)
    loaded = fxpress.load(path)
    x = digits.x_test[:50]
    assert torch.equal(loaded(x), res.module(x))
    kinds = sorted(type(m).__name__ for _, m in compressed_modules(loaded))
    assert kinds == sorted(type(m).__name__ for _, m in compressed_modules(res.module))
    assert_unchanged(small_mlp, snap)


def test_cnn_through_share_and_quantize_round_trips(cnn, digits, tmp_path):
    res = fxpress.compress(cnn, "share{bits=5,include=[conv*]},quantize{bits=8,include=[fc*]}",
                           calibration=calibration(2, 64), policy="warn", progress=False)
    fxpress.save(res.module, tmp_path / "c.fxp", entropy=True)
    x = digits.x_test[:40]
    assert torch.equal(fxpress.load(tmp_path / "c.fxp")(x), res.module(x))


def test_minilm_int8_file_is_at_most_0_27_of_fp32(minilm, minilm_batches, tmp_path):
    from safetensors.torch import save_file

    res = fxpress.compress(minilm, "quantize{bits=8}", calibration=minilm_batches[:1],
                           progress=False)
    path = tmp_path / "minilm.fxp"
    fxpress.save(res.module, path)
    fp32 = tmp_path / "minilm.safetensors"
    save_file({k: v.contiguous() for k, v in minilm.state_dict().items()}, str(fp32))
    assert path.stat().st_size <= 0.27 * fp32.stat().st_size
    assert res.records[0].cumulative.cosine >= 0.99
    batch = minilm_batches[1]
    assert torch.equal(fxpress.load(path)(*batch), res.module(*batch))


def test_deep_compression_recovers_within_half_a_point(mlp, digits):
    """prune 95% -> recover -> share 4 bits -> fine-tune centroids (Deep Compression's order)."""
    before = accuracy(mlp, digits.x_test, digits.y_test)
    res = fxpress.compress(
        mlp, "prune{sparsity=0.95,scope=global},distill{epochs=30,lr=0.01},share{bits=4},"
             "distill{epochs=10,lr=0.001}", calibration=calibration(), train_data=train_data(),
        progress=False)
    after = accuracy(res.module, digits.x_test, digits.y_test)
    assert before - after <= 0.005
    assert [r.status for r in res.records] == ["deferred", "ok", "ok", "ok"]
    assert abs(res.records[-1].sparsity - 0.95) < 1e-3  # pruned weights stayed zero
    for _, m in compressed_modules(res.module):  # weights are still on the codebook
        assert torch.unique(m.weight_float()).numel() <= 2 ** 4


def test_recovery_after_quantize_keeps_pruned_zeros(mlp):
    res = fxpress.compress(mlp, "prune{sparsity=0.9,scope=global},quantize{bits=8},"
                                "distill{epochs=3,lr=0.01}", calibration=calibration(),
                           train_data=train_data(), policy="warn", progress=False)
    assert abs(res.records[-1].sparsity - res.records[0].sparsity) < 1e-3
