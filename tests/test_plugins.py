"""Third-party plugins discovered through real entry points (a *.dist-info on sys.path)."""
import importlib
import sys
import textwrap

import pytest
import torch

import fxpress
from fxpress.errors import PluginError
from fxpress.plugins import load_registry

PLUGIN = '''
import torch
import fxpress
from fxpress.passes.base import Pass, PassResult, Tolerance, option
from fxpress.graph.weights import weighted_ops


class RoundWeights(Pass):
    """Rounds weights to a number of decimals (a toy lossy pass from a third party)."""
    name = "round-weights"
    summary = "Round every weight to `decimals` decimals."
    tolerance = Tolerance(min_cosine=0.99)
    replaces_tensors = True
    decimals = option(2, "decimals to keep", low=0)

    def run(self, gm, ctx):
        for op in weighted_ops(gm):
            op.set_weight(torch.round(op.weight(), decimals=self.decimals))
        return PassResult(gm, True, {"decimals": self.decimals})


@fxpress.hookimpl
def register_passes(register):
    register(RoundWeights)
'''


def _install(site, dist, module, code, ep_name=None):
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(textwrap.dedent(code))
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"  # dist-info names escape "-"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[fxpress]\n{ep_name or module} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in [m for m in sys.modules if m.startswith("fxtest_")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def test_plugin_pass_is_listed_and_runs(site, mlp, calib):
    _install(site, "fxtest-round", "fxtest_round", PLUGIN)
    reg = load_registry(entry_points=True)
    info = reg["round-weights"]
    assert (info.plugin, info.distribution) == ("fxtest_round", "fxtest-round")
    assert info.describe()["options"]["decimals"]["default"] == 2
    res = fxpress.Pipeline.parse("prune{sparsity=0.5},round-weights{decimals=3}", reg).run(
        mlp, calibration=calib)
    assert [r.name for r in res.records] == ["prune", "round-weights"]
    assert res.records[1].stats == {"decimals": 3}


def test_broken_plugins_are_reported_and_the_rest_still_loads(site):
    _install(site, "fxtest-good", "fxtest_good", PLUGIN)
    _install(site, "fxtest-broken", "fxtest_broken", "raise ImportError('missing dependency xyz')\n")
    _install(site, "fxtest-dup", "fxtest_dup", '''
        import fxpress
        from fxpress.passes.prune import Prune

        class MyPrune(Prune):
            pass

        @fxpress.hookimpl
        def register_passes(register):
            register(MyPrune)
    ''')
    _install(site, "fxtest-raises", "fxtest_raises", '''
        import fxpress

        @fxpress.hookimpl
        def register_passes(register):
            register(object)
    ''')
    reg = load_registry(entry_points=True)
    assert "prune" in reg and reg["prune"].plugin == "builtin"
    assert "round-weights" in reg, [str(e) for e in reg.errors]
    errs = {e.plugin: e for e in reg.errors}
    assert set(errs) == {"fxtest_broken", "fxtest_dup", "fxtest_raises"}
    assert all(isinstance(e, PluginError) for e in errs.values())
    assert "missing dependency xyz" in str(errs["fxtest_broken"])
    assert "fxtest-broken" in str(errs["fxtest_broken"])  # names the distribution
    assert "already registered by plugin 'builtin'" in str(errs["fxtest_dup"])
    assert "Pass subclass" in str(errs["fxtest_raises"])


def test_plugins_can_be_disabled(site, monkeypatch):
    _install(site, "fxtest-round", "fxtest_round", PLUGIN)
    monkeypatch.setenv("FXPRESS_DISABLE_PLUGINS", "1")
    assert "round-weights" not in load_registry()
    assert "prune" in load_registry()
    monkeypatch.delenv("FXPRESS_DISABLE_PLUGINS")
    assert "round-weights" in load_registry()
    assert "round-weights" not in load_registry(entry_points=False)


def test_unknown_pass_mentions_plugins_that_failed(site):
    _install(site, "fxtest-broken", "fxtest_broken", "raise ImportError('no module named foo')\n")
    reg = load_registry(entry_points=True)
    with pytest.raises(fxpress.errors.UnknownPassError, match="failed to load"):
        fxpress.Pipeline.parse("round-weights", reg)


def test_builtins_come_through_the_same_hook():
    from fxpress.plugins import builtin

    seen = []
    builtin.register_passes(register=seen.append)
    assert {c.name for c in seen} == set(fxpress.registry(entry_points=False))
