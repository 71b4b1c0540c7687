"""Does a one-shot prune's top-1 agreement on some inputs predict it on the test split?

For each model and seed (bench/recovery_models.py) and each sparsity, a one-shot
``prune{sparsity=S}`` (no recovery) is compared with the original on the test split, on
the calibration batches (training examples: what prune's automatic choice checks), on
blends of two calibration examples (``λ·x_i + (1−λ)·x_j``, λ uniform in [0.5, 1] or
[0.75, 1]) and on calibration examples plus Gaussian noise (0.25 or 0.5 of each feature's
deviation). Printed: the test accuracy change and the percentage of predictions that flip
on each set of inputs (README, Distillation, round 21)::

    python -m bench.recovery_probes cancer-mlp-32-32-32-32:41,mlp-256-128:0 0.6,0.7,0.8
"""
from __future__ import annotations

import sys
import warnings

import torch

import bench.common  # noqa: F401  (sets sys.path)


def _flipped(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100 * (a.argmax(1) != b.argmax(1)).float().mean().item()


def probes(xc: torch.Tensor) -> dict[str, torch.Tensor]:
    """The calibration inputs, their blends and their noisy copies (seeded)."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(xc), generator=g)
    lam = torch.rand(len(xc), *([1] * (xc.dim() - 1)), generator=g)
    out = {"calib": xc, "blend.5": (0.5 + 0.5 * lam) * xc + (0.5 - 0.5 * lam) * xc[perm],
           "blend.75": (0.75 + 0.25 * lam) * xc + (0.25 - 0.25 * lam) * xc[perm]}
    sd = xc.std(0, keepdim=True)
    for scale in (0.25, 0.5):
        out[f"noise{scale}"] = xc + scale * sd * torch.randn(xc.shape, generator=g)
    return out


def main() -> None:
    import fxpress
    from bench.recovery_models import data_for, trained

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    pairs = [p.split(":") for p in sys.argv[1].split(",")]
    sparsities = [float(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else \
        [0.5, 0.6, 0.7, 0.8, 0.9]
    for kind, seed in pairs:
        d, _, calib = data_for(kind)
        xc = torch.cat([c[0] for c in calib])
        model = trained(kind, int(seed))
        inputs = probes(xc)
        with torch.no_grad():
            ref = {k: model(v) for k, v in inputs.items()}
            ref_test = model(d.x_test)
        base = (ref_test.argmax(1) == d.y_test).float().mean().item()
        print(f"{kind} seed {seed}: accuracy {base:.4f} on {len(d.y_test)} test examples; "
              f"{len(xc)} calibration examples", flush=True)
        for s in sparsities:
            res = fxpress.compress(model, f"prune{{sparsity={s}}}", calibration=calib,
                                   policy="warn", progress=False)
            with torch.no_grad():
                test = res.module(d.x_test)
                flips = {k: _flipped(res.module(v), ref[k]) for k, v in inputs.items()}
            acc = (test.argmax(1) == d.y_test).float().mean().item()
            print(f"  sparsity {s}: Δ test {100 * (acc - base):+6.2f} points, flipped (%): "
                  f"test {_flipped(test, ref_test):5.2f} | "
                  + " ".join(f"{k} {v:5.2f}" for k, v in flips.items()), flush=True)


if __name__ == "__main__":
    main()
