"""A runtime module rebuilt from a file is refused at load when its config does not fit its
stored tensors (``from_state`` / ``check_state``, :class:`fxpress.graph.runtime.StateCheck`).

Round 20 found configs that disagree with the stored tensors (a share layer whose ``kind``
was changed, a quantize layer with 0 columns or another ``bits``) loading fine and failing
at the first call with raw errors. The property here: for small models compressed by every
built-in pass that writes runtime modules, changing one config field or one stored
tensor's shape or dtype in the saved artifact either makes ``load`` raise
``ArtifactFormatError``, or the loaded model's forward on the example input returns a
finite output of the original shape, within seconds.
"""
from __future__ import annotations

import copy
import math
import signal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxpress
from fxpress.errors import ArtifactFormatError
from fxpress.graph import artifact
from fxpress.graph.runtime import RuntimeModule
from tests.helpers import tamper


class _Emb(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.e = torch.nn.Embedding(40, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.fc = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.norm(self.e(x)))).mean(1))


class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, groups=2, padding=1, padding_mode="reflect")
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))))


class _RNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 8)
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.lstm(self.inp(x))[0][:, -1])


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 5))


#: (model, example input, pipeline): every built-in pass that writes runtime modules, on
#: linears, convs (one grouped, one reflect-padded), an embedding, a LayerNorm and an LSTM
CASES = [
    ("mlp", "quantize"),
    ("mlp", "quantize{bits=4,granularity=group,group_size=8,activations=none}"),
    ("mlp", "quantize{bits=4,scheme=affine,granularity=tensor}"),
    ("mlp", "share{bits=4,bias_bits=8}"),
    ("mlp", "prune{sparsity=0.8},share{bits=3}"),
    ("mlp", "prune{sparsity=0.8},share{bits=4,codebook_bits=8}"),
    ("mlp", "binarize{keep_first_last=false}"),
    ("mlp", "binarize{mode=pow2,keep_first_last=false}"),
    ("cnn", "share"),
    ("cnn", "quantize{bits=4}"),
    ("cnn", "binarize{mode=ternary,keep_first_last=false}"),
    ("emb", "quantize{bits=4,granularity=group,group_size=8},small"),
    ("emb", "share{ops=[embedding]}"),
    ("rnn", "quantize{bits=4}"),
]


def _model(name):
    torch.manual_seed(0)
    if name == "mlp":
        return _mlp().eval(), torch.randn(6, 24)
    if name == "cnn":
        return _CNN().eval(), torch.randn(2, 1, 6, 6)
    if name == "emb":
        return _Emb().eval(), torch.randint(0, 40, (3, 5))
    return _RNN().eval(), torch.randn(2, 4, 8)


@pytest.fixture(scope="module")
def compressed():
    out = []
    for name, pipe in CASES:
        model, x = _model(name)
        res = fxpress.compress(model, pipe, (x,), progress=False, policy="warn")
        gm = res.module
        with torch.no_grad():
            y = gm(x)
        mods = [(n, m) for n, m in gm.named_modules() if type(m).__module__.startswith("fxpress.")
                and isinstance(m, RuntimeModule)]
        assert mods, (name, pipe)
        out.append((f"{name}:{pipe}", gm, x, tuple(y.shape), artifact.dumps(gm), mods))
    return out


def _classes():
    return fxpress.registry().runtime_modules()


def _hostile(v, draw):
    """A value of the file's choosing for a config field now holding ``v``."""
    common = [None, 0, -1, 1, 2, 3, 8, 9, 1 << 40, True, False, 0.5, float("nan"), "x", [],
              "linear", "conv", "embedding", "symmetric", "affine", "tensor", "channel", "group",
              "token", "dynamic", "none", "sign", "ternary", "pow2", "layer_norm", "group_norm",
              "io", {}]
    if isinstance(v, list) and v and all(isinstance(d, int) for d in v):
        i = draw(st.integers(0, len(v) - 1))
        common += [v[:i] + [draw(st.sampled_from([0, -1, 1, v[i] + 1, v[i] * 2, 1 << 31]))] + v[i + 1:],
                   v[:-1], v + [1], list(reversed(v))]
    if isinstance(v, dict) and "$" not in v:
        common += [{**v, k: draw(st.sampled_from([None, 0, -1, "x", [1 << 31], True]))} for k in v]
    if isinstance(v, int) and not isinstance(v, bool):
        common += [v + 1, v - 1, v * 2]
    return draw(st.sampled_from([c for c in common if c != v or type(c) is not type(v)]))


def _tensor_mutation(t, draw):
    kinds = ["dtype", "drop_last", "append", "unsqueeze", "flatten", "empty"]
    kind = draw(st.sampled_from(kinds))
    flat = t.detach().reshape(-1)
    if kind == "dtype":
        # float32 <-> float64 is left out: a float64 model's codebooks and α are float64,
        # and an embedding returns its table's type (what the file declares it computes)
        dt = draw(st.sampled_from([d for d in (torch.float32, torch.float16, torch.bfloat16,
                                               torch.float64, torch.uint8, torch.int8,
                                               torch.int32, torch.int64, torch.bool)
                                   if d != t.dtype and not (
                                       {d, t.dtype} == {torch.float32, torch.float64})]))
        return kind, t.detach().to(dt)
    if kind == "drop_last":
        return kind, flat[:-1].clone()
    if kind == "append":
        return kind, torch.cat([flat, flat[:1] if flat.numel() else flat.new_zeros(1)])
    if kind == "unsqueeze":
        return kind, t.detach().unsqueeze(0).clone()
    if kind == "flatten":
        return kind, flat.clone()
    return kind, flat[:0].clone()


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _load_and_run(data, x, shape, what):
    """Load ``data``: refused with ArtifactFormatError, or a model whose forward on ``x``
    returns a finite tensor of ``shape``, load and call each within 20 s."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        try:
            gm = artifact.loads(data, _classes())
        except ArtifactFormatError:
            return "refused"
        with torch.no_grad():
            y = gm(x)
    except _Timeout:
        pytest.fail(f"{what}: load or first call took over 20 s")
    except Exception as e:  # what the test is about: a raw error at the first call
        pytest.fail(f"{what}: loaded, then the first call raised {type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == shape, (what, getattr(y, "shape", y))
    assert bool(torch.isfinite(y.float()).all()), f"{what}: non-finite output"
    return "ran"


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_a_changed_config_field_is_refused_at_load_or_runs(compressed, data):
    label, gm, x, shape, saved, mods = compressed[data.draw(st.integers(0, len(compressed) - 1))]
    header = artifact._split_prefix(saved, "t")[0]
    runtime = [m for m in header["modules"] if m.get("kind") == "runtime" and m.get("config")]
    m = data.draw(st.sampled_from(runtime))
    key = data.draw(st.sampled_from(sorted(m["config"])))
    value = _hostile(m["config"][key], data.draw)

    def mutate(h):
        next(q for q in h["modules"] if q.get("path") == m["path"])["config"][key] = value
    try:
        bad = tamper(saved, mutate)
    except (TypeError, ValueError):  # not storable as JSON (NaN in a tagged value): no file
        return
    _load_and_run(bad, x, shape, f"{label}: {m['path']}.{key} = {value!r}")


@SETTINGS
@given(data=st.data())
def test_a_changed_tensor_shape_or_dtype_is_refused_at_load_or_runs(compressed, data):
    label, gm, x, shape, saved, mods = compressed[data.draw(st.integers(0, len(compressed) - 1))]
    path, mod = mods[data.draw(st.integers(0, len(mods) - 1))]
    names = sorted(n for n, t in list(mod._parameters.items()) + list(mod._buffers.items())
                   if t is not None and n in mod.state_dict())
    if not names:
        return
    name = data.draw(st.sampled_from(names))
    kind, new = _tensor_mutation(mod.state_dict()[name], data.draw)
    g2 = copy.deepcopy(gm)
    sub = g2.get_submodule(path)
    if name in sub._parameters:
        sub._parameters[name] = torch.nn.Parameter(new, requires_grad=False)
    else:
        sub._buffers[name] = new
    _load_and_run(artifact.dumps(g2), x, shape, f"{label}: {path}.{name} {kind} -> "
                  f"{tuple(new.shape)} {new.dtype}")


def test_every_case_loads_and_runs_unchanged(compressed):
    for label, gm, x, shape, saved, mods in compressed:
        loaded = artifact.loads(saved, _classes())
        with torch.no_grad():
            assert torch.equal(loaded(x), gm(x)), label


@pytest.mark.parametrize("pipe, key, value, fragment", [
    # round 20's open class: each loaded, then failed at the first call with a raw error
    ("share", "kind", "conv", "config 'kind': is 'conv'"),
    ("share", "kind", "embedding", "config 'kind': is 'embedding'"),
    ("quantize", "shape", [32, 0], "config 'shape': is \\[32, 0\\]"),
    ("quantize", "shape", [32], "config 'shape': is \\[32\\]"),
    ("quantize{bits=4,granularity=group,group_size=8,activations=none}", "bits", 5,
     "tensor 'qweight': has shape \\[32, 12\\], expected \\[32, 15\\]"),
    ("quantize{bits=4,granularity=group,group_size=8,activations=none}", "group_size", 0,
     "config 'group_size'"),
    ("quantize", "granularity", "group", "config 'group_size'"),
    ("share", "zero_code", 1, "config 'zero_code'"),
])
def test_round_20_config_mismatches_are_refused_at_load(pipe, key, value, fragment):
    model, x = _model("mlp")
    res = fxpress.compress(model, pipe, (x,), progress=False, policy="warn")
    saved = artifact.dumps(res.module)
    bad = tamper(saved, lambda h: h["modules"][1]["config"].update({key: value}))
    with pytest.raises(ArtifactFormatError, match=f"module '0': [A-Za-z]+\\.from_state refused "
                                                  f"its config \\(StateError: {fragment}"):
        artifact.loads(bad, _classes())


def test_a_config_key_the_class_does_not_know_is_refused():
    """``latent`` in a quantized layer's config loaded as an attribute: every call then
    took the fine-tuning path on the file's value and failed with a raw TypeError."""
    model, x = _model("mlp")
    res = fxpress.compress(model, "quantize{bits=4,activations=none}", (x,), progress=False,
                           policy="warn")
    saved = artifact.dumps(res.module)
    bad = tamper(saved, lambda h: h["modules"][1]["config"].update({"latent": [1, 2]}))
    with pytest.raises(ArtifactFormatError, match="module '0': config key\\(s\\) \\['latent'\\] "
                                                  "are no field of QuantizedLinear"):
        artifact.loads(bad, _classes())


def test_a_compressed_conv_padding_past_the_limit_is_refused():
    """A share conv whose spec padding says 2**20: every call allocated a (2 MiB)^2 input."""
    model, x = _model("cnn")
    res = fxpress.compress(model, "share", (x,), progress=False, policy="warn")
    saved = artifact.dumps(res.module)
    header = artifact._split_prefix(saved, "t")[0]
    path = next(m["path"] for m in header["modules"] if m.get("class", "").endswith("CodebookConv"))

    def mutate(h):
        spec = next(m for m in h["modules"] if m.get("path") == path)["config"]["spec"]
        spec["v"] = [[k, {"$": "tuple", "v": [1 << 20, 1 << 20]} if k == "padding" else v]
                     for k, v in spec["v"]]
    with pytest.raises(ArtifactFormatError, match=f"module '{path}'.*padding"):
        artifact.loads(tamper(saved, mutate), _classes())


@pytest.mark.parametrize("pipe, name, value", [
    # a re-signed payload flip made a smoothing factor inf: ``positive`` let it through
    ("quantize{bits=4,smooth=0.5}", "smooth", float("inf")),
    ("quantize{bits=4,smooth=0.5}", "smooth", 1e-30),
    ("quantize{bits=4}", "scale", float("inf")),
    ("quantize{bits=4}", "scale", float("nan")),
    ("quantize{bits=4}", "scale", 0.0),
    ("quantize{bits=4}", "scale", -1.0),
    ("share{bits=4}", "codebook", float("nan")),
    ("share{bits=4}", "codebook", float("-inf")),
])
def test_non_finite_scales_smoothing_and_centroids_are_refused_at_load(pipe, name, value):
    """The writer stores only finite positive scales, finite centroids and smoothing
    factors of at least SMOOTH_MIN (the stored weight is divided by them); one inf, NaN or
    1e-30 made every output non-finite (found by flipping payload bits of real artifacts
    and re-signing them: a smoothing factor's exponent bit)."""
    model, x = _model("mlp")
    gm = fxpress.compress(model, pipe, (x,), progress=False, policy="warn").module
    sub = gm.get_submodule("0")
    t = sub.state_dict()[name].clone()
    t.view(-1)[0] = value
    if name in sub._parameters:
        sub._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
    else:
        sub._buffers[name] = t
    with pytest.raises(ArtifactFormatError, match=f"module '0': .*tensor '{name}': holds "
                                                  "(non-finite|factors under)"):
        artifact.loads(artifact.dumps(gm), _classes())
