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

from fxpress.errors import ArtifactFormatError, ArtifactLimitError, InputError
from fxpress.graph.artifact import ops
from fxpress.graph.artifact.rnn import _shape
from fxpress.graph.runtime import RuntimeModule

aten = torch.ops.aten


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




# -- what a loaded graph may allocate from sizes the file states -----------------------------

def _ints(v: Any) -> list | None:
    """The numbers of a constant size (an int, a float factor, or nested lists of them);
    None when any part is computed by the graph."""
    if isinstance(v, bool):
        return [int(v)]
    if isinstance(v, (int, float)):
        return [v]
    if isinstance(v, (list, tuple)):
        out: list = []
        for x in v:
            xs = _ints(x)
            if xs is None:
                return None
            out += xs
        return out
    return None


def _prod(v: Any) -> float | None:
    xs = _ints(v)
    if xs is None:
        return None
    n = 1.0
    for x in xs:
        n *= max(abs(x), 1)
    return n


def _arange(start: Any = 0, end: Any = None, step: Any = 1) -> float | None:
    xs = _ints([start, end, step])
    if xs is None or end is None:
        return None
    start, end, step = xs
    return abs(end - start) / max(abs(step), 1e-300)


def _pads(pad: Any = None) -> float | None:
    xs = _ints(pad)
    if xs is None:
        return None
    n = 1.0
    for i in range(0, len(xs) - 1, 2):
        n *= 1 + abs(xs[i]) + abs(xs[i + 1])
    return n


def _padding(padding: Any = None, output_padding: Any = None) -> float | None:
    """A convolution's factor on its input's size from its padding (each side)."""
    xs = _ints([padding, output_padding if output_padding is not None else 0])
    if xs is None:
        return None
    n = 1.0
    for x in xs:
        n *= 1 + 2 * abs(x)
    return n


#: op name (ATen packet, torch / torch.nn.functional function or Tensor method) -> how its
#: output's size (or its factor on the input's size) follows from its arguments: (ATen
#: argument names, positions in a torch function's / method's arguments after ``self``,
#: how they combine). A varargs size (``x.repeat(2, 3)``) is all positional ints.
_SIZE = {"prod": _prod, "arange": _arange, "pads": _pads,
         "padding": _padding, "pair": lambda **kw: _prod([v for v in kw.values() if v is not None] * (
             2 if len([v for v in kw.values() if v is not None]) == 1 else 1))}
ALLOCATORS: dict[str, tuple[tuple[str, ...], str, bool]] = {
    # name: (aten argument names, kind, method/torch form takes the input first)
    **{n: (("size",), "prod", False) for n in ("zeros", "ones", "rand", "randn", "full")},
    "randint": (("size",), "prod", False),
    **{n: (("size",), "prod", True) for n in ("new_zeros", "new_ones", "new_full", "expand",
                                              "expand_copy", "broadcast_to")},
    "repeat": (("repeats",), "prod", True), "tile": (("dims",), "prod", True),
    "arange": (("start", "end", "step"), "arange", False),
    "range": (("start", "end", "step"), "arange", False),
    **{n: (("steps",), "prod", False) for n in ("linspace", "logspace")},
    "eye": (("n", "m"), "pair", False),
    **{n: (("row", "col"), "pair", False) for n in ("tril_indices", "triu_indices")},
    "randperm": (("n",), "prod", False),
    "bincount": (("minlength",), "prod", True), "histc": (("bins",), "prod", True),
    "one_hot": (("num_classes",), "prod", True), "multinomial": (("num_samples",), "prod", True),
    "repeat_interleave": (("repeats", "output_size"), "prod", True),
    **{n: (("pad",), "pads", True) for n in ("constant_pad_nd", "pad")},
    **{n: (("padding", "output_padding"), "padding", True) for n in (
        "convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
        "conv_transpose3d", "im2col")},
    **{n: (("output_size",), "prod", True) for n in (
        "col2im", "fold", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
        "_adaptive_avg_pool2d", "_adaptive_avg_pool3d")},
    "interpolate": (("size", "scale_factor"), "prod", True),
    **{n: (("output_size", "scale_factors"), "prod", True) for n in (
        "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
        "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d")},
    # torch.fft: the transform length ``n`` (1-D) or lengths ``s`` (n-D) set the output's size
    **{f"fft_{n}": (("n",), "prod", True) for n in ops._FFT_1D.split()},
    **{f"fft_{n}": (("s",), "prod", True) for n in ops._FFT_ND.split()},
}
#: torch / functional forms whose positional arguments differ from ATen's
_POSITIONAL = {"arange": None, "range": None, "eye": ("n", "m"), "linspace": (None, None, "steps"),
               "logspace": (None, None, "steps"), "tril_indices": ("row", "col"),
               "triu_indices": ("row", "col"), "randperm": ("n",), "bincount": (None, "minlength"),
               "histc": ("bins",), "one_hot": ("num_classes",), "multinomial": ("num_samples",),
               "pad": ("pad",), "repeat_interleave": ("repeats",), "full": ("size",),
               "randint": None, "broadcast_to": ("size",), "tile": ("dims",),
               **{f"conv{d}d": (None, None, None, "padding") for d in (1, 2, 3)},
               **{f"conv_transpose{d}d": (None, None, None, "padding", "output_padding")
                  for d in (1, 2, 3)},
               "fold": ("output_size",), "interpolate": ("size", "scale_factor"),
               **{f"adaptive_{k}_pool{d}d": ("output_size",) for k in ("avg", "max")
                  for d in (1, 2, 3)},
               **{f"fft_{n}": ("n",) for n in ops._FFT_1D.split()},
               **{f"fft_{n}": ("s",) for n in ops._FFT_ND.split()}}


def _size_args(name: str, node: torch.fx.Node) -> dict[str, Any] | None:
    """The size arguments of an allocating call, by ATen name; None if not one."""
    names, kind, takes_input = ALLOCATORS[name]
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        bound = _bound(target, node.args, node.kwargs)
        return {k: bound.get(k) for k in names if k in bound}
    # a method's self, or a function's input (torch.bincount(input, ...), F.pad(input, ...))
    args = list(node.args[1:] if node.op == "call_method" or takes_input else node.args)
    kw = {k: v for k, v in node.kwargs.items() if k in names or k in ("start", "end", "step", "size")}
    if name in ("arange", "range"):
        nums = args[:3]
        if len(nums) == 1:
            kw.setdefault("end", nums[0])
        elif nums:
            kw.update(zip(("start", "end", "step"), nums))
        return kw
    if name == "randint":
        sized = [a for a in args if isinstance(a, (list, tuple))]
        return {"size": sized[0] if sized else kw.get("size")}
    pos = _POSITIONAL.get(name)
    if pos is None:  # a size: one list, or varargs ints
        first = args[0] if args else kw.get(names[0])
        size = first if isinstance(first, (list, tuple)) or len(args) <= 1 else args
        return {names[0]: size}
    out = {k: v for k, v in zip(pos, args) if k is not None}
    out.update({k: v for k, v in kw.items() if k in names})
    return out


def _alloc_name(node: torch.fx.Node) -> str | None:
    t = node.target
    if node.op == "call_method":
        name = str(t)
    elif isinstance(t, torch._ops.OpOverload):
        name = t._schema.name.split("::")[-1]
    elif node.op == "call_function" and getattr(t, "__module__", "") in (
            "torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch._C._fft",
            "torch._C._VariableFunctions", None):
        name = getattr(t, "__name__", "")
    else:
        return None
    return name if name in ALLOCATORS else None


def check_constant_sizes(graph: torch.fx.Graph, limit: int, where: str) -> None:
    """Refuse a graph whose allocating calls (:data:`ALLOCATORS`: ``zeros``, ``full``,
    ``arange``, ``new_zeros``, ``repeat``, ``expand``, ``bincount``'s ``minlength``,
    ``histc``'s ``bins``, pads, ...) state as constants a size, or a factor on their input's
    size, whose float32 tensor exceeds ``limit`` bytes (the load's tensor-bytes limit).
    Sizes the graph computes at run time are not bounded here."""
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = _alloc_name(node)
        if name is None:
            continue
        args = _size_args(name, node)
        if not args:
            continue
        kind = ALLOCATORS[name][1]
        if kind == "prod":
            known = [_prod(v) for v in args.values() if v is not None]
            n = max((k for k in known if k is not None), default=None)
        else:
            n = _SIZE[kind](**args)
        if n is not None and n * 4 > limit:
            raise ArtifactLimitError(
                f"{where}: node {node.name!r} ({name}) allocates {n:.3g} elements from sizes "
                f"the file states, past the limit of {limit} bytes; pass max_bytes= to load() "
                "if you trust the file")



#: torch.nn classes whose fields set a size: field -> how (as :data:`ALLOCATORS`)
_MODULE_SIZES = {
    **{f"Conv{d}d": {"padding": "padding"} for d in (1, 2, 3)},
    **{f"ConvTranspose{d}d": {"padding": "padding", "output_padding": "padding"} for d in (1, 2, 3)},
    **{n: {"size": "prod", "scale_factor": "prod"} for n in (
        "Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d")},
    **{f"Adaptive{k}Pool{d}d": {"output_size": "prod"} for k in ("Avg", "Max") for d in (1, 2, 3)},
    **{f"{k}Pad{d}d": {"padding": "pads"} for k in ("Zero", "Constant", "Reflection",
                                                  "Replication", "Circular") for d in (1, 2, 3)},
    "Fold": {"output_size": "prod"},
}


def check_module_sizes(root: torch.nn.Module, limit: int, where: str) -> None:
    """Refuse a torch.nn module from a file whose size fields (a conv's padding, an
    upsampling's size or factor, an adaptive pool's output size, a pad) make a float32
    tensor past ``limit`` bytes when it runs."""
    for path, m in root.named_modules():
        spec = m.__dict__.get("spec") if isinstance(m, RuntimeModule) else None
        if isinstance(spec, dict) and m.__dict__.get("kind") == "conv":
            # a compressed conv's padding (its spec) sizes what it computes the same way
            for field, n in (("padding", _padding(spec.get("padding"), spec.get("output_padding"))),
                             ("reversed_padding", _pads(spec.get("reversed_padding")))):
                if n is not None and n * 4 > limit:
                    raise ArtifactLimitError(
                        f"{where}: module {path!r}: {type(m).__name__} spec {field} makes "
                        f"{n:.3g} elements when it runs, past the limit of {limit} bytes; pass "
                        "max_bytes= to load() if you trust the file")
        fields = _MODULE_SIZES.get(type(m).__name__)
        for field, kind in (fields or {}).items():
            v = getattr(m, field, None)
            if kind == "pads" and isinstance(v, (list, tuple)):
                n = _pads(v)
            elif kind == "padding":
                n = _padding(v)
            else:
                n = _prod(v)
            if n is not None and n * 4 > limit:
                raise ArtifactLimitError(
                    f"{where}: module {path!r}: {type(m).__name__}.{field} = {v!r} makes "
                    f"{n:.3g} elements when it runs, past the limit of {limit} bytes; pass "
                    "max_bytes= to load() if you trust the file")


__all__ = ["CHECKS", "ALLOCATORS", "check_module_sizes", "fxpress_kernel_guard", "guard_kernel_calls",
           "check_constant_sizes"]
