"""Decode strategies of compressed layers (passes/decode.py): every fast path against its
reference, the override, and that none of it reaches the state_dict or the artifact."""
import pytest
import torch

import fxpress
from fxpress.errors import InputError
from fxpress.graph.artifact import artifact_size
from fxpress.graph.runtime import compressed_modules
from fxpress.passes import int8 as int8_mod
from fxpress.passes.decode import (AUTO_EMBEDDING_FLOAT_MAX, AUTO_INT8_MIN_WIDTH,
                                   AUTO_INT8_MIN_WORK, decode_plan, int8_kernels_only,
                                   set_decode)
from tests.helpers import assert_unchanged, state_snapshot


class Net(torch.nn.Module):
    """An embedding larger than auto's float limit (auto: per call), two wide linear layers
    (auto: int8), a narrow one (auto: float)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(AUTO_EMBEDDING_FLOAT_MAX // AUTO_INT8_MIN_WIDTH + 50,
                                      AUTO_INT8_MIN_WIDTH)
        self.up = torch.nn.Linear(AUTO_INT8_MIN_WIDTH, 384)
        self.down = torch.nn.Linear(384, AUTO_INT8_MIN_WIDTH)
        self.head = torch.nn.Linear(AUTO_INT8_MIN_WIDTH, 8)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.down(torch.relu(self.up(h))))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 50, (4, 12), generator=g),) for _ in range(2)]


PIPELINES = {"4-bit groups": "quantize{bits=4,granularity=group,group_size=64,scheme=affine}",
             "codebook": "share{bits=4}"}


@pytest.fixture(scope="module", params=list(PIPELINES))
def compressed(request, net, ids):
    res = fxpress.compress(net, PIPELINES[request.param], calibration=ids)
    _STATS[request.param] = res.records[0].stats["layers"]
    return request.param, res.module


_STATS = {}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _paths(gm):
    return {r["layer"]: r["path"] for r in decode_plan(gm)}


def test_auto_runs_wide_linears_in_int8_within_tolerance_of_per_call(compressed, ids):
    name, gm = compressed
    x = ids[1][0]
    assert _paths(gm) == {"emb": "per_call", "up": "int8", "down": "int8", "head": "float"}
    fast = gm(x)
    plan = set_decode(gm, "per_call")
    assert {r["path"] for r in plan} == {"per_call"}
    ref = gm(x)
    assert _rel(fast, ref) < 0.03, name
    set_decode(gm, "float")
    assert torch.equal(gm(x), ref)  # decoded once or per call: the same float weight
    set_decode(gm, "auto")
    assert torch.equal(gm(x), fast)
    for row in decode_plan(gm):
        if row["path"] == "int8":
            assert row["int8_error"] < 0.03 and row["held_now"] == row["held_bytes"]["int8"]
        assert row["held_bytes"]["float"] == 4 * row["shape"][0] * row["shape"][1]


def test_forced_int8_and_layer_override(compressed, ids):
    _, gm = compressed
    try:
        plan = set_decode(gm, "int8")
        # a narrow linear takes int8 when asked; an embedding has no int8 path
        assert {r["layer"]: r["path"] for r in plan}["head"] == "int8"
        assert {r["layer"]: r["path"] for r in plan}["emb"] == "per_call"
        set_decode(gm, "float", layers=["up"])
        assert _paths(gm)["up"] == "float" and _paths(gm)["down"] == "int8"
        with pytest.raises(InputError, match="bogus"):
            set_decode(gm, "bogus")
        with pytest.raises(InputError, match="no compressed layer matches"):
            set_decode(gm, "float", layers=["nothing.*"])
    finally:
        set_decode(gm, "auto")


def test_caches_stay_out_of_state_dict_and_artifact(compressed, ids, tmp_path):
    _, gm = compressed
    set_decode(gm, "per_call")
    before, size = state_snapshot(gm), artifact_size(gm)
    for strategy in ("int8", "float", "auto"):
        set_decode(gm, strategy)
        gm(ids[0][0])
        assert_unchanged(gm, before)
        # the same tensors; the strategy's name in the header is all that differs
        assert abs(artifact_size(gm) - size) < 64
    path = tmp_path / "m.fxp"
    set_decode(gm, "float", layers=["down"])
    fxpress.save(gm, path)
    loaded = fxpress.load(path)
    assert _paths(loaded) == _paths(gm)
    assert torch.equal(loaded(ids[1][0]), gm(ids[1][0]))
    assert_unchanged(loaded, before)
    set_decode(gm, "auto")


def test_pass_option_and_stats(compressed, net, ids):
    name, _ = compressed
    stats = _STATS[name]
    assert stats["up.weight"]["decode"] == "auto"
    assert stats["up.weight"]["held_bytes"]["float"] == 4 * 384 * 256
    if name == "4-bit groups":  # quantize measured each layer as it runs
        assert stats["up.weight"]["decode_path"] == "int8" and stats["up.weight"]["int8_error"] < 0.03
        assert stats["head.weight"]["decode_path"] == "float"
        return
    res = fxpress.compress(net, "share{bits=4,decode=per_call}", calibration=ids[:1])
    assert set(_paths(res.module).values()) == {"per_call"}
    assert res.records[0].stats["layers"]["up.weight"]["decode"] == "per_call"


def test_int8_kernel_follows_the_rows_of_each_call(compressed):
    _, gm = compressed
    if tuple(int8_mod._available_backends())[:2] != ("onednn", "fbgemm"):
        pytest.skip("needs both oneDNN and fbgemm int8 kernels")
    up = dict(compressed_modules(gm))["up"]
    set_decode(gm, "auto", layers=["up"])
    twin = up._twin()
    up(torch.randn(2, AUTO_INT8_MIN_WIDTH))
    assert int8_mod.prepacked_backends(twin) == ["fbgemm"]
    up(torch.randn(int8_mod.ONEDNN_MIN_ROWS, AUTO_INT8_MIN_WIDTH))
    assert int8_mod.prepacked_backends(twin) == ["fbgemm", "onednn"]
    held = up.decode_info()["held_bytes"]["int8"]
    assert held == 3 * (384 * 256 + 4 * 384)  # codes + two prepacked copies


def _kernel_product(layer, x: torch.Tensor, kernel: str) -> torch.Tensor:
    """What ``kernel`` computes for the int8 ``layer`` on ``x``, in float: its input as that
    kernel quantises it on this CPU (quantize's simulation, which knows the input levels:
    255, or 127 where fbgemm and oneDNN reduce their range without VNNI) times the decoded
    stored weight, plus the bias."""
    from fxpress.passes.quantize import simulated_input

    assert layer.zero() is None
    x2 = x.reshape(-1, x.shape[-1]).float()
    stored = layer.codes().float() * layer.scale.reshape(-1, 1).float()  # w * smooth
    y = simulated_input(x2, layer.act_scale, layer.smooth, kernel) @ stored.t()
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(*x.shape[:-1], -1)


def _assert_kernel_product(y: torch.Tensor, layer, x: torch.Tensor, kernel: str) -> None:
    # per tensor the simulation gives the kernels' very codes (measured 0 here on an AVX2
    # EPYC); fbgemm's per-token path rounds some codes differently (2.6e-3 to 3.1e-3), while
    # the wrong input levels (255 against 127) are 1.4e-2 to 2.4e-2 away
    from fxpress.passes.verify import compare

    m = compare([y], [_kernel_product(layer, x, kernel)], top1=False)
    per_token_fbgemm = layer.act_scale == "token" and kernel == "fbgemm"
    assert m.rel_l2 < (6e-3 if per_token_fbgemm else 1e-5) and m.nonfinite == 0, (kernel, m)


def _ran(layer, x: torch.Tensor) -> str:
    """The kernel ``layer``'s last call of ``x``'s size class took."""
    small = x.numel() < int8_mod.ONEDNN_MIN_ROWS * x.shape[-1]
    return int8_mod._plans[layer][3][small][0]


@pytest.mark.parametrize("act_scale", ["tensor", "token"])
def test_the_remembered_kernel_equals_the_full_path_and_sees_weight_changes(act_scale):
    from fxpress.graph.capture import clone_structure
    from fxpress.passes.decode import int8_twin
    from fxpress.passes.quantize_modules import QuantizedLinear

    torch.manual_seed(0)
    cols = AUTO_INT8_MIN_WIDTH
    base = int8_twin(torch.randn(cols, cols) * 0.05, torch.randn(cols))
    smooth = torch.rand(cols) + 0.5  # smoothed input: the kernels multiply by its inverse
    layer = QuantizedLinear((cols, cols), base.qweight.clone(), base.scale, None, base.bias, 8,
                            "symmetric", "channel", activations="dynamic", act_scale=act_scale,
                            smooth=smooth, stored=True)
    layer.set_decode("int8")  # every call size through the kernels (auto runs small calls in float)
    with torch.no_grad():
        for rows in (3, int8_mod.ONEDNN_MIN_ROWS):  # fbgemm's size class, then oneDNN's
            x = torch.randn(2, rows, cols)
            full = layer(x)  # chooses the kernel, remembers it
            assert layer in int8_mod._plans
            assert torch.equal(layer(x), full)  # the remembered kernel: the same product
            kernel = _ran(layer, x)
            assert kernel == layer.kernels(x.numel() // cols)[0]
            _assert_kernel_product(full, layer, x, kernel)
        assert clone_structure(layer) not in int8_mod._plans  # a copy chooses its own
        layer.qweight.neg_()  # written in place: the prepacked copies are stale
        y = layer(x)
        _assert_kernel_product(y, layer, x, _ran(layer, x))
        assert not torch.allclose(y, full, atol=0.1)


def test_a_twin_built_in_inference_mode_runs_the_fast_kernels(compressed, tmp_path):
    """A decoded layer first called under ``torch.inference_mode`` builds its int8 twin from
    inference tensors, which have no version counter: reading it once raised inside every
    kernel, and each was then marked broken for the whole process (all int8 layers ran the
    float64 reference, MiniLM 4-bit at batch 1 0.46x fp32 instead of ~1.4x)."""
    _, gm = compressed
    fxpress.save(gm, tmp_path / "m.fxp")
    up = dict(compressed_modules(fxpress.load(tmp_path / "m.fxp")))["up"]  # no twin yet
    fast = int8_mod._available_backends()[:-1]
    x = torch.randn(2, 5, AUTO_INT8_MIN_WIDTH)
    with torch.inference_mode():
        y = up(x)
        twin = up._twin()
        assert twin.qweight.is_inference()
        assert int8_mod._available_backends()[:-1] == fast  # nothing marked broken
        assert int8_mod.prepacked_backends(twin)[:1] == [twin.kernels(10)[0]]
    _assert_kernel_product(y, twin, x, twin.kernels(10)[0])


# -- auto: small calls of stored int8 layers, small embedding tables ---------------------------

def _int8_model(width_in: int, width_out: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width_in, width_out)).eval()
    calib = [(torch.randn(32, width_in, generator=torch.Generator().manual_seed(seed + i)),)
             for i in range(2)]
    return model, fxpress.compress(model, "quantize", calibration=calib, policy="warn").module


def test_auto_runs_small_calls_of_int8_layers_in_float():
    """A call whose work max(rows, 4) x in x out is under AUTO_INT8_MIN_WORK runs in float
    from a copy decoded once (the int8 path's fixed cost per call was more than the product
    saved: 0.4-0.7x fp32 on 64-256 wide layers at 1-16 rows); larger calls take the int8
    kernels; decode="int8" and a forced kernel always take them."""
    model, gm = _int8_model(64, 96)
    ((_, layer),) = compressed_modules(gm)
    dense = layer.weight_float()
    small = torch.randn(3, 64)  # 4 x 64 x 96 = 24,576 < AUTO_INT8_MIN_WORK
    rows = -(-AUTO_INT8_MIN_WORK // (64 * 96)) + 1
    big = torch.randn(rows, 64)
    with torch.inference_mode():
        assert torch.allclose(gm(small), torch.nn.functional.linear(small, dense, layer.bias),
                              atol=1e-6)
        assert int8_mod.prepacked_backends(layer) == []  # no int8 kernel ran
        assert "small_call_weight" in layer.__dict__
        y = gm(big)
        assert int8_mod.prepacked_backends(layer)  # an int8 kernel ran for the large call
        assert _rel(y, model(big)) < 0.02
        assert not torch.equal(y, torch.nn.functional.linear(big, dense, layer.bias))
        (row,) = decode_plan(gm)
        assert row["path"] == "int8" and row["held_now"] >= 4 * 64 * 96  # the float copy counted
        set_decode(gm, "int8")
        assert "small_call_weight" not in layer.__dict__
        gm(small)
        assert "small_call_weight" not in layer.__dict__  # forced: the int8 path for every call
        set_decode(gm, "auto")
        with int8_mod.int8_backend("reference"):
            gm(small)
        assert "small_call_weight" not in layer.__dict__
        with int8_kernels_only():  # what an ONNX export reproduces
            gm(small)
        assert "small_call_weight" not in layer.__dict__
        assert "small_call_weight" not in dict(gm.state_dict())


def test_small_call_copy_follows_writes_to_the_stored_codes():
    _, gm = _int8_model(32, 32, seed=3)
    ((_, layer),) = compressed_modules(gm)
    x = torch.randn(2, 32)
    with torch.inference_mode():
        before = gm(x)
        layer.qweight.neg_()  # the stored codes written in place
        after = gm(x)
    bias = layer.bias if layer.bias is not None else 0
    assert torch.allclose(after - bias, -(before - bias), atol=1e-5)


@pytest.mark.parametrize("rows", [2, 200])  # the small call's float copy; the int8 kernel
def test_every_cache_of_an_int8_layer_follows_writes_to_any_stored_tensor(rows):
    """The small call's float copy, the prepacked kernel weight and the kernel plan were
    keyed on the codes, the scale and the smoothing factors only: an in-place edit of an
    affine layer's zero point left outputs off by 0.009 (small calls) and 0.04 (int8
    kernels). Every buffer keys them now; the output matches a fresh copy of the layer."""
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    calib = [(torch.randn(32, 16),)]
    gm = fxpress.compress(model, "quantize{scheme=affine}", calibration=calib, policy="warn").module
    ((_, layer),) = compressed_modules(gm)
    assert layer.zero_point is not None
    x = torch.randn(rows, 16)
    gm(x)
    gm(x)  # every cache built
    layer.zero_point.add_(3)
    fresh = copy.deepcopy(gm)
    for m in fresh.modules():
        if hasattr(m, "drop_cache"):
            m.drop_cache()
    assert torch.equal(gm(x), fresh(x))


def test_wide_int8_layer_runs_every_call_size_in_int8():
    """A layer where even 4 rows are AUTO_INT8_MIN_WORK or more never takes the float copy."""
    side = int((AUTO_INT8_MIN_WORK / 4) ** 0.5) + 1
    _, gm = _int8_model(side, side, seed=5)
    ((_, layer),) = compressed_modules(gm)
    with torch.inference_mode():
        gm(torch.randn(1, side))
    assert "small_call_weight" not in layer.__dict__ and int8_mod.prepacked_backends(layer)


def test_auto_keeps_small_embedding_tables_decoded():
    """Tables of at most AUTO_EMBEDDING_FLOAT_MAX weights decode once (a per-call row unpack
    cost 31 us against torch's 5 us on a 50x16 table); larger ones unpack their rows."""
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Embedding(50, 16)).eval()
    large = torch.nn.Sequential(torch.nn.Embedding(AUTO_EMBEDDING_FLOAT_MAX // 16 + 1, 16)).eval()
    ids = [(torch.randint(0, 50, (4, 6)),)]
    for model, path in ((small, "float"), (large, "per_call")):
        gm = fxpress.compress(model, "quantize{bits=4}", calibration=ids).module
        (row,) = decode_plan(gm)
        assert row["path"] == path
        with torch.inference_mode():
            y = gm(*ids[0])
            set_decode(gm, "per_call")
            assert torch.equal(gm(*ids[0]), y)  # the same decoded rows either way
