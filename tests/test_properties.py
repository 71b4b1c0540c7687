"""Property tests: random models and random pipelines of built-in passes."""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fxpress
from fxpress.passes.spec import PassSpec, format_spec, parse_spec
from tests.helpers import assert_unchanged, state_snapshot

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
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
    return {"prune": prune}


pipelines = st.lists(st.one_of(*pass_texts().values()), min_size=1, max_size=3).map(",".join)


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
