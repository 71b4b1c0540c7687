"""Verifier cost per pass: its time against the pass's time and against one forward of
the calibration batches (reference outputs are computed once, never per pass)."""
from __future__ import annotations

from bench.common import Table, median_time
from bench.models import minilm

TITLE = "Verifier cost"

PIPELINES = ["prune{sparsity=0.3}", "share{bits=6,include=[*intermediate*]}", "quantize{bits=8}",
             "distill"]


def run(size: str) -> list[Table]:
    import fxpress

    reg = fxpress.registry()
    model, batches = minilm(size)
    text = ",".join(p for p in PIPELINES if p.split("{")[0] in reg)
    res = fxpress.compress(model, text, calibration=batches, policy="warn", progress=False)
    forward = median_time(lambda: [res.module(*b) for b in batches], repeat=3)
    name = "MiniLM" if size != "tiny" else "random BERT 32x2 (--tiny)"
    t = Table(f"{name}, {len(batches)} calibration batches of {len(batches[0][0])} sentences; one forward over "
              f"them: {forward:.3f} s (median)",
              ["pass", "pass s", "verify s", "verify / pass", "verify / forward"])
    for r in res.records:
        t.add(r.spec, r.seconds, r.verify_seconds, r.verify_seconds / max(r.seconds, 1e-9),
              r.verify_seconds / forward)
    t.notes.append("verify = lint + recompile + one run of the new graph on the calibration "
                   "batches (recording shapes) + metrics against the kept reference outputs.")
    return [t]
