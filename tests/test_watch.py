"""Calibration statistics stop at the last node they watch: quantize's and prune's
recorders do not compute what only feeds the output (a language model's head)."""
from __future__ import annotations

import torch
import torch.fx

from fxpress.graph.weights import CONV, EMBEDDING, LINEAR, weighted_ops
from fxpress.passes import prune as P
from fxpress.passes import quantize as Q

CALLS = {"tail": 0}


@torch.fx.wrap
def _tail(x):
    CALLS["tail"] += 1
    return x * 2


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x):
        return _tail(self.b(torch.relu(self.a(x))))


def _full(gm, rec_cls, nodes, batches, *extra):
    """The statistics of a recorder that runs every node (the code before the change)."""
    class Full(rec_cls):
        def run_node(self, n):
            out = torch.fx.Interpreter.run_node(self, n)
            if n in self.watch:
                self.watched(n, out)
            return out
    rec = Full(gm, nodes, *extra)
    with torch.no_grad():
        for b in batches:
            rec.run(*b)
            rec.env = {}
    return rec


def test_recorders_skip_the_nodes_after_the_last_watched_one_with_the_same_statistics():
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(Net().eval())
    batches = [(torch.randn(5, 8),), (torch.randn(3, 8) * 4,)]
    ops = weighted_ops(gm, [LINEAR, CONV, EMBEDDING])
    nodes = {op._input: op.kind for op in ops}
    CALLS["tail"] = 0
    rec = Q._record_inputs(gm, ops, batches)
    assert CALLS["tail"] == 0  # the tail only feeds the output: never run
    ref = _full(gm, Q._InputRecorder, nodes, batches, 512)
    assert CALLS["tail"] == 2
    assert rec.absmax.keys() == ref.absmax.keys() == nodes.keys()
    for n in nodes:
        assert torch.equal(rec.absmax[n], ref.absmax[n])
        assert torch.equal(rec.sample[n], ref.sample[n])
    CALLS["tail"] = 0
    scales = P.input_scales(gm, ops, batches)
    assert CALLS["tail"] == 0
    ref = _full(gm, P._ColumnRMS, nodes, batches)
    assert set(scales) == {op.name for op in ops}
    for op in ops:
        n = op._input
        rms = (ref.sums[n] / ref.counts[n]).sqrt().reshape(1, -1)
        assert torch.equal(scales[op.name], rms)

