"""distill's data plumbing: which batches each process trains on.

Under ``torchrun --nproc_per_node=N`` the trainer runs with DistributedDataParallel (gloo
on CPU, nccl on GPUs): :func:`distributed` sets the process group up from torchrun's
environment, :func:`epoch_batches` gives each rank its share of an epoch's batches
(DistributedSampler's split) and :func:`in_step` keeps the ranks in step, so every rank
ends with the same weights. In one process it is a seeded shuffle per epoch.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxpress.errors import InputError

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    created: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1


def distributed() -> Dist:
    """The process group torchrun asked for (set up here if the caller has not)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_available():
        raise InputError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    created = False
    if not dist.is_initialized():
        # nccl needs one GPU per rank; gloo runs anywhere
        use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world
        dist.init_process_group("nccl" if use_nccl else "gloo")
        created = True
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 str(dist.get_backend()), created)


def epoch_batches(data: Any, epoch: int, seed: int, d: Dist, state: dict) -> Iterator[Any]:
    """This rank's batches for one epoch.

    A sequence of batches is split like DistributedSampler: one seeded permutation per
    epoch, the same on every rank, padded to a multiple of the world size, every rank
    taking each world-th entry. A DataLoader is rebuilt around a DistributedSampler. Any
    other iterable is dealt round-robin.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    if isinstance(data, DataLoader):
        if not d.active:
            return iter(data)
        if "loader" not in state:
            if data.batch_size is None:
                raise InputError("distill: under torchrun a DataLoader needs a batch_size (a custom "
                                 "batch_sampler cannot be sharded); pass a list of batches instead")
            sampler = DistributedSampler(data.dataset, d.world, d.rank, shuffle=True, seed=seed)
            state["sampler"] = sampler
            state["loader"] = DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler,
                                         num_workers=data.num_workers, collate_fn=data.collate_fn,
                                         drop_last=data.drop_last, pin_memory=data.pin_memory)
        state["sampler"].set_epoch(epoch)
        return iter(state["loader"])
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, torch.Tensor):
        n = len(data)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        if d.active:
            order += order[: (-n) % d.world]
            order = order[d.rank::d.world]
        return (data[i] for i in order)
    return (b for i, b in enumerate(data) if i % d.world == d.rank)


def steps_per_rank(data: Any, d: Dist) -> int | None:
    try:
        return math.ceil(len(data) / d.world)
    except TypeError:
        return None


def in_step(batches: Iterator[Any], d: Dist, device: torch.device) -> Iterator[Any]:
    """Yield batches while every rank still has one (DDP needs the same number of steps)."""
    if not d.active:
        yield from batches
        return
    import torch.distributed as dist

    flag_device = device if d.backend == "nccl" else torch.device("cpu")
    while True:
        b = next(batches, None)
        flag = torch.tensor([0 if b is None else 1], device=flag_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 0:
            return
        yield b


# -- held-out batches ---------------------------------------------------------------------------

class Picked:
    """The batches of a sequence at ``indices``, in order (a view: nothing is copied)."""

    def __init__(self, data: Any, indices: list[int]):
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.data[self.indices[i]]

    def __iter__(self) -> Iterator[Any]:
        return (self.data[i] for i in self.indices)


class EveryNth:
    """Every ``n``-th batch of a re-iterable (``keep=True``), or all the others."""

    def __init__(self, data: Any, n: int, keep: bool):
        self.data, self.n, self.keep = data, n, keep

    def __iter__(self) -> Iterator[Any]:
        return (b for i, b in enumerate(self.data) if (i % self.n == self.n - 1) == self.keep)


def split_holdout(data: Any, fraction: float, seed: int) -> tuple[Any, Any | None]:
    """(training batches, held-out batches): about ``fraction`` of the batches held out.

    Deterministic for a seed, and it draws from its own ``torch.Generator`` (the global
    random state is never touched). A sequence of batches loses a random subset of
    batches; a DataLoader over a sized dataset is split by examples into two loaders of
    the same settings; any other iterable holds out every ``round(1/fraction)``-th batch.
    Fewer than four batches, or ``fraction == 0``: nothing is held out (``None``).
    """
    from torch.utils.data import DataLoader, RandomSampler, random_split

    if fraction <= 0:
        return data, None
    g = torch.Generator().manual_seed(int(seed) + 7919)  # not the shuffle's stream
    if isinstance(data, DataLoader):
        try:
            n = len(data.dataset)  # type: ignore[arg-type]
            batches = len(data)
        except TypeError:
            n = batches = 0
        if batches >= 4 and data.batch_size is not None:
            k = max(1, round(fraction * n))
            train_set, held_set = random_split(data.dataset, [n - k, k], generator=g)
            common = dict(batch_size=data.batch_size, num_workers=data.num_workers,
                          collate_fn=data.collate_fn, pin_memory=data.pin_memory)
            shuffle = isinstance(data.sampler, RandomSampler)
            return (DataLoader(train_set, shuffle=shuffle, drop_last=data.drop_last, **common),
                    DataLoader(held_set, shuffle=False, **common))
        if batches and batches < 4:
            return data, None
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, torch.Tensor):
        n = len(data)
        if n < 4:
            return data, None
        k = min(max(1, round(fraction * n)), n - 1)
        held = sorted(torch.randperm(n, generator=g)[:k].tolist())
        chosen = set(held)
        return Picked(data, [i for i in range(n) if i not in chosen]), Picked(data, held)
    every = max(2, round(1 / fraction))
    need = max(4, every)  # at least one held-out batch and three to train on
    if sum(1 for _ in zip(range(need), iter(data))) < need:
        return data, None
    return EveryNth(data, every, keep=False), EveryNth(data, every, keep=True)


# -- devices and ranks ---------------------------------------------------------------------

@contextlib.contextmanager
def train_mode(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:  # not model.train(): exported graphs refuse train()
        m.training = True
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


def device_of(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def mean_over_ranks(value: float, d: Dist, device: torch.device) -> float:
    if not d.active:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64,
                     device=device if d.backend == "nccl" else torch.device("cpu"))
    dist.all_reduce(t)
    return float(t.item()) / d.world


def count_batches(batches: Any) -> int:
    if batches is None:
        return 0
    try:
        return len(batches)
    except TypeError:
        return sum(1 for _ in batches)
