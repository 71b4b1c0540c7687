"""distill's trainer: :class:`Distiller` (KD + CE + tap MSE) and its :class:`TrainConfig`.

``Distiller(teacher, student, pairs=..., temperature=4.0, alpha=0.5, beta=1.0).fit(train_data,
epochs=5, lr=1e-3)``: KL between softened logits (×T²), cross-entropy on labels when batches
carry them, and MSE between paired taps through a learned linear projection when widths
differ (FitNets). Teacher and student may be different architectures, or the student the
compressed copy of the teacher. Everything about *how* to train (epochs, learning rate,
optimizer, schedule, hold-out and early stopping, seed, device, progress) is one
:class:`TrainConfig`; what it may choose itself is :mod:`~fxpress.passes.distill_tuning`.

Compression invariants hold throughout: weights that are exactly zero in plain float
layers stay zero (gradients and weights masked in every optimizer step), and each
:class:`~fxpress.graph.runtime.CompressedModule` trains only the parameters its
``begin_training()`` returns and is folded back by ``end_training()``.

Under ``torchrun`` it trains with DistributedDataParallel (:mod:`~fxpress.passes.distill_data`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sized
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from fxpress.errors import InputError, MissingDataError
from fxpress.graph.capture import capture, clone_structure, eval_mode
from fxpress.graph.canonical import autograd_safe
from fxpress.graph.guard import preserved_rng
from fxpress.graph.outputs import plain_outputs
from fxpress.graph.runtime import trainable_modules
from fxpress.passes.distill import FeatureProjection, collect, insert_taps, tap_modules
from fxpress.passes.distill_config import (CYCLE_GAIN, FAR_POINTS, FAR_STRETCH, RESTART_GAIN,
                                            History, TrainConfig)
from fxpress.passes.distill_data import (Dist, count_batches, device_of, distributed, epoch_batches,
                                         in_step, mean_over_ranks, split_holdout, steps_per_rank,
                                         to_device, train_mode)
from fxpress.passes.distill_tuning import (FEW_BATCHES, BestState, RangeTest, Snapshot,
                                           lr_range_test, make_optimizer, progress_bar)


def _check_classes(y: torch.Tensor, classes: int) -> None:
    """Integer labels must be class indices of the model's output (or -100, which
    cross-entropy ignores): another value made cross_entropy raise 'Target 9 is out of
    bounds' from inside the pass (a PassError about an IndexError)."""
    if y.is_floating_point() or y.is_complex() or not y.numel():
        return
    bad = ((y < 0) & (y != -100)) | (y >= classes)
    if bool(bad.any()):
        raise InputError(f"distill: train_data labels must be class indices in [0, {classes}) "
                         f"(the model's output has {classes} classes; -100 is ignored), got "
                         f"{int(y[bad].reshape(-1)[0])} ({int(bad.sum())} such labels); fix the labels "
                         "or give batches of inputs alone to distill from the original model only")


@dataclass
class _Run:
    """What one :meth:`Distiller.fit` trains with: models, data, the first batch, where."""

    student: nn.Module
    teacher: nn.Module
    data: Any
    x0: tuple
    y0: torch.Tensor | None
    device: torch.device
    d: Dist


class _Trainee(nn.Module):
    """The student, the projections and any loose trainable parameters: what DDP wraps."""

    def __init__(self, student: nn.Module, student_taps: Sequence[str],
                 projections: Sequence[nn.Module], extra: Sequence[nn.Parameter]):
        super().__init__()
        self.student = student
        self.student_taps = list(student_taps)
        self.projections = nn.ModuleList(projections)
        self.extra = nn.ParameterList(extra)

    def forward(self, *inputs: Any) -> tuple[Any, list[torch.Tensor]]:
        if not self.student_taps:
            return self.student(*inputs), []
        with collect(self.student) as acts:
            out = self.student(*inputs)
        return out, [p(acts[n]) for p, n in zip(self.projections, self.student_taps)]


def _first_float(out: Any) -> torch.Tensor:
    # a dataclass output is its fields (pytree sees it as one leaf), as the verifier reads it
    for t in pytree.tree_leaves(plain_outputs(out)):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    raise InputError(f"distill: the model's output has no float tensor ({type(out).__name__})")


def _loss_item(t: torch.Tensor | float) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


#: every part :meth:`Distiller.loss` may report
_LOSS_PARTS = ("loss", "kd", "ce", "label_mse", "feature")
#: with too few batches to hold any out, the start and the end of training are compared on
#: the training batches when there are at most this many (a list or a sized loader)
MAX_SELF_CHECK = 16


class Distiller:
    """Knowledge distillation from ``teacher`` into ``student``.

    >>> d = Distiller(teacher, student, pairs={"layers.0": "layers.1"}, beta=1.0)  # doctest: +SKIP
    >>> history = d.fit(train_data, epochs=5, lr=1e-3)                             # doctest: +SKIP
    >>> history.loss                                                               # doctest: +SKIP

    The loss is ``alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−alpha)·CE(s, y)`` when
    batches carry labels (``(inputs..., label)``), the KL term alone when they do not,
    plus ``beta`` times the mean over ``pairs`` of ``MSE(proj(student tap), teacher tap)``.
    ``output_loss="mse"`` matches raw outputs instead (embeddings, regression), plus
    ``(1−alpha)·MSE(s, y)`` for float labels; ``"auto"`` (what the distill pass uses)
    chooses on the first batch: ``mse`` when the labels are floats (regression) or the
    output has one value per row, else ``kl``.
    ``mixup`` > 0 adds that weight times the KL term on blends of the batch's inputs
    (each example mixed with another of the batch by a uniform random weight; the
    teacher's outputs are the only labels there): the student matches the teacher's
    function between the training points, not only on them (Beyer et al. 2022, "Knowledge
    distillation: a good teacher is patient and consistent"). It applies to a single
    float input (a token-id input is not blended) and costs a second batch per step.

    Labelled and unlabelled batches may be mixed (Hinton's transfer set: inputs only the
    teacher labels). Each batch is judged on its own: ``labels=True``/``False`` says all
    batches do or do not end with a label; ``inputs=N`` says the model takes N inputs, so
    a batch with more items ends with a label; by default a batch (or a bare tensor) is
    labelled when its last item is an integer vector as long as the batch.

    ``pairs`` maps student tap names to teacher tap names (a list of names pairs each with
    itself). A model that lacks the named taps is captured on the first batch and tapped
    (see :func:`insert_taps`); ``distiller.student`` is then that graph, which shares its
    parameters with the module you passed. Where widths differ, a learned linear projection
    maps the student's feature to the teacher's. The teacher is never modified; the student
    is trained in place. Weights that are exactly zero in the student's plain layers stay
    zero (``keep_zeros``), and compressed runtime modules train through their
    ``begin_training()``/``end_training()`` hooks.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module,
                 pairs: Mapping[str, str] | Sequence[str] | Sequence[tuple[str, str]] | None = None,
                 temperature: float = 4.0, alpha: float = 0.5, beta: float = 1.0, *,
                 output_loss: str = "kl", labels: bool | None = None, inputs: int | None = None,
                 keep_zeros: bool = True, mixup: float = 0.0):
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise InputError("Distiller: teacher and student must be torch.nn.Module instances")
        if teacher is student:
            raise InputError("Distiller: teacher and student are the same object; distil into a "
                             "copy (e.g. the graph fxpress.compress returns)")
        if not mixup >= 0:
            raise InputError(f"Distiller: mixup must be >= 0 (0: off), got {mixup!r}")
        if temperature <= 0 or not 0 <= alpha <= 1 or beta < 0:
            raise InputError(f"Distiller: need temperature > 0, 0 <= alpha <= 1, beta >= 0; got "
                             f"temperature={temperature}, alpha={alpha}, beta={beta}")
        if output_loss not in ("kl", "mse", "auto"):
            raise InputError(f"Distiller: output_loss must be 'kl', 'mse' or 'auto', got "
                             f"{output_loss!r}")
        self.teacher, self.student = teacher, student
        if pairs is None:
            self.pairs: list[tuple[str, str]] = []
        elif isinstance(pairs, Mapping):
            self.pairs = [(str(s), str(t)) for s, t in pairs.items()]
        else:
            self.pairs = [(p, p) if isinstance(p, str) else (str(p[0]), str(p[1])) for p in pairs]
        self.temperature, self.alpha, self.beta = float(temperature), float(alpha), float(beta)
        if inputs is not None and (isinstance(inputs, bool) or not isinstance(inputs, int) or inputs < 1):
            raise InputError(f"Distiller: inputs must be a positive int (the model's input count), "
                             f"got {inputs!r}")
        self.output_loss, self.labels, self.keep_zeros = output_loss, labels, keep_zeros
        self.inputs = inputs
        self.mixup = float(mixup)
        self.projections: list[nn.Module] = []

    # -- data --------------------------------------------------------------------------------
    def _split(self, batch: Any) -> tuple[tuple, torch.Tensor | None]:
        if isinstance(batch, torch.Tensor):
            batch = (batch,)
        if not isinstance(batch, (tuple, list)) or not batch:
            raise InputError(f"distill: a batch must be a tuple (inputs..., label) or (inputs...), "
                             f"got {type(batch).__name__}")
        batch = tuple(batch)
        has = self.labels
        if has is None and self.inputs is not None:
            has = len(batch) > self.inputs
        if has is None:  # a trailing integer vector as long as the batch is a label
            y, x0 = batch[-1], batch[0]
            has = (len(batch) >= 2 and isinstance(y, torch.Tensor) and not y.is_floating_point()
                   and y.dim() == 1 and isinstance(x0, torch.Tensor) and x0.dim() >= 1
                   and x0.shape[0] == y.shape[0])
        if not has:
            return batch, None
        y = batch[-1]
        if isinstance(y, torch.Tensor) and y.is_floating_point() and not bool(torch.isfinite(y).all()):
            bad = int((~torch.isfinite(y)).sum())
            raise InputError(f"distill: a train_data label holds NaN or inf ({bad} of {y.numel()} "
                             "values): the loss would be NaN and the trained model with it; clean "
                             "the labels (torch.nan_to_num) or drop those rows")
        return batch[:-1], y

    def _tapped(self, model: nn.Module, names: list[str], example: tuple) -> nn.Module:
        have = tap_modules(model)
        if all(n in have for n in names):
            return model
        if not isinstance(model, torch.fx.GraphModule):
            model = capture(model, example)
        missing = [n for n in names if n not in tap_modules(model)]
        if missing:
            insert_taps(model, missing)
        return model

    # -- training ----------------------------------------------------------------------------
    def loss(self, s_out: Any, t_out: Any, y: torch.Tensor | None, s_feats: Sequence[torch.Tensor],
             t_acts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The distillation loss of one batch and its parts."""
        s, t = _first_float(s_out), _first_float(t_out).detach()
        parts: dict[str, float] = {}
        if self.output_loss == "auto":  # regression targets or one output: no class scores
            regression = (y is not None and y.is_floating_point()) or s.shape[-1] == 1
            self.output_loss = "mse" if regression else "kl"
        if self.output_loss == "kl":
            T = self.temperature
            s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            out = F.kl_div(F.log_softmax(s2 / T, -1), F.log_softmax(t2 / T, -1), log_target=True,
                           reduction="batchmean") * (T * T)
        else:
            out = F.mse_loss(s, t)
        parts["kd"] = _loss_item(out)
        if y is not None and self.output_loss == "kl":
            _check_classes(y, s.shape[-1])
            ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
            parts["ce"] = _loss_item(ce)
            total = self.alpha * out + (1 - self.alpha) * ce
        elif y is not None and y.is_floating_point() and y.numel() == s.numel():
            hard = F.mse_loss(s, y.reshape(s.shape).to(s.dtype))  # regression targets
            parts["label_mse"] = _loss_item(hard)
            total = self.alpha * out + (1 - self.alpha) * hard
        else:
            total = out
        if s_feats:
            feat = sum(F.mse_loss(sf, t_acts[tn].detach()) for sf, (_, tn) in zip(s_feats, self.pairs))
            feat = feat / len(s_feats)
            parts["feature"] = _loss_item(feat)
            total = total + self.beta * feat
        parts["loss"] = _loss_item(total)
        return total, parts

    def _projections(self, s_acts: Mapping[str, torch.Tensor],
                     t_acts: Mapping[str, torch.Tensor]) -> list[nn.Module]:
        out: list[nn.Module] = []
        for s_name, t_name in self.pairs:
            s, t = s_acts[s_name], t_acts[t_name]
            if s.shape == t.shape:
                out.append(nn.Identity())
                continue
            diff = [d for d in range(1, s.dim()) if s.dim() == t.dim() and s.shape[d] != t.shape[d]]
            if s.dim() != t.dim() or len(diff) != 1 or s.shape[0] != t.shape[0]:
                raise InputError(f"distill: cannot pair student tap {s_name!r} {tuple(s.shape)} with "
                                 f"teacher tap {t_name!r} {tuple(t.shape)}: a projection maps one "
                                 "width; pick taps whose shapes differ in one dimension at most")
            d = diff[0]
            out.append(FeatureProjection(d, s.shape[d], t.shape[d]))
        return out

    def fit(self, train_data: Iterable[Any], epochs: int = 5, lr: float | None = 1e-3, *,
            optimizer: str = "adam", weight_decay: float = 0.0, schedule: str = "cosine",
            holdout: float = 0.0, patience: int = 0, seed: int = 0,
            progress: bool | None = True, device: str | torch.device | None = None,
            config: TrainConfig | None = None) -> History:
        """Train the student for ``epochs`` passes over ``train_data``; return the history.

        ``train_data``: a list of batches, a DataLoader, or any re-iterable of batches.
        The keyword arguments are the fields of :class:`TrainConfig`; ``config=`` passes
        one whole (and then wins over them). The student returns to its device afterwards.
        """
        cfg = config if config is not None else TrainConfig(
            epochs=epochs, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
            schedule=schedule, holdout=holdout, patience=patience, seed=seed, progress=progress,
            device=device)
        first = next(iter(train_data), None)
        if first is None:
            raise MissingDataError("distill", "train_data is empty; pass batches of (inputs..., label)")
        d = distributed()
        try:
            with preserved_rng():  # seeded for repeatable runs; the caller's RNG is restored
                return self._fit(train_data, first, cfg, d)
        finally:
            if d.created:
                import torch.distributed as dist

                dist.destroy_process_group()

    def _fit(self, data: Any, first: Any, cfg: TrainConfig, d: Dist) -> History:
        x0, y0 = self._split(first)
        if self.pairs:
            self.student = self._tapped(self.student, [s for s, _ in self.pairs], x0)
            self.teacher = self._tapped(self.teacher, [t for _, t in self.pairs], x0)
        student, teacher = self.student, self.teacher
        home = device_of(student)
        device = cfg.device
        if d.backend == "nccl":
            device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(device)
        device = torch.device(device) if device is not None else home
        student.to(device)
        if device_of(teacher) != device:  # never move the caller's teacher: use a copy
            teacher = clone_structure(teacher, copy_tensors=True).to(device)

        # each compressed module says what may train; everything else float trains as is
        compressed = trainable_modules(student)
        flags = [(p, p.requires_grad) for p in student.parameters()]
        hooked: list[nn.Parameter] = []
        started: list = []
        # the caller's random state is theirs: projections' init, dropout and a
        # DataLoader's shuffle draw from a forked state seeded with cfg.seed
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(torch.Generator().manual_seed(cfg.seed).get_state())
            if cuda:
                torch.cuda.set_rng_state(torch.Generator().manual_seed(cfg.seed).get_state(), device)
            try:
                for _, m in compressed:
                    hooked += list(m.begin_training())
                    started.append(m)
                # a compressed module's own tensors train only if its hook returned them
                owned = {id(p) for _, m in compressed for p in m.parameters()}
                plain = [p for p in student.parameters() if id(p) not in owned and p.is_floating_point()]
                for p in student.parameters():
                    p.requires_grad_(False)
                trainable = list({id(p): p for p in plain + hooked}.values())
                for p in trainable:
                    p.requires_grad_(True)
                run = _Run(student, teacher, data, to_device(x0, device), to_device(y0, device), device, d)
                history = self._loop(run, trainable, plain, cfg)
            finally:
                for m in started:
                    m.end_training()
                for p, f in flags:
                    p.requires_grad_(f)
                student.to(home)
        return history

    def _prepare(self, run: "_Run", trainable: list[nn.Parameter],
                 plain: list[nn.Parameter]) -> tuple["_Trainee", list[nn.Parameter], dict]:
        """The trainee (student + projections), the parameters that reach the loss, and the
        masks of plain weights that must stay zero."""
        student, teacher, device, x0 = run.student, run.teacher, run.device, run.x0
        s_names = [s for s, _ in self.pairs]
        with torch.no_grad(), eval_mode(teacher), eval_mode(student), \
                collect(teacher) as t_acts, collect(student) as s_acts:
            teacher(*x0)
            student(*x0)
            projections = self._projections(s_acts, t_acts)
        in_student = {id(p) for p in student.parameters()}
        # a graph that writes in place into tensors it reads (RWKV) trains through clones
        trainee = _Trainee(autograd_safe(student), s_names, projections,
                           [p for p in trainable if id(p) not in in_student]).to(device)

        # one probe step (no update) finds parameters the graph never uses (e.g. a pooler
        # whose output is dropped): DDP would wait forever for their gradients
        with eval_mode(trainee), eval_mode(teacher), collect(teacher) as t_acts:
            with torch.no_grad():
                t_out = teacher(*x0)
            s_out, s_feats = trainee(*x0)
            self.loss(s_out, t_out, run.y0, s_feats, t_acts)[0].backward()
        params = [p for p in trainee.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.requires_grad_(False)
        params = [p for p in params if p.grad is not None]
        for p in params:
            p.grad = None
        if not params:
            raise InputError("distill: the student has no trainable parameter that reaches the loss")
        self.projections = list(trainee.projections)
        plain_ids = {id(p) for p in plain}
        masks = {p: p.detach() != 0 for p in params if self.keep_zeros and id(p) in plain_ids
                 and p.dim() >= 2 and not bool((p != 0).all())}
        return trainee, params, masks

    def _mixable(self, x: tuple) -> int:
        """The batch size when ``x`` can be blended for the mixup term (one float input of
        at least 2 examples, KL on a tensor output, no feature pairs), else 0."""
        if not self.mixup or self.pairs or self.output_loss == "mse" or len(x) != 1:
            return 0
        t = x[0]
        ok = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 1 and t.shape[0] >= 2
        return int(t.shape[0]) if ok else 0

    def _step(self, run: "_Run", model: nn.Module, opt: torch.optim.Optimizer, masks: dict,
              batch: Any) -> dict[str, float]:
        """One optimizer step on ``batch``; the loss parts."""
        x, y = self._split(batch)
        x, y = to_device(x, run.device), to_device(y, run.device)
        b = self._mixable(x)
        if b:  # the batch, then as many blends of it (labelled by the teacher alone)
            lam = torch.rand((b,) + (1,) * (x[0].dim() - 1), device=x[0].device)
            x = (torch.cat([x[0], lam * x[0] + (1 - lam) * x[0][torch.randperm(b, device=x[0].device)]]),)
        with torch.no_grad(), eval_mode(run.teacher), collect(run.teacher) as t_acts:
            t_out = run.teacher(*x)
        s_out, s_feats = model(*x)
        if b:
            loss, parts = self.loss(s_out[:b], t_out[:b], y, s_feats, t_acts)
            mixed = self.loss(s_out[b:], t_out[b:], None, [], {})[0]
            loss = loss + self.mixup * mixed
            parts["mixup"] = _loss_item(mixed)
        else:
            loss, parts = self.loss(s_out, t_out, y, s_feats, t_acts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, m in masks.items():  # pruned weights get no update...
            if p.grad is not None:
                p.grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for p, m in masks.items():  # ...and stay exactly zero
                p.mul_(m)
        return parts

    def _loop(self, run: "_Run", trainable: list[nn.Parameter], plain: list[nn.Parameter],
              cfg: TrainConfig) -> History:
        trainee, params, masks = self._prepare(run, trainable, plain)
        d, device = run.d, run.device
        model: nn.Module = trainee
        if d.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(trainee, device_ids=[device.index] if device.type == "cuda" else None)
        data, held = split_holdout(run.data, cfg.holdout, cfg.seed)
        history = History(world_size=d.world, trained_parameters=sum(p.numel() for p in params),
                          kept_zeros=sum(int((~m).sum()) for m in masks.values()),
                          holdout_batches=count_batches(held))
        state: dict = {}
        lr = cfg.lr
        if lr is None:
            history.lr_test = self._range_test(run, model, trainee, params, masks, data, cfg, state)
            lr = history.lr_test.chosen
        history.lr = lr
        opt = make_optimizer(params, lr, cfg)
        steps = steps_per_rank(data, d)
        sched: Any = None
        if cfg.schedule == "cosine":
            # stepped per batch; an iterable of unknown length anneals per epoch instead
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * (steps or 1))
        elif cfg.schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, factor=0.5, patience=max(1, cfg.patience // 2 if cfg.patience else 2))
        best = BestState(trainee) if held is not None else None
        # the starting weights are a candidate too: a student already close to its teacher
        # (a mild compression, or none) is not left worse by training that only moved it
        # away (Adam moves every weight by about the rate per step, even on a loss near
        # zero). Too few batches to hold any out: the start and the end are compared on
        # the training batches themselves (no early stopping, but never a worse end).
        first = best
        if best is None and isinstance(data, Sized) and 0 < len(data) <= MAX_SELF_CHECK:
            first = BestState(trainee)
        if first is not None:
            history.start_val_loss = self._evaluate(run, trainee, held if best else data)["val_loss"]
            first.update(0, history.start_val_loss)
        drops_left, dropped, tail = cfg.lr_drops, 0, cfg.patience
        restarts_left, peak, cycle_start, limit = cfg.restarts, lr, 0, cfg.epochs
        # this cycle's epochs, its patience (scaled with its length) and the best loss before it
        cycle_len, patience, cycle_best = cfg.epochs, cfg.patience, math.inf
        bests: list[float] = []  # the best held-out loss after each epoch
        bar = progress_bar(cfg.epochs * steps if steps else None, cfg.progress and d.rank == 0)
        try:
            epoch = 0
            while epoch < limit:
                epoch += 1
                start = time.perf_counter()
                sums: dict[str, float] = {}
                counts: dict[str, int] = {}  # per part: "ce" only in labelled batches
                n = 0
                lr_now = opt.param_groups[0]["lr"]
                batches = in_step(iter(epoch_batches(data, epoch - 1, cfg.seed, d, state)), d, device)
                with train_mode(trainee):
                    for batch in batches:
                        parts = self._step(run, model, opt, masks, batch)
                        if steps and isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
                            sched.step()
                        for k, v in parts.items():
                            sums[k] = sums.get(k, 0.0) + v
                            counts[k] = counts.get(k, 0) + 1
                        n += 1
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(epoch=epoch, loss=f"{parts['loss']:.4f}", refresh=False)
                if not steps and isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
                    sched.step()
                record = self._reduce(sums, counts, n, d, device)
                record.update(epoch=epoch, lr=lr_now)
                if held is not None:
                    record.update(self._evaluate(run, trainee, held))
                    history.teacher_val_accuracy = record.pop("val_teacher_accuracy", None)
                record["seconds"] = time.perf_counter() - start
                history.epochs.append(record)
                if cfg.schedule == "plateau":
                    sched.step(record.get("val_loss", record["loss"]))
                if bar is not None:  # one redraw per epoch with the epoch's mean loss
                    bar.set_postfix(epoch=epoch, loss=f"{record['loss']:.4f}")
                if best is None:
                    continue
                best.update(epoch, record["val_loss"])
                bests.append(best.loss)
                if not cfg.patience:
                    continue
                stalled = epoch - max(best.epoch, dropped, cycle_start) >= patience or \
                    (dropped and epoch - dropped >= tail)  # its tail has ended
                end = epoch >= limit
                if stalled and not end and drops_left and cfg.schedule != "plateau":
                    # a plateau while the rate is still high: back to the best
                    # state, and anneal from this rate to zero over `patience`
                    # epochs, so the run ends annealed rather than cut off
                    drops_left -= 1
                    dropped = epoch
                    best.restore()
                    # the tail: `patience` epochs, or half of those left when more
                    # (a plateau at epoch 13 of 30 on two noisy held-out batches
                    # annealed 1e-2 to zero in 5 epochs, still improving: -2 points)
                    tail = max(patience, (limit - epoch) // 2)
                    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, tail * (steps or 1))
                    history.lr_drops.append(epoch)
                    continue
                if not (stalled or end):
                    continue
                can = bool(restarts_left) and cfg.schedule == "cosine"
                far = can and self._far(history, best, cycle_best)
                if not far and not (end and can and self._still_improving(
                        bests, best.epoch, epoch, patience)):
                    history.stopped_early = not end
                    break
                # a warm restart from the best state (Loshchilov & Hutter 2017). Still far
                # from the original after a cycle that gained (stopped early or not): the
                # same peak rate over FAR_STRETCH times the epochs, with as many times the
                # patience (the student is being retrained, not polished: its held-out loss
                # falls while the rate anneals, slowly, and noisily on a few batches). Only
                # the tail still falling: half the peak rate over as many epochs.
                restarts_left -= 1
                best.restore()
                if far:
                    cycle_len = cfg.epochs * FAR_STRETCH
                    patience = cfg.patience * FAR_STRETCH
                    history.far_restarts.append(epoch)
                else:
                    peak /= 2
                for g in opt.param_groups:
                    g["lr"] = peak
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cycle_len * (steps or 1))
                drops_left, dropped, tail, cycle_start = cfg.lr_drops, 0, patience, epoch
                cycle_best, limit = best.loss, epoch + cycle_len
                history.restarts.append(epoch)
                if bar is not None:
                    bar.total = limit * steps if steps else None
        finally:
            if bar is not None:
                bar.close()
        if best is None and first is not None and history.epochs:
            first.update(len(history.epochs), self._evaluate(run, trainee, data)["val_loss"])
            best = first
        if best is not None and best.snapshot is not None:
            best.restore()
            history.best_epoch = best.epoch
        else:
            history.best_epoch = len(history.epochs)
        return history

    @staticmethod
    def _far(history: History, best: BestState, cycle_best: float) -> bool:
        """Whether the kept epoch is still :data:`FAR_POINTS` or more below the original on
        the held-out batches (accuracy on labels, else agreement with the original's top-1)
        while this cycle lowered the best held-out loss by :data:`CYCLE_GAIN` or more: a
        compressed model that is being retrained rather than polished."""
        if not best.epoch or not best.loss < cycle_best * (1 - CYCLE_GAIN):
            return False
        kept = history.epochs[best.epoch - 1]
        teacher = history.teacher_val_accuracy
        if teacher is not None and "val_accuracy" in kept:
            gap = teacher - kept["val_accuracy"]
        elif "val_agreement" in kept:
            gap = 1.0 - kept["val_agreement"]
        else:
            return False
        return 100 * gap >= FAR_POINTS

    @staticmethod
    def _still_improving(bests: list[float], best_epoch: int, epoch: int, patience: int) -> bool:
        """Whether the held-out loss was still falling at the end of a cycle: its best epoch
        among the last ``patience``, at least :data:`RESTART_GAIN` below the best before them."""
        if best_epoch <= epoch - patience:
            return False
        before = bests[-1 - patience] if len(bests) > patience else float("inf")
        return bests[-1] < before * (1 - RESTART_GAIN)

    def _range_test(self, run: "_Run", model: nn.Module, trainee: nn.Module,
                    params: list[nn.Parameter], masks: dict, data: Any, cfg: TrainConfig,
                    state: dict) -> RangeTest:
        """The learning-rate range test on the training batches; the weights are restored."""
        snap = Snapshot(trainee)
        opt = make_optimizer(params, 1e-6, cfg)

        def batches() -> Iterator[Any]:
            for k in range(1_000_000):  # as many passes over the data as the test needs
                yield from epoch_batches(data, -1 - k, cfg.seed, run.d, state)

        it = in_step(batches(), run.d, run.device)

        def step(lr: float) -> float:
            for g in opt.param_groups:
                g["lr"] = lr
            with train_mode(trainee):
                loss = self._step(run, model, opt, masks, next(it))["loss"]
            return mean_over_ranks(loss, run.d, run.device)

        n = steps_per_rank(data, run.d)
        try:
            return lr_range_test(step, window=n if n and n <= FEW_BATCHES else 1)
        finally:
            snap.restore()

    def _evaluate(self, run: "_Run", trainee: "_Trainee", held: Any) -> dict[str, float]:
        """Loss (and accuracy, agreement with the teacher) on the held-out batches."""
        total = correct = t_correct = agree = labelled = n = 0.0
        with torch.no_grad(), eval_mode(trainee), eval_mode(run.teacher):
            for batch in held:
                x, y = self._split(batch)
                x, y = to_device(x, run.device), to_device(y, run.device)
                with collect(run.teacher) as t_acts:
                    t_out = run.teacher(*x)
                s_out, s_feats = trainee(*x)
                total += self.loss(s_out, t_out, y, s_feats, t_acts)[1]["loss"]
                n += 1
                if self.output_loss == "kl":
                    s, t = _first_float(s_out), _first_float(t_out)
                    s, t = s.reshape(-1, s.shape[-1]).argmax(-1), t.reshape(-1, t.shape[-1]).argmax(-1)
                    agree += float((s == t).float().mean())
                    if y is not None:
                        correct += float((s == y.reshape(-1)).float().sum())
                        t_correct += float((t == y.reshape(-1)).float().sum())
                        labelled += y.numel()
        out = {"val_loss": total / n if n else float("nan")}
        if self.output_loss == "kl" and n:
            out["val_agreement"] = agree / n
            if labelled:
                out["val_accuracy"] = correct / labelled
                out["val_teacher_accuracy"] = t_correct / labelled
        return out

    @staticmethod
    def _reduce(sums: dict[str, float], counts: dict[str, int], n: int, d: Dist,
                device: torch.device) -> dict:
        """Each loss part's mean over the batches that had it, over every rank."""
        # a fixed key list: with mixed batches a rank may have seen no labelled one, and
        # all_reduce needs the same tensor everywhere
        keys = sorted(set(_LOSS_PARTS) | set(sums))
        local = n
        vals = [sums.get(k, 0.0) for k in keys] + [float(counts.get(k, 0)) for k in keys]
        if d.active:
            import torch.distributed as dist

            where = device if d.backend == "nccl" else torch.device("cpu")
            t = torch.tensor(vals + [float(n)], dtype=torch.float64, device=where)
            dist.all_reduce(t)
            vals, n = t[:-1].tolist(), int(t[-1].item())
        sums = dict(zip(keys, vals[:len(keys)]))
        counts = dict(zip(keys, (int(c) for c in vals[len(keys):])))
        out = {k: sums[k] / counts[k] for k in keys if counts[k]}
        out.setdefault("loss", float("nan"))  # no batch at all
        out["steps"] = local     # this rank's optimizer steps
        out["batches"] = n       # batches seen by all ranks together
        return out
