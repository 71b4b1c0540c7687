"""distill's data plumbing: which batches each process trains on.

Under ``torchrun --nproc_per_node=N`` the trainer runs with DistributedDataParallel (gloo
on CPU, nccl on GPUs): :func:`distributed` sets the process group up from torchrun's
environment, :func:`epoch_batches` gives each rank its share of an epoch's batches
(DistributedSampler's split) and :func:`in_step` keeps the ranks in step, so every rank
ends with the same weights. In one process it is a seeded shuffle per epoch.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

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
