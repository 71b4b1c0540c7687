"""fxpress.compile's errors are typed and name the module: a raw exception of torch.compile
(tracing, code generation or the generated code) never escapes a compiled model's call.

The model's copy runs the failing call uncompiled to say whose fault it is: a loaded
artifact's own typed error (file, node, module: a crafted layer of other widths that is
consistent with itself escaped as oneDNN's or aten's raw RuntimeError, or as a CompileError
naming only "GraphModule"), an InputError naming the node for inputs the model does not
take either, a CompileError naming the node Dynamo's tracing failed at otherwise.
Traced with ``aot_eager`` (the same whole graph, no code generated: seconds, not minutes).
"""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import ArtifactFormatError, CompileError, InputError
from fxpress.graph import artifact
from tests.helpers import assert_unchanged, state_snapshot
from tests.test_loaded_calls import _compress, _mlp


@pytest.mark.parametrize("pipe", ["quantize", "quantize{bits=4}", "prune{sparsity=0.5}",
                                  "share{bits=4}"])
def test_a_crafted_layer_of_other_widths_is_named_by_compile(pipe):
    x = torch.randn(6, 24)
    gm = _compress(_mlp(), pipe, x)
    # 5 x 32 weights stored as 10 x 16: the same bytes, each module consistent with itself
    other = _compress(torch.nn.Sequential(torch.nn.Linear(16, 10)).eval(), pipe, torch.randn(6, 16))
    gm._modules["2"] = other._modules["0"]
    loaded = artifact.loads(artifact.dumps(gm), fxpress.registry().runtime_modules(),
                            where="crafted.fxp")
    rng = torch.get_rng_state()
    with pytest.raises(ArtifactFormatError, match="crafted.fxp: the loaded graph fails at node "
                                                  "'_2' \\(module '2', [A-Za-z]+\\).*do not fit "
                                                  "its graph"):
        fxpress.compile(loaded, example_inputs=(x,), backend="aot_eager")
    compiled = fxpress.compile(loaded, backend="aot_eager")  # compiled at its first call
    with pytest.raises(ArtifactFormatError, match="node '_2' \\(module '2'"):
        compiled(x)
    assert torch.equal(torch.get_rng_state(), rng)


def test_inputs_the_model_does_not_take_are_an_input_error_naming_the_node():
    x = torch.randn(6, 24)
    gm = _compress(_mlp(), "quantize", x).train()
    before = state_snapshot(gm)
    with pytest.raises(InputError, match="fxpress.compile: GraphModule fails uncompiled too at "
                                         "node '_0' \\(module '0', QuantizedLinear\\) on these "
                                         "inputs .*6x25"):
        fxpress.compile(gm, example_inputs=(torch.randn(6, 25),), backend="aot_eager")
    # compiled for one width, called at another (a recompile, then the failure): typed too
    compiled = fxpress.compile(gm, example_inputs=(x,), backend="aot_eager")
    assert compiled(torch.randn(3, 24)).shape == (3, 5)
    with pytest.raises(InputError, match="node '_0' \\(module '0', QuantizedLinear\\)"):
        compiled(torch.randn(3, 25))
    assert gm.training and all(m.training for m in gm.modules())
    assert_unchanged(gm, before)


def _tolist_plus_length(t):
    return t + len(t.tolist())


def test_a_node_dynamo_cannot_trace_is_named_in_the_compile_error():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(_tolist_plus_length, (graph.call_module("fc", (x,)),)))
    root = torch.nn.Module()
    root.fc = torch.nn.Linear(24, 5)
    gm = torch.fx.GraphModule(root, graph)
    inputs = torch.randn(6, 24)
    assert gm(inputs).shape == (6, 5)  # runs uncompiled: torch.compile's failure, named
    with pytest.raises(CompileError, match="torch.compile failed on GraphModule at node "
                                           "'_tolist_plus_length' .*runs uncompiled"):
        fxpress.compile(gm, example_inputs=(inputs,), backend="aot_eager")


class _Tokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(40, 16)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids)).mean(1)


@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_token_ids_outside_the_vocabulary_are_an_input_error_on_either_dispatch_path(path):
    ids = torch.randint(0, 40, (3, 5))
    gm = _compress(_Tokens().eval(), "quantize{bits=4,granularity=group,group_size=8}", ids)
    compiled = fxpress.compile(gm, example_inputs=(ids,), backend="aot_eager")
    key = fxpress.compiled.size_key((ids,), {})
    compiled.choices[key] = path  # the path dispatch="fastest" chose for this size
    bad = ids.clone()
    bad[0, 0] = 40
    with pytest.raises(InputError, match="node 'emb' \\(module 'emb', QuantizedEmbedding\\)"):
        compiled(bad)
