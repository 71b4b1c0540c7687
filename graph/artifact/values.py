"""Node arguments and module attributes as tagged JSON: ``{"$": "tuple", "v": [...]}`` for
tuples, slices, dtypes, devices, nodes and allowlisted functions; plain JSON for the rest."""
from __future__ import annotations

import math
import re
import reprlib
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.fx

from fxpress.errors import (ArtifactFormatError, ArtifactLimitError, ArtifactSecurityError,
                            ForbiddenTargetError, UnsupportedGraphError)

if TYPE_CHECKING:
    from fxpress.graph.artifact.schema import Allowlist

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
    torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format,
                   "channels_last": torch.channels_last,
                   "channels_last_3d": torch.channels_last_3d,
                   "preserve_format": torch.preserve_format}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
_DEVICE = re.compile(r"^(cpu|cuda|mps|meta|xpu)(:\d{1,3})?$")


def dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _dtype(name: Any, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise ArtifactFormatError(f"{where}: unknown dtype {name!r}")
    return _DTYPES[name]


class _Encoder:
    def __init__(self, allow: Allowlist, where: str):
        self.allow, self.where = allow, where

    def __call__(self, v: Any) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return v if math.isfinite(v) else {"$": "float", "v": repr(v)}
        if isinstance(v, torch.fx.Node):
            return {"$": "node", "v": v.name}
        if isinstance(v, torch.Size):
            return {"$": "size", "v": [int(x) for x in v]}
        if isinstance(v, tuple):
            return {"$": "tuple", "v": [self(x) for x in v]}
        if isinstance(v, list):
            return [self(x) for x in v]
        if isinstance(v, dict):
            return {"$": "dict", "v": [[self(k), self(x)] for k, x in v.items()]}
        if isinstance(v, slice):
            return {"$": "slice", "v": [self(v.start), self(v.stop), self(v.step)]}
        if v is Ellipsis:
            return {"$": "ellipsis"}
        if isinstance(v, complex):
            return {"$": "complex", "v": [v.real, v.imag]}
        if isinstance(v, torch.dtype):
            return {"$": "dtype", "v": dtype_name(v)}
        if isinstance(v, torch.device):
            return {"$": "device", "v": str(v)}
        if isinstance(v, torch.memory_format):
            return {"$": "memory_format", "v": str(v).removeprefix("torch.")}
        if isinstance(v, torch.layout):
            return {"$": "layout", "v": str(v).removeprefix("torch.")}
        if callable(v):
            name = self.allow.name_of(v)
            if name is not None:
                return {"$": "fn", "v": name}
        raise UnsupportedGraphError(
            f"{self.where}: cannot store {type(v).__name__} {_short_repr(v)} as data; "
            "artifacts hold numbers, strings, tuples, dtypes, devices and allowlisted functions")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 6, 4


def _short_repr(v: Any, n: int = 80) -> str:
    """A bounded repr of anything a file holds (deep or huge values included), control
    characters escaped."""
    try:
        r = _REPR.repr(v)
    except Exception:  # a value whose repr fails cannot come from JSON; say what it is
        r = f"<{type(v).__name__}>"
    return r if len(r) <= n else r[:n] + "..."


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """``text`` on one line with every control character (ESC, newlines, ...) escaped, so a
    name or message from a file cannot drive a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _Decoder:
    """Tagged JSON -> Python values. ``nodes``: the graph's nodes defined so far (None: no
    node references allowed); ``functions``: may a value name an allowlisted function (graph
    arguments only; never a module config); ``depth``/``string``: the load's limits."""

    def __init__(self, allow: Allowlist, nodes: Mapping[str, torch.fx.Node] | None, where: str,
                 functions: bool = True, depth: int = 64, string: int = 1 << 20):
        self.allow, self.nodes, self.where = allow, nodes, where
        self.functions, self.depth, self.string = functions, depth, string

    def __call__(self, v: Any, level: int = 0) -> Any:
        if level > self.depth:
            raise ArtifactLimitError(f"{self.where}: values nest deeper than {self.depth} levels")
        if v is None or isinstance(v, (bool, int, float)):
            return v
        if isinstance(v, str):
            if len(v) > self.string:
                raise ArtifactLimitError(f"{self.where}: a string of {len(v)} characters is over "
                                         f"the limit of {self.string}")
            return v
        if isinstance(v, list):
            return [self(x, level + 1) for x in v]
        if not isinstance(v, dict) or "$" not in v:
            raise ArtifactFormatError(f"{self.where}: malformed value {_short_repr(v)}")
        tag, x = v["$"], v.get("v")
        if not isinstance(tag, str) or not set(v) <= {"$", "v"}:
            raise ArtifactFormatError(f"{self.where}: malformed value {_short_repr(v)}")
        if tag == "node":
            if self.nodes is None or not isinstance(x, str) or x not in self.nodes:
                raise ArtifactFormatError(f"{self.where}: refers to node {_short_repr(x)}, which is "
                                          "not defined before it")
            return self.nodes[x]
        if tag == "tuple":
            return tuple(self(y, level + 1) for y in self._list(x))
        if tag == "size":
            return torch.Size([self._int(y) for y in self._list(x)])
        if tag == "dict":
            return {self._key(k, level): self(y, level + 1)
                    for k, y in (self._pair(p) for p in self._list(x))}
        if tag == "slice":
            a = self._list(x)
            if len(a) != 3:
                raise ArtifactFormatError(f"{self.where}: slice needs 3 parts")
            return slice(*(self(y, level + 1) for y in a))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "float" and x in ("nan", "inf", "-inf"):
            return float(x)
        if tag == "complex":
            a = self._list(x)
            if len(a) != 2 or not all(isinstance(y, (int, float)) and not isinstance(y, bool)
                                      for y in a):
                raise ArtifactFormatError(f"{self.where}: complex needs 2 numbers")
            return complex(float(a[0]), float(a[1]))
        if tag == "dtype":
            return _dtype(x, self.where)
        if tag == "device":
            if not isinstance(x, str) or not _DEVICE.match(x):
                raise ArtifactFormatError(f"{self.where}: bad device {_short_repr(x)}")
            return torch.device(x)
        if tag == "memory_format" and isinstance(x, str) and x in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[x]
        if tag == "layout" and isinstance(x, str) and x in _LAYOUTS:
            return _LAYOUTS[x]
        if tag == "fn":
            if not self.functions:
                raise ArtifactSecurityError(f"{self.where}: a function value "
                                            f"{_short_repr(x)} where only data may stand")
            try:
                return self.allow.function(x)
            except KeyError:
                raise ForbiddenTargetError(f"{self.where}: function {_short_repr(x)} is not in the "
                                           "allowlist; the file was not loaded") from None
        raise ArtifactFormatError(f"{self.where}: unknown value tag {_short_repr(v)}")

    def _list(self, x: Any) -> list:
        if not isinstance(x, list):
            raise ArtifactFormatError(f"{self.where}: expected a list, got {_short_repr(x)}")
        return x

    def _int(self, x: Any) -> int:
        if not isinstance(x, int) or isinstance(x, bool):
            raise ArtifactFormatError(f"{self.where}: expected an int, got {_short_repr(x)}")
        return x

    def _pair(self, p: Any) -> tuple:
        if not isinstance(p, list) or len(p) != 2:
            raise ArtifactFormatError(f"{self.where}: malformed dict item {_short_repr(p)}")
        return p[0], p[1]

    def _key(self, k: Any, level: int) -> Any:
        k = self(k, level + 1)
        if not isinstance(k, (str, int, float, bool, type(None))):
            raise ArtifactFormatError(f"{self.where}: dict key {_short_repr(k)} is not a scalar")
        return k
