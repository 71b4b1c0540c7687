"""Property tests: random models and random pipelines of built-in passes."""
from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import fxpress
from fxpress.passes.recipes import PassSpec, format_spec, parse_spec
from tests.helpers import assert_unchanged, state_snapshot

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow])


class RandomMLP(torch.nn.Module):
    def __init__(self, widths, bias):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b, bias=bias)
                                          for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class RandomCNN(torch.nn.Module):
    def __init__(self, channels, bias, classes):
        super().__init__()
        convs, c = [], 1
        for out in channels:
            convs.append(torch.nn.Conv2d(c, out, 3, padding=1, bias=bias))
            c = out
        self.convs = torch.nn.ModuleList(convs)
        self.bn = torch.nn.BatchNorm2d(c)
        self.head = torch.nn.Linear(c, classes, bias=bias)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(self.bn(x).mean((2, 3)))


@st.composite
def models(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    bias = draw(st.booleans())
    if draw(st.booleans()):
        widths = draw(st.lists(st.integers(2, 48), min_size=2, max_size=5))
        model = RandomMLP(widths, bias)
        x = torch.randn(draw(st.integers(2, 16)), widths[0])
    else:
        channels = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
        model = RandomCNN(channels, bias, draw(st.integers(2, 10)))
        x = torch.randn(draw(st.integers(2, 8)), 1, 6, 6)
    return model.train(False), x


def pass_texts():
    """One strategy per built-in pass, drawing valid random options."""
    prune = st.one_of(
        st.builds(lambda s, g: f"prune{{sparsity={s},scope={g}}}",
                  st.sampled_from([0.0, 0.1, 0.5, 0.75, 0.9]), st.sampled_from(["layer", "global"])),
        st.builds(lambda t: f"prune{{threshold={t}}}", st.sampled_from([0.0, 0.01, 0.1, 1.0])))
    share = st.builds(lambda b, g, d: f"share{{bits={b},scope={g},decode={d}}}",
                      st.integers(1, 8), st.sampled_from(["layer", "global"]),
                      st.sampled_from(["per_call", "once"]))
    quantize = st.builds(lambda b, g, s, sc: f"quantize{{bits={b},granularity={g},scheme={s}{sc}}}",
                         st.integers(2, 8), st.sampled_from(["channel", "tensor"]),
                         st.sampled_from(["symmetric", "affine"]),
                         st.sampled_from(["", ",scale=absmax", ",scale=mse"]))
    binarize = st.one_of(
        st.builds(lambda m, k: f"binarize{{mode={m},keep_first_last={k}}}",
                  st.sampled_from(["sign", "ternary"]), st.sampled_from(["true", "false"])),
        st.builds(lambda b: f"binarize{{mode=pow2,bits={b}}}", st.integers(2, 8)))
    # taps only: training is too slow for property tests
    distill = st.sampled_from(["distill", "distill{taps=[*]}"])
    return {"prune": prune, "share": share, "quantize": quantize, "binarize": binarize,
            "distill": distill}


def _pipeline(prunes, compressor, distill):
    # prune, share, quantize and binarize select float weighted ops; after share/quantize/
    # binarize none is left, so a second weight pass would (rightly) report that its
    # include globs match nothing: at most one of them, after the prunes
    return ",".join(prunes + compressor + distill) or "distill"


_T = pass_texts()
pipelines = st.builds(_pipeline, st.lists(_T["prune"], max_size=2),
                      st.lists(st.one_of(_T["share"], _T["quantize"], _T["binarize"]), max_size=1),
                      st.lists(_T["distill"], max_size=1))


@SETTINGS
@given(models(), pipelines)
def test_random_pipelines_on_random_models(model_and_input, text):
    model, x = model_and_input
    snap = state_snapshot(model)
    res = fxpress.compress(model, text, example_inputs=(x,), policy="warn", progress=False)
    res.module.graph.lint()
    out = res.module(x)
    assert torch.isfinite(out).all()
    assert len(res.records) == len(fxpress.Pipeline.parse(text))
    for r in res.records:
        assert r.cumulative is not None and r.incremental is not None
        assert math.isfinite(r.cumulative.rel_l2) or r.cumulative.rel_l2 == math.inf
        assert r.status in ("ok", "warn")
    assert_unchanged(model, snap)
    # save -> load round-trips bit-exactly
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.fxp"
        fxpress.save(res, path)
        loaded = fxpress.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), res.module(x))


names = st.from_regex(r"[a-z][a-z0-9_\-]{0,10}", fullmatch=True)
keys = st.from_regex(r"[a-z][a-z0-9_]{0,8}(\.[a-z][a-z0-9_]{0,6})?", fullmatch=True)
scalars = st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.none(),
                    st.floats(allow_nan=False, allow_infinity=False, width=64),
                    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12))
values = st.one_of(scalars, st.lists(scalars, max_size=4))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.builds(PassSpec, names, st.dictionaries(keys, values, max_size=4)),
                min_size=1, max_size=4))
def test_pipeline_text_round_trips(specs):
    text = format_spec(specs)
    again = parse_spec(text)
    assert again == specs
    assert format_spec(again) == text


@functools.lru_cache(maxsize=1)
def _small_artifact() -> bytes:
    torch.manual_seed(0)
    model = RandomMLP([6, 5, 3], bias=True).train(False)
    res = fxpress.compress(model, "prune{sparsity=0.5},share{bits=2}",
                           example_inputs=(torch.randn(4, 6),), policy="warn", progress=False)
    from fxpress.graph import artifact

    return artifact.dumps(res.module)


def _runtime():
    return fxpress.registry().runtime_modules()


@st.composite
def mutations(draw):
    data = _small_artifact()
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "random"]))
    if kind == "random":
        return draw(st.one_of(st.binary(max_size=200), st.binary(min_size=24, max_size=24).map(
            lambda b: data[:8] + b + data[32:])))  # random prefix fields behind good magic bytes
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    out = bytearray(data)
    for i in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=3, unique=True)):
        out[i] ^= draw(st.integers(1, 255))
    return bytes(out)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_damaged_artifacts_never_load_silently(data):
    assert data != _small_artifact()
    from fxpress.graph import artifact

    with pytest.raises(fxpress.errors.FxpressError):
        artifact.loads(data, _runtime())


def test_the_small_artifact_itself_loads():
    from fxpress.graph import artifact

    assert isinstance(artifact.loads(_small_artifact(), _runtime()), torch.fx.GraphModule)
