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

from fxpress.graph.runtime import CompressedModule, RuntimeModule

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


#: the runtime classes of this module, allowed in every artifact
FUSED_CLASSES = (FusedCall, DecodedWeight)

__all__ = ["FusedCall", "DecodedWeight", "FUSED_CLASSES", "placeholder"]
