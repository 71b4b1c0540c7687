import pytest
import torch

import fxpress
from examples.digits import accuracy
from fxpress.errors import OptionError
from fxpress.graph.weights import weighted_ops
from fxpress.passes.prune import kth_smallest_magnitude, zero_smallest
from tests.helpers import assert_unchanged, state_snapshot


def _weights(gm):
    return {op.name: op.weight() for op in weighted_ops(gm)}


def test_threshold_zeroes_small_magnitudes_of_both_signs(mlp, calib):
    res = fxpress.compress(mlp, "prune{threshold=0.02}", calibration=calib, policy="warn")
    orig = dict(mlp.named_parameters())
    for name, w in _weights(res.module).items():
        o = orig[name]
        small = o.abs() < 0.02
        assert torch.equal(w[small], torch.zeros_like(w[small]))
        assert torch.equal(w[~small], o[~small])  # negative weights above it survive
        assert (o[~small] < 0).any()


@pytest.mark.parametrize("s", [0.3, 0.5, 0.9])
def test_layer_sparsity_is_exact_in_every_layer(mlp, calib, s):
    res = fxpress.compress(mlp, f"prune{{sparsity={s},scope=layer}}", calibration=calib, policy="warn")
    for name, w in _weights(res.module).items():
        assert int((w == 0).sum()) == round(s * w.numel()), name
    assert res.records[0].stats["layers"].keys() == _weights(res.module).keys()


def test_global_sparsity_is_exact_overall_and_uneven_across_layers(mlp, calib):
    res = fxpress.compress(mlp, "prune{sparsity=0.8,scope=global}", calibration=calib, policy="warn")
    ws = _weights(res.module)
    total = sum(w.numel() for w in ws.values())
    zeros = sum(int((w == 0).sum()) for w in ws.values())
    assert zeros == round(0.8 * total)
    per_layer = res.records[0].stats["layers"]
    assert max(per_layer.values()) - min(per_layer.values()) > 0.1  # global ≠ layer-wise
    # every kept weight is at least as large as every pruned one, across layers
    orig = dict(mlp.named_parameters())
    kept = torch.cat([orig[n][w != 0].abs() for n, w in ws.items()])
    pruned = torch.cat([orig[n][w == 0].abs() for n, w in ws.items()])
    assert kept.min() >= pruned.max()


def test_zero_smallest_breaks_ties_exactly():
    w = torch.tensor([0.0, 0.0, 0.0, 0.5, -0.5, 0.5, 1.0])
    (out,) = zero_smallest([w], 5)
    assert int((out == 0).sum()) == 5 and out[-1] == 1.0


def test_global_kth_matches_a_full_sort_without_joining():
    torch.manual_seed(0)
    ts = [torch.randn(300, 200), torch.randn(1000) * 5, torch.zeros(50), torch.randn(7, 7)]
    allabs = torch.cat([t.abs().flatten() for t in ts]).sort().values
    for k in (1, 10, 5000, 30000, allabs.numel()):
        got = kth_smallest_magnitude(ts, k, bins=64, max_candidates=100)
        assert got == float(allabs[k - 1])


def test_global_fifty_percent_keeps_digits_accuracy(mlp, calib, digits):
    before = accuracy(mlp, digits.x_test, digits.y_test)
    res = fxpress.compress(mlp, "prune{sparsity=0.5,scope=global}", calibration=calib)
    after = accuracy(res.module, digits.x_test, digits.y_test)
    assert res.records[0].status == "ok"
    assert before - after <= 0.01


def test_one_shot_ninety_percent_loses_accuracy_and_strict_stops_it(mlp, calib, digits):
    before = accuracy(mlp, digits.x_test, digits.y_test)
    res = fxpress.compress(mlp, "prune{sparsity=0.9}", calibration=calib, policy="warn")
    assert before - accuracy(res.module, digits.x_test, digits.y_test) > 0.05
    with pytest.raises(fxpress.errors.VerificationError, match="prune"):
        fxpress.compress(mlp, "prune{sparsity=0.9}", calibration=calib)


def test_include_exclude_and_ops(mlp, calib):
    snap = state_snapshot(mlp)
    res = fxpress.compress(mlp, "prune{sparsity=0.5,include=[layers.*],exclude=[layers.1]}",
                           calibration=calib, policy="warn")
    layers = res.records[0].stats["layers"]
    assert list(layers) == ["layers.0.weight"]
    ws = _weights(res.module)
    assert torch.equal(ws["head.weight"], mlp.head.weight)
    assert_unchanged(mlp, snap)


def test_a_glob_that_matches_nothing_is_an_error(mlp, calib):
    with pytest.raises(OptionError, match="match no weighted op") as e:
        fxpress.compress(mlp, "prune{sparsity=0.5,include=[encoder.*]}", calibration=calib)
    assert "layers.0.weight" in str(e.value)  # shows what names look like


def test_pruning_twice_keeps_earlier_zeros(mlp, calib):
    res = fxpress.compress(mlp, "prune{sparsity=0.5},prune{threshold=0.01}", calibration=calib,
                           policy="warn")
    first = fxpress.compress(mlp, "prune{sparsity=0.5}", calibration=calib, policy="warn")
    for name, w in _weights(first.module).items():
        assert (_weights(res.module)[name][w == 0] == 0).all()


def test_prune_on_export_graph_of_minilm(minilm, minilm_batches):
    snap = {k: v.clone() for k, v in list(minilm.state_dict().items())[:8]}
    res = fxpress.compress(minilm, "prune{sparsity=0.3,scope=layer,include=[*encoder.layer.0.*]}",
                           calibration=minilm_batches[:1])
    assert res.capture["method"] == "export"
    layers = res.records[0].stats["layers"]
    assert len(layers) == 6 and all(abs(s - 0.3) < 1e-4 for s in layers.values())
    assert res.records[0].cumulative.cosine > 0.97
    assert all(torch.equal(minilm.state_dict()[k], v) for k, v in snap.items())


def test_selection_by_sample_bracket_equals_the_exact_search():
    """Per-layer sparsity finds its cut by selection (a sample brackets it); the result
    must be the exact search's, ties at the cut included, on every shape and count."""
    from fxpress.passes import prune as P

    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 120000, (1,), generator=g))
        w = torch.randn(n, generator=g)
        if trial % 3 == 1:
            w = torch.round(w * 4) / 4  # many ties at the cut
        if trial % 3 == 2:
            w[: n // 2] = 0
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        got = P.zero_smallest([w], k)[0]
        if k < n:
            v = P.kth_smallest_magnitude([w], k)
            assert torch.equal(got, P.zero_below([w], v, k - P.count_below([w], v))[0]), (n, k)
        assert int((got == 0).sum()) >= k
    w = torch.randn(300, 200, generator=g).t()  # a transposed view (GPT-2's Conv1D)
    got = P.zero_smallest([w], 30000)[0]
    assert got.stride() == w.stride() and int((got == 0).sum()) == 30000


def test_layer_stats_count_the_zeros_the_selection_made():
    """Per-layer prune hands the stats the number of zeros it made instead of counting
    again: the figure must be the weight's real sparsity, also for a layer that already
    holds more zeros than asked (the cut is then 0) and for ties at the cut."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 200),
                                torch.nn.ReLU(), torch.nn.Linear(200, 10))
    with torch.no_grad():
        model[2].weight[:, :250] = 0.0                                   # 83% zeros already
        model[4].weight.copy_(torch.round(model[4].weight * 20) / 20)   # many ties
    gm = torch.fx.symbolic_trace(model)
    p = fxpress.Pipeline.parse("prune{sparsity=0.5,scope=layer}").passes[0]
    stats = p.run(gm, fxpress.PassContext(example_inputs=(torch.randn(8, 64),))).stats["layers"]
    for name, w in _weights(gm).items():
        real = float((w == 0).sum()) / w.numel()
        assert stats[name] == pytest.approx(real, abs=1e-12), name
        assert real >= 0.5 - 1e-9


def test_blockwise_selection_over_several_tensors_equals_the_exact_search(monkeypatch):
    """Global scope (and a layer over 4M weights) finds its cut a block at a time by
    selection: the k-th magnitude and the count below it must be the exact search's,
    ties and zeros included, blocks smaller than the tensors."""
    from fxpress.passes import prune as P

    monkeypatch.setattr(P, "BLOCK", 4096)
    g = torch.Generator().manual_seed(1)
    for trial in range(12):
        ts = [torch.randn(int(torch.randint(1, 20000, (1,), generator=g)), generator=g) * (i + 1)
              for i in range(3)]
        if trial % 3 == 1:
            ts = [torch.round(t * 2) / 2 for t in ts]  # ties at the cut
        if trial % 3 == 2:
            ts[0][: ts[0].numel() // 2] = 0
        n = sum(t.numel() for t in ts)
        k = int(torch.randint(1, n, (1,), generator=g))
        got = P._kth_by_selection(ts, k)
        v = P.kth_smallest_magnitude(ts, k)
        assert got is None or got == (v, P.count_below(ts, v)), (trial, k)
        out = P.zero_smallest(ts, k)
        assert sum(int((o == 0).sum()) for o in out) == max(k, sum(int((t == 0).sum()) for t in ts))


@pytest.mark.parametrize("scope", ["layer", "global", "adaptive"])
def test_channels_last_conv_weights_are_pruned_in_their_layout(scope):
    # a channels_last weight's flat reshape is a copy: the pruned values were written into
    # it and lost, the result stayed uninitialised (NaN outputs)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                                torch.nn.Flatten())
    model = model.to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    snap = state_snapshot(model)
    gm = fxpress.compress(model, f"prune{{sparsity=0.5,scope={scope}}}", calibration=[(x,)],
                          policy="warn").module
    assert_unchanged(model, snap)
    for name in ("0.weight", "2.weight"):
        w, orig = gm.get_parameter(name), model.get_parameter(name)
        assert w.is_contiguous(memory_format=torch.channels_last)
        kept = w != 0
        assert torch.equal(w[kept], orig[kept])  # survivors are the original values
    total = sum(int((gm.get_parameter(n) == 0).sum()) for n in ("0.weight", "2.weight"))
    assert total == (216 + 288) // 2
    assert torch.isfinite(gm(x)).all()


def test_layers_at_their_floor_are_named_in_the_report():
    # a squeeze-excite 1x1 conv with 2 inputs per output unit sits at the floor of
    # min_per_unit=2: it stays dense, and the report says why
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2),
                                torch.nn.ReLU(), torch.nn.Linear(2, 16)).eval()
    res = fxpress.compress(model, "prune{sparsity=0.5}", calibration=[(torch.randn(4, 16),)],
                           policy="warn")
    stats = res.records[0].stats
    assert stats["layers"]["4.weight"] == 0.0
    assert "floor of 2 weights per output unit" in stats["kept_dense"]["4.weight"]
    assert set(stats["kept_dense"]) == {"4.weight"}


def test_prune_without_a_target_chooses_the_highest_sparsity_that_keeps_its_tolerance(mlp, calib):
    """``prune`` alone (a new user's first try) was an OptionError; it now searches its
    ladder and keeps the highest sparsity whose one-shot result meets the tolerance with a
    quarter of the slack to spare, and the next rung up, when tried, missed it."""
    from fxpress.passes.prune import AUTO_LADDER

    snap = state_snapshot(mlp)
    res = fxpress.compress(mlp, "prune", calibration=calib, progress=False)
    rec = res.records[0]
    auto = rec.stats["auto_sparsity"]
    assert rec.status == "ok" and auto["chosen"] in AUTO_LADDER
    assert auto["chosen"] in auto["tried"] and auto["tried"][auto["chosen"]] >= 1 - 0.75 * 0.1
    assert abs(rec.stats["sparsity"] - auto["chosen"]) < 0.02
    higher = [s for s in auto["tried"] if s > auto["chosen"]]
    assert auto["chosen"] == AUTO_LADDER[-1] or min(higher) == AUTO_LADDER[
        AUTO_LADDER.index(auto["chosen"]) + 1]
    assert auto["chosen"] == max(auto["kept"]) and not set(higher) & set(auto["kept"])
    # the result is the plain prune at that sparsity, bit for bit
    plain = fxpress.compress(mlp, f"prune{{sparsity={auto['chosen']}}}", calibration=calib,
                             progress=False)
    for a, b in zip(res.module.state_dict().values(), plain.module.state_dict().values()):
        assert torch.equal(a, b)
    assert_unchanged(mlp, snap)
    # a model no rung keeps whole: nothing pruned, and the record says so
    tight = fxpress.compress(mlp, "prune{tol.min_cosine=0.999999}", calibration=calib,
                             progress=False)
    assert tight.records[0].stats["auto_sparsity"]["chosen"] == 0.0
    assert "nothing was pruned" in tight.records[0].stats["auto_sparsity"]["why"]
    with pytest.raises(OptionError, match="exactly one"):
        fxpress.Pipeline.parse("prune{sparsity=0.5,threshold=0.1}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_selection_in_small_blocks_equals_the_exact_search_in_every_dtype(monkeypatch, dtype):
    """The selection's counting pass works a block at a time (numpy on float32/float64,
    float16 compared as float32): with blocks far smaller than the layers, the pruned
    copy, its zero count and layout must be the exact search's, ties and zeros included."""
    from fxpress.passes import prune as P

    monkeypatch.setattr(P, "SELECT_BLOCK", 1000)
    g = torch.Generator().manual_seed(3)
    for trial in range(24):
        n = int(torch.randint(2, 30000, (1,), generator=g))
        w = torch.randn(n, generator=g)
        if trial % 4 == 1:
            w = torch.round(w * 4) / 4  # many ties at the cut
        if trial % 4 == 2:
            w[: n // 3] = 0
            w[n // 3: n // 2] = -0.0
        w = w.to(dtype)
        if trial % 4 == 3 and n % 6 == 0:
            w = w.reshape(6, n // 6).t()  # a transposed layout
        k = int(torch.randint(1, n, (1,), generator=g))
        got = P._zero_smallest_one(w, k)
        if got is None:  # the bracket missed: the caller's exact fallback
            continue
        v = P.kth_smallest_magnitude([w], k)
        ref = P.zero_below([w], v, k - P.count_below([w], v))[0]
        assert torch.equal(got[0], ref) and got[0].stride() == w.stride(), (trial, n, k)
        assert got[1] == int((ref == 0).sum()), (trial, n, k)
        assert all(torch.equal(a, b) for a, b in zip(P.zero_smallest([w, w * 2], 2 * k),
                                                     P.zero_below([w, w * 2], *_cut([w, w * 2], 2 * k))))


def _cut(ts, k):
    from fxpress.passes import prune as P

    v = P.kth_smallest_magnitude(ts, k)
    return v, k - P.count_below(ts, v)
