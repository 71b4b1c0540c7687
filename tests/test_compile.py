"""fxpress.compile: every runtime module kind traces as one graph (fullgraph) with dynamic
shapes, the compiled model equals eager at several batch sizes and sequence lengths without
recompiling, a loaded artifact compiles like the graph it was saved from, and the caller's
model is left alone.

Inductor's code generation takes tens of seconds, so the tests of every module kind trace
with the ``aot_eager`` backend (Dynamo + AOT autograd on the same whole graph, no code
generated); one test runs Inductor itself on one int8 linear (what it generates for the
int8 product, and that it equals eager); ``bench/case_compile.py`` compiles whole models.
"""
from __future__ import annotations

import re

import pytest
import torch

import fxpress
from fxpress.compiled import GRAIN
from fxpress.errors import InputError
from fxpress.passes.int8 import int8_backend
from tests.helpers import assert_unchanged, state_snapshot

LOOSE = "tol.min_cosine=0"
#: one layer of every runtime module kind: int8 per token and per tensor (dynamic), 4-bit
#: weight-only conv and embedding, a sparse 2-bit codebook linear, a codebook embedding, a
#: codebook conv decoded once (cache_weight), a ternary linear, an int8 LSTM (a fused call)
PIPELINE = ",".join([
    f"prune{{sparsity=0.8,include=[fc3],{LOOSE}}}", f"share{{bits=2,include=[fc3,emb2],{LOOSE}}}",
    f"quantize{{bits=8,act_scale=token,activations=dynamic,include=[fc1,lstm*],embeddings=false,{LOOSE}}}",
    f"quantize{{bits=8,act_scale=tensor,activations=dynamic,include=[fc2],embeddings=false,{LOOSE}}}",
    f"quantize{{bits=4,granularity=group,group_size=16,scheme=affine,include=[conv,emb],{LOOSE}}}",
    f"share{{bits=4,decode=once,include=[conv2],{LOOSE}}}",
    f"binarize{{mode=ternary,include=[fc4],keep_first_last=false,{LOOSE}}}"])
KINDS = {"emb": "QuantizedEmbedding", "emb2": "CodebookEmbedding", "conv": "QuantizedConv",
         "conv2": "CodebookConv", "fc1": "QuantizedLinear", "fc2": "QuantizedLinear",
         "fc3": "CodebookLinear", "fc4": "BinaryLinear", "lstm": "FusedCall"}


class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.emb2 = torch.nn.Embedding(50, 16), torch.nn.Embedding(50, 16)
        self.conv = torch.nn.Conv1d(16, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv1d(32, 32, 3, padding=1)
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 64)
        self.fc3, self.fc4 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
        self.lstm = torch.nn.LSTM(32, 32, batch_first=True)
        self.out = torch.nn.Linear(64, 10)

    def forward(self, ids):
        h = (self.emb(ids) + self.emb2(ids)).transpose(1, 2)
        h = torch.relu(self.conv2(torch.relu(self.conv(h)))).transpose(1, 2)
        h = torch.relu(self.fc1(self.lstm(h)[0].mean(1)))
        return self.out(torch.relu(self.fc4(torch.relu(self.fc3(h) + self.fc2(h)))))


@pytest.fixture(scope="module")
def compressed():
    torch.manual_seed(0)
    model = Mixed().eval()
    res = fxpress.compress(model, PIPELINE, (torch.randint(0, 50, (4, 12)),))
    return model, res.module


def test_every_runtime_module_kind_compiles_whole_with_dynamic_shapes(compressed, tmp_path):
    model, gm = compressed
    mods = dict(gm.named_modules())
    assert {n: type(mods[n]).__name__ for n in KINDS} == KINDS
    assert (mods["fc1"].act_scale, mods["fc2"].act_scale) == ("token", "tensor")
    assert mods["fc3"].sparse and mods["conv2"].cache_weight
    gm.train(True)  # the caller's mode, which compiling must not change
    before = state_snapshot(gm), state_snapshot(model)
    # a loaded artifact: modules rebuilt from data compile like the graph they were saved from
    fxpress.save(gm, tmp_path / "m.fxp")
    fast = fxpress.compile(tmp_path / "m.fxp", torch.randint(0, 50, (4, 12)), backend="aot_eager",
                           dispatch="compiled")
    assert fast.compiles == 1 and fast.compile_seconds > 0
    gm.train(False)
    # batch 4 (compiled), then batch 1 (one sentence), a batch of 9 at another length
    for batch, length in ((4, 12), (1, 9), (9, 20)):
        ids = torch.randint(0, 50, (batch, length))
        with torch.no_grad():
            y = fast(ids)
            eager = gm(ids)
        assert y.shape == (batch, 10)
        assert torch.nn.functional.cosine_similarity(y, eager, dim=1).min() > 0.999
    assert fast.compiles == 1  # no recompile for a new batch size or length
    gm.train(True)
    assert all(m.training for m in gm.modules())
    assert not any("weight_cache" in m._buffers for m in fast.module.modules())
    assert_unchanged(gm, before[0])
    assert_unchanged(model, before[1])


def test_the_callers_model_is_not_modified_and_bad_input_is_named(compressed):
    model, gm = compressed
    snap = state_snapshot(gm)
    fast = fxpress.compile(gm, backend="aot_eager")
    assert fast.module is not gm and fast.compiles == 0  # compiled at the first call
    assert fast.module.fc1.qweight is gm.fc1.qweight  # tensors shared, not copied
    assert_unchanged(gm, snap)
    with pytest.raises(InputError, match="nn.Module"):
        fxpress.compile(42)
    with pytest.raises(InputError, match="unknown backend"):
        fxpress.compile(gm, backend="no-such-backend")
    with pytest.raises(InputError, match="mode"):
        fxpress.compile(gm, backend="aot_eager", mode="max-autotune")


class _Int8Linear(torch.nn.Module):
    """Two dynamic int8 linears, the second reading a GELU of the first as MiniLM's FFN
    does, with per-tensor input scales (what most of MiniLM's layers take) or per token.
    ``full_range``: positive weights and inputs, so that the codes reach the top of their
    range on both sides (where an int8 kernel adding pairs of u8 x s8 products in int16
    saturates)."""

    def __init__(self, act_scale=("tensor", "tensor"), full_range=False):
        super().__init__()
        from fxpress.passes.decode import int8_twin

        torch.manual_seed(0)
        w1, w2 = torch.randn(48, 32) * 0.1, torch.randn(40, 48) * 0.1
        if full_range:
            w1, w2 = w1.abs() + 0.3, w2.abs() + 0.3
        self.fc = int8_twin(w1, torch.randn(48))
        self.fc2 = int8_twin(w2, torch.randn(40))
        self.fc.act_scale, self.fc2.act_scale = act_scale
        for layer in (self.fc, self.fc2):  # the int8 product at every size (no small calls)
            layer.set_decode("int8")

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc(x)))


def _exact(layer, x, product):
    """``layer(x)`` as the compiled int8 product ``product`` (``CompiledModel.product``)
    computes it: ``x`` quantised to that product's codes, the integer product exact (float64).
    The oneDNN product takes uint8 codes over ``levels`` steps (per token: ``mid + step·x/amax``
    with ``step = levels // 2``); ``_int_mm`` the signed 255-level codes of the reference."""
    from fxpress.passes.int8 import quantize_per_tensor

    kind, levels = product
    if kind != "onednn":
        with int8_backend("reference"):
            return layer(x)
    x2 = x.reshape(-1, x.shape[-1]).float()
    if layer.smooth is not None:
        x2 = x2 * layer.smooth.reciprocal()
    if layer.act_scale == "tensor":
        q, scale, zero = quantize_per_tensor(x2, levels, signed=False)
        xd = (q.double() - zero) * scale
    else:
        step = levels // 2
        amax = torch.maximum(x2.amax(1, keepdim=True), -x2.amin(1, keepdim=True)).clamp(min=1e-12)
        q = torch.floor(x2 * (step / amax) + (step + 1.5))
        xd = (q.double() - (step + 1)) * (amax.double() / step)
    w = layer.qweight.double() * layer.scale.double().reshape(-1, 1)
    return (xd @ w.t() + layer.bias.double()).float().reshape(*x.shape[:-1], -1)


def _as_compiled(layer, x, product, small_calls=True):
    """``layer(x)`` as the compiled form computes it: a call below the layer's small-call
    size (``decode=auto``) in float from the decoded weight, as the eager layer runs it;
    else the int8 product (:func:`_exact`)."""
    if small_calls and x.numel() < layer.float_call_below():
        return torch.nn.functional.linear(x, layer.weight_float(), layer.bias)
    return _exact(layer, x, product)


def _exact_model(model, x, product):
    return _exact(model.fc2, torch.nn.functional.gelu(_exact(model.fc, x, product)), product)


def test_inductor_compiles_the_int8_path_into_onednn_exact_on_full_range_codes(monkeypatch,
                                                                               two_threads):
    """One real Inductor compile (frozen weights, dynamic shapes) of the int8 path, per
    tensor then per token, on inputs and weights whose codes reach the top of their range.

    The product is oneDNN's int8 linear on uint8 codes, its weight prepacked once at
    compile time (aten's ``_int_mm`` ran 50-60x slower than it on an AVX2 CPU without
    VNNI: MiniLM's 576x384x1536 product 237 ms against 4 ms; signed codes would run
    oneDNN's reference kernel). It equals the exact integer product of its codes: without
    VNNI, oneDNN adds pairs of u8 x s8 products in int16 and saturates, so the codes span
    127 levels there (full-range 255-level codes were off by several percent). The GELU
    that the second layer quantises is computed once, and batch 1 and batch 32 run the
    graph compiled at batch 4."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    from fxpress.passes.int8_traced import _onednn_runs

    packet = torch.ops.onednn.qlinear_pointwise
    recorded, inputs = {}, []
    for overload in ("default", "tensor"):
        def recording(*args, _original=getattr(packet, overload), **kwargs):
            inputs.append((args[0].dtype, args[0].shape[0], torch.get_num_threads()))
            return _original(*args, **kwargs)
        recorded[overload] = recording

    model = _Int8Linear(("tensor", "token"), full_range=True).eval()
    counters.clear()
    # generated here, not handed back from Inductor's cache (what this test reads is the code)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    fast = fxpress.compile(model, dispatch="compiled")  # every call compiled: its product is checked
    _, code = run_and_get_code(fast, torch.rand(4, 6, 32) * 4)
    code = "".join(code)
    assert code.count(".erf()") == 1, "GELU's erf computed more than once"
    if _onednn_runs():
        assert fast.product[0] == "onednn"
        assert code.count("fxpress.int8_linear") >= 2 and "_int_mm" not in code
        assert not re.search(r"ops\.(fxpress|onednn)\.qlinear_prepack", code), "prepacked per call"
    # every kernel forks threads only for enough work, decided per call (a small call
    # forked a team in every kernel: 16-132 ms a call on a loaded machine)
    pragmas = re.findall(r"#pragma omp parallel.*", code)
    assert pragmas and all(f">= {GRAIN})" in p for p in pragmas), pragmas
    for overload, fn in recorded.items():  # what the generated code calls
        monkeypatch.setattr(packet, overload, fn)
    # other batch sizes and lengths; the last one's products reach SERIAL_WORK
    for shape in ((4, 6, 32), (1, 3, 32), (32, 5, 32), (9, 1, 32), (32, 100, 32)):
        x = torch.rand(*shape) * 4
        with torch.no_grad():
            y = fast(x)
            exact = _exact_model(model, x, fast.product)
            eager = model(x)
        # (a code may round the other way where the first layer's output differs by float
        # rounding: one step of one input of 48, a few 1e-4 of the output)
        torch.testing.assert_close(y, exact, rtol=2e-3, atol=1e-3)
        assert torch.nn.functional.cosine_similarity(y.flatten(1), eager.flatten(1)).min() > 0.999
    assert fast.compiles == 1 and counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]
    assert {dtype for dtype, _, _ in inputs} == {torch.uint8}, inputs  # signed: reference kernel
    # a product below SERIAL_WORK multiply-adds runs on the calling thread (oneDNN forked its
    # team at any size: one row of a 64x300 layer took 32 ms on a loaded 2-core machine),
    # larger ones on the caller's threads
    from fxpress.passes.int8_traced import SERIAL_WORK

    if _onednn_runs():
        assert {(rows * 32 * 48 < SERIAL_WORK, threads) for _, rows, threads in inputs[::2]} == \
            {(True, 1), (False, 2)}, inputs


def test_the_int8_product_falls_back_to_int_mm_where_onednn_does_not_run(monkeypatch):
    """Where oneDNN's int8 linear is missing or fails (another build or architecture), or
    another kernel is forced, the traced product is aten's ``_int_mm`` on the signed codes:
    the exact integer product of the reference backend."""
    import fxpress.passes.int8_traced as traced

    model = _Int8Linear(("tensor", "token"), full_range=True).eval()
    x = torch.rand(5, 7, 32) * 4
    with torch.no_grad(), int8_backend("reference"):
        exact = model(x)
    with int8_backend("int_mm"):
        forced = fxpress.compile(model, x, backend="aot_eager", dispatch="compiled")
    # Inductor without freezing: oneDNN's lowering takes a prepacked weight only as a constant
    assert traced.choose_product(freeze=False) == ("int_mm", 255)
    monkeypatch.setattr(traced, "_ONEDNN_RUNS", [False])
    missing = fxpress.compile(model, x, backend="aot_eager", dispatch="compiled")
    for fast in (forced, missing):
        assert fast.product == ("int_mm", 255)
        for rows in (5, 1):
            with torch.no_grad():
                # (a second-layer code may round the other way: see the test above)
                torch.testing.assert_close(fast(x[:rows]), exact[:rows], rtol=2e-3, atol=1e-3)
        assert fast.compiles == 1


class _Small(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


def test_many_models_compile_in_one_process_each_with_its_own_weights():
    """Dynamo keeps at most 8 graphs per code object and, with ``fullgraph=True``, fails
    past them: models compiled from frames they share (their class's forward, an exported
    graph's input-size hook) failed from the ninth on. Each compiled model computes with
    its own weights (frozen constants of one are never another's)."""
    x = torch.randn(3, 8)
    for seed in range(10):
        model = _Small(seed).eval()
        fast = fxpress.compile(model, x, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x))
            torch.testing.assert_close(fast(x[:1]), model(x[:1]))
        assert fast.compiles == 1


class _ExpandedIds(torch.nn.Module):
    """Token types as BERT makes them: a buffer of zeros expanded to the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.types = torch.nn.Embedding(40, 16), torch.nn.Embedding(2, 16)
        self.register_buffer("type_ids", torch.zeros(1, 64, dtype=torch.long))

    def forward(self, ids):
        types = self.type_ids[:, :ids.shape[1]].expand(ids.shape[0], ids.shape[1])
        return self.emb(ids) + self.types(types)


@pytest.mark.parametrize("pipeline", ["share{bits=4}", "binarize{mode=sign,ops=[embedding]}"])
def test_packed_embeddings_read_expanded_ids_without_a_batch_1_graph(pipeline):
    """Codebook and binary embeddings unpack the rows their ids select: indices flattened
    first (an expanded tensor copies only when no size is 1) made batch 1 a second graph."""
    model = _ExpandedIds().eval()
    gm = fxpress.compress(model, pipeline, (torch.randint(0, 40, (4, 12)),), policy="warn",
                          progress=False).module
    fast = fxpress.compile(gm, torch.randint(0, 40, (4, 12)), backend="eager")
    for batch, length in ((1, 12), (1, 5), (7, 20)):
        ids = torch.randint(0, 40, (batch, length))
        with torch.no_grad():
            torch.testing.assert_close(fast(ids), gm(ids))
    assert fast.compiles == 1


def _int8_mlp():
    """(128 inputs, a 64-300-10 MLP of random weights, seed 0, with dynamic int8 linears)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(),
                                torch.nn.Linear(300, 10)).eval()
    x = torch.randn(128, 64)
    return x, fxpress.compress(model, "quantize{bits=8,activations=dynamic}", (x,),
                               calibration=[(x,)], policy="warn", progress=False).module


def test_repeated_calls_at_two_batch_sizes_run_one_graph_under_no_grad_and_inference_mode():
    """Calls as users make them, repeated, at batch 1 and batch 128: under ``no_grad``,
    under ``torch.inference_mode()`` (what benchmarks and servers use) and on tensors made
    there. Dynamo guards each input's dispatch keys, which inference mode changes: each
    kind of call compiled a graph of its own (4 graphs). An int8 layer's small-call rule
    (decode=auto: a call under 2,000 elements in float) tested the size before seeing that
    it was compiled: batch 1 compiled a second graph. Compiled, a small call runs in float
    as the eager layer runs it (the int8 product's fixed cost, and oneDNN's threads, made
    the compiled digits MLP 100x slower than eager at batch 1 on 2 threads)."""
    from torch._dynamo.utils import counters

    x, gm = _int8_mlp()
    with torch.no_grad():
        gm(x), gm(x[:1])  # eager calls first: the layers choose their path and small-call rule
    counters.clear()
    fast = fxpress.compile(gm, x, backend="eager", dispatch="compiled")
    with torch.inference_mode():
        made_there = x.clone()
    first, second = (m for m in gm.modules() if hasattr(m, "int8_forward"))
    for _ in range(3):
        for rows in (1, 128):
            with torch.no_grad():
                exact = _as_compiled(second, torch.relu(_as_compiled(first, x[:rows], fast.product)),
                                     fast.product, fast.small_calls)
                eager = gm(x[:rows])
            with torch.no_grad():
                outs = [fast(x[:rows])]
            with torch.inference_mode():
                outs += [fast(x[:rows]), fast(made_there[:rows])]
            outs.append(fast(made_there[:rows]))
            for y in outs:
                torch.testing.assert_close(y, exact, rtol=1e-4, atol=1e-5)
                if rows == 1:  # both layers' small calls, in float: what eager computes
                    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-6)
    assert fast.small_calls == (fast.product[0] == "onednn")
    assert fast.compiles == 1
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["recompiles"]


def test_calls_of_a_compiled_graph_skip_the_tracing_settings(monkeypatch):
    """A call that runs a graph compiled already patches none of torch's configs (the
    patches cost 140 us a call, more than a small model's eager forward); a call that needs
    a new graph (here: another number of dimensions) still traces with them, once."""
    import fxpress.compiled as compiled_mod

    model = _Small(0).eval()
    x = torch.randn(3, 8)
    fast = fxpress.compile(model, x, backend="eager", dispatch="compiled")
    patches = []  # the full path's settings (_serial_pass: the post-grad pass it patches in)
    original = compiled_mod._serial_pass
    monkeypatch.setattr(compiled_mod, "_serial_pass", lambda: patches.append(1) or original())
    with torch.no_grad():
        for rows in (1, 5, 3):
            torch.testing.assert_close(fast(x[:rows]), model(x[:rows]))
        assert patches == [] and fast.compiles == 1
        x3 = torch.randn(2, 4, 8)
        torch.testing.assert_close(fast(x3), model(x3))
        assert len(patches) == 1 and fast.compiles == 2
        torch.testing.assert_close(fast(x3[:1]), model(x3[:1]))
    assert len(patches) == 1 and fast.compiles == 2


@pytest.mark.parametrize("faster", ["eager", "compiled"])
def test_each_size_of_call_runs_the_faster_path_and_equals_eager(monkeypatch, faster):
    """``dispatch="fastest"`` (the default): a compiled call's fixed cost (Dynamo's guards and
    wrappers, 0.15-0.2 ms) is more than a small model's eager forward (the digits MLP's int8
    layers: 0.07 ms at batch 1; compiled, 0.25 ms). The first calls of each size run the
    compiled graph and the eager copy in turn, timed, and later calls of that size run the
    faster; sizes are told apart by their elements (powers of two) and the thread count.
    The clock here makes ``faster`` the faster path; every call equals the uncompiled
    model, whichever path ran, and the graph is compiled once."""
    import fxpress.compiled as compiled_mod

    x, gm = _int8_mlp()
    now, ran = [0.0], []
    monkeypatch.setattr(compiled_mod, "_clock", lambda: now[0])
    for path in ("eager", "compiled"):
        def timed(self, args, kwargs, _run=getattr(compiled_mod.CompiledModel, f"_run_{path}"),
                  _path=path):
            ran.append(_path)
            now[0] += 1.0 if _path == faster else 2.0
            return _run(self, args, kwargs)
        monkeypatch.setattr(compiled_mod.CompiledModel, f"_run_{path}", timed)
    fast = fxpress.compile(gm, x, backend="eager")  # the example's size is decided here
    assert fast.choices == {(torch.get_num_threads(), 14): faster}
    def check(y, eager, exact):
        if exact:  # the uncompiled copy's own result
            torch.testing.assert_close(y, eager, rtol=0, atol=0)
        assert torch.nn.functional.cosine_similarity(y, eager, dim=1).min() > 0.999

    for _ in range(2 * (compiled_mod.TRIAL_CALLS + 1)):  # every size decided by the end
        for rows in (128, 1, 4, 32):
            with torch.no_grad():
                check(fast(x[:rows]), gm(x[:rows]), False)
    threads = torch.get_num_threads()
    # elements 8192, 64, 256, 2048: 14, 7, 9 and 12 bits (5 rows, 320 elements, are 9 too)
    assert fast.choices == {(threads, n): faster for n in (14, 7, 9, 12)}
    ran.clear()
    for rows in (1, 4, 5, 32, 128):
        with torch.no_grad():
            check(fast(x[:rows]), gm(x[:rows]), faster == "eager")
    assert ran == [faster] * 5
    assert fast.compiles == 1
    # every call compiled: the trial never runs
    always = fxpress.compile(gm, x, backend="eager", dispatch="compiled")
    for rows in (1, 4, 1):
        with torch.no_grad():
            torch.testing.assert_close(always(x[:rows]), gm(x[:rows]), rtol=1e-4, atol=1e-4)
    assert always.choices == {} and always.compiles == 1
    with pytest.raises(InputError, match="dispatch"):
        fxpress.compile(gm, dispatch="eager")


def test_an_example_with_two_equal_dimensions_does_not_tie_them():
    """An example whose batch equals another dimension (8 rows of an 8-wide linear; BERT at
    32 sentences of 32 tokens): torch's duck sizing made them one symbol and guarded their
    equality, so every other batch size compiled a second graph. One graph now."""
    model = _Small(0).eval()
    fast = fxpress.compile(model, torch.randn(8, 8), backend="eager", dispatch="compiled")
    for rows in (3, 1, 8, 5):
        x = torch.randn(rows, 8)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x))
    assert fast.compiles == 1
