"""Rollback records: while a pass runs on a copy, the graph before it holds weights that
differ from the caller's only by zeros as packed masks; every way back (rollback, errors'
``last_good``) gets the graph whole again, equal to the one before the pass."""
import pytest
import torch

import fxpress
from fxpress.errors import PassError
from fxpress.graph.memory import RollbackRecord
from fxpress.graph.weights import weighted_ops
from fxpress.passes.base import Pass, PassResult, PassTraits, option


def _model(seed=0):
    torch.manual_seed(seed)
    # 256x256 layers: large enough for a record (small tensors are kept as they are)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256)).eval()


class ScaleAll(Pass):
    """Replaces every weight (scaled), then optionally raises: a pass that fails midway."""

    name = "scale-all"
    traits = PassTraits(replaces_tensors=True)
    factor = option(1.5, "multiplier")
    fail = option(False, "raise after replacing the weights")

    def run(self, gm, ctx):
        for op in weighted_ops(gm):
            op.set_weight(op.weight() * self.factor)
        if self.fail:
            raise RuntimeError("midway")
        return PassResult(gm, True, {})


def _prune(s):  # a random MLP pruned this hard misses prune's default tolerance
    return fxpress.Pipeline.parse(f"prune{{sparsity={s},tol.min_cosine=0,tol.min_top1=0}}").passes[0]


def _weights(gm):
    return {op.name: op.weight().detach().clone() for op in weighted_ops(gm)}


def test_record_restores_pruned_weights_exactly():
    m = _model()
    originals = {n: p for n, p in m.named_parameters()}
    pruned = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    with torch.no_grad():
        pruned[0].weight = torch.nn.Parameter(m[0].weight.masked_fill(m[0].weight.abs() < 0.03, 0))
        other = torch.empty_strided((256, 256), (1, 256))  # another layout: kept as is
        other.copy_(m[2].weight.masked_fill(m[2].weight.abs() < 0.03, 0))
        pruned[2].weight = torch.nn.Parameter(other, requires_grad=False)
        pruned[0].bias, pruned[2].bias = m[0].bias, torch.nn.Parameter(m[2].bias + 1)
    want = {n: (t.detach().clone(), t.stride(), type(t), t.requires_grad)
            for n, t in pruned.named_parameters()}
    rec = RollbackRecord.shrink(pruned, originals)
    assert pruned[0].weight is None  # held as a mask: 1 bit per weight
    assert pruned[2].weight is not None  # its layout differs from the original's
    assert pruned[2].bias is not None  # not the original with zeros
    rec.restore()
    rec.restore()  # a second call does nothing
    got = dict(pruned.named_parameters())
    for n, (t, stride, kind, grad) in want.items():
        assert torch.equal(got[n], t) and got[n].stride() == stride
        assert type(got[n]) is kind and got[n].requires_grad == grad


@pytest.fixture(scope="module")
def pruned():
    m, x = _model(1), torch.randn(8, 256)
    return m, x, fxpress.compress(m, [_prune(0.5)], calibration=[(x,)]).module


def test_pass_after_prune_rolls_back_to_the_pruned_graph(pruned):
    m, x, want = pruned
    res = fxpress.compress(m, [_prune(0.5), ScaleAll(tol={"max_rel_l2": 1e-9})],
                           calibration=[(x,)], policy="rollback")
    assert [r.status for r in res.records] == ["ok", "rolled back"]
    w = _weights(want)
    assert {k: torch.equal(v, w[k]) for k, v in _weights(res.module).items()} == {k: True for k in w}
    assert torch.equal(res.module(x), want(x))


def test_failing_pass_after_prune_hands_back_the_pruned_graph(pruned):
    m, x, want = pruned
    before = {n: t.clone() for n, t in m.state_dict().items()}
    with pytest.raises(PassError) as e:
        fxpress.compress(m, [_prune(0.5), ScaleAll(fail=True)], calibration=[(x,)])
    assert torch.equal(e.value.last_good(x), want(x))
    assert all(torch.equal(t, before[n]) for n, t in m.state_dict().items())  # caller untouched
