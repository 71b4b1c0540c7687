"""A model's own torch.autograd.Function (a straight-through estimator) through capture,
distill and save: training runs the model's backward, artifacts store the forward's ops."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxpress
from fxpress.errors import GradientWarning, UnsupportedGraphError
from fxpress.graph.capture import capture
from fxpress.graph.custom_functions import function_nodes


class RoundSTE(torch.autograd.Function):
    """Round to quarters in the forward pass, identity gradient (straight-through)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1)


class ClampSplit(torch.autograd.Function):
    """New-style (setup_context), two outputs, a non-tensor argument."""

    @staticmethod
    def forward(x, limit):
        return x.clamp(-limit, limit), torch.sign(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.limit = inputs[1]

    @staticmethod
    def backward(ctx, g, g_sign):
        return g * 0.5, None


class Branchy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2 if x.sum() > 0 else x  # Python control flow on a tensor value

    @staticmethod
    def backward(ctx, g):
        return g


class STEMLP(nn.Module):
    def __init__(self, fn: str = "round"):
        super().__init__()
        self.fn = fn
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, 10)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if self.fn == "round":
            h = RoundSTE.apply(h)
        elif self.fn == "split":
            h, s = ClampSplit.apply(h, 0.5)
            h = h + 0.1 * s
        else:
            h = Branchy.apply(h)
        return self.fc3(F.gelu(self.fc2(h)))


def _model(fn="round", seed=0):
    torch.manual_seed(seed)
    return STEMLP(fn).eval()


@pytest.mark.parametrize("fn", ["round", "split"])
@pytest.mark.parametrize("seed", [0, 1])
def test_captured_graph_trains_through_the_models_backward(digits, fn, seed):
    """The captured graph's gradients are the model's own (its backward, not torch.round's
    zero gradient): every parameter, the layer before the Function included."""
    model = _model(fn, seed)
    x, y = digits.x_train[:64], digits.y_train[:64]
    gm = capture(model, (x,))
    assert list(function_nodes(gm).values()) == [f"{__name__}.{'RoundSTE' if fn == 'round' else 'ClampSplit'}"]
    model.train()  # the model's own gradients, for reference
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(gm(x), y).backward()
    for name, p in model.named_parameters():
        got = gm.get_parameter(name).grad
        assert got is not None and torch.allclose(got, p.grad, atol=1e-6), name
    assert gm.get_parameter("fc1.weight").grad.abs().sum() > 0


def _trained(model, digits, epochs=3):
    """A few epochs on digits through the model's own backward, so distill starts from a
    model worth agreeing with."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(digits.x_train), 64):
            opt.zero_grad()
            F.cross_entropy(model(digits.x_train[i:i + 64]), digits.y_train[i:i + 64]).backward()
            opt.step()
    return model.eval()


def test_distill_moves_the_layers_before_a_straight_through_function(digits):
    model = _trained(_model(), digits)
    before = model.fc1.weight.detach().clone()
    train = [(digits.x_train[i:i + 64], digits.y_train[i:i + 64]) for i in range(0, 512, 64)]
    res = fxpress.compress(model, "distill{epochs=2,lr=0.0003}", (digits.x_train[:8],),
                           train_data=train)
    assert res.records[-1].status == "ok", res.records[-1].message
    assert not torch.equal(res.module.get_parameter("fc1.weight"), before)
    assert torch.equal(model.fc1.weight, before)  # the caller's model is untouched
    assert model.training is False


@pytest.mark.parametrize("fn", ["round", "split"])
def test_save_stores_the_forward_and_loads_without_the_models_code(tmp_path, digits, fn):
    model = _model(fn)
    x = digits.x_test[:16]
    gm = capture(model, (digits.x_train[:8],))
    kept = function_nodes(gm)
    fxpress.save(gm, tmp_path / "m.fxp")
    assert function_nodes(gm) == kept  # the caller's graph keeps its Function node
    loaded = fxpress.load(tmp_path / "m.fxp")
    assert function_nodes(loaded) == {}
    assert loaded.meta["fxpress"]["autograd_functions_decomposed"] == kept
    assert torch.equal(loaded(x), gm(x)) and torch.equal(loaded(x), model(x))


def test_a_forward_that_does_not_trace_is_refused_at_save_naming_the_node(tmp_path, digits):
    model = _model("branchy")
    gm = capture(model, (digits.x_train[:8],))
    (node,) = function_nodes(gm)
    with pytest.raises(UnsupportedGraphError, match=rf"node '{node}' calls .*Branchy"):
        fxpress.save(gm, tmp_path / "m.fxp")
    assert not (tmp_path / "m.fxp").exists()
    assert function_nodes(gm) == {node: f"{__name__}.Branchy"}
    assert torch.equal(gm(digits.x_test[:4]), model(digits.x_test[:4]))


def test_distill_warns_when_export_recorded_only_the_forward(digits):
    model = _trained(_model(), digits, epochs=1)
    train = [(digits.x_train[i:i + 64], digits.y_train[i:i + 64]) for i in range(0, 256, 64)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fxpress.compress(model, "distill{epochs=1,lr=0.001}", (digits.x_train[:8],),
                               train_data=train, capture_method="export")
    assert res.module.meta["fxpress"]["autograd_functions_inlined"] == [f"{__name__}.RoundSTE"]
    got = [w.message for w in caught if isinstance(w.message, GradientWarning)]
    assert got and got[0].functions == [f"{__name__}.RoundSTE"] and "RoundSTE" in str(got[0])


def test_compile_runs_the_forward_and_leaves_the_graph_alone(digits):
    model = _model()
    x = digits.x_test[:16]
    gm = capture(model, (digits.x_train[:8],))
    kept = function_nodes(gm)
    compiled = fxpress.compile(gm, backend="aot_eager")
    assert torch.allclose(compiled(x), model(x), atol=1e-6)
    assert function_nodes(gm) == kept
