"""The caller's state, beyond what test_caller_guarantee.py's pipelines check: every entry
point a user calls on their model (each built-in pass, save + load
+ a call, export_onnx, compile + a call), succeeding or failing (a bad option, a strict
verification failure), leaves the caller's parameters and buffers, train/eval flags,
requires_grad flags and hooks, and the process's RNG, grad mode, default dtype and thread
count as they were. Random small models (test_caller_guarantee's strategy)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxpress
from fxpress.errors import FxpressError
from tests.helpers import assert_unchanged, state_snapshot
from tests.test_caller_guarantee import _batches, _process_state, _same_process_state, models

LOOSE = "tol.min_cosine=0,tol.min_top1=0"
OPERATIONS = [
    f"prune{{sparsity=0.5,{LOOSE}}}", f"prune{{sparsity=0.5,floor=unit,{LOOSE}}}",
    f"quantize{{bits=4,granularity=group,group_size=4,{LOOSE}}}", f"quantize{{{LOOSE}}}",
    f"share{{bits=3,{LOOSE}}}", f"binarize{{keep_first_last=false,{LOOSE}}}",
    f"small{{{LOOSE}}}", "fold_bn", "prune{sparsity=0.99}",  # strict: fails verification
    "quantize{bits=99}",  # a bad option
    "save-load", "export_onnx", "compile"]
FAILING = {"prune{sparsity=0.99}", "quantize{bits=99}"}


def _hooks(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()]


def _state(model):
    return (state_snapshot(model), [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], _hooks(model), _process_state(),
            torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_num_threads())


def _run(model, op, tmp_path):
    calib = _batches()
    x = calib[0]
    if op in ("save-load", "export_onnx", "compile"):
        res = fxpress.compress(model, f"quantize{{{LOOSE}}}", x, calibration=calib,
                               progress=False)
        if op == "save-load":
            fxpress.save(res, tmp_path / "m.fxp")
            return fxpress.load(tmp_path / "m.fxp")(*x)
        if op == "export_onnx":
            return fxpress.export_onnx(res, tmp_path / "m.onnx", x)
        return fxpress.compile(res, backend="aot_eager", dispatch="compiled")(*x)
    return fxpress.compress(model, op, x, calibration=calib, progress=False)


@pytest.mark.parametrize("op", OPERATIONS)
@settings(max_examples=2, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(model=models(), frozen=st.integers(0, 3), hooked=st.booleans())
def test_no_entry_point_changes_the_callers_state(op, model, frozen, hooked, tmp_path):
    params = list(model.parameters())
    params[frozen % len(params)].requires_grad_(False)  # a mix of requires_grad flags
    if hooked:  # capture refuses hooks (code): the refusal must leave them registered
        model.register_forward_hook(lambda m, a, out: None)
        model[0].register_forward_pre_hook(lambda m, a: None)
    threads = torch.get_num_threads()
    before = _state(model)
    try:
        _run(model, op, tmp_path)
        failed = False
    except FxpressError:
        failed = True
    # not vacuous: what is meant to succeed does, on a model without hooks
    assert failed == (hooked or op in FAILING), op
    after = _state(model)
    assert_unchanged(model, before[0])
    assert after[1:4] == before[1:4], op
    assert _same_process_state(after[4], before[4]), op
    assert after[5:] == before[5:] == (True, torch.float32, threads), op


@pytest.mark.parametrize("op", ["save-load", "export_onnx", "compile"])
def test_each_artifact_entry_point_runs_in_the_property(op, tmp_path):
    """The property above is not vacuous: these entry points succeed on a plain model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    assert _run(model.eval(), op, tmp_path) is not None
