"""Pass speed against the memory-bandwidth floor: each built-in pass's own run time
(verification excluded) vs one read+write sweep over the same weights, same run."""
from __future__ import annotations

import torch

from bench.common import Table, median_time
from bench.models import gpt2, minilm, weight_bytes

TITLE = "Pass speed vs the memory floor"

#: representative options per built-in pass (passes not registered are left out)
SPECS = {
    "prune": "prune{sparsity=0.5}",
    "quantize": "quantize{bits=8}",
    "share": "share{bits=4}",
    "binarize": "binarize{mode=sign}",
    "distill": "distill",  # tap insertion only (training is measured in case_distill)
}


def _floor(gm: torch.nn.Module, ops) -> float:
    weights = [op.weight() for op in ops]

    def sweep():
        for w in weights:
            w.clone()
    return median_time(sweep, repeat=5)


def run(size: str) -> list[Table]:
    import fxpress
    from fxpress.graph.weights import unique_weights, weighted_ops

    reg = fxpress.registry()
    tables = []
    cases = [("MiniLM (pretrained)", *minilm(size)[:1], minilm(size)[1][0])]
    gm_model, gm_inputs = gpt2("full" if size == "full" else "tiny")
    cases.append(("GPT-2 small (124M)" if size == "full" else "GPT-2 (tiny config)", gm_model,
                  gm_inputs))
    for label, model, inputs in cases:
        gm = fxpress.capture(model, inputs)
        ops = unique_weights(weighted_ops(gm))
        floor = _floor(gm, ops)
        t = Table(f"{label}: {weight_bytes(model) / 2**20:.0f} MB of weights, floor (clone of "
                  f"every weighted-op weight) {floor * 1e3:.1f} ms",
                  ["pass", "pass time s (median)", "x floor"])
        for name, text in SPECS.items():
            if name not in reg:
                continue
            p = fxpress.Pipeline.parse(text).passes[0]
            ctx = fxpress.PassContext(example_inputs=inputs, calibration=[inputs], reference=model)
            repeat, warmup = (3, 1) if size == "full" else (1, 0)
            # each run gets its own structural copy, made outside the timed call
            copies = [fxpress.graph.clone_structure(gm) for _ in range(repeat + warmup)]
            secs = median_time(lambda: p.run(copies.pop(), ctx), repeat=repeat, warmup=warmup)
            t.add(text, secs, secs / floor)
        tables.append(t)
    tables[-1].notes.append("x floor: the pass's time over one read+write of the same weights "
                            "(torch clone), measured in the same run.")
    return tables
