"""The settings and the record of one distillation run: :class:`TrainConfig` (how to train:
everything :meth:`~fxpress.passes.distill_train.Distiller.fit` takes beyond the data) and
:class:`History` (what each epoch measured, the rate it ran at, the learning-rate test)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fxpress.errors import InputError
from fxpress.passes.distill import SCHEDULES
from fxpress.passes.distill_tuning import RangeTest

#: A cycle that ended with its held-out loss still falling by at least this fraction over
#: its last ``patience`` epochs earns a warm restart (:attr:`TrainConfig.restarts`). The
#: 32-wide 4-layer transformer pruned to 95% fell 5.6% and 1.5% in its last 5 of 30
#: epochs on two seeds, its training loss still far above the other models' (-2.67 and
#: -6.24 points).
RESTART_GAIN = 0.01
#: A cycle whose kept epoch is still this many points or more below the original on the
#: held-out batches (accuracy on labels, else top-1 agreement with the original) and whose
#: best held-out loss fell by at least :data:`CYCLE_GAIN` below the cycle before it earns
#: a restart at the same peak rate over :data:`FAR_STRETCH` times the epochs (and patience),
#: whether it ended or stopped early: its distance from the original, not the tail of a
#: cycle, sets the budget. Narrow models pruned to 95% start near chance and need about as
#: many steps as training from scratch (the 64-96-48-10 MLP, seed 22: -7.35 points after
#: 30 epochs, -2.23 after one cosine cycle of 150; a restart over twice the epochs with the
#: same patience stopped early again, its rate still high).
FAR_POINTS = 2.0
#: How many times longer (and more patient) a restart that is still far is.
FAR_STRETCH = 4
#: The least relative fall of the best held-out loss over a cycle for :data:`FAR_POINTS`
#: to earn a restart (a first cycle falls from where compression left it).
CYCLE_GAIN = 0.05


@dataclass(frozen=True)
class TrainConfig:
    """How :meth:`Distiller.fit` trains: one object instead of a long parameter list.

    ``epochs``: the most epochs. ``lr``: the learning rate; ``None`` chooses it with a
    short learning-rate range test (:func:`~fxpress.passes.distill_tuning.lr_range_test`).
    ``optimizer``: "adam" or "sgd" (momentum 0.9). ``schedule``: "cosine" anneals the
    rate to zero over ``epochs`` (per batch; per epoch for an iterable of unknown length),
    "plateau" halves it when the held-out loss stalls, "constant" keeps it.
    ``holdout``: the fraction of the batches held out (a deterministic split from
    ``seed``) and evaluated after every epoch; the weights of the epoch with the lowest
    held-out loss are restored at the end. ``patience``: stop after this many epochs
    without a better held-out loss (0: run every epoch). ``lr_drops``: that many times,
    instead of stopping, restore the best epoch's weights and anneal from the current rate
    to zero (cosine) over ``patience`` more epochs, or half of the epochs left when that is
    more (a plateau at a high rate is not the end: the run ends annealed).
    ``restarts``: with the cosine schedule, at most that many more cycles of ``epochs``
    epochs (warm restarts, Loshchilov & Hutter 2017), each from the best state at half
    the previous cycle's peak rate, while the cycle before ended still improving (its
    best held-out loss in its last ``patience`` epochs, at least :data:`RESTART_GAIN`
    below the best before them); or, stopped early or not, while the kept epoch is still
    :data:`FAR_POINTS` below the original on the held-out batches after a cycle that
    lowered the best held-out loss by :data:`CYCLE_GAIN`: then at the same peak rate over
    :data:`FAR_STRETCH` times ``epochs`` and ``patience``. The budget grows with the
    distance from the original, and early stopping, not an epoch count, ends it.
    ``device``: where to train
    (default: the student's device; under torchrun with one GPU per rank,
    ``cuda:LOCAL_RANK``). ``progress``: True shows a bar, None only on a terminal.
    """

    epochs: int = 5
    lr: float | None = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    holdout: float = 0.0
    patience: int = 0
    lr_drops: int = 0
    restarts: int = 0
    seed: int = 0
    progress: bool | None = True
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InputError:
            return InputError(f"Distiller.fit: {name} {why}, got {getattr(self, name)!r}")

        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise bad("epochs", "must be >= 1")
        if self.lr is not None and not self.lr > 0:
            raise bad("lr", "must be > 0 (or None: chosen by a range test)")
        if self.optimizer not in ("adam", "sgd"):
            raise bad("optimizer", "must be 'adam' or 'sgd'")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {SCHEDULES}")
        if not 0 <= self.holdout < 1:
            raise bad("holdout", "must satisfy 0 <= holdout < 1")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise bad("patience", "must be an int >= 0")
        if isinstance(self.lr_drops, bool) or not isinstance(self.lr_drops, int) or self.lr_drops < 0:
            raise bad("lr_drops", "must be an int >= 0")
        if isinstance(self.restarts, bool) or not isinstance(self.restarts, int) or self.restarts < 0:
            raise bad("restarts", "must be an int >= 0")


@dataclass
class History:
    """What :meth:`Distiller.fit` did: one dict per epoch (mean training losses, the
    learning rate, held-out loss/accuracy/agreement when data was held out, steps,
    seconds), the rate used (and the range test's curve when it chose it), the epoch
    whose weights were kept and whether training stopped early.

    Losses are averaged over every rank, so each rank holds the same history.
    """

    epochs: list[dict] = field(default_factory=list)
    world_size: int = 1
    trained_parameters: int = 0
    kept_zeros: int = 0
    holdout_batches: int = 0
    lr: float = 0.0
    lr_test: RangeTest | None = None
    best_epoch: int = 0       # 0 with a held-out split: no epoch beat the starting weights
    start_val_loss: float | None = None  # the held-out loss before training
    stopped_early: bool = False
    lr_drops: list[int] = field(default_factory=list)  # epochs after which the rate fell
    restarts: list[int] = field(default_factory=list)  # epochs after which a new cycle began
    far_restarts: list[int] = field(default_factory=list)  # those of them still far (FAR_POINTS)
    teacher_val_accuracy: float | None = None  # the teacher's accuracy on the held-out batches

    @property
    def loss(self) -> list[float]:
        return [e["loss"] for e in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, i: int) -> dict:
        return self.epochs[i]

    def as_dict(self) -> dict:
        return {"epochs": self.epochs, "world_size": self.world_size,
                "trained_parameters": self.trained_parameters, "kept_zeros": self.kept_zeros,
                "holdout_batches": self.holdout_batches, "lr": self.lr,
                "lr_test": self.lr_test.as_dict() if self.lr_test else None,
                "best_epoch": self.best_epoch, "start_val_loss": self.start_val_loss,
                "stopped_early": self.stopped_early,
                "lr_drops": self.lr_drops, "restarts": self.restarts,
                "far_restarts": self.far_restarts,
                "teacher_val_accuracy": self.teacher_val_accuracy}
