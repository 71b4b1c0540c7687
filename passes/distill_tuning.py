"""What distill chooses by itself: the learning rate, when to stop, which state to keep.

* :func:`lr_range_test` (Smith 2017, "Cyclical Learning Rates"): a few dozen optimizer
  steps with the learning rate growing geometrically from ``lo`` to ``hi``; the loss
  (smoothed) falls, bottoms out and blows up. A tenth of the largest rate before it
  climbs clearly above its minimum trains steadily (fastai's ``lr_min`` is a tenth of the
  rate at the minimum; taking the edge of the valley instead keeps the choice sane when
  the curve is flat, as it is for a model that is already nearly right). The caller
  restores the weights afterwards (:class:`Snapshot`), so the test costs time, not
  accuracy.
* :class:`Snapshot`: a copy of every parameter and buffer of a module, restored in place
  (optimizers keep their references).
* :class:`BestState`: the snapshot of the epoch with the lowest held-out loss, and how
  many epochs ago that was (early stopping's patience counter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn


class Snapshot:
    """Every parameter and buffer of ``module`` as it is now; :meth:`restore` puts them back.

    Tensors are restored in place, so an optimizer built on the parameters stays valid;
    a tensor the module has replaced since (same name, same shape) is written as well.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        with torch.no_grad():
            self.saved = {n: t.detach().clone() for n, t in _named_tensors(module)}

    def restore(self) -> None:
        with torch.no_grad():
            for n, t in _named_tensors(self.module):
                s = self.saved.get(n)
                if s is not None and s.shape == t.shape:
                    t.copy_(s)


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    for n, b in module.named_buffers():
        if b is not None:
            yield n, b


@dataclass
class BestState:
    """The best epoch so far on the held-out loss, with its weights (early stopping)."""

    module: nn.Module
    min_delta: float = 1e-4     # relative: a loss must beat the best by this much to count
    epoch: int = 0              # 1-based; 0: the starting weights (or no evaluation yet)
    loss: float = math.inf
    snapshot: Snapshot | None = None

    def update(self, epoch: int, loss: float) -> bool:
        """Record epoch ``epoch``'s held-out loss; True (and a snapshot) if it is the best."""
        if math.isfinite(loss) and loss < self.loss * (1 - self.min_delta):
            self.epoch, self.loss = epoch, loss
            self.snapshot = Snapshot(self.module)
            return True
        return False

    def since(self, epoch: int) -> int:
        """Epochs since the best one."""
        return epoch - self.epoch

    def restore(self) -> None:
        if self.snapshot is not None:
            self.snapshot.restore()


@dataclass
class RangeTest:
    """The learning-rate range test's curve and the rate it chose."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)   # smoothed
    chosen: float = 0.0
    flat: bool = False  # no valley: the edge of the flat stretch's noise was used

    def as_dict(self) -> dict:
        return {"lrs": self.lrs, "losses": self.losses, "chosen": self.chosen, "flat": self.flat}


#: The largest rate the range test may choose. Without it, a pruned and shared transformer
#: (loss still falling at lr = 1) trained at 0.1 and collapsed to chance; at most 0.03 it
#: recovered (bench/case_recovery.py), and the MLPs and CNNs chose at most 0.04 anyway.
MAX_LR = 0.03


#: With at most this many training batches, the range test averages its losses over a
#: whole pass (``window``): on a few batches of different difficulty, batch-to-batch noise
#: is larger than the curve's fall, and an easy first batch looked like a blow-up four
#: steps later (breast_cancer, 6 batches: the test stopped at 2e-6 and chose its floor).
FEW_BATCHES = 10


def lr_range_test(step: Callable[[float], float], steps: int = 60, lo: float = 1e-6,
                  hi: float = 1.0, beta: float = 0.8, valley: float = 1.25,
                  max_lr: float = MAX_LR, window: int = 1) -> RangeTest:
    """Run ``step(lr) -> loss`` with ``lr`` growing from ``lo`` to ``hi``; pick a rate.

    ``step`` takes one optimizer step at the given rate on the next batch and returns the
    batch's loss. The loss is smoothed with an exponential average (``beta``), or, with
    ``window`` > 1 (a pass over few batches), by the mean of the last ``window`` losses,
    counted only from the first full window on. The test stops early when the smoothed
    loss exceeds four times its minimum (or is not finite). The choice is a tenth of the largest rate, from the
    minimum on, whose smoothed loss stays within ``valley`` times the minimum, clipped to
    ``[10·lo, min(hi/10, max_lr)]``. When that would be the floor (the minimum is noise
    among the first steps: no valley), it is a tenth of the largest rate before the loss
    exceeds ``valley`` times the highest loss of the test's first sixth.
    """
    out = RangeTest()
    window = max(1, min(int(window), steps // 4))
    gamma = (hi / lo) ** (1.0 / max(steps - 1, 1))
    avg, best, best_i = 0.0, math.inf, 0
    raw: list[float] = []
    for i in range(steps):
        lr = lo * gamma ** i
        loss = step(lr)
        if not math.isfinite(loss):
            break
        if window > 1:
            raw.append(loss)
            if len(raw) < window:
                continue  # the first full window is the curve's first point
            smooth = sum(raw[-window:]) / window
        else:
            avg = beta * avg + (1 - beta) * loss
            smooth = avg / (1 - beta ** (i + 1))
        out.lrs.append(lr)
        out.losses.append(smooth)
        if smooth < best:
            best, best_i = smooth, len(out.losses) - 1
        if len(out.losses) > 5 and smooth > 4 * best:
            break
    edge = best_i
    while edge + 1 < len(out.losses) and out.losses[edge + 1] <= best * valley:
        edge += 1
    if out.lrs and out.lrs[edge] / 10 <= lo * 10:
        # no valley: the minimum is among the first steps, whose rates are too small to
        # move anything, so it is batch-to-batch noise (a model that is nearly right, few
        # batches). The flat stretch's noise ceiling stands in for the minimum: the edge is
        # where the loss climbs clearly above everything the first steps saw.
        ceiling = max(out.losses[:max(best_i + 1, len(out.losses) // 6)]) * valley
        edge = 0
        while edge + 1 < len(out.losses) and out.losses[edge + 1] <= ceiling:
            edge += 1
        out.flat = True
    pick = out.lrs[edge] / 10 if out.lrs else lo * 10
    out.chosen = float(min(max(pick, lo * 10), hi / 10, max_lr))
    return out


def make_optimizer(params: list[nn.Parameter], lr: float, cfg: Any) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)


def progress_bar(total: int | None, enabled: bool | None):
    if enabled is False:
        return None
    from tqdm.auto import tqdm

    # disable=None: shown only on a terminal, like the pipeline's own bar
    return tqdm(total=total, desc="distill", unit="step", leave=False, mininterval=0.5,
                disable=None if enabled is None else False)


__all__ = ["Snapshot", "BestState", "RangeTest", "lr_range_test", "make_optimizer", "progress_bar"]
