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

import numpy as np
import torch


def trim_heap(freed: int | None = None) -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks below its adaptive mmap threshold (a few MB: most layers'
    weights and the temporaries that compute them) in its heaps, resident between the
    blocks still in use: without this, what one layer or step freed still counts while
    the next allocates its own. Replacing a weight trims; so does the pipeline between
    steps.

    ``freed``: about how many bytes the caller's step freed (a layer's weight and the
    temporaries that replaced it): the heap is then trimmed only once such steps add up
    to :data:`TRIM_BYTES` since the last trim. A trim walks the whole heap and hands its
    pages back, which the next allocations fault in again: once per layer it was about
    a tenth of quantize's time on MiniLM (4 ms a call under load), for layers of 0.6-2.4 MB.
    """
    if freed is not None:
        pending = getattr(_TRIM, "pending", 0) + max(int(freed), 0)
        if pending < TRIM_BYTES:
            _TRIM.pending = pending
            return
    _TRIM.pending = 0
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


#: Bytes that steps calling ``trim_heap(freed)`` free before the heap is trimmed: what a
#: pass holds beyond what it must is at most about this much (0.034x GPT-2 124M's bytes).
TRIM_BYTES = 16 << 20
_TRIM = threading.local()


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


# -- rollback records ------------------------------------------------------------------------

#: Elements per block when a rollback record checks, packs or restores a tensor.
_RECORD_BLOCK = 1 << 20


def _flat_pair(t: torch.Tensor, orig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Flat views of ``t`` and ``orig`` in one element order (both laid out alike, or both
    transposed 2-D, as GPT-2's Conv1D weights are), or None."""
    if t.is_contiguous() and orig.is_contiguous():
        return t.reshape(-1), orig.reshape(-1)
    if t.dim() == 2 and t.t().is_contiguous() and orig.t().is_contiguous():
        return t.t().reshape(-1), orig.t().reshape(-1)
    return None


def _zero_mask(t: torch.Tensor, orig: torch.Tensor) -> np.ndarray | None:
    """``t != 0`` packed one bit per element when ``t`` equals ``orig`` wherever it is not
    zero (``orig`` with entries zeroed: a pruned copy), else None. Checked a block at a
    time: temporaries of a few MB whatever the tensor's size."""
    pair = _flat_pair(t, orig)
    if pair is None:
        return None
    ft, fo = pair
    parts = []
    with torch.no_grad():
        for i in range(0, ft.numel(), _RECORD_BLOCK):
            b, o = ft[i:i + _RECORD_BLOCK], fo[i:i + _RECORD_BLOCK]
            kept = b != 0
            if not bool(torch.where(kept, b == o, True).all()):
                return None
            parts.append(np.packbits(kept.numpy(), bitorder="little"))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


class RollbackRecord:
    """A graph whose weights are held as packed masks over the original ones while a pass
    runs on a copy of it, so the copy can free each weight it replaces.

    :meth:`shrink` takes out of ``gm`` every parameter and buffer that equals the original
    tensor of the same name except for entries set to zero (what prune makes), keeping
    one bit per element (1/32 of float32); :meth:`restore` puts them back, rebuilt from the
    originals, equal in value (a zero comes back as +0.0). A GPT-2 pipeline's pruned
    float copy so no longer lives beside the int8 copy quantize builds from it: the
    pipeline's rollback (policy, verification failures, errors' ``last_good``) restores
    the graph before the pass when it needs it.
    """

    def __init__(self, gm: torch.nn.Module):
        self.gm = gm
        self.entries: list[tuple] = []

    @classmethod
    def shrink(cls, gm: torch.nn.Module, originals: dict[str, torch.Tensor]) -> "RollbackRecord":
        rec = cls(gm)
        masks: dict[int, tuple] = {}  # a tensor tied under several names: one mask
        for mod_name, module in gm.named_modules(remove_duplicate=False):
            for slot in (module._parameters, module._buffers):
                for attr, t in list(slot.items()):
                    name = f"{mod_name}.{attr}" if mod_name else attr
                    orig = originals.get(name)
                    if (t is None or orig is None or t is orig or t.dtype != orig.dtype
                            or t.shape != orig.shape or t.numel() < _RECORD_BLOCK // 16
                            or t.device.type != "cpu" or t.is_inference()):
                        continue
                    hit = masks.get(id(t))
                    if hit is None:
                        if t.untyped_storage().data_ptr() == orig.untyped_storage().data_ptr():
                            continue
                        mask = _zero_mask(t, orig)
                        if mask is None:
                            continue
                        hit = masks[id(t)] = (mask, orig, tuple(t.shape), t.stride(),
                                              isinstance(t, torch.nn.Parameter), t.requires_grad,
                                              len(masks))
                    rec.entries.append((slot, attr, hit))
        for slot, attr, _ in rec.entries:
            slot[attr] = None
        return rec

    def restore(self) -> None:
        """Put the weights back into the graph (once; later calls do nothing)."""
        made: dict[int, torch.Tensor] = {}
        for slot, attr, (mask, orig, shape, stride, param, grad, key) in self.entries:
            t = made.get(key)
            if t is None:
                t = torch.empty_strided(shape, stride, dtype=orig.dtype)
                ft, fo = _flat_pair(t, orig)
                with torch.no_grad():
                    for i in range(0, ft.numel(), _RECORD_BLOCK):
                        n = min(_RECORD_BLOCK, ft.numel() - i)
                        bits = np.unpackbits(mask[i // 8:(i + n + 7) // 8], count=n,
                                             bitorder="little").astype(bool)
                        ft[i:i + n].copy_(fo[i:i + n]).masked_fill_(~torch.from_numpy(bits), 0.0)
                if param:
                    t = torch.nn.Parameter(t, requires_grad=grad)
                made[key] = t
            slot[attr] = t
        self.entries = []

    @property
    def pending(self) -> bool:
        return bool(self.entries)


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


__all__ = ["trim_heap", "RollbackRecord", "runtime_caches", "caches_enabled", "stored_bytes", "sparsity", "nonzeros", "remember_nonzeros",
           "tensor_memo"]
