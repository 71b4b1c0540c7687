"""The closed schema of an artifact's header: checked whole, within the load's limits,
before any tensor is decoded or any module built.

What may appear: the module tree (paths, aliases that never loop, torch.nn classes of
:mod:`.modules` with their fields, the caller's runtime module classes with their configs),
the tensor table (dtype, shape, encoding, streams: :mod:`.tensors`), and the graph (nodes
calling what :mod:`.allowlist` allows, with constant arguments of the kinds :mod:`.values`
decodes). Names are ASCII identifiers (no dunders, no keywords, no look-alike letters).
Every refusal is an :class:`~fxpress.errors.ArtifactFormatError` (a security or limit error
where that is what it is) naming the field, module or node.
"""
from __future__ import annotations

import builtins
import keyword
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from fxpress.errors import (ArtifactFormatError, ArtifactLimitError, ArtifactSecurityError,
                            ForbiddenTargetError)
from fxpress.graph.artifact import ops
from fxpress.graph.artifact.allowlist import Allowlist, class_name  # noqa: F401 (re-export)
from fxpress.graph.artifact.limits import Limits
from fxpress.graph.artifact.modules import check_runtime, check_torch_nn, runtime_load_bytes
from fxpress.graph.artifact import arith
from fxpress.graph.artifact.compact import crc8_min
from fxpress.graph.artifact.tensors import _check_tensor_entry
from fxpress.graph.artifact.values import _Decoder, _short_repr

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_MODULE_KEYS = {"path", "alias", "kind", "class", "config", "tensors", "training"}
_REF_KEYS = {"ref", "kind", "requires_grad", "persistent"}
_NODE_KEYS = {"name", "op", "target", "args", "kwargs", "shape", "dtype", "pass"}
_BASE_KEYS = frozenset(vars(torch.nn.Module()).keys())
#: names the code torch.fx generates refers to (its globals, the builtins a graph may call):
#: never a graph input's name, which becomes a parameter of the generated forward()
_RESERVED = ops.BUILTINS | frozenset(
    "self torch device fx_pytree pytree inf nan NoneType operator math builtins".split())
#: node names torch.fx never keeps (keywords, builtins, its own globals): it renames such a
#: node with a counter, and a stored name that then collides makes every later collision
#: scan the counter from where a name like ``print_00`` reset it (quadratic: 14,000 nodes
#: took 16 s). fx itself never writes one, so a file that does is refused.
_FX_RENAMES = frozenset(keyword.kwlist) | frozenset(vars(builtins)) | frozenset(
    getattr(torch.fx.graph, "_illegal_names", ()))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_IDENT_PART = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_qualname(name: Any, where: str, allow_empty: bool = False, limit: int = 4096) -> str:
    if not isinstance(name, str) or (not name and not allow_empty):
        raise ArtifactFormatError(f"{where}: expected a dotted attribute name, got {_short_repr(name)}")
    if len(name) > limit:
        raise ArtifactLimitError(f"{where}: a name of {len(name)} characters (limit {limit})")
    if not name:
        return name
    for part in name.split("."):
        if not _IDENT_PART.fullmatch(part) or keyword.iskeyword(part):
            raise ForbiddenTargetError(f"{where}: {_short_repr(name)} is not a plain ASCII "
                                       "attribute path")
        if part.startswith("__"):
            raise ForbiddenTargetError(f"{where}: dunder name {part!r} in {name!r} is refused")
    return name


def _check_ident(name: Any, where: str, limit: int = 4096) -> str:
    if not isinstance(name, str) or not _IDENT.fullmatch(name) or keyword.iskeyword(name):
        raise ForbiddenTargetError(f"{where}: {_short_repr(name)} is not a plain identifier (ASCII)")
    if len(name) > limit:
        raise ArtifactLimitError(f"{where}: a name of {len(name)} characters (limit {limit})")
    if name.startswith("__"):
        raise ForbiddenTargetError(f"{where}: dunder name {name!r} is refused")
    return name


def _check_tensor_name(cls: type, name: Any, where: str, limit: int) -> str:
    """A tensor attribute's name: an identifier that is no method, property or internal of
    the module class (a single leading underscore is allowed: export's constants)."""
    _check_ident(name, where, limit)
    if name in _BASE_KEYS or any(name in vars(base) for base in cls.__mro__):
        raise ArtifactSecurityError(f"{where}: tensor name {name!r} would replace an attribute "
                                    f"of {cls.__name__}")
    return name


def _code_chars(v: Any) -> int:
    """Characters the tagged value ``v`` (a node's args or kwargs, references by name)
    writes into the generated code: a referenced node's name, a string's text, ~8 for any
    other leaf; without recursion (the value is unchecked)."""
    total, stack = 0, [v]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if x.get("$") == "node" and isinstance(x.get("v"), str):
                total += len(x["v"]) + 2
            else:
                stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        else:
            total += len(x) + 2 if isinstance(x, str) else 8
    return total


def _itemsize(dtype: Any) -> int:
    """Bytes per element of a node's recorded dtype (8, the widest, when it is not one)."""
    from fxpress.graph.artifact.values import _DTYPES

    return _DTYPES[dtype].itemsize if isinstance(dtype, str) and dtype in _DTYPES else 8


def _keys(d: dict, allowed: set, where: str) -> None:
    extra = [k for k in d if k not in allowed]
    if extra:
        raise ArtifactFormatError(f"{where}: unknown field(s) {_short_repr(extra)}")


@dataclass
class _Checked:
    """Everything validated from the header, before any tensor is decoded or module built."""

    modules: list[dict] = field(default_factory=list)
    classes: dict[str, type] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)
    aliases: list[tuple[str, str]] = field(default_factory=list)
    declared_bytes: int = 0


def _count(what: str, items: Any, limit: int, where: str) -> None:
    if len(items) > limit:
        raise ArtifactLimitError(f"{where}: {len(items)} {what}, over the limit of {limit}; "
                                 f"pass limits=Limits({what}=...) to load() if you trust the file")


def _validate(header: dict, allow: Allowlist, where: str, limits: Limits | None = None,
              decoded_limit: int | None = None) -> _Checked:
    limits = limits or Limits()
    decoded_limit = decoded_limit if decoded_limit is not None else limits.decoded_limit(0)
    plan = _Checked()
    tensors, modules, graph = header.get("tensors"), header.get("modules"), header.get("graph")
    if not isinstance(tensors, dict) or not isinstance(modules, list) or not isinstance(graph, dict):
        raise ArtifactFormatError(f"{where}: header lacks graph/modules/tensors")
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        raise ArtifactFormatError(f"{where}: graph has no node list")
    crc8_min(header, where)  # the damage locator's threshold (a diagnostic, still checked)
    _count("modules", modules, limits.modules, where)
    _count("tensors", tensors, limits.tensors, where)
    _count("nodes", nodes, limits.nodes, where)
    # tensors first: every size adds up and the total fits, before anything else is read
    arith_bytes = 0
    for key, entry in tensors.items():
        try:
            _check_qualname(key, "tensor", limit=limits.string)
            _, _, nbytes, streams = _check_tensor_entry(key, entry)
        except ArtifactFormatError as e:
            raise type(e)(f"{where}: {e}") from None
        plan.declared_bytes += nbytes + streams
        arith_bytes += sum(info["raw_bytes"] for info in entry["streams"].values()
                           if arith.width(info.get("codec")))
    if arith_bytes > limits.arith_bytes:
        raise ArtifactLimitError(f"{where}: its arithmetic-coded (acW) streams decode to "
                                 f"{arith_bytes} bytes, over the limit of {limits.arith_bytes}; "
                                 "pass limits=Limits(arith_bytes=...) to load() if you trust the file")
    if plan.declared_bytes > decoded_limit:
        raise ArtifactLimitError(f"{where}: tensors and their streams would decode to "
                                 f"{plan.declared_bytes} bytes, over the limit of {decoded_limit}; "
                                 "pass max_bytes= to load() if you trust the file")
    paths: dict[str, bool] = {}  # path -> is a real (not alias) entry
    attrs: set[str] = set()
    for m in modules:
        if not isinstance(m, dict):
            raise ArtifactFormatError(f"{where}: malformed module entry")
        _keys(m, _MODULE_KEYS, f"{where}: module {_short_repr(m.get('path'))}")
        path = _check_qualname(m.get("path"), f"{where}: module path", allow_empty=True,
                               limit=limits.string)
        parent = path.rpartition(".")[0]
        if path.count(".") >= limits.depth:  # torch.nn walks a module tree recursively
            raise ArtifactLimitError(f"{where}: module {_short_repr(path, 60)} is nested "
                                     f"{path.count('.') + 1} deep, over the limit of "
                                     f"{limits.depth}; pass limits=Limits(depth=...) to load() "
                                     "if you trust the file")
        if path in paths or (path and not paths.get(parent)):
            raise ArtifactFormatError(f"{where}: module {path!r} is duplicated or does not come "
                                      "after its parent (a real module, not an alias)")
        mw = f"{where}: module {path!r}"
        if "alias" in m:
            target = m["alias"]
            if len(m) != 2 or not isinstance(target, str) or not paths.get(target) or not path \
                    or target == "" or path.startswith(target + ".") or target == path:
                raise ArtifactFormatError(f"{mw}: aliases {_short_repr(target)}, which is not an "
                                          "earlier module outside its own parents (alias cycle?)")
            paths[path] = False
            plan.aliases.append((path, target))
            continue
        paths[path] = True
        kind, cname = m.get("kind"), m.get("class")
        cls: type = torch.nn.Module
        if path:
            if kind == "runtime":
                cls = allow.runtime.get(cname) if isinstance(cname, str) else None
                if cls is None:
                    raise ForbiddenTargetError(
                        f"{mw}: runtime module class {_short_repr(cname)} is not registered by "
                        "any installed pass plugin; install the plugin that wrote it")
            elif kind in ("torch.nn", "container"):
                cls = allow.modules.get(cname) if isinstance(cname, str) else None
                if cls is None or (kind == "container") != (cls is torch.nn.Module):
                    raise ForbiddenTargetError(f"{mw}: module class {_short_repr(cname)} is not a "
                                               "torch.nn module class on the reviewed list")
            else:
                raise ArtifactFormatError(f"{mw}: unknown module kind {_short_repr(kind)}")
            plan.classes[path] = cls
            config = m.get("config", {})
            if not isinstance(config, dict):
                raise ArtifactFormatError(f"{mw}: config must be an object")
            _count("config keys", config, 256, mw)
            for k in config:
                _check_ident(k, f"{mw} config", limits.string)
            decode = _Decoder(allow, None, mw, functions=kind == "torch.nn", depth=limits.depth,
                              string=limits.string)
            values = {k: decode(v) for k, v in config.items()}
            if kind == "runtime":
                plan.configs[path] = check_runtime(cls, values, mw, decoded_limit)
                # tensors from_state decodes at load count with the file's own
                plan.declared_bytes += runtime_load_bytes(cls, plan.configs[path], mw)
                if plan.declared_bytes > decoded_limit:
                    raise ArtifactLimitError(
                        f"{mw}: decodes tensors at load that bring the total to "
                        f"{plan.declared_bytes} bytes, over the limit of {decoded_limit}; pass "
                        "max_bytes= to load() if you trust the file")
            else:
                plan.configs[path] = check_torch_nn(cls, cname.removeprefix("torch.nn."), values, mw)
        elif kind not in (None, "container", "torch.nn") or m.get("config"):
            raise ArtifactFormatError(f"{where}: the root module has a kind or config")
        if not isinstance(m.get("training", False), bool):
            raise ArtifactFormatError(f"{mw}: training must be true or false")
        ts = m.get("tensors", {})
        if not isinstance(ts, dict):
            raise ArtifactFormatError(f"{mw}: tensors must be an object")
        for tname, ref in ts.items():
            _check_tensor_name(cls, tname, f"{mw} tensor", limits.string)
            if not isinstance(ref, dict) or ref.get("kind") not in ("parameter", "buffer", "attr"):
                raise ArtifactFormatError(f"{mw}: tensor {tname!r} malformed")
            _keys(ref, _REF_KEYS, f"{mw} tensor {tname!r}")
            r = ref.get("ref")
            if r is not None and (not isinstance(r, str) or r not in tensors):
                raise ArtifactFormatError(f"{mw}: tensor {tname!r} refers to missing "
                                          f"{_short_repr(r)}")
            if (r is None and ref["kind"] == "attr") or (kind == "runtime" and r is None):
                raise ArtifactFormatError(f"{mw}: tensor {tname!r} has no data")
            for flag in ("requires_grad", "persistent"):
                if not isinstance(ref.get(flag, False), bool):
                    raise ArtifactFormatError(f"{mw}: tensor {tname!r}: {flag} must be a bool")
            attrs.add(_join(path, tname))
        plan.modules.append(m)
    names: set[str] = set()
    code = 0  # characters of the code fx will generate (Limits.code_chars)
    for n in nodes:
        if not isinstance(n, dict):
            raise ArtifactFormatError(f"{where}: malformed node")
        name = n.get("name")
        op = n.get("op")
        nw = f"{where}: node {_short_repr(name, 60)} ({op if op in _OPS else _short_repr(op, 20)} " \
             f"{_short_repr(n.get('target'), 60)})"
        _keys(n, _NODE_KEYS, nw)
        _check_ident(name, nw, limits.string)
        if name in names:
            raise ArtifactFormatError(f"{nw}: duplicate node name")
        op, target = n.get("op"), n.get("target")
        if op not in _OPS:
            raise ArtifactFormatError(f"{nw}: unknown op")
        if op == "placeholder":
            _check_ident(target, nw, limits.string)
            if target in _RESERVED:  # a forward() parameter named so would shadow it
                raise ForbiddenTargetError(f"{nw}: input name {target!r} would shadow a name the "
                                           "generated code uses")
        elif op == "get_attr":
            _check_qualname(target, nw, limit=limits.string)
            if target not in attrs and target not in paths:
                raise ArtifactFormatError(f"{nw}: no tensor or module named {target!r} in the file")
        elif op == "call_module":
            _check_qualname(target, nw, limit=limits.string)
            if target not in paths:
                raise ArtifactFormatError(f"{nw}: no module named {target!r} in the file")
        elif op == "call_method":
            if not allow.method_allowed(target):
                raise ForbiddenTargetError(f"{nw}: Tensor method {_short_repr(target)} is not "
                                           "allowlisted (the reviewed list); the file was not loaded")
        elif op == "call_function":
            try:
                fn = allow.function(target)
            except (KeyError, TypeError):
                raise ForbiddenTargetError(
                    f"{nw}: function {_short_repr(target)} is not in the allowlist (the reviewed ops of torch, "
                    "torch.nn.functional, torch.ops.aten, operator, math, a few builtins; "
                    "nothing that takes raw memory or calls callables); the file was not "
                    "loaded") from None
            if fn is getattr:
                args = n.get("args")
                attr = args["v"][1] if isinstance(args, dict) and isinstance(args.get("v"), list) \
                    and len(args["v"]) == 2 else None
                kwargs = n.get("kwargs", {"$": "dict", "v": []})
                if not allow.attribute_allowed(attr) or kwargs != {"$": "dict", "v": []}:
                    raise ForbiddenTargetError(f"{nw}: getattr is allowed only with a constant "
                                               f"tensor data attribute (shape, dtype, ...), got "
                                               f"{_short_repr(attr)}")
        elif op == "output" and target != "output":
            raise ArtifactFormatError(f"{nw}: output node target must be 'output'")
        if name in _FX_RENAMES:
            raise ForbiddenTargetError(f"{nw}: node name {name!r} is a Python keyword or builtin or a "
                                       "global of torch.fx's code, which torch.fx never writes")
        # a name is written where the node is defined and freed, a target where it is called
        code += 2 * len(name) + len(str(n.get("target"))) + 8 + _code_chars(n.get("args")) + \
            _code_chars(n.get("kwargs"))
        if code > limits.code_chars:
            raise ArtifactLimitError(
                f"{nw}: the graph's generated code would exceed {limits.code_chars} characters "
                "(names, targets and string arguments, a name again at every use); pass "
                "limits=Limits(code_chars=...) to load() if you trust the file")
        shape = n.get("shape")
        if shape is not None and not (isinstance(shape, list) and len(shape) <= 64 and all(
                s is None or (isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 48)
                for s in shape)):
            raise ArtifactFormatError(f"{nw}: malformed shape {_short_repr(shape)} (sizes are "
                                      "whole numbers from 0)")
        if op == "placeholder" and shape is not None and all(isinstance(s, int) for s in shape):
            # tools build example inputs of this size (export-onnx without example inputs)
            nbytes = math.prod(shape) * _itemsize(n.get("dtype"))
            if nbytes > decoded_limit:
                raise ArtifactLimitError(
                    f"{nw}: an input of shape {_short_repr(shape)} is {nbytes} bytes, over the "
                    f"limit of {decoded_limit} (example inputs are built at this size); pass "
                    "max_bytes= to load() if you trust the file")
        if not isinstance(n.get("pass", ""), str) or not isinstance(n.get("dtype", ""), str):
            raise ArtifactFormatError(f"{nw}: malformed pass or dtype")
        names.add(name)
    cg = graph.get("codegen")
    if cg is not None:
        if not isinstance(cg, dict) or cg.get("kind") != "pytree" or not isinstance(
                cg.get("orig_args", []), list):
            raise ArtifactFormatError(f"{where}: unknown code generator {_short_repr(cg)}")
        _count("nodes", cg.get("orig_args", []), limits.nodes, where)
        for a in cg.get("orig_args", []):
            # forward()'s parameters, like a placeholder's target: one must not shadow a
            # global of the generated code (torch, fx_pytree, ...), or the graph's calls
            # would go to the caller's input instead of the reviewed ops
            _check_ident(a, f"{where}: graph argument", limits.string)
            if a in _RESERVED:
                raise ForbiddenTargetError(f"{where}: graph argument {a!r} would shadow a name "
                                           "the generated code uses")
        if len(set(cg.get("orig_args", []))) != len(cg.get("orig_args", [])):
            raise ArtifactFormatError(f"{where}: graph arguments repeat a name")
    cname = graph.get("class_name", "GraphModule")
    if not isinstance(cname, str) or not _IDENT.fullmatch(cname) or len(cname) > 256 \
            or cname.startswith("__"):
        raise ArtifactFormatError(f"{where}: bad graph class name {_short_repr(cname)}")
    return plan


__all__ = ["Allowlist", "class_name"]
