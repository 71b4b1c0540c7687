"""prune: zero the weights of smallest magnitude.

``prune{threshold=0.01}`` zeroes every weight with ``|w| < threshold`` (the seed article's
rule, applied element-wise to the magnitude). ``prune{sparsity=0.9}`` zeroes exactly
``round(0.9 * n)`` of the ``n`` weights of the selected layers together
(``scope="adaptive"``, the default: the lowest LAMP scores across layers, which do not
depend on a layer's scale, see :func:`_lamp_scores`; the smallest magnitudes across layers
with ``scope="global"``) or in each selected layer (``scope="layer"``). Either way a linear
or conv layer keeps at least ``min_per_unit`` weights per output unit on average, so no
layer is emptied. Ties at the cut are broken in order, so the count is exact.

``criterion="activation"`` ranks a weight by its magnitude times the root mean square of
the input column it multiplies on the calibration batches (Wanda, Sun et al. 2023): what a
weight adds to its output is ``w·x``, and a weight on an input that is almost always zero
(a border pixel, a dead unit) costs nothing to remove, however large it is; plain
magnitudes keep such weights because nothing ever trained them down (28% of the weights
the default cut kept in the first layer of a 64-96-48-10 digits MLP at 95% sat on its 12
near-blank pixels). It is not the default: measured after recovery it helped narrow
MLPs and CNNs on average (not in their worst case) and hurt a 40-wide transformer
(bench/case_recovery.py; README, Distillation).

The zeros stay in the dense weight where later passes (share, quantize) and the saver
see them; the artifact stores pruned layers sparse, so the file shrinks. The cut (the
k-th smallest magnitude) is found by selection, not sorting: a strided sample brackets
it, one pass counts what lies below the bracket and keeps the few percent inside, whose
k-th value is exact. That pass works a block of 65,536 weights at a time (its
temporaries stay in cache), in one layer or across a global scope's layers, so it never
concatenates the model's weights or copies them.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fxpress.errors import MissingDataError, OptionError
from fxpress.graph.capture import clone_structure
from fxpress.graph.memory import remember_nonzeros, sparsity
from fxpress.graph.weights import select, unique_weights, weighted_ops
from fxpress.graph.fused import fused_weights
from fxpress.graph.weights import CONV, LINEAR
from fxpress.passes.base import (Pass, PassContext, PassResult, PassTraits, Tolerance,
                                 check_glob_matches, check_op_kinds, option)
from fxpress.passes.gradual import cubic_schedule
from fxpress.passes.watch import WatchInterpreter

_NONE = type(None)

#: the sparsities ``prune`` tries when given neither threshold nor sparsity, rising
AUTO_LADDER = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


#: Elements per block. Large layers (GPT-2's 38M-entry tied embedding) are processed block
#: by block, so temporaries stay small whatever the layer size. (Blocks of a few MB: the
#: allocator keeps freed blocks of the size of the largest it has recently freed.)
BLOCK = 1 << 20


def _flat(w: torch.Tensor) -> torch.Tensor:
    """A flat view of ``w``'s storage order (pruning is element-wise: order only breaks ties)."""
    w = w.detach()
    if not w.is_contiguous() and w.dim() == 2 and w.t().is_contiguous():
        w = w.t()  # transposed views (GPT-2's Conv1D) are flattened without a copy
    return w.reshape(-1)


def _empty_flat(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(an uninitialised tensor shaped like ``t``, a flat VIEW of it in :func:`_flat`'s
    order): a flat reshape of a tensor in another layout (a channels_last conv weight)
    would be a copy, and what is written to it lost."""
    if not t.is_contiguous() and t.dim() == 2 and t.t().is_contiguous():
        res = torch.empty_like(t)  # transposed: _flat views its storage
    else:
        res = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return res, res.view(-1) if res.is_contiguous() else res.t().view(-1)


def _in_layout_of(res: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``res`` (contiguous, or transposed like ``t``) in ``t``'s memory layout (a
    channels_last conv weight stays channels_last: its kernels, and their rounding, stay)."""
    if res.stride() == t.stride():
        return res
    return torch.empty_like(t).copy_(res)


def _blocks(tensors: list[torch.Tensor]):
    for t in tensors:
        flat = _flat(t)
        for i in range(0, flat.numel(), BLOCK):
            yield flat[i:i + BLOCK]


def count_below(tensors: list[torch.Tensor], v: float) -> int:
    """How many entries of ``tensors`` have magnitude < ``v``."""
    return sum(int((b.abs() < v).sum()) for b in _blocks(tensors))


def kth_smallest_magnitude(tensors: list[torch.Tensor], k: int, bins: int = 4096,
                           max_candidates: int = 1 << 22) -> float:
    """The ``k``-th smallest magnitude (1-based) over several tensors, without joining them.

    Histograms narrow the value range until the few candidates left are sorted; only one
    block of magnitudes exists at a time, so no copy of the weights is needed.
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    if total <= max_candidates:
        a = torch.cat([b.abs().float() for b in _blocks(tensors)])
        return float(torch.kthvalue(a, k).values)
    full = (min(float(b.abs().min()) for b in _blocks(tensors)),
            max(float(b.abs().max()) for b in _blocks(tensors)))
    lo, hi = full
    while True:
        if lo == hi:
            return lo
        below = inside = 0
        for b in _blocks(tensors):
            a = b.abs()
            below += int((a < lo).sum())
            inside += int(((a >= lo) & (a <= hi)).sum())
        if inside <= max_candidates:
            cand = torch.cat([a[(a >= lo) & (a <= hi)] for a in (b.abs() for b in _blocks(tensors))])
            idx = k - below - 1
            if 0 <= idx < cand.numel():
                return float(torch.kthvalue(cand.float(), idx + 1).values)
            # the histogram's approximate edges lost the k-th value: start over, exactly
            lo, hi, max_candidates = full[0], full[1], total
            continue
        hist = torch.zeros(bins, dtype=torch.float64)
        for b in _blocks(tensors):
            hist += torch.histc(b.abs().float(), bins, lo, hi).double()
        cum = torch.cumsum(hist, 0) + below
        i = min(int(torch.searchsorted(cum, torch.tensor(float(k), dtype=torch.float64))), bins - 1)
        width = (hi - lo) / bins
        # widen by one bin on each side: histc's float edges are approximate, the next
        # round's counts are exact
        new_lo, new_hi = lo + max(i - 1, 0) * width, min(lo + (i + 2) * width, hi)
        if (new_lo, new_hi) == (lo, hi):
            bins *= 4
        lo, hi = new_lo, new_hi


def _shrink(src: torch.Tensor, v, out: torch.Tensor) -> bool:
    """Write ``src`` with every ``|w| < v`` zeroed (as +0.0) into ``out``; False (nothing
    written) where this route does not apply. One vectorised pass (aten's hardshrink at
    the float just below ``v``, which zeroes ``|w| <= lambda``): selecting by a bool mask
    (torch.where, masked_fill) ran at 17 ns a weight here, 50-90x a copy of the layer."""
    if src.dtype not in (torch.float32, torch.float64):
        return False
    v = torch.as_tensor(v, dtype=src.dtype)
    if not 0 < float(v) < math.inf:
        return False
    lam = float(torch.nextafter(v, v.new_zeros(())))
    torch.ops.aten.hardshrink.out(src, lam, out=out)
    return True


def zero_below(tensors: list[torch.Tensor], v: float, take_equal: int = 0) -> list[torch.Tensor]:
    """New tensors with every ``|w| < v`` zeroed, plus the first ``take_equal`` entries
    equal to ``v`` (in order across ``tensors``), so a target count is met exactly."""
    out = []
    for t in tensors:
        res, dst = _empty_flat(t)
        src = _flat(t)
        for i in range(0, src.numel(), BLOCK):
            b = src[i:i + BLOCK]
            ties = None
            if take_equal > 0:
                ties = torch.nonzero(b.abs() == v).flatten()[:take_equal]
                take_equal -= ties.numel()
            if _shrink(b, v, dst[i:i + BLOCK]):
                if ties is not None:
                    dst[i:i + BLOCK][ties] = 0
                continue
            mask = b.abs() < v
            if ties is not None:
                mask[ties] = True
            dst[i:i + BLOCK] = b.masked_fill(mask, 0)
        out.append(_in_layout_of(res, t))
    return out


#: Magnitudes sampled to bracket a layer's k-th smallest (see :func:`_kth_by_selection`).
SAMPLE = 1 << 15
#: Weights per block of the selection's counting pass: the block's magnitudes and masks
#: (about 400 KB) stay in a core's L2 cache, so the pass reads each weight from memory
#: once, and its half-dozen elementwise steps run on cached data.
SELECT_BLOCK = 1 << 16


def _zero_smallest_one(t: torch.Tensor, k: int) -> tuple[torch.Tensor, int] | None:
    """:func:`zero_smallest` of one tensor (of any size) by selection, without sorting
    it (:func:`_kth_by_selection`): a pass that counts what lies below the sample's
    bracket and keeps what lies in it, then one vectorised pass that writes the pruned
    copy (:func:`_shrink`), the ties at the cut zeroed by position. Returns (pruned copy,
    its count of zeros), or None when the bracket misses (the caller falls back to the
    exact search). Nothing of the layer's size is allocated but the result."""
    found = _kth_by_selection([t], k, ties=True)
    if found is None:
        return None
    v, _below, ties = found
    flat = _flat(t)
    res, dst = _empty_flat(t)
    if _shrink(flat, v, dst):
        if ties.numel():
            dst[ties] = 0
    else:
        mask = flat.abs() < v
        mask[ties] = True
        dst.copy_(flat.masked_fill(mask, 0))
    # every zero of the input has magnitude 0 <= v: with v > 0 exactly k entries are zero
    zeros = k if float(v) > 0 else dst.numel() - int(torch.count_nonzero(dst))
    return _in_layout_of(res, t), zeros


def _kth_by_selection(tensors: list[torch.Tensor], k: int, ties: bool = False):
    """The ``k``-th smallest magnitude across ``tensors`` and how many lie below it, by
    selection, a block at a time (a layer of any size, or all of a global scope's
    layers, without joining them or a copy of them): the k-th of a strided sample,
    widened by four standard deviations of a sample quantile's rank, brackets the cut;
    one pass counts what lies below the bracket and keeps what lies in it (a few
    percent), whose k-th value is then exact. None when the bracket misses.

    Returns ``(float(v), count below v)``; with ``ties``, ``(v as a 0-d tensor of the
    weights' dtype, count below v, flat positions (in the tensors' order, end to end) of
    the first ``k - below`` entries equal to v)``: zeroing those too makes the count
    exact (every entry equal to v is a candidate: found among them, not by another pass)."""
    n = sum(t.numel() for t in tensors)
    step = max(1, n // SAMPLE)
    sample = torch.cat([_flat(t)[::step].abs().float() for t in tensors]).numpy()
    m = sample.size
    rank, spread = k / n * m, 4 * math.sqrt(m * (k / n) * (1 - k / n)) + 2
    lo_i, hi_i = max(int(rank - spread), 0), min(int(rank + spread) + 1, m - 1)
    # both order statistics in one partial sort (numpy's introselect; a copy of the sample)
    part = np.partition(sample, (lo_i, hi_i))
    lo_v, hi_v = float(part[lo_i]), float(part[hi_i])  # float32 values, exact as floats
    n_below, cand, where = 0, [], []
    size = min(n, SELECT_BLOCK)
    # on one thread numpy's comparison, flatnonzero and count_nonzero ran 2.6-6x torch's
    # here (CPU time, 2.4M weights), its partial sort 1.9x torch.kthvalue;
    # the block's buffers are reused (a fresh temporary per block is fresh pages)
    bufs: dict = {}
    offset = 0
    for t in tensors:
        flat = _flat(t)
        exact = flat.dtype in (torch.float32, torch.float64)  # else compared as float32
        dtype = np.float64 if flat.dtype == torch.float64 else np.float32
        if dtype not in bufs:
            bufs[dtype] = (np.empty(size, dtype), np.empty(size, bool), np.empty(size, bool))
        a_buf, lt_buf, in_buf = bufs[dtype]
        for i in range(0, flat.numel(), SELECT_BLOCK):
            b = flat[i:i + SELECT_BLOCK]
            b = b.numpy() if exact else b.float().numpy()
            j = b.size
            a = np.abs(b, out=a_buf[:j])
            lt = np.less(a, lo_v, out=lt_buf[:j])
            n_below += int(np.count_nonzero(lt))
            ins = np.less_equal(a, hi_v, out=in_buf[:j])
            ins ^= lt  # below lies inside [0, hi]: what is left is [lo, hi]
            pos = np.flatnonzero(ins)
            cand.append(a[pos])
            if ties:
                where.append(pos + (offset + i))
        offset += flat.numel()
    cand = np.concatenate(cand)
    idx = k - n_below
    if not 1 <= idx <= cand.size:
        return None
    v = np.partition(cand, idx - 1)[idx - 1]  # the idx-th smallest
    below = n_below + int(np.count_nonzero(cand < v))
    if not ties:
        return float(v), below
    take = k - below
    pos = np.concatenate(where)[np.flatnonzero(cand == v)[:take]]
    return torch.tensor(float(v), dtype=tensors[0].dtype), below, torch.from_numpy(pos)


def zero_smallest(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """New tensors with exactly the ``k`` smallest magnitudes across ``tensors`` zeroed.

    >>> zero_smallest([torch.tensor([0.3, -0.1, 0.2, -0.4])], 2)
    [tensor([ 0.3000,  0.0000,  0.0000, -0.4000])]
    """
    total = sum(t.numel() for t in tensors)
    if k <= 0:
        return list(tensors)
    if k >= total:
        return [torch.zeros_like(t) for t in tensors]
    if len(tensors) == 1:
        out = _zero_smallest_one(tensors[0], k)
        if out is not None:
            return [out[0]]
    found = _kth_by_selection(tensors, k)
    if found is None:  # the sample's bracket missed (about once in 10^4): the exact search
        v = kth_smallest_magnitude(tensors, k)
        found = v, count_below(tensors, v)
    v, below = found
    return zero_below(tensors, v, k - below)


def layer_prune_count(w: torch.Tensor, sparsity: float, min_per_unit: int, kind: str) -> int:
    """How many of ``w``'s weights a per-layer prune to ``sparsity`` zeroes: ``round(s·n)``,
    but a linear or conv layer keeps at least ``min_per_unit`` weights per output unit
    (row of ``w``) on average. At 95% that only binds below a fan-in of 40, e.g. the
    first conv of a one-channel image (fan-in 9), which 95% would leave with 14 of 288
    weights: most filters empty, and no recovery of kept weights wins that back.

    >>> layer_prune_count(torch.ones(32, 1, 3, 3), 0.95, 2, "conv"), layer_prune_count(torch.ones(256, 64), 0.95, 2, "linear")
    (224, 15565)
    """
    k = round(sparsity * w.numel())
    if min_per_unit and kind in (LINEAR, CONV) and w.dim() >= 2:
        k = min(k, max(0, w.numel() - min_per_unit * w.shape[0]))
    return k


def global_prune(ops: list, sparsity: float, min_per_unit: int,
                 scaled: list[torch.Tensor | None] | None = None):
    """Yield ``(op, pruned weight)`` for every op: ``round(sparsity·n)`` of all their ``n``
    weights zeroed, smallest magnitudes first across every layer, except that no layer
    goes below its floor (:func:`layer_prune_count` at sparsity 1: ``min_per_unit``
    weights per output unit). A layer the global cut would take below its floor keeps
    exactly its floor and the cut is found again over the other layers, so the total
    count stays exact (unless every layer is at its floor).

    The cut is found without joining the layers (:func:`_kth_by_selection`), and one
    layer's copy exists at a time when the caller sets each weight as it comes: global
    scope costs the memory of the per-layer one. One cut suffices unless a floor binds;
    each further round fixes at least one layer. ``scaled``: per op, the tensor to rank
    and prune instead of its weight (a weight times its input scales), or None.
    """
    weights = [s if scaled is not None and s is not None else op.weight()
               for op, s in zip(ops, scaled or [None] * len(ops))]
    caps = [layer_prune_count(w, 1.0, min_per_unit, op.kind) for op, w in zip(ops, weights)]
    free = list(range(len(ops)))
    k = round(sparsity * sum(w.numel() for w in weights))
    while free:
        pool = [weights[i] for i in free]
        if k <= 0:
            for i in free:
                yield ops[i], weights[i]
            return
        if k >= sum(caps[i] for i in free):  # every layer at its floor
            for i in free:
                yield ops[i], zero_smallest([weights[i]], caps[i])[0]
            return
        found = _kth_by_selection(pool, k)
        if found is None:  # the sample's bracket missed: the exact search
            v = kth_smallest_magnitude(pool, k)
            found = v, count_below(pool, v)
        v, below = found
        over = [i for i in free if count_below([weights[i]], v) > caps[i]]
        if not over:
            ties = k - below  # entries equal to the cut, taken in order across the layers
            for i in free:
                w = weights[i]
                take = min(ties, int((w.abs() == v).sum())) if ties > 0 else 0
                ties -= take
                yield ops[i], zero_below([w], v, take)[0]
            return
        for i in over:
            yield ops[i], zero_smallest([weights[i]], caps[i])[0]
            k -= caps[i]
        free = [i for i in free if i not in over]


#: Most weights per layer whose LAMP scores are computed (:func:`adaptive_counts`); a
#: larger layer is scored on every n-th weight (a strided view, no copy of the layer),
#: which places its count within about n weights.
LAMP_SAMPLE = 1 << 16


def _lamp_scores(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A layer's LAMP scores in ascending order (Lee et al. 2021, "Layer-adaptive sparsity
    for the magnitude-based pruning"): for the weights sorted by magnitude, ``w_u² / sum of
    w_v² over v >= u``. The score rises with the magnitude within a layer and does not
    change when the layer is scaled, so one cut across layers compares layers by the shape
    of their magnitude distributions, not by their scale (a conv before a BatchNorm, whose
    scale is arbitrary, is not emptied). Returns (scores, stride): a layer over
    :data:`LAMP_SAMPLE` weights is scored on every ``stride``-th weight, each standing for
    ``stride`` weights in the sums."""
    flat = _flat(w)
    stride = max(1, -(-flat.numel() // LAMP_SAMPLE))
    # sorted as float32 magnitudes (the order of the squares), by numpy: torch's CPU sort
    # took 19 ms for 65,536 floats, a second of GPT-2's prune
    a = torch.from_numpy(np.sort(flat[::stride].abs().float().numpy())).double().square()
    total = a.flip(0).cumsum(0).flip(0) * stride
    return torch.where(total > 0, a / total.clamp_min(1e-300), torch.zeros_like(a)), stride


def _weighted_cut(lamp: list[tuple[torch.Tensor, int]], k: int) -> torch.Tensor:
    """The smallest score ``v`` among ``lamp``'s sorted score lists (each entry standing for
    ``stride`` weights) whose scores ``<= v`` stand for at least ``k`` weights; the largest
    score if none does. By selection, not sorting: a binary search on the scores' bit
    patterns (non-negative doubles order as their int64 bits), each step a search in every
    layer's sorted list, so nothing of the size of all layers' scores is built."""
    def count(v: torch.Tensor) -> int:
        return sum(int(torch.searchsorted(s, v, right=True)) * stride for s, stride in lamp)

    top = max(s[-1] for s, _ in lamp)
    if count(top) < k:
        return top
    lo = 0  # count(bits <= lo - 1) < k <= count(bits <= hi)
    hi = int(top.view(torch.int64))
    while lo < hi:
        mid = (lo + hi) // 2
        if count(torch.tensor(mid, dtype=torch.int64).view(torch.float64)) >= k:
            hi = mid
        else:
            lo = mid + 1
    return torch.tensor(hi, dtype=torch.int64).view(torch.float64)


def adaptive_counts(weights: list[torch.Tensor], k: int, caps: list[int],
                    scales: list[torch.Tensor | None] | None = None) -> list[int]:
    """How many weights of each layer ``scope="adaptive"`` zeroes: ``k`` in all, the lowest
    LAMP scores (:func:`_lamp_scores`) across layers first, no layer beyond its cap
    (a layer the cut would take past it gets its cap, and the cut is placed again over
    the others). ``scales``: per layer, a factor broadcast over its weight before scoring
    (:func:`input_scales`), or None."""
    scales = scales or [None] * len(weights)
    lamp = [_lamp_scores(w if s is None else w * s) for w, s in zip(weights, scales)]
    sizes = [w.numel() for w in weights]
    counts = [0] * len(weights)
    free = list(range(len(weights)))
    while free and k > 0:
        if k >= sum(caps[i] for i in free):
            for i in free:
                counts[i] = caps[i]
            break
        cut = _weighted_cut([lamp[i] for i in free], k)
        got = {i: min(sizes[i], int(torch.searchsorted(lamp[i][0], cut, right=True)) * lamp[i][1])
               for i in free}
        over = [i for i in free if got[i] > caps[i]]
        if not over:
            residual = k - sum(got.values())  # sampled layers and ties: make the total exact
            for i in sorted(free, key=lambda i: -sizes[i]):
                step = max(-got[i], min(residual, caps[i] - got[i]))
                got[i] += step
                residual -= step
            for i in free:
                counts[i] = got[i]
            break
        for i in over:
            counts[i] = caps[i]
            k -= caps[i]
        free = [i for i in free if i not in over]
    return counts


class _ColumnRMS(WatchInterpreter):
    """Runs a graph and keeps, for chosen nodes (the inputs of weighted ops), the sum of
    squares of every input column (linear: the last dimension; conv: the channels) over
    every batch, and how many values each sum holds."""

    def __init__(self, gm, nodes: dict):
        super().__init__(gm, nodes)  # node -> kind of the op it feeds
        self.sums: dict = {}
        self.counts: dict = {}

    def watched(self, n, out):
        kind = self.watch[n]
        if isinstance(out, torch.Tensor) and out.is_floating_point() \
                and out.dim() >= 1 and out.numel():
            x = out.detach().float()
            if kind == CONV and x.dim() >= 3:
                sq = x.square().transpose(0, 1).reshape(x.shape[1], -1).sum(1)
                count = x.numel() // x.shape[1]
            else:
                sq = x.square().reshape(-1, x.shape[-1]).sum(0)
                count = x.numel() // x.shape[-1]
            self.sums[n] = sq + self.sums[n] if n in self.sums else sq
            self.counts[n] = self.counts.get(n, 0) + count


def input_scales(gm, ops: list, batches: list) -> dict[str, torch.Tensor]:
    """Per op (by weight name), the root mean square of each of its input columns over
    ``batches``, shaped to broadcast over its weight ``[out, in, *kernel]``. Ops it does
    not apply to are left out (embeddings, grouped and transposed convs, fused weights,
    inputs that are not one float tensor)."""
    nodes = {}
    for op in ops:
        n = getattr(op, "_input", None)
        if op.kind in (LINEAR, CONV) and isinstance(n, torch.fx.Node):
            nodes.setdefault(n, op.kind)
    if not nodes:
        return {}
    rec = _ColumnRMS(gm, nodes).record(batches)
    out = {}
    for op in ops:
        n = getattr(op, "_input", None) if op.kind in (LINEAR, CONV) else None
        spec = getattr(op, "spec", None) or {}
        if n not in rec.sums or spec.get("transposed") or spec.get("groups", 1) != 1:
            continue
        w = op.weight()
        rms = (rec.sums[n] / max(rec.counts[n], 1)).sqrt()
        if w.dim() < 2 or rms.numel() != w.shape[1] or not bool(torch.isfinite(rms).all()):
            continue
        out[op.name] = rms.reshape(1, -1, *([1] * (w.dim() - 2))).to(w.dtype)
    return out


def protect_units(rank: torch.Tensor, m: int) -> torch.Tensor:
    """A copy of ``rank`` (what ranks a layer's weights, ``[out, ...]``) in which the ``m``
    largest magnitudes of every output unit (row) are +inf, so no cut takes them: every unit
    keeps ``m`` inputs (``floor="unit"``). A row with fewer than ``m`` nonzero entries
    protects only those (a unit already dead stays dead).

    >>> protect_units(torch.tensor([[0.1, -0.3, 0.2], [0.0, 0.0, 0.5]]), 1)
    tensor([[0.1000,    inf, 0.2000],
            [0.0000, 0.0000,    inf]])
    """
    rows = rank.detach().reshape(rank.shape[0], -1)
    out = rows.abs().float() if rank.dtype != torch.float64 else rows.abs()
    top = torch.topk(out, min(m, out.shape[1]), dim=1).indices
    keep = torch.zeros_like(out, dtype=torch.bool).scatter_(1, top, True) & (out != 0)
    return out.masked_fill_(keep, math.inf).reshape(rank.shape)


def _masked_by(w: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """``w`` with zeros where ``pruned`` (a pruned copy of a scaled ``w``) has them."""
    return w.masked_fill(pruned == 0, 0)


class Prune(Pass):
    """Magnitude pruning by threshold or target sparsity."""

    name = "prune"
    summary = "Zero the smallest-magnitude weights: |w| < threshold, or a target sparsity per layer or global."
    traits = PassTraits(tolerance=Tolerance(min_cosine=0.9, min_top1=0.9), replaces_tensors=True)

    threshold = option(None, "zero every weight with |w| < threshold", type=(float, _NONE), low=0.0)
    sparsity = option(None, "fraction of weights to zero (0 <= s < 1); with neither threshold nor "
                      "sparsity, the highest of 0.1 ... 0.9 that keeps the tolerance",
                      type=(float, _NONE),
                      low=0.0, high=1.0, high_open=True)
    scope = option("adaptive", "'adaptive': the sparsity of all selected layers together, cut on "
                   "LAMP scores (a weight's square over the sum of the squares of its layer's "
                   "weights at least as large: no layer's scale matters, a layer of a few large "
                   "weights keeps more); 'global': the same on plain magnitudes; 'layer': each "
                   "layer reaches the sparsity", choices=("adaptive", "global", "layer"))
    include = option(["*"], "glob patterns on weight or layer names to prune")
    exclude = option([], "glob patterns to leave alone")
    ops = option(["linear", "conv"], "kinds of weighted ops to prune (linear, conv, embedding)")
    steps = option(1, "reach the sparsity in this many stages on Zhu & Gupta's cubic schedule, "
                   "each followed by the next recovery step (distill); not given: 3 stages for "
                   "a sparsity of 0.9 or more, or for the sparsity it chooses itself (none "
                   "given), when a distill without epochs follows and the run has train_data "
                   "(steps=1: one cut)", low=1, high=20)
    criterion = option("magnitude", "what ranks the weights with sparsity=...: 'magnitude' "
                       "(|w|) or 'activation' (|w| times the root mean square of its input "
                       "column on the calibration batches: Wanda, Sun et al. 2023; needs "
                       "calibration)", choices=("magnitude", "activation"))
    min_per_unit = option(2, "each linear/conv layer keeps on average at least this many "
                          "weights per output unit, so no layer is emptied (a first conv over one "
                          "channel, an 8-wide input projection); 0: the sparsity exactly", low=0)
    floor = option("layer", "where min_per_unit holds: 'layer': each linear/conv layer keeps "
                   "that many weights per output unit on average (the cut may leave a unit "
                   "none); 'unit': every output unit keeps its min_per_unit largest weights, the "
                   "rest of the layer's count going by rank", choices=("layer", "unit"))

    def check_options(self) -> None:
        if self.steps > 1 and self.threshold is not None:
            raise OptionError(self.name, "steps", "needs sparsity=... (or neither: the sparsity "
                              "it chooses itself); a threshold has no schedule")
        if self.threshold is not None and self.sparsity is not None:
            raise OptionError(self.name, "sparsity", "give exactly one of threshold=... or sparsity=...")
        if self.threshold is not None and "criterion" in self._given:
            raise OptionError(self.name, "criterion", "only applies with sparsity=...; a "
                              "threshold is on |w|")
        if self.threshold is not None and "scope" in self._given:
            raise OptionError(self.name, "scope", "only applies with sparsity=...; a threshold "
                              "is the same in every layer")
        check_op_kinds(self.name, self.ops)

    def _criterion(self, ctx: PassContext) -> str:
        """'activation' or 'magnitude': what ranks the weights in this run."""
        if self.threshold is not None:
            return "magnitude"
        if self.criterion == "activation" and not ctx.calibration:
            raise MissingDataError(self.name, "criterion='activation' ranks weights by their "
                                   "inputs on the calibration batches; pass calibration=[(x,), "
                                   "...] or use criterion='magnitude'")
        return self.criterion

    def _run_auto(self, gm, ctx: PassContext) -> PassResult:
        """Neither threshold nor sparsity: the highest sparsity of :data:`AUTO_LADDER` whose
        one-shot result keeps this pass's own tolerance, tightened by a quarter of its slack
        (the search sees at most 4 calibration batches, the verifier all of them)."""
        chosen, info = self._choose(gm, ctx)
        result = self._cut(gm, ctx, chosen)
        result.stats["auto_sparsity"] = info
        return result

    def _choose(self, gm, ctx: PassContext) -> tuple[float, dict]:
        """The sparsity :meth:`_run_auto` cuts to, and how it was found (its stats)."""
        from fxpress.passes.verify import misses, one_shot_check

        before, strict = one_shot_check(self.tol, gm, ctx)
        batches = before.batches
        tried: dict[float, float] = {}  # sparsity -> the cosine the tolerance reads
        kept: list[float] = []
        lo, hi = 0, len(AUTO_LADDER)  # AUTO_LADDER[:lo] keep the tolerance, [hi:] do not
        while lo < hi:  # the ladder rises: the first setting that misses, by bisection
            mid = (lo + hi) // 2
            s = AUTO_LADDER[mid]
            trial = self._cut(clone_structure(gm), ctx, s).module
            m = before.compare_to_reference(before.run(trial))
            tried[s] = round(m.value_for("min_cosine"), 6)
            if misses(strict, m):
                hi = mid
            else:
                lo = mid + 1
                kept.append(s)
            del trial
        chosen = AUTO_LADDER[lo - 1] if lo else 0.0
        return chosen, {
            "chosen": chosen, "tried": dict(sorted(tried.items())), "kept": sorted(kept),
            "why": ("no threshold or sparsity given: the highest sparsity on the ladder "
                    f"{list(AUTO_LADDER)} whose outputs on {len(batches)} calibration "
                    "batch(es) keep this pass's tolerance with a quarter of its slack to spare"
                    + ("" if chosen else "; none did, so nothing was pruned"))}

    def _cut(self, gm, ctx: PassContext, sparsity: float) -> PassResult:
        """This prune's options with ``sparsity`` (the automatic choice, or a stage of it)."""
        given = {k: v for k, v in self._given.items() if k not in ("sparsity", "steps")}
        return Prune(**given, sparsity=sparsity).run(gm, ctx)

    def _run_auto_stage(self, gm, ctx: PassContext) -> PassResult:
        """Stage ``k`` of ``n`` of an automatic sparsity staged by the pipeline
        (:func:`fxpress.passes.gradual.expand`): the first stage chooses the sparsity as
        :meth:`_run_auto` does, on the graph as it is then (the one cut's choice), and every
        stage cuts to its point of the cubic schedule towards it."""
        k, n, chosen = self.auto_stage
        info = None
        if "sparsity" not in chosen:  # the first stage (or a stage run on its own)
            chosen["sparsity"], info = self._choose(gm, ctx)
        schedule = [round(s, 4) for s in cubic_schedule(chosen["sparsity"], n)]
        result = self._cut(gm, ctx, schedule[k - 1])
        result.stats["auto_stage"] = {"stage": k, "of": n, "chosen": chosen["sparsity"],
                                      "schedule": schedule}
        if info is not None:
            result.stats["auto_sparsity"] = info
        return result

    def _rank(self, w: torch.Tensor, op, scales: dict) -> torch.Tensor | None:
        """What ranks ``op``'s weights when it is not ``w`` itself (None): ``w`` times its
        input scales (``criterion="activation"``), with every output unit's
        ``min_per_unit`` largest protected (``floor="unit"``, :func:`protect_units`)."""
        rank = w * scales[op.name] if op.name in scales else None
        if (self.floor == "unit" and self.min_per_unit and op.kind in (LINEAR, CONV)
                and w.dim() >= 2):
            rank = protect_units(w if rank is None else rank, self.min_per_unit)
        return rank

    def stages(self, steps: int | None = None) -> list["Prune"]:
        """This prune as ``steps`` (default: its option) prunes to the sparsities of the
        cubic schedule (:mod:`fxpress.passes.gradual`); itself when that is 1. Without a
        sparsity or threshold (the automatic choice) the first stage chooses it and the
        later ones read it (``auto_stage``: stage, count, the choice they share)."""
        steps = self.steps if steps is None else steps
        if steps == 1:
            return [self]
        given = {k: v for k, v in self._given.items() if k not in ("steps", "sparsity")}
        if self.sparsity is None and self.threshold is None:
            chosen: dict = {}
            out = [Prune(**given, tol=dict(self._tol_given)) for _ in range(steps)]
            for k, stage in enumerate(out, 1):
                stage.auto_stage = (k, steps, chosen)
            return out
        return [Prune(**given, sparsity=round(s, 4), tol=dict(self._tol_given))
                for s in cubic_schedule(self.sparsity, steps)]

    #: (stage, stages, the shared choice) of an automatic sparsity run in stages (:meth:`stages`)
    auto_stage: tuple[int, int, dict] | None = None

    def run(self, gm, ctx: PassContext) -> PassResult:
        if self.threshold is None and self.sparsity is None:
            if self.auto_stage is not None:
                return self._run_auto_stage(gm, ctx)
            return self._run_auto(gm, ctx)
        # weights that fused modules (LSTM, MultiheadAttention) read are pruned in place too
        all_ops = weighted_ops(gm, self.ops) + (fused_weights(gm) if LINEAR in self.ops else [])
        chosen, unmatched = select(all_ops, self.include, self.exclude)
        check_glob_matches(self.name, unmatched, [op.name for op in all_ops])
        ops = unique_weights(chosen)
        criterion = self._criterion(ctx)
        with torch.no_grad():
            scales = (input_scales(gm, ops, ctx.calibration or [])
                      if criterion == "activation" and ops else {})
            if self.threshold is not None:
                for op in ops:
                    op.set_weight(zero_below([op.weight()], self.threshold)[0])
            elif self.scope in ("layer", "adaptive"):
                if self.scope == "adaptive":
                    ws = [op.weight() for op in ops]
                    counts = adaptive_counts(
                        ws, round(self.sparsity * sum(w.numel() for w in ws)),
                        [layer_prune_count(w, 1.0, self.min_per_unit, op.kind)
                         for op, w in zip(ops, ws)], [scales.get(op.name) for op in ops])
                    del ws
                for j, op in enumerate(ops):
                    w = op.weight()
                    k = (counts[j] if self.scope == "adaptive" else
                         layer_prune_count(w, self.sparsity, self.min_per_unit, op.kind))
                    rank = self._rank(w, op, scales)
                    if rank is not None and 0 < k < w.numel():
                        # the k lowest |w|·rms(x), or with each unit's largest protected:
                        # a mask from the ranking copy
                        op.set_weight(_masked_by(w, zero_smallest([rank], k)[0]))
                        continue
                    fast = _zero_smallest_one(w, k) if 0 < k < w.numel() else None
                    if fast is None:
                        op.set_weight(zero_smallest([w], k)[0])
                        continue
                    op.set_weight(fast[0])
                    # the count is known: the stats below need not count the layer again
                    remember_nonzeros(op.weight(), w.numel() - fast[1])
            else:
                scaled = [self._rank(op.weight(), op, scales) for op in ops]
                ranked = {op.name for op, r in zip(ops, scaled) if r is not None}
                for op, w in global_prune(ops, self.sparsity, self.min_per_unit, scaled):
                    op.set_weight(_masked_by(op.weight(), w) if op.name in ranked else w)
                del scaled
        layers = {op.name: sparsity(op.weight()) for op in ops}
        n = sum(op.numel for op in ops)
        zeros = sum(layers[op.name] * op.numel for op in ops)
        stats = {"layers": layers, "pruned_weights": n, "sparsity": zeros / n if n else 0.0}
        if self.threshold is None:
            # the ops ranked by |w|·rms(x); the others (or all, with magnitude) by |w|
            stats["criterion"] = criterion
            if criterion == "activation":
                stats["activation_ranked"] = sorted(scales)
        if self.threshold is None and self.sparsity > 0:
            # a layer no weight was taken from: say why (a squeeze-excite 1x1 conv of 2 inputs
            # per unit sits at the floor; the adaptive cut may also leave a layer whole)
            dense = {op.name: (f"kept dense: at its floor of {self.min_per_unit} weights per "
                               "output unit (min_per_unit)"
                               if layer_prune_count(op.weight(), 1.0, self.min_per_unit, op.kind) == 0
                               else f"kept dense: the {self.scope} cut took none of its weights")
                     for op in ops if layers[op.name] == 0.0}
            if dense:
                stats["kept_dense"] = dense
        return PassResult(gm, changed=bool(ops), stats=stats)
