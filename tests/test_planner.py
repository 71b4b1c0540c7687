"""The planner's contract: it meets the size target or says by how much it missed (never
silently over the budget), and the recipe it returns reproduces the model bit for bit."""
from __future__ import annotations

import itertools
import random
import warnings

import pytest
import torch

import fxpress
from examples.digits import accuracy, calibration, digits_data, train_data, trained_mlp
from fxpress.errors import FxpressError, InputError
from fxpress.graph.artifact import artifact_size
from fxpress.passes.planner import (PlanMissedWarning, allocate, compress_to_target, parse_target,
                                    plan_passes)
from fxpress.passes.sensitivity import (KEEP, LayerSensitivity, SensitivityTable, Trial,
                                        sensitivity)
from tests.helpers import assert_unchanged, state_snapshot

# a few candidates keep the analysis quick; the defaults are exercised by bench/case_planner.py
CANDIDATES = ["quantize{bits=8}", "quantize{bits=4,scheme=affine}", "share{bits=2,bias_bits=8}",
              "share{bits=4,bias_bits=8}", "binarize{mode=ternary,keep_first_last=false}"]


def _state_bytes(gm: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b""
            for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def model():
    return trained_mlp(hidden=(48, 24), epochs=20, seed=3)


@pytest.fixture(scope="module")
def table(model):
    return sensitivity(model, fxpress.registry(), calibration=calibration(2), candidates=CANDIDATES)


def _val(m):
    d = digits_data()
    return accuracy(m, d.x_test[:200], d.y_test[:200])


def test_meets_target_and_recipe_reproduces_bit_for_bit(model, table, tmp_path):
    snap = state_snapshot(model)
    res = compress_to_target(model, fxpress.registry(), calibration=calibration(2),
                             target=0.2, table=table)
    plan = res.plan
    assert plan.met and not plan.missed
    size = artifact_size(res.module)
    assert size == plan.file_bytes <= plan.target_bytes == int(0.2 * table.original_file_bytes)
    assert plan.ratio <= 0.2
    # layers got different choices: a uniform setting would not be a plan
    assert len({t.candidate for t in plan.choices.values()}) >= 2
    assert_unchanged(model, snap)
    # the recipe alone, run again on the caller's model with the same data
    again = fxpress.Pipeline.from_recipe(plan.toml).run(model, calibration=calibration(2))
    assert _state_bytes(again.module) == _state_bytes(res.module)
    assert again.module.code == res.module.code
    # the header records the capture's seconds: the file may differ in a digit or two
    assert abs(artifact_size(again.module) - size) <= 8
    # the table and the text say the same thing
    text = plan.format()
    assert all(name in text for name in plan.choices) and "met" in text
    # the report shows the plan: choices, sensitivity table, predicted frontier
    from fxpress.cli import main

    fxpress.save(res, tmp_path / "m.fxp")
    assert main(["report", str(tmp_path / "m.fxp"), "-o", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "Plan: per-layer choices" in html and 'id="frontier"' in html
    assert all(f"<code>{name}</code>" in html for name in plan.choices)
    front = plan.as_dict()["frontier"]
    # the planner's predicted error at each uniform setting's size is never worse
    assert len(front["uniform"]) == len(front["planner"]) == len(CANDIDATES)
    for u, p in zip(front["uniform"], front["planner"]):
        assert p["at"] == u["setting"] and p["bytes"] <= u["bytes"]
        assert p["predicted_error"] <= u["predicted_error"] + 1e-12


def test_says_by_how_much_it_missed(model, table):
    # a budget nothing at this size can meet: the result is within the target, and the miss
    # of the accuracy budget is a typed warning and a field, never silent
    with pytest.warns(PlanMissedWarning) as caught:
        res = compress_to_target(model, fxpress.registry(), calibration=calibration(2),
                                 target=0.15, max_drop=0.0, metric="rel_l2", table=table,
                                 max_rounds=2)
    plan = res.plan
    assert not plan.met
    assert plan.missed["drop"] == pytest.approx(plan.drop - 0.0) and plan.drop > 0
    assert caught[0].message.missed == plan.missed
    assert plan.file_bytes <= plan.target_bytes and "bytes" not in plan.missed
    assert len(plan.attempts) == 2  # it backed off once before giving up


def test_budget_only_plans_the_smallest_model_within_it(model, table):
    loose = compress_to_target(model, fxpress.registry(), calibration=calibration(2),
                               max_drop=0.02, evaluate=_val, table=None, candidates=CANDIDATES,
                               max_rounds=3)
    assert loose.plan.drop is not None
    if loose.plan.met:
        assert loose.plan.drop <= 0.02
    else:
        assert loose.plan.missed["drop"] == pytest.approx(loose.plan.drop - 0.02)
    assert loose.plan.ratio < 0.35  # it did compress


def test_target_too_small_is_a_typed_error(model, table):
    with pytest.raises(InputError, match="smallest plan is about"):
        compress_to_target(model, fxpress.registry(), calibration=calibration(2),
                           target="2000x", table=table)


@pytest.mark.parametrize("kwargs, match", [
    ({"target": 2.0}, "fraction of the fp32 size"),
    ({"target": "fortyx"}, "compression factor"),
    ({"target": 0.1, "max_drop": -1}, "max_drop"),
    ({"target": 0.1, "metric": "f1"}, "metric must be one of"),
    ({}, "give target"),
    ({"target": 0.1, "recovery": ("distill{epochs=}", None)}, "expected a value"),
])
def test_bad_arguments_are_typed_errors(model, kwargs, match):
    with pytest.raises(FxpressError, match=match):
        compress_to_target(model, fxpress.registry(), calibration=calibration(1), **kwargs)


def test_parse_target():
    assert parse_target("40x") == 0.025
    assert parse_target(0.16) == parse_target("0.16") == 0.16


def _table(rng: random.Random, layers: int, options: int) -> SensitivityTable:
    out = []
    for i in range(layers):
        keep = rng.randint(300, 900)
        ls = LayerSensitivity(f"l{i}", "linear", keep // 4, keep)
        for k in range(options):
            ls.trials.append(Trial(f"c{k}", rng.randint(20, keep), 0.0, 1.0, 1.0, None,
                                   error=rng.random()))
        out.append(ls)
    return SensitivityTable(out, "cosine", None, 100, 100 + sum(ls.keep_bytes for ls in out))


def test_allocation_is_optimal_and_fits():
    rng = random.Random(0)
    for _ in range(40):
        table = _table(rng, 4, 3)  # under 4000 bytes: the knapsack's unit is one byte, exact
        opts = [ls.options() for ls in table.layers]
        low = sum(min(t.bytes for t in o) for o in opts)
        budget = rng.randint(low, sum(ls.keep_bytes for ls in table.layers))
        best = min(sum(t.error for t in combo) for combo in itertools.product(*opts)
                   if sum(t.bytes for t in combo) <= budget)
        got = allocate(table, budget)
        assert sum(t.bytes for t in got.values()) <= budget
        assert sum(t.error for t in got.values()) == pytest.approx(best)
        # fewest bytes within an error budget
        cap = best + rng.random()
        small = min(sum(t.bytes for t in combo) for combo in itertools.product(*opts)
                    if sum(t.error for t in combo) <= cap)
        got = allocate(table, max_error=cap)
        assert sum(t.error for t in got.values()) <= cap
        assert sum(t.bytes for t in got.values()) <= small + max(1, small // 2000)
    assert allocate(_table(rng, 3, 2), 10) is None  # nothing fits


def test_plan_passes_groups_layers_and_puts_pruning_first():
    passes = plan_passes({"a": "prune{sparsity=0.9},share{bits=4}", "b": "share{bits=4}",
                          "c": KEEP, "d[0]": "quantize{bits=8}"},
                         ("distill{epochs=2}", "distill{epochs=1}"))
    assert [n for n, _ in passes] == ["prune", "distill", "quantize", "share", "distill"]
    assert passes[0][1]["include"] == ["a"]
    assert passes[2][1]["include"] == ["d[[]0]"]  # an exact-name glob
    assert passes[3][1]["include"] == ["a", "b"]


def test_recovery_with_train_data_keeps_accuracy(model, table):
    """With train data, pruning joins the menu and distillation wins accuracy back."""
    d = digits_data()
    res = compress_to_target(model, fxpress.registry(), calibration=calibration(2),
                             train_data=train_data()[:8], target="10x",
                             candidates=CANDIDATES + ["prune{sparsity=0.9},share{bits=4,bias_bits=8}"],
                             recovery=("distill{epochs=2,lr=0.01}", "distill{epochs=1,lr=0.001}"), max_rounds=2)
    plan = res.plan
    assert plan.file_bytes <= plan.target_bytes or \
        plan.missed["bytes"] == plan.file_bytes - plan.target_bytes  # said, never silent
    assert any(r.name == "distill" for r in res.records)
    assert accuracy(res.module, d.x_test, d.y_test) > 0.8



def test_compress_face_dispatches_to_the_planner(model):
    x = calibration(1)[0][0]
    with pytest.raises(InputError, match="either a pipeline or target"):
        fxpress.compress(model, "quantize{bits=8}", target=0.2, calibration=calibration(1))
    with pytest.raises(InputError, match="give a pipeline"):
        fxpress.compress(model, calibration=calibration(1))
    with pytest.raises(InputError, match="smallest plan is about"):  # (x,) is the example input
        fxpress.compress(model, (x,), target="1000x", calibration=calibration(1),
                         candidates=["quantize{bits=8}"])
