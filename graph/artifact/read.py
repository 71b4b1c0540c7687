"""Load: check the header against the schema, decode the tensors within the limits, then
build the modules and the graph."""
from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch
import torch.fx

from fxpress.errors import (ArtifactError, ArtifactFormatError, ArtifactIntegrityError,
                            ForbiddenTargetError)
from fxpress.graph.artifact.format import (BLOB_KEY, BLOB_STREAM_BYTES, EXPANSION_LIMIT,
                                           MIN_DECODED_LIMIT, _sha, _sha64, _split_prefix)
from fxpress.graph.artifact.schema import Allowlist, _Checked, _validate, derived_attributes
from fxpress.graph.artifact.tensors import _check_tensor_entry, decode_tensor
from fxpress.graph.artifact.values import _Decoder, _dtype, _short_repr, dtype_name

@contextlib.contextmanager
def _located(where: str):
    """Prefix the file's name to errors raised by per-tensor helpers."""
    try:
        yield
    except ArtifactError as e:
        raise type(e)(f"{where}: {e}") from None


def _decoded_limit(header: dict, file_size: int, max_bytes: int | None, where: str) -> None:
    total = 0
    for key, entry in header["tensors"].items():
        total += _check_tensor_entry(key, entry)[2]
    limit = max_bytes if max_bytes is not None else max(MIN_DECODED_LIMIT, EXPANSION_LIMIT * file_size)
    if total > limit:
        raise ArtifactFormatError(f"{where}: tensors would decode to {total} bytes, over the "
                                  f"limit of {limit} for a {file_size}-byte file; pass "
                                  "max_bytes= to load() if you trust it")


# what to do about a refused file, appended to messages that do not say it already
_FIX = {
    ArtifactIntegrityError: "the file is corrupted or was edited; save it again with fxpress.save",
    ForbiddenTargetError: "the file was not loaded and nothing in it ran; load only artifacts "
                          "written by fxpress.save (a plugin's runtime module needs that plugin "
                          "installed)",
    ArtifactFormatError: "the file is damaged, cut short or not an fxpress artifact; copy it "
                         "again or save it again with fxpress.save",
}


def _with_fix(e: ArtifactError) -> ArtifactError:
    msg = str(e)
    fix = next((f for t, f in _FIX.items() if isinstance(e, t)), None)
    if fix is None or any(s in msg for s in ("again", "not loaded", "max_bytes=", "newer fxpress")):
        return e
    return type(e)(f"{msg.rstrip('.')}; {fix}")


def loads(data: bytes | memoryview, runtime_modules: Iterable[type] = (), *,
          max_bytes: int | None = None, where: str = "artifact") -> torch.fx.GraphModule:
    """Rebuild a GraphModule from artifact bytes (see :func:`load`)."""
    try:
        return _loads(data, runtime_modules, max_bytes=max_bytes, where=where)
    except ArtifactError as e:
        fixed = _with_fix(e)
        if fixed is e:
            raise
        raise fixed from None


def _loads(data: bytes | memoryview, runtime_modules: Iterable[type], *,
           max_bytes: int | None, where: str) -> torch.fx.GraphModule:
    import safetensors.torch

    header, payload_view, _ = _split_prefix(data, where)
    allow = Allowlist(runtime_modules)
    plan = _validate(header, allow, where)
    pinfo = header.get("payload", {})
    if not isinstance(pinfo, dict) or pinfo.get("length") != len(payload_view):
        raise ArtifactFormatError(f"{where}: payload is {len(payload_view)} bytes, header declares "
                                  f"{pinfo.get('length') if isinstance(pinfo, dict) else '?'}: "
                                  "truncated or tampered")
    _decoded_limit(header, len(data), max_bytes, where)
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
    root = _build_modules(plan, decoded, header["tensors"])
    gm = _build_graph(header, root, allow, where)
    return gm


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
    try:
        n = struct.unpack("<Q", payload[:8])[0]
        st_header = json.loads(bytes(payload[8:8 + n]))
        base = 8 + n
        bad = []
        blob = st_header.get(BLOB_KEY, {}).get("data_offsets", [0, 0])[0]
        for key, sname, info, a, b in _blob_streams(header) if "blob" in header else ():
            if _sha64(payload[base + blob + a: base + blob + b]) != info.get("sha256"):
                bad.append(f"tensor {key!r} stream {sname!r}")
    except Exception:
        return []
    for key, entry in header["tensors"].items():
        for sname, info in entry.get("streams", {}).items():
            rec = st_header.get(info.get("key"))
            if not isinstance(rec, dict) or info.get("blob"):
                continue
            a, b = rec.get("data_offsets", [0, 0])
            if _sha64(payload[base + a: base + b]) != info.get("sha256"):
                bad.append(f"tensor {key!r} stream {sname!r}")
    return bad


def _build_modules(plan: _Checked, decoded: dict[str, torch.Tensor],
                   entries: dict[str, dict]) -> torch.nn.Module:
    built: dict[str, torch.nn.Module] = {}
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
            mod = cls.from_state(plan.configs[path], tensors, params)
            for n, r in refs.items():  # from_state decides trainability; restore what was saved
                p = mod.get_parameter(n) if n in params else None
                if p is not None and "requires_grad" in r and p.is_floating_point():
                    p.requires_grad_(bool(r["requires_grad"]))
        else:
            cls = plan.classes[path]
            mod = cls.__new__(cls)
            torch.nn.Module.__init__(mod)
            for k, v in plan.configs[path].items():
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
        if m.get("kind") == "torch.nn":
            _, rebuild = derived_attributes(type(mod))
            if rebuild is not None:
                getattr(mod, rebuild)()
        mod.training = bool(m.get("training", False))
        built[path] = mod
        if path:
            parent, _, name = path.rpartition(".")
            built[parent].add_module(name, mod)
    return root


def _build_graph(header: dict, root: torch.nn.Module, allow: Allowlist, where: str
                 ) -> torch.fx.GraphModule:
    from torch.fx.passes.shape_prop import TensorMetadata

    ginfo = header["graph"]
    for m in header["modules"]:
        if "alias" in m:
            parent, _, name = m["path"].rpartition(".")
            root.get_submodule(parent).add_module(name, root.get_submodule(m["alias"]))
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for n in ginfo["nodes"]:
        nw = f"{where}: node {n['name']!r}"
        decode = _Decoder(allow, env, nw)
        args, kwargs = decode(n.get("args", {"$": "tuple", "v": []})), decode(n.get("kwargs", {"$": "dict", "v": []}))
        if not isinstance(args, tuple) or not isinstance(kwargs, dict) or \
                not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise ArtifactFormatError(f"{nw}: args must be a tuple and kwargs a dict of names")
        op, target = n["op"], n["target"]
        if op == "call_function":
            target = allow.function(target)
        node = graph.create_node(op, target, args, kwargs, name=n["name"])
        env[n["name"]] = node
        if n.get("shape") is not None and "dtype" in n:
            shape = n["shape"]
            if isinstance(shape, list) and all(isinstance(s, int) for s in shape):
                node.meta["tensor_meta"] = TensorMetadata(
                    torch.Size(shape), _dtype(n["dtype"], nw), False, (), None, False, {})
        if isinstance(n.get("pass"), str):
            node.meta["fxpress_pass"] = n["pass"]
    cg = ginfo.get("codegen")
    if cg is not None:
        from torch.utils import _pytree as pytree

        try:
            in_spec = pytree.treespec_loads(cg["in_spec"]) if cg.get("in_spec") else None
            out_spec = pytree.treespec_loads(cg["out_spec"]) if cg.get("out_spec") else None
        except Exception as e:
            raise ArtifactFormatError(f"{where}: bad pytree spec: {e}") from None
        graph._codegen = torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(
            list(cg["orig_args"]), in_spec, out_spec))
    try:
        graph.lint()
        gm = torch.fx.GraphModule(root, graph, ginfo.get("class_name", "GraphModule"))
    except Exception as e:
        raise ArtifactFormatError(f"{where}: the stored graph does not rebuild: "
                                  f"{type(e).__name__}: {e}") from None
    gm.training = False
    meta = header.get("meta")
    gm.meta["fxpress"] = dict(meta) if isinstance(meta, dict) else {}
    if isinstance(header.get("report"), dict):
        gm.meta["fxpress_report"] = header["report"]
    return gm


def load(path: str | os.PathLike, runtime_modules: Iterable[type] = (), *,
         max_bytes: int | None = None) -> torch.fx.GraphModule:
    """Load an artifact written by :func:`save`; ``runtime_modules`` are the classes allowed
    besides torch.nn (``fxpress.load`` passes every registered pass's runtime modules).

    >>> gm = load("mlp.fxp")                            # doctest: +SKIP

    Raises :class:`~fxpress.errors.ArtifactError` (format, integrity, forbidden target)
    before building anything; nothing in the file is executed.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read artifact {p}: {e.strerror or e}") from None
    return loads(data, runtime_modules, max_bytes=max_bytes, where=str(p))
