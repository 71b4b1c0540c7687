"""Crafted files against the ATen kernels a loaded graph reaches (graph/artifact/kernels.py).

Each test builds the graph an attacker would store: an allowlisted ATen op called with
tensors or integers that torch's CPU kernel does not compare (it read or wrote past them:
NaNs, garbage that changed between identical calls, a corrupted heap). The loader refuses
the constants at load and checks the rest before every call, with a typed error.
"""
from __future__ import annotations

import json
import operator

import pytest
import torch

from fxpress.errors import ArtifactFormatError, ArtifactLimitError, InputError
from fxpress.graph import artifact
from fxpress.graph.artifact.kernels import fxpress_kernel_guard

aten = torch.ops.aten


def _graph_module(tensors: dict[str, torch.Tensor], build) -> torch.fx.GraphModule:
    """A GraphModule whose graph ``build(g, x, attrs)`` returns the output node of."""
    root = torch.nn.Module()
    for k, t in tensors.items():
        root.register_buffer(k, t)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(build(g, x, {k: g.get_attr(k) for k in tensors}))
    return torch.fx.GraphModule(root, g)


def _guards(gm: torch.fx.GraphModule) -> int:
    return sum(n.target is fxpress_kernel_guard for n in gm.graph.nodes)


def _roundtrip(gm: torch.fx.GraphModule, x: torch.Tensor) -> torch.fx.GraphModule:
    loaded = artifact.loads(artifact.dumps(gm))
    assert torch.equal(loaded(x), gm(x)) and _guards(loaded) == 1
    assert "fxpress_kernel_guard" not in json.dumps(artifact.artifact_header(loaded))
    assert torch.equal(artifact.loads(artifact.dumps(loaded))(x), gm(x))
    return loaded


@pytest.mark.parametrize("op", ["_native_batch_norm_legit_no_training", "native_batch_norm",
                                "_native_batch_norm_legit_functional"])
def test_batch_norm_statistics_must_fit_the_input_channels(op):
    # 2-element statistics for a 16-channel input: the kernel read (NaNs) and, training,
    # wrote past them (the functional form crashed the process)
    fn = getattr(aten, op).default
    extra = {"_native_batch_norm_legit_no_training": (0.1, 1e-5),
             "native_batch_norm": (False, 0.1, 1e-5),
             "_native_batch_norm_legit_functional": (True, 0.1, 1e-5)}[op]

    def build(g, x, a):
        out = g.call_function(fn, (x, *a.values(), *extra))
        return g.call_function(aten.clone.default, (g.call_function(operator.getitem, (out, 0)),))

    torch.manual_seed(0)
    x = torch.randn(2, 16, 4)
    stats = {"weight": torch.rand(16) + 0.5, "bias": torch.randn(16),
             "running_mean": torch.randn(16), "running_var": torch.rand(16) + 0.5}
    _roundtrip(_graph_module(stats, build), x)
    for name in stats:
        crafted = _graph_module({**stats, name: stats[name][:2].clone()}, build)
        loaded = artifact.loads(artifact.dumps(crafted))
        with pytest.raises(InputError, match=f"{name} is \\(2,\\), the input .* has 16 channels"):
            loaded(x)
    with pytest.raises(InputError, match="has 2 channels"):  # the input is checked too
        _roundtrip(_graph_module(stats, build), x)(torch.randn(2, 2, 4))


@pytest.mark.parametrize("op", ["_weight_norm_interface", "_weight_norm"])
def test_weight_norm_scales_must_fit_the_weight(op):
    # a 2-element g for a 16-row v: the fused kernel wrote past it (munmap_chunk(): invalid
    # pointer); on the last dim it read past it
    fn = getattr(aten, op).default

    def build(dim):
        def b(g, x, a):
            w = g.call_function(fn, (a["v"], a["g"], dim))
            if op == "_weight_norm_interface":
                w = g.call_function(operator.getitem, (w, 0))
            return g.call_function(aten.mm.default, (x, w))
        return b

    torch.manual_seed(0)
    v, x = torch.randn(16, 16), torch.randn(3, 16)
    for dim, g_shape in [(0, (16, 1)), (1, (1, 16))]:
        _roundtrip(_graph_module({"v": v, "g": torch.rand(g_shape)}, build(dim)), x)
        crafted = _graph_module({"v": v, "g": torch.rand(2, 1)}, build(dim))
        with pytest.raises(InputError, match="does not hold one scale per slice"):
            artifact.loads(artifact.dumps(crafted))(x)


def test_flash_attention_keys_must_fit_the_queries():
    # keys and values of batch 1 for queries of batch 4: the kernel read past them (NaNs)
    def build(g, x, a):
        out = g.call_function(aten._scaled_dot_product_flash_attention_for_cpu.default,
                              (x, a["k"], a["v"]))
        return g.call_function(operator.getitem, (out, 0))

    torch.manual_seed(0)
    x, kv = torch.randn(4, 2, 8, 16), torch.randn(4, 2, 8, 16)
    loaded = _roundtrip(_graph_module({"k": kv, "v": kv.clone()}, build), x)
    crafted = _graph_module({"k": kv[:1].clone(), "v": kv[:1].clone()}, build)
    with pytest.raises(InputError, match="do not fit \\(batch, heads"):
        artifact.loads(artifact.dumps(crafted))(x)
    with pytest.raises(InputError, match="do not fit"):
        loaded(torch.randn(4, 2, 8, 16)[:, :1])  # the input is checked at each call


@pytest.mark.parametrize("field", [2, 3])
def test_grid_sampler_modes_are_checked_at_load(field):
    # interpolation / padding modes past the kernel's switch returned uninitialised memory
    def build(mode):
        def b(g, x, a):
            args = [x, a["grid"], 0, 0, False]
            args[field] = mode
            return g.call_function(aten.grid_sampler_2d.default, tuple(args))
        return b

    torch.manual_seed(0)
    x, grid = torch.randn(1, 1, 4, 4), torch.rand(1, 3, 3, 2) * 2 - 1
    gm = _graph_module({"grid": grid}, build(1))
    loaded = artifact.loads(artifact.dumps(gm))
    assert torch.equal(loaded(x), gm(x)) and _guards(loaded) == 0
    with pytest.raises(ArtifactFormatError, match="_mode is 9, not 0, 1 or 2"):
        artifact.loads(artifact.dumps(_graph_module({"grid": grid}, build(9))))


_HUGE = 1 << 36  # elements: 256 GiB of float32


@pytest.mark.parametrize("build", [
    lambda g, x: g.call_function(torch.zeros, (1 << 18, 1 << 18)),
    lambda g, x: g.call_function(torch.full, ((_HUGE,), 1.0)),
    lambda g, x: g.call_function(aten.arange.start_step, (0, 1.0, 1e-9)),
    lambda g, x: g.call_method("new_zeros", (x, (_HUGE,))),
    lambda g, x: g.call_method("contiguous", (g.call_method("expand", (x, 1 << 18, 1 << 18)),)),
    lambda g, x: g.call_function(aten.repeat.default, (x, [1 << 18, 1 << 18])),
    lambda g, x: g.call_function(torch.bincount, (x,), {"minlength": _HUGE}),
    lambda g, x: g.call_function(aten.histc.default, (x, _HUGE)),
    lambda g, x: g.call_function(torch.nn.functional.pad, (x, [_HUGE, 0])),
    lambda g, x: g.call_function(aten.convolution.default, (x, x, None, [1], [_HUGE], [1], False,
                                                            [0], 1)),
    lambda g, x: g.call_function(torch.nn.functional.interpolate, (x,), {"scale_factor": 1e11}),
    lambda g, x: g.call_function(torch.fft.rfft, (x, _HUGE)),
    lambda g, x: g.call_function(aten.fft_irfftn.default, (x, [1 << 18, 1 << 18])),
], ids=["zeros", "full", "arange", "new_zeros", "expand", "repeat", "bincount", "histc", "pad",
        "conv_padding", "interpolate", "rfft", "irfftn"])
def test_sizes_the_file_states_are_bounded_at_load(build):
    # a few bytes of graph asked for 256 GiB when called: refused at load, by the limit
    crafted = _graph_module({}, lambda g, x, a: build(g, x))
    with pytest.raises(ArtifactLimitError, match="from sizes the file states, past the limit"):
        artifact.loads(artifact.dumps(crafted))
    artifact.loads(artifact.dumps(crafted), max_bytes=1 << 40)  # raised for a trusted file


def test_sizes_computed_from_the_input_and_slices_to_the_end_load():
    # export graphs slice to int64's max and size masks from the input: not a constant size
    def build(g, x, a):
        n = g.call_function(aten.sym_size.int, (x, 0))
        mask = g.call_function(aten.full.default, ([n, n], 1.0))
        end = g.call_function(aten.slice.Tensor, (x, 0, 0, 9223372036854775807))
        return g.call_function(aten.add.Tensor, (mask, g.call_function(aten.sum.default, (end,))))

    gm = _graph_module({}, build)
    x = torch.arange(3.0)
    assert torch.equal(artifact.loads(artifact.dumps(gm))(x), gm(x))


@pytest.mark.parametrize("module", [
    torch.nn.Conv1d(1, 1, 3, padding=1 << 34), torch.nn.Upsample(scale_factor=1e11),
    torch.nn.AdaptiveAvgPool2d((1 << 18, 1 << 18)), torch.nn.ConstantPad1d((1 << 36, 0), 0.0)],
    ids=["conv", "upsample", "adaptive_pool", "pad"])
def test_module_size_fields_are_bounded_at_load(module):
    g = torch.fx.Graph()
    g.output(g.call_module("m", (g.placeholder("x"),)))
    crafted = torch.fx.GraphModule(torch.nn.ModuleDict({"m": module}), g)
    with pytest.raises(ArtifactLimitError, match="module 'm': .* past the limit"):
        artifact.loads(artifact.dumps(crafted))


def test_torch_lstm_calls_in_fx_graphs_are_checked_at_every_call():
    # an fx graph reaches the unchecked CPU LSTM kernel through torch.lstm, not only aten.lstm:
    # a 2-row weight_hh for 16 units loaded and ran on heap memory past it
    from fxpress.graph.artifact.rnn import fxpress_lstm_guard

    def build(g, x, a):
        out = g.call_function(torch.lstm, (x, [a["h"], a["c"]], [a["wih"], a["whh"], a["bih"],
                                                                 a["bhh"]], True, 1, 0.0, False,
                                           False, True))
        return g.call_function(operator.getitem, (out, 0))

    torch.manual_seed(0)
    t = {"h": torch.zeros(1, 2, 16), "c": torch.zeros(1, 2, 16), "wih": torch.randn(64, 8),
         "whh": torch.randn(64, 16), "bih": torch.randn(64), "bhh": torch.randn(64)}
    x = torch.randn(2, 5, 8)
    gm = _graph_module(t, build)
    loaded = artifact.loads(artifact.dumps(gm))
    assert torch.equal(loaded(x), gm(x))
    assert sum(n.target is fxpress_lstm_guard for n in loaded.graph.nodes) == 1
    crafted = _graph_module({**t, "whh": t["whh"][:2].clone()}, build)
    with pytest.raises(InputError, match="do not have the shapes"):
        artifact.loads(artifact.dumps(crafted))(x)


@pytest.mark.parametrize("call", ["aten", "torch", "torch_by_name"])
def test_packed_lstm_calls_check_their_batch_sizes(call):
    # aten.lstm.data steps through the data and the states by batch_sizes unchecked: a first
    # size of 6 for states of batch 1 corrupted the heap (abort), increasing sizes computed
    # garbage; the guard now compares them with the data and the states
    def build(g, x, a):
        w = [a["wih"], a["whh"], a["bih"], a["bhh"]]
        rest = ([a["h"], a["c"]], w, True, 1, 0.0, False, False)
        if call == "torch_by_name":
            out = g.call_function(torch.lstm, (x,), dict(zip(
                ("batch_sizes", "hx", "params", "has_biases", "num_layers", "dropout", "train",
                 "bidirectional"), (a["bs"], *rest))))
        else:
            out = g.call_function(aten.lstm.data if call == "aten" else torch.lstm, (x, a["bs"], *rest))
        return g.call_function(operator.getitem, (out, 0))

    torch.manual_seed(0)
    t = {"wih": torch.randn(64, 8), "whh": torch.randn(64, 16), "bih": torch.randn(64),
         "bhh": torch.randn(64)}
    x = torch.randn(6, 8)
    states = {n: torch.zeros(1, 3, 16) for n in "hc"}
    gm = _graph_module({**t, **states, "bs": torch.tensor([3, 2, 1])}, build)
    assert torch.equal(artifact.loads(artifact.dumps(gm))(x), gm(x))
    for bs, batch, fragment in [([6], 1, "do not fit"), ([1, 2, 3], 3, "non-increasing"),
                                ([3, 3, 3], 3, "adding up"), ([3.0, 2.0, 1.0], 3, "int64")]:
        crafted = _graph_module({**t, **{n: torch.zeros(1, batch, 16) for n in "hc"},
                                 "bs": torch.tensor(bs)}, build)
        with pytest.raises(InputError, match=fragment):
            artifact.loads(artifact.dumps(crafted))(x)
