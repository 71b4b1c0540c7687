"""A crafted file whose modules are each consistent but do not fit the graph together (a
layer of other widths at the same byte count, a conv kernel reshaped, an embedding table
transposed, a node calling a module with two inputs) loaded, then its first call raised a
raw ``RuntimeError``/``IndexError``/``TypeError`` from torch. Now the arity is checked at
load and a raw error from a loaded graph's call is typed (``graph/artifact/calls.py``):
:class:`ArtifactFormatError` naming the module when the graph fails on inputs at the
shapes the file records, :class:`InputError` naming the node when only the caller's
inputs fail. Each file here is written by ``fxpress.save``'s own writer, so every checksum
and every module's state check passes."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import ArtifactFormatError, InputError
from fxpress.graph import artifact

PIPES = ["prune{sparsity=0.5}", "share{bits=4}", "quantize{bits=4}",
         "binarize{keep_first_last=false}"]


class _Emb(torch.nn.Module):
    def __init__(self, rows=40, dim=16):
        super().__init__()
        self.e = torch.nn.Embedding(rows, dim)
        self.norm = torch.nn.LayerNorm(16)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.norm(self.e(x))).mean(1)


class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(x)).mean((2, 3)))


def _mlp(widths=(24, 32, 5)):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(widths[0], widths[1]), torch.nn.ReLU(),
                               torch.nn.Linear(widths[1], widths[2])).eval()


def _compress(model, pipe, x):
    return fxpress.compress(model, pipe, (x,), progress=False, policy="warn").module


def _load(gm):
    return artifact.loads(artifact.dumps(gm), fxpress.registry().runtime_modules(),
                          where="crafted.fxp")


@pytest.mark.parametrize("pipe", PIPES)
def test_a_layer_of_other_widths_at_the_same_byte_count_is_named_at_the_first_call(pipe):
    x = torch.randn(6, 24)
    gm = _compress(_mlp(), pipe, x)
    # 5 x 32 weights become 10 x 16: the same bytes, each module consistent with itself
    other = _compress(torch.nn.Sequential(torch.nn.Linear(16, 10)).eval(), pipe, torch.randn(6, 16))
    gm._modules["2"] = other._modules["0"]
    loaded = _load(gm)
    with pytest.raises(ArtifactFormatError, match="crafted.fxp: the loaded graph fails at node "
                                                  "'_2' \\(module '2', [A-Za-z]+\\).*shapes "
                                                  "cannot be multiplied.*do not fit its graph"):
        loaded(x)


@pytest.mark.parametrize("pipe", PIPES[:3])
def test_a_conv_kernel_reshaped_to_the_same_bytes_is_named_at_the_first_call(pipe):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 6)
    gm = _compress(_CNN().eval(), pipe, x)
    other = _compress(torch.nn.Sequential(torch.nn.Conv2d(9, 8, 1)).eval(), pipe,
                      torch.randn(2, 9, 6, 6))
    gm._modules["c1"] = other._modules["0"]  # [8, 1, 3, 3] -> [8, 9, 1, 1]
    with pytest.raises(ArtifactFormatError, match="node 'c1' \\(module 'c1', [A-Za-z0-9]+\\).*"
                                                  "do not fit its graph"):
        _load(gm)(x)


@pytest.mark.parametrize("pipe", ["prune{sparsity=0.5,ops=[embedding]}", "share{ops=[embedding]}",
                                  "quantize{bits=4,granularity=group,group_size=8}"])
def test_a_transposed_embedding_names_the_embedding_not_the_norm_after_it(pipe):
    torch.manual_seed(0)
    x = torch.randint(0, 40, (3, 5))
    gm = _compress(_Emb().eval(), pipe, x)
    other = _compress(torch.nn.Sequential(torch.nn.Embedding(16, 40)).eval(), pipe,
                      torch.randint(0, 16, (3, 5)))
    gm._modules["e"] = other._modules["0"]  # a 40 x 16 table stored as 16 x 40
    with pytest.raises(ArtifactFormatError, match="node 'e' \\(module 'e', [A-Za-z]+\\) returns "
                                                  "\\[3, 5, 40\\] float32 where the file records "
                                                  "\\[3, 5, 16\\] float32"):
        _load(gm)(x)


@pytest.mark.parametrize("pipe", PIPES)
def test_a_node_calling_a_module_with_two_inputs_is_refused_at_load(pipe):
    x = torch.randn(6, 24)
    gm = _compress(_mlp(), pipe, x)
    node = [n for n in gm.graph.nodes if n.op == "call_module"][-1]
    node.args = (node.args[0], node.args[0])
    gm.recompile()
    with pytest.raises(ArtifactFormatError, match="crafted.fxp: node '_2' calls module '2' "
                                                  "\\([A-Za-z]+\\) with 2 argument\\(s\\)"):
        _load(gm)


def test_the_callers_wrong_input_is_an_input_error_and_nothing_of_theirs_changes():
    x = torch.randn(6, 24)
    loaded = _load(_compress(_mlp(), "share{bits=4}", x))
    loaded.train()
    wrong = torch.randn(6, 25)
    rng = torch.get_rng_state()
    with pytest.raises(InputError, match="crafted.fxp: the loaded graph fails at node '_0' "
                                         "\\(module '0', CodebookLinear\\) on these inputs .*6x25.*"
                                         "saved for \\(input_1 \\[6, 24\\] float32\\)"):
        loaded(wrong)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in loaded.modules())
    # another batch size is no error: the records name the shapes saved, not the only ones
    assert loaded.eval()(torch.randn(7, 24)).shape == (7, 5)
