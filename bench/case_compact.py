"""Where a Deep-Compressed artifact's bytes go, per model and seed (issue 18's size side).

Runs the built-in ``deep-compression`` recipe (or ``--pipeline``) on bench/recovery_models.py's
models, saves each result with entropy coding and prints, side by side: the file against the
fp32 safetensors file of the state_dict (x smaller), the accuracy change on the digits test
split, and the file's bytes per part (graph/artifact/breakdown.py): prefix, header, the
safetensors index, and the stored streams by kind (weight matrices: codebooks, codes, masks;
biases; norms; embeddings). ``--budget`` is the 40x goal in bytes.

    python -m bench.case_compact --models transformer-64x2 --seeds 0,1,2
    python -m bench.case_compact --models transformer-64x2 --seeds 1 \\
        --pipeline "fold_bn,prune{sparsity=0.95,scope=global,steps=3},distill,share{bits=4,bias_bits=8},distill"
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.common import Table

TITLE = "Deep-Compressed artifacts: bytes per part"
GROUPS = ("matrices (codebooks, codes, masks)", "matrices (dense or quantized)", "biases", "norms",
          "embeddings", "other tensors")


def one(kind: str, seed: int, pipeline: str, tiny: bool = False) -> dict:
    import fxpress
    from bench.case_deep_compression import fp32_safetensors_bytes
    from bench.recovery_models import change, data_for, score, trained
    from fxpress.errors import PlanMissedWarning
    from fxpress.graph.artifact.breakdown import breakdown
    from fxpress.passes.gradual import held_out_gap

    digits, train, calib = data_for(kind)
    if tiny:
        from examples.digits import trained_mlp

        model, train, calib = trained_mlp(hidden=(32,), seed=seed, epochs=5), train[:6], calib[:1]
    else:
        model = trained(kind, seed)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PlanMissedWarning)
        res = fxpress.compress(model, pipeline, calibration=calib, train_data=train,
                               policy="warn", progress=False)
    seconds = time.perf_counter() - start
    warned = any(isinstance(w.message, PlanMissedWarning) for w in caught)
    recoveries = [r for r in res.records if held_out_gap(r) is not None]
    gap = held_out_gap(recoveries[-1]) if recoveries else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.fxp"
        fxpress.save(res.module, path, entropy=True)
        b = breakdown(path.read_bytes())
        b["header_v2"] = header_as_version_2(path.read_bytes())
    fp32 = fp32_safetensors_bytes(model)
    base, acc = score(kind, model, digits), score(kind, res.module, digits)
    chose = next((",".join(f"{k}={v}" for k, v in r.stats["chosen"].items())
                  for r in res.records if r.name == "budget" and "chosen" in r.stats), "")
    return {"b": b, "fp32": fp32, "delta": change(kind, base, acc), "seconds": seconds, "chose": chose,
            "held_out": "-" if gap is None else f"{100 * (gap[1] - gap[0]):+.2f}" + (" warned" if warned else "")}


def header_as_version_2(data: bytes) -> int:
    """Bytes of ``data``'s header stored as format version 2 did (node names and references
    by name, the second dictionary): the previous writer's header, side by side."""
    import json
    import zlib

    from fxpress.graph.artifact import _split_prefix, minimize
    from fxpress.graph.artifact.header_dict import HEADER_ZDICT_V2

    header = _split_prefix(data, "artifact")[0]
    z = zlib.compressobj(9, zdict=HEADER_ZDICT_V2)
    text = json.dumps(minimize(dict(header, version=2)), separators=(",", ":"), allow_nan=False)
    return len(z.compress(text.encode()) + z.flush())


def table(models, seeds, pipeline: str, tiny: bool = False) -> Table:
    t = Table(f"{TITLE}: `{pipeline}`", ["model", "seed", "file", "x smaller", "Δ points",
                                         "held-out Δ", "40x budget", "prefix", "header", "header as v2", "index",
                                         *GROUPS, "budget chose", "seconds"])
    for kind in models:
        for seed in seeds:
            r = one(kind, seed, pipeline, tiny)
            b = r["b"]
            t.add(kind, seed, b["file"], round(r["fp32"] / b["file"], 1), f"{r['delta']:+.2f}",
                  r["held_out"], r["fp32"] // 40, b["prefix"], b["header"], b["header_v2"], b["safetensors_index"],
                  *(b["groups"].get(g, 0) for g in GROUPS), r["chose"] or "-",
                  round(r["seconds"]))
    t.notes.append("bytes; file = prefix + header + index + every group (header as v2: the "
                   "same header as format version 2 stored it, not part of the file); Δ on the digits test "
                   "split (449 images, one = 0.22 points); held-out Δ: the last recovery step's kept epoch against the original on its own held-out training batches, in points (warned: over 1 point, a PlanMissedWarning, passes/gradual.missed_promise); budget chose: the options the recipe's "
                   "budget pass set (passes/budget.py), - when none")
    return t


def run(size: str) -> list[Table]:
    if size == "tiny":
        return [table(("mlp-32",), (0,), "prune{sparsity=0.9},share{bits=4,bias_bits=8},small",
                      tiny=True)]
    return [table(("transformer-64x2",), (0,), "deep-compression")]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.case_compact")
    p.add_argument("--models", default="transformer-64x2")
    p.add_argument("--seeds", default="0")
    p.add_argument("--pipeline", default="deep-compression")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(table(tuple(args.models.split(",")), tuple(int(s) for s in args.seeds.split(",")),
                args.pipeline).markdown())


if __name__ == "__main__":
    main()
