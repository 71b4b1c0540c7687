"""What tensors cost and what memory a run holds: sizes, counts remembered per tensor,
runtime caches, and handing freed heap pages back to the OS.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
import weakref
from typing import Any, Iterator

import torch

def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks below its adaptive mmap threshold (a few MB: most layers'
    weights and the temporaries that compute them) in its heaps, resident between the
    blocks still in use: without this, what one layer or step freed still counts while
    the next allocates its own. Replacing a weight trims; so does the pipeline between
    steps.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return None


_CACHES = threading.local()


@contextlib.contextmanager
def runtime_caches(enabled: bool) -> Iterator[None]:
    """Allow or forbid runtime modules to keep decoded or prepacked copies of their weights
    (``cache_weight``, an integer kernel's prepacked weight) while the block runs in this
    thread; copies made before stay in use. The pipeline runs with caches off: through a
    graph, a copy per layer would pile up on top of the graph before the pass, which it
    keeps until the pass is verified. The first call after the pipeline builds them."""
    stack = _CACHES.__dict__.setdefault("stack", [])
    stack.append(bool(enabled))
    try:
        yield
    finally:
        stack.pop()


def caches_enabled() -> bool:
    """False inside ``runtime_caches(False)`` (in this thread)."""
    stack = getattr(_CACHES, "stack", None)
    return stack[-1] if stack else True


# -- accounting ----------------------------------------------------------------------------

def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor in ``module``'s state_dict, each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in module.state_dict(keep_vars=True).values():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def sparsity(t: torch.Tensor) -> float:
    """Fraction of exact zeros in ``t``."""
    return 1.0 - nonzeros(t) / max(t.numel(), 1)


def nonzeros(t: torch.Tensor) -> int:
    """``count_nonzero(t)``, remembered while ``t`` lives unwritten (:func:`tensor_memo`)."""
    return tensor_memo(t, "nonzeros", lambda x: int(torch.count_nonzero(x)))


def remember_nonzeros(t: torch.Tensor, count: int) -> None:
    """Record ``count`` as :func:`nonzeros` of ``t``, for a pass that knows it from how it
    built ``t`` (prune: the k entries it zeroed), so nobody counts the tensor again."""
    tensor_memo(t, "nonzeros", lambda _: int(count))


_MEMO: dict[tuple, tuple[weakref.ref, Any]] = {}


def tensor_memo(t: torch.Tensor, name: str, compute):
    """``compute(t)``, remembered while the tensor lives and is not written.

    A pipeline measures its graph before and after every pass (counts, digests), and most
    tensors are the same on both sides: on a 124M-parameter model recounting and rehashing
    them cost seconds a pass. The entry is keyed by the data's address, geometry, dtype
    and version counter (bumped by every write in place) and dies with the tensor that
    owns the data (a view's base), so an address reused by a new tensor is never a hit.
    """
    if t.is_inference() or t.device.type == "meta":  # no version counter / no data
        return compute(t)
    key = (name, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version)
    hit = _MEMO.get(key)
    if hit is not None and hit[0]() is not None:
        return hit[1]
    value = compute(t)
    owner = t._base if t._base is not None else t
    _MEMO[key] = (weakref.ref(owner, lambda _, k=key: _MEMO.pop(k, None)), value)
    return value


__all__ = ["trim_heap", "runtime_caches", "caches_enabled", "stored_bytes", "sparsity", "nonzeros", "remember_nonzeros",
           "tensor_memo"]
