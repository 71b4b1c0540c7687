"""1-D k-means for weight sharing: exact on sorted values, or on a fine histogram for
large layers (see :func:`kmeans_1d`). Used by :mod:`fxpress.passes.share`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# -- 1-D k-means ------------------------------------------------------------------------------


def _lloyd(pos: np.ndarray, k: int, max_iter: int, cnt: np.ndarray | None = None,
           tot: np.ndarray | None = None, span: tuple[float, float] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Lloyd's k-means on sorted 1-D points ``pos``: (centroids, boundaries, iterations,
    converged).

    The points are the values themselves, or the centres of histogram bins holding
    ``cnt`` values that sum to ``tot`` (then ``span`` is the values' exact range, where
    the linear initialisation starts). Cluster j holds the points in
    ``[boundaries[j-1], boundaries[j])``; the centroids returned are the means of exactly
    the values of those members (an empty cluster keeps its place). The loop works on k
    numbers per iteration, so it runs on numpy arrays: torch's per-call overhead would
    cost more than the arithmetic.
    """
    n = pos.size
    csum = np.concatenate([[0.0], np.cumsum(pos if tot is None else tot, dtype=np.float64)])
    ccnt = None if cnt is None else np.concatenate([[0], np.cumsum(cnt)])
    total = n if ccnt is None else ccnt[-1]
    boundary_type = np.float32 if cnt is None else np.float64
    if k == 1:
        return (torch.tensor([csum[-1] / total], dtype=torch.float64),
                torch.from_numpy(np.empty(0, dtype=boundary_type)), 1, True)
    first, last = span if span is not None else (float(pos[0]), float(pos[-1]))
    c = np.linspace(first, last, k, dtype=np.float64)
    edges = None
    b = np.empty(0, dtype=boundary_type)
    converged, it = False, 0
    # the loop does a few numpy calls on k numbers per iteration (method calls: the
    # module-level wrappers cost as much as the work); the cumulative sums at the cluster
    # edges give each cluster's count and sum
    cum_cnt = None if ccnt is None else ccnt
    inner = np.empty(k + 1, dtype=np.int64)
    inner[0], inner[-1] = 0, n
    for it in range(1, max_iter + 1):
        b_new = ((c[1:] + c[:-1]) * 0.5).astype(boundary_type)
        inner[1:-1] = pos.searchsorted(b_new, side="left")
        if edges is not None and (inner == edges).all():
            converged, it = True, it - 1  # c are already the means of these members
            break
        edges, b = inner.copy(), b_new
        count = (edges[1:] - edges[:-1]) if cum_cnt is None else np.diff(cum_cnt[edges])
        sums = csum[edges[1:]] - csum[edges[:-1]]
        # centroids stay sorted: each new mean lies inside its own cell, and the cells
        # are ordered, so an empty cluster that keeps its centroid still sits between
        c = np.where(count > 0, sums / np.maximum(count, 1), c)
    return torch.from_numpy(c), torch.from_numpy(b), it, converged


def _lloyd_many(problems: list[tuple], max_iter: int
                ) -> list[tuple[torch.Tensor, torch.Tensor, int, bool]]:
    """:func:`_lloyd` of several histogram problems ``(pos, k, cnt, tot, span)`` at once,
    the same iterations each: one numpy call per step works for all of them, so the
    per-call overhead that dominates a problem of k numbers is paid once per step, not
    once per problem (a model's layers, and each layer's two signs, are fitted together).

    The problems' points are laid end to end on one axis, each shifted past the previous
    one, so a single ``searchsorted`` places every boundary; each problem keeps its own
    cumulative counts and sums, and stops changing once no bin changes cluster (its
    iteration count is recorded then, as :func:`_lloyd` would return it).
    """
    out: list = [None] * len(problems)
    live = []
    for i, (pos, k, cnt, tot, span) in enumerate(problems):
        if k == 1 or pos.size == 0:
            out[i] = _lloyd(pos, k, max_iter, cnt, tot, span)
        else:
            live.append(i)
    if not live:
        return out
    P = len(live)
    ks = np.array([problems[i][1] for i in live], dtype=np.int64)
    ns = np.array([problems[i][0].size for i in live], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(ns)[:-1]])
    # each problem's points shifted onto its own stretch of one sorted axis
    base = np.array([problems[i][0][0] for i in live], dtype=np.float64)
    width = max(float(problems[i][0][-1] - problems[i][0][0]) for i in live)
    gap = 2.0 * width if width > 0 else 1.0  # scale-free: rounding stays far below a bin
    shift = np.arange(P, dtype=np.float64) * gap - base
    axis = np.concatenate([problems[i][0] + shift[j] for j, i in enumerate(live)])
    # cumulative counts and sums per problem, each starting from 0 (index + problem)
    ccnt = np.concatenate([np.concatenate([[0.0], np.cumsum(problems[i][2])]) for i in live])
    csum = np.concatenate([np.concatenate([[0.0], np.cumsum(problems[i][3], dtype=np.float64)])
                           for i in live])
    # centroids of all problems in one array; pairs of neighbours within a problem
    first = np.concatenate([[0], np.cumsum(ks)[:-1]])
    c = np.concatenate([np.linspace(problems[i][4][0], problems[i][4][1], problems[i][1],
                                    dtype=np.float64) for i in live])
    owner = np.repeat(np.arange(P), ks)  # problem of each centroid
    is_last = np.zeros(c.size, dtype=bool)
    is_last[first + ks - 1] = True
    left = np.flatnonzero(~is_last)      # a centroid with a right neighbour in its problem
    pair_owner = owner[left]
    # cluster j of problem p spans points [lo_edge, hi_edge): global axis indices
    lo_edge = np.empty(c.size, dtype=np.int64)
    hi_edge = np.empty(c.size, dtype=np.int64)
    lo_edge[first] = starts
    hi_edge[first + ks - 1] = starts + ns
    cum_off = owner  # csum/ccnt index = axis index + problem (each has a leading 0)
    iters = np.full(P, max_iter, dtype=np.int64)
    done = np.zeros(P, dtype=bool)
    prev_b = None
    b = np.empty(0)
    # per step, a few numpy calls on ~8k numbers: the loop's cost is the calls, so what
    # does not change between steps is computed once (the shifts of each boundary, the
    # first pair of each problem: every live problem has k >= 2, so at least one pair)
    pair_shift = shift[pair_owner]
    pair_first = first - np.arange(P)
    right = left + 1
    for it in range(1, max_iter + 1):
        b_new = (c[left] + c[right]) * 0.5
        e = axis.searchsorted(b_new + pair_shift, side="left")
        if prev_b is not None:
            moved = np.logical_or.reduceat(e != prev_e, pair_first)
            newly = ~moved & ~done
            iters[newly] = it - 1  # their c are already the means of these members
            done |= ~moved
            if done.all():
                break
            # a finished problem keeps its boundaries and centroids
            keep = done[pair_owner]
            e = np.where(keep, prev_e, e)
            b_new = np.where(keep, prev_b, b_new)
        prev_e, prev_b, b = e, b_new, b_new
        hi_edge[left] = e
        lo_edge[left + 1] = e
        count = ccnt[hi_edge + cum_off] - ccnt[lo_edge + cum_off]
        sums = csum[hi_edge + cum_off] - csum[lo_edge + cum_off]
        upd = np.where(count > 0, sums / np.maximum(count, 1), c)
        c = np.where(done[owner], c, upd)
    for j, i in enumerate(live):
        sl = slice(first[j], first[j] + ks[j])
        bl = slice(first[j] - j, first[j] - j + ks[j] - 1)  # pairs: one fewer per problem
        out[i] = (torch.from_numpy(c[sl].copy()), torch.from_numpy(b[bl].copy()),
                  int(iters[j]), bool(done[j]))
    return out


#: Above this many values, k-means runs on a histogram of about this many bins instead of
#: on the sorted values (sorting costs ~50x a pass over the weights; three passes build
#: the histogram).
HIST_BINS = 1 << 16
#: Values per block when a large tensor is binned (temporaries stay a few MB).
_BLOCK = 1 << 20


@dataclass
class _Grid:
    """Histogram bins of equal width whose edges include 0: value v falls in bin
    ``floor(v / width) - base`` (clamped to the bins), so no bin mixes signs."""

    inv: float    # 1 / width
    base: int     # floor(min / width)
    bins: int

    @classmethod
    def over(cls, lo: float, hi: float, bins: int = HIST_BINS) -> "_Grid":
        width = (hi - lo) / bins if hi > lo else 1.0
        inv = 1.0 / width
        base = math.floor(lo * inv)
        return cls(inv, base, math.floor(hi * inv) - base + 1)

    def index(self, block: torch.Tensor, scratch: "_Scratch | None" = None) -> torch.Tensor:
        """The bin of every value (int32: half the traffic of int64 in every gather and
        count that reads it); written into ``scratch``'s buffers when given."""
        # the floor before the shift keeps the sign: a negative value never lands in a
        # bin at or above zero (the shift by an integer is exact)
        if scratch is None:
            return block.mul(self.inv).floor_().sub_(self.base).clamp_(0, self.bins - 1).to(torch.int32)
        n = block.numel()
        f = torch.mul(block, self.inv, out=scratch.f32[:n]).floor_().sub_(self.base)
        return scratch.i32[:n].copy_(f.clamp_(0, self.bins - 1))  # whole numbers: exact

    def centres(self, first: int, last: int) -> np.ndarray:
        return self.centres_of(np.arange(first, last, dtype=np.float64))

    def centres_of(self, bins: np.ndarray) -> np.ndarray:
        """The centres of the bins numbered ``bins``."""
        return (bins.astype(np.float64) + self.base + 0.5) / self.inv

    def histogram(self, flat: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(count, sum) of the values in each bin, float64: the sums are summed in float64
        from the start, so the final means can be summed from them bin by bin."""
        cnt = tot = None
        scratch = _Scratch(min(flat.numel(), _BLOCK), f64=True)
        for i in range(0, flat.numel(), _BLOCK):
            block = flat[i:i + _BLOCK]
            idx = self.index(block, scratch)
            c = torch.bincount(idx, minlength=self.bins)
            t = torch.bincount(idx, weights=scratch.f64[:block.numel()].copy_(block),
                               minlength=self.bins)
            if cnt is None:  # the first block's counts are the arrays (no zeros + add)
                cnt, tot = c.double(), t
            else:
                cnt += c
                tot += t
        return cnt.numpy(), tot.numpy()


class _Scratch:
    """Buffers one block of a pass over a tensor reuses: a fresh multi-MB temporary per
    block is a fresh mapping of zeroed pages (page faults cost more than the work)."""

    def __init__(self, n: int, f64: bool = False):
        self.f32 = torch.empty(n)
        self.i32 = torch.empty(n, dtype=torch.int32)
        self.f64 = torch.empty(n, dtype=torch.float64) if f64 else None


@dataclass
class KMeans1D:
    """A fitted 1-D codebook: ``centroids`` (code 0 is 0.0 when ``zero_code``) and the
    cluster boundaries to encode values with :meth:`encode` (or, for a fit on a
    histogram, the code of every bin)."""

    centroids: torch.Tensor                 # float64 [k]
    zero_code: bool
    segments: list[tuple[int, torch.Tensor]]  # (first code, boundaries) per sign or overall
    iterations: int
    converged: bool
    grid: _Grid | None = None               # histogram fits: the bins,
    lut: torch.Tensor | None = None         # the code of each bin,
    straddle: torch.Tensor | None = None    # the bins a boundary cuts (their values are
    cuts: torch.Tensor | None = None        # coded exactly: every boundary, 0 between signs)
    #: the codes of the fitted values (flat uint8), kept by histogram fits: encoding them
    #: again would cost another pass
    codes: torch.Tensor | None = None

    def encode(self, w: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """The code of every value of ``w`` (``dtype``, same shape)."""
        w = w.detach().float().contiguous()  # bucketize copies a strided input anyway
        if self.grid is not None:
            flat = w.reshape(-1)
            codes = torch.empty(flat.shape, dtype=dtype)
            lut = self.lut.to(dtype)
            for i in range(0, flat.numel(), _BLOCK):
                codes[i:i + _BLOCK] = self._encode_block(flat[i:i + _BLOCK], lut)
            return codes.view(w.shape)
        if not self.zero_code:
            first, b = self.segments[0]
            return (torch.bucketize(w, b, right=True) + first).to(dtype)
        codes = torch.zeros(w.shape, dtype=dtype)
        for (first, b), side in zip(self.segments, self._sides()):
            mask = side(w)
            codes[mask] = (torch.bucketize(w[mask], b, right=True) + first).to(dtype)
        return codes

    def _encode_block(self, block: torch.Tensor, lut: torch.Tensor, marker: int | None = None,
                      cut_out: list | None = None, scratch: _Scratch | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
        """Codes of a block by its bins; values in a bin that a boundary cuts are coded
        against the boundaries themselves, so every value gets its cluster exactly.
        ``marker``: ``lut`` holds this code for the bins a boundary cuts (one gather
        instead of two). ``cut_out`` receives the positions of those values."""
        idx = self.grid.index(block, scratch)
        # index_select: several times faster than lut[idx]
        codes = lut.index_select(0, idx) if out is None else torch.index_select(lut, 0, idx, out=out)
        # the few values of cut bins found by numpy (its comparison and flatnonzero: 0.17 ms
        # a million codes on one thread, torch's ``(codes == marker).nonzero()`` 1.8 ms)
        if marker is not None:
            cut = torch.from_numpy(np.flatnonzero(codes.numpy() == marker))
        else:
            cut = torch.from_numpy(np.flatnonzero(self.straddle.index_select(0, idx).numpy()))
        if cut.numel():
            first = self.segments[0][0]
            codes[cut] = (torch.bucketize(block[cut], self.cuts, right=True) + first).to(codes.dtype)
        if cut_out is not None:
            cut_out.append(cut)
        return codes.masked_fill_(block == 0, 0) if self.zero_code else codes

    def _sides(self):
        if len(self.segments) == 1:  # one cluster for all non-zeros (bits=1 with zeros)
            return [lambda w: w != 0]
        return [lambda w: w < 0, lambda w: w > 0]


def _sign_split(k: int, lo: float, hi: float, has_neg: bool, has_pos: bool) -> list[int]:
    """Centroids for the negative and positive values (linear init over [min, max]: each
    sign gets the centroids that fall on its side), or one part for one sign / one
    centroid for every non-zero (bits=1 on a sparse layer)."""
    k_nz = max(k - 1, 1)
    if k_nz == 1 or not has_neg or not has_pos:
        return [k_nz]
    k_neg = min(max(round(k_nz * (-lo) / (hi - lo)), 1), k_nz - 1)
    return [k_neg, k_nz - k_neg]


def kmeans_1d(values: torch.Tensor, k: int, max_iter: int = 1000,
              reserve_zero: bool | None = None) -> KMeans1D:
    """Fit ``k`` centroids to the values of ``values`` (any shape) with 1-D k-means.

    Linear initialisation over [min, max], then Lloyd iterations until no value changes
    cluster (or ``max_iter``). ``reserve_zero`` (default: when ``values`` has exact
    zeros) makes code 0 mean 0.0 and clusters negative and positive values apart, so
    non-zero values never decode to zero. Up to :data:`HIST_BINS` values are clustered
    exactly (sorted); more are clustered on a histogram of that many bins (bins go whole
    to a cluster: a value sits with its nearest centroid up to one bin width, range /
    HIST_BINS); either way every centroid is the mean of exactly its members.

    >>> km = kmeans_1d(torch.tensor([0.0, 0.125, 0.375, -0.5, -0.75, 0.0]), 3)
    >>> km.centroids.tolist(), km.encode(torch.tensor([0.0, 0.2, -0.6])).tolist()
    ([0.0, -0.625, 0.25], [0, 2, 1])
    """
    flat = values.detach().reshape(-1).float().contiguous()
    if flat.numel() == 0:
        raise ValueError("kmeans_1d: no values to cluster")
    if k < 1:
        raise ValueError(f"kmeans_1d: k must be >= 1, got {k}")
    if flat.numel() > HIST_BINS:
        return _kmeans_hist(flat, k, max_iter, reserve_zero)
    has_zero = bool((flat == 0).any())
    zero_code = has_zero if reserve_zero is None else bool(reserve_zero)
    if not zero_code:
        s = torch.sort(flat).values.numpy()
        c, b, it, ok = _lloyd(s, min(k, s.size), max_iter)
        return KMeans1D(c, False, [(0, b)], it, ok)
    s = torch.sort(flat[flat != 0]).values.numpy()
    parts: list[np.ndarray] = []
    sizes: list[int] = []  # stays empty for an all-zero tensor (e.g. after prune{threshold=1})
    if s.size:
        neg, pos = s[s < 0], s[s > 0]
        sizes = _sign_split(k, float(s[0]), float(s[-1]), bool(neg.size), bool(pos.size))
        parts = [s] if len(sizes) == 1 else [neg, pos]
    centroids = [torch.zeros(1, dtype=torch.float64)]
    segments, iters, ok = [], 0, True
    first = 1
    for part, size in zip(parts, sizes):
        c, b, it, conv = _lloyd(part, min(size, part.size), max_iter)
        segments.append((first, b))
        centroids.append(c)
        first += c.numel()
        iters, ok = max(iters, it), ok and conv
    if not segments:  # all zeros: a codebook of one value
        segments = [(1, flat.new_empty(0))]
    return KMeans1D(torch.cat(centroids), True, segments, iters, ok)


#: Tensors whose histograms are held at once by :func:`kmeans_1d_many` (each holds a few
#: MB of bins while its Lloyd problems wait for the others').
GROUP = 8


def kmeans_1d_many(values: list[torch.Tensor], k: int, max_iter: int = 1000,
                   reserve_zero: bool | None = None) -> list[KMeans1D]:
    """:func:`kmeans_1d` of each tensor of ``values``, the same fits, faster: the Lloyd
    iterations of up to :data:`GROUP` histogram fits run together, one numpy call per
    step for all of them (a fit's step works on k numbers, so its cost is the calls')."""
    out: list[KMeans1D | None] = [None] * len(values)
    large = []
    for i, v in enumerate(values):
        if v.numel() > HIST_BINS and k >= 1:
            large.append(i)
        else:
            out[i] = kmeans_1d(v, k, max_iter, reserve_zero)
    for g in range(0, len(large), GROUP):
        part = large[g:g + GROUP]
        flats = [values[i].detach().reshape(-1).float().contiguous() for i in part]
        for i, fit in zip(part, _kmeans_hist_many(flats, k, max_iter, reserve_zero)):
            out[i] = fit
        del flats
    return out


def _kmeans_hist(flat: torch.Tensor, k: int, max_iter: int, reserve_zero: bool | None) -> KMeans1D:
    """:func:`kmeans_1d` of many values, on a histogram (three passes over them)."""
    return _kmeans_hist_many([flat], k, max_iter, reserve_zero)[0]


def _kmeans_hist_many(flats: list[torch.Tensor], k: int, max_iter: int,
                      reserve_zero: bool | None) -> list[KMeans1D]:
    """:func:`_kmeans_hist` of several tensors: histograms one by one, the Lloyd
    iterations of all of them together (:func:`_lloyd_many`), then each final pass."""
    setups = [_hist_setup(flat, k, reserve_zero) for flat in flats]
    problems = [p for st in setups if not isinstance(st, KMeans1D) for p in st["problems"]]
    results = iter(_lloyd_many(problems, max_iter))
    return [st if isinstance(st, KMeans1D) else
            _hist_finish(flat, st, [next(results) for _ in st["problems"]])
            for flat, st in zip(flats, setups)]


def _hist_setup(flat: torch.Tensor, k: int, reserve_zero: bool | None) -> KMeans1D | dict:
    """The histogram of ``flat`` and its Lloyd problems (one per sign with a zero code),
    or the finished fit of an all-zero tensor."""
    lo, hi = (float(v) for v in torch.aminmax(flat))
    grid = _Grid.over(lo, hi, min(HIST_BINS * max(1, k // 4), 1 << 20))
    cnt, tot = grid.histogram(flat)
    zb = min(max(-grid.base, 0), grid.bins - 1)  # the first bin at or above zero
    zeros = flat.numel() - int(torch.count_nonzero(flat)) if lo <= 0 <= hi else 0
    zero_code = zeros > 0 if reserve_zero is None else bool(reserve_zero)
    cnt[zb] -= zeros  # zeros are code 0 (or, without a zero code, clustered as values)
    lut = torch.zeros(grid.bins, dtype=torch.int64)
    if not zero_code:
        cnt[zb] += zeros
        held = np.flatnonzero(cnt)
        ranges, sizes, first = [(0, grid.bins, lo, hi)], [k], 0
    else:
        nonempty = held = np.flatnonzero(cnt)
        if nonempty.size == 0:  # all zeros: a codebook of one value
            return KMeans1D(torch.zeros(1, dtype=torch.float64), True, [(1, flat.new_empty(0))],
                            0, True, grid, lut)
        has_neg, has_pos = bool(nonempty[0] < zb), bool(nonempty[-1] >= zb)
        sizes = _sign_split(k, lo, hi, has_neg, has_pos)
        c_lo, c_hi = lo if has_neg else 0.0, hi if has_pos else 0.0
        if len(sizes) == 1:
            ranges = [(0, grid.bins, c_lo, c_hi)]
        else:  # the bin edges include 0: the signs are apart
            last_neg, first_pos = nonempty[nonempty < zb][-1], nonempty[nonempty >= zb][0]
            ranges = [(0, zb, lo, float(grid.centres(last_neg, last_neg + 1)[0])),
                      (zb, grid.bins, float(grid.centres(first_pos, first_pos + 1)[0]), hi)]
        first = 1
    problems = []
    for (a, z, c_lo, c_hi), size in zip(ranges, sizes):
        # Lloyd needs only the bins that hold values
        used = held[np.searchsorted(held, a):np.searchsorted(held, z)]
        problems.append((grid.centres_of(used), size, cnt[used], tot[used], (c_lo, c_hi)))
    return {"grid": grid, "cnt": cnt, "tot": tot, "zero_code": zero_code, "lut": lut,
            "ranges": ranges, "first": first, "problems": problems, "held": held}


def _hist_finish(flat: torch.Tensor, st: dict, fitted: list) -> KMeans1D:
    """The fit of ``flat`` from its Lloyd results: exact final assignment and means."""
    grid, cnt, tot, zero_code, lut = st["grid"], st["cnt"], st["tot"], st["zero_code"], st["lut"]
    first = st["first"]
    centroids = [torch.zeros(1, dtype=torch.float64)] if zero_code else []
    segments, cuts, iters, ok = [], [], 0, True
    straddle = torch.zeros(grid.bins, dtype=torch.bool)
    for (a, z, _, _), (c, b, it, conv) in zip(st["ranges"], fitted):
        centres = grid.centres(a, z)
        b = b.float()
        # the final assignment is exact: each value goes with the nearer centroid, and a
        # bin cut by a boundary is split by it (below: the values in such bins)
        # bins from the first centre at or past each boundary on take the next code
        starts = np.searchsorted(centres, b.double().numpy(), side="left")
        runs = np.diff(np.concatenate([[0], starts, [centres.size]]))
        lut[a:z] = torch.from_numpy(np.repeat(np.arange(first, first + runs.size), runs))
        straddle[grid.index(b)] = True
        if cuts:
            cuts.append(torch.zeros(1))  # between the signs
        cuts.append(b)
        segments.append((first, b))
        centroids.append(c)
        first += c.numel()
        iters, ok = max(iters, it), ok and conv
    fit = KMeans1D(torch.cat(centroids), zero_code, segments, iters, ok, grid, lut,
                   straddle, torch.cat(cuts))
    # one more (exact) Lloyd update: the centroids become the means of their members
    # under that exact assignment, which can only lower the error. A bin no boundary cuts
    # goes whole to its code: its count and float64 sum are the histogram's; the values of
    # the bins a boundary cuts are coded one by one (below) and summed exactly.
    n_codes = fit.centroids.numel()
    # only the bins that hold values (a small layer fills a fraction of the bins); an
    # empty bin adds nothing to a count or a sum
    held = st["held"]
    whole = held[~straddle.numpy()[held]]
    lut_w = lut.numpy()[whole]
    count = torch.from_numpy(np.bincount(lut_w, weights=cnt[whole], minlength=n_codes))
    total = torch.from_numpy(np.bincount(lut_w, weights=tot[whole], minlength=n_codes))
    fit.codes = torch.empty(flat.shape, dtype=torch.uint8) if n_codes <= 256 else None
    marker = 255 if n_codes < 255 else None  # a code no cluster uses marks the cut bins
    small = lut.to(torch.uint8) if n_codes <= 256 else lut
    if marker is not None:
        small = small.masked_fill(straddle, marker)
    scratch = _Scratch(min(flat.numel(), _BLOCK))
    for i in range(0, flat.numel(), _BLOCK):
        block = flat[i:i + _BLOCK]
        cut: list[torch.Tensor] = []
        # the codes written straight into the fit's (uint8) codes
        codes = fit._encode_block(block, small, marker, cut, scratch,
                                  fit.codes[i:i + _BLOCK] if fit.codes is not None else None)
        if cut[0].numel():
            cut_codes = codes[cut[0]].long()
            count += torch.bincount(cut_codes, minlength=n_codes)
            total += torch.bincount(cut_codes, weights=block[cut[0]].double(), minlength=n_codes)
    means = torch.where(count > 0, total / count.clamp(min=1), fit.centroids)
    if zero_code:
        means[0] = 0.0
    fit.centroids = means
    return fit


__all__ = ["HIST_BINS", "KMeans1D", "kmeans_1d", "kmeans_1d_many"]
