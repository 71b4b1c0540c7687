"""What an artifact may name: functions, Tensor methods, ATen ops (the reviewed lists of
:mod:`.ops`) and module classes (the torch.nn classes of :mod:`.modules` and the runtime
module classes the caller hands in)."""
from __future__ import annotations

import builtins
import math
import operator
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from fxpress.graph.artifact import ops
from fxpress.graph.artifact.modules import TORCH_NN
from fxpress.graph.outputs import named_outputs
from fxpress.graph.runtime import RuntimeModule

#: the stored name of :func:`fxpress.graph.outputs.named_outputs`
NAMED_OUTPUTS = "fxpress.graph.outputs.named_outputs"

_NAMESPACES = (("torch", torch, ops.TORCH), ("torch.nn.functional", F, ops.FUNCTIONAL),
               ("operator", operator, ops.OPERATOR), ("math", math, ops.MATH),
               ("builtins", builtins, ops.BUILTINS), ("torch.fft", torch.fft, ops.FFT))

_STATIC: dict[str, Any] | None = None


def _static_functions() -> dict[str, Any]:
    """Every reviewed Python-level function that exists in this torch, by stored name."""
    global _STATIC
    if _STATIC is None:
        fns: dict[str, Any] = {}
        for prefix, module, names in _NAMESPACES:
            for name in sorted(names - ops.DENY):
                fn = getattr(module, name, None)
                if callable(fn) and not isinstance(fn, type):
                    fns[f"{prefix}.{name}"] = fn
        fns["torch._assert"] = torch._assert
        # a graph that builds a dataclass output is stored building ModelOutputs (write.py)
        fns[NAMED_OUTPUTS] = named_outputs
        _STATIC = fns
    return _STATIC


def aten_allowed(packet: str, overload: str) -> bool:
    """Is ``torch.ops.aten.<packet>.<overload>`` on the reviewed list?"""
    if packet in ops.DENY or not (packet in ops.ATEN or packet in ops.ATEN_PRIVATE
                                  or packet in ops.ATEN_DUNDERS):
        return False
    return overload.isidentifier() and not overload.startswith("_") and overload != "out" \
        and not overload.endswith("_out")


def _aten_op(name: str) -> Any:
    parts = name.split(".")
    if len(parts) != 5 or parts[:3] != ["torch", "ops", "aten"] or not aten_allowed(*parts[3:]):
        raise KeyError(name)
    try:
        packet = getattr(torch.ops.aten, parts[3])
        if parts[4] not in packet.overloads():
            raise KeyError(name)
        op = getattr(packet, parts[4])
    except (AttributeError, RuntimeError) as e:
        raise KeyError(name) from e
    if not isinstance(op, torch._ops.OpOverload):
        raise KeyError(name)
    return op


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class Allowlist:
    """What an artifact may name: functions, Tensor methods, module classes.

    >>> allow = Allowlist(runtime_modules=[])
    >>> allow.function("torch.relu") is torch.relu
    True
    >>> allow.method_allowed("as_strided"), allow.method_allowed("view")
    (False, True)
    """

    def __init__(self, runtime_modules: Iterable[type] = ()):
        self.functions = _static_functions()
        self._names = {}
        for name, fn in self.functions.items():
            try:
                self._names.setdefault(fn, name)
            except TypeError:  # unhashable callables cannot be looked up by identity
                pass
        self.modules: dict[str, type] = {"torch.nn.Module": torch.nn.Module}
        for name in TORCH_NN:
            # MultiheadAttention's out_proj: a torch.nn class torch.nn does not re-export
            cls = getattr(torch.nn, name, None) or getattr(torch.nn.modules.linear, name, None)
            if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
                self.modules[f"torch.nn.{name}"] = cls
        self._module_names = {cls: name for name, cls in self.modules.items()}
        self.runtime: dict[str, type] = {}
        for cls in runtime_modules:
            if not (isinstance(cls, type) and issubclass(cls, RuntimeModule)):
                raise TypeError(f"runtime module {cls!r} is not a RuntimeModule subclass")
            self.runtime[class_name(cls)] = cls

    # save side: object -> name
    def name_of(self, fn: Any) -> str | None:
        if isinstance(fn, torch._ops.OpOverload):
            packet, overload = fn._schema.name.split("::")[-1], fn._overloadname
            if fn.namespace == "aten" and aten_allowed(packet, overload):
                return f"torch.ops.aten.{packet}.{overload}"
            return None
        try:
            return self._names.get(fn)
        except TypeError:
            return None

    def module_name_of(self, cls: type) -> str | None:
        """The stored name of a torch.nn class on the reviewed list, else None."""
        return self._module_names.get(cls) if cls is not torch.nn.Module else None

    # load side: name -> object
    def function(self, name: str) -> Any:
        if not isinstance(name, str):
            raise KeyError(name)
        if name.startswith("torch.ops."):
            return _aten_op(name)
        return self.functions[name]

    def method_allowed(self, name: Any) -> bool:
        return (isinstance(name, str) and name in ops.METHODS and name not in ops.DENY
                and callable(getattr(torch.Tensor, name, None)))

    @staticmethod
    def attribute_allowed(name: Any) -> bool:
        """May ``builtins.getattr(x, name)`` read ``name``? (tensor data attributes only)"""
        return isinstance(name, str) and name in ops.TENSOR_ATTRIBUTES


__all__ = ["Allowlist", "class_name", "aten_allowed"]
