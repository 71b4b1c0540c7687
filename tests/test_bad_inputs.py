"""The bad-input matrix: every case gives a typed error from fxpress.errors whose message
names the culprit and the fix, and the caller's model is bit-identical afterwards."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import fxpress
from fxpress import errors as E
from fxpress.passes.base import Pass, PassResult, Tolerance
from fxpress.graph.weights import weighted_ops
from fxpress.passes.spec import parse_recipe
from tests.helpers import assert_unchanged, state_snapshot


@dataclass
class Case:
    id: str
    run: Callable[[torch.nn.Module, list], Any]   # (model, calibration) -> anything; must raise
    error: type
    says: tuple[str, ...]                          # fragments the message must contain


class _Raises(Pass):
    name = "plugin-raises"

    def run(self, gm, ctx):
        raise ValueError("weights look odd")


class _WrongType(Pass):
    name = "returns-dict"

    def run(self, gm, ctx):
        return {"module": gm}


class _Lint(Pass):
    name = "bad-lint"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        first = next(iter(gm.graph.nodes))
        with gm.graph.inserting_before(first):
            gm.graph.call_function(torch.neg, (out.args[0],))
        return PassResult(gm, True, {})


class _NaN(Pass):
    name = "makes-inf"
    replaces_tensors = True
    tolerance = Tolerance(min_cosine=0.0)

    def run(self, gm, ctx):
        op = weighted_ops(gm)[0]
        op.set_weight(torch.full_like(op.weight(), float("inf")))
        return PassResult(gm, True, {})


class _NeedsCalib(Pass):
    name = "needs-calib"
    needs = ("calibration",)

    def run(self, gm, ctx):
        return PassResult(gm, False, {})


class _NeedsTrain(Pass):
    name = "needs-train"
    needs = ("train_data",)

    def run(self, gm, ctx):
        return PassResult(gm, False, {})


class _Lossy(Pass):
    name = "lossy"
    replaces_tensors = True

    def run(self, gm, ctx):
        op = weighted_ops(gm)[0]
        op.set_weight(op.weight() * 1.5)
        return PassResult(gm, True, {})


class _Untraceable(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x.numpy().sum()
        return x


def _compress(text_or_passes, **kw):
    def run(model, calib):
        kw.setdefault("calibration", calib)
        return fxpress.compress(model, text_or_passes, **kw)
    return run


def _example(x):
    return lambda model, calib: fxpress.compress(model, "prune{sparsity=0.5}", example_inputs=x)


CASES = [
    Case("not-a-module", lambda m, c: fxpress.compress(lambda x: x, "prune{sparsity=0.5}",
                                                       calibration=c), E.InputError, ("nn.Module",)),
    Case("capture-not-a-module", lambda m, c: fxpress.capture("model.pt", c[0]), E.InputError,
         ("nn.Module", "str")),
    Case("inputs-wrong-shape", _example((torch.ones(4, 7),)), E.InputError,
         ("does not run on the example inputs", "[(4, 7)]", "shaped like real model inputs")),
    Case("inputs-wrong-type", _example({"x": torch.ones(4, 64)}), E.InputError, ("tuple", "dict")),
    Case("calibration-single-tensor", lambda m, c: fxpress.compress(
        m, "prune{sparsity=0.5}", calibration=torch.ones(4, 64)), E.InputError,
        ("iterable of input tuples",)),
    Case("no-inputs-at-all", lambda m, c: fxpress.compress(m, "prune{sparsity=0.5}"), E.InputError,
         ("example_inputs",)),
    Case("untraceable", lambda m, c: fxpress.capture(_Untraceable(), (torch.ones(2, 3),)),
         E.CaptureError, ("fx:", "export:", "concrete_args", "leaf_modules")),
    Case("unknown-pass", _compress("prune{sparsity=0.5},prnue"), E.UnknownPassError,
         ("unknown pass 'prnue'", "did you mean 'prune'", "fxpress passes")),
    Case("sparsity-1.5", _compress("prune{sparsity=1.5}"), E.OptionError,
         ("prune", "'sparsity'", "1.5")),
    Case("sparsity-negative", _compress("prune{sparsity=-0.1}"), E.OptionError,
         ("prune", "'sparsity'", "-0.1")),
    Case("sparsity-wrong-type", _compress('prune{sparsity="half"}'), E.OptionError,
         ("'sparsity'", "expected float")),
    Case("scope-wrong-choice", _compress("prune{sparsity=0.5,scope=global2}"), E.OptionError,
         ("'scope'", "one of", "did you mean 'global'")),
    Case("unknown-option", _compress("prune{sparsity=0.5,amount=3}"), E.OptionError,
         ("'amount'", "unknown option", "known:")),
    Case("unknown-tolerance", _compress("prune{sparsity=0.5,tol.cosine=0.9}"), E.OptionError,
         ("tol.cosine", "did you mean 'tol.min_cosine'")),
    Case("glob-matches-nothing", _compress("prune{sparsity=0.5,include=[encoder.*]}"), E.OptionError,
         ("encoder.*", "match no weighted op", "layers.0.weight")),
    Case("pipeline-syntax", _compress("prune{sparsity=0.5"), E.PipelineSpecError,
         ("at character 18", "expected '}'", "^")),
    Case("pipeline-empty", _compress("  "), E.PipelineSpecError, ("empty pipeline",)),
    Case("toml-syntax", lambda m, c: parse_recipe('pipeline = "prune"\npolicy = strict\n'),
         E.PipelineSpecError, ("invalid TOML", "at character")),
    Case("toml-unknown-key", lambda m, c: parse_recipe('pipeline = "prune"\npolicyy = "warn"\n'),
         E.PipelineSpecError, ("unknown key", "policyy")),
    Case("bad-policy", _compress("prune{sparsity=0.5}", policy="lenient"), E.InputError,
         ("policy", "strict", "lenient")),
    Case("not-a-pass", _compress([object()]), E.InputError, ("Pass instances", "object")),
    Case("plugin-pass-raises", _compress([_Raises()]), E.PassError,
         ("plugin-raises", "ValueError", "weights look odd")),
    Case("wrong-return-type", _compress([_WrongType()]), E.PassError,
         ("returns-dict", "returned dict", "PassResult")),
    Case("fails-lint", _compress([_Lint()]), E.PassError, ("bad-lint", "fails lint")),
    Case("nan-inf", _compress([_NaN()]), E.VerificationError, ("makes-inf", "NaN/Inf")),
    Case("miss-strict", _compress([_Lossy()]), E.VerificationError,
         ("lossy", "max_rel_l2", "limit 1e-05", "tol.max_rel_l2", "rollback")),
    Case("needs-calibration", _compress([_NeedsCalib()], calibration=None,
                                        example_inputs=(torch.ones(4, 64),)), E.MissingDataError,
         ("needs-calib", "calibration", "calibration=[(x,), ...]")),
    Case("needs-train-data", _compress([_NeedsTrain()]), E.MissingDataError,
         ("needs-train", "train data", "train_data=")),
]


@pytest.fixture(scope="module")
def model():
    from examples.digits import trained_mlp

    return trained_mlp(hidden=(32,), epochs=3)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, model):
    from examples.digits import calibration

    snap = state_snapshot(model)
    with pytest.raises(case.error) as e:
        case.run(model, calibration(batches=1, batch_size=32))
    assert isinstance(e.value, E.FxpressError)
    msg = str(e.value)
    for fragment in case.says:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert_unchanged(model, snap)


@pytest.mark.parametrize("policy, status", [("warn", "warn"), ("rollback", "rolled back")])
def test_verification_miss_under_lenient_policies(model, policy, status):
    from examples.digits import calibration

    snap = state_snapshot(model)
    res = fxpress.compress(model, [_Lossy()], calibration=calibration(1, 32), policy=policy)
    rec = res.records[0]
    assert rec.status == status and "max_rel_l2" in rec.message
    assert_unchanged(model, snap)


def test_plugin_that_fails_to_import_is_reported_by_name(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "fxbad_plugin").mkdir(parents=True)
    (site / "fxbad_plugin" / "__init__.py").write_text("import not_installed_dependency\n")
    info = site / "fxbad_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fxbad-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[fxpress]\nbadplug = fxbad_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    reg = fxpress.plugins.load_registry(entry_points=True)
    (err,) = [e for e in reg.errors if e.plugin == "badplug"]
    assert isinstance(err, E.PluginError) and err.distribution == "fxbad-plugin"
    assert "not_installed_dependency" in str(err) and "prune" in reg


def test_recipe_model_that_is_not_a_module(tmp_path, capsys):
    from fxpress.cli import main

    (tmp_path / "m.py").write_text(textwrap.dedent('''
        import torch
        def build():
            return "not a model"
        def inputs():
            return (torch.ones(2, 3),)
    '''))
    (tmp_path / "r.toml").write_text('model = "m.py:build"\nexample_inputs = "m.py:inputs"\n'
                                     'pipeline = "prune{sparsity=0.5}"\n')
    assert main(["run", str(tmp_path / "r.toml")]) == 2
    assert "not a torch.nn.Module" in capsys.readouterr().err


def test_recipe_reference_to_a_missing_file(tmp_path, capsys):
    from fxpress.cli import main

    (tmp_path / "r.toml").write_text('model = "nowhere.py:build"\npipeline = "prune{sparsity=0.5}"\n')
    assert main(["run", str(tmp_path / "r.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
