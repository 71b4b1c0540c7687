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
    for it in range(1, max_iter + 1):
        b_new = ((c[1:] + c[:-1]) / 2).astype(boundary_type)
        new_edges = np.concatenate([[0], np.searchsorted(pos, b_new, side="left"), [n]])
        if edges is not None and np.array_equal(new_edges, edges):
            converged, it = True, it - 1  # c are already the means of these members
            break
        edges, b = new_edges, b_new
        count = np.diff(edges if ccnt is None else ccnt[edges])
        sums = csum[edges[1:]] - csum[edges[:-1]]
        # centroids stay sorted: each new mean lies inside its own cell, and the cells
        # are ordered, so an empty cluster that keeps its centroid still sits between
        c = np.where(count > 0, sums / np.maximum(count, 1), c)
    return torch.from_numpy(c), torch.from_numpy(b), it, converged


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

    def index(self, block: torch.Tensor) -> torch.Tensor:
        # the floor before the shift keeps the sign: a negative value never lands in a
        # bin at or above zero (the shift by an integer is exact)
        return block.mul(self.inv).floor_().sub_(self.base).clamp_(0, self.bins - 1).to(torch.int64)

    def centres(self, first: int, last: int) -> np.ndarray:
        return (np.arange(first, last, dtype=np.float64) + self.base + 0.5) / self.inv

    def histogram(self, flat: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(count, sum) of the values in each bin, float64."""
        cnt = torch.zeros(self.bins, dtype=torch.float64)
        tot = torch.zeros(self.bins, dtype=torch.float64)
        for i in range(0, flat.numel(), _BLOCK):
            block = flat[i:i + _BLOCK]
            idx = self.index(block)
            cnt += torch.bincount(idx, minlength=self.bins)
            # float32 sums per block are plenty for placing centroids (the final means
            # are summed in float64)
            tot += torch.bincount(idx, weights=block, minlength=self.bins)
        return cnt.numpy(), tot.numpy()


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

    def _encode_block(self, block: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
        """Codes of a block by its bins; values in a bin that a boundary cuts are coded
        against the boundaries themselves, so every value gets its cluster exactly."""
        idx = self.grid.index(block)
        codes = lut.index_select(0, idx)  # index_select: several times faster than lut[idx]
        cut = self.straddle.index_select(0, idx).nonzero().squeeze(1)
        if cut.numel():
            first = self.segments[0][0]
            codes[cut] = (torch.bucketize(block[cut], self.cuts, right=True) + first).to(codes.dtype)
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


def _kmeans_hist(flat: torch.Tensor, k: int, max_iter: int, reserve_zero: bool | None) -> KMeans1D:
    """:func:`kmeans_1d` of many values, on a histogram (three passes over them)."""
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
        ranges, sizes, first = [(0, grid.bins, lo, hi)], [k], 0
    else:
        nonempty = np.flatnonzero(cnt)
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
    centroids = [torch.zeros(1, dtype=torch.float64)] if zero_code else []
    segments, cuts, iters, ok = [], [], 0, True
    straddle = torch.zeros(grid.bins, dtype=torch.bool)
    for (a, z, c_lo, c_hi), size in zip(ranges, sizes):
        centres = grid.centres(a, z)
        used = np.flatnonzero(cnt[a:z])  # Lloyd needs only the bins that hold values
        c, b, it, conv = _lloyd(centres[used], size, max_iter, cnt[a:z][used], tot[a:z][used],
                                (c_lo, c_hi))
        b = b.float()
        # the final assignment is exact: each value goes with the nearer centroid, and a
        # bin cut by a boundary is split by it (below: the values in such bins)
        lut[a:z] = first + torch.from_numpy(np.searchsorted(b.double().numpy(), centres, side="right"))
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
    # under that exact assignment, which can only lower the error
    n_codes = fit.centroids.numel()
    count = torch.zeros(n_codes, dtype=torch.float64)
    total = torch.zeros(n_codes, dtype=torch.float64)
    fit.codes = torch.empty(flat.shape, dtype=torch.uint8) if n_codes <= 256 else None
    for i in range(0, flat.numel(), _BLOCK):
        block = flat[i:i + _BLOCK]
        codes = fit._encode_block(block, lut)
        count += torch.bincount(codes, minlength=n_codes)
        total += torch.bincount(codes, weights=block.double(), minlength=n_codes)
        if fit.codes is not None:
            fit.codes[i:i + _BLOCK] = codes
    means = torch.where(count > 0, total / count.clamp(min=1), fit.centroids)
    if zero_code:
        means[0] = 0.0
    fit.centroids = means
    return fit


__all__ = ["HIST_BINS", "KMeans1D", "kmeans_1d"]
