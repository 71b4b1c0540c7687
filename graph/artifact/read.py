"""Load: check the header against the closed schema within the limits, decode the tensors,
then build the modules and the graph. Nothing from the file is executed, and nothing but
an :class:`~fxpress.errors.ArtifactError` leaves :func:`load`."""
from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx

from fxpress.errors import (ArtifactError, ArtifactFormatError, ArtifactIntegrityError,
                            ArtifactLimitError, ArtifactSecurityError, FxpressError)
from fxpress.graph.artifact.calls import SAVED, LoadedGraphModule, check_call_arity
from fxpress.graph.artifact.compact import crc8, stream_order
from fxpress.graph.artifact.format import (BLOB_KEY, BLOB_STREAM_BYTES, _sha, _sha64,
                                           _split_prefix, as_path, open_regular,
                                           read_bounded)
from fxpress.graph.artifact.limits import Limits, resolve
from fxpress.graph.artifact.modules import _ABSENT, _class_attr, TORCH_NN, finish_torch_nn
from fxpress.graph.artifact.kernels import (check_constant_sizes, check_module_sizes,
                                            guard_kernel_calls)
from fxpress.graph.artifact.rnn import check_rnn_tree, guard_lstm_calls
from fxpress.graph.artifact.schema import _IDENT, Allowlist, _Checked, _validate
from fxpress.graph.artifact.specs import spec_from_file
from fxpress.graph.artifact.tensors import decode_tensor
from fxpress.graph.input_sizes import guard_input_sizes
from fxpress.graph.artifact.values import _Decoder, _dtype, _short_repr, dtype_name, escape_controls


@contextlib.contextmanager
def _located(where: str):
    """Prefix the file's name to errors raised by per-tensor helpers."""
    try:
        yield
    except ArtifactError as e:
        raise type(e)(f"{where}: {e}") from None


# what to do about a refused file, appended to messages that do not say it already
_FIX = {
    ArtifactIntegrityError: "the file is corrupted or was edited; save it again with fxpress.save",
    ArtifactLimitError: "if you trust the file, raise the limit: fxpress.load(path, max_bytes=..., "
                        "limits=fxpress.graph.artifact.Limits(...))",
    ArtifactSecurityError: "the file was not loaded and nothing in it ran; load only artifacts "
                           "written by fxpress.save (a plugin's runtime module needs that plugin "
                           "installed)",
    ArtifactFormatError: "the file is damaged, cut short or not an fxpress artifact; copy it "
                         "again or save it again with fxpress.save",
}


def _with_fix(e: ArtifactError) -> ArtifactError:
    msg = str(e)
    fix = next((f for t, f in _FIX.items() if isinstance(e, t)), None)
    if fix is None or any(s in msg for s in ("again", "not loaded", "max_bytes=", "newer fxpress",
                                              "limits=")):
        return e if escape_controls(msg) == msg else type(e)(escape_controls(msg))
    return type(e)(escape_controls(f"{msg.rstrip('.')}; {fix}"))


def loads(data: bytes | memoryview, runtime_modules: Iterable[type] = (), *,
          max_bytes: int | None = None, limits: Limits | None = None,
          where: str = "artifact") -> torch.fx.GraphModule:
    """Rebuild a GraphModule from artifact bytes (see :func:`load`)."""
    lim = resolve(limits, max_bytes)
    try:
        return _loads(data, runtime_modules, limits=lim, where=where)
    except ArtifactError as e:
        fixed = _with_fix(e)
        if fixed is e:
            raise
        raise fixed from None
    except FxpressError:
        raise
    except MemoryError:
        raise ArtifactLimitError(escape_controls(
            f"{where}: loading ran out of memory; the file asks for more than this machine "
            "has")) from None
    except (RecursionError, Exception) as e:  # the schema should have caught it: never escapes raw
        raise ArtifactFormatError(escape_controls(
            f"{where}: the file does not rebuild ({type(e).__name__}: {_short_repr(str(e), 200)}); "
            "it was not loaded")) from None


def _loads(data: bytes | memoryview, runtime_modules: Iterable[type], *, limits: Limits,
           where: str) -> torch.fx.GraphModule:
    import safetensors.torch

    header, payload_view, _ = _split_prefix(data, where, limits=limits)
    allow = Allowlist(runtime_modules)
    plan = _validate(header, allow, where, limits, limits.decoded_limit(len(data)))
    pinfo = header.get("payload", {})
    if not isinstance(pinfo, dict) or pinfo.get("length") != len(payload_view):
        raise ArtifactFormatError(f"{where}: payload is {len(payload_view)} bytes, header declares "
                                  f"{_short_repr(pinfo.get('length')) if isinstance(pinfo, dict) else '?'}: "
                                  "truncated or tampered")
    if _sha(payload_view) != pinfo.get("sha256"):
        # name the damaged tensor(s) where the payload still parses
        bad = _damaged_streams(header, payload_view)
        raise ArtifactIntegrityError(
            f"{where}: payload fails its sha256 check" + (f" (damaged: {', '.join(bad[:5])})" if bad
                                                          else "") +
            "; the file is corrupted or was edited. Save it again.")
    try:
        streams = safetensors.torch.load(bytes(payload_view)) if len(payload_view) else {}
    except Exception as e:
        raise ArtifactFormatError(f"{where}: payload is not valid safetensors: {e}") from None
    streams = _unblob(header, streams, where)
    with _located(where):
        decoded = {key: decode_tensor(key, entry, streams) for key, entry in header["tensors"].items()}
    del streams
    root = _build_modules(plan, decoded, where)
    return _build_graph(header, plan, root, allow, where, limits, limits.decoded_limit(len(data)))


def _blob_streams(header: dict) -> Iterable[tuple[str, str, dict, int, int]]:
    """(tensor, stream name, info, start, end) of each stream stored in the blob, in order."""
    at = 0
    for key, entry in header["tensors"].items():
        for sname, info in entry.get("streams", {}).items():
            if isinstance(info, dict) and info.get("blob"):
                n = info.get("bytes")
                if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < BLOB_STREAM_BYTES:
                    raise ArtifactFormatError(f"tensor {key!r}: blob stream {sname!r} has a bad "
                                              f"size {_short_repr(n)}")
                yield key, sname, info, at, at + n
                at += n


def _unblob(header: dict, streams: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Split the blob tensor back into the small streams it holds, each as a tensor of its
    stored dtype, after checking that the header's stream sizes tile it exactly."""
    blob_info = header.get("blob")
    blob = streams.pop(BLOB_KEY, None)
    if blob_info is None:
        if blob is not None:
            raise ArtifactFormatError(f"{where}: payload holds a blob the header does not declare")
        return streams
    if blob is None or blob.dtype != torch.uint8 or blob.dim() != 1 or not isinstance(
            blob_info, dict) or blob_info.get("bytes") != blob.numel():
        raise ArtifactFormatError(f"{where}: the header's blob and the payload's disagree")
    end = 0
    with _located(where):
        for key, sname, info, a, end in _blob_streams(header):
            skey = info.get("key")
            if not isinstance(skey, str) or skey in streams or end > blob.numel():
                raise ArtifactFormatError(f"tensor {key!r}: blob stream {sname!r} is misplaced")
            dtype = torch.uint8 if info.get("codec") is not None else _dtype(info.get("dtype"), key)
            piece = blob[a:end].clone()
            if piece.numel() % piece.new_empty((), dtype=dtype).element_size():
                raise ArtifactFormatError(f"tensor {key!r}: blob stream {sname!r} is not whole "
                                          f"{dtype_name(dtype)} elements")
            streams[skey] = piece.view(dtype)
    if end != blob.numel():
        raise ArtifactFormatError(f"{where}: the blob holds {blob.numel()} bytes, its streams "
                                  f"{end}")
    return streams


def _damaged_streams(header: dict, payload: memoryview) -> list[str]:
    """The streams whose stored bytes fail their check (a version 1 file's 64-bit digest,
    a version 2 file's ``crc8`` locator), where the payload's index still parses."""
    try:
        n = struct.unpack("<Q", payload[:8])[0]
        st_header = json.loads(bytes(payload[8:8 + n]))
        base = 8 + n
        locator = header.get("crc8")
        locator = locator if isinstance(locator, str) else ""
        blob = st_header.get(BLOB_KEY, {}).get("data_offsets", [0, 0])[0]
        where = {(key, sname): (base + blob + a, base + blob + b)
                 for key, sname, _, a, b in (_blob_streams(header) if "blob" in header else ())}
        bad = []
        for i, (key, sname, info) in enumerate(stream_order(header)):
            if (key, sname) in where:
                a, b = where[key, sname]
            else:
                rec = st_header.get(info.get("key"))
                if not isinstance(rec, dict):
                    continue
                a, b = (base + o for o in rec.get("data_offsets", [0, 0]))
            data = payload[a:b]
            if "sha256" in info:
                damaged = _sha64(data) != info["sha256"]
            elif len(locator) >= 2 * i + 2:
                damaged = crc8(data) != locator[2 * i:2 * i + 2]
            else:
                continue
            if damaged:
                bad.append(f"tensor {key!r} stream {sname!r}")
    except Exception:
        return []
    return bad


def _check_loaded(root: torch.nn.Module, plan: _Checked, where: str) -> None:
    """Each runtime module's ``check_loaded`` (its children against its config), once the
    whole tree is built; a refusal names the module."""
    from fxpress.graph.runtime import RuntimeModule, StateCheck

    for m in plan.modules:
        path = m["path"]
        if m.get("kind") != "runtime":
            continue
        mod = root.get_submodule(path)
        if not isinstance(mod, RuntimeModule):
            continue
        try:
            mod.check_loaded(StateCheck(mod))
        except Exception as e:
            raise ArtifactFormatError(f"{where}: module {path!r}: {type(mod).__name__} does not fit "
                                      f"its children ({type(e).__name__}: "
                                      f"{escape_controls(str(e)[:400])})") from None


def _build_modules(plan: _Checked, decoded: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    built: dict[str, torch.nn.Module] = {}
    paths = {m["path"] for m in plan.modules} | {p for p, _ in plan.aliases}
    root = torch.nn.Module()
    for m in plan.modules:
        path = m["path"]
        refs = m.get("tensors", {})
        if not path:
            mod = root
        elif m.get("kind") == "runtime":
            cls = plan.classes[path]
            tensors = {n: decoded[r["ref"]] for n, r in refs.items() if r.get("ref") is not None}
            params = [n for n, r in refs.items() if r.get("kind") == "parameter"]
            try:
                mod = cls.from_state(dict(plan.configs[path]), tensors, params)
            except Exception as e:
                raise ArtifactFormatError(f"{where}: module {path!r}: {cls.__name__}.from_state "
                                          f"refused its config ({type(e).__name__}: "
                                          f"{escape_controls(str(e)[:400])})") from None
            if not isinstance(mod, cls):
                raise ArtifactFormatError(f"{where}: module {path!r}: from_state returned "
                                          f"{type(mod).__name__}")
            try:  # a config without a field the class reads failed at the first call instead
                given = mod.config()
            except Exception as e:
                raise ArtifactFormatError(f"{where}: module {path!r}: {cls.__name__} built from "
                                          "the file's config cannot give its config back "
                                          f"({type(e).__name__}: {_short_repr(str(e), 200)}): "
                                          "the config lacks a field the class needs") from None
            # a key the class neither gives back nor declares is no field of it, but an
            # attribute its code may read (``latent`` made a quantized layer take its
            # fine-tuning path at every call, on the file's value)
            extra = sorted(k for k in plan.configs[path] if k not in given
                           and _class_attr(cls, k) is _ABSENT)
            if extra:
                raise ArtifactFormatError(f"{where}: module {path!r}: config key(s) {extra} are "
                                          f"no field of {cls.__name__}")
            for n, r in refs.items():  # from_state decides trainability; restore what was saved
                p = mod._parameters.get(n) if n in params else None
                if p is not None and "requires_grad" in r and p.is_floating_point():
                    p.requires_grad_(bool(r["requires_grad"]))
        else:
            cls = plan.classes[path]
            mod = cls.__new__(cls)
            torch.nn.Module.__init__(mod)
            for k, v in plan.configs[path].items():  # checked fields only (see .modules)
                object.__setattr__(mod, k, v)
        if m.get("kind") != "runtime":
            for n, r in refs.items():
                t = decoded[r["ref"]] if r.get("ref") is not None else None
                if r["kind"] == "parameter":
                    mod.register_parameter(n, None if t is None else torch.nn.Parameter(
                        t, requires_grad=bool(r.get("requires_grad", True)) and t.is_floating_point()))
                elif r["kind"] == "buffer":
                    mod.register_buffer(n, t, persistent=bool(r.get("persistent", True)))
                else:
                    object.__setattr__(mod, n, t)
            if path and m.get("kind") == "torch.nn":
                _check_fields(m, mod, paths, where)
                finish_torch_nn(mod)
        mod.training = bool(m.get("training", False))
        built[path] = mod
        if path:
            parent, _, name = path.rpartition(".")
            built[parent].add_module(name, mod)
    for path, target in plan.aliases:  # after every real module: an alias may point forward
        parent, _, name = path.rpartition(".")
        built[parent].add_module(name, built[target])
    _no_module_cycles(root, where)
    _check_loaded(root, plan, where)
    check_rnn_tree(root, where)
    return root


def _check_fields(m: dict, mod: torch.nn.Module, paths: set[str], where: str) -> None:
    """Refuse a torch.nn module without one of its class's fields (as config, tensor or
    child module): it loaded, then failed at its first call with a raw AttributeError."""
    cname = m["class"].removeprefix("torch.nn.")
    missing = sorted(f for f in TORCH_NN[cname][0] if f not in vars(mod) and f not in
                     mod._parameters and f not in mod._buffers and f"{m['path']}.{f}" not in paths)
    if missing:
        raise ArtifactFormatError(f"{where}: module {m['path']!r} (torch.nn.{cname}) lacks the "
                                  f"field(s) {', '.join(missing)} its class needs; save the "
                                  "model again with fxpress.save")


def _no_module_cycles(root: torch.nn.Module, where: str) -> None:
    """Refuse a module tree in which a module contains itself (through aliases)."""
    state: dict[int, int] = {}  # id -> 1 on the stack, 2 done
    stack: list[tuple[torch.nn.Module, Any]] = [(root, iter(root._modules.values()))]
    state[id(root)] = 1
    while stack:
        mod, children = stack[-1]
        child = next(children, None)
        if child is None:
            state[id(mod)] = 2
            stack.pop()
            continue
        s = state.get(id(child))
        if s == 1:
            raise ArtifactFormatError(f"{where}: the module tree contains itself (an alias cycle)")
        if s is None:
            state[id(child)] = 1
            stack.append((child, iter(child._modules.values())))


_NUM = (bool, int, float, torch.fx.Node)
# ATen types as str(schema type) spells them (dtypes, layouts and memory formats are ints)
_ARG_KINDS = {"Tensor": (*_NUM, complex), "int": (*_NUM, torch.dtype, torch.layout, torch.memory_format),
              "SymInt": _NUM, "float": _NUM, "bool": _NUM, "number": (*_NUM, complex),
              "Scalar": (*_NUM, complex), "complex": (*_NUM, complex), "str": (str,),
              "Device": (torch.device, str), "Layout": (torch.layout,),
              "MemoryFormat": (torch.memory_format,), "ScalarType": (torch.dtype,)}


def _arg_ok(v: Any, t: str) -> bool:
    """Does the constant or node ``v`` fit the ATen schema type ``t``?"""
    if t.startswith("Optional[") and t.endswith("]"):
        return v is None or _arg_ok(v, t[9:-1])
    if t.startswith("List[") and t.endswith("]"):
        t = t[5:-1] + "[]"
    if t.endswith("?"):
        return v is None or _arg_ok(v, t[:-1])
    if t.endswith("]"):
        inner = t[:t.index("[")]
        return isinstance(v, torch.fx.Node) or (isinstance(v, (list, tuple)) and all(
            _arg_ok(x, inner + ("?" if inner == "Tensor" else "")) for x in v)) or (
            inner in ("int", "SymInt") and isinstance(v, int))
    kinds = _ARG_KINDS.get(t)
    return kinds is None or isinstance(v, kinds)


def _check_aten_args(op: Any, args: tuple, kwargs: dict, nw: str) -> None:
    schema = op._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    by_name = {a.name: a for a in schema.arguments}
    if len(args) > len(positional) or not set(kwargs) <= set(by_name):
        raise ArtifactSecurityError(f"{nw}: arguments do not fit {schema.name}'s schema")
    for v, a in [*zip(args, positional), *((kwargs[k], by_name[k]) for k in kwargs)]:
        if not _arg_ok(v, str(a.type)):
            raise ArtifactSecurityError(f"{nw}: argument {a.name!r} of {schema.name} is "
                                        f"{_short_repr(v)}, not a {a.type}")


def _build_graph(header: dict, plan: _Checked, root: torch.nn.Module, allow: Allowlist, where: str,
                 limits: Limits, decoded_limit: int) -> torch.fx.GraphModule:
    from torch.fx.passes.shape_prop import TensorMetadata

    ginfo = header["graph"]
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for n in ginfo["nodes"]:
        nw = f"{where}: node {n['name']!r}"
        # functions are never data in a graph: no op on the reviewed list takes one
        decode = _Decoder(allow, env, nw, functions=False, depth=limits.depth, string=limits.string)
        args, kwargs = decode(n.get("args", {"$": "tuple", "v": []})), decode(n.get("kwargs", {"$": "dict", "v": []}))
        if not isinstance(args, tuple) or not isinstance(kwargs, dict) or not all(
                isinstance(k, str) and _IDENT.fullmatch(k) and not k.startswith("__") for k in kwargs):
            raise ArtifactFormatError(f"{nw}: args must be a tuple and kwargs a dict of names")
        op, target = n["op"], n["target"]
        if op == "call_function":
            target = allow.function(target)
            if isinstance(target, torch._ops.OpOverload):
                _check_aten_args(target, args, kwargs, nw)
        elif op == "output" and (len(args) != 1 or kwargs):
            raise ArtifactFormatError(f"{nw}: the output node takes one argument")
        elif op in ("placeholder", "get_attr") and any(isinstance(a, torch.fx.Node) for a in args):
            raise ArtifactFormatError(f"{nw}: a {op} node takes no node arguments")
        node = graph.create_node(op, target, args, kwargs, name=n["name"])
        if node.name != n["name"]:  # torch.fx renamed it: the schema lets no such name through
            raise ArtifactFormatError(f"{nw}: torch.fx does not keep this name")
        env[n["name"]] = node
        if n.get("shape") is not None and "dtype" in n:
            shape = n["shape"]
            if isinstance(shape, list) and all(isinstance(s, int) for s in shape):
                node.meta["tensor_meta"] = TensorMetadata(
                    torch.Size(shape), _dtype(n["dtype"], nw), False, (), None, False, {})
            if isinstance(shape, list) and all(s is None or isinstance(s, int) for s in shape):
                node.meta[SAVED] = (list(shape), _dtype(n["dtype"], nw))  # see .calls
        if isinstance(n.get("pass"), str):
            node.meta["fxpress_pass"] = n["pass"]
    cg = ginfo.get("codegen")
    if cg is not None:
        in_spec = spec_from_file(cg["in_spec"], f"{where}: input structure", limits.depth,
                                 limits.nodes) if cg.get("in_spec") else None
        out_spec = spec_from_file(cg["out_spec"], f"{where}: output structure", limits.depth,
                                  limits.nodes) if cg.get("out_spec") else None
        graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(
            list(cg.get("orig_args", [])), in_spec, out_spec))
    guard_lstm_calls(graph)
    guard_kernel_calls(graph, where)
    check_constant_sizes(graph, decoded_limit, where)
    check_module_sizes(root, decoded_limit, where)
    try:
        graph.lint()
        gm = LoadedGraphModule(root, graph, ginfo.get("class_name", "GraphModule"))
    except Exception as e:
        raise ArtifactFormatError(f"{where}: the stored graph does not rebuild: "
                                  f"{type(e).__name__}: {_short_repr(str(e), 200)}") from None
    check_call_arity(gm, where)
    gm.fxpress_file = where  # named by a call's typed error (.calls)
    _keep_non_persistent(gm, header)
    gm.training = False
    meta = header.get("meta")
    gm.meta["fxpress"] = dict(meta) if isinstance(meta, dict) else {}
    guard_input_sizes(gm)  # the sizes an exported graph runs at (export's guards are code)
    if isinstance(header.get("report"), dict):
        gm.meta["fxpress_report"] = header["report"]
    return gm


def _keep_non_persistent(gm: torch.fx.GraphModule, header: dict) -> None:
    # GraphModule(root, graph) copies every tensor a graph reads with register_buffer's
    # default, persistent: mark again those saved non-persistent (export's position_ids),
    # and make plain tensor attributes (export's lifted constants) plain again, or a
    # reloaded state_dict would hold entries the saved graph's does not
    for m in header["modules"]:
        for name, r in (m.get("tensors") or {}).items():
            kind = r.get("kind")
            if not (kind == "attr" or (kind == "buffer" and not r.get("persistent", True))):
                continue
            try:
                owner = gm.get_submodule(m["path"]) if m.get("path") else gm
            except AttributeError:
                continue
            if name not in owner._buffers:
                continue
            if kind == "buffer":
                owner._non_persistent_buffers_set.add(name)
            else:
                object.__setattr__(owner, name, owner._buffers.pop(name))


def load(path: str | os.PathLike, runtime_modules: Iterable[type] = (), *,
         max_bytes: int | None = None, limits: Limits | None = None) -> torch.fx.GraphModule:
    """Load an artifact written by :func:`save`; ``runtime_modules`` are the classes allowed
    besides torch.nn (``fxpress.load`` passes every registered pass's runtime modules).

    >>> gm = load("mlp.fxp")                            # doctest: +SKIP

    ``max_bytes`` bounds the decoded tensors (default ``max(256 MiB, 10,000 x the file
    size)``), ``limits`` every other bound (:class:`~fxpress.graph.artifact.Limits`).
    Raises :class:`~fxpress.errors.ArtifactError` (format, integrity, limit, security)
    before building anything; nothing in the file is executed. Only regular files are
    read, and never past the size they had when opened.
    """
    lim = resolve(limits, max_bytes)
    p = as_path(path)
    shown = escape_controls(str(p))
    f, size = open_regular(p)
    try:
        with f:
            data = read_bounded(f, size, shown)
    except OSError as e:
        raise ArtifactError(f"cannot read artifact {shown}: {e.strerror or e}") from None
    return loads(data, runtime_modules, limits=lim, where=shown)
