"""What an artifact may name and say: the allowlist of targets and module classes, and the
validation of a decoded header before anything in it is built."""
from __future__ import annotations

import builtins
import keyword
import math
import operator
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx
import torch.nn.functional as F

from fxpress.errors import ArtifactFormatError, ForbiddenTargetError
from fxpress.graph.artifact.tensors import _check_tensor_entry
from fxpress.graph.artifact.values import _Decoder, _short_repr
from fxpress.graph.runtime import RuntimeModule

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


# torch.* callables that touch files, global state or the compiler: never a graph target.
_TORCH_DENY = {"load", "save", "from_file", "compile", "manual_seed", "seed", "initial_seed",
               "get_file_path", "thread_safe_generator", "import_ir_module",
               "import_ir_module_from_buffer", "prepare_multiprocessing_environment",
               "compiled_with_cxx11_abi", "vmap", "cond", "while_loop", "export"}
_TORCH_DENY_PREFIX = ("set_", "get_", "use_", "init_", "is_", "are_", "profiler", "autocast")
# Tensor methods that take callables, install hooks, or expose raw memory.
_METHOD_DENY = {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook",
                "backward", "share_memory_", "storage", "untyped_storage", "set_", "data_ptr",
                "pin_memory", "from_file", "tolist", "numpy", "record_stream", "module_load"}
_OPERATOR_DENY = {"attrgetter", "itemgetter", "methodcaller", "call"}
_BUILTINS = ("getattr", "len", "int", "float", "bool", "abs", "min", "max", "round", "pow",
             "divmod", "slice")
_ATEN_DENY = {"from_file", "_print", "save", "load"}
# ATen's operator overloads are spelled as dunders; these names, and no other dunder, resolve.
_ATEN_DUNDERS = {f"__{op}__" for op in ("and", "or", "xor", "lshift", "rshift", "iand", "ior",
                                        "ixor", "ilshift", "irshift")}
# fx graphs use these private helpers; they compute on tensors and nothing else.
_EXTRA = {"torch._assert": lambda: torch._assert}


def _public_callables(module: Any, prefix: str, deny: set[str] = frozenset(),
                      deny_prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {}
    for name in dir(module):
        if name.startswith("_") or name in deny or name.startswith(deny_prefix):
            continue
        obj = getattr(module, name, None)
        if callable(obj) and not isinstance(obj, type) and not isinstance(obj, type(os)):
            out[f"{prefix}.{name}"] = obj
    return out


_STATIC: dict[str, Any] | None = None


def _static_functions() -> dict[str, Any]:
    global _STATIC
    if _STATIC is None:
        fns: dict[str, Any] = {}
        fns.update(_public_callables(math, "math"))
        fns.update(_public_callables(operator, "operator", _OPERATOR_DENY))
        fns.update(_public_callables(torch, "torch", _TORCH_DENY, _TORCH_DENY_PREFIX))
        fns.update(_public_callables(F, "torch.nn.functional"))
        for name in _BUILTINS:
            fns[f"builtins.{name}"] = getattr(builtins, name)
        for name, get in _EXTRA.items():
            fns[name] = get()
        _STATIC = fns
    return _STATIC


class Allowlist:
    """What an artifact may name: functions, Tensor methods, module classes.

    >>> allow = Allowlist(runtime_modules=[])
    >>> allow.function("torch.relu") is torch.relu
    True
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
        for name in dir(torch.nn):
            cls = getattr(torch.nn, name)
            if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and not name.startswith("_"):
                self.modules[f"torch.nn.{name}"] = cls
        # MultiheadAttention's out_proj: a public torch.nn class torch.nn does not re-export
        self.modules["torch.nn.NonDynamicallyQuantizableLinear"] = \
            torch.nn.modules.linear.NonDynamicallyQuantizableLinear
        self.runtime: dict[str, type] = {}
        for cls in runtime_modules:
            if not (isinstance(cls, type) and issubclass(cls, RuntimeModule)):
                raise TypeError(f"runtime module {cls!r} is not a RuntimeModule subclass")
            self.runtime[class_name(cls)] = cls

    # save side: object -> name
    def name_of(self, fn: Any) -> str | None:
        if isinstance(fn, torch._ops.OpOverload):
            ns = fn.namespace
            packet, overload = fn._schema.name.split("::")[-1], fn._overloadname
            if ns == "aten" and packet not in _ATEN_DENY:
                return f"torch.ops.aten.{packet}.{overload}"
            return None
        try:
            return self._names.get(fn)
        except TypeError:
            return None

    # load side: name -> object
    def function(self, name: str) -> Any:
        if not isinstance(name, str):
            raise KeyError(name)
        if name.startswith("torch.ops."):
            return _aten_op(name)
        return self.functions[name]

    def method_allowed(self, name: str) -> bool:
        return (isinstance(name, str) and name.isidentifier() and not name.startswith("_")
                and name not in _METHOD_DENY and callable(getattr(torch.Tensor, name, None)))


def _aten_op(name: str) -> Any:
    parts = name.split(".")
    if len(parts) != 5 or parts[:3] != ["torch", "ops", "aten"]:
        raise KeyError(name)
    packet_name, overload = parts[3], parts[4]
    dunder = packet_name.startswith("__") and packet_name not in _ATEN_DUNDERS
    if (not packet_name.isidentifier() or dunder or packet_name in _ATEN_DENY
            or not overload.isidentifier() or overload.startswith("__")):
        raise KeyError(name)
    try:
        packet = getattr(torch.ops.aten, packet_name)
        if overload not in packet.overloads():
            raise KeyError(name)
        op = getattr(packet, overload)
    except (AttributeError, RuntimeError) as e:
        raise KeyError(name) from e
    if not isinstance(op, torch._ops.OpOverload):
        raise KeyError(name)
    return op


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_IDENT_PART = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)$")


def _check_qualname(name: Any, where: str, allow_empty: bool = False) -> str:
    if not isinstance(name, str) or (not name and not allow_empty):
        raise ArtifactFormatError(f"{where}: expected a dotted attribute name, got {_short_repr(name)}")
    if not name:
        return name
    for part in name.split("."):
        if not _IDENT_PART.match(part) or keyword.iskeyword(part):
            raise ForbiddenTargetError(f"{where}: {name!r} is not a plain attribute path")
        if part.startswith("__"):
            raise ForbiddenTargetError(f"{where}: dunder name {part!r} in {name!r} is refused")
    return name


def _check_ident(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ForbiddenTargetError(f"{where}: {_short_repr(name)} is not a plain identifier")
    if name.startswith("__"):
        raise ForbiddenTargetError(f"{where}: dunder name {name!r} is refused")
    return name


#: attributes a torch.nn module derives from its own parameters: never stored, rebuilt after
#: loading by the named method (RNNs keep their weights in a list for the fused kernel)
DERIVED_ATTRIBUTES: dict[type, tuple[tuple[str, ...], str]] = {
    torch.nn.RNNBase: (("_flat_weights", "_flat_weight_refs"), "_init_flat_weights")}


def derived_attributes(cls: type) -> tuple[tuple[str, ...], str | None]:
    """(attribute names, rebuilding method) of ``cls`` (see ``DERIVED_ATTRIBUTES``)."""
    for base, entry in DERIVED_ATTRIBUTES.items():
        if issubclass(cls, base):
            return entry
    return (), None


def _check_config_key(cls: type, key: Any, where: str) -> str:
    _check_ident(key, where)
    attr = getattr(cls, key, None)
    if callable(attr) or isinstance(attr, property):
        raise ForbiddenTargetError(f"{where}: attribute {key!r} would replace a method of "
                                   f"{cls.__name__}")
    return key


@dataclass
class _Checked:
    """Everything validated from the header, before any tensor is decoded or module built."""

    modules: list[dict] = field(default_factory=list)
    classes: dict[str, type] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)


def _validate(header: dict, allow: Allowlist, where: str) -> _Checked:
    plan = _Checked()
    tensors = header.get("tensors")
    modules = header.get("modules")
    graph = header.get("graph")
    if not isinstance(tensors, dict) or not isinstance(modules, list) or not isinstance(graph, dict):
        raise ArtifactFormatError(f"{where}: header lacks graph/modules/tensors")
    paths: set[str] = set()
    attrs: set[str] = set()
    for m in modules:
        if not isinstance(m, dict):
            raise ArtifactFormatError(f"{where}: malformed module entry")
        path = _check_qualname(m.get("path"), f"{where}: module path", allow_empty=True)
        if path in paths or (path and path.rpartition(".")[0] not in paths):
            raise ArtifactFormatError(f"{where}: module {path!r} is duplicated or comes before "
                                      "its parent")
        paths.add(path)
        if "alias" in m:
            if m["alias"] not in paths:
                raise ArtifactFormatError(f"{where}: module {path!r} aliases unknown {m['alias']!r}")
            continue
        mw = f"{where}: module {path!r}"
        kind, cname = m.get("kind"), m.get("class")
        if path:
            if kind == "runtime":
                cls = allow.runtime.get(cname)
                if cls is None:
                    raise ForbiddenTargetError(
                        f"{mw}: runtime module class {cname!r} is not registered by any installed "
                        "pass plugin; install the plugin that wrote it")
            elif kind in ("torch.nn", "container"):
                cls = allow.modules.get(cname)
                if cls is None or (kind == "container") != (cls is torch.nn.Module):
                    raise ForbiddenTargetError(f"{mw}: module class {cname!r} is not a torch.nn "
                                               "module class")
            else:
                raise ArtifactFormatError(f"{mw}: unknown module kind {kind!r}")
            plan.classes[path] = cls
            config = m.get("config", {})
            if not isinstance(config, dict):
                raise ArtifactFormatError(f"{mw}: config must be an object")
            decode = _Decoder(allow, None, mw)
            plan.configs[path] = {_check_config_key(cls, k, f"{mw} config"): decode(v)
                                  for k, v in config.items()}
        ts = m.get("tensors", {})
        if not isinstance(ts, dict):
            raise ArtifactFormatError(f"{mw}: tensors must be an object")
        for tname, ref in ts.items():
            if kind == "runtime":
                _check_qualname(tname, f"{mw} tensor")
            else:
                _check_ident(tname, f"{mw} tensor")
            if not isinstance(ref, dict) or ref.get("kind") not in ("parameter", "buffer", "attr"):
                raise ArtifactFormatError(f"{mw}: tensor {tname!r} malformed")
            if ref.get("ref") is not None and ref["ref"] not in tensors:
                raise ArtifactFormatError(f"{mw}: tensor {tname!r} refers to missing {ref['ref']!r}")
            attrs.add(_join(path, tname))
        plan.modules.append(m)
    # tensors: shapes and streams add up
    for key, entry in tensors.items():
        try:
            _check_tensor_entry(key, entry)
        except ArtifactFormatError as e:
            raise type(e)(f"{where}: {e}") from None
    # the graph
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        raise ArtifactFormatError(f"{where}: graph has no node list")
    names: set[str] = set()
    for n in nodes:
        if not isinstance(n, dict):
            raise ArtifactFormatError(f"{where}: malformed node")
        name = n.get("name")
        nw = f"{where}: node {name!r} ({n.get('op')} {_short_repr(n.get('target'), 60)})"
        _check_ident(name, nw)
        if name in names:
            raise ArtifactFormatError(f"{nw}: duplicate node name")
        op, target = n.get("op"), n.get("target")
        if op not in _OPS:
            raise ArtifactFormatError(f"{nw}: unknown op {op!r}")
        if op == "placeholder":
            _check_ident(target, nw)
        elif op == "get_attr":
            _check_qualname(target, nw)
            if target not in attrs and target not in paths:
                raise ArtifactFormatError(f"{nw}: no tensor or module named {target!r} in the file")
        elif op == "call_module":
            _check_qualname(target, nw)
            if target not in plan.classes and not any(
                    m.get("path") == target for m in modules if isinstance(m, dict)):
                raise ArtifactFormatError(f"{nw}: no module named {target!r} in the file")
        elif op == "call_method":
            if not allow.method_allowed(target):
                raise ForbiddenTargetError(f"{nw}: Tensor method {target!r} is not allowlisted; "
                                           "the file was not loaded")
        elif op == "call_function":
            try:
                fn = allow.function(target)
            except KeyError:
                raise ForbiddenTargetError(
                    f"{nw}: function {target!r} is not in the allowlist (torch, "
                    "torch.nn.functional, torch.ops.aten, operator, math, a few builtins); "
                    "the file was not loaded") from None
            if fn is getattr:
                args = n.get("args")
                attr = args["v"][1] if isinstance(args, dict) and isinstance(args.get("v"), list) \
                    and len(args["v"]) == 2 else None
                if not isinstance(attr, str) or attr.startswith("_") or not attr.isidentifier():
                    raise ForbiddenTargetError(f"{nw}: getattr is allowed only with a constant "
                                               f"public attribute name, got {_short_repr(attr)}")
        elif op == "output" and target != "output":
            raise ArtifactFormatError(f"{nw}: output node target must be 'output'")
        names.add(name)
    cg = graph.get("codegen")
    if cg is not None:
        if not isinstance(cg, dict) or cg.get("kind") != "pytree":
            raise ArtifactFormatError(f"{where}: unknown code generator {_short_repr(cg)}")
        for a in cg.get("orig_args", []):
            _check_ident(a, f"{where}: graph argument")
    if not isinstance(graph.get("class_name", "GraphModule"), str) or \
            not graph.get("class_name", "GraphModule").isidentifier():
        raise ArtifactFormatError(f"{where}: bad class name")
    return plan
