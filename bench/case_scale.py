"""Scale: the whole pipeline on a 124M-parameter GPT-2, peak memory from the OS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, Table, mb

TITLE = "Scale: GPT-2 small (124M parameters), prune -> quantize -> save"

PIPELINE = "prune{sparsity=0.5},quantize{bits=8}"
#: child-process runs, one column each
MODES = {"copy": "transactional (default)", "in_place": "in_place=True"}


def run(size: str) -> list[Table]:
    import torch
    from safetensors.torch import save_file

    import fxpress
    from bench.models import gpt2

    model_size = "full" if size == "full" else "tiny"
    reg = fxpress.registry()
    pipeline = ",".join(p for p in PIPELINE.split(",") if p.split("{")[0] in reg)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "gpt2.safetensors"
        model, _ = gpt2(model_size)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm.lm_head.weight"}
        save_file(sd, str(weights))
        fp32_file = weights.stat().st_size
        del model, sd
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        runs = {}
        modes = MODES if size == "full" else {"copy": MODES["copy"]}  # quick: one child
        for mode in modes:
            out = subprocess.run([sys.executable, "-m", "bench.scale_child", str(weights), pipeline,
                                  str(Path(tmp) / "gpt2.fxp"), model_size, mode]
                                 + (["nowarm"] if size == "tiny" else []),
                                 capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
            if out.returncode != 0:
                raise RuntimeError(f"scale child ({mode}) failed:\n{out.stderr[-3000:]}")
            runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    t = Table(f"{'GPT-2 small' if size == 'full' else 'GPT-2 tiny config'}: {pipeline} (+ save)",
              ["what"] + [MODES[m] for m in runs])

    def row(label, f):
        t.add(label, *[f(r) for r in runs.values()])

    row("model fp32 bytes", lambda r: mb(r["model_bytes"]))
    row("process RSS after imports and a warm-up capture (baseline)", lambda r: mb(r["baseline"]))
    row("peak RSS", lambda r: mb(r["peak"]))
    row("peak − baseline", lambda r: mb(r["peak"] - r["baseline"]))
    row("(peak − baseline) / model bytes", lambda r: round((r["peak"] - r["baseline"]) / r["model_bytes"], 2))
    row("peak / model bytes (whole process)", lambda r: round(r["peak"] / r["model_bytes"], 2))
    for k in runs["copy"]["times"]:
        row(f"time: {k} (s)", lambda r, k=k: round(r["times"].get(k, float("nan")), 2))
    row("compressed state_dict", lambda r: mb(r["state_bytes"]))
    if runs["copy"]["file_bytes"]:
        row("artifact file", lambda r: mb(r["file_bytes"]))
        row("fp32 safetensors file", lambda r: mb(fp32_file))
        row("file ratio (fp32 / artifact)", lambda r: round(fp32_file / r["file_bytes"], 2))
    row("statuses", lambda r: " ".join(r["statuses"]))
    t.notes.append("Measured in child processes (the kernel's VmHWM), one per column; the model is loaded "
                   "from safetensors onto meta-device modules, so the baseline holds no init spike. "
                   "The caller's fp32 model stays alive throughout (the pipeline never modifies it), "
                   "so 2x is that model plus one rewritten copy. in_place=True rewrites one graph "
                   "instead of a copy per pass: each weight quantize replaces is freed as it goes, "
                   "at the price of last_good and policy rollback.")
    return [t]
