import pytest

import fxpress
from fxpress.errors import OptionError, PipelineSpecError, UnknownPassError
from fxpress.passes.recipes import format_spec, parse_recipe, parse_spec


@pytest.mark.parametrize("text", [
    "prune{sparsity=0.5}",
    "prune{sparsity=0.5,scope=global},prune{threshold=0.01}",
    'prune{threshold=0.001,include=[layers.*,"a,b"],exclude=[]}',
    "prune{sparsity=0.9,tol.min_top1=0.5,tol.against=reference}",
    "prune",
])
def test_canonical_text_prints_back_identically(text):
    assert format_spec(parse_spec(text)) == text


def test_values_parse_to_python_types():
    (p,) = parse_spec('x{a=1, b=-2.5e-3, c=true, d=none, e="q,\\"x", f=[1, two], g=enc.*.out}')
    assert p.options == {"a": 1, "b": -2.5e-3, "c": True, "d": None, "e": 'q,"x',
                         "f": [1, "two"], "g": "enc.*.out"}


@pytest.mark.parametrize("text, pos, what", [
    ("prune{sparsity=0.5", 18, "expected '}'"),
    ("prune{sparsity}", 14, "expected '='"),
    ("prune{=1}", 6, "option name"),
    ("prune,,quantize", 6, "pass name"),
    ("", 0, "empty pipeline"),
    ('prune{a="x}', 8, "unterminated"),
    ("prune{a=1,a=2}", 10, "given twice"),
])
def test_syntax_errors_give_the_position(text, pos, what):
    with pytest.raises(PipelineSpecError) as e:
        parse_spec(text)
    assert e.value.position == pos
    assert what in str(e.value)
    assert "^" in str(e.value)


def test_unknown_pass_suggests_the_closest_name():
    with pytest.raises(UnknownPassError) as e:
        fxpress.Pipeline.parse("prune{sparsity=0.5},prnue{sparsity=0.5}")
    assert "did you mean 'prune'" in str(e.value)
    assert e.value.position == 20


@pytest.mark.parametrize("text, option, fragment", [
    ("prune{sparsity=1.5}", "sparsity", "<"),
    ("prune{sparsity=-0.1}", "sparsity", "<="),
    ("prune{sparsity=high}", "sparsity", "expected float"),
    ("prune{sparsity=0.5,scope=globl}", "scope", "did you mean 'global'"),
    ("prune{sparsty=0.5}", "sparsty", "did you mean 'sparsity'"),
    ("prune{sparsity=0.5,threshold=0.1}", "sparsity", "exactly one"),
    ("prune{sparsity=0.5,tol.min_cosin=0.9}", "tol.min_cosin", "did you mean 'tol.min_cosine'"),
    ("prune{sparsity=0.5,tol.min_cosine=yes}", "tol.min_cosine", "expected a number"),
    ("prune{sparsity=0.5,ops=[linear,lstm]}", "ops", "unknown op kind"),
    ("prune{sparsity=true}", "sparsity", "expected float"),
])
def test_bad_options_name_the_pass_and_the_option(text, option, fragment):
    with pytest.raises(OptionError) as e:
        fxpress.Pipeline.parse(text)
    assert e.value.pass_name == "prune" and e.value.option == option
    assert fragment in str(e.value)


def test_pipeline_prints_back_its_text():
    text = "prune{sparsity=0.5,scope=global},prune{threshold=0.01,tol.min_cosine=0.5}"
    assert str(fxpress.Pipeline.parse(text)) == text


def test_toml_recipe_with_pass_tables(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('model = "m.py:build"\npolicy = "warn"\n\n[[pass]]\nname = "prune"\n'
                 'sparsity = 0.5\ntol.min_top1 = 0.8\n\n[[pass]]\nname = "prune"\nthreshold = 0.01\n')
    r = parse_recipe(f)
    assert r.policy == "warn" and r.model == "m.py:build"
    assert format_spec(r.passes) == "prune{sparsity=0.5,tol.min_top1=0.8},prune{threshold=0.01}"
    pipe = fxpress.Pipeline.from_recipe(f)
    assert pipe.policy == "warn" and pipe.passes[0].tol.min_top1 == 0.8


def test_toml_recipe_with_pipeline_text_is_the_same_spec():
    a = parse_recipe('pipeline = "prune{sparsity=0.5,tol.min_top1=0.8}"\n')
    b = parse_recipe('[[pass]]\nname = "prune"\nsparsity = 0.5\n[pass.tol]\nmin_top1 = 0.8\n')
    assert a.passes == b.passes


@pytest.mark.parametrize("text, fragment", [
    ('pipeline = "prune"\nmodel = \n', "invalid TOML"),
    ('[[pass]]\nsparsity = 0.5\n', "has no name"),
    ('pipeline = "prune"\n[[pass]]\nname="prune"\nsparsity=0.5\nthreshold=0.1\n', "exactly one"),
    ('pipeline = "prune"\nmodle = "x.py:m"\n', "unknown key"),
])
def test_bad_recipes_are_spec_errors(text, fragment):
    with pytest.raises(PipelineSpecError, match=fragment):
        parse_recipe(text)


def test_recipe_typos_get_a_did_you_mean(tmp_path):
    """A misspelt recipe key or callable was named with every key (or nothing) to pick from;
    the pass and option errors already said "did you mean"."""
    with pytest.raises(PipelineSpecError, match=r"did you mean 'calibraton' -> 'calibration'"):
        parse_recipe('pipeline = "prune"\ncalibraton = "x.py:c"\n')
    from fxpress.passes.recipes import load_reference

    (tmp_path / "mymodels.py").write_text("def model():\n    return None\n")
    with pytest.raises(PipelineSpecError, match=r"has no attribute 'modle'; did you mean 'model'\?"):
        load_reference("mymodels.py:modle", tmp_path, "model")
    with pytest.raises(PipelineSpecError) as e:  # nothing close: no hint
        load_reference("mymodels.py:zzz", tmp_path, "model")
    assert "did you mean" not in str(e.value)


def test_toml_syntax_error_has_a_position():
    text = 'policy = "strict"\npipeline = prune\n'
    with pytest.raises(PipelineSpecError) as e:
        parse_recipe(text)
    assert e.value.position is not None and text[e.value.position - 1:].startswith(("=", " ", "p"))
