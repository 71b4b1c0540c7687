"""The layout's promises: errors at the bottom, a lazy face, one pass contract (traits)."""
import subprocess
import sys
import warnings

import pytest

import fxpress
from fxpress.passes.base import Pass, PassResult, PassTraits, Tolerance


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_errors_import_nothing_above_them():
    mods = _modules_after("import fxpress.errors")
    heavy = {m for m in mods if m == "torch" or m.startswith(("torch.", "fxpress.passes",
                                                               "fxpress.plugins", "fxpress.cli",
                                                               "fxpress.graph", "pluggy"))}
    assert not heavy, sorted(heavy)[:10]


def test_graph_imports_no_pass_and_no_plugin():
    mods = _modules_after("import fxpress.graph; fxpress.graph.weighted_ops; fxpress.graph.diff")
    assert "fxpress.graph.weights" in mods
    assert not {m for m in mods if m.startswith(("fxpress.passes", "fxpress.plugins", "pluggy"))}


def test_every_public_name_resolves_lazily():
    for name in fxpress.__all__:
        assert getattr(fxpress, name) is not None, name
    assert set(fxpress.__all__) <= set(dir(fxpress))
    assert fxpress.graph.capture is fxpress.capture  # the function, not the submodule
    with pytest.raises(AttributeError):
        fxpress.no_such_name  # noqa: B018


def test_old_loose_pass_attributes_become_traits_with_a_warning():
    with pytest.warns(DeprecationWarning, match="PassTraits"):
        class Old(Pass):
            name = "old-style"
            tolerance = Tolerance(min_cosine=0.5)
            replaces_tensors = True
            needs = ("calibration",)

            def run(self, gm, ctx):
                return PassResult(gm, changed=False)

    assert Old.traits == PassTraits(tolerance=Tolerance(min_cosine=0.5), replaces_tensors=True,
                                    needs=("calibration",))
    p = Old()
    assert p.replaces_tensors and Old.needs == ("calibration",) and p.tol.min_cosine == 0.5
    with pytest.warns(DeprecationWarning):
        p.recovers = True  # an instance setting a trait the old way
    assert p.traits.recovers and not Old.traits.recovers


def test_traits_follow_options():
    reg = fxpress.registry(entry_points=False)
    taps = reg["distill"].cls(epochs=0)
    train = reg["distill"].cls(epochs=2)
    auto = reg["distill"].cls()  # trains when the run has train_data, else only taps
    assert taps.traits.replaces_tensors and not taps.traits.recovers
    assert train.traits.recovers and train.traits.needs == ("train_data",)
    assert auto.traits.recovers and auto.traits.needs == ()
    assert reg["binarize"].cls(mode="pow2").tol != reg["binarize"].cls(mode="sign").tol


def test_pipeline_parse_takes_the_old_registry_keyword():
    reg = fxpress.registry(entry_points=False)
    with pytest.warns(DeprecationWarning, match="registry="):
        pipe = fxpress.Pipeline.parse("prune{sparsity=0.5}", registry_=reg)
    assert str(pipe) == "prune{sparsity=0.5}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert str(fxpress.Pipeline.parse("prune{sparsity=0.5}", registry=reg)) == \
            "prune{sparsity=0.5}"
