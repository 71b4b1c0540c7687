"""Small calls of compiled models: fp32 eager, fxpress int8 eager, int8 compiled (the
default, ``dispatch="fastest"``: each size of call runs compiled or eager, whichever its first
calls timed faster), int8 compiled with every call compiled (``dispatch="compiled"``: each
int8 layer's small calls in float as eager runs them, oneDNN's int8 linear on the calling
thread below ``SERIAL_WORK`` multiply-adds), and fp32 compiled both ways, side by side in one
process at batch 1 and batch 32.

Models: the digits MLP 64-300-100-10 and CNN (trained, sklearn digits), a GRU over the
digits images as 8 rows of 8 pixels (GRU 8->64, a linear head; random weights, seed 0)
and the pretrained all-MiniLM-L6-v2 (batch 32: 32 sentences padded to the longest; batch
1: one sentence of 16 tokens). Each variant is called ``2 * (TRIAL_CALLS + 1)`` times at
each shape first (the default dispatch chooses its path there), then medians of
interleaved rounds, CPU time of the process (``time.process_time``: every thread, so a
forked OpenMP team's spinning counts) with the wall time beside it; one thread count per
process (``BENCH_THREADS``, default 2: Dynamo guards the thread count, so each compiled
model is compiled at the count it is timed at); prints the load average, the graphs each
compiled model built and the path the default dispatch chose per shape.

``BENCH_THREADS=1 python -m bench.compile_threads [rounds] [mlp,cnn,gru,minilm]``"""
from __future__ import annotations

import os
import sys

import torch

THREADS = int(os.environ.get("BENCH_THREADS", "2"))


class DigitsGRU(torch.nn.Module):
    """A GRU over a digits image's 8 rows of 8 pixels, a linear head on the last state."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gru = torch.nn.GRU(8, 64, batch_first=True)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        out, _ = self.gru(x.reshape(-1, 8, 8))
        return self.head(out[:, -1])


def _model(name: str):
    """(fp32 model, pipeline, inputs at batch 32, inputs at batch 1, calibration)."""
    if name == "minilm":
        from examples.minilm import SENTENCES, batches, sentence_encoder, tokenize, tokenizer

        enc = tokenizer()(SENTENCES[32:33], padding="max_length", truncation=True, max_length=16,
                          return_tensors="pt")
        b32 = tokenize(SENTENCES[:32])
        return (sentence_encoder(), "quantize{bits=8}", b32,
                (enc["input_ids"], enc["attention_mask"]), batches(32, SENTENCES[:32]))
    from examples import digits

    x = digits.digits_data().x_test
    model = {"mlp": digits.trained_mlp, "cnn": digits.trained_cnn, "gru": DigitsGRU}[name]()
    return (model.eval(), "quantize{bits=8,activations=dynamic}", (x[:32],), (x[:1],),
            [(x[i:i + 128],) for i in range(0, 256, 128)])


def _table(name: str, rounds: int) -> None:
    import fxpress
    from bench.common import interleaved_medians
    from fxpress.compiled import TRIAL_CALLS, size_key

    model, pipeline, b32, b1, calib = _model(name)
    gm = fxpress.capture(model, b32)
    q = fxpress.compress(gm, pipeline, calibration=calib, policy="warn", progress=False).module
    v = {"fp32 eager": model, "int8 eager": q, "int8 compiled": fxpress.compile(q, b32),
         "int8 compiled, always": fxpress.compile(q, b32, dispatch="compiled"),
         "fp32 compiled": fxpress.compile(model, b32),
         "fp32 compiled, always": fxpress.compile(model, b32, dispatch="compiled")}
    with torch.no_grad():  # the default dispatch's trial calls, at both shapes
        for x in (b1, b32):
            for m in v.values():
                for _ in range(2 * (TRIAL_CALLS + 1)):
                    m(*x)
    for label, x in (("b1", b1), ("b32", b32)):
        cpu: dict = {}
        load = os.getloadavg()[0]
        wall = interleaved_medians({k: (lambda m=m, x=x: m(*x)) for k, m in v.items()}, rounds, cpu=cpu)
        print(f"{name} {label}, {THREADS} thread(s), load {load:.1f}: " + ", ".join(
            f"{k} {cpu[k] * 1e3:.3f} ({wall[k] * 1e3:.3f})" for k in v) + "  [cpu ms (wall ms)]",
            flush=True)
    with torch.no_grad():
        for label, x in (("b1", b1), ("b32", b32)):
            ref = q(*x)
            for k in ("int8 compiled", "int8 compiled, always"):
                got = v[k](*x)
                cos = torch.nn.functional.cosine_similarity(got.flatten(1).double(),
                                                            ref.flatten(1).double()).min()
                print(f"  {k} {label}: max |compiled - eager| {float((got - ref).abs().max()):.2e}, "
                      f"min cosine {float(cos):.6f}")
    compiled = {k: m for k, m in v.items() if "compiled" in k}
    print("  graphs: " + ", ".join(f"{k} {m.compiles}" for k, m in compiled.items()), flush=True)
    for k in ("int8 compiled", "fp32 compiled"):
        paths = {label: v[k].choices.get(size_key(x, {})) for label, x in (("b1", b1), ("b32", b32))}
        print(f"  {k} (dispatch=fastest) runs: " + ", ".join(f"{label} {p}" for label, p in paths.items()),
              flush=True)


def main(rounds: int = 15, models: str = "mlp,cnn,gru,minilm") -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for name in models.split(","):
            _table(name, rounds)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main(*(int(a) if a.isdigit() else a for a in sys.argv[1:]))
