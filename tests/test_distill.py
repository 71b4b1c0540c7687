"""distill: exact taps (fx and export graphs), the Distiller, recovery as a pipeline step
that keeps compression invariants, and the same training under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxpress
from examples.digits import (DigitsMLP, accuracy, few_labels, student_accuracies, train_data,
                             trained_mlp)
from fxpress.errors import MissingDataError, OptionError, VerificationError
from fxpress.graph.runtime import CompressedModule
from fxpress.graph.weights import weighted_ops
from fxpress.passes.base import Pass, PassResult, Tolerance
from fxpress.passes.distill import Distill, Tap, collect, tap_modules
from fxpress.passes.distill_data import Dist, epoch_batches
from fxpress.passes.prune import Prune
from fxpress.passes.verify import Verifier
from tests.conftest import ROOT
from tests.helpers import assert_unchanged, state_snapshot


# -- taps ------------------------------------------------------------------------------------

def test_default_taps_on_the_mlp_are_exact_and_expose_block_outputs(mlp, calib):
    res = fxpress.compress(mlp, "distill", calibration=calib)
    rec = res.records[0]
    assert rec.status == "ok" and rec.cumulative.max_abs == 0.0
    assert rec.stats["taps"] == ["layers.0", "layers.1", "head"]
    x = calib[0][0]
    with collect(res.module) as acts:
        out = res.module(x)
    assert torch.equal(out, mlp(x))
    assert torch.equal(acts["layers.0"], mlp.layers[0](x))  # the linear's output, before relu
    assert acts["layers.1"].shape == (len(x), 100)
    assert "_sink" not in tap_modules(res.module)["head"].__dict__  # nothing kept afterwards


def test_taps_on_the_cnn_are_exact(cnn, calib):
    res = fxpress.compress(cnn, "distill", calibration=calib)
    assert res.records[0].cumulative.max_abs == 0.0
    assert res.records[0].stats["taps"] == ["conv1", "bn1", "conv2", "bn2", "fc1", "fc2"]
    with collect(res.module) as acts:
        res.module(calib[0][0])
    assert acts["conv2"].shape == (128, 32, 4, 4)


def test_taps_on_an_export_graph_are_exact(bert_gm, bert_batches):
    res = fxpress.Pipeline.parse("distill,distill{taps=[*.layer.?.output]}", progress=False).run(
        bert_gm, calibration=bert_batches)
    default, glob = (r.stats["taps"] for r in res.records)
    assert default == ["bert.embeddings"] + [f"bert.encoder.layer.{i}" for i in range(2)]
    assert glob == [f"bert.encoder.layer.{i}.output" for i in range(2)]
    assert all(r.cumulative.max_abs == 0.0 for r in res.records)
    ids, mask = bert_batches[0]
    with collect(res.module) as acts:
        emb = res.module(ids, mask)
    assert torch.equal(emb, bert_gm(ids, mask))
    assert acts["bert.encoder.layer.1"].shape == (*ids.shape, 32)
    # a block's output is its output sublayer's (BertLayer returns BertOutput's LayerNorm)
    assert torch.equal(acts["bert.encoder.layer.1"], acts["bert.encoder.layer.1.output"])


def test_tapping_twice_adds_nothing_and_node_names_work(mlp, calib):
    res = fxpress.compress(mlp, "distill,distill,distill{taps=[relu]}", calibration=calib)
    assert [r.stats["inserted"] for r in res.records] == [3, 0, 1]
    assert sorted(tap_modules(res.module)) == ["head", "layers.0", "layers.1", "relu"]


def test_tap_errors_name_the_option(mlp, calib):
    with pytest.raises(OptionError, match="taps.*encoder.*layers.0"):
        fxpress.compress(mlp, "distill{taps=[encoder.*]}", calibration=calib)
    with pytest.raises(OptionError, match="'lr'.*epochs=0"):  # taps only: nothing to train
        fxpress.Pipeline.parse("distill{epochs=0,lr=0.1}")


def test_a_tap_rebuilds_from_its_config_without_tensors():
    tap = Tap("layers.0")
    again = Tap.from_state(tap.config(), {})
    x = torch.randn(3, 4)
    with collect(again) as acts:
        assert again(x) is x
    assert acts == {"layers.0": x} and tap.state_dict() == {}


# -- the Distiller -----------------------------------------------------------------------------

def test_distiller_from_a_wide_teacher_into_a_small_student_with_projected_features(digits, capsys):
    teacher = trained_mlp(hidden=(64, 32), epochs=20)
    snap = state_snapshot(teacher)
    torch.manual_seed(0)
    student = DigitsMLP(hidden=(16,))
    before = student.layers[0].weight.detach().clone()
    d = fxpress.Distiller(teacher, student, pairs={"layers.0": "layers.1"}, beta=0.1)
    history = d.fit(train_data(), epochs=6, lr=1e-2, progress=True)
    assert len(history) == 6 and history.loss[-1] < history.loss[0]
    assert {"kd", "ce", "feature", "loss"} <= set(history[0])
    # student 16 wide, teacher 32 wide: a learned 16 -> 32 projection
    assert d.projections[0].proj.weight.shape == (32, 16)
    # the student was captured and tapped; its parameters are the caller's, trained in place
    assert isinstance(d.student, torch.fx.GraphModule)
    assert not torch.equal(student.layers[0].weight, before)
    assert accuracy(student, digits.x_test, digits.y_test) > 0.85
    assert_unchanged(teacher, snap)
    assert "loss=" in capsys.readouterr().err  # the progress bar shows the loss


def test_labels_are_optional_and_kd_alone_moves_the_student_towards_the_teacher(digits):
    teacher = trained_mlp(hidden=(32,), epochs=30)
    torch.manual_seed(1)
    student = DigitsMLP(hidden=(16,))
    unlabelled = [(x,) for x, _ in train_data()]

    def agreement():
        with torch.no_grad():
            return float((student(digits.x_test).argmax(1) == teacher(digits.x_test).argmax(1)).float().mean())

    start = agreement()
    history = fxpress.Distiller(teacher, student).fit(unlabelled, epochs=5, lr=1e-2, progress=False)
    assert "ce" not in history[0]
    assert agreement() > max(start, 0.8)


def test_kd_with_a_transfer_set_beats_labels_only_when_labels_are_few(one_thread):
    """Issue #5's KD target, in the regime where it holds (bench/case_distill.py has the table).

    The 64-256-128-10 teacher saw every training label; the 64-32-10 student gets the labels
    of 10% of the images and the other 90% as images only, which only the teacher can label.
    Same loop, init and epochs per seed; only the loss and the unlabelled batches differ.
    """
    teacher = trained_mlp(hidden=(256, 128))
    labelled, unlabelled = few_labels(0.1)
    seeds, epochs = range(3), 10
    labels_only = student_accuracies(teacher, labelled, epochs, seeds, alpha=0.0)
    # labels only, as many optimizer steps as the KD student takes
    steps = -(-epochs * len(labelled + unlabelled) // len(labelled))
    longer = student_accuracies(teacher, labelled, steps, seeds, alpha=0.0)
    kd = student_accuracies(teacher, labelled + unlabelled, epochs, seeds)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    # measured over 10 seed triples: KD 0.928-0.941, labels only 0.36-0.48, longer 0.84-0.87
    assert mean(kd) > mean(labels_only) + 0.2
    assert mean(kd) > mean(longer) + 0.03
    assert min(kd) > max(longer)


def test_labelled_and_unlabelled_batches_mix_in_a_recovery_step(mlp, calib):
    labelled, unlabelled = few_labels(0.25)
    data = labelled + unlabelled  # (x, y) batches, then (x,) batches
    res = fxpress.compress(mlp, "prune{sparsity=0.5},distill{epochs=1,lr=1e-3}", calibration=calib,
                           train_data=data, progress=False)
    epoch = res.records[-1].stats["epochs"][0]
    assert epoch["batches"] == len(data) and {"kd", "ce", "loss"} <= set(epoch)
    # each part is a mean over the batches that have it: CE over the labelled ones only
    d = fxpress.Distiller(mlp, DigitsMLP(hidden=(16,)), alpha=0.0)
    only_ce = d.fit(labelled + unlabelled, epochs=1, lr=1e-6, progress=False)[0]
    assert only_ce["ce"] > 2.0  # an untrained 10-way classifier: about ln 10, not diluted


# -- recovery as a pipeline step -------------------------------------------------------------

class _DigitsDetections(nn.Module):
    """The trained digits MLP behind a head that returns a plain dataclass (a user's output
    class, no ModelOutput) holding its logits and a tuple of dicts."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        from tests.test_artifact_outputs import _Detections

        logits = self.mlp(x)
        return _Detections(logits, ({"box": logits[:, :4]}, {"score": logits.sigmoid()}))


def test_recovery_of_a_model_with_a_dataclass_output_trains_on_its_logits(mlp, calib, digits):
    # distill read outputs as pytree leaves, where a dataclass is one opaque leaf: it refused
    # any such model ("the model's output has no float tensor (_Detections)"; round 20's
    # timm_like probe). It now reads the fields as the verifier does: logits first.
    model = _DigitsDetections(mlp).eval()
    snap = state_snapshot(model)
    res = fxpress.compress(model, "prune{sparsity=0.95},distill{epochs=4,lr=1e-2}", calibration=calib,
                           train_data=train_data(), policy="warn", progress=False)
    prune_rec, distill_rec = res.records
    assert distill_rec.stats["epochs"][0]["ce"] > 0  # the labels were read against the logits
    pruned = fxpress.compress(model, "prune{sparsity=0.95}", calibration=calib, policy="warn").module
    with torch.no_grad():
        acc = lambda m: float((m(digits.x_test).logits.argmax(1) == digits.y_test).float().mean())  # noqa: E731
        assert acc(res.module) > acc(pruned) + 0.2
    assert_unchanged(model, snap)



def test_recovery_after_pruning_keeps_every_pruned_weight_zero(mlp, calib, digits):
    snap = state_snapshot(mlp)
    pruned = fxpress.compress(mlp, "prune{sparsity=0.95}", calibration=calib, policy="warn").module
    res = fxpress.compress(mlp, "prune{sparsity=0.95},distill{epochs=8,lr=1e-2}", calibration=calib,
                           train_data=train_data(), policy="warn", progress=False)
    prune_rec, distill_rec = res.records
    assert prune_rec.status == "deferred" and "recovery step #2" in prune_rec.message
    before = {op.name: op.weight() for op in weighted_ops(pruned)}
    for op in weighted_ops(res.module):
        w, zero = op.weight(), before[op.name] == 0
        assert torch.equal(w[zero], torch.zeros_like(w[zero])), op.name
        assert not torch.equal(w[~zero], before[op.name][~zero])  # the rest was trained
    assert distill_rec.stats["kept_zeros"] == sum(int((b == 0).sum()) for b in before.values())
    acc_pruned = accuracy(pruned, digits.x_test, digits.y_test)
    acc = accuracy(res.module, digits.x_test, digits.y_test)
    assert acc > acc_pruned + 0.3
    # the verdict is on task metrics against the original model
    assert distill_rec.cumulative.accuracy_ratio is not None and distill_rec.cumulative.top1 > 0.9
    assert_unchanged(mlp, snap)


def test_a_recovery_that_falls_short_fails_on_the_task_metric(mlp, calib):
    with pytest.raises(VerificationError, match="distill.*min_top1|distill.*accuracy_ratio"):
        fxpress.compress(mlp, "prune{sparsity=0.95},distill{epochs=1,lr=1e-6}", calibration=calib,
                         train_data=train_data(), progress=False)


def test_recovery_needs_training_data(mlp, calib):
    with pytest.raises(MissingDataError, match="distill.*train_data"):
        fxpress.compress(mlp, "prune{sparsity=0.5},distill{epochs=1}", calibration=calib)


class CodebookLinear(CompressedModule):
    """A test-only shared-weight linear: 2^bits centroids and a fixed index per weight."""

    technique = "test-share"

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, bits: int = 3, trainable: bool = True):
        super().__init__("linear")
        centroids = torch.quantile(w.detach().flatten().float(), torch.linspace(0, 1, 2 ** bits))
        self.register_buffer("codebook", centroids)
        self.register_buffer("indices", (w.detach().unsqueeze(-1) - centroids).abs().argmin(-1).to(torch.uint8))
        self.register_buffer("bias", None if b is None else b.detach().clone())
        self.trainable, self.calls = trainable, []

    def weight_float(self) -> torch.Tensor:
        return self.codebook[self.indices.long()]

    def begin_training(self):
        self.calls.append("begin")
        if not self.trainable:
            return []
        # gradients of every weight that shares a centroid sum into it; indices stay fixed
        self.codebook = nn.Parameter(self.codebook.detach().clone())
        return [self.codebook]

    def end_training(self) -> None:
        self.calls.append("end")
        if self.trainable:
            cb = self.codebook.detach().clone()
            del self.codebook
            self.register_buffer("codebook", cb)


class ToyShare(Pass):
    name = "toy-share"
    tolerance = Tolerance(min_cosine=0.0)
    replaces_tensors = True
    runtime_modules = (CodebookLinear,)

    def run(self, gm, ctx):
        for op in weighted_ops(gm):
            op.replace_with(CodebookLinear(op.weight(), op.bias(), trainable=op.name != "head.weight"))
        return PassResult(gm, True, {})


def test_compressed_modules_train_only_through_their_hooks(mlp, calib, digits):
    base = fxpress.Pipeline([Prune(sparsity=0.8), ToyShare()], policy="warn", progress=False).run(
        mlp, calibration=calib)
    res = fxpress.Pipeline([Distill(epochs=4, lr=3e-3)], policy="warn", progress=False).run(
        base.module, calibration=calib, train_data=train_data())
    old = dict(base.module.named_modules())
    for name, m in res.module.named_modules():
        if not isinstance(m, CodebookLinear):
            continue
        o = old[name]
        assert m.calls == ["begin", "end"] and o.calls == []  # the pipeline trained a copy
        assert set(m.state_dict()) == {"codebook", "indices", "bias"}
        assert all(isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)
                   for t in (m.codebook, m.indices))  # folded back to buffers
        assert torch.equal(m.indices, o.indices)  # every weight stays on its centroid
        assert len(torch.unique(m.weight_float())) <= 8
        changed = not torch.equal(m.codebook, o.codebook)
        assert changed == m.trainable, name  # a module whose hook returns [] stays frozen
        assert torch.equal(m.bias, o.bias)  # its other tensors are not the trainer's to touch
    assert accuracy(res.module, digits.x_test, digits.y_test) >= accuracy(base.module, digits.x_test, digits.y_test)


# -- verifier: task accuracy ------------------------------------------------------------------

def test_verifier_measures_accuracy_ratio_on_labelled_batches(small_mlp, calib):
    labelled = [((x,), y) for x, y in train_data()[:4]]
    v = Verifier(small_mlp, calib, labelled=labelled)
    m = v.compare_to_reference(v.run(small_mlp))
    assert m.accuracy_ratio == 1.0 and 0.5 < m.accuracy <= 1.0
    worse = DigitsMLP(hidden=(32,))
    m = v.compare_to_reference(v.run(worse))
    assert m.accuracy_ratio < 0.5 and m.value_for("min_accuracy_ratio") == m.accuracy_ratio


# -- distributed ----------------------------------------------------------------------------

def test_batches_are_split_like_a_distributed_sampler():
    data = list(range(7))
    state: dict = {}
    shards = [list(epoch_batches(data, 3, 0, Dist(rank=r, world=2), state)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 4  # padded to equal length
    assert set(shards[0] + shards[1]) == set(data)
    single = list(epoch_batches(data, 3, 0, Dist(), state))
    assert shards[0] == single[0::2] and shards[1] == (single + single[:1])[1::2]
    assert single != list(epoch_batches(data, 4, 0, Dist(), state))  # reshuffled per epoch


def test_torchrun_two_processes_train_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "distill_ddp.py"), "--hidden", "32", "--epochs", "2",
           "--sparsity", "0.8", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    from safetensors.torch import load_file

    w0, w1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    h0, h1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    drop_time = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h["epochs"]]  # noqa: E731
    assert h0["world_size"] == 2 and drop_time(h0) == drop_time(h1)  # losses averaged over ranks
    assert [e["steps"] for e in h0["epochs"]] == [11, 11]  # 22 batches shared by 2 ranks
    single = trained_mlp(hidden=(32,))
    assert not torch.equal(w0["layers.0.weight"], single.layers[0].weight)
    weights = [w for k, w in w0.items() if k.endswith("weight")]  # 80% of them, across layers
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=1e-3)


def test_recovery_trains_an_export_graph_and_skips_parameters_it_never_uses(bert_gm, bert_batches):
    pipe = fxpress.Pipeline.parse("prune{sparsity=0.5,include=[*encoder.layer.0.*]},"
                                  "distill{epochs=2,lr=1e-3,output_loss=mse,tol.min_cosine=0.8}",
                                  progress=False)
    res = pipe.run(bert_gm, calibration=bert_batches[:1], train_data=bert_batches)
    prune_rec, distill_rec = res.records
    assert distill_rec.status == "ok"
    assert distill_rec.cumulative.cosine > prune_rec.cumulative.cosine  # recovered towards the original
    assert distill_rec.zeros == prune_rec.zeros  # pruned attention/FFN weights stayed zero
    total = sum(p.numel() for p in bert_gm.parameters())
    pooler = sum(p.numel() for n, p in bert_gm.named_parameters() if "pooler" in n)
    # BERT's pooler is computed but its output is dropped: it gets no gradient, so it is left out
    assert distill_rec.stats["trained_parameters"] == total - pooler


def test_train_config_checks_its_fields():
    from fxpress.errors import InputError
    from fxpress.passes.distill_train import TrainConfig

    assert TrainConfig(epochs=3, lr=0.1).schedule == "cosine"
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"optimizer": "lion"}, {"schedule": "step"}):
        with pytest.raises(InputError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_regression_models_recover_on_float_targets():
    # float labels (sklearn's diabetes) crashed distill's cross-entropy, and one output
    # per row made its softened-logit KL zero: output_loss="auto" matches the teacher's
    # outputs and the labels by MSE instead
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32).unsqueeze(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[:300]), y[:300]).backward()
        opt.step()
    model.eval()
    data = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 300, 50)]
    pruned = fxpress.compress(model, "prune{sparsity=0.9}", calibration=[(x[:64],)],
                              policy="warn").module
    res = fxpress.compress(model, "prune{sparsity=0.9},distill{epochs=4,lr=0.01}",
                           calibration=[(x[:64],)], train_data=data, policy="warn")
    err = lambda m: float(nn.functional.mse_loss(m(x[300:]), y[300:]))  # noqa: E731
    assert err(res.module) < err(pruned)
    assert "label_mse" in json.dumps(res.records[-1].stats)  # the labels were used


class _StateLoop(nn.Module):
    """A recurrence keeping its state in one tensor that each step overwrites in place
    (RWKV's exported graph copies its state into slices so): export captures it."""

    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        state = torch.zeros(x.shape[0], 16)
        for t in range(x.shape[1]):
            state.copy_(torch.tanh(self.inp(x[:, t])) * state + self.inp(x[:, t]))
        return self.head(state)


def test_distill_trains_a_graph_that_writes_in_place_into_what_it_reads():
    # backward needs the state each step multiplied by; the next step's copy_ overwrote it
    # ("modified by an inplace operation": PassError). Training runs on clones of such
    # reads; the graph kept (and saved) is the captured one.
    torch.manual_seed(0)
    model = _StateLoop().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 5, 8, generator=g),) for _ in range(4)]
    res = fxpress.compress(model, "quantize{bits=4},distill{epochs=1,lr=0.001}", calibration=data,
                           train_data=data, progress=False, policy="warn")
    assert [r.changed for r in res.records] == [True, True]
    assert "aten.clone.default" not in {str(n.target) for n in res.module.graph.nodes}
    x = data[0][0]
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(res.module(x).flatten(), model(x).flatten(), 0)
    assert cos > 0.9


class _DictBatchNet(nn.Module):
    """forward takes ONE dict (ids, a bool mask, float features), as a user's collate gives."""

    def __init__(self):
        super().__init__()
        self.emb, self.dense = nn.Embedding(50, 16), nn.Linear(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, batch):
        m = batch["mask"].unsqueeze(-1)
        pooled = (self.emb(batch["ids"]) * m).sum(1) / m.sum(1).clamp(min=1)
        return self.head(torch.relu(pooled + self.dense(batch["num"])))


def test_distill_trains_a_model_whose_one_input_is_a_dict():
    """``train_data=[({"ids": ..., "mask": ...},), ...]`` for ``forward(self, batch)``: the
    dict is the model's input, not its arguments by name (distill refused it: "forward has no
    argument 'ids'")."""
    from fxpress.graph.capture import positional_batch

    def make(seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(4, 6, dtype=torch.bool)
        mask[-1, 4:] = False
        return ({"ids": torch.randint(0, 50, (4, 6), generator=g), "mask": mask,
                 "num": torch.randn(4, 4, generator=g)},)

    torch.manual_seed(0)
    model = _DictBatchNet().eval()
    batch = make(1)
    assert positional_batch(batch, model) is batch
    before = state_snapshot(model)
    res = fxpress.compress(model, "quantize{bits=4},distill{epochs=1,lr=0.0001}", example_inputs=make(1),
                           train_data=[make(10 + i) for i in range(3)], progress=False)
    assert res.records[-1].status == "ok"
    with torch.no_grad():
        assert res.module(*make(2)).shape == (4, 3)
    assert_unchanged(model, before)
