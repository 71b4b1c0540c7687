"""share: k-means weight sharing (Deep Compression, Han et al. 2016).

``share{bits=4}`` clusters each layer's weights into ``2**bits`` centroids with 1-D
k-means and stores, per weight, a ``bits``-bit index into that codebook: the seed
article's "merge similar weights into their mean", done as the paper does it.

* k-means is 1-D, exact and deterministic: linear initialisation over [min, max] (the
  paper found it best: it keeps the rare large weights), then Lloyd iterations on the
  sorted values (up to :data:`HIST_BINS` values) or on a fine histogram of them (more:
  three passes instead of a sort, ~50x a pass). Cluster boundaries are midpoints between
  neighbouring centroids, so each iteration is one ``searchsorted`` of the boundaries into
  the sorted values or bins and the cluster sums come from a cumulative sum: O(k log n)
  per iteration. The final assignment is exact (a bin a boundary cuts is split by it) and
  every centroid is exactly the mean of its members.
* Pruned weights stay exactly zero: when a layer has zeros, code 0 is reserved for 0.0
  and the non-zero weights are clustered by sign (negative and positive centroids share
  the remaining codes in proportion to their value ranges), so no non-zero weight can be
  merged into zero or into a cluster that straddles it.
* ``scope="global"`` fits one codebook on every selected layer together.
* The runtime modules (:class:`CodebookLinear`, :class:`CodebookConv`,
  :class:`CodebookEmbedding`) store the codebook and the indices packed at ``bits`` bits;
  ``decode="per_call"`` decodes on every forward (memory), ``decode="once"`` keeps the
  decoded weight after the first call (speed; never in ``state_dict``). An embedding in
  ``per_call`` mode unpacks only the rows it looks up.
* ``bias_bits=8`` also stores each layer's bias on an affine grid of 256 levels (codes, a
  scale and a zero point: a quarter of its float bytes). On small models the float biases
  are a large share of a Deep-Compressed file (the 64-300-100-10 digits MLP: 1.6 KB of
  ~5); the grid step is (max - min)/255 of the layer's biases.
* Centroids can be fine-tuned (:meth:`CodebookModule.begin_training`): the gradients of
  all weights that share a centroid sum into it, and a latent weight per weight, trained
  straight through, may move a weight to the neighbouring centroid (pruned weights stay
  zero); the stored form stays a codebook and packed indices.

Example::

    res = fxpress.compress(model, "prune{sparsity=0.9},share{bits=4}", calibration=batches)
    res.records[-1].stats["bits_per_weight"]      # stored bits per weight, codebook included
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from fxpress.errors import OptionError
from fxpress.graph.packing import (pack_bits, packed_size, rows_byte_aligned, unpack_bits,
                                    unpack_rows)
from fxpress.graph.runtime import CompressedModule, kind_classes
from fxpress.graph.weights import (CONV, EMBEDDING, KINDS, LINEAR, select, unique_weights,
                                   weighted_ops)
from fxpress.graph.weights import skipped_weights
from fxpress.passes.base import (Pass, PassContext, PassResult, PassTraits, Tolerance,
                                 check_glob_matches, option)
from fxpress.passes.quantize_grid import dequantize_weight, load_codes, quantize_weight, store_codes

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


# -- runtime modules ------------------------------------------------------------------------


class CodebookModule(CompressedModule):
    """A linear/conv/embedding whose weight is ``codebook[codes]``: a float codebook of at
    most ``2**bits`` centroids and one ``bits``-bit index per weight, packed.

    ``state_dict``: ``codebook`` [k], ``codes`` (uint8, ``ceil(n*bits/8)`` bytes) and
    ``bias``. With ``zero_code`` the centroid of code 0 is exactly 0.0 (pruned weights)
    and stays so under fine-tuning. A sparse layer is stored as Deep Compression stores
    it when that is smaller (sparsity above ``1/bits``): ``mask``, one bit per weight
    (set: non-zero), and ``codes`` of the non-zero weights only.
    """

    technique = "share"
    optional_tensors = ("bias", "mask", "bias_codes", "bias_grid")
    #: bits of the stored bias grid; 0 keeps the bias in float (artifacts before the option)
    bias_bits = 0

    def __init__(self, kind: str, spec: dict, shape: tuple[int, ...], bits: int,
                 codebook: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None = None,
                 zero_code: bool = False, cache_weight: bool = False, sparse: bool | None = None,
                 bias_bits: int = 0):
        super().__init__(kind, spec)
        self.bias_bits = int(bias_bits)
        self.shape = [int(d) for d in shape]
        self.bits = int(bits)
        self.zero_code = bool(zero_code)
        self.cache_weight = bool(cache_weight)
        n = self.numel
        if codes.numel() != n:
            raise ValueError(f"{n} weights need {n} codes, got {codes.numel()}")
        if codebook.numel() > (1 << self.bits):
            raise ValueError(f"a {bits}-bit code addresses {1 << bits} centroids, got {codebook.numel()}")
        codes = codes.reshape(-1)
        self.nonzeros = int(torch.count_nonzero(codes))
        if sparse is None:
            sparse = packed_size(n, 1) + packed_size(self.nonzeros, self.bits) < packed_size(n, self.bits)
        self.sparse = bool(sparse) and self.zero_code
        self.register_buffer("codebook", codebook.detach().clone())
        if self.sparse:
            nonzero = codes != 0
            self.register_buffer("mask", pack_bits(nonzero, 1))
            self.register_buffer("codes", pack_bits(codes[nonzero], self.bits))
        else:
            self.register_buffer("mask", None)
            self.register_buffer("codes", pack_bits(codes, self.bits))
        self._store_bias(bias)

    def _store_bias(self, bias: torch.Tensor | None) -> None:
        """Keep ``bias`` as a frozen parameter, or with ``bias_bits`` as grid codes and a
        ``[scale, zero]`` pair (what is stored) plus its decoded values (a non-persistent
        buffer, what forward adds)."""
        for name in ("bias", "bias_codes", "bias_grid"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        self.register_buffer("bias_codes", None)
        self.register_buffer("bias_grid", None)
        if bias is None:
            self.register_buffer("bias", None)
        elif not self.bias_bits:
            self.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
        else:
            codes, scale, zero = quantize_weight(bias.detach().reshape(1, -1), self.bias_bits,
                                                 "affine", "tensor")
            self.bias_codes = store_codes(codes, self.bias_bits, "affine")
            self.bias_grid = torch.cat([scale.reshape(1), zero.reshape(1).float()])
            self._decode_bias(bias.numel())

    def _decode_bias(self, n: int) -> None:
        scale, zero = self.bias_grid[:1].reshape(1, 1), self.bias_grid[1:].reshape(1, 1).to(torch.int32)
        codes = load_codes(self.bias_codes, self.bias_bits, "affine", n)
        self.register_buffer("bias", dequantize_weight(codes, scale, zero).reshape(n),
                             persistent=False)

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor],
                   parameters=()) -> "CodebookModule":
        m = super().from_state(config, tensors, parameters)
        if m.bias_codes is not None:
            m._decode_bias(int(m.shape[0]))
        return m

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _table(self) -> torch.Tensor:
        # code 0 of a layer with zeros decodes to exactly 0.0, also while it is trained
        if self.zero_code:
            return torch.cat([self.codebook.new_zeros(1), self.codebook[1:]])
        return self.codebook

    def _codes(self) -> torch.Tensor:
        unpacked = self._buffers.get("codes_unpacked")  # set only while fine-tuning
        if unpacked is not None:
            return unpacked
        if not self.sparse:
            return unpack_bits(self.codes, self.bits, self.numel).long()
        nonzero = unpack_bits(self.mask, 1, self.numel).bool()
        full = torch.zeros(self.numel, dtype=torch.int64, device=self.codes.device)
        full[nonzero] = unpack_bits(self.codes, self.bits, self.nonzeros).long()
        return full

    def weight_float(self) -> torch.Tensor:
        latent = self._parameters.get("latent")
        if latent is not None:  # fine-tuning: each weight on its nearest centroid (see begin_training)
            codes = self._nearest(latent.detach())
            self.codes_unpacked = codes
            lat = self.keep_zeros(latent)
            # value: codebook[codes] exactly; gradient: summed into each centroid, and
            # straight through to each weight's latent (which decides its centroid)
            return self._table().index_select(0, codes).view(self.shape) + (lat - lat.detach())
        # index_select's backward is index_add: gradients of weights sharing a centroid sum
        return self._table().index_select(0, self._codes()).view(self.shape)

    def _nearest(self, w: torch.Tensor) -> torch.Tensor:
        """The code of the nearest centroid for every weight of ``w``; with ``zero_code``
        a zero weight keeps code 0 and a non-zero one never takes it."""
        table = self._table().detach()
        first = 1 if self.zero_code else 0
        cand = table[first:]
        flat = w.reshape(-1)
        if cand.numel() == 0:
            return torch.zeros(flat.numel(), dtype=torch.int64, device=flat.device)
        values, order = torch.sort(cand)
        mids = (values[1:] + values[:-1]) / 2
        codes = order[torch.bucketize(flat.to(values.dtype), mids)] + first
        if self.zero_code:
            codes = codes.masked_fill(flat == 0, 0)
        return codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.kind == EMBEDDING and not self.cache_weight and not self.sparse
                and not self.codebook.requires_grad and rows_byte_aligned(self.shape[1], self.bits)):
            # a lookup touches a few rows: unpack only those
            return self._table()[unpack_rows(self.codes, self.bits, self.shape[1], x).long()]
        return super().forward(x)

    def config(self) -> dict:
        return {**super().config(), "shape": self.shape, "bits": self.bits,
                "zero_code": self.zero_code, "sparse": self.sparse, "nonzeros": self.nonzeros,
                "bias_bits": self.bias_bits}

    # -- fine-tuning -------------------------------------------------------------------
    def begin_training(self) -> list[torch.nn.Parameter]:
        """Make the centroids, a latent weight per weight and the bias trainable; return
        them for the optimizer.

        Forward decodes every weight as the centroid nearest to its latent (initially its
        own centroid, so nothing changes until training moves something). Decoding is a
        gather, so the gradient of a centroid is the sum of the gradients of all weights
        that share it (Deep Compression, section 3.3); the same gradient passes straight
        through to each latent, so a weight whose gradient keeps pulling it away from its
        cluster moves to the neighbouring centroid (its index is re-assigned). Pruned
        weights (code 0 of a layer with zeros) stay exactly zero and the reserved zero
        centroid never moves. :meth:`end_training` stores the trained centroids and the
        final assignment packed as before.

        Example::

            params = module.begin_training()
            opt = torch.optim.Adam(params, lr=1e-4)
            ...                                   # forward, loss.backward(), opt.step()
            module.end_training()                 # state_dict is the compressed form again
        """
        if isinstance(self.codebook, torch.nn.Parameter):
            return [p for p in (self.codebook, self._parameters.get("latent"), self.bias)
                    if p is not None]
        self.drop_cache()
        # own copies: the pipeline's graphs share tensors, and an optimizer writes in place
        codes = self._codes()
        self.register_buffer("codes_unpacked", codes, persistent=False)
        codebook = self._buffers.pop("codebook")
        self.codebook = torch.nn.Parameter(codebook.detach().clone())
        with torch.no_grad():
            w = self._table().index_select(0, codes).view(self.shape).clone()
        self._zero_mask = (codes == 0).view(self.shape) if self.zero_code else None
        self.latent = torch.nn.Parameter(w)
        if self.bias is not None:
            bias = self.bias.detach().clone()
            self._buffers.pop("bias", None)
            self.bias = torch.nn.Parameter(bias)
        return [p for p in (self.codebook, self.latent, self.bias) if p is not None]

    def end_training(self) -> None:
        """Store the trained centroids back as a buffer (code 0 of a sparse layer: 0.0)
        and each weight's final index, packed."""
        if not isinstance(self.codebook, torch.nn.Parameter):
            return
        codebook = self._parameters.pop("codebook").detach().clone()
        if self.zero_code:
            codebook[0] = 0
        self.register_buffer("codebook", codebook)
        latent = self._parameters.pop("latent", None)
        if latent is not None:
            codes = self._nearest(latent.detach())
            if self.sparse:  # the same weights are non-zero: the mask stays as it is
                self.codes = pack_bits(codes[codes != 0], self.bits)
            else:
                self.codes = pack_bits(codes, self.bits)
        if self.bias is not None:
            self._store_bias(self.bias.detach())  # a trained bias goes back onto its grid
        self._buffers.pop("codes_unpacked", None)
        self._zero_mask = None
        self.drop_cache()

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, bits={self.bits}, clusters={self.codebook.numel()}, "
                f"zero_code={self.zero_code}, sparse={self.sparse}, cache_weight={self.cache_weight}")


#: CodebookLinear, CodebookConv and CodebookEmbedding (an embedding lookup unpacks only its rows)
CODEBOOK_CLASSES = kind_classes(CodebookModule, "Codebook", "with a k-means codebook weight")
CodebookLinear, CodebookConv, CodebookEmbedding = (CODEBOOK_CLASSES[k]
                                                   for k in (LINEAR, CONV, EMBEDDING))


# -- the pass -----------------------------------------------------------------------------


class Share(Pass):
    """k-means weight sharing with a ``bits``-bit codebook per layer (or one for all)."""

    name = "share"
    summary = ("Weight sharing (Deep Compression): per-layer 1-D k-means codebook of 2^bits "
               "centroids, bits-bit indices packed; pruned zeros stay exactly zero.")
    # 4-bit sharing changes the digits models' outputs by ~1% (rel. L2) and MiniLM's
    # embeddings to cosine ~0.99; 2-3 bits go past this and need fine-tuning.
    traits = PassTraits(tolerance=Tolerance(min_cosine=0.98, min_top1=0.95), replaces_tensors=True,
                        runtime_modules=tuple(CODEBOOK_CLASSES.values()))

    bits = option(4, "bits per weight index; the codebook holds up to 2**bits centroids",
                  low=1, high=8)
    scope = option("layer", "'layer': one codebook per layer; 'global': one for all selected "
                   "layers", choices=("layer", "global"))
    include = option(["*"], "glob patterns on weight or layer names to share")
    exclude = option([], "glob patterns to leave alone")
    ops = option(["linear", "conv", "embedding"], "kinds of weighted ops to share")
    decode = option("per_call", "'per_call': decode the weight on every forward (memory); "
                    "'once': decode at the first forward and keep it (speed, not stored)",
                    choices=("per_call", "once"))
    max_iter = option(1000, "most Lloyd iterations per k-means fit (each costs microseconds)",
                      low=1)
    bias_bits = option(0, "store each layer's bias on an affine grid of this many bits "
                       "(2-8; 0 keeps it float32)", low=0, high=8)

    def check_options(self) -> None:
        bad = [k for k in self.ops if k not in KINDS]
        if bad:
            raise OptionError(self.name, "ops", f"unknown op kind(s) {bad}; choose from {KINDS}")
        if not self.ops:
            raise OptionError(self.name, "ops", f"give at least one op kind of {KINDS}")
        if self.bias_bits == 1:
            raise OptionError(self.name, "bias_bits", "a 1-bit grid holds only the smallest and "
                              "largest bias; use 2-8, or 0 to keep biases in float")

    def run(self, gm, ctx: PassContext) -> PassResult:
        all_ops = weighted_ops(gm, self.ops)
        chosen, unmatched = select(all_ops, self.include, self.exclude)
        check_glob_matches(self.name, unmatched, [op.name for op in all_ops])
        weights = {op.key: op.weight().detach() for op in unique_weights(chosen)}
        k = 1 << self.bits
        start = time.perf_counter()
        with torch.no_grad():
            if self.scope == "global" and weights:
                joined = torch.cat([w.reshape(-1).float() for w in weights.values()])
                fit = kmeans_1d(joined, k, self.max_iter)
                del joined
                fits = {name: fit for name in weights}
            else:
                fits = {name: kmeans_1d(w, k, self.max_iter) for name, w in weights.items()}
            encoded = {}
            for name, w in weights.items():
                fit = fits[name]
                codes = (fit.codes.view(w.shape) if fit.codes is not None and self.scope == "layer"
                         else fit.encode(w, torch.uint8))
                fit.codes = None
                codebook = fit.centroids.to(w.dtype)
                # tied weights (one tensor, several ops) share one set of stored tensors
                encoded[name] = (codebook, codes)
        kmeans_seconds = time.perf_counter() - start

        layers: dict[str, dict] = {}
        built: dict[str, CodebookModule] = {}
        for op in chosen:
            w = weights[op.key]
            codebook, codes = encoded[op.key]
            bias = op.bias()
            module = CODEBOOK_CLASSES[op.kind](op.kind, op.spec, tuple(w.shape), self.bits,
                                               codebook, codes, bias, fits[op.key].zero_code,
                                               self.decode == "once", bias_bits=self.bias_bits)
            first = built.get(op.key)
            if first is not None:  # a tied weight: point at the same stored tensors
                module.codebook, module.codes = first.codebook, first.codes
            else:
                built[op.key] = module
                fit = fits[op.key]
                layers[op.name] = {
                    "clusters": int(codebook.numel()), "zero_code": fit.zero_code,
                    "iterations": fit.iterations, "converged": fit.converged,
                    "bytes_before": w.numel() * w.element_size(),
                    "bytes_after": module.weight_bits() // 8}
            op.replace_with(module)
        n = sum(w.numel() for w in weights.values())
        stored_bits = sum(m.weight_bits() for m in built.values())
        return PassResult(gm, changed=bool(chosen), stats={
            "skipped": skipped_weights(gm),
            "layers": layers, "weights": n, "bits": self.bits, "scope": self.scope,
            "kmeans_seconds": kmeans_seconds,
            "bits_per_weight": stored_bits / n if n else 0.0})
