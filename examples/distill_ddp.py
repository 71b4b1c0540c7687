"""Prune the digits MLP to 95% and win the accuracy back with distillation, on one process
or many: the script is the same, torchrun makes it data-parallel.

    python examples/distill_ddp.py                              # one process
    torchrun --nproc_per_node=2 examples/distill_ddp.py         # DDP: gloo on CPU, nccl on GPUs

Every rank runs the whole pipeline; the distill step trains with DistributedDataParallel
(each rank takes half of the batches) and every rank ends with the same weights.
``--out DIR`` writes each rank's weights and history there (the tests compare them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fxpress  # noqa: E402
from examples.digits import (accuracy, calibration, digits_data, train_data,  # noqa: E402
                             trained_mlp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 100])
    p.add_argument("--epochs", type=int, default=40, help="distillation epochs")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--out", default=None, help="folder for each rank's weights and history")
    args = p.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    model = trained_mlp(hidden=tuple(args.hidden))
    spec = f"prune{{sparsity={args.sparsity}}},distill{{epochs={args.epochs},lr={args.lr}}}"
    res = fxpress.compress(model, spec, calibration=calibration(), train_data=train_data(),
                           policy="warn")
    d = digits_data()
    rec = res.records[-1]
    print(f"[rank {rank}] {spec}: world size {rec.stats['world_size']}, "
          f"test accuracy {accuracy(model, d.x_test, d.y_test):.4f} uncompressed, "
          f"{accuracy(res.module, d.x_test, d.y_test):.4f} after recovery "
          f"({res.records[-1].status})")
    if args.out:
        from safetensors.torch import save_file

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in res.module.state_dict().items()},
                  str(out / f"rank{rank}.safetensors"))
        (out / f"rank{rank}.json").write_text(json.dumps(rec.stats, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
