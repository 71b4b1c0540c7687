"""budget{ratio=R}: the settings it chooses make the saved file fit fp32 bytes / R."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import OptionError, PlanMissedWarning
from fxpress.passes.budget import LADDER, fp32_bytes

CHAIN = "prune{sparsity=0.9,scope=global},share{bits=4,bias_bits=8},small"


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.LayerNorm(128),
                               torch.nn.Linear(128, 10))


def _run(model, text):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    return fxpress.compress(model, text, calibration=[(x,)], policy="warn", progress=False)


def _resolve(model, text):
    from fxpress.graph.capture import capture
    from fxpress.passes.base import PassContext
    from fxpress.passes.budget import resolve
    from fxpress.passes.pipeline import Pipeline

    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    passes = Pipeline(text).passes
    return passes, resolve(passes, capture(model, (x,), "auto"),
                           PassContext(example_inputs=(x,), progress=False))


def test_the_first_setting_that_fits_is_chosen_and_the_file_fits(mlp, tmp_path):
    fp32 = fp32_bytes(mlp)
    # out of reach (the header alone is over): the chain runs as written, and says so
    with pytest.warns(PlanMissedWarning, match="no setting fits"):
        passes, resolved = _resolve(mlp, f"budget{{ratio=100000}},{CHAIN}")
    choice = passes[0].choice
    assert not choice["met"] and choice["chosen"] == {"sparsity": 0.9}
    assert [str(p) for p in resolved] == [str(p) for p in passes]
    assert len(choice["tried"]) == 2 and len(LADDER) > 2
    as_written = choice["tried"][0]["bytes"]
    ratio = round(fp32 / as_written * 1.3, 1)  # 30% smaller than the chain as written
    res = _run(mlp, f"budget{{ratio={ratio}}},{CHAIN}")
    rec = res.records[0]
    assert rec.name == "budget" and rec.stats["met"] and rec.stats["chosen"]["sparsity"] > 0.9
    size = fxpress.save(res.module, tmp_path / "b.fxp", entropy=True)
    assert size <= rec.stats["budget"] == int(fp32 / ratio)
    # the passes it set show the chosen options in their own records
    prune = next(r for r in res.records if r.name == "prune")
    assert prune.stats["sparsity"] == pytest.approx(rec.stats["chosen"]["sparsity"], abs=1e-3)
    tried = [t["bytes"] for t in rec.stats["tried"]]
    assert rec.stats["bytes"] <= rec.stats["goal"] < max(tried)


def test_a_budget_needs_a_prune_with_a_sparsity_after_it(mlp):
    with pytest.raises(OptionError, match="budget.*prune"):
        _run(mlp, "budget{ratio=40},share{bits=4}")


def _labelled(model):
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(32, 64, generator=g) for _ in range(10)]
    with torch.no_grad():
        return [(x, model(x).argmax(1)) for x in xs]


def _resolve_trained(model, text):
    from fxpress.graph.capture import capture
    from fxpress.passes.base import PassContext
    from fxpress.passes.budget import resolve
    from fxpress.passes.pipeline import Pipeline

    train = _labelled(model)
    passes = Pipeline(text).passes
    resolved = resolve(passes, capture(model, (train[0][0],), "auto"),
                       PassContext(example_inputs=(train[0][0],), train_data=train,
                                   reference=model, progress=False))
    return passes[0].choice, resolved


def test_a_setting_whose_short_recovery_loses_too_much_is_backed_off(mlp, monkeypatch):
    import fxpress.passes.budget as budget

    def sparsity(passes):
        return next(p for p in passes if p.name == "prune").sparsity

    # sizes by sparsity (sizing itself is the test above): 0.9 is 10% over, 0.96 fits
    ratio = round(fp32_bytes(mlp) / 9000, 3)
    monkeypatch.setattr(budget, "_size", lambda gm, passes, ctx: int(1e5 * (1 - sparsity(passes))))
    chain = "prune{sparsity=0.9,scope=global},distill,share{bits=4,bias_bits=8},small"
    # with max_drop=1 nothing is backed off: the fitting setting, each check recorded (a real
    # one-shot compression and a 1-epoch recovery of each, on a copy)
    choice, _ = _resolve_trained(mlp, f"budget{{ratio={ratio},check=1,max_drop=1}},{chain}")
    assert choice["met"] and choice["chosen"] == {"sparsity": 0.96}
    assert not choice["check"]["backed_off"] and 0 <= choice["check"]["as_written"] <= 1
    checked = [t["setting"] for t in choice["tried"] if "check_accuracy" in t]
    assert checked == [{"sparsity": 0.9}, {"sparsity": 0.96}]
    # a setting that loses more than max_drop goes back down the ladder, to the chain as
    # written at worst, and says so (the short recoveries' accuracies forced here)
    monkeypatch.setattr(budget, "_score",
                        lambda gm, passes, epochs, ctx: 1.0 if sparsity(passes) == 0.9 else 0.5)
    with pytest.warns(PlanMissedWarning, match="backed off"):
        choice, resolved = _resolve_trained(mlp, f"budget{{ratio={ratio},check=1}},{chain}")
    assert choice["check"]["backed_off"] and choice["chosen"] == {"sparsity": 0.9}
    assert not choice["met"] and str(resolved[1]) == "prune{sparsity=0.9,scope=global}"
    # check=0: sized only, no short recovery
    choice, _ = _resolve_trained(mlp, f"budget{{ratio={ratio},check=0}},{chain}")
    assert "check" not in choice and choice["chosen"] == {"sparsity": 0.96}
