import pytest
import torch
import torch.nn.functional as F

import fxpress
from fxpress.graph.runtime import CompressedModule, op_forward
from fxpress.graph.weights import weighted_ops


class _Functional(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 4))
        self.b = torch.nn.Parameter(torch.randn(6))
        self.k = torch.nn.Parameter(torch.randn(3, 1, 3, 3))
        self.e = torch.nn.Parameter(torch.randn(10, 4))

    def forward(self, x, img, ids):
        return F.linear(x, self.w, self.b), F.conv2d(img, self.k, padding=1, stride=2), F.embedding(ids, self.e)


class _Modules(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 6)
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.emb = torch.nn.Embedding(10, 4, padding_idx=0)
        self.conv1d = torch.nn.Conv1d(2, 3, 3, padding_mode="circular", padding=1)

    def forward(self, x, img, ids):
        return self.lin(x), self.conv(img), self.emb(ids), self.conv1d(img[:, 0, :2, :])


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 4), torch.randn(2, 1, 6, 6), torch.tensor([[1, 2], [3, 0]])


class _DenseCopy(CompressedModule):
    """A runtime module storing the weight as is: enough to test replace_with."""

    def __init__(self, kind, spec, weight, bias):
        super().__init__(kind, spec)
        self.register_buffer("w", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def weight_float(self):
        return self.w


@pytest.mark.parametrize("model_cls", [_Functional, _Modules])
@pytest.mark.parametrize("method", ["fx", "export"])
def test_every_form_is_found_read_and_replaced(model_cls, method):
    torch.manual_seed(0)
    model = model_cls()
    args = _inputs()
    gm = fxpress.capture(model, args, method=method)
    ops = weighted_ops(gm)
    kinds = sorted(op.kind for op in ops)
    expected = ["conv", "embedding", "linear"] + (["conv"] if model_cls is _Modules else [])
    assert kinds == sorted(expected)
    forms = {op.form for op in ops}
    assert forms == ({"aten"} if method == "export" else
                     {"module"} if model_cls is _Modules else {"function"})
    ref = model(*args)
    # replacing every op by a runtime module keeps the outputs and drops the old tensors
    for op in ops:
        op.replace_with(_DenseCopy(op.kind, op.spec, op.weight(), op.bias()))
    gm.graph.lint()
    gm.recompile()
    for a, b in zip(gm(*args), ref):
        torch.testing.assert_close(a, b)
    assert not weighted_ops(gm)
    names = set(gm.state_dict())
    assert all(n.endswith((".w", ".bias")) for n in names), names


def test_set_weight_replaces_without_touching_the_old_tensor():
    model = _Modules()
    gm = fxpress.capture(model, _inputs(), method="fx")
    op = next(o for o in weighted_ops(gm) if o.kind == "linear")
    old = op.weight()
    op.set_weight(torch.zeros_like(old))
    assert torch.count_nonzero(op.weight()) == 0
    assert torch.count_nonzero(model.lin.weight) > 0 and old is model.lin.weight
    with pytest.raises(ValueError, match="shape"):
        op.set_weight(torch.zeros(1))


def test_op_forward_matches_the_modules():
    model = _Modules()
    x, img, ids = _inputs()
    gm = fxpress.capture(model, (x, img, ids), method="fx")
    by_kind = {o.name.split(".")[0]: o for o in weighted_ops(gm)}
    torch.testing.assert_close(op_forward("linear", {}, x, by_kind["lin"].weight(), by_kind["lin"].bias()), model.lin(x))
    c = by_kind["conv"]
    torch.testing.assert_close(op_forward("conv", c.spec, img, c.weight(), c.bias()), model.conv(img))
    c1 = by_kind["conv1d"]
    sig = img[:, 0, :2, :]
    torch.testing.assert_close(op_forward("conv", c1.spec, sig, c1.weight(), c1.bias()), model.conv1d(sig))
    e = by_kind["emb"]
    assert e.spec["padding_idx"] == 0
    torch.testing.assert_close(op_forward("embedding", e.spec, ids, e.weight(), None), model.emb(ids))


def test_transposed_addmm_weights_read_as_out_in():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = Conv1D(6, 4)  # weight stored [in=4, out=6]

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = lin

        def forward(self, x):
            return self.c(x)

    x = torch.randn(3, 5, 4)
    for method in ("fx", "export"):
        gm = fxpress.capture(M(), (x,), method=method)
        (op,) = weighted_ops(gm)
        assert op.kind == "linear" and op.transposed
        assert op.weight().shape == (6, 4)
        op.set_weight(op.weight() * 2)
        torch.testing.assert_close(gm(x), F.linear(x, lin.weight.t() * 2, lin.bias))


def test_tied_weights_share_one_name_and_survive_partial_replacement():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)

        def forward(self, ids):
            return F.linear(self.emb(ids), self.emb.weight)

    model = Tied()
    ids = torch.randint(0, 20, (2, 5))
    gm = fxpress.capture(model, (ids,), method="export")
    ops = weighted_ops(gm)
    assert len(ops) == 2 and len(fxpress.graph.weights.unique_weights(ops)) == 1
    assert set(ops[0].tied) == set(ops[1].tied)
    # replacing the weight through one op keeps the tie: both ops see the new tensor
    ops[1].set_weight(ops[1].weight() * 0)
    assert all(torch.count_nonzero(o.weight()) == 0 for o in weighted_ops(gm))
    assert torch.count_nonzero(model.emb.weight) > 0
    gm = fxpress.capture(model, (ids,), method="export")
    ops = weighted_ops(gm)
    emb = next(o for o in ops if o.kind == "embedding")
    emb.replace_with(_DenseCopy("embedding", emb.spec, emb.weight(), None))
    gm.recompile()
    torch.testing.assert_close(gm(ids), model(ids))
    assert len(weighted_ops(gm)) == 1  # the linear still reads the tied parameter


def test_select_reports_patterns_that_match_nothing(mlp, digits):
    gm = fxpress.capture(mlp, (digits.x_test[:4],))
    ops = weighted_ops(gm)
    chosen, unmatched = fxpress.graph.select(ops, ["layers.*", "nope*"], ["layers.1"])
    assert [o.name for o in chosen] == ["layers.0.weight"]
    assert unmatched == ["nope*"]


def test_runtime_modules_rebuild_from_config_and_tensors():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    m = _DenseCopy("linear", {}, lin.weight, None)
    rebuilt = _DenseCopy.from_state(m.config(), dict(m.state_dict()))
    x = torch.randn(2, 4)
    assert torch.equal(rebuilt(x), m(x)) and rebuilt.bias is None
    assert set(rebuilt.state_dict()) == {"w"}


def test_tensor_memo_recomputes_after_writes_and_for_new_tensors():
    from fxpress.graph.memory import nonzeros, tensor_memo

    calls = []

    def count(t):
        calls.append(1)
        return int(torch.count_nonzero(t))

    w = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert tensor_memo(w, "t", count) == 2 and tensor_memo(w, "t", count) == 2
    assert len(calls) == 1  # the second call is remembered
    assert tensor_memo(w.t(), "t", count) == 2 and len(calls) == 2  # a view has its own entry
    w[0, 0] = 5.0  # a write in place bumps the version counter
    assert tensor_memo(w, "t", count) == 3 and len(calls) == 3
    with torch.no_grad():
        w.zero_()
    assert nonzeros(w) == 0
    del w
    for _ in range(3):  # a new tensor, possibly at the freed address, is counted afresh
        v = torch.ones(2, 2)
        assert nonzeros(v) == 4
        del v


def test_exported_convs_with_string_padding_are_weighted_ops_and_compressed(tmp_path):
    """Export records Conv2d(padding="same"/"valid") as aten.conv2d.padding; every pass must
    see those convs (EfficientNet's 36 stayed float32 under every pass)."""

    torch.manual_seed(0)

    class Same(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 16, 3, padding="same")
            self.c2 = torch.nn.Conv2d(16, 16, 3, padding="valid")
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))

    model, x = Same().eval(), torch.randn(4, 3, 12, 12)
    gm = fxpress.capture(model, (x,), method="export")
    assert sum(n.target == torch.ops.aten.conv2d.padding for n in gm.graph.nodes) == 2
    assert len(list(weighted_ops(gm))) == 3
    res = fxpress.compress(model, "quantize{bits=8}", example_inputs=(x,), capture_method="export")
    assert not any(n.target == torch.ops.aten.conv2d.padding for n in res.module.graph.nodes)
    assert res.records[-1].bytes_after < res.records[-1].bytes_before / 3
    fxpress.save(res, tmp_path / "same.fxp")
    assert torch.equal(fxpress.load(tmp_path / "same.fxp")(x), res.module(x))


def test_replacing_layers_trims_the_heap_once_their_bytes_add_up(monkeypatch):
    # a layer's replacement trims the heap only once the weights replaced since the last
    # trim add up to TRIM_BYTES (a trim per small layer cost a tenth of quantize's time);
    # a trim without a size (the pipeline's, between steps) always trims
    from fxpress.graph import memory as M

    trims = []
    monkeypatch.setattr(M, "_malloc_trim", lambda: trims.append)
    monkeypatch.setattr(M, "TRIM_BYTES", 3 * 64 * 64 * 4)
    M.trim_heap()
    assert trims == [0]
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(7)]).eval()
    gm = fxpress.capture(model, (torch.randn(2, 64),))
    for i, op in enumerate(weighted_ops(gm)):
        op.set_weight(op.weight().detach() * 0.5) if i % 2 else op.replace_with(torch.nn.Linear(64, 64))
    assert trims == [0, 0, 0]  # after the 3rd and 6th layers
    M.trim_heap()
    assert trims == [0, 0, 0, 0]
