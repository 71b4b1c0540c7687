"""Child process of the scale case: one pipeline on GPT-2 small, measured from the OS.

Run by bench/case_scale.py as ``python -m bench.scale_child WEIGHTS PIPELINE OUT [SIZE [MODE [nowarm]]]``
(MODE ``copy``: the default transactional pipeline; ``in_place``: ``in_place=True``). The
weights are loaded from a safetensors file onto a model built on the meta device, so the
measurement starts from a model that occupies exactly its bytes (no init spike). Prints
one JSON line.
"""
from __future__ import annotations

import json
import resource
import sys
import time


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_now() -> int:
    return _status("VmRSS") or 0


def peak() -> int:
    """This process image's peak resident memory: the kernel's VmHWM. Not ru_maxrss where
    VmHWM exists: Linux carries ru_maxrss over fork and exec, so a child of a large parent
    (the bench, after the pass-speed case) would report the parent's size."""
    hwm = _status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(weights: str, pipeline: str, out: str, size: str = "full", mode: str = "copy",
         warm: str = "warm") -> None:
    import torch
    from safetensors.torch import load_file

    import fxpress
    from bench.models import gpt2, gpt2_inputs, weight_bytes

    times = {}
    # warm the runtime first (transformers' GPT-2 code, torch.export's tracing machinery):
    # a fixed cost of the process, not of the model, so the baseline includes it
    if warm != "nowarm":  # bench --tiny (the smoke test): the pipeline's capture is the warm-up
        tiny, tiny_inputs = gpt2("tiny")
        fxpress.capture(tiny, tiny_inputs)
        del tiny
    import gc
    gc.collect()
    baseline = rss_now()
    start_peak = peak()
    with torch.device("meta"):
        model, _ = gpt2(size)
    inputs = gpt2_inputs(size)
    missing, _ = model.load_state_dict(load_file(weights), assign=True, strict=False)
    assert missing == ["lm.lm_head.weight"], missing  # tied to the token embedding
    model.lm.lm_head.weight = model.lm.transformer.wte.weight
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:  # non-persistent buffers are not in the file: rebuild them
            raise RuntimeError(f"{name} was not loaded")
    model.train(False)
    loaded = rss_now()
    start = time.perf_counter()
    res = fxpress.compress(model, pipeline, example_inputs=inputs, policy="warn", progress=False,
                           in_place=mode == "in_place")
    times["pipeline"] = time.perf_counter() - start
    times.update({r.spec: r.seconds for r in res.records})
    times["capture"] = res.capture.get("seconds", 0.0)
    file_bytes = None
    if out != "-" and hasattr(fxpress, "save"):
        start = time.perf_counter()
        fxpress.save(res.module, out)
        times["save"] = time.perf_counter() - start
        import os
        file_bytes = os.path.getsize(out)
    print(json.dumps({"baseline": baseline, "start_peak": start_peak, "loaded": loaded, "peak": peak(),
                      "model_bytes": weight_bytes(model), "times": times,
                      "state_bytes": fxpress.graph.stored_bytes(res.module),
                      "file_bytes": file_bytes,
                      "statuses": [r.status for r in res.records]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
