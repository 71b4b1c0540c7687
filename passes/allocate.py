"""Allocation for the planner: one candidate per layer under a byte budget or an error budget.

Greedy on error per byte (over each layer's lower convex hull) and an exact
multiple-choice knapsack over bytes; :func:`allocate` keeps the better of the two.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from fxpress.errors import InputError
from fxpress.passes.sensitivity import SensitivityTable, Trial

def _hull(options: list[Trial]) -> list[int]:
    """Indices of the options on the lower-left frontier (no other is both smaller and
    more accurate), sorted by bytes, descending."""
    order = sorted(range(len(options)), key=lambda k: (-options[k].bytes, options[k].error))
    out, best = [], math.inf
    for k in sorted(order, key=lambda k: (options[k].error, options[k].bytes)):
        if options[k].bytes < best:
            out.append(k)
            best = options[k].bytes
    return sorted(out, key=lambda k: -options[k].bytes)


def _greedy(opts: list[list[Trial]], budget: int) -> list[int] | None:
    """Start at each layer's most accurate option; while over budget, take the step with
    the least error added per byte saved."""
    hulls = [_hull(o) for o in opts]
    at = [0] * len(opts)
    total = sum(o[h[0]].bytes for o, h in zip(opts, hulls))
    while total > budget:
        best, move = math.inf, None
        for i, (o, h) in enumerate(zip(opts, hulls)):
            cur = o[h[at[i]]]
            for j in range(at[i] + 1, len(h)):
                nxt = o[h[j]]
                saved = cur.bytes - nxt.bytes
                if saved <= 0:
                    continue
                ratio = (nxt.error - cur.error) / saved
                if ratio < best:
                    best, move = ratio, (i, j)
        if move is None:
            return None
        i, j = move
        total -= opts[i][hulls[i][at[i]]].bytes - opts[i][hulls[i][j]].bytes
        at[i] = j
    return [h[a] for h, a in zip(hulls, at)]


def _knapsack(opts: list[list[Trial]], budget: int, resolution: int = 4000) -> list[int] | None:
    """Least total error with total bytes <= ``budget`` (multiple-choice knapsack; bytes
    rounded up to units of budget/resolution, so the answer never exceeds the budget)."""
    if budget <= 0:
        return None
    unit = max(1, math.ceil(budget / resolution))
    cap = budget // unit
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    choice = np.full((len(opts), cap + 1), -1, dtype=np.int32)
    weights = [[math.ceil(t.bytes / unit) for t in o] for o in opts]
    for i, o in enumerate(opts):
        new = np.full(cap + 1, np.inf)
        arg = choice[i]
        for k, t in enumerate(o):
            w = weights[i][k]
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = dp[:cap + 1 - w] + t.error
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp = new
    c = int(np.argmin(dp))
    if not np.isfinite(dp[c]):
        return None
    picks = [0] * len(opts)
    for i in range(len(opts) - 1, -1, -1):
        k = int(choice[i][c])
        picks[i] = k
        c -= weights[i][k]
    return picks


def _cost(opts, picks) -> tuple[int, float]:
    return (sum(o[k].bytes for o, k in zip(opts, picks)),
            sum(o[k].error for o, k in zip(opts, picks)))


def allocate(table: SensitivityTable, layer_budget: int | None = None, *,
             max_error: float | None = None,
             forbid: Mapping[str, set[str]] | None = None) -> dict[str, Trial] | None:
    """One option per layer of ``table`` (``keep`` included).

    With ``layer_budget`` (bytes for all weighted layers): the least total predicted error
    that fits (the better of a greedy pass on error per byte and an exact knapsack). With
    only ``max_error``: the fewest bytes whose predicted error is at most ``max_error``.
    ``forbid``: layer -> candidates it may not take. None when nothing fits.
    """
    forbid = forbid or {}
    opts = [[t for t in ls.options() if t.candidate not in forbid.get(ls.name, ())] or
            [ls.options()[0]] for ls in table.layers]
    if layer_budget is not None:
        found = [p for p in (_greedy(opts, layer_budget), _knapsack(opts, layer_budget)) if p]
        if not found:
            return None
        picks = min(found, key=lambda p: (_cost(opts, p)[1], _cost(opts, p)[0]))
    else:
        if max_error is None:
            raise InputError("allocate: give layer_budget=... or max_error=...")
        lo = sum(min(t.bytes for t in o) for o in opts)
        hi = sum(max(t.bytes for t in o) for o in opts)
        picks = None
        if (p := _knapsack(opts, hi)) and _cost(opts, p)[1] <= max_error:
            picks = p
        while picks is not None and hi - lo > max(1, hi // 2000):
            mid = (lo + hi) // 2
            p = _knapsack(opts, mid)
            if p and _cost(opts, p)[1] <= max_error:
                hi, picks = mid, p
            else:
                lo = mid
        if picks is None:
            return None
    return {ls.name: o[k] for ls, o, k in zip(table.layers, opts, picks)}
