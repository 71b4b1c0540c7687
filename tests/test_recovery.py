"""Recovery from defaults (issue 18): held-out early stopping that restores the best epoch,
a learning rate chosen by a range test, training through every compressed form (masks,
codebooks with re-assignment, straight-through grids), the caller's RNG and model left
alone, gradual pruning and the built-in deep-compression recipe."""
from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

import fxpress
from examples.digits import DigitsMLP, accuracy, train_data, trained_mlp
from fxpress.errors import PlanMissedWarning
from fxpress.graph.runtime import compressed_modules
from fxpress.passes.distill_data import split_holdout
from fxpress.passes.distill_tuning import lr_range_test
from tests.helpers import assert_unchanged, state_snapshot


def _held_loss(d: fxpress.Distiller, held) -> float:
    total = 0.0
    with torch.no_grad():
        for x, y in held:
            total += d.loss(d.student(x), d.teacher(x), y, [], {})[1]["loss"]
    return total / len(held)


def test_early_stopping_restores_the_epoch_with_the_best_held_out_loss(one_thread):
    teacher = trained_mlp(hidden=(32,), epochs=20)
    torch.manual_seed(3)
    student = DigitsMLP(hidden=(8,))
    data = train_data()
    d = fxpress.Distiller(teacher, student)
    # a rate far too high for steady progress: the held-out loss wanders, so the best
    # epoch is not the last one and patience ends the run
    h = d.fit(data, epochs=25, lr=0.3, schedule="constant", holdout=0.2, patience=3,
              progress=False)
    vals = [e["val_loss"] for e in h.epochs]
    assert h.holdout_batches == 4 and len(vals) == len(h)
    assert h.best_epoch == 1 + vals.index(min(vals))
    assert h.stopped_early and h.best_epoch == len(h) - 3
    _, held = split_holdout(data, 0.2, 0)
    # the student holds the best epoch's weights, not the last epoch's
    assert _held_loss(d, held) == pytest.approx(min(vals), rel=1e-5)
    assert _held_loss(d, held) < vals[-1]


def test_a_plateau_anneals_from_the_best_state_before_stopping(one_thread):
    from fxpress.passes.distill_train import TrainConfig

    teacher = trained_mlp(hidden=(32,), epochs=20)
    torch.manual_seed(3)
    d = fxpress.Distiller(teacher, DigitsMLP(hidden=(8,)))
    h = d.fit(train_data()[:12], config=TrainConfig(
        epochs=20, lr=0.3, schedule="constant", holdout=0.25, patience=2, lr_drops=1,
        progress=False))
    (drop,) = h.lr_drops
    lrs = [e["lr"] for e in h.epochs]  # each epoch's rate at its start
    assert lrs[:drop + 1] == [0.3] * (drop + 1)
    assert all(a > b for a, b in zip(lrs[drop:], lrs[drop + 1:]))  # annealing after the drop
    # the tail lasts `patience` epochs or half of those left, less when the held-out loss
    # stops improving for `patience` epochs within it
    tail = max(2, (20 - drop) // 2)
    assert h.stopped_early and drop + 2 <= len(h) <= drop + tail
    vals = [e["val_loss"] for e in h.epochs]
    assert h.best_epoch == 1 + vals.index(min(vals))


def test_holdout_split_is_deterministic_and_leaves_the_global_rng_alone():
    data = list(range(20))
    state = torch.get_rng_state()
    a_train, a_held = split_holdout(data, 0.1, seed=5)
    b_train, b_held = split_holdout(data, 0.1, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    assert list(a_held) == list(b_held) and len(a_held) == 2
    assert sorted(list(a_train) + list(a_held)) == data
    assert list(split_holdout(data, 0.1, seed=6)[1]) != list(a_held)
    assert split_holdout(data[:3], 0.1, seed=5) == (data[:3], None)  # too few to hold any out

    class Stream:  # re-iterable, no length: every 4th batch is held out
        def __iter__(self):
            return iter(range(20))

    train, held = split_holdout(Stream(), 0.25, seed=0)
    assert list(held) == [3, 7, 11, 15, 19] and sorted(list(train) + list(held)) == data


def test_range_test_picks_a_tenth_of_the_rate_at_the_loss_minimum():
    def valley(lr: float) -> float:  # falls until lr = 1e-2, then explodes
        e = torch.tensor(lr).log10().item() + 2
        return 0.1 + (-e if e < 0 else 50 * e * e)

    curve = lr_range_test(valley, steps=61)
    # a tenth of the valley's edge (smoothing lags the raw minimum a few steps)
    assert 1e-3 <= curve.chosen <= 5e-3
    assert len(curve.lrs) < 61  # stopped once the loss blew up
    flat = lr_range_test(lambda lr: 0.05 if lr < 0.1 else 5.0, steps=61)
    assert 3e-3 <= flat.chosen <= 1e-2  # a flat curve: a tenth of where it blows up
    # a nearly-right model on few batches: the loss is flat but differs from batch to batch
    # by more than the valley's 25%, and its lowest point is among the first steps
    noise = [0.02, 0.05, 0.03, 0.06, 0.04, 0.05]
    steps = iter(range(1000))
    noisy = lr_range_test(lambda lr: noise[next(steps) % 6] * (1 if lr < 0.1 else 100), steps=61)
    assert noisy.flat and 3e-3 <= noisy.chosen <= 1e-2  # not the floor of 1e-5
    # six batches, the first far easier than the rest (breast_cancer): the exponential
    # average saw a blow-up at the fifth step; averaged over a pass, the curve is flat
    easy_first = [0.02, 0.13, 0.18, 0.15, 0.16, 0.14]
    steps = iter(range(1000))

    def six(lr: float) -> float:
        return easy_first[next(steps) % 6] * (1 if lr < 0.1 else 100)

    assert lr_range_test(six, steps=61).chosen < 1e-4  # the old failure: near the floor
    steps = iter(range(1000))
    assert 3e-3 <= lr_range_test(six, steps=61, window=6).chosen <= 1e-2
    assert not curve.flat and not flat.flat


def test_default_recovery_leaves_rng_and_model_alone_and_reports_its_curve(mlp, calib, one_thread,
                                                                          tmp_path):
    snap = state_snapshot(mlp)
    rng = torch.get_rng_state()
    res = fxpress.compress(mlp, "prune{sparsity=0.9,scope=global},distill{epochs=6,holdout=0.1}",
                           calibration=calib, train_data=train_data(), progress=False)
    assert torch.equal(rng, torch.get_rng_state())
    assert_unchanged(mlp, snap)
    st = res.records[-1].stats
    assert st["lr_test"]["chosen"] == st["lr"] and 1e-5 <= st["lr"] <= 0.1
    assert len(st["lr_test"]["lrs"]) == len(st["lr_test"]["losses"]) > 5
    assert st["holdout_batches"] == 2 and 1 <= st["best_epoch"] <= len(st["epochs"])
    assert {"loss", "val_loss", "val_accuracy", "val_agreement", "lr"} <= set(st["epochs"][0])
    assert res.records[-1].status == "ok"
    # the same seed gives the same run
    again = fxpress.compress(mlp, "prune{sparsity=0.9,scope=global},distill{epochs=6,holdout=0.1}",
                             calibration=calib, train_data=train_data(), progress=False)
    assert again.records[-1].stats["lr"] == st["lr"]
    x = calib[0][0]
    assert torch.equal(again.module(x), res.module(x))
    # the saved report plots the curve
    from fxpress.graph.artifact import read_header
    from fxpress.report import render_report

    fxpress.save(res, tmp_path / "m.fxp")
    page = render_report(fxpress.load(tmp_path / "m.fxp"), read_header(tmp_path / "m.fxp"))
    assert "Recovery curves" in page and "held-out loss" in page and "range test" in page


def _codebooks(gm):
    return {n: m for n, m in compressed_modules(gm) if m.technique == "share"}


def test_codebook_recovery_moves_centroids_reassigns_consistently_and_keeps_zeros(
        small_mlp, calib, digits, one_thread):
    shared = fxpress.compress(small_mlp, "prune{sparsity=0.8},share{bits=3}", calibration=calib,
                              policy="warn", progress=False).module
    res = fxpress.compress(small_mlp, "prune{sparsity=0.8},share{bits=3},distill{epochs=4}",
                           calibration=calib, train_data=train_data(), policy="warn",
                           progress=False)
    before, after = _codebooks(shared), _codebooks(res.module)
    moved = reassigned = 0
    for name, m in after.items():
        o = before[name]
        assert set(m.state_dict()) == set(o.state_dict())  # still a codebook and packed codes
        assert not any(isinstance(t, torch.nn.Parameter) for t in m.state_dict(keep_vars=True).values()
                       if t is not m.bias)
        w, w0 = m.weight_float(), o.weight_float()
        assert torch.equal(w == 0, w0 == 0)  # pruned stay zero, nothing else became zero
        assert set(torch.unique(w).tolist()) <= set(m._table().tolist())
        moved += int(not torch.equal(m.codebook, o.codebook))
        # each kept weight sits on the centroid nearest to where it trained: decoding the
        # decoded weight again gives the same codes
        assert torch.equal(m._nearest(w), m._codes())
        reassigned += int((m._codes() != o._codes()).sum())
    assert moved == len(after) and reassigned > 0
    assert accuracy(res.module, digits.x_test, digits.y_test) > \
        accuracy(shared, digits.x_test, digits.y_test)


@pytest.mark.parametrize("pipeline", ["quantize{bits=4,activations=none}",
                                      "binarize{mode=ternary,keep_first_last=false}"])
def test_ste_recovery_ends_on_the_grid_and_stays_stored_compressed(small_mlp, calib, pipeline,
                                                                   one_thread):
    lossy = fxpress.compress(small_mlp, pipeline, calibration=calib, policy="warn",
                             progress=False).module
    res = fxpress.compress(small_mlp, f"{pipeline},distill{{epochs=3,lr=0.003}}", calibration=calib,
                           train_data=train_data(), policy="warn", progress=False)
    old = dict(compressed_modules(lossy))
    changed = 0
    for name, m in compressed_modules(res.module):
        o = old[name]
        assert set(m.state_dict()) == set(o.state_dict()) and "latent" not in m.state_dict()
        for k, t in m.state_dict().items():  # codes stay integers, of the same size
            assert t.dtype == o.state_dict()[k].dtype and t.shape == o.state_dict()[k].shape, k
        w = m.weight_float()
        changed += int(not torch.equal(w, o.weight_float()))
        if m.technique == "quantize":  # per-channel 4-bit symmetric: integers in [-7, 7]
            q = m.stored_weight() / m.scale.reshape(-1, 1)
            assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 7 + 1e-4
        else:  # ternary: each row is 0 or ±α
            a = w.abs()
            assert bool(((a == 0) | (a == a.amax(1, keepdim=True))).all())
    assert changed  # it trained


def test_gradual_pruning_runs_stages_with_a_recovery_after_each(small_mlp, calib, one_thread):
    res = fxpress.compress(small_mlp, "prune{sparsity=0.9,scope=global,steps=3},distill{epochs=2}",
                           calibration=calib, train_data=train_data(), policy="warn",
                           progress=False)
    names = [r.name for r in res.records]
    assert names == ["prune", "distill"] * 3
    sparsities = [r.stats["sparsity"] for r in res.records if r.name == "prune"]
    assert sparsities[0] < sparsities[1] < sparsities[2] == pytest.approx(0.9, abs=1e-3)
    with pytest.raises(fxpress.errors.OptionError, match="steps.*recovery"):
        fxpress.compress(small_mlp, "prune{sparsity=0.9,steps=3}", calibration=calib)


def _expanded(text: str, train_data) -> list:
    from fxpress.passes.gradual import expand
    from fxpress.passes.pipeline import Pipeline

    return expand(Pipeline(text).passes, train_data)


def test_a_high_sparsity_before_a_self_tuning_recovery_is_staged_by_default():
    from fxpress.passes.gradual import advise
    from fxpress.passes.records import PassRecord

    data = train_data()[:4]
    staged = _expanded("prune{sparsity=0.95,scope=global},share{bits=4},distill", data)
    assert [p.name for p in staged] == ["prune", "distill", "prune", "distill", "prune", "share",
                                        "distill"]
    assert [p.sparsity for p in staged if p.name == "prune"] == [0.6685, 0.9148, 0.95]
    assert all(p.scope == "global" for p in staged if p.name == "prune")
    # what keeps the one cut: steps=1, a lower sparsity, no training data, a recovery with
    # a budget of epochs the caller fixed, per-layer rules, no recovery at all
    for text, data_ in [("prune{sparsity=0.95,steps=1},distill", data),
                        ("prune{sparsity=0.8},distill", data),
                        ("prune{sparsity=0.95},distill", None),
                        ("prune{sparsity=0.95},distill{epochs=10}", data),
                        ('prune{sparsity=0.95,layers={"0"={sparsity=0.5}}},distill', data)]:
        assert [p.name for p in _expanded(text, data_)] == ["prune", "distill"], text
    assert [p.name for p in _expanded("prune{sparsity=0.95},share{bits=4}", data)] == ["prune", "share"]
    # the first stage's record says what ran and how to cut once; a stage is never told
    # to stage itself
    records = [PassRecord(index=i + 1, name=p.name, spec=str(p)) for i, p in enumerate(staged)]
    advise(staged, records, data)
    assert "staged by default: prune{sparsity=0.95,scope=global} ran as 3 prunes" in records[0].message
    assert "prune{sparsity=0.95,scope=global,steps=1} cuts once" in records[0].message
    assert not any("staged" in r.message for r in records[1:])
    from fxpress.passes.gradual import likely_short

    last = PassRecord(index=7, name="distill", spec="distill",
                      stats={"teacher_val_accuracy": 0.98, "best_epoch": 1,
                             "epochs": [{"val_accuracy": 0.90}], "holdout_batches": 2})
    likely_short(last, [staged[4], staged[5]])
    assert "likely short" in last.message and "steps=3" not in last.message
    assert "deep-compression" in last.message


def test_an_automatic_sparsity_before_a_self_tuning_recovery_is_staged_by_default():
    data = train_data()[:4]
    staged = _expanded("prune{scope=global},share,distill", data)
    assert [p.name for p in staged] == ["prune", "distill", "prune", "distill", "prune", "share",
                                        "distill"]
    stages = [p for p in staged if p.name == "prune"]
    assert [p.auto_stage[:2] for p in stages] == [(1, 3), (2, 3), (3, 3)]
    assert len({id(p.auto_stage[2]) for p in stages}) == 1  # one choice, shared
    assert all(p.sparsity is None and p.scope == "global" for p in stages)
    # the one cut: steps=1, no training data, a recovery with a fixed budget, a threshold,
    # per-layer rules, no recovery at all; steps=3 asks for the stages explicitly
    for text, data_ in [("prune{steps=1},distill", data), ("prune,distill", None),
                        ("prune,distill{epochs=10}", data), ("prune{threshold=0.01},distill", data),
                        ('prune{layers={"0"={sparsity=0.5}}},distill', data)]:
        assert [p.name for p in _expanded(text, data_)] == ["prune", "distill"], text
    assert len(_expanded("prune{steps=3},distill{epochs=2}", data)) == 6
    with pytest.raises(fxpress.errors.OptionError, match="threshold has no schedule"):
        fxpress.Pipeline("prune{threshold=0.01,steps=3},distill")
    # a recovery likely short after the stages names a sparsity below the one chosen
    from fxpress.passes.gradual import likely_short
    from fxpress.passes.records import PassRecord

    stages[0].auto_stage[2]["sparsity"] = 0.8
    last = PassRecord(index=7, name="distill", spec="distill",
                      stats={"teacher_val_accuracy": 0.98, "best_epoch": 1,
                             "epochs": [{"val_accuracy": 0.90}], "holdout_batches": 2})
    likely_short(last, [stages[2], staged[5]])
    assert "a sparsity below 0.8" in last.message and "steps=3" not in last.message


def test_staged_automatic_sparsity_chooses_once_and_cuts_along_the_schedule(one_thread):
    from fxpress.passes.gradual import cubic_schedule

    model = trained_mlp(hidden=(32,), epochs=20)
    data = train_data()[:8]
    calib = [(x,) for x, _ in data[:2]]
    one = fxpress.compress(model, "prune", calibration=calib, progress=False)
    chosen = one.records[0].stats["auto_sparsity"]["chosen"]
    assert 0 < chosen < 1
    res = fxpress.compress(model, "prune,distill", calibration=calib, train_data=data,
                           policy="warn", progress=False)
    prunes = [r for r in res.records if r.name == "prune"]
    assert [r.name for r in res.records] == ["prune", "distill"] * 3
    # the first stage chose what the one cut chooses, on the same graph; every stage cut
    # to its point of the cubic schedule towards it, and only the first searched
    assert prunes[0].stats["auto_sparsity"]["chosen"] == chosen
    assert not any("auto_sparsity" in r.stats for r in prunes[1:])
    schedule = [round(s, 4) for s in cubic_schedule(chosen, 3)]
    assert [r.stats["auto_stage"]["schedule"] for r in prunes] == [schedule] * 3
    for r, s in zip(prunes, schedule):
        assert r.stats["sparsity"] == pytest.approx(s, abs=0.01)
    assert f"chose sparsity {chosen:g} and ran as 3 prunes" in prunes[0].message
    assert "prune{steps=1} cuts once" in prunes[0].message
    assert all(len(r.stats["epochs"]) > 0 for r in res.records if r.name == "distill")


def test_deep_compression_recipe_needs_only_the_model_and_training_data(one_thread):
    model = trained_mlp(hidden=(32,), epochs=20)
    data = train_data()[:8]
    res = fxpress.compress(model, "deep-compression", train_data=data, policy="warn",
                           progress=False)
    assert [r.name for r in res.records] == ["fold_bn"] + ["prune", "distill"] * 3 + ["share", "small", "distill"]
    assert res.records[-1].sparsity > 0.9 and res.records[-1].stats["lr"] > 0
    x, y = data[0]
    assert float((res.module(x).argmax(1) == model(x).argmax(1)).float().mean()) > 0.8


def test_a_lossy_pass_after_the_last_recovery_is_pointed_out(small_mlp, calib, one_thread):
    res = fxpress.compress(small_mlp, "prune{sparsity=0.5},distill{epochs=1},share{bits=4}",
                           calibration=calib, train_data=train_data(), policy="warn",
                           progress=False)
    share = res.records[-1]
    assert "after the last recovery" in share.message and "distill" in share.message


class _BranchedCNN(torch.nn.Module):
    """conv1 -> bn1 (foldable); conv2 feeds bn2 and a skip, so bn2 must stay."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x.reshape(-1, 1, 8, 8))))
        c = self.conv2(h)
        return self.fc(torch.flatten(torch.relu(self.bn2(c)) + c, 1))


def test_fold_bn_keeps_outputs_removes_batchnorm_tensors_and_leaves_shared_outputs(calib, tmp_path):
    torch.manual_seed(0)
    model = _BranchedCNN()
    for bn in (model.bn1, model.bn2):  # statistics far from the identity, as after training
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        torch.nn.init.normal_(bn.weight)
        torch.nn.init.normal_(bn.bias)
    model.eval()
    before = state_snapshot(model)
    res = fxpress.compress(model, "fold_bn", calibration=calib[:1], progress=False)
    assert_unchanged(model, before)
    rec = res.records[0]
    assert rec.status == "ok" and rec.stats["folded"] == {"bn1": "conv1"}
    names = dict(res.module.named_modules())
    assert "bn1" not in names and "bn2" in names  # conv2's output is also read by the skip
    assert res.module.conv1.bias is not None and model.conv1.bias is None
    x = calib[0][0]
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-5)
    fxpress.save(res.module, tmp_path / "m.fxp")
    loaded = fxpress.load(tmp_path / "m.fxp")
    assert not any("bn1" in k for k in loaded.state_dict())
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_per_layer_prune_keeps_two_weights_per_unit_in_small_fan_in_layers(calib):
    from examples.digits import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(8, 16, 32).eval()  # conv1: fan-in 9; conv2: 72; fc1: 64; fc2: 32

    def zeros(text):
        res = fxpress.compress(model, text, calibration=calib[:1], policy="warn", progress=False)
        return {n: int((m.weight == 0).sum()) for n, m in res.module.named_modules()
                if hasattr(m, "weight") and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}

    got = zeros("prune{sparsity=0.95,scope=layer}")
    assert got["conv1"] == 72 - 2 * 8  # 95% would leave 4 weights for 8 filters
    assert got["conv2"] == round(0.95 * 1152) and got["fc1"] == round(0.95 * 2048)
    assert got["fc2"] == 320 - 2 * 10  # fan-in 32: 95% would keep 16 weights for 10 units
    exact = zeros("prune{sparsity=0.95,scope=layer,min_per_unit=0}")
    assert exact["conv1"] == round(0.95 * 72) and exact["fc2"] == round(0.95 * 320)


@pytest.mark.parametrize("scope", ["adaptive", "global"])
def test_default_prune_spreads_the_sparsity_across_layers_with_a_floor_per_unit(calib, scope):
    """``prune{sparsity=s}`` zeroes s of all the weights together (``scope=adaptive``, by
    LAMP scores, is the default): the total is exact, no linear/conv layer falls below
    2 weights per output unit, and the adaptive cut does not depend on a layer's scale
    (a conv before a BatchNorm may have any), where the global magnitude cut does."""
    from examples.digits import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(8, 16, 32).eval()
    layers = ("conv1", "conv2", "fc1", "fc2")

    def zeros(m, text):
        gm = torch.fx.symbolic_trace(copy.deepcopy(m))  # the pass writes the traced weights
        fxpress.Pipeline.parse(text).passes[0].run(gm, fxpress.PassContext(example_inputs=calib[0]))
        return {n: int((getattr(gm, n).weight == 0).sum()) for n in layers}

    text = "prune{sparsity=0.9}" if scope == "adaptive" else "prune{sparsity=0.9,scope=global}"
    got = zeros(model, text)
    sizes = {n: getattr(model, n).weight.numel() for n in layers}
    assert sum(got.values()) == round(0.9 * sum(sizes.values()))
    for n in layers:
        rows = getattr(model, n).weight.shape[0]
        assert sizes[n] - got[n] >= 2 * rows, n
    assert len({round(got[n] / sizes[n], 2) for n in layers}) > 1  # not one sparsity for all
    scaled = DigitsCNN(8, 16, 32).eval()
    scaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        scaled.conv2.weight.mul_(0.01)
    moved = zeros(scaled, text)
    if scope == "adaptive":
        assert moved == got
    else:  # the scaled layer goes to its floor
        assert moved["conv2"] == sizes["conv2"] - 2 * 16 and moved != got


def test_a_run_still_improving_when_its_epochs_end_restarts_at_half_the_rate(one_thread,
                                                                              monkeypatch):
    from fxpress.passes import distill_train
    from fxpress.passes.distill_train import TrainConfig

    teacher = trained_mlp(hidden=(32,), epochs=20)
    config = TrainConfig(epochs=2, lr=0.05, holdout=0.25, patience=1, restarts=2, progress=False)

    def fit(config: TrainConfig):
        torch.manual_seed(3)
        return fxpress.Distiller(teacher, DigitsMLP(hidden=(8,))).fit(train_data()[:8], config=config)

    # a student trained from scratch for 2 epochs is far from the original (>= 2 points on
    # the held-out batches) after a cycle that gained: a restart at the same peak rate over
    # FAR_STRETCH (4) times the epochs, twice
    h = fit(config)
    assert h.restarts == h.far_restarts == [2, 10] and len(h) == 18 and not h.stopped_early
    lrs = [e["lr"] for e in h.epochs]  # each epoch's rate at its start
    assert lrs[0] == lrs[2] == lrs[10] == 0.05 and lrs[1] == pytest.approx(0.025)
    assert lrs[3] < 0.05 and lrs[9] < 0.05 * 0.05  # one cosine over the 8 epochs
    vals = [e["val_loss"] for e in h.epochs]
    assert h.best_epoch == 1 + vals.index(min(vals))
    assert 0 <= h.teacher_val_accuracy <= 1
    # not counted far: only the tail still falling earns a restart, at half the rate
    monkeypatch.setattr(distill_train, "FAR_POINTS", 101.0)
    h = fit(config)
    assert h.restarts == [2, 4] and h.far_restarts == [] and len(h) == 6 and not h.stopped_early
    lrs = [e["lr"] for e in h.epochs]  # 0.05, 0.025, 0.0125
    assert lrs[0] == pytest.approx(2 * lrs[2]) == pytest.approx(4 * lrs[4])
    # the same run without restarts stops after its 2 epochs
    assert len(fit(dataclasses.replace(config, restarts=0))) == 2


def test_a_recovery_likely_to_miss_and_an_unreachable_sparsity_are_pointed_out(calib, one_thread):
    # 98% of a 32-wide MLP is below its floor of 2 weights per unit (96.5%), and 1 epoch
    # at a small rate recovers little: both records say so, and nothing is reordered
    with pytest.warns(PlanMissedWarning, match="more than 1 point below the original") as caught:
        res = fxpress.compress(trained_mlp(hidden=(32,), epochs=20),
                               "prune{sparsity=0.98},distill{epochs=1,lr=0.001,holdout=0.2}",
                               calibration=calib, train_data=train_data()[:10], policy="warn",
                               progress=False)
    prune, distill = res.records
    # the last recovery step ends far below: a warning and a note, never silent (issue 18)
    missed = [w.message for w in caught if isinstance(w.message, PlanMissedWarning)]
    assert missed[0].missed["accuracy_points"] > 1 and "#2 distill" in str(missed[0])
    assert "more than 1 point below the original" in distill.message
    assert prune.stats["sparsity"] < 0.97 and "of the 0.98 asked" in prune.message
    assert "min_per_unit=2" in prune.message
    assert "likely short of the original" in distill.message
    assert "'prune{sparsity=0.98,steps=3}'" in distill.message and "deep-compression" in distill.message


def test_mixup_matches_the_teacher_on_blends_of_float_inputs_only(one_thread):
    teacher = trained_mlp(hidden=(32,), epochs=20)
    torch.manual_seed(3)
    d = fxpress.Distiller(teacher, DigitsMLP(hidden=(8,)), mixup=1.0)
    h = d.fit(train_data()[:4], epochs=1, lr=1e-2, progress=False)
    assert h[0]["mixup"] > 0  # the term on blended inputs was trained
    emb = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 3))
    tokens = [(torch.randint(0, 10, (8, 3)), torch.randint(0, 3, (8,))) for _ in range(2)]
    d = fxpress.Distiller(emb, copy.deepcopy(emb), mixup=1.0)
    assert "mixup" not in d.fit(tokens, epochs=1, progress=False)[0]  # token ids are not blended
    with pytest.raises(fxpress.errors.InputError, match="mixup"):
        fxpress.Distiller(teacher, DigitsMLP(hidden=(8,)), mixup=-1.0)


def test_training_that_only_moves_a_student_away_keeps_the_starting_weights(one_thread):
    # a student equal to its teacher (a compression that lost nothing, or none): its loss
    # is about zero, yet Adam moves every weight by about the rate per step; the kept state
    # must not be worse on the held-out batches than the one training started from
    teacher = trained_mlp(hidden=(32,), epochs=20)
    student = copy.deepcopy(teacher)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    h = fxpress.Distiller(teacher, student).fit(train_data()[:12], epochs=3, lr=0.05,
                                                holdout=0.25, progress=False)
    assert h.start_val_loss is not None and h.best_epoch == 0
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())
    assert len(h.epochs) >= 1  # it did train, and gave the training back
    # two batches, none to hold out: the start and the end compared on the batches trained on
    h = fxpress.Distiller(teacher, student).fit(train_data()[:2], epochs=2, lr=0.05,
                                                progress=False)
    assert h.holdout_batches == 0 and h.best_epoch == 0
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())


def test_prune_ranks_weights_by_their_inputs_on_the_calibration_batches():
    # a weight on an input that is always zero adds nothing to its output, however large:
    # criterion=activation takes it first; by magnitude (the default) it stays
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, 0.3, 0.2, 0.1]] * 3))
    x = torch.rand(16, 4) + 0.5
    x[:, 0] = 0  # a border pixel, a dead unit
    calibration = [(x[:8],), (x[8:],)]

    def kept(text, **data):
        res = fxpress.compress(copy.deepcopy(model), text, policy="warn", progress=False, **data)
        w = next(m.weight for m in res.module.modules() if isinstance(m, torch.nn.Linear))
        return (w != 0).sum(0).tolist(), res.records[0].stats

    for scope in ("adaptive", "layer", "global"):
        cols, stats = kept(f"prune{{sparsity=0.5,scope={scope},min_per_unit=0,"
                           "criterion=activation}", calibration=calibration)
        assert cols == [0, 3, 3, 0] and stats["criterion"] == "activation", scope
        assert stats["activation_ranked"] == ["0.weight"]
        cols, stats = kept(f"prune{{sparsity=0.5,scope={scope},min_per_unit=0}}",
                           calibration=calibration)
        assert cols == [3, 3, 0, 0] and stats["criterion"] == "magnitude", scope
    # asked for activation without calibration batches: a typed error naming the fix
    with pytest.raises(fxpress.errors.MissingDataError, match="calibration"):
        fxpress.compress(copy.deepcopy(model), "prune{sparsity=0.5,criterion=activation}",
                         example_inputs=(x[:2],), progress=False)
    with pytest.raises(fxpress.errors.OptionError, match="criterion"):
        fxpress.Pipeline.parse("prune{threshold=0.1,criterion=activation}")


def test_prune_floor_unit_keeps_inputs_for_every_output_unit():
    # one unit's weights are all ten times smaller than the others': a cut by rank
    # (floor="layer") leaves it no input, only its bias; floor="unit" keeps its two largest
    # and takes the count from the others, and a unit with no weight at all stays empty
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.mul_(10)
        model[0].weight[0] /= 10
        model[0].weight[1] = 0  # dead anyway
    x = [(torch.randn(8, 16),)]

    def rows(text):
        res = fxpress.compress(copy.deepcopy(model), text, calibration=x, policy="warn",
                               progress=False)
        w = res.module.get_parameter("0.weight")
        return (w != 0).sum(1).tolist(), int((w == 0).sum()), res

    for scope in ("adaptive", "layer", "global"):
        kept, _, _ = rows(f"prune{{sparsity=0.8,scope={scope}}}")
        assert kept[0] == 0 and kept[1] == 0, scope
        kept, zeros, res = rows(f"prune{{sparsity=0.8,scope={scope},floor=unit}}")
        assert kept[0] == 2 and kept[1] == 0 and min(kept[2:]) >= 2, scope
        # the unit keeps its own two largest weights, unchanged
        w, orig = res.module.get_parameter("0.weight")[0], model[0].weight[0]
        assert torch.equal(w[w != 0].sort().values,
                           orig[orig.abs().topk(2).indices].sort().values)
        if scope == "layer":
            assert zeros == round(0.8 * 128)  # the layer's count is still exact
    with pytest.raises(fxpress.errors.OptionError, match="floor"):
        fxpress.Pipeline.parse("prune{sparsity=0.5,floor=row}")


def test_a_recovery_on_too_few_batches_to_hold_out_trains_a_budget_of_steps(calib, one_thread):
    # two batches: nothing held out, so no early stopping; 30 epochs would be 60 steps, and
    # the default recovery takes at least 300 (and says so) instead
    res = fxpress.compress(trained_mlp(hidden=(32,), epochs=20),
                           "prune{sparsity=0.9,steps=1},distill",
                           calibration=calib, train_data=train_data()[:2], policy="warn",
                           progress=False)
    distill = res.records[-1]
    assert distill.stats["held_out_nothing"] == {"batches": 2, "epochs": 150}
    assert len(distill.stats["epochs"]) == 150 and distill.stats["holdout_batches"] == 0
    assert "held out nothing: 2 training batch(es)" in distill.message
    # enough batches to hold some out: early stopping, the 30-epoch budget, no note
    res = fxpress.compress(trained_mlp(hidden=(32,), epochs=20),
                           "prune{sparsity=0.9,steps=1},distill",
                           calibration=calib, train_data=train_data()[:4], policy="warn",
                           progress=False)
    assert "held_out_nothing" not in res.records[-1].stats
    assert res.records[-1].stats["holdout_batches"] == 1
    assert "held out nothing" not in (res.records[-1].message or "")


def test_the_last_recovery_warns_past_one_held_out_point_and_only_then():
    # what the record says decides: 1.0 point below is the promise kept, 1.6 is not
    from types import SimpleNamespace

    from fxpress.passes.gradual import missed_promise

    def record(got, status="ok"):
        return SimpleNamespace(name="distill", status=status, message="", stats={
            "teacher_val_accuracy": 0.99, "best_epoch": 2, "holdout_batches": 2,
            "epochs": [{"val_accuracy": 0.5}, {"val_accuracy": got}]})

    for kept in (record(0.98), record(0.97, "rolled back")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            missed_promise(kept, 3)
        assert kept.message == ""
    far = record(0.974)
    with pytest.warns(PlanMissedWarning, match=r"#3 distill\) kept epoch 2, which scored 0.974") as w:
        missed_promise(far, 3)
    assert w[0].message.missed == {"accuracy_points": 1.6} and "1.6 points" in far.message


def test_deep_compression_prune_does_not_starve_a_layer_of_small_weights(one_thread):
    """The recipe's prune ranks weights within their layer (LAMP), not by plain magnitude
    across layers: a hidden layer with a wide input (here 512, as a CNN's flattened
    features) has small weights by initialisation, and global magnitudes cut it to its
    floor of ``min_per_unit`` (2) weights per unit at the recipe's second stage (round 23:
    CNN 24-48-96 and a 1-D CNN, their fc1 at 2 of 192 and of 128 inputs per unit)."""
    from fxpress.passes.recipes import RECIPES, parse_spec

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    prune = next(p for p in parse_spec("deep-compression") if p.name == "prune")
    options = {k: v for k, v in prune.options.items() if k != "steps"}
    # the recipe's second stage (Zhu & Gupta's cubic schedule towards its sparsity), one cut
    options["sparsity"] = round(options["sparsity"] * (1 - (1 - 2 / 3) ** 3), 4)
    text = "prune{" + ",".join(f"{k}={v}" for k, v in options.items()) + "}"
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    res = fxpress.compress(model, text, calibration=[(x,)], policy="warn", progress=False)
    wide = res.module.get_parameter("4.weight")
    per_unit = (wide != 0).sum(1).float().mean().item()
    assert per_unit > 4, (RECIPES["deep-compression"], per_unit)  # the floor is 2
