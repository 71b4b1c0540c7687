"""Matrices read inside one fused call (LSTM/GRU gates, nn.MultiheadAttention's and
nn.TransformerEncoder's projections) are stored compressed by quantize, share and
binarize, in symbolically traced and exported graphs: the float matrices leave the
state_dict, the output stays close, save/load is exact, fine-tuning reaches them, the
caller's model is untouched, and a crafted mapping cannot reach the host's attributes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress
from fxpress.graph.fused import DecodedWeight, FusedCall
from fxpress.graph.inspect import layers
from fxpress.graph.runtime import compressed_modules
from tests.helpers import assert_unchanged, state_snapshot


class Tagger(nn.Module):
    def __init__(self, layers: int = 2, attention: bool = True):
        super().__init__()
        self.rnn = nn.LSTM(8, 16, num_layers=layers, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True) if attention else None
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h, _ = self.rnn(x)
        if self.attn is not None:
            h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h)


def _tagger(**kw) -> Tagger:
    torch.manual_seed(0)
    return Tagger(**kw).eval()


@pytest.fixture(scope="module")
def model():
    return _tagger()


def _x(b=3, t=5, seed=1):
    return (torch.randn(b, t, 8, generator=torch.Generator().manual_seed(seed)),)


def _float_matrices(gm) -> set[str]:
    return {n for n, p in gm.named_parameters() if p.dim() == 2 and p.numel()}


@pytest.mark.parametrize("pipeline,method", [
    ("quantize{bits=4,granularity=group,group_size=8}", "fx"),
    ("share{bits=4}", "fx"), ("binarize{mode=pow2,keep_first_last=false}", "fx"),
    ("quantize", "export")])
def test_fused_matrices_are_stored_compressed(model, tmp_path, pipeline, method):
    if method == "export":  # exported: aten.lstm reads its matrices from get_attr nodes
        model = _tagger(layers=1, attention=False)
    before = state_snapshot(model)
    res = fxpress.compress(model, pipeline, _x(), capture_method=method)
    gm = res.module
    assert_unchanged(model, before)  # the caller's LSTM keeps its own float matrices
    assert _float_matrices(gm) == set()  # every matrix, fused ones included, is compressed
    wrappers = [m for m in gm.modules() if isinstance(m, (FusedCall, DecodedWeight))]
    assert wrappers
    assert not res.records[-1].stats.get("skipped")
    shapes = [(3, 5)] + ([(2, 7)] if method == "fx" else [])  # fx: another batch and length
    for b, t in shapes:
        with torch.no_grad():
            ref, out = model(*_x(b, t, 3)), gm(*_x(b, t, 3))
        assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), 0) > 0.95
    path = tmp_path / "m.fxp"
    fxpress.save(res, path)
    stored = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
    assert stored < 0.5 * sum(t.numel() * 4 for t in model.state_dict().values())
    loaded = fxpress.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(*_x()), gm(*_x()))
    # inspect shows the host (its biases) and each compressed matrix as its own row
    rows = {r.name: r.type for r in layers(loaded)}
    assert "FusedCall" not in rows.values() and "DecodedWeight" not in rows.values()
    if method == "fx":
        assert rows["rnn.host"] == "LSTM" and rows["rnn.w0"] == type(gm.rnn.w0).__name__


def test_distill_fine_tunes_through_the_fused_call(model):
    torch.manual_seed(0)
    data = [(_x(8, 5, s)[0], torch.randint(0, 4, (8, 5))) for s in range(4)]
    res = fxpress.compress(model, "share{bits=3},distill{epochs=2,lr=0.01,tol.min_top1=0,"
                                  "tol.min_accuracy_ratio=0}", _x(), train_data=data)
    shared = fxpress.compress(model, "share{bits=3}", _x()).module
    fused = {n: m for n, m in compressed_modules(res.module) if ".w" in n}
    before = dict(compressed_modules(shared))
    assert fused and any(not torch.equal(m.codebook, before[n].codebook) for n, m in fused.items())


def test_a_crafted_mapping_cannot_reach_host_attributes(model):
    gm = fxpress.compress(model, "quantize", _x()).module
    call = next(m for m in gm.modules() if isinstance(m, FusedCall))
    call.weights = {"w0": "training"}  # what a crafted file's config could say
    with pytest.raises(TypeError, match="empty parameter"):
        call(*_x())
    call.weights = {"w0": "weight_ih_l1"}  # a real parameter that is not a placeholder
    call.host.weight_ih_l1 = nn.Parameter(torch.ones(64, 16))
    with pytest.raises(TypeError, match="empty parameter"):
        call(*_x())


class CellLoop(nn.Module):
    """An RNN cell stepped in a Python loop: symbolic tracing cannot iterate a traced
    length, so capture exports it, and export unrolls the loop into ``aten.*_cell`` calls
    that take the gate matrices as arguments."""

    def __init__(self, cell: type):
        super().__init__()
        self.cell, self.head = cell(8, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.zeros(x.shape[0], 12)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            h = h[0] if isinstance(h, tuple) else h
        return self.head(h)


@pytest.mark.parametrize("cell", [nn.GRUCell, nn.RNNCell])
def test_exported_rnn_cell_gates_are_compressed(cell, tmp_path):
    torch.manual_seed(0)
    model = CellLoop(cell).eval()
    res = fxpress.compress(model, "quantize", _x(2, 4))
    gm = res.module
    assert gm.meta["fxpress"]["method"] == "export"
    assert _float_matrices(gm) == set() and not res.records[0].stats.get("float_weights")
    assert {"cell.weight_ih", "cell.weight_hh"} <= set(res.records[0].stats["layers"])
    assert sum(isinstance(m, DecodedWeight) for m in gm.modules()) == 2
    with torch.no_grad():
        ref, out = model(*_x(2, 4, 5)), gm(*_x(2, 4, 5))
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), 0) > 0.99
    fxpress.save(res, tmp_path / "cell.fxp")
    with torch.no_grad():
        assert torch.equal(fxpress.load(tmp_path / "cell.fxp")(*_x(2, 4, 5)), out)
