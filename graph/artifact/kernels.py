"""Shape checks for the ATen kernels on the allowlist that trust their arguments' shapes.

Most ATen ops compare their arguments' shapes before computing; a few private and native
ones leave it to the public op that calls them, and a graph loaded from a file calls them
directly with tensors and integers the file chose (torch 2.13, CPU):

- the batch-norm kernels (``native_batch_norm``, ``_native_batch_norm_legit``,
  ``_native_batch_norm_legit_no_training``, ``_native_batch_norm_legit_functional``, which
  export graphs of models with BatchNorm emit) read ``weight``, ``bias`` and the running
  statistics at the input's channel count: 2-element statistics for a 16-channel input
  compute on heap memory past them, and in training mode the kernel *writes* the running
  statistics there (the functional form crashed the process);
- the fused weight-norm kernel (``_weight_norm_interface``, and ``_weight_norm`` on dim 0
  or the last dim, which wav2vec2's weight-normed conv emits) reads ``g`` at ``v``'s size
  along ``dim`` (a crafted 2-element ``g`` for 16 rows corrupted the heap: ``munmap_chunk():
  invalid pointer``);
- ``_scaled_dot_product_flash_attention_for_cpu`` (export graphs of attention) reads keys
  and values at the query's batch size, and values at the keys' head count;
- ``grid_sampler`` / ``grid_sampler_2d`` switch on ``interpolation_mode`` and
  ``padding_mode`` integers without a default: another value returns uninitialised memory.

For each call of one of these ops in a loaded graph, the loader checks the arguments
the file fixes (integer constants) at load, and inserts a call of
:func:`fxpress_kernel_guard` before the op for the ones that depend on the input (a few
integer comparisons per call; the writer never stores these guards). The LSTM kernel's
checks live in :mod:`.rnn`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fxpress.errors import ArtifactFormatError, InputError

aten = torch.ops.aten


def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _batch_norm(input: Any = None, weight: Any = None, bias: Any = None, running_mean: Any = None,
                running_var: Any = None, **_: Any) -> str | None:
    if not isinstance(input, torch.Tensor) or input.dim() < 2:
        return f"the input {_shape(input)} has no channel dimension"
    channels = (input.shape[1],)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and _shape(t) != channels:
            return f"{name} is {_shape(t)}, the input {_shape(input)} has {channels[0]} channels"
    return None


def _weight_norm(v: Any = None, g: Any = None, dim: Any = 0, **_: Any) -> str | None:
    if not isinstance(v, torch.Tensor) or not isinstance(g, torch.Tensor) or not isinstance(dim, int):
        return "v and g must be tensors and dim an int"
    if v.dim() == 0 or not (dim == 0 or dim == v.dim() - 1):
        return None  # the unfused route: broadcasting ops that check their shapes
    if g.numel() != v.shape[dim]:
        return f"g {_shape(g)} does not hold one scale per slice of v {_shape(v)} along dim {dim}"
    return None


def _flash(query: Any = None, key: Any = None, value: Any = None, **_: Any) -> str | None:
    q, k, v = _shape(query), _shape(key), _shape(value)
    if q is None or k is None or v is None or not len(q) == len(k) == len(v) == 4:
        return f"query {q}, key {k} and value {v} must be 4-D"
    if not q[0] == k[0] == v[0] or k[1:3] != v[1:3] or k[1] < 1 or q[1] % k[1] or q[3] != k[3]:
        return (f"query {q}, key {k} and value {v} do not fit (batch, heads, length, "
                "head size)")
    return None


def _grid_modes(interpolation_mode: Any = 0, padding_mode: Any = 0, **_: Any) -> str | None:
    for name, v in (("interpolation_mode", interpolation_mode), ("padding_mode", padding_mode)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 2:
            return f"{name} is {v!r}, not 0, 1 or 2"
    return None


#: ATen packet -> (check of its bound arguments, the arguments the check reads)
CHECKS: dict[Any, tuple[Callable[..., str | None], tuple[str, ...]]] = {
    **{p: (_batch_norm, ("input", "weight", "bias", "running_mean", "running_var"))
       for p in (aten.native_batch_norm, aten._native_batch_norm_legit,
                 aten._native_batch_norm_legit_no_training,
                 aten._native_batch_norm_legit_functional)},
    **{p: (_weight_norm, ("v", "g", "dim"))
       for p in (aten._weight_norm_interface, aten._weight_norm)},
    aten._scaled_dot_product_flash_attention_for_cpu: (_flash, ("query", "key", "value")),
    **{p: (_grid_modes, ("interpolation_mode", "padding_mode"))
       for p in (aten.grid_sampler, aten.grid_sampler_2d)},
}


def _bound(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    out = {a.name: a.default_value for a in op._schema.arguments if a.has_default_value()}
    out.update(zip((a.name for a in op._schema.arguments), args))
    out.update(kwargs)
    return out


def fxpress_kernel_guard(op: str, **kwargs: Any) -> None:
    """What the loader calls before a call of ``op`` (an ATen op's name, ``aten::...``) whose
    checked arguments depend on the input: raise :class:`~fxpress.errors.InputError` unless
    they fit (the kernel would read or write past them)."""
    check = _BY_NAME.get(op)
    problem = "no check for this op" if check is None else check(**kwargs)
    if problem is not None:
        raise InputError(f"{op}: {problem}; torch's CPU kernel does not check it and would "
                         "compute past the tensors")


_BY_NAME = {p._qualified_op_name if hasattr(p, "_qualified_op_name") else str(p): c
            for p, (c, _) in CHECKS.items()}
torch.fx.node.has_side_effect(fxpress_kernel_guard)


def guard_kernel_calls(graph: torch.fx.Graph, where: str) -> None:
    """Check the constant arguments of every call of a :data:`CHECKS` op of ``graph`` now
    (:class:`~fxpress.errors.ArtifactFormatError` naming the node) and insert a
    :func:`fxpress_kernel_guard` call before each one whose arguments come from the graph."""
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        entry = CHECKS.get(node.target.overloadpacket)
        if entry is None:
            continue
        check, names = entry
        bound = _bound(node.target, node.args, node.kwargs)
        kwargs = {k: bound[k] for k in names if k in bound}
        name = node.target._schema.name
        if any(isinstance(v, torch.fx.Node) for v in kwargs.values()):
            with graph.inserting_before(node):
                graph.call_function(fxpress_kernel_guard, (name,), kwargs)
            continue
        problem = check(**kwargs)
        if problem is not None:
            raise ArtifactFormatError(f"{where}: node {node.name!r} ({name}): {problem}; "
                                      "torch's CPU kernel does not check it")


__all__ = ["CHECKS", "fxpress_kernel_guard", "guard_kernel_calls"]
