"""Loading is safe: crafted files cannot run code, read memory or exhaust the machine.

Each test builds its own hostile file, the way an attacker would: the header is edited and
re-signed (checksums pass; only the closed schema and the limits stand in the way), or a
file is written from scratch. Bombs run in a child process whose address space is capped
with ``resource.setrlimit(RLIMIT_AS)``: the refusal must be the limit's own typed error,
not a MemoryError turned into one.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxpress.errors import (ArtifactFormatError, ArtifactIntegrityError, ArtifactLimitError,
                            ArtifactSecurityError,
                            ForbiddenTargetError, FxpressError)
from fxpress.graph import artifact
from fxpress.graph.artifact import Limits
from tests.helpers import node, set_target, tamper
from tests.runtime_fixtures import RUNTIME, ScaleShift

ROOT = Path(__file__).resolve().parents[1]
MARKER = "/tmp/fxpress-security-marker"


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")
        self.fc = torch.nn.Linear(32, 4)
        self.post = ScaleShift(4)

    def forward(self, x):
        y = torch.relu(self.conv(x)).flatten(1)
        return self.post(self.fc(y[:, :32]) * x.shape[0])


@pytest.fixture(scope="module")
def net():
    class Leaves(torch.fx.Tracer):  # the runtime module stays a module (a call_module node)
        def is_leaf_module(self, m, name):
            return isinstance(m, ScaleShift) or super().is_leaf_module(m, name)

    torch.manual_seed(0)
    model = _Net().eval()
    gm = torch.fx.GraphModule(model, Leaves().trace(model))
    assert isinstance(gm.post, ScaleShift)
    return gm, torch.randn(2, 1, 4, 4)


@pytest.fixture(scope="module")
def good(net):
    return artifact.dumps(net[0])


def _load(data, **kw):
    return artifact.loads(data, RUNTIME, **kw)


def _module(h, path):
    return next(m for m in h["modules"] if m.get("path") == path)


def test_the_file_loads_and_runs(net, good):
    gm, x = net
    assert torch.equal(_load(good)(x), gm(x))


# -- one crafted file per attack class ---------------------------------------------------------

@pytest.mark.parametrize("key", ["_call_impl", "_forward_pre_hooks", "forward", "__dict__",
                                 "_parameters", "register_forward_hook", "T_destination"])
def test_config_keys_naming_private_or_method_attributes_are_refused(good, key):
    for path in ("fc", "post"):  # a torch.nn module and a runtime module
        bad = tamper(good, lambda h: _module(h, path).setdefault("config", {}).update({key: 1}))
        with pytest.raises(ArtifactSecurityError):
            _load(bad)


@pytest.mark.parametrize("value", [
    {"$": "fn", "v": "torch.relu"},                       # a function as data
    {"$": "fn", "v": "builtins.getattr"},
    {"$": "tuple", "v": [{"$": "fn", "v": "operator.add"}]},
    {"$": "dict", "v": [["f", {"$": "fn", "v": "torch.nn.functional.relu"}]]},
    {"$": "device", "v": "cuda:99999"}, {"$": "slice", "v": [0, 1, 2]},
])
def test_functions_and_objects_smuggled_into_configs_are_refused(good, value):
    for path, key in (("fc", "in_features"), ("post", "options")):
        bad = tamper(good, lambda h: _module(h, path)["config"].update({key: value}))
        with pytest.raises(ArtifactFormatError):
            _load(bad)
    assert not os.path.exists(MARKER)


@pytest.mark.parametrize("target, args", [
    ("torch.fork", {"$": "tuple", "v": [{"$": "fn", "v": "builtins.getattr"}, "x"]}),
    ("torch.wait", None), ("torch.vmap", None), ("torch.compile", None), ("torch.cond", None),
    ("torch.ops.aten.as_strided.default", {"$": "tuple", "v": [[1 << 20], [1], 1 << 30]}),
    ("torch.ops.aten._reshape_alias.default", None), ("torch.ops.aten.set_.source_Storage", None),
    ("torch.ops.aten._unsafe_index.Tensor", None), ("torch.ops.aten.empty.memory_format", None),
    ("torch.ops.aten.as_strided_scatter.default", None), ("torch.ops.aten.from_file.default", None),
    ("torch.ops.aten.add.out", None), ("torch.ops.higher_order.cond", None),
    ("torch.as_strided", None), ("torch.empty_strided", None), ("torch.from_file", None),
    ("torch.frombuffer", None), ("torch.empty", None), ("torch.sparse_coo_tensor", None),
    ("operator.attrgetter", {"$": "tuple", "v": ["__globals__"]}), ("operator.methodcaller", None),
    ("operator.call", None), ("builtins.eval", None), ("builtins.exec", None),
    ("builtins.__import__", None), ("builtins.setattr", None), ("os.system", None),
    ("torch.Tensor.register_hook", None), ("torch._C._nn.linear", None), ("str.format", None),
    # reads the log-probabilities at the targets' labels unchecked: a label of 10**8 crashed
    ("torch.nn.functional.ctc_loss", None), ("torch.ops.aten.ctc_loss.Tensor", None),
    ("torch.ops.aten._ctc_loss.default", None),
])
def test_forbidden_call_targets(good, target, args):
    with pytest.raises(ForbiddenTargetError):
        _load(tamper(good, set_target(target, args)))


@pytest.mark.parametrize("method", ["as_strided", "set_", "storage", "untyped_storage", "data_ptr",
                                    "register_hook", "apply_", "map_", "backward", "resize_",
                                    "new_empty", "share_memory_", "__reduce_ex__", "_version",
                                    "format", "numpy", "tolist"])
def test_forbidden_methods(good, method):
    bad = tamper(good, lambda h: node(h, "call_module").update(op="call_method", target=method))
    with pytest.raises(ForbiddenTargetError):
        _load(bad)


@pytest.mark.parametrize("attr", ["__class__", "grad_fn", "storage", "_base", "__globals__",
                                  "untyped_storage", "data_ptr", "register_hook", 3, None])
def test_getattr_reads_only_tensor_data_attributes(good, attr):
    def mutate(h):
        n = next(n for n in h["graph"]["nodes"] if n["target"] == "builtins.getattr")
        n["args"]["v"][1] = attr
    with pytest.raises(ForbiddenTargetError):
        _load(tamper(good, mutate))


@pytest.mark.parametrize("name", ["torch", "self", "getattr", "fx_pytree", "operator"])
def test_graph_inputs_cannot_shadow_names_the_generated_code_uses(good, name):
    def mutate(h):
        n = node(h, "placeholder")
        text = json.dumps(h["graph"]["nodes"]).replace(f'"v": "{n["name"]}"', f'"v": "{name}"')
        h["graph"]["nodes"] = json.loads(text)
        node(h, "placeholder").update(name=name, target=name)
    with pytest.raises(ForbiddenTargetError, match="shadow"):
        _load(tamper(good, mutate))



@pytest.mark.parametrize("names", [["torch"], ["fx_pytree"], ["pytree"], ["self"], ["x", "x"]])
def test_exported_graph_arguments_cannot_shadow_names_the_generated_code_uses(names):
    # an export graph's forward() takes its codegen's orig_args: one named torch made
    # every call of the graph go to the caller's input (torch.ops... read off the argument)
    from fxpress.graph.capture import capture

    torch.manual_seed(0)
    data = artifact.dumps(capture(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),),
                                  method="export"))
    _load(data)
    bad = tamper(data, lambda h: h["graph"]["codegen"].update(orig_args=names))
    with pytest.raises(ArtifactFormatError, match="shadow|repeat"):
        _load(bad)

def test_functions_are_never_data_in_a_graph(good):
    def mutate(h):
        n = node(h, "call_function")
        n["args"] = {"$": "tuple", "v": [{"$": "fn", "v": "torch.relu"}]}
    with pytest.raises(ArtifactSecurityError, match="function value"):
        _load(tamper(good, mutate))


def test_aten_arguments_must_fit_the_schema(good):
    def mutate(h):
        n = node(h, "call_function")
        n["target"] = "torch.ops.aten.relu.default"
        n["args"] = {"$": "tuple", "v": ["not a tensor"]}
    with pytest.raises(ArtifactSecurityError, match="argument 'self'"):
        _load(tamper(good, mutate))


@pytest.mark.parametrize("cls", ["torch.nn.DataParallel", "torch.nn.parallel.DistributedDataParallel",
                                 "torch.nn.Module.__class__", "torch.nn.LazyLinear",
                                 "torch.nn.utils.rnn.PackedSequence", "subprocess.Popen",
                                 "torch.nn.Transformer"])
def test_module_classes_outside_the_reviewed_list(good, cls):
    with pytest.raises(ForbiddenTargetError):
        _load(tamper(good, lambda h: _module(h, "fc").update(**{"class": cls})))


@pytest.mark.parametrize("name", ["x\u0430", "fc\n", "fc;import os", "__init__", "class",
                                  "a" * 5000, "é", "fc\x1b[2J"])
def test_names_are_plain_ascii_identifiers(good, name):
    for mutate in (lambda h: node(h, "placeholder").update(name=name, target=name),
                   lambda h: node(h, "call_module").update(target=name),
                   lambda h: _module(h, "fc").update(path=name)):
        with pytest.raises(ArtifactFormatError):
            _load(tamper(good, mutate))


@pytest.mark.parametrize("shape", [[1 << 47, 1 << 47], [-1], [float("nan")], [1.5], ["8"],
                                   [True], [1] * 17, None, {"0": 8}])
def test_tensor_shapes(good, shape):
    header, payload, _ = artifact._split_prefix(good, "t")
    header["tensors"]["fc.weight"]["shape"] = shape
    bad = _raw_header_file(json.dumps(header), payload=bytes(payload), flags=5)  # NaN as JSON has it
    with pytest.raises(ArtifactFormatError, match="shape"):
        _load(bad)


@pytest.mark.parametrize("field, value", [
    ("dtype", "torch.float32"), ("dtype", ["float32"]), ("encoding", "pickle"),
    ("entries", 1 << 60), ("bits", 0), ("bits", 9), ("nnz", -1), ("streams", []),
    ("sha256", None), ("extra", 1),
])
def test_tensor_entry_fields(good, field, value):
    def mutate(h):
        e = h["tensors"]["fc.weight"]
        e[field] = value
        if field in ("entries", "bits", "nnz"):
            e["encoding"] = {"entries": "relidx", "bits": "relidx", "nnz": "bitmap"}[field]
            e.setdefault("bits", 4)
    with pytest.raises(ArtifactFormatError):
        _load(tamper(good, mutate))


def test_alias_cycles_are_refused(good):
    def to_root(h):
        h["modules"].append({"path": "fc.loop", "alias": ""})
    def cross(h):  # fc.a -> conv, conv.b -> fc: a module that contains itself
        h["modules"].append({"path": "fc.a", "alias": "conv"})
        h["modules"].append({"path": "conv.b", "alias": "fc"})
    def self_alias(h):
        h["modules"].append({"path": "fc.me", "alias": "fc"})
    def under_alias(h):
        h["modules"].append({"path": "fc.a", "alias": "conv"})
        h["modules"].append({"path": "fc.a.w", "kind": "torch.nn", "class": "torch.nn.ReLU",
                             "config": {}, "tensors": {}})
    for mutate in (to_root, cross, self_alias, under_alias):
        with pytest.raises(ArtifactFormatError):
            _load(tamper(good, mutate))


def test_deep_nesting(good):
    deep = "x"
    for _ in range(200):
        deep = {"$": "tuple", "v": [deep]}
    bad = tamper(good, lambda h: node(h, "call_function").update(args=deep))
    with pytest.raises(ArtifactLimitError, match="nests deeper"):
        _load(bad)
    text = "[" * 100_000 + "]" * 100_000  # past the parser's own bound
    with pytest.raises(ArtifactLimitError, match="nests deeper"):
        _load(_raw_header_file('{"format": "fxpress", "version": %d, "x": ' % artifact.VERSION + text + "}"),
              limits=Limits(depth=1 << 20))
    _load(tamper(good, lambda h: h.update(meta={"x": text})))  # brackets in a string are data


def test_pytree_specs_cannot_import(good):
    enum = json.dumps([1, {"type": "builtins.dict", "context": json.dumps(
        [{"__enum__": True, "fqn": "antigravity:Fly", "name": "x"}]), "children_spec": [
        {"type": None, "context": None, "children_spec": []}]}])
    for spec_text in (enum, json.dumps([1, {"type": "antigravity.Fly", "context": "null",
                                           "children_spec": []}]), "[1, " * 300 + "]" * 300, 7):
        bad = tamper(good, lambda h: h["graph"].update(codegen={
            "kind": "pytree", "orig_args": ["x"], "in_spec": None, "out_spec": spec_text}))
        with pytest.raises(ArtifactFormatError):
            _load(bad)
    assert "antigravity" not in sys.modules


def test_runtime_config_sizes_are_bounded(good):
    bad = tamper(good, lambda h: _module(h, "post")["config"].update(shape=[1 << 30, 1 << 20]))
    with pytest.raises(ArtifactLimitError):
        _load(bad)
    bad = tamper(good, lambda h: _module(h, "post")["config"].update(n=1 << 62))
    with pytest.raises(ArtifactLimitError):
        _load(bad)


def test_non_regular_files_are_refused(tmp_path):
    fifo = tmp_path / "fifo.fxp"
    os.mkfifo(fifo)
    for p in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(ArtifactFormatError, match="not a regular file"):
            artifact.load(p)
        with pytest.raises(ArtifactFormatError, match="not a regular file"):
            artifact.read_header(p)


# -- bombs, in a child process with a capped address space ---------------------------------------

def _raw_header_file(text: str | None = None, chunks=(), payload: bytes = b"", flags: int = 1) -> bytes:
    """A file whose header is ``text`` (or ``chunks`` streamed through zlib without ever
    being held whole), correctly signed."""
    z = zlib.compressobj(9)
    head = z.compress(text.encode()) if text is not None else b""
    for c in chunks:
        head += z.compress(c)
    head += z.flush()
    prefix = artifact._PREFIX.pack(artifact.MAGIC, artifact.VERSION, flags, len(head),
                                   hashlib.sha256(head).digest())
    return prefix + head + payload


def _stream_bomb(codec: str, declared: int, inflated: int) -> bytes:
    """An artifact holding one uint8 tensor of ``declared`` bytes whose only stream is
    ``codec``-compressed data that inflates to ``inflated`` bytes."""
    import bz2
    import lzma

    block = b"\0" * (1 << 20)
    c = {"zlib": lambda: zlib.compressobj(1), "bz2": lambda: bz2.BZ2Compressor(9),
         "lzma": lambda: lzma.LZMACompressor()}[codec]()
    comp = b"".join(c.compress(block) for _ in range(inflated >> 20)) + c.flush()
    return _one_stream_file(codec, declared, comp)


_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from fxpress.errors import ArtifactFormatError
    from fxpress.graph import artifact
    def vm():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    out = {}
    for name, path, budget in json.loads(sys.argv[1]):  # each bomb under its own cap
        limit = vm() + budget
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        try:
            artifact.load(path)
            out[name] = "LOADED"
        except MemoryError:
            out[name] = "RAW MemoryError"
        except ArtifactFormatError as e:
            out[name] = type(e).__name__ + " " + str(e)[:300]
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    print(json.dumps(out))
""")


def _bombs() -> dict[str, tuple[bytes, int]]:
    """name -> (file, address-space budget of the child that loads it)"""
    out = {
        # 255 KB of compressed header inflating to 256 MB of tiny JSON arrays
        "header": (_raw_header_file(chunks=[
            b'{"format": "fxpress", "version": %d, "x": [' % artifact.VERSION,
            *([b"[],[],[],[]," * (1 << 16)] * 320), b"[]]}"]), 768 << 20),
        # the same under the text limit: refused by counting containers before parsing
        "header-small": (_raw_header_file(chunks=[
            b'{"format": "fxpress", "version": %d, "x": [' % artifact.VERSION,
            *([b"[],[],[],[]," * (1 << 16)] * 60), b"[]]}"]), 768 << 20)}
    for codec in ("zlib", "bz2", "lzma"):
        # a 1 KB tensor whose stream inflates to 2 GB (16 MB: the slow codecs)
        out[f"{codec}-inflates"] = (_stream_bomb(codec, 1024, 1 << 30 if codec == "zlib" else 16 << 20),
                                    384 << 20)
        # a declared size past the limit
        out[f"{codec}-declared"] = (_stream_bomb(codec, 1 << 31, 1 << 20), 768 << 20)
    return out


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """Every bomb of this file loaded in ONE child process with a capped address space (a cap
    per bomb, put back after it): the child's imports are paid once, not eight times.
    name -> (file size, what the child printed)."""
    tmp = tmp_path_factory.mktemp("bombs")
    jobs, sizes = [], {}
    for name, (data, budget) in _bombs().items():
        path = tmp / f"{name}.fxp"
        path.write_bytes(data)
        jobs.append((name, str(path), budget))
        sizes[name] = len(data)
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(jobs)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    outs = json.loads(r.stdout.strip().splitlines()[-1])
    return {name: (sizes[name], outs[name]) for name in sizes}


def _refused(bombs, name: str) -> str:
    out = bombs[name][1]
    assert out.startswith("Artifact"), out  # an fxpress error, not LOADED or a raw MemoryError
    assert "out of memory" not in out, out  # refused by a limit, not by the cap
    return out


def test_header_bombs(bombs):
    assert bombs["header"][0] < 400_000
    assert "ArtifactLimitError" in _refused(bombs, "header")
    out = _refused(bombs, "header-small")
    assert "ArtifactLimitError" in out and "objects and arrays" in out


def test_node_count_is_refused_before_anything_is_built(tmp_path):
    one = b'{"name":"n%d","op":"placeholder","target":"n%d"},'
    text = [b'{"format":"fxpress","version":%d,"modules":[{"path":""}],"tensors":{},'
            b'"graph":{"nodes":[' % artifact.VERSION, *(one.replace(b"%d", str(i).encode()) for i in range(400_000)),
            b'{"name":"output","op":"output","target":"output"}]}}']
    data = _raw_header_file(chunks=text)
    with pytest.raises(ArtifactLimitError, match="400001 nodes"):
        artifact.loads(data)


def _relu_chain(good, names, fanin: int = 1) -> bytes:
    """``good`` with its graph replaced by a chain of nodes named ``names``, each taking the
    ``fanin`` nodes before it (``torch.cat``) or the one before it (``torch.relu``)."""
    def mutate(h):
        nodes = h["graph"]["nodes"]
        new, done = [nodes[0]], [nodes[0]["name"]]
        for nm in names:
            refs = [{"$": "node", "v": done[-1 - j % len(done)]} for j in range(fanin)]
            args = {"$": "tuple", "v": [{"$": "tuple", "v": refs}]} if fanin > 1 else \
                {"$": "tuple", "v": refs}
            new.append({"name": nm, "op": "call_function", "args": args,
                        "target": "torch.cat" if fanin > 1 else "torch.relu"})
            done.append(nm)
        new.append({"name": "output", "op": "output", "target": "output",
                    "args": {"$": "tuple", "v": [{"$": "node", "v": done[-1]}]}})
        h["graph"]["nodes"] = new
    return tamper(good, mutate)


def test_the_generated_code_is_bounded_before_the_graph_is_built(good):
    """A name is short in the file (a version 3 reference is a distance back) but written
    into the generated code at every use: 20 nodes of 4,000-character names, each taking
    the 300 before it, are a 3 KB file whose code is 24 M characters (a 15,000-node one
    took 40 s and 1.3 GB to load). Counted on the header, refused before anything is built."""
    names = ["a" * 3990 + "%010d" % i for i in range(20)]
    data = _relu_chain(good, names, fanin=300)
    assert len(data) < 5_000
    with pytest.raises(ArtifactLimitError, match="generated code would exceed 16777216 characters"):
        _load(data)
    # within the limit, and a limit raised by the caller, it loads
    assert len(_load(_relu_chain(good, names[:2], fanin=2)).code) > 16_000
    _load(data, limits=Limits(code_chars=1 << 26))


@pytest.mark.parametrize("name", ["print", "list", "inf", "torch", "NoneType"])
def test_node_names_torch_fx_would_rename_are_refused(good, name):
    """torch.fx renames a node named as a builtin (``print`` -> ``print_1``); stored names
    that then collide step its counter from where a name like ``print_00`` put it back:
    14,000 nodes took 16 s, quadratic. fx never writes such a name: refused."""
    names = [name] + [f"{name}_{i}" for i in range(1, 4)] + [f"{name}_00", f"{name}_4"]
    with pytest.raises(ForbiddenTargetError, match=f"node name '{name}' is a Python keyword"):
        _load(_relu_chain(good, names))


def test_module_trees_are_bounded_in_depth(good):
    """torch.nn walks a module tree recursively: a 2,047-deep one loaded only into a
    RecursionError, one deep enough to load broke the caller's state_dict()."""
    def mutate(h, depth=Limits().depth + 1):
        for i in range(1, depth + 1):
            h["modules"].append({"path": ".".join(["m"] * i), "kind": "container",
                                 "class": "torch.nn.Module"})
    with pytest.raises(ArtifactLimitError, match="nested 65 deep, over the limit of 64"):
        _load(tamper(good, mutate))
    _load(tamper(good, lambda h: mutate(h, Limits().depth)))


@pytest.mark.parametrize("codec", ["zlib", "bz2", "lzma"])
def test_stream_decompression_stops_at_the_declared_size(bombs, codec):
    # a 1 KB tensor whose stream inflates to 2 GB: decoding stops at 1 KB + 1
    out = _refused(bombs, f"{codec}-inflates")
    assert "ArtifactIntegrityError" in out and "different size" in out
    # a declared size past the limit is refused before a byte is decoded
    out = _refused(bombs, f"{codec}-declared")
    assert "ArtifactLimitError" in out and "over the limit" in out


def test_limits_are_documented_and_overridable(good, tmp_path):
    assert Limits().floor == 256 << 20 and Limits().expansion == 10_000
    assert Limits().decoded_limit(1 << 20) == 10_000 << 20
    with pytest.raises(ArtifactLimitError, match="over the limit of 10"):
        _load(good, max_bytes=10)
    with pytest.raises(ArtifactLimitError, match="nodes"):
        _load(good, limits=Limits(nodes=3))
    path = tmp_path / "m.fxp"
    path.write_bytes(good)
    import fxpress

    with pytest.raises(ArtifactLimitError):
        fxpress.load(path, limits=Limits(tensors=1))


def _one_tensor_file(entry: dict, streams: dict[str, bytes]) -> bytes:
    """An artifact whose graph returns its one tensor ``t``, stored as ``entry`` with the
    payload ``streams`` (stream key -> stored bytes)."""
    import safetensors.torch

    payload = safetensors.torch.save({k: torch.frombuffer(bytearray(v or b"\0"), dtype=torch.uint8)[:len(v)]
                                      for k, v in streams.items()})
    header = {"format": "fxpress", "version": artifact.VERSION, "graph": {"nodes": [
        {"name": "t", "op": "get_attr", "target": "t", "args": {"$": "tuple", "v": []},
         "kwargs": {"$": "dict", "v": []}},
        {"name": "output", "op": "output", "target": "output",
         "args": {"$": "tuple", "v": [{"$": "node", "v": "t"}]}, "kwargs": {"$": "dict", "v": []}}]},
        "modules": [{"path": "", "training": False, "tensors": {"t": {"ref": "t", "kind": "attr"}}}],
        "tensors": {"t": entry}, "meta": {}, "dropped": [], "entropy": True,
        "payload": {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}}
    return artifact.pack_artifact(header, payload)


def _one_stream_file(codec: str, declared: int, comp: bytes) -> bytes:
    """An artifact holding one uint8 tensor of ``declared`` bytes stored as the single
    ``codec`` stream ``comp``."""
    return _one_tensor_file({"dtype": "uint8", "shape": [declared], "encoding": "dense", "streams": {
        "data": {"key": "s", "dtype": "uint8", "raw_bytes": declared, "bytes": len(comp), "codec": codec}}},
        {"s": comp})


def _index_file(encoding: str, n: int, bits: int, entries: int, codes: torch.Tensor) -> bytes:
    """A uint8 tensor of ``n`` bytes stored as ``entries`` relative (``relidx``, zero values)
    or bit (``bitidx``) indices of ``bits`` bits: ``codes``, repeated, zlib-coded."""
    from fxpress.graph.packing import pack_bits

    index = pack_bits(codes.repeat(-(-entries // codes.numel()))[:entries], bits).numpy().tobytes()
    streams = {"index": {"key": "i", "dtype": "uint8", "raw_bytes": len(index), "codec": "zlib"}}
    data = {"i": zlib.compress(index, 9)}
    if encoding == "relidx":
        streams["values"] = {"key": "v", "dtype": "uint8", "raw_bytes": entries, "codec": "zlib"}
        data["v"] = zlib.compress(bytes(entries), 9)
    for name, info in streams.items():
        info["bytes"] = len(data[info["key"]])
    return _one_tensor_file({"dtype": "uint8", "shape": [n], "encoding": encoding, "bits": bits,
                             "entries": entries, "streams": streams}, data)


def test_index_encodings_decode_in_bounded_memory_and_time(monkeypatch):
    import tracemalloc

    from fxpress.graph import packing

    # 8 one-bit indices a byte, in a 1 KB file: decoded all at once they held 200x the
    # tensor's bytes in 8-byte positions and took 12 s for 4 MB; a writer stores bit
    # indices only when they are smaller than the bytes they index
    with pytest.raises(ArtifactFormatError, match="no fewer than the 1048576 bytes"):
        _load(_index_file("bitidx", 1 << 20, 1, 8 << 20, torch.zeros(1, dtype=torch.uint8)))
    # the densest files the rules allow decode a block at a time: the positions they hold
    # are a block's, not the tensor's (numpy's allocations, counted by tracemalloc)
    monkeypatch.setattr(packing, "CHUNK", 1 << 12)
    n = 1 << 18
    files = [  # 3-bit codes 0 (set the next bit) and 6 (set the one 7 on): two indices a byte
        (_index_file("bitidx", n, 3, 2 * n, torch.tensor([0, 6], dtype=torch.uint8)),
         torch.full((n,), 0b10000001, dtype=torch.uint8)),
        (_index_file("relidx", n, 1, n, torch.zeros(1, dtype=torch.uint8)), torch.zeros(n, dtype=torch.uint8))]
    for data, want in files:
        tracemalloc.start()
        try:
            got = _load(data)()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert torch.equal(got, want)
        assert peak < 8 * n, peak  # the streams and the output; the old decoders held > 30 n


def test_arithmetic_coded_streams_are_bounded_before_they_decode(tmp_path):
    from fxpress.graph.artifact import arith

    # any bytes decode to exactly the declared size (the payload's sha256 judges them)
    data = _one_stream_file("ac4", 1000, os.urandom(50))
    assert _load(data)().shape == (1000,)
    # one stream over the codec's bound, or all of them over the file's: refused, not decoded
    with pytest.raises(ArtifactLimitError, match="ac1.*at most"):
        _load(_one_stream_file("ac1", arith.MAX_RAW + 1, b"\x01"))
    with pytest.raises(ArtifactLimitError, match="arith_bytes"):
        _load(data, limits=Limits(arith_bytes=999))
    with pytest.raises(ArtifactFormatError, match="malformed"):
        _load(_one_stream_file("ac9", 1000, b"\x01"))


@pytest.mark.parametrize("narrow", ["float64", "int8", 2, ["float16"]])
def test_a_narrow_entry_must_be_a_float32_tensor_stored_as_a_2_byte_float(narrow):
    data = _one_stream_file(None, 8, bytes(8))
    assert _load(data)().shape == (8,)
    # a uint8 tensor claiming float16 values, a float32 one any other narrow type
    for fields in ({"narrow": "float16"}, {"dtype": "float32", "shape": [2], "narrow": narrow}):
        with pytest.raises(ArtifactFormatError, match="narrow"):
            _load(tamper(data, lambda h: h["tensors"]["t"].update(fields)))

# -- a fuzzer over valid headers ----------------------------------------------------------------

_ATOMS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "_call_impl", "__class__", "forward", "torch.fork", "os.system",
                     "torch.ops.aten.as_strided.default", "x\u0430", "fc", "conv", "post",
                     "fc.weight", "output", "relu", "\x1b[2J", "nan", "cuda:9999", "float32",
                     "relidx", "bitmap", "dense", "zlib", "blob", "runtime", "torch.nn",
                     "container", "torch.nn.Linear", "tuple", "node", "fn", "dict"]),
    st.text(max_size=12))
_TAGS = st.sampled_from(["node", "tuple", "size", "dict", "slice", "ellipsis", "float", "complex",
                         "dtype", "device", "memory_format", "layout", "fn", "bogus"])
_VALUES = st.recursive(_ATOMS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3),
    st.builds(lambda t, v: {"$": t, "v": v}, _TAGS, inner)), max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _apply(header, path, how, value, other):
    parent = header
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if how == "set":
        parent[key] = value
    elif how == "delete" and isinstance(parent, dict):
        del parent[key]
    elif how == "delete":
        parent.pop(key)
    elif how == "nest":
        parent[key] = [parent[key]] if isinstance(parent, list) else {"$": "tuple", "v": [parent[key]]}
    elif how == "alias":  # the same subtree in two places (a copy: JSON has no references)
        parent[key] = copy.deepcopy(other)
    elif how == "add" and isinstance(parent[key], dict):
        parent[key][str(value)[:8]] = value
    elif how == "add" and isinstance(parent[key], list):
        parent[key].append(value)
    elif how == "grow" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] = parent[key] * (1 << 40) + 1


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_headers_raise_only_fxpress_errors(good, data):
    header, payload, _ = artifact._split_prefix(good, "t")
    paths = [p for p in _paths(header) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        how = data.draw(st.sampled_from(["set", "set", "delete", "nest", "alias", "add", "grow"]))
        other = data.draw(st.sampled_from(paths))
        try:
            sub = header
            for k in other:
                sub = sub[k]
            _apply(header, path, how, data.draw(_VALUES), sub)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
        paths = [p for p in _paths(header) if p]
    try:
        blob = artifact.pack_artifact(header, bytes(payload))
    except (ValueError, RecursionError):
        return  # NaN or a self-referencing alias: not JSON, not a file anyone can write
    try:
        _load(blob)
    except FxpressError:
        pass
    assert not os.path.exists(MARKER)


# -- the command line ---------------------------------------------------------------------------

def test_cli_prints_one_escaped_line_for_bad_files(good, tmp_path, capsys):
    from fxpress.cli import main

    bad_files = {
        "forbidden": tamper(good, set_target("torch.fork")),
        "private-config": tamper(good, lambda h: _module(h, "fc")["config"].update(_call_impl=1)),
        "wrong-types": tamper(good, lambda h: h.update(graph={"nodes": {"x": 1}})),
        "truncated": good[:len(good) // 2],
        "noise": bytes(range(256)) * 4,
        "deep": _raw_header_file('{"format": "fxpress", "version": %d, "x": ' % artifact.VERSION + "[" * 5000 + "]" * 5000 + "}"),
        "escape\x1b[2J\x07": tamper(good, lambda h: node(h, "placeholder").update(name="x\x1b[2J")),
    }
    for name, data in bad_files.items():
        path = tmp_path / f"{name}.fxp"
        path.write_bytes(data)
        for argv in (["inspect", str(path)], ["report", str(path), "-o", str(tmp_path / "r.html")],
                     ["diff", str(path), str(path)]):
            code = main(argv)
            out, err = capsys.readouterr()
            assert code == 2, (name, argv, out, err)
            assert err.startswith("fxpress: error: ") and err.count("\n") == 1, (name, err)
            assert "Traceback" not in err and "\x1b" not in err and "\x07" not in err, (name, err)
    assert not (tmp_path / "r.html").exists()


def test_inspect_escapes_terminal_sequences_in_names(tmp_path, capsys):
    from fxpress.cli import main

    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    gm.meta["fxpress"] = {"method": "\x1b[2Jfx", "passes": ["\x1b]0;owned\x07prune"]}
    path = tmp_path / "meta.fxp"
    artifact.save(gm, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[2Jfx" in out


def _stored(data: bytes, mutate) -> bytes:
    """``data`` re-signed after ``mutate`` edited its header *as stored*: version 3's text,
    the derived fields left out (graph/artifact/compact.py), not the filled-in form."""
    head_len = artifact._PREFIX.unpack(data[:artifact.PREFIX_SIZE])[3]
    text = zlib.decompressobj(zdict=artifact.format.HEADER_ZDICT_V3).decompress(
        data[artifact.PREFIX_SIZE:artifact.PREFIX_SIZE + head_len])
    h = json.loads(text)
    mutate(h)
    head = zlib.compress(json.dumps(h).encode(), 9)
    flags = 1 | (4 if "blob" in h else 0)
    prefix = artifact._PREFIX.pack(artifact.MAGIC, artifact.VERSION, flags, len(head),
                                   hashlib.sha256(head).digest())
    return prefix + head + data[artifact.PREFIX_SIZE + head_len:]


def _first_ref(h):
    """The first node reference in a stored (version 3) header: a distance back."""
    for n in h["graph"]["nodes"]:
        for a in n.get("args", {}).get("v", []):
            if isinstance(a, dict) and a.get("$") == "node":
                assert isinstance(a["v"], int)
                return a
    raise AssertionError("no node reference")


def _first_stream(h):
    entry = h["tensors"]["fc.weight"]
    return entry, next(iter(entry["streams"].values()))


@pytest.mark.parametrize("mutate, error, fragment", [
    # a derived field stated otherwise is judged as stated
    (lambda h: _first_stream(h)[1].update(raw_bytes=1 << 40), ArtifactFormatError, "should hold"),
    (lambda h: _first_stream(h)[1].update(key="0::data"), ArtifactFormatError, "misplaced"),
    (lambda h: _first_stream(h)[1].update(blob=False), ArtifactFormatError, "blob"),
    (lambda h: _first_stream(h)[1].update(dtype="float64"), ArtifactFormatError,
     "8-byte elements, the tensor 4-byte ones"),
    # a left-out field derived from a changed one: the sizes no longer add up
    (lambda h: h["tensors"]["fc.weight"].update(shape=[4, 33]), ArtifactFormatError, "blob"),
    (lambda h: h["tensors"]["fc.weight"].update(shape=[1 << 30, 1 << 20]), ArtifactFormatError,
     "elements"),
    # a reference left out points at <path>.<name>: renaming the tensor breaks it
    (lambda h: h["tensors"].update({"fc.other": h["tensors"].pop("fc.weight")}),
     ArtifactFormatError, "refers to missing 'fc.weight'"),
    (lambda h: _module(h, "fc")["tensors"]["weight"].update(ref=7), ArtifactFormatError,
     "refers to missing"),
    (lambda h: _module(h, "fc")["tensors"]["weight"].update(requires_grad="yes"),
     ArtifactFormatError, "requires_grad must be a bool"),
    # a node stored without its name takes the one derived from its target: retargeted, it
    # names no module; a placeholder's name is never derived
    (lambda h: node(h, "call_module").update(target="nothere"), ArtifactFormatError,
     "no module named 'nothere'"),
    (lambda h: node(h, "placeholder").pop("name"), ForbiddenTargetError, "placeholder None"),
    (lambda h: node(h, "call_function").update(target=7), ForbiddenTargetError, "call_function 7"),
    (lambda h: node(h, "call_function").update(target="torch.ops"), ForbiddenTargetError, "ops"),
    # a reference stored as a distance back must reach a node before it
    *((lambda h, d=d: _first_ref(h).update(v=d), ArtifactFormatError, "not defined before it")
      for d in (0, -1, 10**12, True, 1.5, None, [1])),
    # malformed parts the reader fills around reach the schema, never a raw exception
    (lambda h: h.update(tensors=[1, 2]), ArtifactFormatError, "lacks graph/modules/tensors"),
    (lambda h: h["tensors"]["fc.weight"].update(streams=[]), ArtifactFormatError,
     "expected streams"),
    (lambda h: h["modules"].append("x"), ArtifactFormatError, "malformed module"),
    (lambda h: _module(h, "fc").update(tensors={"weight": 3}), ArtifactFormatError, "malformed"),
    (lambda h: h["graph"].update(nodes=[7]), ArtifactFormatError, "malformed node"),
    (lambda h: h.update(version=1), ArtifactFormatError, "v3 artifact"),
    # the damage locator's threshold: a typed refusal for anything but bytes in [0, 2**32]
    (lambda h: h.update(crc8_min="64"), ArtifactFormatError, "crc8_min"),
    (lambda h: h.update(crc8_min=-1), ArtifactFormatError, "crc8_min"),
    (lambda h: h.update(crc8_min=True), ArtifactFormatError, "crc8_min"),
    (lambda h: h.update(crc8_min=1 << 40), ArtifactFormatError, "crc8_min"),
    (lambda h: h.update(crc8_min=[64]), ArtifactFormatError, "crc8_min"),
])
def test_crafted_stored_headers_are_refused(good, mutate, error, fragment):
    with pytest.raises(error, match=fragment):
        _load(_stored(good, mutate))


def test_the_damage_locator_names_the_stream_and_a_bad_one_is_harmless(good):
    from tests.helpers import flip_tensor_byte

    # each stream's one-byte CRC names the stream a flipped byte broke
    with pytest.raises(ArtifactIntegrityError, match="tensor 'fc.weight' stream 'data'"):
        _load(flip_tensor_byte(good, "fc.weight", stream="data", offset=3, mask=1))
    # one locator byte per stream of at least crc8_min stored bytes, none for smaller ones
    h = artifact.format._split_prefix(good, "good")[0]
    listed = [info for e in h["tensors"].values() for info in e["streams"].values()
              if info["bytes"] >= h["crc8_min"]]
    assert h["crc8_min"] > 0 and len(h["crc8"]) == 2 * len(listed)
    # the locator is a diagnostic: garbage there changes nothing about a good file ...
    for bad in (7, "zz", "", "0" * 10_000, None):
        _load(_stored(good, lambda h: h.update(crc8=bad)))
        # ... and a damaged file is still refused by the payload's sha256, unnamed
        damaged = bytearray(_stored(good, lambda h: h.update(crc8=bad)))
        damaged[-5] ^= 1
        with pytest.raises(FxpressError, match="payload fails its sha256"):
            _load(bytes(damaged))


def test_an_older_prefix_over_a_version_3_header_is_refused(good):
    head_len = artifact._PREFIX.unpack(good[:artifact.PREFIX_SIZE])[3]
    magic, _, flags, hlen, sha = artifact._PREFIX.unpack(good[:artifact.PREFIX_SIZE])
    for version in (1, 2):
        old = artifact._PREFIX.pack(magic, version, flags, hlen, sha) + good[artifact.PREFIX_SIZE:]
        with pytest.raises(ArtifactFormatError, match=f"v{version} artifact"):
            _load(old)
    newer = artifact._PREFIX.pack(magic, 4, flags, hlen, sha) + good[artifact.PREFIX_SIZE:]
    with pytest.raises(ArtifactFormatError, match="format version 4; this fxpress reads versions 1, 2, 3"):
        _load(newer)
    assert head_len == hlen


def _grid_constant_model(n: int, dtype: str = "float64"):
    """A graph returning a GridConstant whose 2-bit codes (n / 4 bytes, all zero) declare
    an ``n``-element tensor: the file stores n / 4 bytes, loading decodes 8n."""
    from fxpress.passes.small import GridConstant

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = GridConstant(torch.linspace(-1, 1, 64), 2)

        def forward(self, x):
            return x + self.c().sum()

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, GridConstant) or super().is_leaf_module(m, name)

    m = M()
    gm = torch.fx.GraphModule(m, Leaves().trace(m))
    gm.c.value_codes = torch.zeros(1, n // 4, dtype=torch.uint8)
    gm.c.grids["value"].update(shape=[n], dtype=dtype)
    gm.c._decode_all()
    return gm


def test_tensors_decoded_at_load_count_against_the_limit():
    # a runtime module that decodes at load (small's grids: 2-bit codes -> float64) turned
    # 424 bytes of file into 128 MiB under max_bytes=8 MiB (256 MiB of codes: 8 GiB + the
    # unpacking's int64s, past the default limit): what from_state decodes is declared
    from fxpress.passes.small import GRID_CLASSES

    gm = _grid_constant_model(1 << 16)
    data = artifact.dumps(gm, entropy=True)
    with pytest.raises(ArtifactLimitError, match="module 'c': decodes tensors at load"):
        artifact.loads(data, GRID_CLASSES, max_bytes=64 << 10)
    loaded = artifact.loads(data, GRID_CLASSES, max_bytes=1 << 20)
    assert torch.equal(loaded(torch.zeros(2)), gm(torch.zeros(2)))
    # a config that does not say what it decodes is refused, typed
    bad = tamper(data, lambda h: _module(h, "c")["config"].update(grids={"$": "dict", "v": [["value", 3]]}))
    with pytest.raises(ArtifactFormatError, match="does not describe the tensors it decodes"):
        artifact.loads(bad, GRID_CLASSES)


def _codebook_file(sparse: bool) -> tuple[bytes, torch.fx.GraphModule]:
    from fxpress.passes.share import CodebookLinear

    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 16))
    if sparse:
        codes[:, ::3] = 0
    layer = CodebookLinear("linear", {}, (8, 16), 4, torch.randn(16), codes, torch.randn(8),
                           zero_code=sparse, sparse=sparse)
    gm = torch.fx.GraphModule(torch.nn.ModuleDict({"fc": layer}), _codebook_graph())
    return artifact.dumps(gm), gm


def _codebook_graph() -> torch.fx.Graph:
    g = torch.fx.Graph()
    g.output(g.call_module("fc", (g.placeholder("x"),)))
    return g


@pytest.mark.parametrize("sparse", [False, True])
def test_codebook_codes_must_fit_the_codebook_and_the_config(sparse):
    # codes past a shortened codebook, or a config that disagrees with the stored codes,
    # loaded fine and failed at every call (IndexError, shape errors): refused at load
    from fxpress.passes.share import CODEBOOK_CLASSES

    classes = tuple(CODEBOOK_CLASSES.values())
    data, gm = _codebook_file(sparse)
    x = torch.randn(3, 16)
    assert torch.equal(artifact.loads(data, classes)(x), gm(x))
    short = gm.fc.codebook[:2].clone()
    for mutate, fragment in [
            (lambda m: m.register_buffer("codebook", short), "past the codebook"),
            (lambda m: setattr(m, "bits", 2), "a 2-bit code addresses"),
            (lambda m: setattr(m, "shape", [8, 17]), "codes of 4 bits" if not sparse else "mask"),
            (lambda m: setattr(m, "nonzeros", m.nonzeros + 1), "codes of 4 bits" if sparse else None)]:
        crafted = copy.deepcopy(gm)
        mutate(crafted.fc)
        if fragment is None:
            continue
        with pytest.raises(ArtifactFormatError, match=fragment):
            artifact.loads(artifact.dumps(crafted), classes)


@pytest.mark.parametrize("field, value, fragment", [
    ("eps", None, "config 'eps'"), ("normalized_shape", [9], "does not fit"),
    ("normalized_shape", [0], "config 'normalized_shape'"), ("kind", "group_norm", "config 'num_groups'"),
    ("eps", float("nan"), "config 'eps'"), ("eps", -1.0, "config 'eps'")])
def test_grid_norm_configs_that_every_call_would_refuse(field, value, fragment):
    # an 8-bit LayerNorm (small) whose config no call can use loaded, then failed or
    # computed on other shapes at every call: refused at load
    from fxpress.passes.small import GRID_CLASSES, GridNorm

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(8)
    torch.nn.init.normal_(norm.weight)
    gm = torch.fx.GraphModule(torch.nn.ModuleDict({"fc": GridNorm(norm, 8)}), _codebook_graph())
    x = torch.randn(2, 8)
    assert torch.equal(artifact.loads(artifact.dumps(gm), GRID_CLASSES)(x), gm(x))
    setattr(gm.fc, field, value)
    with pytest.raises(ArtifactFormatError, match=fragment):
        artifact.loads(artifact.dumps(gm), GRID_CLASSES)


@pytest.mark.parametrize("experts, layout", [([2, 4], "oi"), ([2, 4, "8"], "oi"), ([2, 4, 8], "xx"),
                                             ([2, -4, -8], "oi"), (None, "io")])
def test_decoded_weight_expert_configs_are_checked_at_load(experts, layout):
    from fxpress.graph.fused import DecodedWeight

    m = DecodedWeight(torch.nn.Linear(8, 8), [2, 4, 8], "oi")
    DecodedWeight.from_state(m.config(), {})
    config = {"layout": layout} if experts is None else {"experts": experts, "layout": layout}
    with pytest.raises(ValueError, match="expected three positive ints"):
        DecodedWeight.from_state(config, {})


@pytest.mark.parametrize("tensor, keep", [("scale", 2), ("scale", 1), ("bias", 2), ("qweight", 4)])
def test_int8_scales_must_fit_the_weight(tensor, keep):
    # 2 per-channel scales for 64 output channels: oneDNN's int8 linear read past them
    # (outputs of 1e33 from heap memory); refused at load
    from fxpress.passes.quantize_modules import RUNTIME_MODULES, QuantizedLinear

    torch.manual_seed(0)
    w = torch.randn(64, 64)
    scale = w.abs().amax(1, keepdim=True) / 127
    layer = QuantizedLinear((64, 64), torch.round(w / scale).to(torch.int32), scale, None,
                            torch.randn(64), bits=8, scheme="symmetric", granularity="channel",
                            activations="dynamic")
    gm = torch.fx.GraphModule(torch.nn.ModuleDict({"fc": layer}), _codebook_graph())
    x = torch.randn(3, 64)
    assert torch.equal(artifact.loads(artifact.dumps(gm), RUNTIME_MODULES)(x), gm(x))
    t = getattr(gm.fc, tensor)
    gm.fc._buffers[tensor] = t[:keep].clone()
    with pytest.raises(ArtifactFormatError, match=f"QuantizedLinear.*tensor '{tensor}': has shape "
                                                  f"\\[{keep}.*expected \\[64"):
        artifact.loads(artifact.dumps(gm), RUNTIME_MODULES)


# -- LSTMs: torch's CPU kernel (oneDNN) checks no shapes --------------------------------------

class _Lstm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.LSTM(8, 16, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


@pytest.mark.parametrize("name", ["weight_ih_l0", "weight_hh_l0"])
def test_lstm_weights_must_have_the_shapes_their_fields_give(name):
    # a 2-row weight_hh for a 16-unit LSTM loaded and computed on heap memory past it (NaNs)
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_Lstm().eval())
    x = torch.randn(2, 5, 8)
    assert torch.equal(artifact.loads(artifact.dumps(gm))(x), gm(x))
    gm.rnn._parameters[name] = torch.nn.Parameter(getattr(gm.rnn, name).detach()[:2].clone())
    with pytest.raises(ArtifactFormatError, match=f"weight '{name}' is \\(2, .*its fields give \\(64"):
        artifact.loads(artifact.dumps(gm))


def test_exported_lstm_calls_are_checked_at_every_call():
    # an exported graph calls aten.lstm with no nn.LSTM around it to check the input: the
    # loader puts a shape check before each call (and the writer never stores it)
    from fxpress.errors import InputError
    from fxpress.graph.artifact.rnn import fxpress_lstm_guard
    from fxpress.graph.capture import capture

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    gm = capture(_Lstm().eval(), (x,), method="export")
    data = artifact.dumps(gm)
    loaded = artifact.loads(data)
    assert torch.equal(loaded(x), gm(x))
    assert sum(n.target is fxpress_lstm_guard for n in loaded.graph.nodes) == 1
    assert torch.equal(artifact.loads(artifact.dumps(loaded))(x), gm(x))
    assert "fxpress_lstm_guard" not in json.dumps(artifact.artifact_header(loaded))
    with pytest.raises(InputError, match="input 0 dim 2 is 64"):
        loaded(torch.randn(2, 5, 64))  # the sizes export fixed are checked first
    # a file that fixes no input sizes (crafted, or written before they were stored) still
    # meets the guard: the kernel would read past the weights (NaNs)
    meta = gm.meta["fxpress"]
    kept = {k: meta.pop(k) for k in ("fixed_dims", "bounded_dims") if k in meta}
    try:
        unsized = artifact.loads(artifact.dumps(gm))
    finally:
        meta.update(kept)
    assert kept and not unsized._forward_pre_hooks
    with pytest.raises(InputError, match="input's 64 features do not fit weight_ih_l0"):
        unsized(torch.randn(2, 5, 64))
    weights = [n.target for n in gm.graph.nodes if n.op == "get_attr" and "weight_hh" in n.target]
    owner, _, attr = weights[0].rpartition(".")
    short = gm.get_submodule(owner)
    setattr(short, attr, torch.nn.Parameter(getattr(short, attr).detach()[:2].clone()))
    with pytest.raises(InputError, match="do not have the shapes"):
        artifact.loads(artifact.dumps(gm))(x)


def test_compressed_lstm_weights_must_decode_to_their_shape():
    from fxpress.graph.fused import FusedCall
    from fxpress.passes.binarize import BINARY_CLASSES, BinaryLinear

    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_Lstm().eval())
    w = gm.rnn.weight_hh_l0.detach().clone()
    gm.rnn = FusedCall(gm.rnn)
    gm.rnn.add("weight_hh_l0", BinaryLinear("linear", {}, "ternary", None, w))
    classes = (FusedCall, *BINARY_CLASSES.values())
    x = torch.randn(2, 5, 8)
    assert torch.equal(artifact.loads(artifact.dumps(gm), classes)(x), gm(x))
    narrow = w[:, :12].clone()
    gm.rnn.w0 = BinaryLinear("linear", {}, "ternary", None, narrow)
    with pytest.raises(ArtifactFormatError, match="stored compressed as \\[64, 12\\]"):
        artifact.loads(artifact.dumps(gm), classes)
    gm.rnn.weights = {}  # the empty placeholder stands for nothing
    with pytest.raises(ArtifactFormatError, match="FusedCall does not fit its children .*"
                                                  "config 'weights': children \\['w0'\\] are not in it"):
        artifact.loads(artifact.dumps(gm), classes)


@pytest.mark.parametrize("field, value, fragment", [
    ("mode", "quad", "config 'mode': is 'quad'"), ("bits", 3, "config 'bits': mode='ternary' with bits=3"),
    ("shape", [32, 17], "codes do not hold 544"), ("shape", [32], "config 'shape': is \\[32\\]"),
    ("e_max", 10 ** 6, "config 'e_max': is 1000000"), ("alpha", 3, "tensor 'alpha': has shape \\[3\\], expected \\[32\\]"),
    ("bias", 5, "tensor 'bias': has shape \\[5\\]")])
def test_binarized_configs_that_every_call_would_refuse(field, value, fragment):
    from fxpress.passes.binarize import BINARY_CLASSES, BinaryLinear

    torch.manual_seed(0)
    layer = BinaryLinear("linear", {}, "ternary", None, torch.randn(32, 16), torch.randn(32))
    gm = torch.fx.GraphModule(torch.nn.ModuleDict({"fc": layer}), _codebook_graph())
    classes = tuple(BINARY_CLASSES.values())
    x = torch.randn(3, 16)
    assert torch.equal(artifact.loads(artifact.dumps(gm), classes)(x), gm(x))
    if field in ("alpha", "bias"):
        t = layer._buffers.get(field, layer._parameters.get(field))
        (layer._buffers if field in layer._buffers else layer._parameters)[field] = \
            type(t)(t.detach()[:value].clone()) if isinstance(t, torch.nn.Parameter) else t[:value].clone()
    else:
        setattr(layer, field, value)
    with pytest.raises(ArtifactFormatError, match=fragment):
        artifact.loads(artifact.dumps(gm), classes)


def test_a_refused_tensor_name_names_the_file_once(good):
    bad = tamper(good, lambda h: h.update(tensors={"x\u0430": h["tensors"].popitem()[1], **h["tensors"]}))
    with pytest.raises(ForbiddenTargetError) as e:
        artifact.loads(bad, RUNTIME, where="model.fxp")
    assert str(e.value).count("model.fxp") == 1, str(e.value)


# -- the report page of a crafted file (fxpress report) ------------------------------------------

def _report_header(good):
    """``good``'s header with a report section of every kind the page draws: a pass record
    with a recovery curve, a per-layer baseline with histograms, a plan with its frontier."""
    header = artifact._split_prefix(good, "t")[0]
    header["report"] = {
        "original_bytes": 900, "original_disk_bytes": 800,
        "records": [{"index": 1, "name": "distill", "spec": "distill", "seconds": 0.5,
                     "bytes_after": 700, "disk_bytes": 600, "sparsity": 0.5, "status": "ok",
                     "message": "m", "cumulative": {"rel_l2": 0.1, "cosine": 0.9, "top1": 1.0},
                     "stats": {"epochs": [{"loss": 1.0, "val_loss": 2.0},
                                          {"loss": 0.5, "val_loss": 1.0}],
                               "best_epoch": 1, "lr": 0.1, "start_val_loss": 1.0}}],
        "baseline": {"layers": [{"name": "fc", "disk_bytes": 500}, {"name": "gone", "disk_bytes": 9}],
                     "histograms": {"fc": {"lo": -1.0, "hi": 1.0, "counts": [1, 2], "zeros": 0,
                                           "numel": 3, "distinct": 3}}},
        "plan": {"file_bytes": 10, "ratio": 2.0, "target_ratio": 3.0, "metric": "cosine",
                 "drop": 0.1, "max_drop": 0.2, "met": False, "missed": "x",
                 "attempts": [{"drop": 0.1, "ratio": 2.0}],
                 "rows": [{"layer": "fc", "kind": "linear", "params": 10, "choice": "c",
                           "bytes": 5, "bits_per_weight": 2.0, "error": 0.1}],
                 "sensitivity": {"metric": "cosine", "layers": [
                     {"name": "fc", "params": 10, "trials": [{"candidate": "c", "error": 0.1,
                                                              "bytes": 3}]}]},
                 "frontier": {"uniform": [{"ratio": 2.0, "predicted_error": 0.1, "setting": "s"}],
                              "planner": [{"ratio": 3.0, "predicted_error": 0.2}]}}}
    header["meta"] = {"method": "fx", "passes": ["distill"]}
    header["dropped"] = ["d"]
    return header


def test_the_report_escapes_every_string_a_crafted_file_holds(good):
    """Each string (or string-holding value) of the report section, the meta and the dropped
    list, replaced by markup: the page shows it escaped or refuses the value, never renders
    it (a distill record's ``best_epoch`` went into the page raw: script injection)."""
    from fxpress.report import render_report

    gm = _load(good)
    header = _report_header(good)
    assert "Recovery curves" in render_report(gm, header) and "Plan" in render_report(gm, header)
    paths = [p for root in ("report", "meta", "dropped") for p in _paths(header[root], (root,))
             if not isinstance(_at(header, p), (dict, list))]
    assert len(paths) > 60
    for path in paths:
        for value in ("<i-x>", ["<i-x>"], {"<i-x>": 1}):
            h = copy.deepcopy(header)
            _at(h, path[:-1])[path[-1]] = copy.deepcopy(value)
            try:
                page = render_report(gm, h)
            except Exception:  # a value of the wrong kind may be refused; never shown raw
                continue
            assert "<i-x" not in page, (path, value)


def _at(obj, path):
    for k in path:
        obj = obj[k]
    return obj


@pytest.mark.parametrize("path, value, fragment", [
    (("records", 0, "seconds"), "x", "header.report.records\\[0\\].seconds is 'x', not a number"),
    (("records", 0, "sparsity"), {"a": 1}, "records\\[0\\].sparsity is"),
    (("baseline", "histograms", "fc", "counts", 0), -1, "counts\\[0\\] is -1, not a number from 0"),
    (("plan", "rows", 0, "params"), "x", "rows\\[0\\].params is 'x'"),
    (("plan", "frontier", "planner", 0, "ratio"), 0, "ratio is 0, not a number above 0"),
    (("plan", "frontier", "planner", 0), {"a": 1}, "planner\\[0\\] lacks 'ratio'"),
    (("baseline", "layers"), 0, "layers is 0, not a list"),
])
def test_render_report_refuses_malformed_numbers_naming_the_field(good, path, value, fragment):
    """``fxpress.report.render_report`` (the Python API) raised raw TypeError, ValueError
    and KeyError on a record's malformed numbers: a typed error naming the field now."""
    from fxpress.report import render_report

    header = _report_header(good)
    _at(header["report"], path[:-1])[path[-1]] = value
    with pytest.raises(ArtifactFormatError, match=fragment):
        render_report(_load(good), header, title="m.fxp")


def test_render_report_never_raises_raw_on_any_malformed_field(good):
    """Every field of a report header of every kind the page draws, replaced by each of ten
    malformed values: the page renders or raises ArtifactFormatError, nothing else."""
    from fxpress.report import render_report

    gm, base = _load(good), _report_header(good)
    values = ["x", None, [1], {"a": 1}, float("nan"), float("inf"), -1, True, 10**30, 0]
    for path in [("report", *p) for p in _paths(base["report"])] + [
            (k,) for k in ("file_bytes", "meta", "dropped", "report")]:
        for value in values:
            header = copy.deepcopy(base)
            _at(header, path[:-1])[path[-1]] = value
            try:
                render_report(gm, header)
            except ArtifactFormatError:
                pass


def test_the_report_groups_crafted_layer_names_in_bounded_memory(good):
    """Grouping repeated blocks (``layer.[0-5].fc``) copied every prefix of every name: a
    20 KB baseline name of ``.1.1.1...`` held 200 MB (a 2 MB one, 2 TB); ids interned part
    by part keep it linear, and a name of more parts than modules have is not grouped."""
    import tracemalloc

    from fxpress.report import _collapse, render_report

    names = ["a" + ".1" * 10_000, "b" + ".2" * 10_000, "c" + ".1" * 10_000]
    tracemalloc.start()
    try:
        groups = _collapse(names, lambda n: 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak
    assert [label for label, _ in groups] == names
    # still grouped where modules repeat
    assert _collapse(["h.0.fc", "h.1.fc", "h.2.fc"], lambda n: 1) == [("h.[0-2].fc", ["h.0.fc", "h.1.fc", "h.2.fc"])]
    header = _report_header(good)
    header["report"]["baseline"]["layers"] += [{"name": n, "disk_bytes": 1} for n in names]
    assert "Bytes per layer" in render_report(_load(good), header)


# -- sizes the file records for its inputs ------------------------------------------------------

@pytest.mark.parametrize("shape, error, fragment", [
    ([-3, 16], ArtifactFormatError, "malformed shape"),
    ([1 << 50], ArtifactFormatError, "malformed shape"),
    # 16 GB of float32: export-onnx built an example input of it (torch.randn)
    ([1 << 16, 1 << 16], ArtifactLimitError, "an input of shape \\[65536, 65536\\] is 17179869184 bytes"),
])
def test_input_shapes_are_sizes_and_bounded_like_decoded_tensors(good, shape, error, fragment):
    def mutate(h):
        node(h, "placeholder").update(shape=shape, dtype="float32")
    with pytest.raises(error, match=fragment):
        _load(tamper(good, mutate))
    # raised as the limit asks
    if error is ArtifactLimitError:
        _load(tamper(good, mutate), max_bytes=1 << 35)


def test_input_size_checks_from_a_crafted_file_never_fail_raw(net, good):
    """``fixed_dims`` / ``bounded_dims`` (the sizes an exported graph runs at) come from the
    file: an ``Infinity`` size made loading fail inside ``int()`` (OverflowError), a negative
    dimension made every call index past the input (IndexError). Malformed entries are
    ignored, as before: the check only ever refuses inputs."""
    gm, x = net
    for table in ({"fixed_dims": {"0": {"0": float("inf")}}},
                  {"bounded_dims": {"0": {"1": [float("-inf"), float("inf")]}}},
                  {"fixed_dims": {"0": {"-9": 3}}}, {"fixed_dims": {"-1": {"0": 3}}},
                  {"fixed_dims": {"0": {"0": "7" * 5000}}}):
        h, payload, _ = artifact._split_prefix(good, "t")
        h["meta"] = {**h.get("meta", {}), **table}
        text = json.dumps(artifact.compact.minimize(h)).encode()  # Infinity: JSON as Python reads it
        head = zlib.compress(text, 9)
        data = artifact._PREFIX.pack(artifact.MAGIC, artifact.VERSION, 1 | 4, len(head),
                                     hashlib.sha256(head).digest()) + head + bytes(payload)
        assert torch.equal(_load(data)(x), gm(x)), table


@pytest.mark.parametrize("key", ["kind", "spec", "zero_code"])
def test_a_runtime_config_missing_a_field_is_refused_at_load(key):
    """A codebook layer whose config lacks ``kind``, ``spec`` or ``zero_code`` loaded, then
    failed at its first call (AttributeError from forward); a module built from the file's
    config must now give that config back, or the load is refused naming the module."""
    from fxpress.passes.share import CODEBOOK_CLASSES

    classes = tuple(CODEBOOK_CLASSES.values())
    data, gm = _codebook_file(sparse=False)
    x = torch.randn(3, 16)
    assert torch.equal(artifact.loads(data, classes)(x), gm(x))

    def mutate(h):
        next(m for m in h["modules"] if m.get("kind") == "runtime")["config"].pop(key)
    with pytest.raises(ArtifactFormatError, match=f"module 'fc': CodebookLinear.*'{key}'"):
        artifact.loads(tamper(data, mutate), classes)


@pytest.mark.parametrize("path, field", [("fc", "in_features"), ("fc", "out_features"),
                                         ("conv", "padding_mode"), ("conv", "stride"),
                                         ("conv", "groups")])
def test_a_torch_nn_module_missing_a_field_is_refused_at_load(good, path, field):
    """A torch.nn module stored without one of its class's fields loaded, then failed at
    its first call with a raw AttributeError: refused at load, naming the module."""
    bad = tamper(good, lambda h: _module(h, path)["config"].pop(field))
    with pytest.raises(ArtifactFormatError, match=f"module '{path}' \\(torch.nn.[A-Za-z0-9]+\\) "
                                                  f"lacks the field\\(s\\) {field}"):
        _load(bad)


@pytest.mark.parametrize("field, value", [("bits", 1 << 40), ("bits", 1), ("bits", 9),
                                          ("scheme", "x"), ("activations", "x"),
                                          ("act_scale", "x")])
def test_quantized_configs_outside_what_the_pass_writes_are_refused_at_load(field, value):
    """A 4-bit group-quantized layer whose config says bits=2**40 loaded, then its first
    call never returned (found by fuzzing runtime configs of real compressed models)."""
    import fxpress

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    res = fxpress.compress(model, "quantize{bits=4,granularity=group,group_size=8}",
                           (torch.randn(4, 16),), progress=False, policy="warn")
    data = artifact.dumps(res.module)
    path = next(m["path"] for m in artifact._split_prefix(data, "t")[0]["modules"]
                if m.get("kind") == "runtime")
    bad = tamper(data, lambda h: _module(h, path)["config"].update({field: value}))
    with pytest.raises(ArtifactFormatError, match=f"module '{path}': QuantizedLinear.from_state "
                                                  f"refused its config \\(StateError: config '{field}'"):
        artifact.loads(bad, fxpress.registry().runtime_modules())


@pytest.mark.parametrize("value", [1 << 40, 9, 1, -1])
def test_codebook_bias_bits_outside_what_share_writes_are_refused_at_load(value):
    """bias_bits=2**40 in a share layer's config made load decode a grid that never
    finished (found by fuzzing the runtime configs of real compressed models)."""
    import fxpress

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    res = fxpress.compress(model, "share{bits=4,bias_bits=8}", (torch.randn(4, 16),),
                           progress=False, policy="warn")
    data = artifact.dumps(res.module)
    path = next(m["path"] for m in artifact._split_prefix(data, "t")[0]["modules"]
                if m.get("kind") == "runtime")
    bad = tamper(data, lambda h: _module(h, path)["config"].update(bias_bits=value))
    with pytest.raises(ArtifactFormatError, match=f"module '{path}'.*bias_bits {value} is not one"):
        artifact.loads(bad, fxpress.registry().runtime_modules())


@pytest.mark.parametrize("value", [1 << 40, 9, 4, -1, True])
def test_codebook_bits_outside_what_share_writes_are_refused_at_load(value):
    """codebook_bits is 0 or 8 in every file share writes; any other value is refused
    by name, before the codebook is decoded."""
    import fxpress

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    res = fxpress.compress(model, "share{bits=4,codebook_bits=8}", (torch.randn(4, 16),),
                           progress=False, policy="warn")
    data = artifact.dumps(res.module)
    path = next(m["path"] for m in artifact._split_prefix(data, "t")[0]["modules"]
                if m.get("kind") == "runtime")
    bad = tamper(data, lambda h: _module(h, path)["config"].update(codebook_bits=value))
    with pytest.raises(ArtifactFormatError, match=f"module '{path}'.*codebook_bits"):
        artifact.loads(bad, fxpress.registry().runtime_modules())


def test_a_codebook_grid_stored_without_codebook_bits_is_refused_at_load():
    """A file whose config says float centroids (codebook_bits 0, or an older file) but
    whose tensors are grid codes would decode nothing: refused, naming the module."""
    import fxpress

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    res = fxpress.compress(model, "share{bits=4,codebook_bits=8}", (torch.randn(4, 16),),
                           progress=False, policy="warn")
    data = artifact.dumps(res.module)
    path = next(m["path"] for m in artifact._split_prefix(data, "t")[0]["modules"]
                if m.get("kind") == "runtime")
    bad = tamper(data, lambda h: _module(h, path)["config"].pop("codebook_bits"))
    with pytest.raises(ArtifactFormatError, match=f"module '{path}'.*codebook_codes"):
        artifact.loads(bad, fxpress.registry().runtime_modules())
