"""distill's trainer: :class:`Distiller` (KD + CE + tap MSE), its :class:`TrainConfig`, and
the data plumbing that lets the same loop run under ``torchrun``.

``Distiller(teacher, student, pairs=..., temperature=4.0, alpha=0.5, beta=1.0).fit(train_data,
epochs=5, lr=1e-3)``: KL between softened logits (×T²), cross-entropy on labels when batches
carry them, and MSE between paired taps through a learned linear projection when widths
differ (FitNets). Teacher and student may be different architectures, or the student the
compressed copy of the teacher. Everything about *how* to train (epochs, learning rate,
optimizer, schedule, seed, device, progress) is one :class:`TrainConfig`.

Compression invariants hold throughout: weights that are exactly zero in plain float
layers stay zero (gradients and weights masked in every optimizer step), and each
:class:`~fxpress.graph.weights.CompressedModule` trains only the parameters its
``begin_training()`` returns and is folded back by ``end_training()``.

Under ``torchrun --nproc_per_node=N`` the same code trains with DistributedDataParallel;
which batches each rank sees is :mod:`fxpress.passes.distill_data`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from fxpress.errors import InputError, MissingDataError
from fxpress.graph.capture import capture, clone_structure, eval_mode
from fxpress.graph.runtime import compressed_modules
from fxpress.passes.distill import collect, insert_taps, tap_modules
from fxpress.passes.distill_data import Dist, distributed, epoch_batches, in_step, steps_per_rank


@dataclass(frozen=True)
class TrainConfig:
    """How :meth:`Distiller.fit` trains: one object instead of a long parameter list.

    ``optimizer``: "adam" or "sgd" (momentum 0.9). ``schedule``: "cosine" anneals the
    learning rate to zero over the run (per batch; per epoch for an iterable of unknown
    length), "constant" keeps it. ``device``: where to train (default: the student's
    device; under torchrun with one GPU per rank, ``cuda:LOCAL_RANK``). ``progress``:
    True shows a bar, None only on a terminal, False never.
    """

    epochs: int = 5
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    progress: bool | None = True
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise InputError(f"Distiller.fit: epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise InputError(f"Distiller.fit: lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise InputError(f"Distiller.fit: optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise InputError(f"Distiller.fit: schedule must be 'cosine' or 'constant', got "
                             f"{self.schedule!r}")


# -- the trainer ------------------------------------------------------------------------------

@dataclass
class History:
    """What :meth:`Distiller.fit` did: one dict per epoch (mean losses, steps, seconds).

    Losses are averaged over every rank, so each rank holds the same history.
    """

    epochs: list[dict] = field(default_factory=list)
    world_size: int = 1
    trained_parameters: int = 0
    kept_zeros: int = 0

    @property
    def loss(self) -> list[float]:
        return [e["loss"] for e in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, i: int) -> dict:
        return self.epochs[i]

    def as_dict(self) -> dict:
        return {"epochs": self.epochs, "world_size": self.world_size,
                "trained_parameters": self.trained_parameters, "kept_zeros": self.kept_zeros}


class FeatureProjection(nn.Module):
    """A learned linear map along the one dimension where student and teacher widths differ."""

    def __init__(self, dim: int, d_in: int, d_out: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.movedim(self.dim, -1)).movedim(-1, self.dim)


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


@contextlib.contextmanager
def _train_mode(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:  # not model.train(): exported graphs refuse train()
        m.training = True
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


def _first_float(out: Any) -> torch.Tensor:
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    raise InputError(f"distill: the model's output has no float tensor ({type(out).__name__})")


def _device_of(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


def _to(batch: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def _loss_item(t: torch.Tensor | float) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


#: every part :meth:`Distiller.loss` may report
_LOSS_PARTS = ("loss", "kd", "ce", "feature")


class Distiller:
    """Knowledge distillation from ``teacher`` into ``student``.

    >>> d = Distiller(teacher, student, pairs={"layers.0": "layers.1"}, beta=1.0)  # doctest: +SKIP
    >>> history = d.fit(train_data, epochs=5, lr=1e-3)                             # doctest: +SKIP
    >>> history.loss                                                               # doctest: +SKIP

    The loss is ``alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−alpha)·CE(s, y)`` when
    batches carry labels (``(inputs..., label)``), the KL term alone when they do not,
    plus ``beta`` times the mean over ``pairs`` of ``MSE(proj(student tap), teacher tap)``.
    ``output_loss="mse"`` matches raw outputs instead (embeddings, regression).

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
                 keep_zeros: bool = True):
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise InputError("Distiller: teacher and student must be torch.nn.Module instances")
        if teacher is student:
            raise InputError("Distiller: teacher and student are the same object; distil into a "
                             "copy (e.g. the graph fxpress.compress returns)")
        if temperature <= 0 or not 0 <= alpha <= 1 or beta < 0:
            raise InputError(f"Distiller: need temperature > 0, 0 <= alpha <= 1, beta >= 0; got "
                             f"temperature={temperature}, alpha={alpha}, beta={beta}")
        if output_loss not in ("kl", "mse"):
            raise InputError(f"Distiller: output_loss must be 'kl' or 'mse', got {output_loss!r}")
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
        return (batch[:-1], batch[-1]) if has else (batch, None)

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
        if self.output_loss == "kl":
            T = self.temperature
            s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            out = F.kl_div(F.log_softmax(s2 / T, -1), F.log_softmax(t2 / T, -1), log_target=True,
                           reduction="batchmean") * (T * T)
        else:
            out = F.mse_loss(s, t)
        parts["kd"] = _loss_item(out)
        if y is not None and self.output_loss == "kl":
            ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
            parts["ce"] = _loss_item(ce)
            total = self.alpha * out + (1 - self.alpha) * ce
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

    def fit(self, train_data: Iterable[Any], epochs: int = 5, lr: float = 1e-3, *,
            optimizer: str = "adam", weight_decay: float = 0.0, schedule: str = "cosine",
            seed: int = 0, progress: bool | None = True,
            device: str | torch.device | None = None, config: TrainConfig | None = None) -> History:
        """Train the student for ``epochs`` passes over ``train_data``; return the history.

        ``train_data``: a list of batches, a DataLoader, or any re-iterable of batches.
        The keyword arguments are the fields of :class:`TrainConfig`; ``config=`` passes
        one whole (and then wins over them). The student returns to its device afterwards.
        """
        cfg = config if config is not None else TrainConfig(
            epochs=epochs, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
            schedule=schedule, seed=seed, progress=progress, device=device)
        first = next(iter(train_data), None)
        if first is None:
            raise MissingDataError("distill", "train_data is empty; pass batches of (inputs..., label)")
        d = distributed()
        try:
            return self._fit(train_data, first, cfg, d)
        finally:
            if d.created:
                import torch.distributed as dist

                dist.destroy_process_group()

    def _fit(self, data: Any, first: Any, cfg: TrainConfig, d: Dist) -> History:
        torch.manual_seed(cfg.seed)
        x0, y0 = self._split(first)
        if self.pairs:
            self.student = self._tapped(self.student, [s for s, _ in self.pairs], x0)
            self.teacher = self._tapped(self.teacher, [t for _, t in self.pairs], x0)
        student, teacher = self.student, self.teacher
        home = _device_of(student)
        device = cfg.device
        if d.backend == "nccl":
            device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(device)
        device = torch.device(device) if device is not None else home
        student.to(device)
        if _device_of(teacher) != device:  # never move the caller's teacher: use a copy
            teacher = clone_structure(teacher, copy_tensors=True).to(device)

        # each compressed module says what may train; everything else float trains as is
        compressed = compressed_modules(student)
        flags = [(p, p.requires_grad) for p in student.parameters()]
        hooked: list[nn.Parameter] = []
        started: list = []
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
            run = _Run(student, teacher, data, _to(x0, device), _to(y0, device), device, d)
            history = self._loop(run, trainable, plain, cfg)
        finally:
            for m in started:
                m.end_training()
            for p, f in flags:
                p.requires_grad_(f)
            student.to(home)
        return history

    def _loop(self, run: "_Run", trainable: list[nn.Parameter], plain: list[nn.Parameter],
              cfg: TrainConfig) -> History:
        student, teacher, data, device, d = run.student, run.teacher, run.data, run.device, run.d
        x0, y0d = run.x0, run.y0
        s_names = [s for s, _ in self.pairs]
        with torch.no_grad(), eval_mode(teacher), eval_mode(student), \
                collect(teacher) as t_acts, collect(student) as s_acts:
            teacher(*x0)
            student(*x0)
            projections = self._projections(s_acts, t_acts)
        in_student = {id(p) for p in student.parameters()}
        trainee = _Trainee(student, s_names, projections,
                           [p for p in trainable if id(p) not in in_student]).to(device)

        # one probe step (no update) finds parameters the graph never uses (e.g. a pooler
        # whose output is dropped): DDP would wait forever for their gradients
        with eval_mode(trainee), eval_mode(teacher), collect(teacher) as t_acts:
            with torch.no_grad():
                t_out = teacher(*x0)
            s_out, s_feats = trainee(*x0)
            self.loss(s_out, t_out, y0d, s_feats, t_acts)[0].backward()
        params = [p for p in trainee.parameters() if p.requires_grad]
        unused = [p for p in params if p.grad is None]
        for p in unused:
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
        model: nn.Module = trainee
        if d.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(trainee, device_ids=[device.index] if device.type == "cuda" else None)
        opt = (torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
               if cfg.optimizer == "adam"
               else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay))

        steps = steps_per_rank(data, d)
        sched = None
        if cfg.schedule == "cosine":
            # stepped per batch; an iterable of unknown length anneals per epoch instead
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * (steps or 1))
        history = History(world_size=d.world, trained_parameters=sum(p.numel() for p in params),
                          kept_zeros=sum(int((~m).sum()) for m in masks.values()))
        bar = _bar(cfg.epochs * steps if steps else None, cfg.progress and d.rank == 0)
        state: dict = {}
        try:
            for epoch in range(cfg.epochs):
                start = time.perf_counter()
                sums: dict[str, float] = {}
                counts: dict[str, int] = {}  # per part: "ce" only in labelled batches
                n = 0
                batches = in_step(iter(epoch_batches(data, epoch, cfg.seed, d, state)), d, device)
                with _train_mode(trainee):
                    for batch in batches:
                        x, y = self._split(batch)
                        x, y = _to(x, device), _to(y, device)
                        with torch.no_grad(), eval_mode(teacher), collect(teacher) as t_acts:
                            t_out = teacher(*x)
                        s_out, s_feats = model(*x)
                        loss, parts = self.loss(s_out, t_out, y, s_feats, t_acts)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        for p, m in masks.items():  # pruned weights get no update...
                            if p.grad is not None:
                                p.grad.mul_(m)
                        opt.step()
                        if sched is not None and steps:
                            sched.step()
                        with torch.no_grad():
                            for p, m in masks.items():  # ...and stay exactly zero
                                p.mul_(m)
                        for k, v in parts.items():
                            sums[k] = sums.get(k, 0.0) + v
                            counts[k] = counts.get(k, 0) + 1
                        n += 1
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(epoch=epoch + 1, loss=f"{parts['loss']:.4f}", refresh=False)
                if sched is not None and not steps:
                    sched.step()
                record = self._reduce(sums, counts, n, d, device)
                record.update(epoch=epoch + 1, seconds=time.perf_counter() - start)
                history.epochs.append(record)
                if bar is not None:  # one redraw per epoch with the epoch's mean loss
                    bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.4f}")
        finally:
            if bar is not None:
                bar.close()
        return history

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


def _bar(total: int | None, enabled: bool | None):
    if enabled is False:
        return None
    from tqdm.auto import tqdm

    # disable=None: shown only on a terminal, like the pipeline's own bar
    return tqdm(total=total, desc="distill", unit="step", leave=False, mininterval=0.5,
                disable=None if enabled is None else False)


