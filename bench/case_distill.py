"""Distillation: a small student from a big teacher, recovery after pruning, exact taps."""
from __future__ import annotations

import statistics

import torch

from bench.common import Table, median_time

TITLE = "Distillation: KD vs labels only, recovery after pruning, taps"


def _kd_table(size: str) -> Table:
    import fxpress
    from examples.digits import DigitsMLP, accuracy, digits_data, train_data, trained_mlp

    data, batches = digits_data(), train_data()
    tiny = size == "tiny"
    teacher = trained_mlp(hidden=(32, 16) if tiny else (256, 128), epochs=5 if tiny else 40)
    seeds = range(1 if tiny else 3 if size == "quick" else 5)
    budgets = (2,) if tiny else (30,) if size == "quick" else (10, 30)
    t = Table(f"digits: 64-32-10 student, {'tiny teacher' if tiny else '64-256-128-10 teacher'} "
              f"(test accuracy {accuracy(teacher, data.x_test, data.y_test):.4f}), "
              f"mean over {len(seeds)} seed(s)",
              ["epochs", "student trained on", "test acc mean", "std", "min", "max",
               "Δ vs labels (points)"])
    # every variant runs the same loop (Adam, lr 1e-2, cosine, same batches, same init):
    # only the loss differs; "labels only" is alpha=0 (pure cross-entropy)
    variants = [("labels only (CE)", dict(alpha=0.0)),
                ("KD T=4, alpha=0.5 + CE", dict(alpha=0.5)),
                ("KD + CE + features (layers.0 -> teacher layers.1, beta=0.1)",
                 dict(alpha=0.5, pairs={"layers.0": "layers.1"}, beta=0.1))]
    for epochs in budgets:
        base = None
        for label, kw in variants:
            accs = []
            for seed in seeds:
                torch.manual_seed(seed)
                student = DigitsMLP(hidden=(32,))
                d = fxpress.Distiller(teacher, student, **kw)
                d.fit(batches, epochs=epochs, lr=1e-2, seed=seed, progress=False)
                accs.append(accuracy(d.student, data.x_test, data.y_test))
            mean = statistics.mean(accs)
            base = mean if base is None else base
            t.add(epochs, label, mean, statistics.pstdev(accs), min(accs), max(accs),
                  f"{(mean - base) * 100:+.2f}")
    t.notes.append("test set: 449 digits, so one image is 0.22 points")
    return t


def _recovery_table(size: str) -> Table:
    import fxpress
    from examples.digits import accuracy, calibration, digits_data, train_data, trained_mlp

    data = digits_data()
    tiny = size == "tiny"
    model = trained_mlp(hidden=(32,) if tiny else (300, 100), epochs=5 if tiny else 40)
    epochs = 2 if tiny else 40
    base = accuracy(model, data.x_test, data.y_test)
    dims = "-".join(str(n) for n in (64, *((32,) if tiny else (300, 100)), 10))
    t = Table(f"digits MLP {dims}: prune, then distill{{epochs={epochs},lr=0.01}} against the "
              "uncompressed model",
              ["compression", "uncompressed acc", "after compression", "after recovery",
               "recovered - uncompressed (points)", "zeros kept", "distill status", "distill s"])
    prunes = ("prune{sparsity=0.95}",) if tiny else (
        "prune{sparsity=0.9}", "prune{sparsity=0.95}", "prune{sparsity=0.95,scope=global}")
    for spec in prunes:
        before = fxpress.compress(model, spec, calibration=calibration(), policy="warn",
                                  progress=False).module
        res = fxpress.compress(model, f"{spec},distill{{epochs={epochs},lr=0.01}}",
                               calibration=calibration(), train_data=train_data(), policy="warn",
                               progress=False)
        rec = res.records[-1]
        after = accuracy(res.module, data.x_test, data.y_test)
        zeros_before = res.records[0].zeros
        t.add(spec, base, accuracy(before, data.x_test, data.y_test), after,
              f"{(after - base) * 100:+.2f}", f"{rec.zeros}/{zeros_before}", rec.status,
              rec.seconds)
    t.notes.append("share{bits=4} is not in this branch; the lead reruns with "
                   "prune,share,distill after merging")
    return t


def _tap_table(size: str) -> Table:
    import fxpress
    from examples.digits import calibration, trained_cnn, trained_mlp

    t = Table("taps: exactness and inference cost (median forward time, same inputs)",
              ["model", "capture", "taps", "max abs error", "forward s without taps",
               "forward s with taps", "with / without"])
    x = calibration()[0]
    cases = [("digits MLP", trained_mlp(hidden=(32,), epochs=5) if size == "tiny" else trained_mlp(), x),
             ("digits CNN", trained_cnn(epochs=2 if size == "tiny" else 30), x)]
    if size != "tiny":
        from examples.minilm import batches, sentence_encoder

        cases.append(("all-MiniLM-L6-v2", sentence_encoder(), batches(32)[0]))
    for name, model, inputs in cases:
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        res = fxpress.compress(model, "distill", example_inputs=inputs, calibration=[inputs],
                               progress=False)
        plain = fxpress.capture(model, inputs)
        rec = res.records[0]
        with torch.no_grad():
            without = median_time(lambda: plain(*inputs), repeat=3 if size == "tiny" else 15)
            with_taps = median_time(lambda: res.module(*inputs), repeat=3 if size == "tiny" else 15)
        t.add(name, res.capture["method"], len(rec.stats["taps"]), rec.cumulative.max_abs,
              without, with_taps, with_taps / without)
    return t


def run(size: str) -> list[Table]:
    return [_kd_table(size), _recovery_table(size), _tap_table(size)]
