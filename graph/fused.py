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

Both store only the compressed tensors, load from an artifact like every runtime module
(the host is a reviewed torch.nn class, its placeholders are empty), and fine-tune through
the compressed children's own ``begin_training`` (gradients reach them through the fused
kernel).
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from fxpress.graph.memory import trim_heap
from fxpress.graph.runtime import CompressedModule, RuntimeModule
from fxpress.graph.weights import (LINEAR, WeightedOp, _free_name, _module_kind, _resolve,
                                   _set_submodule)

_aten = torch.ops.aten

_CHILD = re.compile(r"w\d{1,6}")


def placeholder() -> torch.nn.Parameter:
    """What a host keeps where a compressed matrix was: an empty, frozen parameter."""
    return torch.nn.Parameter(torch.empty(0), requires_grad=False)


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
        owner._parameters[attr] = placeholder()
        if isinstance(owner, torch.nn.RNNBase):  # the kernel reads its list of weights
            owner._init_flat_weights()
        return child

    def config(self) -> dict:
        return {"weights": dict(self.weights)}

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
            out[name] = module.dense_weight()
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.host, self.decoded(), args, kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{c}={n}" for c, n in self.weights.items())


class DecodedWeight(RuntimeModule):
    """The decoded matrix of a compressed child ``w0``: called with no arguments where an
    exported graph read the float matrix (``get_attr``) to pass it to a fused ATen op."""

    def __init__(self, module: CompressedModule):
        super().__init__()
        self.w0 = module

    def forward(self) -> torch.Tensor:
        module = self._modules.get("w0")
        if not isinstance(module, CompressedModule):
            raise TypeError(f"{type(self).__name__}: child 'w0' must be a compressed module")
        return module.dense_weight()


#: ATen ops that read several weights inside one fused call (export graphs)
_FUSED_FUNCTIONS = {getattr(_aten, n).input for n in ("lstm", "gru", "rnn_tanh", "rnn_relu")} | {
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
            return super().weight()
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
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)
        owner.__dict__.pop(attr, None)
        qualname = _free_name(gm, self.name)
        _set_submodule(gm, qualname, DecodedWeight(module))
        for n in [n for n in graph.nodes if n.op == "get_attr" and n.target == self.name]:
            with graph.inserting_before(n):
                new = graph.call_module(qualname, ())
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            graph.erase_node(n)
        return f"{qualname}.w0"

    def set_weight(self, w: torch.Tensor) -> None:
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
    return list(out.values())


#: the runtime classes of this module, allowed in every artifact
FUSED_CLASSES = (FusedCall, DecodedWeight)

__all__ = ["FusedCall", "DecodedWeight", "FusedWeightOp", "fused_weights", "FUSED_CLASSES",
           "placeholder"]
