"""The input sizes an exported graph runs at, checked on every call, stored artifacts too.

``torch.export`` specialises what the model's Python depends on: a dimension a loop runs
over is fixed (``gm.meta["fxpress"]["fixed_dims"]``), and a size the code branches on
(``if ids.shape[1] > 10``) keeps the branch the example took, its range narrowed
(``["bounded_dims"]``). Export guards those with generated code (``_guards_fn`` and a
forward pre-hook raising ``AssertionError``), which an artifact cannot store: a loaded graph
ran any size, and an input past a branch silently computed the branch it was captured
with. :func:`guard_input_sizes` installs fxpress's own check from the metadata, at capture
and at load, so the graph refuses such an input with an :class:`~fxpress.errors.InputError`
that names the input, the dimension and the sizes it runs at.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fxpress.errors import InputError


def _sizes(meta: dict) -> dict[int, dict[int, tuple[int, int | None]]]:
    """(input, dim) -> (low, high) from ``fixed_dims`` and ``bounded_dims`` (JSON-restored
    keys included); malformed entries are ignored (the check only ever refuses inputs)."""
    out: dict[int, dict[int, tuple[int, int | None]]] = {}
    for key, fixed in (("fixed_dims", True), ("bounded_dims", False)):
        table = meta.get(key)
        if not isinstance(table, dict):
            continue
        for i, dims in table.items():
            if not isinstance(dims, dict):
                continue
            for d, v in dims.items():
                try:
                    if fixed:
                        lo = hi = int(v)
                    else:
                        lo, hi = int(v[0]), (None if v[1] is None else int(v[1]))
                    where, dim = int(i), int(d)
                except (TypeError, ValueError, IndexError, KeyError, OverflowError):
                    continue  # OverflowError: a crafted file's Infinity
                if where >= 0 and dim >= 0:  # a negative dim indexed past a 1-D input
                    out.setdefault(where, {})[dim] = (lo, hi)
    return out


def _check(sizes: dict[int, dict[int, tuple[int, int | None]]], module, args, kwargs) -> None:
    flat = pytree.tree_leaves((tuple(args), dict(kwargs or {})))
    for i, dims in sizes.items():
        x = flat[i] if i < len(flat) else None
        if not isinstance(x, torch.Tensor):
            continue
        for d, (lo, hi) in dims.items():
            if d >= x.dim():
                continue
            n = x.shape[d]
            if lo <= n and (hi is None or n <= hi):
                continue
            runs = f"= {lo}" if lo == hi else f"in [{lo}, {'inf' if hi is None else hi}]"
            raise InputError(
                f"input {i} dim {d} is {n}: this graph runs only for input {i} dim {d} {runs} "
                "(torch.export specialised the graph to the example inputs' size there: a "
                "weight's width, a loop over it or a branch on it; see gm.meta['fxpress']['why']). "
                "Capture again "
                "with example inputs of the size you will run, or make the model's code "
                "size-independent")


def guard_input_sizes(gm: torch.nn.Module, meta: dict[str, Any] | None = None) -> bool:
    """Install the size check of ``meta`` (default ``gm.meta["fxpress"]``) as a forward
    pre-hook that runs first (replacing one installed before: ``torch.fx.GraphModule``'s
    deep copy drops hooks, so :func:`~fxpress.graph.capture.clone_structure` installs it
    again); return whether there was anything to check."""
    if meta is None:
        meta = (getattr(gm, "meta", None) or {}).get("fxpress") or {}
    sizes = _sizes(meta)
    if not sizes:
        return False
    for k, h in list(gm._forward_pre_hooks.items()):  # once: a copy may carry the check
        if isinstance(h, functools.partial) and h.func is _check:
            del gm._forward_pre_hooks[k]
            gm._forward_pre_hooks_with_kwargs.pop(k, None)
    gm.register_forward_pre_hook(functools.partial(_check, sizes), with_kwargs=True, prepend=True)
    return True


__all__ = ["guard_input_sizes"]
