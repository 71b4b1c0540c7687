"""small: store the small float tensors a compressed model still keeps in float on an
8-bit grid.

After pruning and sharing, a small model's weight matrices take a few bits per weight,
and what is left in float32 dominates its file: LayerNorm weights and biases, a learned
position embedding, constants the graph reads (``get_attr``). On the Deep-Compressed 64x2 digits transformer these were ~5 KB of a 12 KB
file. ``small{bits=8}`` stores each such tensor as ``bits``-bit codes plus either

* a per-tensor affine grid: ``value = scale · (code − zero)`` (``[scale, zero]``, 8 bytes), or
* a k-means codebook of up to ``2**bits`` centroids (``value = codebook[code]``), chosen only
  when the tensor is large enough that the codebook costs at most a quarter of the affine
  form's bytes and it is more accurate (lower squared error);

and decodes them once, when the module is built or loaded, into non-persistent buffers:
``state_dict`` (and the artifact) hold the codes and grids only, the forward pass computes
exactly as before from the decoded values. The verifier checks the pass like any lossy one.

What it rewrites (``include``/``exclude`` globs on the tensors' qualified names, tensors of
at most ``max_numel`` elements):

* ``get_attr`` nodes reading a float tensor: the node becomes a call of a
  :class:`GridConstant` module that returns the decoded tensor;
* ``LayerNorm``, ``RMSNorm`` and ``GroupNorm`` modules: each becomes a :class:`GridNorm`
  that computes the same normalisation from its decoded weight and bias.

Weighted layers (linear, conv, embedding) are the weight passes' business: ``share`` and
``quantize`` store their weights, and ``share{bias_bits=8}`` their biases, on grids.

The built-in ``deep-compression`` recipe ends with it.

Example::

    res = fxpress.compress(model, "prune{sparsity=0.9},share{bits=4,bias_bits=8},small",
                           calibration=batches)
    res.records[-1].stats["tensors"]     # every tensor stored on a grid: mode, bytes, error
"""
from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.errors import OptionError
from fxpress.graph.runtime import RuntimeModule, StateCheck
from fxpress.passes.base import Pass, PassContext, PassResult, PassTraits, Tolerance, option
from fxpress.passes.kmeans1d import kmeans_1d
from fxpress.passes.quantize_grid import dequantize_weight, load_codes, store_codes, tensor_grid

_NORMS = {nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm"}
if hasattr(nn, "RMSNorm"):
    _NORMS[nn.RMSNorm] = "rms_norm"


def encode_grid(t: torch.Tensor, bits: int) -> tuple[str, torch.Tensor, torch.Tensor, float]:
    """(mode, stored codes, grid, squared error) of the float tensor ``t`` at ``bits`` bits:
    mode ``"affine"`` (grid ``[scale, zero]``) or ``"codebook"`` (grid: the centroids),
    whichever :mod:`this module <fxpress.passes.small>`'s rule picks. The codes are
    ``store_codes``' packed layout of a ``[1, n]`` row."""
    flat = t.detach().float().reshape(1, -1)
    n = flat.numel()
    codes, grid = tensor_grid(flat, bits)
    best = ("affine", store_codes(codes, bits, "affine"), grid,
            float((dequantize_weight(codes, grid[:1].reshape(1, 1),
                                     grid[1:].reshape(1, 1).to(torch.int32)) - flat).pow(2).sum()))
    k = 1 << bits
    # a codebook of k floats costs 4k bytes: only where that is at most a quarter of the codes'
    if n > 1 and 4 * k * 4 <= math.ceil(n * bits / 8):
        fit = kmeans_1d(flat, k, reserve_zero=False)
        cb_codes = fit.encode(flat, torch.int64).reshape(1, -1)
        err = float((fit.centroids.float()[cb_codes] - flat).pow(2).sum())
        if err < best[3]:
            packed = store_codes(cb_codes.to(torch.int32), bits, "affine")
            best = ("codebook", packed, fit.centroids.float().clone(), err)
    return best


def decode_grid(mode: str, stored: torch.Tensor, grid: torch.Tensor, bits: int,
                shape: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor :func:`encode_grid` stored (``shape``, ``dtype``)."""
    n = math.prod(shape)
    codes = load_codes(stored, bits, "affine", n)
    if mode == "codebook":
        values = grid[codes.reshape(-1).long().clamp_(0, grid.numel() - 1)]
    else:
        values = dequantize_weight(codes, grid[:1].reshape(1, 1), grid[1:2].reshape(1, 1).to(torch.int32))
    return values.reshape(shape).to(dtype)


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _stored_bytes(n: int, bits: int) -> int:
    """Bytes of ``store_codes``' layout of one row of ``n`` codes (padded to whole bytes)."""
    return n if bits == 8 else (n + (-n) % 8) * bits // 8


class GridTensors(RuntimeModule):
    """A runtime module whose float tensors are stored as ``bits``-bit codes and a grid
    (``<name>_codes``, ``<name>_grid``) and decoded once into non-persistent buffers
    named as the tensors were (see :func:`encode_grid`)."""

    #: tensor name -> {"shape", "dtype", "mode"} (set per instance; config())
    grids = None
    bits = 8

    def _init_grids(self, tensors: dict[str, torch.Tensor | None], bits: int) -> dict[str, dict]:
        """Encode ``tensors`` (None ones stay None); return each one's mode, bytes and error."""
        self.bits, self.grids = int(bits), {}
        report = {}
        for name, t in tensors.items():
            if t is None:
                self.register_buffer(name, None)
                continue
            mode, stored, grid, err = encode_grid(t, self.bits)
            self.grids[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                "mode": mode}
            self.register_buffer(f"{name}_codes", stored)
            self.register_buffer(f"{name}_grid", grid)
            norm = float(t.detach().float().pow(2).sum())
            report[name] = {"mode": mode, "numel": t.numel(),
                            "bytes_before": t.numel() * t.element_size(),
                            "bytes_after": stored.numel() + 4 * grid.numel(),
                            "rel_l2": math.sqrt(err / norm) if norm > 0 else math.sqrt(err)}
        self._decode_all()
        return report

    def _decode_all(self) -> None:
        for name, g in self.grids.items():
            dtype = getattr(torch, g["dtype"])
            self.register_buffer(name, decode_grid(g["mode"], self._buffers[f"{name}_codes"],
                                                   self._buffers[f"{name}_grid"], self.bits,
                                                   g["shape"], dtype), persistent=False)

    # -- fine-tuning (a recovery step after this pass trains through the grid) ----------
    def begin_training(self) -> list[nn.Parameter]:
        """A float latent per tensor, used through a straight-through estimator: forward
        sees each value on its grid (the stored affine grid or codebook, unchanged), the
        gradient reaches the latent. :meth:`end_training` stores the final grid codes."""
        if getattr(self, "_latents", None):
            return list(self._latents.values())
        self._latents = {}
        for name in self.grids:
            latent = nn.Parameter(self._buffers[name].detach().float().clone())
            self.register_parameter(f"{name}_latent", latent)
            self._latents[name] = latent
        return list(self._latents.values())

    def _value(self, name: str) -> torch.Tensor | None:
        latents = getattr(self, "_latents", None)
        if not latents or name not in latents:
            return self._buffers.get(name)
        g, lat = self.grids[name], latents[name]
        on_grid = self._snap(name, lat)
        return (on_grid + (lat - lat.detach())).to(getattr(torch, g["dtype"]))

    def _snap(self, name: str, w: torch.Tensor, codes_only: bool = False) -> torch.Tensor:
        """``w`` on tensor ``name``'s stored grid (values; or the codes, ``[1, n]`` int32)."""
        g, grid = self.grids[name], self._buffers[f"{name}_grid"]
        flat = w.detach().float().reshape(1, -1)
        hi = (1 << self.bits) - 1
        if g["mode"] == "affine":
            scale, zero = grid[0], grid[1]
            codes = torch.clamp(torch.round(flat / scale) + zero, 0, hi) if scale > 0 \
                else torch.full_like(flat, float(zero))
            if codes_only:
                return codes.to(torch.int32)
            return ((codes - zero) * scale).reshape(w.shape)
        values, order = torch.sort(grid)
        idx = order[torch.bucketize(flat, (values[1:] + values[:-1]) / 2)]
        return idx.to(torch.int32) if codes_only else grid[idx].reshape(w.shape)

    def end_training(self) -> None:
        """Store each latent's codes on its grid; the decoded buffers follow."""
        latents = getattr(self, "_latents", None)
        if not latents:
            return
        for name, lat in latents.items():
            codes = self._snap(name, lat, codes_only=True)
            self._buffers[f"{name}_codes"] = store_codes(codes, self.bits, "affine")
            del self._parameters[f"{name}_latent"]
        self._latents = {}
        self._decode_all()

    @classmethod
    def load_bytes(cls, config: dict) -> int:
        """The decoded tensors (and their int32 codes) :meth:`from_state` builds: a few
        bytes of codes may declare a large tensor, so the loader bounds them first."""
        grids = config.get("grids") or {}
        return sum(math.prod(g["shape"]) * (_ITEMSIZE.get(g.get("dtype"), 8) + 4)
                   for g in grids.values())

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor],
                   parameters=()) -> "GridTensors":
        m = super().from_state(config, tensors, parameters)
        m.check_state(StateCheck(m))
        m._decode_all()
        return m

    def check_state(self, check: StateCheck) -> None:
        """Refuse (:class:`StateError`, naming the field) grids whose codes do not fit
        their shape and bits, or a grid of another size than its mode stores."""
        grids = self.grids
        if not isinstance(grids, dict):
            check.fail("config 'grids'", "must map tensor names to their shape, dtype and mode")
        bits = check.integer("bits", 2, 8)
        for name, g in grids.items():
            field = f"config 'grids.{name}'"
            if not isinstance(g, dict) or set(g) != {"shape", "dtype", "mode"} \
                    or g["mode"] not in ("affine", "codebook") \
                    or g["dtype"] not in ("float32", "float16", "bfloat16", "float64") \
                    or not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                check.fail(field, f"grid {name!r} is malformed")
            check.sizes(f"grids.{name}.shape", range(0, 33), 0, value=g["shape"])
            n = math.prod(g["shape"])
            check.tensor(f"{name}_codes", dtypes=(torch.uint8,), numel=_stored_bytes(n, bits))
            check.tensor(f"{name}_grid", dtypes=(torch.float32,), finite=True,
                         shape=[2] if g["mode"] == "affine" else None)
            if g["mode"] == "codebook" and not 1 <= self._buffers[f"{name}_grid"].numel() <= 1 << bits:
                check.fail(f"tensor '{name}_grid'", f"a codebook of {bits}-bit codes holds "
                           f"1..{1 << bits} values")

    def config(self) -> dict:
        return {"bits": self.bits, "grids": self.grids}


class GridConstant(GridTensors):
    """A constant tensor the graph reads (``get_attr``), stored on a grid; calling the
    module returns it."""

    def __init__(self, value: torch.Tensor, bits: int):
        super().__init__()
        self.report = self._init_grids({"value": value}, bits)

    def forward(self) -> torch.Tensor:
        return self._value("value")


class GridNorm(GridTensors):
    """``LayerNorm``, ``RMSNorm`` or ``GroupNorm`` with its weight and bias stored on a grid."""

    def __init__(self, norm: nn.Module, bits: int):
        super().__init__()
        self.kind = _NORMS[type(norm)]
        self.eps = norm.eps
        if self.kind == "group_norm":
            self.num_groups = int(norm.num_groups)
            self.normalized_shape = []
        else:
            self.num_groups = 0
            self.normalized_shape = [int(s) for s in norm.normalized_shape]
        self.report = self._init_grids({"weight": getattr(norm, "weight", None),
                                        "bias": getattr(norm, "bias", None)}, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._value("weight"), self._value("bias")
        if self.kind == "layer_norm":
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        if self.kind == "rms_norm":
            return F.rms_norm(x, self.normalized_shape, weight, self.eps)
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)

    def config(self) -> dict:
        return {**super().config(), "kind": self.kind, "eps": self.eps,
                "num_groups": self.num_groups, "normalized_shape": self.normalized_shape}

    def check_state(self, check: StateCheck) -> None:
        """Also what every call would refuse (or compute on other shapes)."""
        super().check_state(check)
        kind = check.choice("kind", ("layer_norm", "rms_norm", "group_norm"))
        eps = self.eps
        if not ((eps is None and kind == "rms_norm") or (
                isinstance(eps, (int, float)) and not isinstance(eps, bool)
                and math.isfinite(eps) and eps >= 0)):
            check.fail("config 'eps'", f"is {eps!r}, expected a finite number >= 0 "
                       "(None: rms_norm only)")
        if kind == "group_norm":
            groups = check.integer("num_groups", 1)
            check.sizes("normalized_shape", (0,), value=self.normalized_shape)
        else:
            check.integer("num_groups", 0, 0)
            shape = check.sizes("normalized_shape", range(1, 9))
        for name, g in self.grids.items():
            if name not in ("weight", "bias") or (kind != "group_norm" and g["shape"] != shape) or (
                    kind == "group_norm" and (len(g["shape"]) != 1 or g["shape"][0] % groups)):
                check.fail(f"config 'grids.{name}'", f"GridNorm {kind!r}: grid {name!r} of shape "
                           f"{g['shape']} does not fit its config")

    @classmethod
    def from_state(cls, config, tensors, parameters=()):
        m = super().from_state(config, tensors, parameters)
        for name in ("weight", "bias"):
            if name not in m._buffers:
                m.register_buffer(name, None)
        return m


GRID_CLASSES = (GridConstant, GridNorm)


def _matches(name: str, include, exclude) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(
        fnmatch.fnmatchcase(name, p) for p in exclude)


class Small(Pass):
    """Store the small float tensors left in float (norms, position embeddings, graph
    constants) as ``bits``-bit codes on a per-tensor grid, decoded at load."""

    name = "small"
    summary = ("Store small float tensors left in float (LayerNorm/RMSNorm/GroupNorm weights "
               "and biases, position embeddings and other get_attr constants) as 8-bit codes "
               "on a per-tensor affine grid or k-means codebook, decoded at load.")
    # 8-bit grids on norms and embeddings move a small classifier's logits by ~1e-3 (rel. L2)
    traits = PassTraits(tolerance=Tolerance(min_cosine=0.995, min_top1=0.98), replaces_tensors=True,
                        runtime_modules=GRID_CLASSES)

    bits = option(8, "bits per stored value (the codebook holds up to 2**bits centroids)",
                  low=2, high=8)
    max_numel = option(1 << 16, "only tensors of at most this many elements (larger float "
                       "weights are the quantize/share passes' business)", low=1)
    include = option(["*"], "glob patterns on tensor or module names to store on a grid")
    exclude = option([], "glob patterns to leave in float")

    def check_options(self) -> None:
        if not self.include:
            raise OptionError(self.name, "include", "give at least one glob pattern")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        from fxpress.graph.weights import KINDS, _set_submodule, weighted_ops

        # the weights and biases of linear/conv/embedding ops (get_attr reads in export
        # graphs) are the weight passes' business, however small
        layer_tensors = set()
        for op in weighted_ops(gm, KINDS, fused=True):
            layer_tensors.update(op.tied or (op.name,))
            if op._bias_name is not None:
                layer_tensors.add(op._bias_name)
        stats: dict[str, dict] = {}
        done: dict[str, str] = {}  # get_attr target -> the GridConstant's path (tied reads)
        changed = False
        for node in list(gm.graph.nodes):
            if node.op == "call_module":
                name = str(node.target)
                try:
                    mod = gm.get_submodule(name)
                except AttributeError:
                    continue
                if type(mod) not in _NORMS or not _matches(name, self.include, self.exclude):
                    continue
                params = [p for p in (getattr(mod, "weight", None), getattr(mod, "bias", None))
                          if p is not None]
                if not params or any(not p.is_floating_point() or p.numel() > self.max_numel
                                     for p in params):
                    continue
                grid = GridNorm(mod, self.bits)
                _set_submodule(gm, name, grid)
                stats.update({f"{name}.{k}": v for k, v in grid.report.items()})
                changed = True
            elif node.op == "get_attr":
                target = str(node.target)
                if target in layer_tensors:
                    continue
                if target in done:
                    path = done[target]
                else:
                    t = _attr(gm, target)
                    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0 \
                            or t.numel() > self.max_numel or not _matches(target, self.include, self.exclude) \
                            or t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                        continue
                    path = _free_name(gm, target.replace(".", "_") + "_grid")
                    grid = GridConstant(t, self.bits)
                    gm.add_submodule(path, grid.train(gm.training))
                    stats[target] = grid.report["value"]
                    done[target] = path
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_module(path, ())
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                changed = True
        if changed:
            for target in done:  # the float originals are no longer read
                _drop_attr(gm, target)
            gm.graph.lint()
            gm.recompile()
        before = sum(s["bytes_before"] for s in stats.values())
        after = sum(s["bytes_after"] for s in stats.values())
        return PassResult(gm, changed=changed, stats={
            "tensors": stats, "bits": self.bits, "bytes_before": before, "bytes_after": after,
            "worst_rel_l2": max((s["rel_l2"] for s in stats.values()), default=0.0)})


def _attr(gm: torch.fx.GraphModule, target: str):
    owner_path, _, leaf = target.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path) if owner_path else gm
    except AttributeError:
        return None
    return getattr(owner, leaf, None)


def _free_name(gm: torch.fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _drop_attr(gm: torch.fx.GraphModule, target: str) -> None:
    """Remove the tensor ``target`` from its owner unless something still reads it."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) == target:
            return
    owner_path, _, leaf = target.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path) if owner_path else gm
    except AttributeError:
        return
    if leaf in owner._parameters:
        del owner._parameters[leaf]
    elif leaf in owner._buffers:
        del owner._buffers[leaf]
    elif isinstance(owner.__dict__.get(leaf), torch.Tensor):
        del owner.__dict__[leaf]


__all__ = ["Small", "GridTensors", "GridConstant", "GridNorm", "GRID_CLASSES", "encode_grid",
           "decode_grid"]
