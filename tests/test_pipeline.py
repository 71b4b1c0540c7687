import threading

import pytest
import torch

import fxpress
from fxpress.errors import InputError, MissingDataError, PassError, VerificationError
from fxpress.graph.weights import weighted_ops
from fxpress.passes.base import EXACT, Pass, PassResult, Tolerance, option
from tests.helpers import assert_unchanged, state_snapshot


class DoubleFirst(Pass):
    """A deliberately wrong pass: doubles the first weight; declares no tolerance."""

    name = "double-first"
    replaces_tensors = True
    factor = option(2.0, "multiplier")

    def run(self, gm, ctx):
        op = weighted_ops(gm)[0]
        op.set_weight(op.weight() * self.factor)
        return PassResult(gm, True, {"layer": op.name})


class Identity(Pass):
    name = "identity"
    tolerance = EXACT

    def run(self, gm, ctx):
        return PassResult(gm, False, {})


class Raises(Pass):
    name = "raises"

    def run(self, gm, ctx):
        raise RuntimeError("boom")


class Interrupted(Pass):
    name = "interrupted"

    def run(self, gm, ctx):
        raise KeyboardInterrupt


class WrongType(Pass):
    name = "wrong-type"

    def run(self, gm, ctx):
        return gm


class BreaksLint(Pass):
    name = "breaks-lint"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        first = next(n for n in gm.graph.nodes if n.op == "placeholder")
        # a node used before it is defined: lint must refuse the graph
        with gm.graph.inserting_before(first):
            gm.graph.call_function(torch.relu, (out.args[0],))
        return PassResult(gm, True, {})


class MakesNaN(Pass):
    name = "makes-nan"
    replaces_tensors = True
    tolerance = Tolerance(min_cosine=0.0)

    def run(self, gm, ctx):
        op = weighted_ops(gm)[-1]
        w = op.weight().clone()
        w[0, 0] = float("nan")
        op.set_weight(w)
        return PassResult(gm, True, {})


class WritesInPlace(Pass):
    """Claims to replace tensors but writes into them: the pipeline must notice."""

    name = "writes-in-place"
    replaces_tensors = True

    def run(self, gm, ctx):
        with torch.no_grad():
            weighted_ops(gm)[0].weight().mul_(1.0)
        return PassResult(gm, True, {})


class WritesInPlaceHonestly(Pass):
    """Does not promise to replace tensors: it gets its own copy, the caller is safe."""

    name = "writes-in-place-honestly"
    tolerance = Tolerance(min_cosine=0.0)

    def run(self, gm, ctx):
        with torch.no_grad():
            weighted_ops(gm)[0].weight().mul_(0.5)
        return PassResult(gm, True, {})


class NeedsCalibration(Pass):
    name = "needs-calibration"
    needs = ("calibration",)

    def run(self, gm, ctx):
        return PassResult(gm, False, {})


def test_wrong_pass_is_caught_by_default_equivalence(mlp, calib):
    snap = state_snapshot(mlp)
    with pytest.raises(VerificationError) as e:
        fxpress.compress(mlp, [DoubleFirst()], calibration=calib)
    err = e.value
    assert err.pass_name == "double-first" and err.metric == "max_rel_l2"
    assert err.value > 1e-3 and err.limit == 1e-5
    assert "double-first" in str(err) and "max_rel_l2" in str(err)
    x = calib[0][0]
    torch.testing.assert_close(err.last_good(x), mlp(x))  # last_good is usable
    assert_unchanged(mlp, snap)


def test_rollback_leaves_the_graph_as_before(mlp, calib):
    snap = state_snapshot(mlp)
    res = fxpress.compress(mlp, [Identity(), DoubleFirst(), Identity()], calibration=calib,
                           policy="rollback")
    assert [r.status for r in res.records] == ["ok", "rolled back", "ok"]
    x = calib[0][0]
    assert torch.equal(res.module(x), mlp(x))
    assert "max_rel_l2" in res.records[1].message
    assert_unchanged(mlp, snap)


def test_warn_keeps_the_change_and_records_it(mlp, calib):
    res = fxpress.compress(mlp, [DoubleFirst()], calibration=calib, policy="warn")
    assert res.records[0].status == "warn"
    assert res.records[0].incremental.rel_l2 > 1e-3
    x = calib[0][0]
    assert not torch.equal(res.module(x), mlp(x))


def test_tolerance_override_lets_a_lossy_pass_through(mlp, calib):
    res = fxpress.compress(mlp, [DoubleFirst(tol={"max_rel_l2": 10.0})], calibration=calib)
    assert res.records[0].status == "ok"


def test_exact_pass_passes_at_1e_6(mlp, calib):
    res = fxpress.compress(mlp, [Identity()], calibration=calib)
    r = res.records[0]
    assert r.status == "ok" and r.incremental.rel_l2 == 0.0 and r.tolerance == {"max_rel_l2": 1e-6}


@pytest.mark.parametrize("bad, fragment", [
    (Raises(), "raised RuntimeError: boom"),
    (WrongType(), "returned GraphModule"),
    (BreaksLint(), "fails lint"),
    (WritesInPlace(), "in place"),
])
def test_broken_passes_raise_pass_errors_with_last_good(mlp, calib, bad, fragment):
    snap = state_snapshot(mlp)
    with pytest.raises(PassError) as e:
        fxpress.compress(mlp, [Identity(), bad], calibration=calib)
    assert e.value.pass_name == bad.name and fragment in str(e.value)
    x = calib[0][0]
    torch.testing.assert_close(e.value.last_good(x), mlp(x))
    if not isinstance(bad, WritesInPlace):  # that one lied about replacing tensors
        assert_unchanged(mlp, snap)


def test_nan_is_never_kept(mlp, calib):
    for policy in ("strict", "warn"):
        with pytest.raises(VerificationError) as e:
            fxpress.compress(mlp, [MakesNaN()], calibration=calib, policy=policy)
        assert e.value.metric == "nonfinite" and "NaN/Inf" in str(e.value)
    res = fxpress.compress(mlp, [MakesNaN()], calibration=calib, policy="rollback")
    assert res.records[0].status == "rolled back"


def test_a_pass_that_writes_in_place_gets_its_own_copy(mlp, calib):
    snap = state_snapshot(mlp)
    res = fxpress.compress(mlp, [WritesInPlaceHonestly()], calibration=calib)
    assert res.records[0].changed
    assert_unchanged(mlp, snap)


def test_keyboard_interrupt_keeps_last_good(mlp, calib):
    pipe = fxpress.Pipeline([Identity(), Interrupted()])
    with pytest.raises(KeyboardInterrupt) as e:
        pipe.run(mlp, calibration=calib)
    x = calib[0][0]
    assert torch.equal(e.value.last_good(x), mlp(x))
    assert torch.equal(pipe.last_good(x), mlp(x))


def test_missing_data_is_reported_before_the_pass_runs(mlp, digits):
    with pytest.raises(MissingDataError, match="needs calibration"):
        fxpress.compress(mlp, [NeedsCalibration()], example_inputs=(digits.x_test[:8],))


def test_records_carry_bytes_sparsity_and_metrics(mlp, calib):
    res = fxpress.compress(mlp, "prune{sparsity=0.5,scope=global}", calibration=calib)
    r = res.records[0]
    assert r.bytes_before == r.bytes_after == res.original_bytes > 0
    assert abs(r.sparsity - 0.5) < 1e-6 and r.seconds > 0 and r.verify_seconds > 0
    assert 0.9 < r.cumulative.cosine <= 1 and r.cumulative.top1 is not None
    table = res.report()
    assert "prune{sparsity=0.5,scope=global}" in table and "50.0%" in table
    assert res.module.meta["fxpress"]["passes"] == ["prune{sparsity=0.5,scope=global}"]


def test_instruments_dump_code_and_time_passes(mlp, calib, tmp_path):
    timer, dumper = fxpress.PassTimer(), fxpress.GraphDumper(tmp_path / "dump")
    fxpress.compress(mlp, "prune{sparsity=0.3},prune{threshold=0.001}", calibration=calib,
                     instruments=[timer, dumper])
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["01-prune.after.py", "01-prune.before.py", "02-prune.after.py",
                     "02-prune.before.py"]
    assert "def forward" in (tmp_path / "dump" / "01-prune.after.py").read_text()
    assert [n for n, _ in timer.times] == ["prune{sparsity=0.3}", "prune{threshold=0.001}"]


def test_lossy_steps_before_a_recovery_step_are_deferred(mlp, calib):
    class Recover(Identity):
        name = "recover"
        recovers = True

    res = fxpress.compress(mlp, [DoubleFirst(), Recover()], calibration=calib)
    assert res.records[0].status == "deferred" and "#2" in res.records[0].message


def test_concurrent_pipelines_match_sequential_runs(mlp, calib):
    text = "prune{sparsity=0.6,scope=global},prune{threshold=0.02}"
    expected = fxpress.compress(mlp, text, calibration=calib).module.state_dict()
    results = [None] * 3

    def work(i):
        results[i] = fxpress.compress(mlp, text, calibration=calib).module.state_dict()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sd in results:
        assert sd.keys() == expected.keys()
        assert all(torch.equal(sd[k], expected[k]) for k in sd)


def test_replaced_graphs_are_freed_and_no_runtime_cache_is_kept(mlp, calib):
    import gc
    import weakref

    from fxpress.graph.memory import caches_enabled
    from fxpress.graph.runtime import compressed_modules

    class Watch(fxpress.Instrument):
        def __init__(self):
            self.graphs, self.caching = [], []

        def run_before_pass(self, pass_, gm, ctx):
            self.graphs.append(weakref.ref(gm))
            self.caching.append(caches_enabled())

    watch = Watch()
    gc.disable()  # the pipeline itself must collect the graphs it replaced
    try:
        res = fxpress.compress(mlp, "prune{sparsity=0.5},quantize{bits=8}", calibration=calib,
                               instruments=[watch])
        assert [g() is None for g in watch.graphs] == [True, True]
    finally:
        gc.enable()
    assert watch.caching == [False, False] and caches_enabled()
    from fxpress.passes.int8 import _prepacked
    assert not any(m in _prepacked for _, m in compressed_modules(res.module))
    x = calib[0][0]
    assert torch.equal(res.module(x), res.module(x))  # caches are built on first use again


class ReplacesAll(Pass):
    """Replaces every weight, and reports which replaced weights were still alive right after
    (held by the graph before the pass) -- what in_place=True frees."""

    name = "replaces-all"
    replaces_tensors = True
    tolerance = Tolerance(min_cosine=0.0)

    def run(self, gm, ctx):
        import gc
        import weakref

        alive = 0
        for op in weighted_ops(gm):
            old = weakref.ref(op.weight())
            op.set_weight(op.weight() * 0.5)
            gc.collect()
            alive += old() is not None
        return PassResult(gm, True, {"alive": alive})


def test_in_place_frees_what_a_pass_replaces_and_matches_the_copying_run(mlp, calib):
    snap = state_snapshot(mlp)
    passes = "prune{sparsity=0.5},quantize{bits=8}"
    copied = fxpress.compress(mlp, passes, calibration=calib)
    inplace = fxpress.compress(mlp, passes, calibration=calib, in_place=True)
    x = calib[0][0]
    assert torch.equal(copied.module(x), inplace.module(x))
    assert [r.stats["bytes_after"] for r in inplace.records[1:]] == \
        [r.stats["bytes_after"] for r in copied.records[1:]]
    assert [r.zeros for r in inplace.records] == [r.zeros for r in copied.records]
    sd_copied, sd_inplace = copied.module.state_dict(), inplace.module.state_dict()
    assert sd_copied.keys() == sd_inplace.keys()
    assert all(torch.equal(sd_copied[k], sd_inplace[k]) for k in sd_copied)
    # a weight the pipeline made (prune's) outlives its replacement only in the graph kept
    # for last_good; the caller's own weights are the caller's
    steps = fxpress.Pipeline.parse("prune{sparsity=0.5}").passes + [ReplacesAll()]
    kept = fxpress.compress(mlp, steps, calibration=calib)
    freed = fxpress.compress(mlp, steps, calibration=calib, in_place=True)
    assert kept.records[1].stats["alive"] == len(weighted_ops(kept.module)) == 3
    assert freed.records[1].stats["alive"] == 0
    kept_snap = state_snapshot(kept.module)
    given = fxpress.compress(kept.module, [ReplacesAll()], calibration=calib, in_place=True)
    assert given.records[0].stats["alive"] == 3  # a given GraphModule keeps its weights
    assert_unchanged(kept.module, kept_snap)
    assert_unchanged(mlp, snap)


def test_in_place_has_no_last_good_and_refuses_rollback(mlp, calib):
    snap = state_snapshot(mlp)
    with pytest.raises(VerificationError) as e:
        fxpress.compress(mlp, [DoubleFirst()], calibration=calib, in_place=True)
    assert e.value.last_good is None
    with pytest.raises(fxpress.errors.InputError, match="rollback.*in_place"):
        fxpress.compress(mlp, [Identity()], calibration=calib, policy="rollback", in_place=True)
    # a pass that may write into tensors still gets its own copy: the caller stays whole
    res = fxpress.compress(mlp, [WritesInPlaceHonestly()], calibration=calib, in_place=True)
    assert res.records[0].status == "ok"
    assert_unchanged(mlp, snap)
    pipe = fxpress.Pipeline.from_recipe('pipeline = "prune{sparsity=0.5}"\nin_place = true\n',
                                        fxpress.registry())
    assert pipe.in_place
    with pytest.raises(fxpress.errors.PipelineSpecError, match="in_place"):
        fxpress.Pipeline.from_recipe('pipeline = "prune"\nin_place = "yes"\n', fxpress.registry())


def test_one_value_per_sample_is_compared_as_a_column():
    # a regression head's [B, 1] output: a per-sample cosine is only its sign, so a
    # near-zero value that flips would read -1 and a scaled one would read 1
    from fxpress.passes.verify import compare

    ref = torch.tensor([[1.0], [2.0], [-3.0], [1e-4]])
    flipped = ref.clone()
    flipped[3] = -1e-4
    m = compare([[flipped]], [[ref]], top1=False)
    assert m.cosine_min > 0.999 and m.rel_l2 < 1e-4
    wrong = torch.tensor([[1.0], [-2.0], [3.0], [1e-4]])
    assert compare([[wrong]], [[ref]], top1=False).cosine_min < 0.3


def test_top1_counts_a_flip_between_tied_reference_logits_as_agreement():
    # a random-weight classifier's logits can be near-tied: 8-bit quantize flipped one of
    # 16 ResNet samples whose top two differed by 0.6 % of the row's spread, and strict
    # policy refused a pass that kept cosine 0.9999
    from fxpress.passes.verify import TOP1_TIE, compare

    ref = torch.tensor([[2.0, 2.0 - 0.5 * TOP1_TIE, -1.0, 0.0], [3.0, 0.0, 1.0, -2.0]])
    std = float(ref[0].std(unbiased=False))
    tied = ref.clone()
    tied[0, 1] += 0.02 * std  # within the tie: the second class now wins
    assert tied[0].argmax() == 1 and compare([[tied]], [[ref]]).top1 == 1.0
    real = ref.clone()
    real[1, 2] = 3.5  # a decided sample changes its class
    assert compare([[real]], [[ref]]).top1 == 0.5
    apart = torch.tensor([[2.0, 2.0 - 2 * TOP1_TIE * std, -1.0, 0.0]])
    flipped = apart.clone()
    flipped[0, 1] = 2.1
    assert compare([[flipped]], [[apart]]).top1 == 0.0


def test_weights_no_pass_can_reach_are_named_in_the_report():
    """A parameter read by something other than a linear/conv/embedding op (a position
    table added to activations) stays float: every weight-rewriting pass's record names it
    and what reads it, so "compressed" never hides a float tensor. (A ``W @ x`` product is
    a linear since capture rewrites it: ``tests/test_capture.py``.)"""
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.mix = torch.nn.Parameter(torch.randn(6, 5))   # mixes positions: W @ x
            self.pos = torch.nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            return self.mix @ self.proj(x + self.pos)

    res = fxpress.compress(Odd(), "quantize{bits=8}", example_inputs=(torch.randn(2, 5, 4),),
                           progress=False)
    floats = res.records[0].stats["float_weights"]
    assert set(floats) == {"pos"} and {"proj.weight", "mix"} <= set(res.records[0].stats["layers"])
    assert "add" in floats["pos"]


class _PaddedGarbage(torch.nn.Module):
    """Embeds tokens; at padded positions it writes ``fill`` (what it computes there is not
    its output: the mask tells it to ignore them)."""

    def __init__(self, fill: float = 0.0):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.head = torch.nn.Linear(8, 3)
        self.fill = fill

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = torch.where(attention_mask.unsqueeze(-1).bool(), h, torch.full_like(h, self.fill))
        return {"last_hidden_state": h, "pooled": self.head(h[:, 0])}


def test_a_tokenizers_mapping_binds_by_name_and_padding_is_not_compared():
    from fxpress.errors import InputError
    from fxpress.graph.capture import as_input_tuple
    from fxpress.passes.verify import Verifier, looks_like_logits, padding_mask_position

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(1, 20, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    # a tokenizer's output, keys in its own order (token_type_ids before attention_mask)
    enc = transformers.BatchEncoding({"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
                                      "attention_mask": mask})
    model = _PaddedGarbage().eval()
    batch = as_input_tuple(enc, model=model)
    assert batch[0] is ids and batch[1] is mask and batch[2] is enc["token_type_ids"]
    assert as_input_tuple({"input_ids": ids}, model=model) == (ids,)
    # other values at padded positions, the same output; the named outputs hold no logits,
    # so argmax agreement is not measured
    assert padding_mask_position(model, [batch]) == 1
    v = Verifier(model, [batch])
    other = _PaddedGarbage(fill=5.0)
    other.load_state_dict(model.state_dict())
    m = v.compare_to_reference(v.run(other))
    assert m.rel_l2 == 0.0 and m.top1 is None and v.names == ["last_hidden_state", "pooled"]
    # through the pipeline: the mapping is the example inputs, and the result runs by name
    res = fxpress.compress(model, "quantize{bits=8}", example_inputs=enc)
    assert res.records[-1].status == "ok"
    assert res.module(**enc)["last_hidden_state"].shape == (3, 6, 8)
    for bad, says in [({"input_ids": ids, "pixel_values": ids}, "no argument 'pixel_values'"),
                      ({"attention_mask": mask}, "required argument 'input_ids'")]:
        with pytest.raises(InputError, match=says):
            fxpress.compress(model, "quantize{bits=8}", example_inputs=bad)
    # a model whose outputs name logits gets top-1 agreement on them only
    named = Verifier(torch.nn.Sequential(), [(torch.randn(4, 5),)])
    assert named.top1 is True
    assert looks_like_logits([], ["last_hidden_state", "logits"]) == frozenset({1})


def test_training_batches_with_named_inputs_and_labels_are_bound_by_name(mlp, digits):
    """A data collator's batches ({"x": ..., "labels": y}) train distill as (x, y) would."""
    from torch.utils.data import DataLoader

    from fxpress.graph.capture import positional_batch, positional_batches

    x, y = digits.x_train, digits.y_train
    pairs = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    named = [{"labels": b, "x": a} for a, b in pairs]
    assert all(p[0] is a and p[1] is b for p, (a, b) in zip(positional_batches(named, mlp), pairs))
    assert positional_batch(({"x": pairs[0][0]}, pairs[0][1]), mlp)[1] is pairs[0][1]
    assert positional_batches(pairs, mlp) is pairs  # positional data is left as it is
    rows = [{"x": x[i], "labels": y[i]} for i in range(256)]
    loader = positional_batches(DataLoader(rows, batch_size=32), mlp)
    assert isinstance(loader, DataLoader) and len(loader) == 8
    xb, yb = next(iter(loader))
    assert torch.equal(xb, x[:32]) and torch.equal(yb, y[:32])
    spec = "prune{sparsity=0.5},distill{epochs=1,lr=0.001}"
    by_name = fxpress.compress(mlp, spec, train_data=named, progress=False)
    by_position = fxpress.compress(mlp, spec, train_data=pairs, progress=False)
    for a, b in zip(by_name.module.state_dict().values(), by_position.module.state_dict().values()):
        assert torch.equal(a, b)
    assert by_name.records[-1].cumulative.accuracy_ratio is not None  # the labels were seen


class _CollatedRows(torch.utils.data.Dataset):
    """A tokenized, labelled dataset as a transformers user has one: dicts of
    input_ids, attention_mask and labels."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 100, (10,), generator=g),
                "attention_mask": torch.ones(10, dtype=torch.long), "labels": torch.tensor(i % 2)}


def test_calibration_from_a_labelled_dataloader_of_dicts_leaves_the_labels_out(tmp_path):
    """The same DataLoader a user trains with, given as calibration: its "labels" went into
    forward, the transformers model computed its loss into the outputs, and the run failed
    with "cannot save node 'cross_entropy_loss' ... not an allowlisted function"."""
    from torch.utils.data import DataLoader

    from fxpress.graph.capture import as_input_tuple

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    clf = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2)).eval()
    loader = DataLoader(_CollatedRows(), batch_size=16)
    batch = next(iter(loader))
    assert as_input_tuple(batch, model=clf) == (batch["input_ids"], batch["attention_mask"])
    res = fxpress.compress(clf, "quantize{bits=8}", calibration=loader, progress=False)
    assert res.records[-1].status == "ok" and res.records[-1].cumulative.top1 is not None
    assert not any("loss" in str(n.target) for n in res.module.graph.nodes)
    fxpress.save(res, tmp_path / "clf.fxp")
    out = fxpress.load(tmp_path / "clf.fxp")(batch["input_ids"], batch["attention_mask"])
    assert out["logits"].shape == (16, 2)

    class _NeedsLabel(torch.nn.Module):  # a forward that requires its label keeps it
        def forward(self, x, labels):
            return x * labels

    x, y = torch.randn(4, 3), torch.ones(4, 3)
    assert as_input_tuple({"x": x, "labels": y}, model=_NeedsLabel()) == (x, y)


def test_calibration_of_labelled_tuples_says_the_last_tensor_looks_like_a_label():
    """calibration=DataLoader(TensorDataset(x, y)) ran the model on (x, y): the error said
    only "takes 2 positional arguments but 3 were given ... Pass inputs shaped like real
    model inputs"."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x, y = torch.randn(64, 13), torch.randint(0, 3, (64,))
    with pytest.raises(InputError, match=r"the last looks like a label.*\[\(x,\) for x, y in loader\]"):
        fxpress.compress(model, "quantize{bits=8}", calibration=DataLoader(TensorDataset(x, y), batch_size=32))
    with pytest.raises(InputError) as e:  # a wrong width is no label
        fxpress.compress(model, "quantize{bits=8}", calibration=[(torch.randn(4, 12),)])
    assert "label" not in str(e.value)


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x, gate):
        return self.head(torch.relu(self.fc(x)) * gate)


def test_training_batches_with_grouped_inputs_train_a_multi_input_model():
    """((x, gate), y), the inputs grouped as calibration gives them, trains as (x, gate, y)
    would; it was handed to forward as one argument (a PassError from inside the model)."""
    from fxpress.graph.capture import positional_batch, positional_batches

    torch.manual_seed(0)
    model = _TwoInputs().eval()
    x, gate = torch.randn(128, 8), torch.rand(128, 16)
    y = model(x, gate).argmax(1)
    flat = [(x[i:i + 32], gate[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    grouped = [((a, g), b) for a, g, b in flat]
    assert all(p[0] is f[0] and p[1] is f[1] and p[2] is f[2]
               for p, f in zip(positional_batches(grouped, model), flat))
    # a forward of one argument may take a tuple (an RNN's state): left as it is
    pair = ((torch.randn(2, 4), torch.randn(2, 4)), torch.zeros(2))
    assert positional_batch(pair, torch.nn.Linear(4, 4)) is pair
    assert positional_batches([pair], torch.nn.Linear(4, 4)) == [pair]
    with pytest.raises(InputError, match=r"3 inputs grouped.*takes 2"):  # too many for forward
        positional_batch(((x, gate, x), y), model)
    spec = "prune{sparsity=0.5},distill{epochs=1,lr=0.001}"
    calib = [(x[:32], gate[:32])]
    kw = dict(calibration=calib, policy="warn", progress=False)
    by_group = fxpress.compress(model, spec, train_data=grouped, **kw)
    by_flat = fxpress.compress(model, spec, train_data=flat, **kw)
    for a, b in zip(by_group.module.state_dict().values(), by_flat.module.state_dict().values()):
        assert torch.equal(a, b)
    assert by_group.records[-1].cumulative.accuracy_ratio is not None


def test_a_dataclass_output_is_verified_field_by_field():
    # pytree sees a plain dataclass as one leaf, no tensor: the verifier compared nothing
    # and any pass on such a model verified ok with rel_l2 0 (round 20's timm_like probe)
    from tests.test_artifact_outputs import _DataclassNet

    torch.manual_seed(0)
    model, x = _DataclassNet().eval(), torch.randn(16, 6)
    rec = fxpress.compress(model, "binarize", example_inputs=(x,), policy="warn",
                           progress=False).records[-1]
    assert rec.incremental.rel_l2 > 0.05 and rec.incremental.top1 is not None
