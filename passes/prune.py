"""prune: zero the weights of smallest magnitude.

``prune{threshold=0.01}`` zeroes every weight with ``|w| < threshold`` (the seed article's
rule, applied element-wise to the magnitude). ``prune{sparsity=0.9}`` zeroes exactly
``round(0.9 * n)`` weights of smallest magnitude in each selected layer
(``scope="layer"``) or across all selected layers together (``scope="global"``, which
prunes redundant layers harder). Ties at the cut are broken in order, so the count is
exact.

The zeros stay in the dense weight where later passes (share, quantize) and the saver
see them; the artifact stores pruned layers sparse, so the file shrinks. Global scope
finds its threshold with histograms, one layer at a time: it never concatenates the
model's weights, so it needs no extra copy of them.
"""
from __future__ import annotations

import torch

from fxpress.errors import OptionError
from fxpress.graph.weights import KINDS, select, sparsity, unique_weights, weighted_ops
from fxpress.passes.base import Pass, PassContext, PassResult, Tolerance, check_glob_matches, option

_NONE = type(None)


def zero_smallest(w: torch.Tensor, k: int) -> torch.Tensor:
    """A copy of ``w`` with exactly its ``k`` smallest-magnitude entries set to zero.

    >>> zero_smallest(torch.tensor([0.3, -0.1, 0.2, -0.4]), 2)
    tensor([ 0.3000,  0.0000,  0.0000, -0.4000])
    """
    n = w.numel()
    if k <= 0:
        return w
    if k >= n:
        return torch.zeros_like(w)
    a = w.detach().abs().flatten()
    v = torch.kthvalue(a.float(), k).values.to(a.dtype)
    return w.masked_fill(_cut_mask(a, v, k - int((a < v).sum())).view_as(w), 0)


def _cut_mask(a: torch.Tensor, v: torch.Tensor | float, take_equal: int) -> torch.Tensor:
    """``a < v`` plus the first ``take_equal`` entries equal to ``v``."""
    mask = a < v
    if take_equal > 0:
        eq = a == v
        mask |= eq & (torch.cumsum(eq, 0) <= take_equal)
    return mask


def global_kth_smallest(tensors: list[torch.Tensor], k: int, bins: int = 4096,
                        max_candidates: int = 1 << 22) -> float:
    """The ``k``-th smallest magnitude (1-based) over several tensors, without joining them.

    Histograms narrow the value range until the few candidates left are sorted; only
    one layer's magnitudes exist at a time.
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    full = (min(float(t.detach().abs().min()) for t in tensors if t.numel()),
            max(float(t.detach().abs().max()) for t in tensors if t.numel()))
    lo, hi = full
    while True:
        if lo == hi:
            return lo
        below = 0
        inside = 0
        for t in tensors:
            a = t.detach().abs().flatten().float()
            below += int((a < lo).sum())
            inside += int(((a >= lo) & (a <= hi)).sum())
        if inside <= max_candidates:
            cand = torch.cat([a[(a >= lo) & (a <= hi)] for a in
                              (t.detach().abs().flatten().float() for t in tensors)])
            idx = k - below - 1
            if 0 <= idx < cand.numel():
                return float(torch.sort(cand).values[idx])
            # the histogram's approximate edges lost the k-th value: fall back to exact
            lo, hi, max_candidates = full[0], full[1], total
            continue
        hist = torch.zeros(bins, dtype=torch.float64)
        for t in tensors:
            hist += torch.histc(t.detach().abs().flatten().float(), bins, lo, hi).double()
        cum = torch.cumsum(hist, 0) + below
        b = int(torch.searchsorted(cum, torch.tensor(float(k), dtype=torch.float64)))
        b = min(b, bins - 1)
        width = (hi - lo) / bins
        # widen by one bin on each side: histc's float edges are approximate, the next
        # round's counts are exact
        new_lo, new_hi = lo + max(b - 1, 0) * width, min(lo + (b + 2) * width, hi)
        if (new_lo, new_hi) == (lo, hi):
            bins *= 4
        lo, hi = new_lo, new_hi


class Prune(Pass):
    """Magnitude pruning by threshold or target sparsity."""

    name = "prune"
    summary = "Zero the smallest-magnitude weights: |w| < threshold, or a target sparsity per layer or global."
    tolerance = Tolerance(min_cosine=0.9, min_top1=0.9)
    replaces_tensors = True

    threshold = option(None, "zero every weight with |w| < threshold", type=(float, _NONE), low=0.0)
    sparsity = option(None, "fraction of weights to zero (0 <= s < 1)", type=(float, _NONE),
                      low=0.0, high=1.0, high_open=True)
    scope = option("layer", "'layer': each layer reaches the sparsity; 'global': all selected "
                   "layers together", choices=("layer", "global"))
    include = option(["*"], "glob patterns on weight or layer names to prune")
    exclude = option([], "glob patterns to leave alone")
    ops = option(["linear", "conv"], "kinds of weighted ops to prune (linear, conv, embedding)")

    def check_options(self) -> None:
        if (self.threshold is None) == (self.sparsity is None):
            raise OptionError(self.name, "sparsity", "give exactly one of threshold=... or sparsity=...")
        if self.threshold is not None and "scope" in self._given:
            raise OptionError(self.name, "scope", "only applies with sparsity=...; a threshold "
                              "is the same in every layer")
        bad = [k for k in self.ops if k not in KINDS]
        if bad:
            raise OptionError(self.name, "ops", f"unknown op kind(s) {bad}; choose from {KINDS}")

    def run(self, gm, ctx: PassContext) -> PassResult:
        all_ops = weighted_ops(gm, self.ops)
        chosen, unmatched = select(all_ops, self.include, self.exclude)
        check_glob_matches(self.name, unmatched, [op.name for op in all_ops])
        ops = unique_weights(chosen)
        with torch.no_grad():
            if self.threshold is not None:
                for op in ops:
                    w = op.weight()
                    op.set_weight(w.masked_fill(w.abs() < self.threshold, 0))
            elif self.scope == "layer":
                for op in ops:
                    w = op.weight()
                    op.set_weight(zero_smallest(w, round(self.sparsity * w.numel())))
            else:
                self._prune_global(ops)
        layers = {op.name: sparsity(op.weight()) for op in ops}
        n = sum(op.numel for op in ops)
        zeros = sum(layers[op.name] * op.numel for op in ops)
        return PassResult(gm, changed=bool(ops), stats={
            "layers": layers, "pruned_weights": n, "sparsity": zeros / n if n else 0.0})

    def _prune_global(self, ops) -> None:
        weights = [op.weight() for op in ops]
        total = sum(w.numel() for w in weights)
        k = round(self.sparsity * total)
        if k == 0:
            return
        v = global_kth_smallest(weights, k)
        below = [int((w.detach().abs() < v).sum()) for w in weights]
        remaining = k - sum(below)
        for op, w, b in zip(ops, weights, below):
            a = w.detach().abs().flatten()
            eq = int((a == v).sum()) if remaining > 0 else 0
            take = min(eq, remaining)
            remaining -= take
            op.set_weight(w.masked_fill(_cut_mask(a, v, take).view_as(w), 0))
