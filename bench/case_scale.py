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
        out = subprocess.run([sys.executable, "-m", "bench.scale_child", str(weights), pipeline,
                              str(Path(tmp) / "gpt2.fxp"), model_size],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"scale child failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
    t = Table(f"{'GPT-2 small' if size == 'full' else 'GPT-2 tiny config'}: {pipeline} (+ save)",
              ["what", "value"])
    work = r["peak"] - r["baseline"]
    t.add("model fp32 bytes", mb(r["model_bytes"]))
    t.add("process RSS after imports and a warm-up capture (baseline)", mb(r["baseline"]))
    t.add("peak RSS", mb(r["peak"]))
    t.add("peak − baseline", mb(work))
    t.add("(peak − baseline) / model bytes", round(work / r["model_bytes"], 2))
    t.add("peak / model bytes (whole process)", round(r["peak"] / r["model_bytes"], 2))
    for k, v in r["times"].items():
        t.add(f"time: {k} (s)", round(v, 2))
    t.add("compressed state_dict", mb(r["state_bytes"]))
    if r["file_bytes"]:
        t.add("artifact file", mb(r["file_bytes"]))
        t.add("fp32 safetensors file", mb(fp32_file))
        t.add("file ratio (fp32 / artifact)", round(fp32_file / r["file_bytes"], 2))
    t.add("statuses", " ".join(r["statuses"]))
    t.notes.append("Measured in a child process (ru_maxrss); the model is loaded from "
                   "safetensors onto meta-device modules, so the baseline holds no init spike.")
    return [t]
