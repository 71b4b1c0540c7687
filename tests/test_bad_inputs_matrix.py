"""Bad inputs of issue 16: each gives a typed error from fxpress.errors whose message names
the culprit, and leaves the caller's model (parameters, buffers, train/eval flags), the
process's random state and the caller's files as they were."""
from __future__ import annotations

import ctypes
import os
import random
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch

import fxpress
from fxpress import errors as E
from fxpress.graph.weights import weighted_ops
from fxpress.passes.base import Pass, PassResult, PassTraits, Tolerance
from fxpress.passes.prune import Prune
from tests.helpers import assert_unchanged, state_snapshot


def _model() -> torch.nn.Module:
    g = torch.Generator().manual_seed(7)
    m = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.BatchNorm1d(24),
                            torch.nn.Linear(24, 5))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        m[2].running_mean.copy_(torch.randn(24, generator=g) * 0.1)
    return m.train()  # the caller's model is in training mode: it must stay so


class _Stateful(torch.nn.Module):
    """A model whose forward counts its calls in a buffer."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():  # the case checks the global RNG: leave it alone
            self.fc = torch.nn.Linear(16, 5)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps.add_(1)
        return self.fc(x)


def _calib(n: int = 2, width: int = 16) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, width, generator=g),) for _ in range(n)]


# -- passes that misbehave ----------------------------------------------------------------------

class _Writes(Pass):
    """Writes into the first weight in one of several ways, while promising not to."""

    name = "writes-weights"
    traits = PassTraits(tolerance=Tolerance(min_cosine=0.0), replaces_tensors=True)
    how = "data"

    def run(self, gm, ctx):
        w = weighted_ops(gm)[0].weight()
        if self.how == "data":
            w.data.mul_(0.5)
        elif self.how == "numpy":
            w.detach().numpy()[:] = 0.0
        elif self.how == "mul_":
            w.mul_(0.5)
        elif self.how == "no_grad":
            with torch.no_grad():
                w.add_(1.0)
        elif self.how == "setitem":
            w[0, 0] = 3.0
        elif self.how == "view":
            w.view(-1)[:3].zero_()
        elif self.how == "out":
            torch.mul(w, 2.0, out=w)
        elif self.how == "buffer":
            bn = next(m for m in gm.modules() if isinstance(m, torch.nn.BatchNorm1d))
            bn.running_mean.data.fill_(9.0)
        elif self.how == "train-mode":
            gm.train()
            gm(*ctx.example_inputs)  # batch norm in training mode updates its statistics
        elif self.how == "init":
            torch.nn.init.zeros_(w)
        elif self.how == "graph-node":  # an in-place op on the weight, as a node of the graph
            node = next(n for n in gm.graph.nodes if n.op == "call_module")
            with gm.graph.inserting_before(node):
                weight = gm.graph.get_attr(f"{node.target}.weight")
                gm.graph.call_method("mul_", (weight, 0.5))
        return PassResult(gm, True, {})


def _writer(how: str) -> Pass:
    p = _Writes()
    p.how = how
    return p


class _SkipsSuper(Pass):
    """A plugin pass whose __init__ forgets super().__init__(), and whose traits cannot be
    worked out without it."""

    name = "skips-super-broken"

    def __init__(self, factor=2.0):
        self.factor = factor

    def configure_traits(self, traits):
        return PassTraits(tolerance=self.missing_setting)  # set by the base constructor only

    def run(self, gm, ctx):
        return PassResult(gm, False, {})


# -- the matrix --------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    run: Callable[[torch.nn.Module, list], Any]
    error: type
    says: tuple[str, ...]


def _compress(pipeline, **kw):
    def run(model, calib):
        kw.setdefault("calibration", calib)
        kw.setdefault("progress", False)
        return fxpress.compress(model, pipeline, **kw)
    return run


NESTED = "prune{include=" + "[" * 5000 + "x" + "]" * 5000 + "}"
DIGITS = "1" * 5000

CASES = [
    # the pipeline argument
    Case("pipeline-none", _compress(None), E.InputError, ("give a pipeline", "target")),
    Case("pipeline-int", _compress(5), E.InputError, ("pipeline", "int 5")),
    Case("pipeline-list-of-ints", _compress([5]), E.InputError, ("Pass instances", "int 5")),
    Case("pipeline-dict", _compress({"prune": {}}), E.InputError, ("pipeline", "dict")),
    Case("pipeline-bytes", _compress(b"prune"), E.InputError, ("pipeline", "bytes")),
    Case("pipeline-text-not-str", lambda m, c: fxpress.Pipeline.parse(5), E.PipelineSpecError,
         ("must be a string", "int")),
    # pipeline text
    Case("text-deeply-nested", _compress(NESTED), E.PipelineSpecError,
         ("nested more than", "at character")),
    Case("text-nested-five", _compress("prune{include=[[[[[x]]]]]}"), E.PipelineSpecError,
         ("nested more than 4",)),
    Case("text-5000-digit-int", _compress("share{bits=" + DIGITS + "}"), E.PipelineSpecError,
         ("5000 digits", "at most 100", "at character 11")),
    Case("text-5000-digit-float", _compress("prune{sparsity=0." + DIGITS + "}"),
         E.PipelineSpecError, ("digits", "at most 100")),
    Case("text-5000-digit-tolerance", _compress("prune{sparsity=0.5,tol.max_abs=" + DIGITS + "}"),
         E.PipelineSpecError, ("5000 digits",)),
    Case("binarize-mode-list", _compress("binarize{mode=[sign]}"), E.OptionError,
         ("binarize: option 'mode'", "expected str", "list")),
    Case("prune-sparsity-list", _compress("prune{sparsity=[0.5]}"), E.OptionError,
         ("prune: option 'sparsity'", "list")),
    Case("option-twice", _compress("prune{sparsity=0.5,sparsity=0.6}"), E.PipelineSpecError,
         ("'sparsity' given twice",)),
    Case("unterminated-string", _compress('prune{include=["layers.*}'), E.PipelineSpecError,
         ("unterminated string",)),
    Case("sparsity-nan", _compress("prune{sparsity=nan}"), E.OptionError,
         ("'sparsity'", "finite")),
    Case("threshold-inf", _compress("prune{threshold=inf}"), E.OptionError,
         ("'threshold'", "finite")),
    Case("huge-int-python-api-float-option", lambda m, c: Prune(threshold=10 ** 5000),
         E.OptionError, ("prune: option 'threshold'", "too large", "digits")),
    Case("huge-int-python-api-int-option",
         lambda m, c: fxpress.registry()["quantize"].cls(bits=10 ** 5000), E.OptionError,
         ("quantize: option 'bits'", "digits")),
    # data
    Case("train-data-bare-tensor", _compress("prune{sparsity=0.5},distill{epochs=1}",
                                             train_data=torch.ones(8, 16)),
         E.InputError, ("train_data", "single tensor", "[(x, y)]")),
    Case("train-data-int", _compress("prune{sparsity=0.5}", train_data=5), E.InputError,
         ("train_data", "int")),
    Case("train-data-str", _compress("prune{sparsity=0.5}", train_data="train.csv"),
         E.InputError, ("train_data", "str")),
    Case("calibration-mismatched-width", lambda m, c: fxpress.compress(
        m, "prune{sparsity=0.5}", calibration=[c[0], (torch.ones(8, 7),)], progress=False),
        E.InputError, ("calibration batch 1", "does not run", "(8, 7)")),
    Case("calibration-mismatched-rank", lambda m, c: fxpress.compress(
        m, "prune{sparsity=0.5}", calibration=[c[0], (torch.ones(2, 8, 16),)], progress=False),
        E.InputError, ("calibration batch 1",)),
    Case("calibration-int", _compress("prune{sparsity=0.5}", calibration=5), E.InputError,
         ("calibration",)),
    Case("calibration-batch-unknown-name", lambda m, c: fxpress.compress(
        m, "prune{sparsity=0.5}", calibration=[{"pixels": c[0][0]}], progress=False),
        E.InputError, ("calibration batch 0", "no argument 'pixels'")),
    Case("calibration-set-batch", lambda m, c: fxpress.compress(
        m, "prune{sparsity=0.5}", calibration=[{1, 2}], progress=False), E.InputError,
        ("calibration batch 0", "set")),
    Case("policy-int", _compress("prune{sparsity=0.5}", policy=5), E.InputError,
         ("policy", "strict")),
    Case("rollback-in-place", _compress("prune{sparsity=0.5}", policy="rollback", in_place=True),
         E.InputError, ("rollback", "in_place")),
    # a forward that updates its own buffer was told "every batch must be shaped like the
    # example inputs" and to use WeightedOp.set_weight (advice for pass writers)
    Case("forward-updates-its-buffer", lambda m, c: fxpress.compress(
        _Stateful(), "prune{sparsity=0.5}", calibration=c, progress=False), E.InputError,
        ("_Stateful's forward writes in place into its own tensor 'steps' (add_)",
         "move the update out of forward")),
    # a batch of 0 rows verified vacuously: prune{sparsity=0.99} was "ok" at cosine 1.0
    Case("calibration-only-empty-batches", lambda m, c: fxpress.compress(
        m, "prune{sparsity=0.99}", calibration=[(c[0][0][:0],), (c[1][0][:0],)], progress=False),
        E.InputError, ("every calibration batch gives only empty outputs", "(0, 16)")),
    # NaN or inf in the data: quantize failed inside its statistics ("cannot convert float
    # NaN to integer", a PassError), share asked to loosen its tolerance (cosine nan)
    *[Case(f"calibration-{kind}-{spec}", lambda m, c, v=value, spec=spec: fxpress.compress(
        m, spec, calibration=[(c[0][0].clone().index_fill_(1, torch.tensor([2]), v),)],
        progress=False), E.InputError,
        ("calibration batch 0: the model's own output 0 holds NaN", "input(s) [0] hold NaN or inf"))
      for kind, value in [("nan", float("nan")), ("inf", float("inf"))]
      for spec in ["quantize", "share"]],
    # seeds: a float seeded distill's generator late (PassError), a string or a 70-bit int
    # was taken silently
    *[Case(f"seed-{kind}", _compress("prune{sparsity=0.5}", seed=seed), E.InputError,
           ("seed", says)) for kind, seed, says in [
        ("float", 1.5, "integer, got float"), ("str", "7", "integer, got str"),
        ("huge", 1 << 70, "[-2**63, 2**63)"), ("bool", True, "integer, got bool")]],
    Case("recipe-seed-huge", lambda m, c: fxpress.Pipeline.from_recipe(
        'pipeline = "prune{sparsity=0.5}"\nseed = 18446744073709551616\n'), E.PipelineSpecError,
        ("'seed'", "[-2**63, 2**63)")),
    Case("recipe-seed-str", lambda m, c: fxpress.Pipeline.from_recipe(
        'pipeline = "prune{sparsity=0.5}"\nseed = "abc"\n'), E.PipelineSpecError,
        ("'seed'", "integer, got str")),
    # passes that write into what they share with the caller's model
    *[Case(f"pass-writes-{how}", _compress([_writer(how)]), E.PassError,
           ("writes-weights", what))
      for how, what in [("data", "0.weight"), ("numpy", "read-only"), ("mul_", "0.weight"),
                        ("no_grad", "0.weight"), ("setitem", "0.weight"), ("view", "0.weight"),
                        ("out", "0.weight"), ("buffer", "2.running_mean"),
                        ("train-mode", "into '2."), ("init", "0.weight"),
                        ("graph-node", "0.weight")]],
    Case("pass-writes-in-place-mode", _compress([_writer("data")], in_place=True), E.PassError,
         ("writes-weights", "0.weight", "replaces_tensors=False")),
    Case("plugin-skips-super-and-breaks", _compress([_SkipsSuper.__new__(_SkipsSuper)]),
         E.PassError, ("_SkipsSuper", "super().__init__(**options)")),
]


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


def _rng():
    return (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_a_typed_error_and_changes_nothing(case):
    model, calib = _model(), _calib()
    before, rng = state_snapshot(model), _rng()
    flags = [m.training for m in model.modules()]
    with pytest.warns() if case.id.startswith("plugin-") else _nothing():
        with pytest.raises(case.error) as err:
            case.run(model, calib)
    assert isinstance(err.value, E.FxpressError)
    for fragment in case.says:
        assert fragment in str(err.value), f"{fragment!r} not in: {err.value}"
    assert_unchanged(model, before)
    assert [m.training for m in model.modules()] == flags
    now = _rng()
    assert torch.equal(now[0], rng[0]) and now[1] == rng[1] and (now[2] == rng[2]).all()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_matrix_has_at_least_forty_cases():
    assert len(CASES) >= 40


def test_a_plugin_pass_that_skips_super_still_runs_with_a_warning():
    class Halves(Pass):
        name = "halves"
        traits = PassTraits(tolerance=Tolerance(min_cosine=0.0), replaces_tensors=True)

        def __init__(self):  # no super().__init__()
            self.factor = 0.5

        def run(self, gm, ctx):
            op = weighted_ops(gm)[0]
            op.set_weight(op.weight() * self.factor)
            return PassResult(gm, True, {})

    model, calib = _model(), _calib()
    before = state_snapshot(model)
    with pytest.warns(RuntimeWarning, match=r"super\(\).__init__"):
        res = fxpress.compress(model, [Halves()], calibration=calib, progress=False)
    assert res.records[0].status == "ok" and str(res.pipeline) == "halves"
    w = weighted_ops(res.module)[0].weight()
    assert torch.equal(w, model[0].weight * 0.5)
    assert_unchanged(model, before)


def test_a_raw_pointer_write_is_detected_and_names_the_pass():
    class Poke(Pass):
        name = "pokes-memory"
        traits = PassTraits(tolerance=Tolerance(min_cosine=0.0), replaces_tensors=True)

        def run(self, gm, ctx):
            w = weighted_ops(gm)[0].weight()
            ctypes.memset(w.data_ptr(), 0, 4)  # no tensor operation: no view can stop it
            return PassResult(gm, True, {})

    model = _model()
    with pytest.raises(E.PassError, match=r"pokes-memory.*0\.weight.*behind"):
        fxpress.compress(model, [Poke()], calibration=_calib(), progress=False)


def test_pipeline_policy_is_honoured_and_compress_overrides_it():
    model, calib = _model(), _calib()
    lossy = "prune{sparsity=0.9,tol.min_cosine=0.9999}"
    pipe = fxpress.Pipeline.parse(lossy, policy="warn")
    res = fxpress.compress(model, pipe, calibration=calib, progress=False)
    assert res.records[0].status == "warn"
    with pytest.raises(E.VerificationError):
        fxpress.compress(model, pipe, calibration=calib, progress=False, policy="strict")
    res = fxpress.compress(model, fxpress.Pipeline.parse(lossy, policy="rollback"),
                           calibration=calib, progress=False)
    assert res.records[0].status == "rolled back"


def test_recipe_policy_is_honoured():
    pipe = fxpress.Pipeline.from_recipe({"pipeline": "prune{sparsity=0.9,tol.min_cosine=0.9999}",
                                         "policy": "warn"})
    res = fxpress.compress(_model(), pipe, calibration=_calib(), progress=False)
    assert res.records[0].status == "warn"


def test_histograms_of_nan_weights_count_them_instead_of_failing():
    from fxpress.graph.inspect import layer_summary

    model = _model().eval()
    with torch.no_grad():
        model[0].weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    gm = fxpress.capture(model, _calib()[0])
    hist = layer_summary(gm)["histograms"]["0"]
    assert hist["nonfinite"] == 3 and sum(hist["counts"]) == 16 * 24 - 3 - hist["zeros"]


# -- files ---------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A compressed model and the bytes of an earlier artifact at ``path``."""
    res = fxpress.compress(_model(), "prune{sparsity=0.5,tol.min_cosine=0}", calibration=_calib(),
                           progress=False)
    path = tmp_path / "model.fxp"
    fxpress.save(res, path)
    return res, path, path.read_bytes()


def _folder(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_a_250_character_name_saves_and_a_300_character_one_is_refused(saved, tmp_path):
    res, _, _ = saved
    long = tmp_path / ("m" * 246 + ".fxp")
    fxpress.save(res, long)
    assert torch.equal(fxpress.load(long)(_calib()[0][0]), res.module(_calib()[0][0]))
    before = _folder(long)
    with pytest.raises(E.ArtifactError, match=r"file name is 304 bytes.*shorter name"):
        fxpress.save(res, tmp_path / ("m" * 300 + ".fxp"))
    assert _folder(long) == before


def test_stale_temporaries_of_a_killed_save_are_removed_and_nothing_else(saved):
    from fxpress.graph.artifact.files import _temp_prefix

    res, path, _ = saved
    mine_old = path.parent / f"{_temp_prefix(path)}abcd1234.tmp"
    legacy_old = path.parent / f".{path.name}.k3y_9xyz.tmp"
    mine_fresh = path.parent / f"{_temp_prefix(path)}fresh123.tmp"
    other_name = path.parent / f"{_temp_prefix(path.with_name('other.fxp'))}abcd1234.tmp"
    foreign = [path.parent / n for n in ("notes.tmp", ".model.fxp.tmp", "model.fxp.bak")]
    link = path.parent / f"{_temp_prefix(path)}link5678.tmp"
    for p in [mine_old, legacy_old, mine_fresh, other_name, *foreign]:
        p.write_bytes(b"partial")
    link.symlink_to(foreign[0])
    old = time.time() - 3600
    for p in [mine_old, legacy_old, other_name, *foreign]:
        os.utime(p, (old, old))
    fxpress.save(res, path)
    left = set(_folder(path))
    assert mine_old.name not in left and legacy_old.name not in left
    assert {mine_fresh.name, other_name.name, link.name, *(p.name for p in foreign)} <= left
    assert foreign[0].read_bytes() == b"partial"


@pytest.mark.parametrize("failure", ["disk-full", "read-only"])
def test_a_failed_write_names_the_file_and_keeps_the_old_one(saved, monkeypatch, failure):
    import errno

    from fxpress.graph.artifact import files

    res, path, old = saved
    before = _folder(path)
    if failure == "disk-full":
        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(files.os, "fsync", fsync)
        says = "no space left on the device"
    else:
        def mkstemp(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
        says = "the file system is read-only"
    with pytest.raises(E.ArtifactError, match=rf"{path.name}: {says}.*unchanged"):
        fxpress.save(res, path)
    assert path.read_bytes() == old and _folder(path) == before


def test_a_read_only_folder_gives_a_typed_error(saved, tmp_path):
    res, _, _ = saved
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(folder, os.W_OK):  # root writes anywhere: nothing to test
            pytest.skip("running as root")
        with pytest.raises(E.ArtifactError, match=r"ro/model.fxp: permission denied"):
            fxpress.save(res, folder / "model.fxp")
    finally:
        folder.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "link-to-dev-zero", "missing"])
def test_load_refuses_what_is_not_a_regular_file_before_reading(tmp_path, kind):
    path = {"dev-zero": "/dev/zero", "fifo": tmp_path / "pipe.fxp",
            "directory": tmp_path, "link-to-dev-zero": tmp_path / "zero.fxp",
            "missing": tmp_path / "nope.fxp"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "link-to-dev-zero":
        path.symlink_to("/dev/zero")
    says = "No such file" if kind == "missing" else "not a regular file"
    start = time.perf_counter()
    with pytest.raises(E.ArtifactError, match=says):
        fxpress.load(path)
    assert time.perf_counter() - start < 5  # neither read forever nor blocked


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_save_never_replaces_what_is_not_a_regular_file(saved, tmp_path, kind):
    # the rename replaced the node itself: as root, `fxpress run -o /dev/null` left a
    # regular file at /dev/null (a FIFO and a socket stand in for the device here)
    import socket

    res, _, _ = saved
    node = tmp_path / "node"
    if kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(node))
        s.close()
    else:
        os.mkfifo(node)
    before = os.lstat(node).st_mode
    with pytest.raises(E.ArtifactError, match=r"node: it is a (FIFO|socket), not a regular file"):
        fxpress.save(res, node)
    assert os.lstat(node).st_mode == before
    assert _folder(node) == ["model.fxp", "node"]
    link = tmp_path / "link.fxp"  # a symbolic link to it is replaced, never written through
    link.symlink_to(node)
    fxpress.save(res, link)
    assert not link.is_symlink() and os.lstat(node).st_mode == before


@pytest.mark.parametrize("path, says", [
    ("a\0b.fxp", "NUL byte"), (5, "int 5: give a file path"), (None, "NoneType None"),
    (["m.fxp"], "list")])
def test_paths_that_name_no_file_are_typed_errors(saved, tmp_path, path, says):
    res, _, _ = saved
    for call in (lambda: fxpress.save(res, path), lambda: fxpress.load(path)):
        with pytest.raises(E.ArtifactError, match=says):
            call()


def test_bytes_and_undecodable_names_save_and_load(saved, tmp_path):
    res, _, _ = saved
    x = _calib()[0][0]
    for path in (os.fsencode(tmp_path / "bytes.fxp"), str(tmp_path / "\udcff.fxp")):
        fxpress.save(res, path)
        assert torch.equal(fxpress.load(path)(x), res.module(x))


def test_cli_refuses_an_output_name_with_a_nul_byte_before_running(tmp_path, capsys):
    from fxpress.cli import main

    (tmp_path / "m.py").write_text("import torch\ndef build():\n    raise SystemExit('ran')\n")
    (tmp_path / "r.toml").write_text('model = "m.py:build"\npipeline = "prune{sparsity=0.5}"\n'
                                     'output = "a\\u0000b.fxp"\n')
    assert main(["run", str(tmp_path / "r.toml")]) == 2
    assert "NUL byte" in capsys.readouterr().err
