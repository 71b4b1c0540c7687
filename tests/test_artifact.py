"""Artifacts: bit-exact round trips, real size reductions, refusal of bad files, atomic writes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fxpress
from fxpress.errors import (ArtifactError, ArtifactFormatError, ArtifactIntegrityError,
                            ForbiddenTargetError, UnsupportedGraphError)
from fxpress.graph import artifact
from fxpress.passes.base import PassContext
from fxpress.passes.prune import Prune
from tests.helpers import flip_tensor_byte, node as _node, set_target as _set_target, tamper as _tamper
from tests.runtime_fixtures import RUNTIME, PackedCodebookLinear, ScaleShift, share_linears

ROOT = Path(__file__).resolve().parents[1]


def fp32_safetensors_bytes(module: torch.nn.Module) -> int:
    return len(safetensors.torch.save({k: v.contiguous() for k, v in module.state_dict().items()}))


def pruned(gm: torch.fx.GraphModule, sparsity: float, example) -> torch.fx.GraphModule:
    work = fxpress.graph.clone_structure(gm)
    return Prune(sparsity=sparsity, scope="layer").run(work, PassContext(example_inputs=example)).module


@pytest.fixture
def mlp90(mlp, calib):
    gm = fxpress.capture(mlp, calib[0])
    return pruned(gm, 0.9, calib[0])


def test_pruned_mlp_round_trip_is_bit_exact_and_stored_sparse(mlp90, calib, tmp_path):
    path = tmp_path / "mlp.fxp"
    size = fxpress.save(mlp90, path)
    assert size == path.stat().st_size
    loaded = fxpress.load(path)
    for (x,) in calib:
        assert torch.equal(loaded(x), mlp90(x))
    header = artifact.read_header(path)
    enc = {k: e["encoding"] for k, e in header["tensors"].items()}
    assert all(enc[f"{n}.weight"] in ("relidx", "bitmap") for n in ("layers.0", "layers.1", "head"))
    assert enc["layers.0.bias"] == "dense"  # biases are not pruned: dense is smaller
    # 90% zeros in fp32: only the values and a few bits of position remain
    fp32 = fp32_safetensors_bytes(mlp90)
    assert size * 5 < fp32, (size, fp32)
    with_entropy = fxpress.save(mlp90, tmp_path / "e.fxp", entropy=True)
    assert with_entropy < size
    assert torch.equal(fxpress.load(tmp_path / "e.fxp")(calib[0][0]), mlp90(calib[0][0]))


def test_every_encoding_decodes_bit_exactly():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(300, generator=g)
    # masked_fill writes +0.0; `dense * mask` would write -0.0 for negative weights, which
    # is stored as a value (its sign bit is kept)
    sparse = dense.masked_fill(torch.rand(300, generator=g) > 0.05, 0)
    half = dense.masked_fill(torch.rand(300, generator=g) > 0.5, 0)
    signed_zero = torch.zeros(64)
    signed_zero[::3] = -0.0  # -0.0 is not all-zero bits: it must survive
    long_gap = torch.zeros(5000)
    long_gap[[3, 4999]] = 1.0
    ints = torch.randint(0, 3, (200,), generator=g, dtype=torch.uint8)
    for t in (dense, sparse, half, signed_zero, long_gap, ints, torch.zeros(0),
              half.to(torch.bfloat16), (half != 0), sparse.double()):
        for entropy in (False, True):
            entry, streams = artifact.encode_tensor("t", t, entropy)
            back = artifact.decode_tensor("t", entry, streams)
            assert back.dtype == t.dtype and back.shape == t.shape
            assert torch.equal(back.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert artifact.plan_encoding(sparse).encoding == "relidx"
    assert artifact.plan_encoding(dense).encoding == "dense"
    assert artifact.plan_encoding(half).encoding == "bitmap"
    assert artifact.plan_encoding(dense * (sparse != 0)).encoding != "relidx"  # -0.0 kept


def test_cnn_with_batchnorm_round_trip(cnn, calib, tmp_path):
    gm = pruned(fxpress.capture(cnn, calib[0]), 0.5, calib[0])
    fxpress.save(gm, tmp_path / "cnn.fxp")
    loaded = fxpress.load(tmp_path / "cnn.fxp")
    assert isinstance(loaded.bn1, torch.nn.BatchNorm2d) and loaded.bn1.eps == gm.bn1.eps
    assert loaded.conv1.padding == (1, 1) and not loaded.training
    assert torch.equal(loaded.bn2.running_var, gm.bn2.running_var)
    for (x,) in calib:
        assert torch.equal(loaded(x), gm(x))


def test_runtime_modules_round_trip_and_need_the_allowlist(mlp90, calib, tmp_path):
    gm = share_linears(fxpress.graph.clone_structure(mlp90))
    ss = ScaleShift(10)
    gm.add_module("post", ss)
    out = gm.graph.output_node()
    with gm.graph.inserting_before(out):
        post = gm.graph.call_module("post", (out.args[0],))
    out.args = (post,)
    gm.recompile()
    path = tmp_path / "shared.fxp"
    size = fxpress.save(gm, path)
    with pytest.raises(ForbiddenTargetError, match="PackedCodebookLinear.*not registered"):
        artifact.load(path)  # fxpress.load's registry does not know the test classes
    loaded = artifact.load(path, RUNTIME)
    assert isinstance(loaded.head, PackedCodebookLinear) and loaded.head.bits == 4
    assert loaded.post.options["dims"] == (1, 10)  # tuples come back as tuples
    assert isinstance(loaded.post.shift, torch.nn.Parameter)
    for (x,) in calib:
        assert torch.equal(loaded(x), gm(x))
    # 90% pruned + 4-bit codebook: the packed indices are mostly zero bytes and go sparse too
    fp32 = fp32_safetensors_bytes(mlp90)
    small = artifact.save(gm, tmp_path / "e.fxp", entropy=True)
    assert small <= size and fp32 / small > 15, (fp32, size, small)
    assert torch.equal(artifact.load(tmp_path / "e.fxp", RUNTIME)(calib[0][0]), gm(calib[0][0]))


def test_loads_in_a_fresh_process_without_the_model_class(mlp90, calib, tmp_path):
    gm = share_linears(fxpress.graph.clone_structure(mlp90))
    fxpress.save(gm, tmp_path / "m.fxp")
    x = calib[1][0]
    safetensors.torch.save_file({"x": x, "y": gm(x)}, tmp_path / "io.safetensors")
    code = textwrap.dedent(f"""
        import sys, torch, safetensors.torch
        from fxpress.graph import artifact
        from tests.runtime_fixtures import RUNTIME
        gm = artifact.load({str(tmp_path / 'm.fxp')!r}, RUNTIME)
        io = safetensors.torch.load_file({str(tmp_path / 'io.safetensors')!r})
        assert not any(m.startswith("examples") for m in sys.modules), "model code was imported"
        print("EQUAL" if torch.equal(gm(io["x"]), io["y"]) else "DIFFERENT")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "EQUAL"


def test_minilm_export_graph_after_prune(minilm, minilm_gm, minilm_batches, tmp_path):
    gm = pruned(minilm_gm, 0.5, minilm_batches[0])
    path = tmp_path / "minilm.fxp"
    size = fxpress.save(gm, path)
    fp32 = fp32_safetensors_bytes(minilm)
    # half the linear weights are zero (embeddings are not pruned): ~0.78x of fp32
    assert size < 0.82 * fp32, (size, fp32)
    header = artifact.read_header(path)
    assert header["graph"]["codegen"]["kind"] == "pytree"
    assert header["tensors"]["bert.encoder.layer.0.attention.self.query.weight"]["encoding"] == "bitmap"
    loaded = fxpress.load(path)
    with torch.no_grad():
        for ids, mask in minilm_batches:
            assert torch.equal(loaded(ids, mask), gm(ids, mask))
        # dynamic dims survive: another batch size and length
        ids, mask = minilm_batches[1][0][:5, :9], minilm_batches[1][1][:5, :9]
        assert torch.equal(loaded(ids, mask), gm(ids, mask))


# -- bad files -----------------------------------------------------------------------------------

@pytest.fixture
def mlp_bytes(mlp90):
    return artifact.dumps(mlp90)


MARKER = "/tmp/fxpress_artifact_test_pwned"


@pytest.mark.parametrize("mutate, error, fragment", [
    (_set_target("torch.not_a_function"), ForbiddenTargetError, "'torch.not_a_function' is not in"),
    (_set_target("os.system", {"$": "tuple", "v": [f"touch {MARKER}"]}), ForbiddenTargetError,
     "'os.system'"),
    (_set_target("builtins.eval", {"$": "tuple", "v": [f"open('{MARKER}','w')"]}),
     ForbiddenTargetError, "'builtins.eval'"),
    (_set_target("builtins.__import__", {"$": "tuple", "v": ["os"]}), ForbiddenTargetError,
     "'builtins.__import__'"),
    (_set_target("torch.load"), ForbiddenTargetError, "'torch.load'"),
    (_set_target("torch.ops.aten.__class__.default"), ForbiddenTargetError, "aten.__class__"),
    (_set_target("builtins.getattr", {"$": "tuple", "v": [{"$": "node", "v": "x"}, "__class__"]}),
     ForbiddenTargetError, "getattr is allowed only"),
    (lambda h: _node(h, "call_module").update(op="call_method", target="__reduce_ex__"),
     ForbiddenTargetError, "'__reduce_ex__'"),
    (lambda h: _node(h, "call_module").update(op="get_attr", target="layers.__class__"),
     ForbiddenTargetError, "dunder name '__class__'"),
    (lambda h: h["modules"][2].update(config={"__class__": 1}), ForbiddenTargetError,
     "dunder name '__class__'"),
    (lambda h: h["modules"][2].update(config={"forward": 1}), ForbiddenTargetError,
     "would replace a method"),
    (lambda h: h["modules"][2].update(kind="runtime", **{"class": "subprocess.Popen"}),
     ForbiddenTargetError, "'subprocess.Popen' is not registered"),
    (lambda h: h["modules"][2].update(**{"class": "torch.nn.modules.module.os"}),
     ForbiddenTargetError, "not a torch.nn module class"),
    (lambda h: _node(h, "placeholder").update(target="x=__import__('os').system('id')"),
     ForbiddenTargetError, "not a plain identifier"),
    (lambda h: h["tensors"]["head.weight"].update(shape=[1 << 40, 1 << 7]), ArtifactFormatError,
     "'head.weight': claims 140737488355328 elements"),
    (lambda h: h.update(version=99), ArtifactFormatError, "v3 artifact"),
])
def test_crafted_files_are_refused_before_anything_runs(mlp_bytes, tmp_path, mutate, error,
                                                        fragment):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    path = tmp_path / "bad.fxp"
    path.write_bytes(_tamper(mlp_bytes, mutate))
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace("[", r"\[")) as e:
        fxpress.load(path)
    assert str(path) in str(e.value)
    assert not os.path.exists(MARKER)


def test_damaged_files_are_refused(mlp_bytes, tmp_path):
    path = tmp_path / "bad.fxp"
    header, payload, _ = artifact._split_prefix(mlp_bytes, "t")
    # truncated: every cut point is refused with a format error
    for cut in (10, artifact.PREFIX_SIZE + 5, len(mlp_bytes) - len(payload) // 2, len(mlp_bytes) - 1):
        path.write_bytes(mlp_bytes[:cut])
        with pytest.raises(ArtifactFormatError, match="truncated|too short"):
            fxpress.load(path)
    # one flipped byte inside a tensor's values: the error names the tensor
    flipped = flip_tensor_byte(mlp_bytes, "layers.1.weight")
    path.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactIntegrityError, match="'layers.1.weight' stream 'values'"):
        fxpress.load(path)
    # a flipped byte in the header breaks its checksum
    flipped = bytearray(mlp_bytes)
    flipped[artifact.PREFIX_SIZE + 3] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactIntegrityError, match="header fails its sha256"):
        fxpress.load(path)
    # a prefix claiming a huge header is refused before anything is read or allocated
    huge = bytearray(mlp_bytes)
    huge[16:24] = (1 << 62).to_bytes(8, "little")
    path.write_bytes(bytes(huge))
    with pytest.raises(ArtifactFormatError, match="header claims 4611686018427387904 bytes"):
        artifact.read_header(path)
    with pytest.raises(ArtifactFormatError, match="not an fxpress artifact"):
        artifact.loads(b"PK\x03\x04" + bytes(100))


def test_decompression_bombs_are_bounded(mlp90, tmp_path):
    # a tensor whose declared size dwarfs the file is refused before decoding
    data = artifact.dumps(mlp90)
    def grow(h):
        e = h["tensors"]["layers.1.weight"]
        e["shape"] = [1 << 20, 1 << 14]
        e["encoding"], e["nnz"] = "bitmap", 0
        e["streams"] = {"bitmap": {**e["streams"]["index"], "raw_bytes": (1 << 34) // 8},
                        "values": {**e["streams"]["values"], "raw_bytes": 0}}
        e.pop("bits"), e.pop("entries")
    with pytest.raises(ArtifactFormatError, match="over the limit"):
        artifact.loads(_tamper(data, grow))


def test_unsupported_graphs_fail_at_save_with_the_culprit(calib, tmp_path):
    class Custom(torch.nn.Module):
        def forward(self, x):
            return x * 2

    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(64, 4)))
    gm.add_module("custom", Custom())
    with gm.graph.inserting_before(gm.graph.output_node()):
        node = gm.graph.call_module("custom", (next(iter(gm.graph.nodes)),))
    with pytest.raises(UnsupportedGraphError, match="module 'custom'.*only torch.nn modules"):
        artifact.dumps(gm)
    delattr(gm, "custom")
    node.op, node.target = "call_function", lambda x: x
    with pytest.raises(UnsupportedGraphError, match="not an allowlisted function"):
        artifact.dumps(gm)


def test_save_is_atomic_when_killed_mid_write(mlp90, tmp_path):
    path = tmp_path / "model.fxp"
    fxpress.save(mlp90, path)
    before = path.read_bytes()
    # the child writes a different model to the same path and is killed after the bytes
    # are in the temp file but before the rename
    code = textwrap.dedent(f"""
        import os, sys, time, torch
        import fxpress
        real = os.fsync
        def stall(fd):
            real(fd)
            print("WRITTEN", flush=True)
            time.sleep(120)
        os.fsync = stall
        gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Linear(512, 10)))
        fxpress.save(gm, {str(path)!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "WRITTEN"
        temps = list(tmp_path.glob(".model.fxp.*.tmp"))
        assert temps and temps[0].stat().st_size > 100_000  # the new file was being written
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert path.read_bytes() == before
    assert torch.equal(fxpress.load(path).head.weight, mlp90.head.weight)


def test_save_refuses_a_directory_and_keeps_going_after_errors(mlp90, tmp_path):
    with pytest.raises(ArtifactError, match="is a directory"):
        fxpress.save(mlp90, tmp_path)
    with pytest.raises(ArtifactError, match="does not exist"):
        fxpress.save(mlp90, tmp_path / "missing" / "m.fxp")
    assert not list(tmp_path.glob("*.tmp"))


def test_pipeline_records_disk_bytes_and_result_embeds_them(mlp, calib, tmp_path):
    res = fxpress.compress(mlp, "prune{sparsity=0.5},prune{sparsity=0.8,tol.min_cosine=0.5,tol.min_top1=0.5}",
                           calibration=calib, progress=False)
    r1, r2 = res.records
    assert res.original_disk_bytes > r1.disk_bytes > r2.disk_bytes > 0
    assert r2.disk_bytes == artifact.artifact_size(res.module)
    path = tmp_path / "r.fxp"
    fxpress.save(res, path)
    report = artifact.read_header(path)["report"]
    assert [r["disk_bytes"] for r in report["records"]] == [r1.disk_bytes, r2.disk_bytes]
    assert {row["name"] for row in report["baseline"]["layers"]} == {"layers.0", "layers.1", "head"}
    assert fxpress.load(path).meta["fxpress"]["passes"] == [str(p) for p in
                                                           fxpress.Pipeline.parse(res.pipeline).passes]


def test_filler_counts_are_the_same_block_by_block(monkeypatch):
    import numpy as np

    def whole(mask):  # every gap at once
        hist = np.bincount(artifact._gaps(mask) - 1)
        values = np.arange(hist.size)
        return [int(hist @ (values >> bits)) for bits in range(1, 9)]

    rng = np.random.default_rng(1)
    for block in (1, 7, 64, 1 << 22):
        monkeypatch.setattr(artifact.tensors, "_BLOCK", block)
        for n in (0, 1, 16, 1000):
            for p in (0.0, 0.01, 0.3, 1.0):
                mask = rng.random(n) < p
                assert artifact._fillers(mask) == whole(mask), (block, n, p)


def test_relative_indices_are_the_same_block_by_block(monkeypatch):
    import numpy as np

    rng = np.random.default_rng(2)
    cases = []
    for n, p in ((1, 1.0), (16, 0.0), (1000, 0.01), (1000, 0.3), (999, 1.0)):
        a = (rng.standard_normal(n) * (rng.random(n) < p)).astype(np.float32)
        if n == 1000 and p == 0.3:
            a[100:700] = 0  # a gap across several blocks
        cases.append(a)
    whole = {}
    for block in (1 << 22, 1, 7, 64):
        monkeypatch.setattr(artifact.tensors, "_BLOCK", block)
        for i, a in enumerate(cases):
            mask = a != 0
            for bits in (1, 3, 8):
                index, values, total = artifact.tensors._encode_relidx(a, mask, bits)
                assert total == artifact._fillers(mask)[bits - 1] + int(mask.sum())
                back = artifact.tensors._decode_relidx(index, values, bits, total, a.size, "t")
                assert np.array_equal(back, a), (block, i, bits)
                got = (index.numpy().tobytes(), values.tobytes())
                assert whole.setdefault((i, bits), got) == got, (block, i, bits)


def test_tensors_encode_the_same_block_by_block(monkeypatch):
    g = torch.Generator().manual_seed(4)
    cases = []
    for p in (0.05, 0.6, 1.0):  # relative indices, bitmap, dense
        x = torch.randn(3001, generator=g)
        cases.append(torch.where(torch.rand(3001, generator=g) < p, x, torch.zeros(())))
    cases.append((cases[1] * 50).to(torch.int8))
    whole = [artifact.encode_tensor("k", x) for x in cases]
    assert [e["encoding"] for e, _ in whole[:3]] == ["relidx", "bitmap", "dense"]
    for block in (8, 64, 1000):  # the mask is then computed block by block
        monkeypatch.setattr(artifact.tensors, "_BLOCK", block)
        for x, (entry, streams) in zip(cases, whole):
            e, s = artifact.encode_tensor("k", x)
            assert e == entry and all(torch.equal(s[k], streams[k]) for k in streams), block
            assert torch.equal(artifact.decode_tensor("k", e, s), x)


class _EveryDtype(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        for i, dt in enumerate((torch.bool, torch.int64, torch.float16, torch.bfloat16, torch.int8,
                                torch.uint8, torch.float64, torch.int32, torch.int16)):
            self.register_buffer(f"b{i}", (torch.arange(200) % 7 == 0).to(dt))  # sparse
            self.register_buffer(f"d{i}", torch.arange(1, 41).to(dt))           # dense
        self.register_buffer("strided", torch.randn(8, 6).t())  # not contiguous
        self.register_buffer("empty", torch.zeros(0))

    def forward(self, x):
        return self.lin(x) + self.strided.sum()


def test_save_streams_safetensors_own_layout_and_sizes_are_counted_exactly(tmp_path):
    gm = torch.fx.symbolic_trace(_EveryDtype())
    for entropy in (False, True):
        path = tmp_path / f"m{entropy}.fxp"
        size = fxpress.save(gm, path, entropy=entropy)
        data = path.read_bytes()
        assert size == len(data) and data == artifact.dumps(gm, entropy=entropy)
        header, payload, _ = artifact._split_prefix(data, "t")
        # the payload written stream by stream is what safetensors itself writes
        assert bytes(payload) == safetensors.torch.save(safetensors.torch.load(bytes(payload)))
        counted = artifact.artifact_header(gm, entropy=entropy)
        assert counted.pop("file_bytes") == size == artifact.artifact_size(gm, entropy=entropy)
        assert json.loads(json.dumps(counted)) == header
        loaded = fxpress.load(path)
        for name, b in gm.named_buffers():
            assert torch.equal(loaded.get_buffer(name), b)
    assert not [p for p in tmp_path.iterdir() if p.name not in ("mFalse.fxp", "mTrue.fxp")]


def test_save_and_size_never_hold_the_whole_artifact(tmp_path):
    import tracemalloc

    # 8 x 4 MB of weights, half of them half pruned: the old writer held every stream, the
    # safetensors bytes and the packed file (numpy arrays and bytes, which tracemalloc
    # sees; torch's own tensors it does not)
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
    with torch.no_grad():
        for lin in net[::2]:
            lin.weight.masked_fill_(torch.rand_like(lin.weight) < 0.5, 0.0)
    gm = torch.fx.symbolic_trace(net)
    payload = 0
    for run in (lambda: artifact.artifact_size(gm), lambda: fxpress.save(gm, tmp_path / "m.fxp")):
        tracemalloc.start()
        try:
            size = run()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        payload = payload or size
        assert size == payload > 24 << 20
        assert peak < size // 2, f"{peak / 2**20:.1f} MB traced for a {size / 2**20:.1f} MB file"


def test_packed_bit_masks_store_as_bit_indices_bit_exactly():
    import numpy as np

    rng = np.random.default_rng(0)
    for nbytes in (2, 17, 2400):
        for p in (0.0, 0.02, 0.1, 0.3, 1.0):
            t = torch.from_numpy(np.packbits(rng.random(nbytes * 8) < p, bitorder="little"))
            for entropy in (False, True):
                entry, streams = artifact.encode_tensor("m", t, entropy)
                assert torch.equal(artifact.decode_tensor("m", entry, streams), t)
    t = torch.from_numpy(np.packbits(rng.random(2400 * 8) < 0.1, bitorder="little"))
    entry, streams = artifact.encode_tensor("m", t)
    assert entry["encoding"] == "bitidx" and set(entry["streams"]) == {"index"}
    assert entry["stored_bytes"] < 0.7 * t.numel()  # ~0.5 bits per position, not 1
    # a header that claims more bytes than its indices can reach is refused
    bad = json.loads(json.dumps(entry))
    bad["shape"] = [entry["entries"] * 16]
    with pytest.raises(ArtifactFormatError):
        artifact.decode_tensor("m", bad, streams)


def test_headers_compress_from_the_preset_dictionary_and_old_files_still_load(mlp_bytes, mlp90,
                                                                              tmp_path, calib):
    import hashlib
    import json
    import zlib

    magic, version, flags, hlen, _ = artifact._PREFIX.unpack(mlp_bytes[:artifact.PREFIX_SIZE])
    assert flags == 23  # zlib + the third preset dictionary + small streams in one blob
    header, payload, raw = artifact._split_prefix(mlp_bytes, "t")
    plain = zlib.compress(raw, 9)
    first, second = (zlib.compressobj(9, zdict=d) for d in (artifact.format.HEADER_ZDICT,
                                                             artifact.format.HEADER_ZDICT_V2))
    first, second = first.compress(raw) + first.flush(), second.compress(raw) + second.flush()
    assert hlen < 0.8 * len(plain) and hlen < len(first)  # each dictionary pays for itself
    # files written before the dictionaries (flag 1: plain zlib), with the first one (flag 2
    # alone) or the second (flags 2 and 8) load the same module
    path = tmp_path / "old.fxp"
    for old_flags, head in ((1 | 4, plain), (1 | 2 | 4, first), (1 | 2 | 4 | 8, second)):
        old = artifact._PREFIX.pack(magic, version, old_flags, len(head), hashlib.sha256(head).digest())
        path.write_bytes(old + head + bytes(payload))
        assert torch.equal(fxpress.load(path)(calib[0][0]), mlp90(calib[0][0]))
    # flag 2 without flag 1, 8 or 16 without 2, both 8 and 16, an unknown flag, or a blob
    # flag the header contradicts is refused
    head = mlp_bytes[artifact.PREFIX_SIZE:artifact.PREFIX_SIZE + hlen]
    for bad, error in ((6, "unknown flags"), (13, "unknown flags"), (21, "unknown flags"),
                       (31, "unknown flags"), (87, "unknown flags"), (19, "disagree on the blob")):
        path.write_bytes(artifact._PREFIX.pack(magic, version, bad, hlen, hashlib.sha256(head).digest())
                         + mlp_bytes[artifact.PREFIX_SIZE:])
        with pytest.raises(ArtifactFormatError, match=error):
            fxpress.load(path)
    assert artifact.fill(json.loads(raw)) == header  # the stored text, derived fields put back


def test_small_streams_share_one_blob_and_its_tiling_is_checked(mlp_bytes, tmp_path):
    import json

    header, payload, _ = artifact._split_prefix(mlp_bytes, "t")
    st_len = int.from_bytes(payload[:8], "little")
    index = json.loads(bytes(payload[8:8 + st_len]))
    small = [info for e in header["tensors"].values() for info in e["streams"].values()
             if info["bytes"] < artifact.BLOB_STREAM_BYTES]
    assert small and all(info.get("blob") for info in small)
    assert set(index) == {artifact.BLOB_KEY}  # the digits MLP's streams are all small
    assert index[artifact.BLOB_KEY]["shape"] == [sum(info["bytes"] for info in small)]
    # a header whose blob streams do not tile the blob is refused, naming the problem
    bad = dict(header, blob=dict(header["blob"], bytes=header["blob"]["bytes"] + 1))
    path = tmp_path / "bad.fxp"
    path.write_bytes(artifact.pack_artifact(bad, bytes(payload)))
    with pytest.raises(ArtifactFormatError, match="blob"):
        fxpress.load(path)


# A file fxpress wrote in format version 1 (every derived field, 64-bit digests per stream and
# tensor): Sequential(Linear(8, 6), ReLU, LayerNorm(6), Linear(6, 3)), seed 0, pruned 50% and
# shared at 2 bits with 8-bit biases, saved with entropy=True by the version 1 writer.
_V1_FILE = (
    "iUZYUFJFU1MBAAAABwAAAIcCAAAAAAAA/6WRP5Cr5QOtWeRcrk/yKAazrTmew9JK6xX6k1WeQaN4+fWC+bHdnc9u3CAQ"
    "xl8oWsEMgz3v0FOrnCP+SpFW6qGHnvbda3s3a2eLwQSaSjl6pdXwgQfD/PDnT2Rv1yGRBQJ3PXfUgcKpkiN4Eb5VUbc3"
    "dZeKBh6lPrCLHYoAq4pcVVG2dPO3bSt581Y583bo2m3bsNA2rGobVLUNm4e9P22aOqRVQnfQVA9+PkJ8HuqLXShNNzzz"
    "RbiMflpt5SBTnLz9bYNl1H41XB5FkDmzxO/h2/PD9+SWB9Pam/d4tZ6Y7Y6Y8G8+ojdvD2d/yPfukPMy4Dyfan65jdrf"
    "s4aeB3prGhnOYXaN/P36K7xsHSO33YbVWYztWYw9shh7ZTF+Ebr6pD+WxZxHDEfZQukguZTsRwrBgSInJXbwBNwrvSRC"
    "2fNPu+ZhoixzpI5e2sgpBCBkFERSReHrjp2ndqWwObGdD5QVCIvAo9vtUsnMGTtYcsqzJTN60UwP0rZ8iTA5kXrV2L4l"
    "NywGr1D6GBwboTp82y+9Q08EyomcSyfHjJxKgxiVZokwaj8yRQ0d2MOec0EiVE4jqEXkAY+bgkT2LMbgotV2+mFZTLee"
    "ft+TmAhVlIidJlYRKFoIPBieUsbqDpaHexNrIlRxYsXyxEqlbJSOjAYXWVg0kZqxA62vkeTD5NTRIu4wvSxo9EpagZYH"
    "4RQYGpq5xIYV5cPkNOKqsX1SRXJAJkoep+dXyK8AmshFIlB+Ui2XROVpHAQNMMD8vgHO/vyV9dD7Cv+26z7dz16efkxr"
    "zGmh/mrOdbVReqiNwifVRvk/1Eb5/XTrtSYlPfoAQsvIU+aitE4bnAL6SNMlKeM4CD8oEcIAbM30n6gFj2KGydc74u1+"
    "W642iy24XP4AbgnN9UAAAAAAAAAAeyJibG9iIjp7ImR0eXBlIjoiVTgiLCJzaGFwZSI6WzEyMl0sImRhdGFfb2Zmc2V0"
    "cyI6WzAsMTIyXX19ICAgIAAAAAAzrqW+EE5svvEghT6cwAAJLMxwwmIOQPoAScD/lWcnoQI7AACeQgAAgD8AAIA/AACA"
    "PwAAgD8AAIA/AACAPwAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAACb+o6+eTCAPumzyD5GASHgAXPz/1WbtjoAAAAA"
)
RUNTIME_ALL = fxpress.registry().runtime_modules()
_V1_OUT = [[-0.08405356109142303, 0.3770062029361725, 0.9333221316337585], [0.1602155864238739, 0.33854252099990845, 0.3552606701850891], [0.05730877071619034, -0.13143318891525269, 1.1271902322769165], [0.7976781129837036, -0.39241141080856323, 0.7993595600128174]]


def _recorded_input() -> torch.Tensor:
    """The input the old files' outputs were recorded on: seed 0, the model built, a batch."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.LayerNorm(6),
                            torch.nn.Linear(6, 3))
        return torch.randn(4, 8)


def test_version_1_files_still_load_and_resave_as_smaller_version_3(tmp_path):
    import base64

    data = base64.b64decode(_V1_FILE)
    assert artifact._PREFIX.unpack(data[:artifact.PREFIX_SIZE])[1] == 1
    header, _, _ = artifact._split_prefix(data, "t")
    assert all("sha256" in e for e in header["tensors"].values())  # its digests are checked
    x = _recorded_input()
    gm = artifact.loads(data, RUNTIME_ALL)
    assert torch.allclose(gm(x), torch.tensor(_V1_OUT), atol=1e-6)
    again = artifact.dumps(gm, entropy=True)
    assert artifact._PREFIX.unpack(again[:artifact.PREFIX_SIZE])[1] == artifact.VERSION
    assert len(again) < len(data)
    back = artifact.loads(again, RUNTIME_ALL)
    assert torch.equal(back(x), gm(x))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), gm.state_dict().values()))
    # a digest of the version 1 file that disagrees with its stream is still refused
    key = "3.weight" if "3.weight" in header["tensors"] else next(iter(header["tensors"]))
    sname = next(iter(header["tensors"][key]["streams"]))
    flipped = flip_tensor_byte(data, key, stream=sname, offset=0, mask=1)
    with pytest.raises(ArtifactIntegrityError, match=f"'{key}' stream '{sname}'"):
        artifact.loads(flipped, RUNTIME_ALL)


# A file fxpress wrote in format version 2 (node names and references stored as names,
# grids in float32): the same Sequential, seed 0, pruned 50%, shared at 2 bits with 8-bit
# biases and its LayerNorm on an 8-bit grid (small), saved with entropy=True.
_V2_FILE = (
    "iUZYUFJFU1MCAAAADwAAAHkBAAAAAAAABu+yQFTVjvbLbVkh803zjIAoe09acgKjovUVe7sG57B4+RlYZR3tXUtuwyAQ"
    "vUvXUQTDJ+YOXbXqAcDGq2y6qLrK3QtxYmOCA0McS5Wy82pmsIfPe555bMipDFlB08zKCIuHi6mCcqPcPSNZioUgJazO"
    "Qc6wJN+VSvPAIsLNchgo8iLmUtIRhu4h4x5Q7pEvKG5FjDvhb6JhqGggjoY9/LkeJSR8c3s+phIygvzbywaeKRK+m2rA"
    "AaPnD3QZndKJ8bmyOynC58O+f80G5dYMv5ZdvIUWX/00ydJYuXJNudy8pFzOKsrZa4omCL3znlAxRSncZy5KKQucJHMR"
    "B4C0WKweXWN3bfyHqZ6TdZbXD7nyDVeoyk/uVh2FS3ztoMzv1Q6Vfq6zp6Q4y6e4QBosJrdq7G4Eg5HAdzwHXM5t+/Hv"
    "0P7Tfv944SV9xIFgEcFeWChMKBOtliLAnIaAw5JNb0mjjAC3EZrWcq0V7WjTQcM74bWrObWkNd3BkL5nXBsl9aFVkskA"
    "c74NTwOElvw+ulTsdPoDoJWm6EAAAAAAAAAAeyJibG9iIjp7ImR0eXBlIjoiVTgiLCJzaGFwZSI6WzkzXSwiZGF0YV9v"
    "ZmZzZXRzIjpbMCw5M119fSAgICAgIAAAAAAzrqW+cfd2vpEhiT6QwAAJLMxwwmIMQPIAScD/lWcnoQI7AACeQv//////"
    "/4GAgDsAAAAAPwA8AAAAAAAAOyWJvlFIYT7ps8g+RqUh4AFz8/9Vm7Y6AAAAAA=="
)
_V2_OUT = [[-0.41100791096687317, 0.08769106864929199, 0.9796965718269348], [0.1602155864238739, 0.33854252099990845, 0.3552606701850891], [0.20673935115337372, -0.5211678743362427, 1.1439175605773926], [1.016990303993225, -0.26917511224746704, 0.562882661819458]]


def test_version_2_files_still_load_and_resave_as_smaller_version_3():
    import base64

    data = base64.b64decode(_V2_FILE)
    assert artifact._PREFIX.unpack(data[:artifact.PREFIX_SIZE])[1] == 2
    x = _recorded_input()
    gm = artifact.loads(data, RUNTIME_ALL)
    assert torch.allclose(gm(x), torch.tensor(_V2_OUT), atol=1e-6)
    again = artifact.dumps(gm, entropy=True)
    assert artifact._PREFIX.unpack(again[:artifact.PREFIX_SIZE])[1] == artifact.VERSION == 3
    assert len(again) < len(data)
    back = artifact.loads(again, RUNTIME_ALL)
    assert [n.name for n in back.graph.nodes] == [n.name for n in gm.graph.nodes]
    assert torch.equal(back(x), gm(x))


class _Blocks(torch.nn.Module):
    """Three identical blocks (attention-like reshapes, a norm, a feed-forward) after an
    input projection: a graph whose node names repeat from block to block."""

    def __init__(self, d: int = 16, n: int = 3):
        super().__init__()
        self.inp = torch.nn.Linear(8, d)
        self.q = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n))
        self.ff = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n))
        self.norm = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(n))

    def forward(self, x):
        h = self.inp(x.reshape(-1, 4, 8))
        for q, ff, norm in zip(self.q, self.ff, self.norm):
            b, t, c = h.shape
            a = q(h).reshape(b, t, 2, c // 2).transpose(1, 2).transpose(1, 2).reshape(b, t, c)
            h = norm(h + torch.relu(ff(a)))
        return h.mean(1)


def test_version_3_derives_node_names_and_stores_references_as_distances():
    import json
    import zlib

    torch.manual_seed(0)
    x = torch.randn(5, 32)
    res = fxpress.compress(_Blocks().eval(), "prune{sparsity=0.5},share{bits=4,bias_bits=8},small",
                           calibration=[(x,)], policy="warn", progress=False)
    data = artifact.dumps(res.module, entropy=True)
    header, _, raw = artifact._split_prefix(data, "t")
    stored = json.loads(raw)["graph"]["nodes"]
    # only the placeholder's and the output's names are stored; every reference is a distance
    assert [n["name"] for n in stored if "name" in n] == ["x", "output"]
    refs = [a for n in stored for a in n.get("args", {}).get("v", [])
            if isinstance(a, dict) and a.get("$") == "node"]
    assert refs and all(isinstance(a["v"], int) and a["v"] >= 1 for a in refs)
    back = artifact.loads(data, RUNTIME_ALL)
    assert [(n.name, n.target) for n in back.graph.nodes if n.op != "call_function"] == \
        [(n.name, n.target) for n in res.module.graph.nodes if n.op != "call_function"]
    assert [n.name for n in back.graph.nodes] == [n.name for n in res.module.graph.nodes]
    assert torch.equal(back(x), res.module(x))
    # the same header as version 2 stored it (names, references by name, its dictionary)
    v2 = json.dumps(artifact.minimize(dict(header, version=2)), separators=(",", ":")).encode()
    z = zlib.compressobj(9, zdict=artifact.format.HEADER_ZDICT_V2)
    v2_bytes = len(z.compress(v2) + z.flush())
    head_bytes = artifact._PREFIX.unpack(data[:artifact.PREFIX_SIZE])[3]
    assert head_bytes < 0.85 * v2_bytes, (head_bytes, v2_bytes)


def test_derived_names_step_over_stored_ones_and_stay_linear():
    from fxpress.graph.artifact.compact import fill

    def graph(nodes):
        return {"format": "fxpress", "version": 3, "graph": {"nodes": nodes}}

    # a stored name is taken: the derivation steps over it, as torch.fx does
    h = fill(graph([{"op": "placeholder", "name": "x"},
                    {"op": "call_method", "name": "relu_1", "target": "relu"},
                    *({"op": "call_method", "target": "relu"} for _ in range(3)),
                    {"op": "call_module", "target": "layers.0.fc"},
                    {"op": "call_function", "target": "torch.ops.aten.relu.default"},
                    {"op": "get_attr", "target": "a.b"}]))
    assert [n["name"] for n in h["graph"]["nodes"]] == ["x", "relu_1", "relu", "relu_2", "relu_3",
                                                        "layers_0_fc", "relu_4", "a_b"]
    # 50,000 stored names that a naive "first free suffix" search would step over again for
    # each of the 50,000 derived ones (2.5e9 steps): each base's counter only grows
    n = 50_000
    h = fill(graph([{"op": "call_method", "name": f"relu_{i}", "target": "relu"} for i in range(1, n)]
                   + [{"op": "call_method", "target": "relu"} for _ in range(n)]))
    names = [node["name"] for node in h["graph"]["nodes"]]
    assert len(set(names)) == len(names) == 2 * n - 1
    assert names[n - 1] == "relu" and names[-1] == f"relu_{2 * n - 2}"


def test_lifted_tensor_constants_come_back_as_plain_attributes(tmp_path):
    """An exported graph's constants (``torch.tensor(16.0)`` in forward, as DeBERTa's
    attention scale) are plain attributes, not buffers: after a round trip the loaded
    model's buffers and state_dict are the saved model's, and its outputs bit-identical."""
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) / torch.sqrt(torch.tensor(16.0))

    x = torch.randn(2, 4)
    gm = fxpress.capture(Scaled(), (x,), method="export")
    assert any(n.op == "get_attr" and "lifted" in str(n.target) for n in gm.graph.nodes)
    fxpress.save(gm, tmp_path / "m.fxp")
    loaded = fxpress.load(tmp_path / "m.fxp")
    assert dict(loaded.named_buffers()).keys() == dict(gm.named_buffers()).keys()
    assert loaded.state_dict().keys() == gm.state_dict().keys()
    assert torch.equal(loaded(x), gm(x))


def test_the_breakdown_accounts_for_every_byte(mlp_bytes):
    from fxpress.graph.artifact.breakdown import breakdown, format_breakdown

    b = breakdown(mlp_bytes)
    assert b["prefix"] + b["header"] + b["safetensors_index"] + b["streams"] == b["file"] == len(mlp_bytes)
    assert sum(b["groups"].values()) == sum(b["tensors"].values()) == b["streams"]
    assert b["sections"]["tensors"] > 0 and "layers.1.weight" in format_breakdown(b)


@pytest.mark.parametrize("width", range(1, 9))
def test_arithmetic_codecs_round_trip_and_their_estimate_is_their_size(width):
    from fxpress.graph.artifact import arith

    g = torch.Generator().manual_seed(width)
    cases = [b"", b"\x00", bytes(range(256)),
             bytes(torch.randint(0, 256, (300,), generator=g, dtype=torch.uint8).tolist()),
             # a 5% mask, packed: far below a byte per byte
             bytes(torch.tensor((torch.rand(4000, generator=g) < 0.05).tolist()).reshape(-1, 8)
                   .to(torch.uint8).mul(1 << torch.arange(8)).sum(1).tolist())]
    for data in cases:
        coded = arith.encode(data, width)
        assert arith.decode(coded, width, len(data)) == data
        assert abs(arith.estimate(data, width) - len(coded)) <= 4
    mask = cases[-1]
    assert len(arith.encode(mask, 1)) < 0.4 * len(mask)  # H(0.05) = 0.29 bits a bit


def test_small_streams_take_an_arithmetic_codec_when_it_is_smaller(mlp90, calib, tmp_path,
                                                                    monkeypatch):
    from fxpress.graph.artifact import arith, read_header

    gm = mlp90  # 90% pruned: each weight's relative indices or bitmap is a small stream
    size = fxpress.save(gm, tmp_path / "ac.fxp", entropy=True)
    codecs = {i.get("codec") for e in read_header(tmp_path / "ac.fxp")["tensors"].values()
              for i in e["streams"].values()}
    assert codecs & set(arith.CODECS), codecs
    assert torch.equal(fxpress.load(tmp_path / "ac.fxp")(calib[0][0]), gm(calib[0][0]))
    monkeypatch.setattr(arith, "MAX_RAW", 0)  # the general codecs alone
    assert size < fxpress.save(gm, tmp_path / "general.fxp", entropy=True)


def test_float32_values_a_2_byte_float_holds_are_stored_in_2_bytes_bit_exactly():
    from fxpress.graph.artifact.tensors import decode_tensor, encode_tensor

    g = torch.Generator().manual_seed(0)
    for wide, narrow in ((torch.randn(40, generator=g).half().float(), "float16"),
                         (torch.randn(40, generator=g).mul(1e6).bfloat16().float(), "bfloat16")):
        wide[::7] = -0.0
        entry, streams = encode_tensor("k", wide, entropy=False)
        assert entry["narrow"] == narrow and entry["stored_bytes"] == 2 * 40
        out = decode_tensor("k", entry, streams)
        assert out.dtype == torch.float32 and torch.equal(out.view(torch.int32), wide.view(torch.int32))
    full = torch.randn(40, generator=g)  # not exact in 2 bytes: stays 4
    assert "narrow" not in encode_tensor("k", full)[0]


class _Spectral(torch.nn.Module):
    """A Fourier layer (FNO / FNet style): rfft, complex weights on the low modes, irfft."""

    def __init__(self):
        super().__init__()
        self.lift = torch.nn.Linear(2, 16)
        self.w = torch.nn.Parameter(torch.randn(16, 16, 4, dtype=torch.cfloat) / 16)
        self.proj = torch.nn.Linear(16, 1)

    def forward(self, x):
        h = self.lift(x).transpose(1, 2)
        f = torch.fft.rfft(h)
        low = torch.einsum("bix,iox->box", f[:, :, :4], self.w)
        h = torch.fft.irfft(torch.cat([low, torch.zeros_like(f[:, :, 4:])], -1), n=h.shape[-1])
        return self.proj(torch.nn.functional.gelu(h).transpose(1, 2))


def test_spectral_layers_compress_save_and_load(tmp_path):
    # torch.fft calls (FNet's token mixing, Fourier neural operators) were not on the
    # allowlist: every pass of such a model stopped at "cannot save node 'fft_rfft'"
    torch.manual_seed(0)
    model, x = _Spectral().eval(), torch.randn(3, 16, 2)
    res = fxpress.compress(model, "quantize{bits=8}", example_inputs=(x,), policy="warn")
    fxpress.save(res, tmp_path / "s.fxp")
    loaded = fxpress.load(tmp_path / "s.fxp")
    with torch.no_grad():  # (an input that requires grad takes the layers' training path)
        assert torch.equal(loaded(x), res.module(x))
    assert loaded.w.dtype == torch.cfloat and torch.equal(loaded.w, model.w)  # stored exactly
    assert any("fft" in str(n.target) for n in loaded.graph.nodes)


def test_large_sparse_tensors_are_counted_and_saved_block_by_block_bit_for_bit(monkeypatch, tmp_path):
    """encode_tensor_blocks gives encode_tensor's entries and bytes (relative indices at
    every width the plans pick, bitmaps, several dtypes, blocks that cut the tensor
    anywhere), and save / dumps / artifact_size write and count the same file as the
    whole-stream encoder."""
    from fxpress.graph.artifact import tensors as T, write

    g = torch.Generator().manual_seed(7)
    cases = []
    for p in (0.0005, 0.03, 0.2, 0.45, 0.7, 1.0):
        for dt in (torch.float32, torch.float16, torch.int8, torch.bool):
            x = torch.randn(5003, generator=g) * 40
            cases.append(torch.where(torch.rand(5003, generator=g) < p, x, torch.zeros(())).to(dt))
    for block in (64, 1000):
        monkeypatch.setattr(T, "_BLOCK", block)
        seen = set()
        for x in cases:
            entry, streams = T.encode_tensor("k", x)
            e, s = T.encode_tensor_blocks("k", x)
            assert e == entry
            seen.add((e["encoding"], e.get("bits")))
            for key, st in s.items():
                if isinstance(st, T.BlockStream):
                    got = b"".join(bytes(c) for c in st.chunks())
                    assert (st.dtype, st.shape) == (streams[key].dtype, list(streams[key].shape))
                    assert got == T._as_ints(streams[key]).tobytes(), (block, key)
                else:
                    assert torch.equal(st, streams[key])
        assert {"relidx", "bitmap", "dense"} <= {enc for enc, _ in seen}
        assert len({b for enc, b in seen if enc == "relidx"}) >= 3
    # a model whose large weights are sparse, written both ways
    monkeypatch.setattr(T, "_BLOCK", 4096)
    net = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.Linear(128, 64))
    with torch.no_grad():
        net[0].weight.masked_fill_(torch.rand(net[0].weight.shape, generator=g) < 0.5, 0.0)
        net[1].weight.masked_fill_(torch.rand(net[1].weight.shape, generator=g) < 0.9, 0.0)
    gm = torch.fx.symbolic_trace(net)
    size = fxpress.save(gm, tmp_path / "blocks.fxp")
    data = (tmp_path / "blocks.fxp").read_bytes()
    assert size == len(data) == artifact.artifact_size(gm)
    assert {e["encoding"] for e in artifact.artifact_header(gm)["tensors"].values()} >= {"relidx", "bitmap"}
    monkeypatch.setattr(write, "encode_tensor_blocks", T.encode_tensor)  # every stream whole
    assert artifact.dumps(gm) == data and artifact.artifact_size(gm) == size
    loaded = fxpress.load(tmp_path / "blocks.fxp")
    x = torch.randn(3, 96, generator=g)
    assert torch.equal(loaded(x), gm(x))


def test_size_of_a_large_sparse_weight_never_holds_its_streams():
    import tracemalloc

    # a 24 MB weight half pruned (a bitmap) and one 85% pruned (relative indices): counting
    # the file held each one's whole values stream (12 MB and 3.6 MB, numpy arrays that
    # tracemalloc sees) while the payload digest read it; block by block, a block's
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2048, 3072), torch.nn.Linear(3072, 2048))
    with torch.no_grad():
        net[0].weight.masked_fill_(torch.rand_like(net[0].weight) < 0.5, 0.0)
        net[1].weight.masked_fill_(torch.rand_like(net[1].weight) < 0.85, 0.0)
    gm = torch.fx.symbolic_trace(net)
    encodings = {e["encoding"] for e in artifact.artifact_header(gm)["tensors"].values()}
    assert {"bitmap", "relidx"} <= encodings
    tracemalloc.start()
    try:
        artifact.artifact_size(gm)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"{peak / 2**20:.1f} MB traced"
