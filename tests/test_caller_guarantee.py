"""The caller's guarantee as a property: random small models x random pipelines x injected
faults (an exception, KeyboardInterrupt, in-place writes through .data / numpy / mul_ /
item assignment, batch norm run in training mode, reseeding the global RNGs) leave the
caller's parameters and buffers bit-identical, every module's train/eval flag and the
process's random state as they were, whether the pipeline succeeds or fails."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxpress
from fxpress.errors import FxpressError
from fxpress.graph.weights import weighted_ops
from fxpress.passes.base import Pass, PassResult, PassTraits, Tolerance
from tests.helpers import assert_unchanged, state_snapshot

LOOSE = "tol.min_cosine=0,tol.min_top1=0"
PASSES = [f"prune{{sparsity=0.5,{LOOSE}}}", f"prune{{threshold=0.05,{LOOSE}}}",
          f"quantize{{bits=8,{LOOSE}}}", f"share{{bits=3,{LOOSE}}}",
          f"binarize{{mode=ternary,keep_first_last=false,{LOOSE}}}", "distill",
          "distill{epochs=1,lr=0.01,tol.min_top1=0,tol.min_accuracy_ratio=0}"]
FAULTS = ["raise", "interrupt", "data", "numpy", "mul_", "setitem", "train-forward", "reseed",
          "dropout"]


class Fault(Pass):
    """A pass that misbehaves in one of the ways a careless plugin does."""

    name = "fault"
    traits = PassTraits(tolerance=Tolerance(min_cosine=0.0), replaces_tensors=True)

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def run(self, gm, ctx):
        ops = weighted_ops(gm)
        w = ops[0].weight() if ops else None
        if self.how == "raise":
            raise RuntimeError("the plugin broke")
        if self.how == "interrupt":
            raise KeyboardInterrupt
        if self.how == "reseed":
            torch.manual_seed(1234)
            np.random.seed(1234)
            random.seed(1234)
            return PassResult(gm, False, {})
        if self.how == "dropout":  # draws from the global generator
            torch.nn.functional.dropout(torch.ones(4, 4), 0.5, training=True)
            return PassResult(gm, False, {})
        if self.how == "train-forward":
            gm.train()
            gm(*ctx.example_inputs)
            return PassResult(gm, False, {})
        if w is None:
            return PassResult(gm, False, {})
        if self.how == "data":
            w.data.mul_(0.5)
        elif self.how == "numpy":
            w.detach().numpy()[...] = 0.0
        elif self.how == "mul_":
            with torch.no_grad():
                w.mul_(0.5)
        elif self.how == "setitem":
            w[0] = 1.0
        return PassResult(gm, True, {})


@st.composite
def models(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    widths = [12] + draw(st.lists(st.integers(4, 20), min_size=1, max_size=3)) + [5]
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            if draw(st.booleans()):
                layers.append(torch.nn.BatchNorm1d(b))
            layers.append(draw(st.sampled_from([torch.nn.ReLU, torch.nn.Tanh, torch.nn.GELU]))())
            if draw(st.booleans()):
                layers.append(torch.nn.Dropout(0.2))
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    model.train(draw(st.booleans()))
    for m in model.modules():  # and a mix of flags below the top
        if draw(st.integers(0, 3)) == 0:
            m.training = not m.training
    return model


def _process_state():
    return (torch.get_rng_state(), random.getstate(), np.random.get_state())


def _same_process_state(a, b):
    return (torch.equal(a[0], b[0]) and a[1] == b[1]
            and all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
                    for x, y in zip(a[2], b[2])))


def _batches(n=2):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(6, 12, generator=g),) for _ in range(n)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models(), steps=st.lists(st.sampled_from(PASSES), min_size=1, max_size=3),
       fault=st.none() | st.tuples(st.sampled_from(FAULTS), st.integers(0, 3)),
       policy=st.sampled_from(["strict", "warn", "rollback"]), in_place=st.booleans())
def test_nothing_of_the_caller_changes_whatever_a_pipeline_does(model, steps, fault, policy,
                                                               in_place):
    passes = [fxpress.Pipeline.parse(s).passes[0] for s in steps]
    if fault is not None:
        passes.insert(min(fault[1], len(passes)), Fault(fault[0]))
    in_place = in_place and policy != "rollback"
    weights, flags = state_snapshot(model), [m.training for m in model.modules()]
    before = _process_state()
    calib = _batches()
    train = [(x, torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(1)))
             for (x,) in calib]
    try:
        fxpress.compress(model, passes, calibration=calib, train_data=train, policy=policy,
                         in_place=in_place, progress=False)
    except (FxpressError, KeyboardInterrupt):
        pass
    assert_unchanged(model, weights)
    assert [m.training for m in model.modules()] == flags
    assert _same_process_state(_process_state(), before)


def test_distiller_fit_leaves_the_global_rng_alone():
    from examples.digits import DigitsMLP

    teacher, student = DigitsMLP(hidden=(16,)), DigitsMLP(hidden=(8,))
    batches = [(torch.randn(8, 64), torch.randint(0, 10, (8,))) for _ in range(2)]
    before = _process_state()
    fxpress.Distiller(teacher, student).fit(batches, epochs=1, lr=1e-2, progress=False)
    assert _same_process_state(_process_state(), before)


def test_threads_never_leave_the_model_in_eval_mode_or_reseeded():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Dropout(0.1),
                                torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 5)).train()
    weights, before = state_snapshot(model), _process_state()
    results, errors = [], []
    text = (f"prune{{sparsity=0.5,{LOOSE}}},"
            "distill{epochs=1,lr=0.01,tol.min_top1=0,tol.min_accuracy_ratio=0}")
    train = [(x, torch.zeros(6, dtype=torch.long)) for (x,) in _batches()]

    def work():
        try:
            res = fxpress.compress(model, text, calibration=_batches(), train_data=train,
                                   progress=False)
            results.append(res.module.state_dict())
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    for _ in range(2):
        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and all(m.training for m in model.modules())
    assert_unchanged(model, weights)
    assert _same_process_state(_process_state(), before)
    assert len(results) == 6  # (dropout draws from the one global generator: results differ)


@pytest.mark.parametrize("how", ["data", "numpy", "mul_", "setitem"])
def test_the_documented_p_mul_case_fails_the_pass_and_leaves_the_weights(how):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 5))
    weights = state_snapshot(model)
    with pytest.raises(fxpress.errors.PassError, match="pass 'fault'"):
        fxpress.compress(model, [Fault(how)], calibration=_batches(), progress=False)
    assert_unchanged(model, weights)


@pytest.fixture
def restore_torch_settings():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def test_a_caller_whose_default_dtype_is_float64_compresses_a_float32_model(
        restore_torch_settings):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    weights, calib = state_snapshot(model), _batches()
    torch.set_default_dtype(torch.float64)  # scientific code often runs so
    res = fxpress.compress(model, f"prune{{sparsity=0.5,{LOOSE}}},share{{bits=4,{LOOSE}}}",
                           calibration=calib, progress=False)
    assert [r.status for r in res.records] == ["ok", "ok"]
    assert torch.get_default_dtype() == torch.float64
    assert_unchanged(model, weights)


class _SettingsForward(torch.nn.Module):
    """A model whose forward changes process-wide settings (as some research code does)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 5)

    def forward(self, x):
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        torch.manual_seed(3)
        torch.set_grad_enabled(False)
        return self.fc(x)


def test_a_forward_that_changes_process_settings_leaves_the_callers_as_they_were(
        restore_torch_settings):
    torch.manual_seed(0)
    model = _SettingsForward()
    torch.set_num_threads(2)
    before = _process_state()
    fxpress.compress(model, f"quantize{{bits=8,{LOOSE}}}", calibration=_batches(),
                     progress=False)
    assert torch.get_default_dtype() == torch.float32
    assert torch.get_num_threads() == 2 and torch.is_grad_enabled()
    assert _same_process_state(_process_state(), before)


class _RescalesOnFirstEvalCall(torch.nn.Module):
    """transformers' RWKV: its first forward in eval mode divides some weights in place
    (``div_``) and sets a flag, so later calls skip it."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)
        self.rescaled = False

    def forward(self, x):
        if not self.training and not self.rescaled:
            with torch.no_grad():
                self.fc.weight.div_(2)
            self.rescaled = True
        return self.head(torch.relu(self.fc(x)))


def test_a_forward_that_writes_into_its_own_weights_is_compressed_from_a_private_copy():
    """The reference run hit the read-only views and compress failed with 'does not run on
    the example inputs'; now the pipeline works on a writable copy: the graph computes what
    the model computes after that call, and the caller's weights and flag stay as they were."""
    torch.manual_seed(0)
    model, x = _RescalesOnFirstEvalCall().eval(), torch.randn(4, 8)
    before = state_snapshot(model)
    res = fxpress.compress(model, "quantize{bits=8}", example_inputs=(x,), progress=False)
    assert_unchanged(model, before)
    assert model.rescaled is False
    assert "writes into its own tensors (in-place div_ into 'fc.weight')" in res.module.meta["fxpress"]["why"]
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        want = twin(x)
        torch.testing.assert_close(res.module(x), want, rtol=0.05, atol=0.02)


def test_capture_on_its_own_never_changes_the_callers_model():
    """``fxpress.capture`` outside a pipeline ran the model itself: a forward writing into
    its own weights (RWKV) rescaled the caller's weights and set its flag. It now traces a
    structural copy over read-only views (a private copy when the forward writes), and the
    graph it hands out holds the caller's own tensor objects (no view leaks out)."""
    from fxpress.graph.guard import ReadOnlyParameter, ReadOnlyTensor

    torch.manual_seed(0)
    model, x = _RescalesOnFirstEvalCall().eval(), torch.randn(4, 8)
    before = state_snapshot(model)
    gm = fxpress.capture(model, (x,))
    assert_unchanged(model, before)
    assert model.rescaled is False
    assert "captured from a private copy" in gm.meta["fxpress"]["why"]
    import copy

    with torch.no_grad():
        torch.testing.assert_close(gm(x), copy.deepcopy(model)(x))
    plain = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()).train()
    gm = fxpress.capture(plain, (x,))
    assert plain.training and gm.get_parameter("0.weight") is plain[0].weight
    assert not isinstance(gm.get_parameter("0.weight"), (ReadOnlyTensor, ReadOnlyParameter))
    torch.testing.assert_close(gm(x), plain(x))


class _SwitchesForward(torch.nn.Module):
    """A forward that reseeds every generator and flips torch's process-wide switches."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 5)

    def forward(self, x):
        torch.manual_seed(3), random.seed(3), np.random.seed(3)
        torch.set_num_threads(1)
        torch.set_grad_enabled(False)
        torch.set_float32_matmul_precision("medium")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.autograd.set_detect_anomaly(True)
        torch.backends.mkldnn.enabled = False
        np.seterr(all="raise")
        return self.fc(x)


def _switches():
    return (torch.get_num_threads(), torch.is_grad_enabled(), torch.get_float32_matmul_precision(),
            torch.are_deterministic_algorithms_enabled(), torch.is_anomaly_enabled(),
            torch.backends.mkldnn.enabled, np.geterr())


@pytest.mark.parametrize("how", ["capture", "compress"])
def test_a_forward_that_flips_torchs_switches_leaves_the_callers_as_they_were(
        how, restore_torch_settings):
    """``fxpress.capture`` on its own restored nothing: a forward that reseeded torch,
    Python and NumPy or set the thread count left the caller reseeded and on one thread;
    and neither capture nor compress restored torch's other process-wide switches (float32
    matmul precision, deterministic algorithms, anomaly detection, oneDNN, NumPy's error
    handling)."""
    torch.manual_seed(0)
    model, x = _SwitchesForward().eval(), torch.randn(6, 12)
    torch.set_num_threads(2)
    before, switches = _process_state(), _switches()
    try:
        if how == "capture":
            fxpress.capture(model, (x,))
        else:
            fxpress.compress(model, f"prune{{sparsity=0.2,{LOOSE}}}", calibration=_batches(),
                             progress=False)
        assert _switches() == switches
        assert _same_process_state(_process_state(), before)
    finally:
        torch.set_float32_matmul_precision(switches[2])
        torch.use_deterministic_algorithms(False)
        torch.autograd.set_detect_anomaly(False)
        torch.backends.mkldnn.enabled = True
        np.seterr(**switches[-1])


class _WritesItsInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x.mul_(2)
        return self.fc(x)


def test_a_forward_that_writes_into_its_input_never_changes_the_callers_tensors():
    """capture ran the model on the caller's own example tensors: ``x.mul_(2)`` in forward
    doubled the caller's input at every run (and each later run saw other inputs, so capture
    failed blaming data-dependent control flow). Capture now runs on its own copies, and the
    failure says the forward writes into its input."""
    from fxpress.errors import CaptureError

    torch.manual_seed(0)
    model, x = _WritesItsInput().eval(), torch.randn(6, 8)
    calib = [(torch.randn(6, 8),)]
    kept = x.clone(), calib[0][0].clone()
    with pytest.raises(CaptureError, match=r"writes into its input\(s\) \[0\] in place"):
        fxpress.capture(model, (x,))
    with pytest.raises(CaptureError, match=r"writes into its input\(s\) \[0\] in place"):
        fxpress.compress(model, "prune{sparsity=0.3}", calibration=calib, progress=False)
    assert torch.equal(x, kept[0]) and torch.equal(calib[0][0], kept[1])


def test_detach_in_an_exported_graph_is_not_a_write_into_the_callers_tensor():
    """torch.export records ``detach_`` as ``aten.detach_``, whose schema marks its input as
    written: the guard took it for a write into the caller's tensor, and calibrating a
    captured GPT-2 (``detach_`` on a lifted constant in its attention) failed with 'forward
    writes in place into its own tensor ... (detach_)'. It changes only the wrapper's
    autograd state; a real in-place op is still refused."""
    from fxpress.errors import SharedTensorWriteError
    from fxpress.graph.guard import _read_only

    t = _read_only(torch.ones(3), "c")
    torch.ops.aten.detach_.default(t)
    with pytest.raises(SharedTensorWriteError, match="'c'"):
        torch.ops.aten.add_.Tensor(t, 1)
    assert torch.equal(t, torch.ones(3))
