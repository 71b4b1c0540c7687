"""fxpress.compile over models x built-in passes x (in memory, saved and loaded).

Each cell compresses a tiny model with one pipeline, compiles the graph (in memory) or the
artifact it saves (loaded back, its runtime modules rebuilt from data) with
``fullgraph=True`` and dynamic shapes at batch 4, then runs batch 1, batch 32 and another
batch at another sequence length: all must run the one graph compiled first (a conv
model: one more for batch 32, torch's own, see ``GRAPHS``), and equal the same model
uncompiled (the int8 product as the traced form computes it).

Dynamo's tracing is what breaks a graph or specialises a size, so the cells compile with
the ``eager`` backend (Dynamo's whole graph, run by torch's eager kernels: seconds, where
Inductor's code generation takes tens); ``tests/test_compile.py`` runs Inductor itself on
the int8 path. To stay fast, every pass runs on one or two models, and each model runs one
pipeline in memory and another loaded; ``python -m bench compile`` runs the whole product
(every model, every pass, both forms).

Not in the matrix: ``distill`` (it rewrites no weight: its graph is the captured one, as
compiled in memory here) and ``budget`` (its product is layers of the passes below).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import fxpress
from fxpress.passes.int8 import int8_backend

#: model -> (pipeline compiled in memory, pipeline compiled after save + load)
CELLS = {
    "mlp": ("prune{sparsity=0.5},quantize{bits=8}", "binarize{mode=sign}"),
    "cnn": ("fold_bn,share{bits=4}", "fold_bn,binarize{mode=pow2}"),
    "bert": ("quantize{bits=8}", "share{bits=4}"),
    "gpt2": ("binarize{mode=ternary}", "quantize{bits=4,granularity=group,group_size=16}"),
    "lstm": ("small,prune{sparsity=0.5}", "quantize{bits=8}"),
}


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(),
                                       torch.nn.Linear(48, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


#: graphs expected over the four shapes where torch itself compiles more than one: a conv's
#: kernel (and so its output layout) is chosen per batch range, and Dynamo guards the
#: batch below 16 (torch's fake conv), so batch 32 is a second graph (README "Compiled
#: models"), compressed or not
GRAPHS = {"cnn": 2}


def _model(name: str):
    """(model in eval mode, inputs at batch 4, inputs at batch 3 with another length/size)."""
    g = torch.Generator().manual_seed(1)
    if name in ("mlp", "cnn"):
        torch.manual_seed(0)
        if name == "mlp":
            return _MLP().eval(), (torch.randn(4, 64, generator=g),), (torch.randn(3, 64, generator=g),)
        model = _CNN().eval()
        for bn in (model.bn1, model.bn2):  # statistics of its own, not the identity
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        return model, (torch.randn(4, 3, 12, 12, generator=g),), (torch.randn(3, 3, 16, 16, generator=g),)
    from tests.zoo import build

    spec = build(name)
    return spec.model, tuple(t.repeat(2, *[1] * (t.dim() - 1)) for t in spec.inputs), spec.reshaped


def _floats(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def compile_cell(name: str, pipeline: str, form: str, folder) -> int:
    """Compress model ``name`` with ``pipeline``, compile it (``form``: "memory", or
    "loaded" from an artifact saved in ``folder``), run batch 4, 1, 32 and another
    length, check each equals the uncompiled graph (AssertionError otherwise) and return
    how many graphs were compiled. ``python -m bench compile`` runs it over the product."""
    from pathlib import Path

    model, x4, other = _model(name)
    gm = fxpress.compress(model, pipeline, x4, policy="warn", progress=False).module
    if form == "loaded":
        fxpress.save(gm, Path(folder) / "m.fxp")
        gm = fxpress.load(Path(folder) / "m.fxp")
    # every call compiled (the default dispatch may run a size uncompiled where that is faster)
    fast = fxpress.compile(gm, x4, backend="eager", dispatch="compiled")
    # the default int8 product (oneDNN's, where it runs: uint8 codes, 127 levels on CPUs
    # without VNNI) is checked against the reference within the quantize pass's cosine;
    # forced to _int_mm, the traced form computes the reference's integer product exactly
    int8 = any(hasattr(m, "int8_forward") for m in gm.modules())
    with int8_backend("int_mm"):
        exact = fxpress.compile(gm, x4, backend="eager", dispatch="compiled") if int8 and fast.product[0] != "int_mm" else fast
    one = tuple(t[:1] for t in x4)
    x32 = tuple(t.repeat(8, *[1] * (t.dim() - 1)) for t in x4)
    for x in (one, x32, other, x4):
        with torch.no_grad():
            got, got_exact = _floats(fast(*x)), _floats(exact(*x))
            with int8_backend("reference"):  # the int8 product the traced _int_mm form computes
                want = _floats(gm(*x))
        assert len(got) == len(got_exact) == len(want) > 0
        for a, e, b in zip(got, got_exact, want):
            assert a.shape == e.shape == b.shape
            torch.testing.assert_close(e, b, rtol=1e-4, atol=1e-4)
            if a is not e:
                cos = torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0)
                assert cos > 0.999, f"compiled int8 product: cosine {float(cos):.5f} to the reference"
    assert exact.compiles == fast.compiles
    return fast.compiles


@pytest.mark.parametrize("form", ["memory", "loaded"])
@pytest.mark.parametrize("name", list(CELLS))
def test_compiled_whole_with_one_graph_for_every_batch_and_length(name, form, tmp_path):
    pipeline = CELLS[name][form == "loaded"]
    graphs = compile_cell(name, pipeline, form, tmp_path)
    assert graphs == GRAPHS.get(name, 1), \
        f"{name} {pipeline} ({form}): {graphs} graphs for batch 4, 1, 32 and another length"
