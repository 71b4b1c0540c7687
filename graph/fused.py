"""Compressed weights of fused calls: LSTM/GRU/RNN gates, ``nn.MultiheadAttention``'s
projections, ``nn.TransformerEncoder(Layer)``'s matrices.

A fused torch.nn module reads its weights inside one kernel call, so no runtime module can
take the place of one of its matrices the way :class:`~fxpress.graph.runtime.CompressedModule`
takes the place of a linear. Instead the module itself is wrapped:

* :class:`FusedCall` (the host was a ``call_module`` leaf of a symbolically traced graph)
  keeps the torch.nn module as its child ``host``, each compressed matrix as a child
  ``w0``, ``w1``, ... (a compressed linear of the pass that built it: quantize, share,
  binarize), and in the host an empty placeholder where the float matrix was. ``forward``
  decodes the matrices and calls the host with them (:func:`torch.func.functional_call`),
  so the host runs its own fused kernel on the decoded weights.
* :class:`DecodedWeight` (the host was an ATen call of an exported graph, which reads its
  weights from ``get_attr`` nodes) replaces each such node by a call that returns the
  decoded matrix.

Mixture-of-experts layers (transformers' Mixtral, Qwen-MoE, ... captured with the
``batched_mm`` kernel, see :func:`fxpress.graph.capture.traceable_experts`) read a 3-D
``[experts, out, in]`` tensor, gather each token's matrices (``aten.index``) and multiply
(``aten.bmm``). Passes see such a tensor as one linear of ``experts * out`` rows (each
expert's output channel a row; an ``[experts, in, out]`` tensor is seen transposed), and a
:class:`DecodedWeight` returns it in its stored 3-D layout.

Both store only the compressed tensors, load from an artifact like every runtime module
(the host is a reviewed torch.nn class, its placeholders are empty), and fine-tune through
the compressed children's own ``begin_training`` (gradients reach them through the fused
kernel).
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from fxpress.graph.memory import trim_heap
from fxpress.graph.runtime import CompressedModule, RuntimeModule, StateCheck
from fxpress.graph.weights import (LINEAR, WeightedOp, _assign, _cast_after, _free_name, _module_kind,
                                   _resolve, _set_submodule)

_aten = torch.ops.aten

_CHILD = re.compile(r"w\d{1,6}")


def placeholder(dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    """What a host keeps where a compressed matrix was: an empty, frozen parameter of the
    matrix's dtype (the decoded matrix is cast to it: a float64 host computes in float64)."""
    return torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)


class FusedCall(RuntimeModule):
    """A fused torch.nn module (child ``host``) with some of its matrices stored compressed
    (children ``w0``, ``w1``, ...; config ``weights`` maps each child to the host's
    parameter name it stands for). Called exactly like the host."""

    def __init__(self, host: torch.nn.Module):
        super().__init__()
        self.host = host
        self.weights: dict[str, str] = {}

    def add(self, name: str, module: CompressedModule) -> str:
        """Store ``module`` for the host's parameter ``name`` (a dotted path inside the
        host); return the child's name."""
        child = f"w{len(self.weights)}"
        self.add_module(child, module)
        self.weights[child] = name
        owner_name, _, attr = name.rpartition(".")
        owner = self.host.get_submodule(owner_name)
        old = owner._parameters.get(attr)
        owner._parameters[attr] = placeholder(old.dtype if old is not None and old.is_floating_point()
                                              else torch.float32)
        if isinstance(owner, torch.nn.RNNBase):  # the kernel reads its list of weights
            owner._init_flat_weights()
        return child

    def config(self) -> dict:
        return {"weights": dict(self.weights)}

    def check_loaded(self, check: StateCheck) -> None:
        """Every entry of ``weights`` a compressed child ``w<i>`` standing for an empty
        parameter of the host (what :meth:`decoded` needs at every call)."""
        if not isinstance(self.weights, dict) or not isinstance(self._modules.get("host"), torch.nn.Module):
            check.fail("config 'weights'", "a fused call needs a host module and a dict of weights")
        host_params = dict(self.host.named_parameters())
        for child, name in self.weights.items():
            module = self._modules.get(child) if _CHILD.fullmatch(str(child)) else None
            if not isinstance(module, CompressedModule) or module.kind != LINEAR:
                check.fail(f"config 'weights.{child}'", "does not name a compressed linear child")
            if not isinstance(name, str) or name not in host_params or host_params[name].numel():
                check.fail(f"config 'weights.{child}'", f"{name!r} is not an empty parameter of "
                           f"the host {type(self.host).__name__}")
        extra = set(self._modules) - set(self.weights) - {"host"}
        if extra:
            check.fail("config 'weights'", f"children {sorted(extra)} are not in it")

    def decoded(self) -> dict[str, torch.Tensor]:
        """The host's parameter name -> its decoded matrix."""
        out = {}
        host_params = dict(self.host.named_parameters())
        for child, name in self.weights.items():
            module = self._modules.get(child) if _CHILD.fullmatch(str(child)) else None
            if not isinstance(module, CompressedModule) or not isinstance(name, str) or (
                    name not in host_params or host_params[name].numel() != 0):
                raise TypeError(f"{type(self).__name__}: weight {child!r} -> {name!r} is not a "
                                "compressed child standing for an empty parameter of its host")
            w = module.dense_weight()
            out[name] = w if w.dtype == host_params[name].dtype else w.to(host_params[name].dtype)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.host, self.decoded(), args, kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{c}={n}" for c, n in self.weights.items())


class DecodedWeight(RuntimeModule):
    """The decoded matrix of a compressed child ``w0``: called with no arguments where an
    exported graph read the float matrix (``get_attr``) to pass it to a fused ATen op."""

    def __init__(self, module: CompressedModule, experts: list[int] | None = None,
                 layout: str = "oi"):
        super().__init__()
        self.w0 = module
        if experts is not None:  # a 3-D expert tensor, seen by passes as [experts*out, in]
            self.experts, self.layout = [int(d) for d in experts], layout

    def config(self) -> dict:
        experts = getattr(self, "experts", None)
        return {} if experts is None else {"experts": list(experts), "layout": self.layout}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor],
                   parameters=()) -> "DecodedWeight":
        m = super().from_state(config, tensors, parameters)
        experts = getattr(m, "experts", None)
        if (experts is not None or "layout" in config) and not (
                isinstance(experts, list) and len(experts) == 3 and getattr(m, "layout", None) in ("oi", "io")
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in experts)):
            raise ValueError(f"experts={experts!r}, layout={getattr(m, 'layout', None)!r}: "
                             "expected three positive ints and 'oi' or 'io'")
        return m

    def check_loaded(self, check: StateCheck) -> None:
        """A compressed linear child ``w0``, whose weight the experts' layout covers."""
        module = self._modules.get("w0")
        if not isinstance(module, CompressedModule) or module.kind != LINEAR or set(self._modules) != {"w0"}:
            check.fail("child 'w0'", "a decoded weight holds one compressed linear child, w0")
        experts = getattr(self, "experts", None)
        shape = getattr(module, "shape", None)
        if experts is not None and isinstance(shape, list) and (
                math.prod(experts) != math.prod(shape) or experts[2] != shape[-1]):
            check.fail("config 'experts'", f"{experts} does not lay out w0's {shape} weight")

    def forward(self) -> torch.Tensor:
        module = self._modules.get("w0")
        if not isinstance(module, CompressedModule):
            raise TypeError(f"{type(self).__name__}: child 'w0' must be a compressed module")
        w = module.dense_weight()
        experts = getattr(self, "experts", None)
        if experts is None:
            return w
        return expert_layout(w, experts, getattr(self, "layout", None), type(self).__name__)


def expert_layout(w: torch.Tensor, experts: Any, layout: Any, where: str) -> torch.Tensor:
    """The ``[experts * out, in]`` matrix ``w`` back in its stored 3-D layout: ``experts``
    is ``[E, out, in]``; layout "oi" stores it so, "io" as ``[E, in, out]``."""
    if (not isinstance(experts, (list, tuple)) or len(experts) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in experts)
            or layout not in ("oi", "io") or experts[0] * experts[1] * experts[2] != w.numel()
            or w.dim() != 2 or w.shape[1] != experts[2]):
        raise TypeError(f"{where}: experts={experts!r}, layout={layout!r} do not describe the "
                        f"decoded {tuple(w.shape)} matrix")
    w = w.reshape(experts)
    return w.transpose(1, 2) if layout == "io" else w


#: ATen ops that read several weights inside one fused call (export graphs); the RNN cells
#: (``nn.GRUCell`` & co. stepped in a Python loop, which export unrolls) take their gate
#: matrices as arguments too
_FUSED_FUNCTIONS = {getattr(_aten, n).input for n in ("lstm", "gru", "rnn_tanh", "rnn_relu")} | {
    getattr(_aten, n).default for n in ("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell")} | {
    _aten._native_multi_head_attention.default, _aten._transformer_encoder_layer_fwd.default}


def _fused_module(m: torch.nn.Module) -> bool:
    # a torch.nn module that is not itself a weighted op but reads weights (its own or its
    # children's) inside its forward: nn.MultiheadAttention, LSTM/GRU/RNN, TransformerEncoder
    return type(m).__module__.startswith("torch.nn.") and _module_kind(m) is None


class FusedWeightOp(WeightedOp):
    """A weight that a fused module or op reads inside one call (an LSTM's gate matrices,
    ``nn.MultiheadAttention``'s projections), as a linear ``[out, in]``: rewritten in place
    (:meth:`set_weight`: prune), or stored compressed by a runtime module that the fused
    call decodes it from (:meth:`replace_with`, :mod:`fxpress.graph.fused`)."""

    def weight(self) -> torch.Tensor:
        path = self.spec.get("path")
        if path is None:
            w = super().weight()
            if "experts" in self.spec:  # [E, out, in] (or [E, in, out]) -> [E*out, in]
                w = w.transpose(1, 2) if self.spec["layout"] == "io" else w
                w = w.reshape(-1, w.shape[-1])
            return w
        host = self.gm.get_submodule(path)
        return getattr(host, "host", host).get_parameter(self.spec["param"])

    def replace_with(self, module: torch.nn.Module) -> str:
        """Store the weight as ``module`` (a compressed linear): the fused module is wrapped
        in a :class:`~fxpress.graph.fused.FusedCall` that decodes it for every call; in an
        exported graph, the ``get_attr`` nodes that read it become a
        :class:`~fxpress.graph.fused.DecodedWeight` call. Returns the module's qualname."""
        trim_heap()
        gm = self.gm
        path = self.spec.get("path")
        if path is not None:
            wrapper = gm.get_submodule(path)
            if not isinstance(wrapper, FusedCall):
                wrapper = FusedCall(wrapper)
                _set_submodule(gm, path, wrapper)
            return f"{path}.{wrapper.add(self.spec['param'], module)}"
        graph = gm.graph
        owner, attr = _resolve(gm, self.name)
        dtype = getattr(owner, attr).dtype
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)
        owner.__dict__.pop(attr, None)
        qualname = _free_name(gm, self.name)
        _set_submodule(gm, qualname, DecodedWeight(module, self.spec.get("experts"),
                                                   self.spec.get("layout", "oi")))
        for n in [n for n in graph.nodes if n.op == "get_attr" and n.target == self.name]:
            with graph.inserting_before(n):
                new = graph.call_module(qualname, ())
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            graph.erase_node(n)
            if dtype.is_floating_point and dtype != torch.float32:  # decoded float32
                _cast_after(graph, new, dtype)
        return f"{qualname}.w0"

    def set_weight(self, w: torch.Tensor) -> None:
        if "experts" in self.spec:
            old = self.weight()
            if tuple(w.shape) != tuple(old.shape):
                raise ValueError(f"{self.name}: new weight shape {tuple(w.shape)} != "
                                 f"{tuple(old.shape)}")
            value = expert_layout(w, self.spec["experts"], self.spec["layout"], self.name)
            for name in self.tied or (self.name,):
                value = _assign(*_resolve(self.gm, name), value.contiguous())
            return
        super().set_weight(w)
        owner, _ = _resolve(self.gm, self.name)
        if isinstance(owner, torch.nn.RNNBase):  # the RNN kernel reads its list of weights
            owner._init_flat_weights()


def fused_weights(gm: torch.fx.GraphModule) -> list[FusedWeightOp]:
    """Every 2-D+ float weight read inside a fused call (see :class:`FusedWeightOp`), as
    linear ops (``[out, in]``), in graph order.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.LSTM(4, 8)))
    >>> [op.name for op in fused_weights(gm)]
    ['0.weight_ih_l0', '0.weight_hh_l0']
    """
    out: dict[str, FusedWeightOp] = {}

    def add(name: str, node: torch.fx.Node, host: str, path: str | None = None) -> None:
        t = getattr(*_resolve(gm, name), None)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2 and name not in out:
            spec = {"host": host} if path is None else {
                "host": host, "path": path, "param": name[len(path) + 1:]}
            out[name] = FusedWeightOp(gm, node, LINEAR, "fused", name, spec)

    for node in gm.graph.nodes:
        if node.op == "call_module":
            try:
                m = gm.get_submodule(str(node.target))
            except AttributeError:
                continue
            if _fused_module(m):
                for pname, _ in m.named_parameters():
                    add(f"{node.target}.{pname}", node, type(m).__name__, str(node.target))
        elif node.op == "call_function" and node.target in _FUSED_FUNCTIONS:
            for a in pytree.tree_leaves((node.args, node.kwargs)):
                if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                    add(str(a.target), node, str(node.target))
        elif node.op == "call_function" and node.target is _aten.index.Tensor:
            layout = _expert_gather(gm, node)
            if layout is not None and str(node.args[0].target) not in out:
                name = str(node.args[0].target)
                t = getattr(*_resolve(gm, name))
                e, a, b = t.shape
                shape = [e, a, b] if layout == "oi" else [e, b, a]
                out[name] = FusedWeightOp(gm, node, LINEAR, "fused", name, {
                    "host": "experts (aten.index + aten.bmm)", "experts": shape, "layout": layout})
    return list(out.values())


def _expert_gather(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """"oi" or "io" when ``node`` gathers matrices of a 3-D float weight (``w[ids]``) that
    only batched matmuls read, as the weight's first operand (``[E, out, in]``) or second
    (``[E, in, out]``); else None."""
    src = node.args[0] if node.args else None
    if not (isinstance(src, torch.fx.Node) and src.op == "get_attr"):
        return None
    t = getattr(*_resolve(gm, str(src.target)), None)
    if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 3):
        return None
    if any(u.op != "get_attr" and u is not node and not (
            u.op == "call_function" and u.target is _aten.index.Tensor) for u in src.users):
        return None  # the tensor is also read whole somewhere: leave it float
    sides = set()
    for u in node.users:
        if u.op != "call_function" or u.target is not _aten.bmm.default:
            return None
        sides.add("oi" if u.args[0] is node else "io")
    return sides.pop() if len(sides) == 1 else None


#: the runtime classes of this module, allowed in every artifact
FUSED_CLASSES = (FusedCall, DecodedWeight)

__all__ = ["FusedCall", "DecodedWeight", "FusedWeightOp", "fused_weights", "FUSED_CLASSES",
           "placeholder", "expert_layout"]
