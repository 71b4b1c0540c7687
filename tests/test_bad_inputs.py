"""The bad-input matrix: every case gives a typed error from fxpress.errors whose message
names the culprit and the fix, and the caller's model is bit-identical afterwards."""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import fxpress
from fxpress import errors as E
from fxpress.passes.base import Pass, PassResult, Tolerance
from fxpress.graph.weights import weighted_ops
from fxpress.passes.recipes import parse_recipe
from tests.helpers import (assert_unchanged, flip_tensor_byte, node, set_target, state_snapshot,
                           tamper)


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


def _load_damaged(damage):
    """Compress the caller's model, save it, damage the bytes with ``damage`` and load them."""
    def run(model, calib):
        import tempfile

        from fxpress.graph import artifact

        res = fxpress.compress(model, "prune{sparsity=0.3}", calibration=calib, policy="warn",
                               progress=False)
        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/model.fxp"
            with open(path, "wb") as f:
                f.write(damage(artifact.dumps(res.module)))
            if os.path.exists(MARKER):
                os.unlink(MARKER)
            try:
                return fxpress.load(path)
            finally:
                assert not os.path.exists(MARKER), "a crafted artifact ran code"
    return run


MARKER = "/tmp/fxpress_bad_inputs_pwned"
_GOT_IN = "the file was not loaded"
_RESAVE = "save it again with fxpress.save"


def _huge_header(data: bytes) -> bytes:
    huge = bytearray(data)
    huge[16:24] = (1 << 62).to_bytes(8, "little")
    return bytes(huge)


def _example(x):
    return lambda model, calib: fxpress.compress(model, "prune{sparsity=0.5}", example_inputs=x)


CASES = [
    Case("not-a-module", lambda m, c: fxpress.compress(lambda x: x, "prune{sparsity=0.5}",
                                                       calibration=c), E.InputError, ("nn.Module",)),
    Case("capture-not-a-module", lambda m, c: fxpress.capture("model.pt", c[0]), E.InputError,
         ("nn.Module", "str")),
    Case("inputs-wrong-shape", _example((torch.ones(4, 7),)), E.InputError,
         ("does not run on the example inputs", "[(4, 7)]", "shaped like real model inputs")),
    Case("inputs-wrong-type", _example("x.npy"), E.InputError, ("tuple", "str")),
    Case("inputs-unknown-name", _example({"pixels": torch.ones(4, 64)}), E.InputError,
         ("has no argument 'pixels'", "arguments: x")),
    Case("inputs-empty-mapping", _example({}), E.InputError, ("empty mapping",)),
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
    # -- every pass's options --------------------------------------------------------------
    Case("quantize-bits-0", _compress("quantize{bits=0}"), E.OptionError,
         ("quantize: option 'bits'", "2 <= bits <= 8", "got 0")),
    Case("quantize-bits-33", _compress("quantize{bits=33}"), E.OptionError,
         ("quantize: option 'bits'", "2 <= bits <= 8", "got 33")),
    Case("quantize-bits-9", _compress("quantize{bits=9}"), E.OptionError,
         ("quantize: option 'bits'", "2 <= bits <= 8", "got 9")),
    Case("quantize-bits-float", _compress("quantize{bits=4.5}"), E.OptionError,
         ("'bits'", "expected int", "4.5")),
    Case("quantize-group-without-size", _compress("quantize{granularity=group}"), E.OptionError,
         ("'group_size'", "granularity=group needs group_size=N")),
    Case("quantize-size-without-group", _compress("quantize{group_size=8}"), E.OptionError,
         ("'group_size'", "only applies with granularity=group")),
    Case("quantize-smooth-without-dynamic", _compress(
        "quantize{granularity=group,group_size=8,smooth=0.5}"), E.OptionError,
        ("'smooth'", "needs activations=dynamic")),
    Case("quantize-smooth-1.5", _compress("quantize{smooth=1.5}"), E.OptionError,
         ("'smooth'", "0.0 <= smooth <= 1.0", "1.5")),
    Case("quantize-scheme-typo", _compress("quantize{scheme=symetric}"), E.OptionError,
         ("'scheme'", "one of", "did you mean 'symmetric'")),
    Case("quantize-glob-nothing", _compress("quantize{include=[encoder.*]}"), E.OptionError,
         ("quantize: option 'include'", "encoder.*", "match no weighted op", "layers.0.weight")),
    Case("share-bits-0", _compress("share{bits=0}"), E.OptionError,
         ("share: option 'bits'", "1 <= bits <= 8", "got 0")),
    Case("share-bits-9", _compress("share{bits=9}"), E.OptionError,
         ("share: option 'bits'", "1 <= bits <= 8", "got 9")),
    Case("share-no-ops", _compress("share{ops=[]}"), E.OptionError,
         ("share: option 'ops'", "give at least one op kind", "linear")),
    # prune{ops=[]} named 'include' ("an earlier pass replaced them"), binarize{ops=[]}
    # "unknown op kind(s) []": one check now (passes/base.check_op_kinds)
    Case("prune-no-ops", _compress("prune{sparsity=0.5,ops=[]}"), E.OptionError,
         ("prune: option 'ops'", "give at least one op kind", "linear")),
    Case("binarize-no-ops", _compress("binarize{ops=[]}"), E.OptionError,
         ("binarize: option 'ops'", "give at least one op kind", "linear")),
    Case("share-unknown-op", _compress("share{ops=[lstm]}"), E.OptionError,
         ("'ops'", "unknown op kind(s) ['lstm']", "choose from")),
    Case("share-glob-nothing", _compress("share{exclude=[head],include=[encoder.*]}"),
         E.OptionError, ("share: option 'include'", "encoder.*", "layers.0.weight")),
    Case("binarize-bad-mode", _compress("binarize{mode=quad}"), E.OptionError,
         ("binarize: option 'mode'", "'sign', 'ternary', 'pow2'", "got 'quad'")),
    Case("binarize-bits-with-sign", _compress("binarize{mode=sign,bits=3}"), E.OptionError,
         ("binarize: option 'bits'", "mode=sign stores 1 bit", "drop bits or use mode=pow2")),
    Case("binarize-bits-with-ternary", _compress("binarize{mode=ternary,bits=2}"), E.OptionError,
         ("option 'bits'", "mode=ternary stores 2 bit", "drop bits or use mode=pow2")),
    Case("binarize-pow2-bits-9", _compress("binarize{mode=pow2,bits=9}"), E.OptionError,
         ("option 'bits'", "2 <= bits <= 8", "got 9")),
    Case("distill-epochs-negative", _compress("distill{epochs=-1}"), E.OptionError,
         ("distill: option 'epochs'", "0 <= epochs", "got -1")),
    Case("distill-taps-match-nothing", _compress("distill{taps=[encoder.*]}"), E.OptionError,
         ("distill: option 'taps'", "['encoder.*'] match no module or node", "layers.0")),
    Case("distill-training-option-with-epochs-0", _compress("distill{epochs=0,lr=0.1}"),
         E.OptionError, ("distill: option 'lr'", "only applies when training", "drop epochs=0")),
    Case("distill-without-train-data", _compress("distill{epochs=1}"), E.MissingDataError,
         ("pass 'distill'", "needs train data", "train_data=[(x, y), ...]")),
    # -- every bad artifact ------------------------------------------------------------------
    Case("artifact-empty", _load_damaged(lambda b: b""), E.ArtifactFormatError,
         ("model.fxp", "0 bytes is too short", _RESAVE)),
    Case("artifact-truncated-prefix", _load_damaged(lambda b: b[:10]), E.ArtifactFormatError,
         ("model.fxp", "too short", "truncated", _RESAVE)),
    Case("artifact-truncated-payload", _load_damaged(lambda b: b[:len(b) - 100]),
         E.ArtifactFormatError, ("model.fxp", "truncated or tampered", _RESAVE)),
    Case("artifact-not-fxpress", _load_damaged(lambda b: b"PK\x03\x04" + bytes(100)),
         E.ArtifactFormatError, ("not an fxpress artifact", _RESAVE)),
    Case("artifact-flipped-tensor-byte", _load_damaged(
        lambda b: flip_tensor_byte(b, "layers.0.weight")), E.ArtifactIntegrityError,
        ("model.fxp", "sha256", "tensor 'layers.0.weight' stream 'values'", "Save it again")),
    Case("artifact-flipped-header-byte", _load_damaged(
        lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:]), E.ArtifactIntegrityError,
        ("header fails its sha256 check", "again")),
    Case("artifact-unknown-target", _load_damaged(
        lambda b: tamper(b, set_target("torch.not_a_function"))), E.ForbiddenTargetError,
        ("node 'relu'", "'torch.not_a_function' is not in the allowlist", _GOT_IN)),
    Case("artifact-os-system", _load_damaged(lambda b: tamper(b, set_target(
        "os.system", {"$": "tuple", "v": [f"touch {MARKER}"]}))), E.ForbiddenTargetError,
        ("'os.system' is not in the allowlist", _GOT_IN)),
    Case("artifact-builtins-eval", _load_damaged(lambda b: tamper(b, set_target(
        "builtins.eval", {"$": "tuple", "v": [f"open('{MARKER}','w')"]}))), E.ForbiddenTargetError,
        ("'builtins.eval' is not in the allowlist", _GOT_IN)),
    Case("artifact-import", _load_damaged(lambda b: tamper(b, set_target(
        "builtins.__import__", {"$": "tuple", "v": ["os"]}))), E.ForbiddenTargetError,
        ("'builtins.__import__'", _GOT_IN)),
    Case("artifact-dunder-attribute", _load_damaged(lambda b: tamper(b, lambda h: node(
        h, "call_module").update(op="get_attr", target="layers.__class__"))),
        E.ForbiddenTargetError, ("get_attr 'layers.__class__'", "dunder name '__class__'", _GOT_IN)),
    Case("artifact-dunder-method", _load_damaged(lambda b: tamper(b, lambda h: node(
        h, "call_module").update(op="call_method", target="__reduce_ex__"))),
        E.ForbiddenTargetError, ("'__reduce_ex__' is not allowlisted", _GOT_IN)),
    Case("artifact-runtime-class", _load_damaged(lambda b: tamper(b, lambda h: h["modules"][2].update(
        kind="runtime", **{"class": "subprocess.Popen"}))), E.ForbiddenTargetError,
        ("'subprocess.Popen' is not registered", _GOT_IN)),
    Case("artifact-huge-tensor", _load_damaged(lambda b: tamper(b, lambda h: h["tensors"][
        "head.weight"].update(shape=[1 << 40, 1 << 7]))), E.ArtifactFormatError,
        ("tensor 'head.weight'", "17592186044416 bytes", _RESAVE)),
    Case("artifact-huge-header", _load_damaged(_huge_header), E.ArtifactFormatError,
         ("header claims 4611686018427387904 bytes", "limit", _RESAVE)),
    Case("artifact-newer-version", _load_damaged(lambda b: tamper(b, lambda h: h.update(version=99))),
         E.ArtifactFormatError, ("v3 artifact",)),
    Case("artifact-missing-file", lambda m, c: fxpress.load("/nonexistent/model.fxp"),
         E.ArtifactError, ("cannot read artifact /nonexistent/model.fxp", "No such file")),
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


@pytest.mark.parametrize("label, fragment", [
    (torch.full((6, 4), float("inf")), "label holds NaN or inf \\(24 of 24 values\\)"),
    (torch.tensor([0, 1, 2, 3, 9, 1]), "class indices in \\[0, 4\\).*got 9"),
    (torch.tensor([0, 1, -5, 3, 2, 1]), "class indices in \\[0, 4\\).*got -5"),
])
def test_distill_names_labels_it_cannot_train_on(label, fragment):
    """An inf regression label trained the graph into NaN and failed verification after
    the epochs ('produced 24 NaN/Inf output values'); a class index past the output made
    cross_entropy raise from inside the pass (PassError about an IndexError). Both are the
    data's fault and are named as such, before the caller's model is touched."""
    from fxpress.errors import InputError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(6, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=fragment):
        fxpress.compress(model, "distill{epochs=1,lr=0.01}", (x,), train_data=[(x, label)],
                         progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_inputs_of_another_float_dtype_than_the_model_are_named_with_the_cast(dtype):
    # model.double() (or a bf16 model) fed float32 batches: the error named the shapes and
    # said to pass inputs "shaped like real model inputs" - the shapes were right
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).to(dtype).eval()
    x = torch.randn(3, 8)
    with pytest.raises(E.InputError) as err:
        fxpress.compress(model, "prune{sparsity=0.5}", calibration=[(x,)], progress=False)
    name = str(dtype).removeprefix("torch.")
    assert f"weights are {name} and the float inputs float32" in str(err.value)
    assert f"x.to(torch.{name})" in str(err.value)


class _Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, mask):
        return self.fc(x * mask)


@pytest.mark.parametrize("make, fragment", [
    (lambda x, m, y: [((x, m), y), ((x, m, x), y)],
     "train_data batch 1 holds 3 inputs grouped as its first element, but _Masked.forward takes 2"),
    (lambda x, m, y: [((x, m, x), y)],
     "train_data batch 0 holds 3 inputs grouped as its first element, but _Masked.forward takes 2"),
    (lambda x, m, y: [(x, m, x, y)], "train_data batch 0 holds 3 inputs and a label"),
    (lambda x, m, y: (b for b in [((x, m, x), y)]), "train_data batch holds 3 inputs grouped"),
])
def test_train_batches_of_more_inputs_than_forward_takes_name_the_batch(make, fragment):
    """``((x, mask, extra), y)`` for ``forward(x, mask)`` was left as it was and failed
    inside distill: a PassError about an index conversion. It is the data's fault: an
    InputError naming the batch, before the caller's model is touched."""
    torch.manual_seed(0)
    model = _Masked().eval()
    x, m, y = torch.randn(8, 4), torch.ones(8, 4), torch.randint(0, 3, (8,))
    before = state_snapshot(model)
    with pytest.raises(E.InputError, match=fragment):
        fxpress.compress(model, "distill{epochs=1}", calibration=[(x, m)], train_data=make(x, m, y),
                         progress=False)
    assert_unchanged(model, before)
