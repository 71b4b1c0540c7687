"""share: 1-D k-means, codebook modules, the pass on fx and export graphs."""
import json

import pytest
import torch

import fxpress
from fxpress.graph import artifact
from examples.digits import accuracy
from fxpress.errors import OptionError
from fxpress.graph.packing import pack_bits, unpack_bits, unpack_rows
from fxpress.graph.memory import stored_bytes
from fxpress.graph.runtime import compressed_modules
from fxpress.graph.weights import weighted_ops
from fxpress.passes.share import CodebookEmbedding, CodebookLinear, kmeans_1d
from tests.helpers import assert_unchanged, rebuild, state_snapshot


def _heavy_tailed(n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 3


def _codebooks(gm):
    return dict(compressed_modules(gm))


@pytest.mark.parametrize("k", [2, 5, 16, 64])
def test_kmeans_centroids_are_the_means_of_their_members(k):
    x = _heavy_tailed()
    km = kmeans_1d(x, k)
    assert km.converged
    codes = km.encode(x)
    c = km.centroids
    for j in codes.unique().tolist():
        members = x[codes == j].double()
        assert abs(float(members.mean()) - float(c[j])) <= 1e-6 * max(1.0, abs(float(c[j])))
    # and each value sits with its nearest centroid (Lloyd's fixed point)
    nearest = (x[:, None].double() - c[None, :]).abs().argmin(1)
    assert torch.equal((c[codes] - x.double()).abs(), (c[nearest] - x.double()).abs())


def test_kmeans_linear_init_spans_min_to_max_and_is_deterministic():
    x = _heavy_tailed(seed=1)
    one = kmeans_1d(x, 8, max_iter=1)  # a single Lloyd step from the linear grid
    assert one.centroids.min() >= x.min() and one.centroids.max() <= x.max()
    a, b = kmeans_1d(x, 16), kmeans_1d(x.clone(), 16)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.encode(x), b.encode(x))


def test_kmeans_reserves_zero_and_never_merges_nonzeros_into_it():
    x = _heavy_tailed(seed=2)
    x[torch.arange(0, x.numel(), 3)] = 0.0
    km = kmeans_1d(x, 8)
    codes = km.encode(x)
    assert km.zero_code and km.centroids[0] == 0
    assert torch.equal(codes == 0, x == 0)
    decoded = km.centroids[codes]
    assert ((decoded[x != 0] != 0)).all()
    assert torch.equal(torch.sign(decoded[x != 0]).float(), torch.sign(x[x != 0]))


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_and_codebook_modules_round_trip_at_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37, 24), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, codes.numel()).view_as(codes), codes)
    rows = torch.tensor([[36, 0], [5, 5]])
    assert torch.equal(unpack_rows(pack_bits(codes, bits), bits, 24, rows), codes[rows])
    codebook = torch.randn(1 << bits, generator=g)
    m = CodebookLinear("linear", {}, (37, 24), bits, codebook, codes, torch.randn(37))
    assert torch.equal(m.weight_float(), codebook[codes.long()])
    assert m.weight_bits() == codes.numel() * bits + ((-codes.numel() * bits) % 8) + codebook.numel() * 32
    e = CodebookEmbedding("embedding", {"padding_idx": None}, (37, 24), bits, codebook, codes)
    ids = torch.tensor([[3, 36, 0]])
    assert torch.equal(e(ids), codebook[codes.long()][ids])  # rows unpacked alone


def test_share_fx_mlp_and_cnn_pass_default_tolerance_at_real_bit_width(mlp, cnn, calib, digits):
    for model in (mlp, cnn):
        snap = state_snapshot(model)
        res = fxpress.compress(model, "share", calibration=calib)  # bits=4
        rec = res.records[0]
        assert rec.status == "ok" and res.capture["method"] == "fx"
        mods = _codebooks(res.module)
        assert len(mods) == len(weighted_ops(fxpress.capture(model, calib[0])))
        n = sum(m.numel for m in mods.values())
        k_bits = sum(m.codebook.numel() * 32 for m in mods.values())
        assert sum(m.weight_bits() for m in mods.values()) <= n * 4 + k_bits + 8 * len(mods)
        assert 4.0 <= rec.stats["bits_per_weight"] < 4.2
        assert rec.bytes_after < rec.bytes_before / 5
        assert accuracy(res.module, digits.x_test, digits.y_test) >= accuracy(
            model, digits.x_test, digits.y_test) - 0.02
        assert_unchanged(model, snap)


def test_pruned_zeros_stay_exactly_zero_and_sparse_codes_shrink_storage(mlp, calib):
    pruned = fxpress.compress(mlp, "prune{sparsity=0.9}", calibration=calib, policy="warn")
    res = fxpress.compress(pruned.module, "share{bits=4}", calibration=calib)
    dense = {op.name: op.weight() for op in weighted_ops(pruned.module)}
    for name, m in _codebooks(res.module).items():
        w = m.weight_float()
        ref = dense[f"{name}.weight"]
        assert torch.equal(w == 0, ref == 0)
        assert m.zero_code and m.sparse and m.codebook[0] == 0
        assert m.nonzeros == int((ref != 0).sum())
    assert res.records[0].stats["bits_per_weight"] < 1.6  # 1 mask bit + 4 bits of 10%
    assert res.records[0].incremental.cosine > 0.99


def test_global_scope_shares_one_codebook(mlp, calib):
    res = fxpress.compress(mlp, "share{bits=3,scope=global}", calibration=calib, policy="warn")
    books = [m.codebook for m in _codebooks(res.module).values()]
    assert len(books) == 3 and all(torch.equal(b, books[0]) for b in books)
    assert res.records[0].stats["scope"] == "global"


def test_share_runs_on_export_graphs(small_mlp, calib, minilm_gm, minilm_batches):
    res = fxpress.compress(small_mlp, "share{bits=4}", calibration=calib, capture_method="export")
    assert res.capture["method"] == "export" and res.records[0].status == "ok"
    assert len(_codebooks(res.module)) == 2
    # the captured MiniLM export graph (aten ops), one embedding and three linears
    few = tuple(t[:8] for t in minilm_batches[0])
    res = fxpress.compress(minilm_gm, "share{bits=6,include=[*position_embeddings*,*layer.0.attention.self.*]}",
                           calibration=[few])
    mods = _codebooks(res.module)
    assert res.records[0].status == "ok" and len(mods) == 4
    assert {type(m).__name__ for m in mods.values()} == {"CodebookLinear", "CodebookEmbedding"}
    assert res.records[0].cumulative.cosine > 0.99


def test_modules_rebuild_from_state_bit_exactly(cnn, calib, mlp):
    pruned = fxpress.compress(mlp, "prune{sparsity=0.9},share{bits=5}", calibration=calib,
                              policy="warn").module
    res = fxpress.compress(cnn, "share{bits=3}", calibration=calib, policy="warn").module
    x = calib[0][0]
    for gm in (res, pruned):
        for name, m in _codebooks(gm).items():
            again = rebuild(m)
            assert type(again) is type(m)
            assert again.config() == json.loads(json.dumps(m.config()))  # tuples come back as lists
            before, after = m.state_dict(), again.state_dict()
            assert set(before) == set(after)
            assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
                       for k in before)
            assert torch.equal(again.weight_float(), m.weight_float())
    assert any(m.sparse for m in _codebooks(pruned).values())
    out = res(x)
    for name, m in _codebooks(res).items():
        res.set_submodule(name, rebuild(m))
    assert torch.equal(res(x), out)


def test_decode_once_keeps_a_cache_outside_the_state_dict(mlp, calib):
    per_call = fxpress.compress(mlp, "share{bits=4,decode=per_call}", calibration=calib).module
    once = fxpress.compress(mlp, "share{bits=4,decode=once}", calibration=calib).module
    x = calib[0][0]
    assert torch.equal(per_call(x), once(x))
    m = _codebooks(once)["layers.0"]
    assert m.cache_weight and "weight_cache" in m.__dict__
    assert "weight_cache" not in m.state_dict() and "weight_cache" not in dict(m.named_buffers())
    assert stored_bytes(once) == stored_bytes(per_call)
    assert "weight_cache" not in _codebooks(per_call)["layers.0"].__dict__


def test_fine_tuning_sums_gradients_into_centroids_and_keeps_zero(mlp, calib):
    gm = fxpress.compress(mlp, "prune{sparsity=0.5},share{bits=3}", calibration=calib,
                          policy="warn").module
    m = _codebooks(gm)["layers.1"]
    keys = set(m.state_dict())
    params = m.begin_training()
    assert params[0] is m.codebook and isinstance(m.codebook, torch.nn.Parameter)
    w = m.weight_float()
    upstream = torch.randn_like(w)
    (w * upstream).sum().backward()
    codes = m._codes().view_as(w)
    for j in range(1, m.codebook.numel()):
        assert torch.allclose(m.codebook.grad[j], upstream[codes == j].sum(), atol=1e-4)
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(gm(calib[0][0]), gm(calib[0][0]).argmax(1).roll(1))
        loss.backward()
        opt.step()
    m.end_training()
    assert set(m.state_dict()) == keys and not isinstance(m.codebook, torch.nn.Parameter)
    assert m.codebook[0] == 0 and torch.equal(m.weight_float() == 0, w.detach() == 0)
    assert not torch.equal(m.weight_float(), w.detach())  # the centroids moved


def test_bias_bits_store_biases_on_a_grid_through_fine_tuning_and_reload(mlp, calib, tmp_path):
    plain = fxpress.compress(mlp, "prune{sparsity=0.9},share{bits=4}", calibration=calib,
                             policy="warn").module
    res = fxpress.compress(mlp, "prune{sparsity=0.9},share{bits=4,bias_bits=8}",
                           calibration=calib, policy="warn")
    m, ref = _codebooks(res.module)["layers.0"], mlp.layers[0].bias.detach()
    assert set(m.state_dict()) >= {"bias_codes", "bias_grid"} and "bias" not in m.state_dict()
    def step(b):  # the grid spans [min(b, 0), max(b, 0)] in 255 steps (0 is on it)
        return (b.max().clamp(min=0) - b.min().clamp(max=0)) / 255

    # the step rounded up to a float16 number (at most 2**-10 coarser): the grid is stored
    # in 2-byte floats, bit for bit
    assert (m.bias - ref).abs().max() <= step(ref) * (1 + 2 ** -10) / 2 + 1e-6
    assert torch.equal(m.bias_grid.half().float(), m.bias_grid)
    entry = artifact.artifact_header(res.module)["tensors"]["layers.0.bias_grid"]
    assert entry["narrow"] == "float16" and entry["stored_bytes"] == 4
    # 410 biases: 1 byte each instead of 4, plus a float32 [scale, zero] per layer
    assert stored_bytes(plain) - stored_bytes(res.module) == 3 * 410 - 3 * 8
    assert res.records[-1].status == "ok"
    # fine-tuning trains a float bias (through a grid fitted to it) and puts it back on a (new) grid
    params = m.begin_training()
    assert any(p is m.bias for p in params) and isinstance(m.bias, torch.nn.Parameter)
    with torch.no_grad():
        m.bias.add_(0.25)
        trained = m.bias.detach().clone()
    m.end_training()
    assert not isinstance(m.bias, torch.nn.Parameter) and "bias" not in m.state_dict()
    assert (m.bias - trained).abs().max() <= step(trained) * (1 + 2 ** -10) / 2 + 1e-6
    # the file stores the codes; the loaded module decodes the same biases, bit for bit
    fxpress.save(res.module, tmp_path / "m.fxp")
    loaded = fxpress.load(tmp_path / "m.fxp")
    assert torch.equal(loaded.get_submodule("layers.0").bias, m.bias)
    assert torch.equal(loaded(calib[0][0]), res.module(calib[0][0]))


def test_fine_tuning_trains_the_bias_through_its_grid():
    # what forward adds while a recovery step trains is what end_training stores (a bias
    # trained in float and rounded afterwards moved by up to half a 4-bit grid step)
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    w[w.abs() < 0.8] = 0
    flat = w.reshape(-1)
    codes = torch.bucketize(flat, torch.tensor([-1.2, 0.0, 1.2])).to(torch.uint8) + 1
    codes[flat == 0] = 0
    m = CodebookLinear("linear", {}, (8, 16), 4, torch.tensor([0.0, -1.5, -1.0, 1.0, 1.5]), codes,
                       torch.randn(8), zero_code=True, bias_bits=4)
    x = torch.randn(5, 16)
    m.begin_training()
    opt = torch.optim.SGD([m.bias], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (m(x) - 3).pow(2).mean().backward()
        opt.step()
    assert m.bias.grad is not None and m.bias.grad.abs().sum() > 0  # the gradient goes through
    with torch.no_grad():
        trained = m(x)
    m.end_training()
    assert torch.equal(m(x), trained)
    assert torch.unique(m.bias).numel() <= 16


def test_codebook_bits_store_centroids_on_a_grid_through_fine_tuning_and_reload(mlp, calib, tmp_path):
    # share{codebook_bits=8}: each layer's centroids as 8-bit codes on one affine grid and
    # its [scale, zero] pair (float16 numbers), not as a float codebook
    gm = fxpress.compress(mlp, "prune{sparsity=0.9},share{bits=4}", calibration=calib,
                          policy="warn").module
    res = fxpress.compress(mlp, "prune{sparsity=0.9},share{bits=4,codebook_bits=8}",
                           calibration=calib, policy="warn")
    plain, m = _codebooks(gm)["layers.1"], _codebooks(res.module)["layers.1"]
    assert {"codebook_codes", "codebook_grid"} <= set(m.state_dict()) and "codebook" not in m.state_dict()
    assert m.codebook_codes.dtype == torch.uint8 and m.codebook_codes.numel() == plain.codebook.numel()
    assert torch.equal(m.codebook_grid.half().float(), m.codebook_grid)

    def step(c):  # the grid spans [min(c, 0), max(c, 0)] in 255 steps, rounded up to a float16
        return (c.max().clamp(min=0) - c.min().clamp(max=0)) / 255 * (1 + 2 ** -10)

    assert m.codebook[0] == 0 and torch.equal(m._codes(), plain._codes())  # same assignment
    assert (m.codebook - plain.codebook).abs().max() <= step(plain.codebook) / 2 + 1e-7
    # per layer: 16 one-byte codes and a [scale, zero] grid instead of 16 float32 centroids
    k = sum(c.codebook.numel() for c in _codebooks(gm).values())
    # (in memory the grid is float32: 8 bytes; the artifact stores it in 4, float16 numbers)
    assert stored_bytes(gm) - stored_bytes(res.module) == 4 * k - k - 8 * len(_codebooks(gm))
    # fine-tuning trains float centroids through the grid; end_training stores them on it
    x = calib[0][0]
    params = m.begin_training()
    assert params[0] is m.codebook and isinstance(m.codebook, torch.nn.Parameter)
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(res.module(x), res.module(x).argmax(1).roll(1)).backward()
        opt.step()
    assert m.codebook.grad is not None and m.codebook.grad.abs().sum() > 0
    with torch.no_grad():
        trained = res.module(x)
        centroids = m.codebook.detach().clone()
    m.end_training()
    assert "codebook" not in m.state_dict() and {"codebook_codes", "codebook_grid"} <= set(m.state_dict())
    assert not torch.equal(m.codebook, plain.codebook)  # the centroids moved, on a new grid
    assert torch.allclose(res.module(x), trained, atol=1e-5)  # forward trained what is stored
    assert (m.codebook[1:] - centroids[1:]).abs().max() <= step(centroids) / 2 + 1e-3 * step(centroids)
    # the file holds the codes; the loaded module decodes the same centroids, bit for bit
    fxpress.save(res.module, tmp_path / "m.fxp")
    loaded = fxpress.load(tmp_path / "m.fxp")
    assert torch.equal(loaded.get_submodule("layers.1").codebook, m.codebook)
    assert torch.equal(loaded(x), res.module(x))


def test_codebook_bits_keeps_tied_weights_one_stored_codebook():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16)
            self.b = torch.nn.Linear(16, 16)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    x = torch.randn(8, 16)
    gm = fxpress.compress(Tied().eval(), "share{bits=4,codebook_bits=8}", (x,), policy="warn",
                          progress=False).module
    a, b = gm.get_submodule("a"), gm.get_submodule("b")
    assert a.codebook_codes is b.codebook_codes and a.codebook_grid is b.codebook_grid
    assert torch.equal(artifact.loads(artifact.dumps(gm), fxpress.registry().runtime_modules())(x), gm(x))


@pytest.mark.parametrize("text, option", [
    ("share{bias_bits=1}", "bias_bits"), ("share{bias_bits=9}", "bias_bits"),
    ("share{codebook_bits=4}", "codebook_bits"), ("share{codebook_bits=9}", "codebook_bits"),
    ("share{bits=9}", "bits"), ("share{bits=0}", "bits"), ("share{bits=2.5}", "bits"),
    ("share{scope=model}", "scope"), ("share{ops=[dense]}", "ops"),
    ("share{decode=lazy}", "decode"), ("share{iters=3}", "iters"), ("share{max_iter=0}", "max_iter"),
])
def test_bad_options_name_the_option(text, option):
    with pytest.raises(OptionError) as e:
        fxpress.Pipeline.parse(text)
    assert e.value.option == option and f"'{option}'" in str(e.value)


def test_a_glob_that_matches_nothing_is_an_error(mlp, calib):
    with pytest.raises(OptionError, match="match no weighted op"):
        fxpress.compress(mlp, "share{include=[encoder.*]}", calibration=calib)


def test_kmeans_of_an_all_zero_layer_is_one_zero_centroid():
    # regression (found by tests/test_properties.py): prune{threshold=1.0} then share raised
    # UnboundLocalError on a layer whose weights were all zero
    from fxpress.passes.share import kmeans_1d

    km = kmeans_1d(torch.zeros(12), 4)
    assert km.centroids.tolist() == [0.0]
    assert km.encode(torch.zeros(3)).tolist() == [0, 0, 0]


def test_pruned_and_shared_digits_mlp_file_is_25x_smaller_than_fp32(mlp, calib, tmp_path):
    import safetensors.torch

    res = fxpress.compress(mlp, "prune{sparsity=0.9},share{bits=4}", calibration=calib,
                           policy="warn", progress=False)
    fp32 = len(safetensors.torch.save({k: v.contiguous() for k, v in mlp.state_dict().items()}))
    size = fxpress.save(res.module, tmp_path / "m.fxp", entropy=True)
    print(f"fp32 {fp32} B, fxpress {size} B: {fp32 / size:.1f}x")
    assert torch.equal(fxpress.load(tmp_path / "m.fxp")(calib[0][0]), res.module(calib[0][0]))
    assert fp32 / size >= 25, (size, fp32, fp32 / size)


@pytest.mark.parametrize("k,zeros", [(16, True), (16, False), (256, True)])
def test_kmeans_on_a_histogram_is_exact_where_it_counts(k, zeros, monkeypatch):
    """Above HIST_BINS values k-means runs on a fine histogram: every centroid is still
    the mean of exactly its members, each value sits with its nearest centroid up to one
    bin width, zeros keep code 0 and signs, and the error matches the sorted fit's."""
    from fxpress.passes import kmeans1d as S

    x = _heavy_tailed(n=S.HIST_BINS * 3, seed=k)
    if zeros:
        x[torch.arange(0, x.numel(), 4)] = 0.0
    km = kmeans_1d(x, k)
    assert km.grid is not None and km.zero_code == zeros
    codes = km.encode(x)
    assert torch.equal(codes.to(torch.uint8), km.codes)
    c = km.centroids
    count = torch.bincount(codes, minlength=c.numel()).double()
    means = torch.bincount(codes, weights=x.double(), minlength=c.numel()) / count.clamp(min=1)
    used = count > 0
    assert torch.allclose(means[used], c[used], rtol=0, atol=1e-12)
    dist = (c[codes] - x.double()).abs()
    if zeros:
        assert torch.equal(codes == 0, x == 0)
        nz = x != 0
        assert torch.equal(torch.sign(c[codes][nz]).float(), torch.sign(x[nz]))
    if k <= 16 and zeros:  # (the [n, k] distance matrix stays small)
        cand = torch.where(torch.sign(c[None, :]) == torch.sign(x[:, None].double()), c[None, :], 1e9)
        nearest = (x[:, None].double() - cand).abs().min(1).values
    elif k <= 16:
        nearest = (x[:, None].double() - c[None, :]).abs().min(1).values
    if k <= 16:
        width = float(x.max() - x.min()) / S.HIST_BINS
        assert (dist - nearest <= width).all()
    monkeypatch.setattr(S, "HIST_BINS", 1 << 40)
    exact = kmeans_1d(x, k)
    sq = float((c[codes] - x.double()).pow(2).sum())
    sq_exact = float((exact.centroids[exact.encode(x)] - x.double()).pow(2).sum())
    assert sq <= sq_exact * 1.001


@pytest.mark.parametrize("k", [16, 256])
def test_final_assignment_codes_the_values_of_cut_bins_exactly_without_torch_nonzero(k, monkeypatch):
    """The values in bins a boundary cuts (marked by a spare code below 255 clusters, by
    the straddle table at 256) are found by numpy's flatnonzero, not torch's nonzero
    (10x slower on one thread), and coded against the boundaries themselves: every
    value's code is the one bucketize gives over the fit's boundaries."""
    from fxpress.passes import kmeans1d as S

    x = _heavy_tailed(n=S.HIST_BINS * 3, seed=k + 1)
    calls = []
    real = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    km = kmeans_1d(x, k)
    monkeypatch.undo()
    assert calls == [] and km.grid is not None and bool(km.straddle.any())
    (first, b), = km.segments
    assert torch.equal(km.codes.long(), torch.bucketize(x, b, right=True) + first)


def test_batched_lloyd_equals_one_fit_at_a_time():
    """The share pass fits its layers' histograms together (kmeans_1d_many, one numpy
    call per Lloyd step for all of them): every fit must be the one-at-a-time _lloyd's,
    bit for bit (centroids, boundaries, iterations, convergence), whatever the sizes,
    codebook sizes, signs and iteration caps; and the final fits kmeans_1d's."""
    from fxpress.passes import kmeans1d as K

    g = torch.Generator().manual_seed(3)
    problems = []
    for i, (n, k) in enumerate([(900, 8), (50, 3), (3000, 16), (7, 5), (1, 4), (400, 1), (2500, 12)]):
        pos = torch.sort(torch.randn(n, generator=g, dtype=torch.float64) * (1 + i) ** 2).values.numpy()
        cnt = torch.randint(1, 50, (n,), generator=g).double().numpy()
        tot = cnt * pos * (1 + 1e-3 * torch.rand(n, generator=g, dtype=torch.float64).numpy())
        problems.append((pos, k, cnt, tot, (float(pos[0]), float(pos[-1]))))
    for max_iter in (1000, 3):  # 3: some stop before they converge
        many = K._lloyd_many(problems, max_iter)
        for (pos, k, cnt, tot, span), (c, b, it, ok) in zip(problems, many):
            c1, b1, it1, ok1 = K._lloyd(pos, k, max_iter, cnt, tot, span)
            assert torch.equal(c, c1) and torch.equal(b, b1) and (it, ok) == (it1, ok1), (pos.size, k)
    xs = [_heavy_tailed(n=K.HIST_BINS + 5000 * i, seed=i) for i in range(3)] + [_heavy_tailed(500)]
    xs[1][::3] = 0.0  # a pruned layer: a zero code and two signs
    for fit, x in zip(K.kmeans_1d_many(xs, 16), xs):
        one = K.kmeans_1d(x, 16)
        assert torch.equal(fit.centroids, one.centroids)
        assert torch.equal(fit.encode(x), one.encode(x))


def _gaussian_stack(seed: int) -> torch.nn.Module:
    """Linears with transformers' N(0, 0.02) initialisation between LayerNorms: 4-bit
    codebooks move its outputs by 5-20 % (random weights, nothing learnt to keep)."""
    torch.manual_seed(seed)
    layers = [m for _ in range(4) for m in (torch.nn.Linear(32, 32), torch.nn.LayerNorm(32))]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(32, 4)).eval()
    for m in model:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
            torch.nn.init.zeros_(m.bias)
    return model


def test_share_without_bits_chooses_the_fewest_that_keep_its_tolerance():
    # default `share` on random ViT / ConvNeXt / DeiT classifiers missed its own tolerance
    # (cosine 0.94-0.97) and strict policy refused it; a user who gives no bits gets a
    # codebook that keeps the tolerance, as prune chooses its sparsity
    model = _gaussian_stack(0)
    x = (torch.randn(16, 32, generator=torch.Generator().manual_seed(1)),)
    res = fxpress.compress(model, "share", example_inputs=x, progress=False)  # strict
    auto = res.records[-1].stats["auto_bits"]
    assert auto["tried"][4] < 0.985 and auto["chosen"] > 4
    assert list(auto["tried"]) == [b for b in (4, 5, 6, 8) if b <= auto["chosen"]]
    assert {m.bits for _, m in compressed_modules(res.module)} == {auto["chosen"]}
    # bits given are kept as given
    given = fxpress.compress(model, "share{bits=4}", example_inputs=x, policy="warn",
                             progress=False)
    assert given.records[-1].status == "warn" and "auto_bits" not in given.records[-1].stats
    assert {m.bits for _, m in compressed_modules(given.module)} == {4}
