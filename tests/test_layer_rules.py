"""Per-layer options (``layers={pattern={option=value}}``) in pipeline text and TOML: parsed
and validated at parse time, later rules win, bad rules are typed errors naming the rule."""
from __future__ import annotations

import pytest
import torch

import fxpress
from examples.digits import calibration, trained_mlp
from fxpress.errors import OptionError, PipelineSpecError
from fxpress.graph.inspect import layers as layer_rows
from fxpress.passes.planner import plan_passes, pipeline_text, recipe_toml

TEXT = ('quantize{bits=4,scheme=affine,layers={"layers.*"={bits=8,scheme=symmetric},'
        '"re:layers\\\\.1|head"={bits=3,scheme=affine}}}')


@pytest.fixture(scope="module")
def model():
    return trained_mlp(hidden=(48, 24), epochs=20, seed=3)


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_text_round_trips_and_later_rules_win(model):
    pipe = fxpress.Pipeline.parse(TEXT)
    assert fxpress.Pipeline.parse(str(pipe)).passes[0].layer_rules == pipe.passes[0].layer_rules
    res = fxpress.compress(model, TEXT, calibration=calibration(1), policy="warn")
    stats = res.records[0].stats
    bits = {k: v["bits"] for k, v in stats["layers"].items()}
    # layers.0: the glob; layers.1: the glob, then the regex (later wins); head: the regex
    assert bits == {"layers.0.weight": 8, "layers.1.weight": 3, "head.weight": 3}
    assert stats["layer_rules"]["layers.1"] == {"bits": 3, "scheme": "affine"}
    # inspect and the report read the modules: their bits are the per-layer choices
    rows = {r.name: r for r in layer_rows(res.module)}
    assert rows["layers.0"].bits > rows["layers.1"].bits
    assert "layers=" in res.report()


def test_toml_tables_give_the_same_model(model):
    toml = """
policy = "warn"
[[pass]]
name = "quantize"
bits = 4
scheme = "affine"
[pass.layers."layers.*"]
bits = 8
scheme = "symmetric"
[pass.layers.'re:layers\\.1|head']
bits = 3
scheme = "affine"
"""
    a = fxpress.Pipeline.from_recipe(toml).run(model, calibration=calibration(1))
    b = fxpress.compress(model, TEXT, calibration=calibration(1), policy="warn")
    assert _same_state(a.module, b.module)


def test_layers_not_touched_by_a_rule_get_the_pass_options(model):
    res = fxpress.compress(model, 'quantize{bits=4,scheme=affine,layers={head={bits=8,scheme=symmetric}}}',
                           calibration=calibration(1), policy="warn")
    bits = {k: v["bits"] for k, v in res.records[0].stats["layers"].items()}
    assert bits == {"layers.0.weight": 4, "layers.1.weight": 4, "head.weight": 8}


@pytest.mark.parametrize("text, option, match", [
    ('quantize{layers={"x*"={bitz=8}}}', "layers['x*'].bitz", "did you mean 'bits'"),
    ('quantize{layers={"head"={bits=9}}}', "layers['head'].bits", "2 <= bits <= 8"),
    ('quantize{layers={"re:(("={bits=8}}}', "layers['re:((']", "bad regular expression"),
    ('quantize{layers={head={include=[x]}}}', "layers['head'].include", "cannot be set per layer"),
    ('quantize{layers={head={tol.min_cosine=0}}}', "layers['head'].tol.min_cosine", "per layer"),
    ('quantize{layers={head={granularity=group}}}', "layers['head'].group_size", "needs group_size"),
    ('quantize{layers=[head]}', "layers", "expected a table"),
    ('quantize{layers={head=8}}', "layers['head']", "expected a table of options"),
    ('prune{sparsity=0.5,layers={head={threshold=0.1}}}', "layers['head'].sparsity", "exactly one"),
])
def test_bad_rules_are_typed_errors_naming_the_rule(text, option, match):
    with pytest.raises(OptionError, match=match) as e:
        fxpress.Pipeline.parse(text)
    assert e.value.option == option and option in str(e.value)


def test_bad_rules_in_toml_name_the_rule():
    with pytest.raises(OptionError, match=r"layers\['head'\].bits"):
        fxpress.Pipeline.from_recipe('[[pass]]\nname = "quantize"\n[pass.layers.head]\nbits = 1\n')


def test_rule_matching_no_layer_is_an_error_naming_it(model):
    with pytest.raises(OptionError, match=r"layers\['encoder\.\*'\].*matches no weighted op.*head"):
        fxpress.compress(model, 'quantize{layers={"encoder.*"={bits=4}}}', calibration=calibration(1))


def test_misspelt_rule_and_include_globs_get_a_did_you_mean(model):
    """A misspelt layer name in a rule or include glob was answered with the first eight
    names only ("*.classifer" on a BERT classifier, whose classifier is top level)."""
    calib = calibration(1)
    with pytest.raises(OptionError, match=r"layers\['\*\.haed'\].*matches no weighted op \(did you mean 'head'\?\)"):
        fxpress.compress(model, 'quantize{layers={"*.haed"={bits=4}}}', calibration=calib)
    with pytest.raises(OptionError, match=r"match no weighted op \(did you mean 'layers\.\*'\?\)"):
        fxpress.compress(model, "quantize{include=[layer.*]}", calibration=calib)
    with pytest.raises(OptionError) as e:  # nothing close: no guess
        fxpress.compress(model, 'quantize{layers={"encoder.*"={bits=4}}}', calibration=calib)
    assert "did you mean" not in str(e.value)


def test_syntax_errors_show_the_position():
    with pytest.raises(PipelineSpecError, match="at character"):
        fxpress.Pipeline.parse('quantize{layers={head={bits=8}}')
    with pytest.raises(PipelineSpecError, match="given twice"):
        fxpress.Pipeline.parse('quantize{layers={head={bits=8},head={bits=4}}}')


def test_a_plan_with_rules_reproduces_from_its_recipe(model):
    """Choices that differ per layer become one pass per technique with rules; the TOML
    recipe (tables, or pipeline text when an option must be reset to none) rebuilds the
    same model bit for bit."""
    reg = fxpress.registry()
    choices = {"layers.0": "quantize{bits=4,granularity=group,group_size=32,scheme=affine}",
               "layers.1": "quantize{bits=4,granularity=group,group_size=8,scheme=affine}",
               "head": "quantize{bits=8}"}
    passes = plan_passes(choices, None, reg)
    assert [n for n, _ in passes] == ["quantize"] and "layers" in passes[0][1]
    text = pipeline_text(passes)
    toml = recipe_toml(passes, policy="warn", seed=0, entropy=False)
    assert "pipeline = '''" in toml  # head resets group_size to none
    a = fxpress.compress(model, text, calibration=calibration(1), policy="warn")
    b = fxpress.Pipeline.from_recipe(toml).run(model, calibration=calibration(1))
    assert _same_state(a.module, b.module)
    got = {k: (v["bits"], v["granularity"]) for k, v in a.records[0].stats["layers"].items()}
    assert got == {"layers.0.weight": (4, "group"), "layers.1.weight": (4, "group"),
                   "head.weight": (8, "channel")}
    # without a reset the recipe is [[pass]] tables with a table per rule
    passes = plan_passes({"layers.0": "share{bits=4}", "layers.1": "share{bits=4}",
                          "head": "share{bits=6,bias_bits=8}"}, None, reg)
    toml = recipe_toml(passes, policy="warn", seed=0, entropy=False)
    assert '[pass.layers."head"]' in toml and "bias_bits = 8" in toml
    a = fxpress.compress(model, pipeline_text(passes), calibration=calibration(1), policy="warn")
    b = fxpress.Pipeline.from_recipe(toml).run(model, calibration=calibration(1))
    assert _same_state(a.module, b.module)
