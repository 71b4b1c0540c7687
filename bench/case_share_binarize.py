"""share (k-means) and binarize (sign / ternary / pow2): bits actually stored, bytes vs fp32,
accuracy or embedding cosine, k-means time and the decode trade-off (per_call vs once)."""
from __future__ import annotations

import time

import torch

from bench.common import Table, kb, mb, median_time

TITLE = "Weight sharing and binarization: stored bits, bytes, accuracy"


def _stored_bits_per_weight(gm) -> tuple[float, int]:
    """Bits per weight over the compressed layers (state_dict, bias excluded) and their count."""
    from fxpress.graph.runtime import compressed_modules

    mods = [m for _, m in compressed_modules(gm)]
    n = sum(m.weight_float().numel() for m in mods)
    return (sum(m.weight_bits() for m in mods) / n if n else 32.0), len(mods)


def _paired(fn, base, rounds: int) -> tuple[float, float]:
    """Median time of ``fn`` and median ratio ``fn / base``, timed back to back in each
    round, so both see the same load on a shared machine."""
    import statistics

    fn(), base()  # warm up
    times, ratios = [], []
    for _ in range(rounds):
        a = median_time(fn, repeat=1, warmup=0)
        b = median_time(base, repeat=1, warmup=0)
        times.append(a)
        ratios.append(a / b)
    return statistics.median(times), statistics.median(ratios)


def _digits_table(name: str, model, size: str) -> Table:
    import fxpress
    from examples.digits import accuracy, calibration, digits_data
    from fxpress.graph.memory import stored_bytes

    data = digits_data()
    calib = calibration()
    base_acc = accuracy(model, data.x_test, data.y_test)
    fp32 = stored_bytes(fxpress.capture(model, calib[0]))
    t = Table(f"digits {name}: fp32 state_dict {kb(fp32)}, test accuracy {base_acc:.4f}", [
        "pipeline", "layers compressed", "bits/weight stored", "state_dict bytes", "x smaller",
        "accuracy", "Δ accuracy", "verifier (default tolerance)"])
    pipelines = ["share{bits=4}", "binarize{mode=sign,keep_first_last=false}",
                 "prune{sparsity=0.9},share{bits=4}"]
    if size == "quick":
        pipelines = ["share{bits=3}", "share{bits=4}", "binarize{mode=ternary}",
                     "prune{sparsity=0.9,scope=global},share{bits=4}"]
    elif size == "full":
        pipelines = ([f"share{{bits={b}}}" for b in (2, 3, 4, 5, 6)]
                     + ["share{bits=4,scope=global}"]
                     + [f"binarize{{mode={m}}}" for m in ("sign", "ternary", "pow2")]
                     + [f"binarize{{mode={m},keep_first_last=false}}" for m in ("sign", "ternary", "pow2")]
                     + ["prune{sparsity=0.9},share{bits=4}",
                        "prune{sparsity=0.9,scope=global},share{bits=4}",
                        "prune{sparsity=0.5,scope=global},share{bits=4}"])
    for text in pipelines:
        res = fxpress.compress(model, text, calibration=calib, policy="warn", progress=False)
        bpw, count = _stored_bits_per_weight(res.module)
        after = stored_bytes(res.module)
        acc = accuracy(res.module, data.x_test, data.y_test)
        verdict = ", ".join(f"{r.name}: {r.status}" for r in res.records)
        t.add(text, count, round(bpw, 3), after, round(fp32 / after, 2), round(acc, 4),
              round(acc - base_acc, 4), verdict)
    t.notes.append("bits/weight stored: state_dict bits of the compressed layers (codebooks, "
                   "α, masks included; bias excluded) per weight. x smaller: whole model "
                   "state_dict vs fp32, float layers and biases included.")
    t.notes.append("binarize keeps the first and last weighted layers in float by default; "
                   "keep_first_last=false binarizes them too. No fine-tuning here (the distill "
                   "pass recovers accuracy); 'warn' = missed its default tolerance.")
    return t


def _minilm_table(size: str) -> Table:
    import fxpress
    from examples.minilm import batches, sentence_encoder
    from fxpress.graph.memory import stored_bytes
    from fxpress.graph.weights import weighted_ops
    from fxpress.passes.share import kmeans_1d

    if size == "tiny":  # the code paths only: a random 2-layer BERT, 4 sentences
        from bench.models import minilm

        model, data = minilm(size)
        data = [tuple(t[:4] for t in data[0])]
    else:
        model, data = sentence_encoder(), batches(32)
    gm = fxpress.capture(model, data[0])
    with torch.no_grad():
        ref = torch.cat([model(*b) for b in data])
    fp32 = stored_bytes(gm)
    linears = [op.weight().detach() for op in weighted_ops(gm, ["linear"])]
    if size == "tiny":
        linears = linears[:1]
    repeat = 3 if size == "full" else 1
    name = "all-MiniLM-L6-v2" if size != "tiny" else "random BERT 32x2 (--tiny)"
    t = Table(f"{name} ({len(data)} batches, {sum(len(b[0]) for b in data)} sentences): "
              f"fp32 state_dict {mb(fp32)}", [
                  "pipeline", "bits/weight stored", "state_dict bytes", "x smaller",
                  "cosine mean", "cosine min", "k-means s (pass)", "forward s (median)",
                  "forward / fp32 (median of paired rounds)"])
    x = data[0]
    rounds = {"full": 7, "quick": 3}.get(size, 1)
    with torch.no_grad():
        fp32_s, _ = _paired(lambda: gm(*x), lambda: gm(*x), rounds)
    t.add("fp32", 32.0, fp32, 1.0, 1.0, 1.0, "-", round(fp32_s, 4), 1.0)
    include = "" if size != "tiny" else ",include=[*layer.0.attention.self.query*]"
    texts = ["share{bits=4,decode=per_call%s}", "share{bits=4%s}", "share{bits=6,decode=per_call%s}",
             "share{bits=4,decode=once%s}", "share{bits=4,ops=[linear],decode=per_call%s}"]
    for text in texts if size == "full" else texts[1:2]:
        text = text % include
        res = fxpress.compress(gm, text, calibration=data, policy="warn", progress=False)
        with torch.no_grad():
            out = torch.cat([res.module(*b) for b in data])
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
        bpw, _ = _stored_bits_per_weight(res.module)
        after = stored_bytes(res.module)
        with torch.no_grad():
            fwd, ratio = _paired(lambda: res.module(*x), lambda: gm(*x), rounds)
        t.add(text, round(bpw, 3), after, round(fp32 / after, 2), round(float(cos.mean()), 4),
              round(float(cos.min()), 4), round(res.records[0].stats["kmeans_seconds"], 2),
              round(fwd, 4), round(ratio, 2))

    def fit_all(bits):
        return [kmeans_1d(w, 1 << bits) for w in linears]

    for bits in (4, 6) if size == "full" else (4,):
        start = time.perf_counter()
        fits = fit_all(bits)
        once = time.perf_counter() - start
        secs = median_time(lambda: fit_all(bits), repeat=repeat, warmup=0) if repeat > 1 else once
        t.notes.append(f"k-means alone on all {len(linears)} linear weights "
                       f"({sum(w.numel() for w in linears) / 1e6:.1f} M values) at {bits} bits: "
                       f"{secs:.2f} s median of {repeat}, {torch.get_num_threads()} threads; "
                       f"{sum(f.converged for f in fits)}/{len(fits)} converged, at most "
                       f"{max(f.iterations for f in fits)} Lloyd iterations.")
    t.notes.append("cosine: per-sentence cosine of the compressed model's embedding with the fp32 "
                   "model's. k-means s: the pass's fit + encode time (word embeddings included "
                   "unless ops=[linear]). forward / fp32: decode='per_call' unpacks every weight "
                   "on each call; decode='once' keeps the decoded weight; the default "
                   "decode='auto' runs wide linear layers in int8 (none of it in state_dict). "
                   "Every strategy at batch 1 and 32: python -m bench quantize.")
    return t


def run(size: str) -> list[Table]:
    from examples.digits import trained_cnn, trained_mlp

    if size == "tiny":
        mlp, cnn = trained_mlp(hidden=(16,), epochs=5), trained_cnn(epochs=2)
    else:
        mlp, cnn = trained_mlp(), (trained_cnn() if size == "full" else None)
    tables = [_digits_table("MLP 64-300-100-10", mlp, size)]
    if cnn is not None:  # the quick subset keeps one digits model
        tables.append(_digits_table("CNN", cnn, size))
    return tables + [_minilm_table(size)]
