"""Calibration data that a pass's statistics cannot hold is an InputError naming the batch,
the node and the layer reading it, and what to do; never a raw error from inside the
pass's arithmetic, a verification failure, or a silently different result.

Passes that measure their layers' inputs (quantize's ranges and smoothing, prune's
``criterion="activation"``) compute in float32: a value past the square root of float32's
largest number overflows their sums of squares and scales. Before: 3e38 in the data gave
``PassError: cannot convert float NaN to integer`` (int8), ``codes must lie in [0, 15]``
(4-bit groups), a VerificationError (smoothing), and prune silently ranked the layer by
magnitude alone. Data: sklearn's digits (64 features, 8x8 images).
"""
from __future__ import annotations

import re

import pytest
import torch
from sklearn.datasets import load_digits

import fxpress
from fxpress.errors import InputError
from tests.helpers import assert_unchanged, state_snapshot

PASSES = ["quantize", "quantize{bits=4,granularity=group,group_size=16}",
          "quantize{smooth=0.5}", "prune{sparsity=0.5,criterion=activation}"]


def _digits():
    x = torch.tensor(load_digits().data[:96], dtype=torch.float32) / 16
    return [(x[i:i + 32],) for i in range(0, 96, 32)]


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 10)).eval()


class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x.reshape(-1, 1, 8, 8))).mean((2, 3)))


def _set(batches, i, value, row=3, col=5):
    out = [(b[0].clone(),) for b in batches]
    out[i][0][row, col] = value
    return out


def _compress_refused(model, pipe, calibration, match):
    before, rng = state_snapshot(model), torch.get_rng_state()
    with pytest.raises(InputError, match=match):
        fxpress.compress(model, pipe, calibration[0], calibration=calibration, progress=False)
    assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training


@pytest.mark.parametrize("pipe", PASSES)
@pytest.mark.parametrize("make", [_mlp, _CNN])
@pytest.mark.parametrize("value", [3e38, 1e20])
def test_a_finite_value_past_float32s_square_root_names_batch_and_layer(pipe, make, value):
    data = _set(_digits(), 1, value)
    first = "'0'" if make is _mlp else "'conv'"
    _compress_refused(make().eval(), pipe, data,
                      f"calibration batch 1: node '[a-z_0-9]+'( \\([a-z]+\\))?, read by {first}, holds "
                      f"values up to {re.escape(f'{value:.3g}')}, past 1.84e\\+19 .*rescale the data")


@pytest.mark.parametrize("pipe", PASSES)
def test_data_the_model_overflows_on_names_the_layer_it_overflows_into(pipe):
    # every value of batch 2 is 1e18 (under the bound): the first layer's sums reach past it
    # (quantize watches that layer's output too, prune only the second layer's input)
    data = _digits()
    data[2] = (torch.full_like(data[2][0], 1e18),)
    model = _mlp()
    with torch.no_grad():
        model[0].weight.mul_(100)
    _compress_refused(model, pipe, data,
                      "calibration batch 2: node '(_0' \\(module '0', Linear\\), read by '1'|_1' "
                      "\\(module '1', ReLU\\), read by '2'), "
                      "holds values up to .*, past 1.84e\\+19")


def test_data_under_the_bound_compresses():
    data = _set(_digits(), 1, 1e6)
    res = fxpress.compress(_mlp(), "quantize", data[0], calibration=data, progress=False,
                           policy="warn")
    assert res.module(data[0][0]).shape == (32, 10)
