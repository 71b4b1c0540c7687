"""small: float norms and constants stored on 8-bit grids, decoded at load, bit-exact
through save/load, trainable through a straight-through estimator, and refused when a
file's grid does not fit its codes."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import ArtifactFormatError, OptionError
from fxpress.graph import artifact
from fxpress.passes.small import GridConstant, GridNorm, decode_grid, encode_grid
from tests.helpers import tamper


class _Net(torch.nn.Module):
    """A position embedding read twice, a LayerNorm, an RMSNorm and a GroupNorm."""

    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(1, 4, 8) * 0.1)
        self.fc = torch.nn.Linear(8, 8)
        self.ln = torch.nn.LayerNorm(8)
        self.rms = torch.nn.RMSNorm(8)
        self.gn = torch.nn.GroupNorm(2, 8)
        with torch.no_grad():
            for m in (self.ln, self.rms, self.gn):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0, 0.1)

    def forward(self, x):
        h = self.ln(self.fc(x + self.pos) + self.pos)
        h = self.rms(h)
        return self.gn(h.transpose(1, 2)).sum(-1)


@pytest.fixture(scope="module")
def compressed():
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(3, 4, 8)
    res = fxpress.compress(model, "small", calibration=[(x,)], progress=False)
    return model, x, res


def test_norms_and_constants_are_stored_as_8_bit_codes_and_round_trip_bit_exactly(compressed):
    model, x, res = compressed
    gm = res.module
    kinds = sorted(type(m).__name__ for m in gm.modules() if isinstance(m, (GridNorm, GridConstant)))
    assert kinds == ["GridConstant", "GridNorm", "GridNorm", "GridNorm"]  # pos once: tied reads
    floats = [k for k, t in gm.state_dict().items() if t.is_floating_point() and t.numel() > 2
              and not k.endswith("_grid") and not k.startswith("fc.")]
    assert floats == []  # what is stored: uint8 codes and a [scale, zero] grid per tensor
    stats = res.records[-1].stats
    assert stats["bytes_after"] < 0.45 * stats["bytes_before"] and stats["worst_rel_l2"] < 0.01
    assert torch.allclose(gm(x), model(x), atol=2e-2)
    # every [scale, zero] grid holds float16 numbers: stored in 4 bytes, not 8
    tensors = artifact.artifact_header(gm)["tensors"]
    grids = {k: t for k, t in gm.state_dict().items() if k.endswith("_grid") and t.numel() == 2}
    assert grids and all(torch.equal(t.half().float(), t) for t in grids.values())
    assert all(tensors[k]["narrow"] == "float16" and tensors[k]["stored_bytes"] == 4 for k in grids)
    assert "pos" in dict(model.named_parameters())  # the caller's model keeps its tensors
    back = artifact.loads(artifact.dumps(gm, entropy=True), fxpress.registry().runtime_modules())
    assert torch.equal(back(x), gm(x))
    mine, theirs = dict(gm.named_buffers()), dict(back.named_buffers())
    assert set(mine) == set(theirs)
    for n, a in mine.items():
        assert torch.equal(a, theirs[n]), n  # decoded buffers too: rebuilt from the codes at load


def test_a_codebook_is_chosen_only_where_it_pays_and_decodes_what_it_encoded():
    g = torch.Generator().manual_seed(1)
    small = torch.randn(64, generator=g)
    mode, codes, grid, _ = encode_grid(small, 8)
    assert mode == "affine" and grid.numel() == 2 and codes.numel() == 64
    # two tight clusters far apart: an affine grid wastes its levels between them
    big = torch.cat([torch.randn(5000, generator=g) * 1e-3 + 1.0, torch.randn(5000, generator=g) * 1e-3 - 3.0])
    mode, codes, grid, err = encode_grid(big, 8)
    assert mode == "codebook" and grid.numel() <= 256
    out = decode_grid(mode, codes, grid, 8, [10000])
    assert float((out - big).pow(2).sum()) == pytest.approx(err, rel=1e-4)
    assert encode_grid(big, 8)[3] < encode_grid(big[:64], 8)[3] * 1e6  # finite, comparable


def test_training_through_the_grid_stays_on_it(compressed):
    _, x, res = compressed
    gm = fxpress.graph.clone_structure(res.module, copy_tensors=True)
    norm = next(m for m in gm.modules() if isinstance(m, GridNorm) and m.kind == "layer_norm")
    params = norm.begin_training()
    assert len(params) == 2
    for _ in range(3):  # plain SGD steps (as an optimizer would take)
        for p in params:
            p.grad = None
        gm(x).pow(2).mean().backward()
        with torch.no_grad():
            for p in params:
                p -= 0.5 * p.grad
    assert float(params[0].grad.abs().sum()) > 0  # straight through the rounding
    norm.end_training()
    assert not list(norm.parameters()) and norm.weight_codes.dtype == torch.uint8
    scale, zero = norm.weight_grid.tolist()
    codes = (norm.weight / scale + zero).round()
    assert torch.allclose(norm.weight, (codes - zero) * scale, atol=1e-6)  # on the grid


@pytest.mark.parametrize("mutate, fragment", [
    (lambda c: c["grids"]["weight"].update(shape=[9]), "tensor 'weight_codes': has 8 elements, expected 9"),
    (lambda c: c["grids"]["weight"].update(mode="lookup"), "malformed"),
    (lambda c: c["grids"]["weight"].update(dtype="int64"), "malformed"),
    (lambda c: c["grids"].update(__class__=dict(c["grids"]["weight"])), "malformed"),
    (lambda c: c.update(bits=9), "config 'bits': is 9"),
    (lambda c: c.update(kind="softmax"), "config 'kind': is 'softmax'"),
])
def test_crafted_grid_configs_are_refused_with_a_typed_error(compressed, mutate, fragment):
    from fxpress.graph.artifact.values import _Decoder  # noqa: F401  (configs are tagged JSON)

    gm = compressed[2].module
    data = artifact.dumps(gm)

    def edit(h):
        m = next(m for m in h["modules"] if m.get("class", "").endswith("GridNorm")
                 and m["config"].get("kind", {}) == "layer_norm")
        cfg = m["config"]
        plain = _untag(cfg)
        mutate(plain)
        m["config"] = _tag(plain)

    with pytest.raises(ArtifactFormatError, match=fragment):
        artifact.loads(tamper(data, edit), fxpress.registry().runtime_modules())


def _untag(v):
    if isinstance(v, dict) and v.get("$") == "dict":
        return {k: _untag(x) for k, x in v["v"]}
    if isinstance(v, dict):
        return {k: _untag(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_untag(x) for x in v]
    return v


def _tag(v, top=True):
    if isinstance(v, dict):
        inner = {k: _tag(x, False) for k, x in v.items()}
        return inner if top else {"$": "dict", "v": [[k, x] for k, x in inner.items()]}
    if isinstance(v, list):
        return [_tag(x, False) for x in v]
    return v


def test_bad_options_name_the_option():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    x = torch.randn(2, 4)
    with pytest.raises(OptionError, match="small: option 'bits'"):
        fxpress.compress(model, "small{bits=1}", calibration=[(x,)], progress=False)
    with pytest.raises(OptionError, match="small: option 'include'"):
        fxpress.compress(model, "small{include=[]}", calibration=[(x,)], progress=False)


def test_layer_weights_read_by_get_attr_are_left_to_the_weight_passes():
    class Fn(torch.nn.Module):  # a functional linear: its weight and bias are get_attr reads
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4))
            self.b = torch.nn.Parameter(torch.randn(4))
            self.scale = torch.nn.Parameter(torch.rand(4) + 0.5)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w, self.b) * self.scale

    x = torch.randn(2, 4)
    res = fxpress.compress(Fn(), "small", calibration=[(x,)], progress=False)
    assert sorted(res.records[-1].stats["tensors"]) == ["scale"]
    assert {"w", "b"} <= set(dict(res.module.named_parameters()))
