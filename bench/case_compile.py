"""Compiled models: ``fxpress.compile`` of compressed models vs torchao's PT2E int8 +
Inductor vs fp32, eager and compiled, side by side in one process.

Models: the real all-MiniLM-L6-v2 (batch 32: the first 32 sentences padded to the longest;
batch 1: one sentence of 16 tokens) and the digits MLP and CNN (batch 128 and 1). Every
compiled variant is compiled once with dynamic shapes and then run at the two timed shapes
and a third (MiniLM: 8 sentences of 40 tokens; digits: 37 images): "compiles" counts the
graphs Inductor built over all three and the timed calls (which run under
``torch.inference_mode()``; 1: no recompile), "cos vs eager" is the lowest
cosine between the compiled and the same model eager over the three shapes.

The PT2E baseline: torchao's ``X86InductorQuantizer`` with its default dynamic config
(int8 per-channel weights, int8 per-tensor activations quantised at run time), exported
with dynamic batch and length, calibrated on the timed batch, converted, then compiled by
Inductor with freezing - the settings ``fxpress.compile`` uses, so the two differ only in
what is compiled. torchao 0.18's quantizer fails on transformers 5's BERT when it annotates
linear+GELU fusions (a GELU partition with no output node), so the bench annotates
MiniLM's linears one by one (``_annotate_linear_unary`` off); GELU then runs as its own
op after the int8 linear, as it does in fxpress's graph.

Latencies are medians of interleaved rounds at 2 threads (every variant once per round;
``BENCH_THREADS=1``: one), CPU time of the process (``time.process_time``: every thread,
not the time spent waiting for a core on a shared machine) with the wall time beside it;
the ratios are of CPU time.
The full size adds the compile matrix: ``tests/test_compile_matrix.py``'s check (one graph
for batch 4, 1, 32 and another length, equal to eager) over every model it knows x every
weight pass x (in memory, loaded), where the test runs one or two passes per model.
"runs" is the path ``fxpress.compile``'s default dispatch chose for each timed shape
(``compiled``, or ``eager``: the uncompiled copy, where its first calls timed faster), after
the calls that choose it, made before timing.
``--tiny`` traces the digits MLP with the ``aot_eager`` backend instead of Inductor (Inductor
generates C++ for tens of seconds) and skips torchao.
"""
from __future__ import annotations

import copy
import os
import time
import warnings

import torch

from bench.common import Table, interleaved_medians
from fxpress.compiled import TRIAL_CALLS, size_key

TITLE = "Compiled models: fxpress.compile vs torchao PT2E + Inductor vs fp32 eager and compiled"
#: BENCH_THREADS=1 measures on one (a machine other jobs load: every OpenMP fork waits for
#: a time slice there, eager and compiled alike)
THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def _pt2e(model: torch.nn.Module, example: tuple, dynamic_shapes: tuple, unary: bool = True):
    """torchao's PT2E dynamic int8 of a copy of ``model`` (converted, not compiled), or
    the reason it is unavailable."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        return None, f"torchao is not installed ({e}): pip install 'fxpress[bench]'"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(copy.deepcopy(model), example, dynamic_shapes=dynamic_shapes)
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=True))
        if not unary:
            quantizer._annotate_linear_unary = lambda *a, **k: None
        prepared = prepare_pt2e(ep.module(), quantizer)
        with torch.no_grad():
            prepared(*example)
        return convert_pt2e(prepared), ""


def _compiled(model: torch.nn.Module, example: tuple, backend: str):
    import fxpress

    start = time.perf_counter()
    fast = fxpress.compile(model, example, backend=backend)
    return fast, time.perf_counter() - start


def _measure(title: str, eager: dict, compiled: dict, compile_s: dict, shapes: dict,
             third: tuple, repeat: int, baseline: str | None, notes: list[str]) -> Table:
    """One table: every variant at the timed shapes, compiled ones checked at all three."""
    fidelity = {}
    with torch.no_grad():
        ref = {k: eager["fp32 eager"](*x) for k, x in shapes.items()}
        for name, fast in compiled.items():
            own = eager[name.replace(" compiled", " eager")]
            fidelity[name] = min(_cos(fast(*x), own(*x)) for x in (*shapes.values(), third))
    variants = {**eager, **compiled}
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    load = os.getloadavg()[0]
    cpu: dict = {k: {} for k in shapes}
    try:
        # fxpress.compile's default dispatch times its first calls of each size, compiled
        # and eager in turn, and then runs the faster: those calls are made here, untimed
        with torch.no_grad():
            for x in shapes.values():
                for fast in compiled.values():
                    for _ in range(2 * (TRIAL_CALLS + 1)):
                        fast(*x)
        paths = {name: "/".join(fast.choices.get(size_key(x, {}), "?") for x in shapes.values())
                 for name, fast in compiled.items()}
        wall = {k: interleaved_medians({n: (lambda m=m, x=x: m(*x)) for n, m in variants.items()},
                                       repeat, cpu=cpu[k]) for k, x in shapes.items()}
    finally:
        torch.set_num_threads(threads)
    # the ratios are of CPU time (every thread of this process; time spent waiting for a
    # core on the shared machine does not count), the wall medians are shown beside them
    lat = cpu
    # counted after the timed calls too (under inference mode, at another thread count):
    # a graph compiled there is a recompile the table must show
    compiles = {name: fast.compiles for name, fast in compiled.items()}
    notes = [*notes, f"{THREADS} thread(s); load average {load:.1f} -> {os.getloadavg()[0]:.1f} "
             f"over the timed rounds"]
    (k1, k2) = list(shapes)
    cols = ["variant", "compile s", "compiles (3 shapes)", f"runs {k1}/{k2}", "cos vs its eager (min)",
            f"cos vs fp32 ({k1}, min)", f"cpu ms {k1}", f"wall ms {k1}", f"x fp32 eager {k1}",
            f"cpu ms {k2}", f"wall ms {k2}", f"x fp32 eager {k2}"]
    if baseline:
        cols += [f"x {baseline} {k1}", f"x {baseline} {k2}"]
    t = Table(title, cols)
    for name, m in variants.items():
        with torch.no_grad():
            cos_fp32 = _cos(m(*shapes[k1]), ref[k1])
        row = [name, round(compile_s[name], 1) if name in compile_s else "-",
               compiles.get(name, "-"), paths.get(name, "-"),
               round(fidelity[name], 5) if name in fidelity else "-",
               round(cos_fp32, 4), round(lat[k1][name] * 1e3, 2), round(wall[k1][name] * 1e3, 2),
               round(lat[k1]["fp32 eager"] / lat[k1][name], 2), round(lat[k2][name] * 1e3, 2),
               round(wall[k2][name] * 1e3, 2), round(lat[k2]["fp32 eager"] / lat[k2][name], 2)]
        if baseline:
            row += [round(lat[k1][baseline] / lat[k1][name], 2),
                    round(lat[k2][baseline] / lat[k2][name], 2)]
        t.add(*row)
    t.notes.extend(notes)
    return t


def _minilm(size: str) -> Table:
    import fxpress
    from examples.minilm import SENTENCES, batches, sentence_encoder, tokenize, tokenizer
    from torch.export import Dim

    def padded(sentences, length):
        enc = tokenizer()(list(sentences), padding="max_length", truncation=True,
                          max_length=length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    enc = sentence_encoder()
    b32, b1 = tokenize(SENTENCES[:32]), padded(SENTENCES[32:33], 16)
    third = padded(SENTENCES[40:48], 40)
    gm = fxpress.capture(enc, b32)
    calib = batches(32, SENTENCES[:32])
    pipelines = {"fxpress int8": "quantize{bits=8}"}
    if size == "full":
        pipelines["fxpress 4-bit g64"] = "quantize{bits=4,granularity=group,group_size=64,scheme=affine}"
        pipelines["fxpress share 4-bit"] = "share{bits=4}"
    eager = {"fp32 eager": enc}
    for label, text in pipelines.items():
        eager[f"{label} eager"] = fxpress.compress(gm, text, calibration=calib, policy="warn").module
    compiled, compile_s, notes = {}, {}, []
    batch, length = Dim("batch", min=1, max=1024), Dim("length", min=2, max=512)
    start = time.perf_counter()
    qm, why = _pt2e(enc, b32, ({0: batch, 1: length}, {0: batch, 1: length}), unary=False)
    if qm is None:
        notes.append(why)
    else:
        eager["torchao PT2E int8 eager"] = qm
        quantize_s = time.perf_counter() - start
        compiled["torchao PT2E int8 compiled"], s = _compiled(qm, b32, "inductor")
        compile_s["torchao PT2E int8 compiled"] = s
        notes.append(f"torchao: export + prepare + calibrate + convert took {quantize_s:.1f} s "
                     f"before compiling")
    for label in ("fp32", *pipelines):
        compiled[f"{label} compiled"], compile_s[f"{label} compiled"] = _compiled(
            eager[f"{label} eager"], b32, "inductor")
    baseline = "torchao PT2E int8 compiled" if qm is not None else None
    return _measure("all-MiniLM-L6-v2 (pretrained): batch 32 (32 sentences, padded to the "
                    "longest) and batch 1 (one sentence, 16 tokens)", eager, compiled, compile_s,
                    {"b32": b32, "b1": b1}, third, {"full": 15, "quick": 7}[size], baseline, notes)


class _Hidden(torch.nn.Module):
    """A transformers encoder's last hidden state as one tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


def _tiny_bert(size: str, seed: int = 0) -> Table:
    """A BERT of random weights (transformers config: 4 layers, hidden 256, 4 heads, FFN
    1024, ``seed``): batch 32 x 32 tokens and batch 1 x 16, random ids."""
    import fxpress
    from torch.export import Dim
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=2000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=128)
    model = _Hidden(BertModel(cfg, add_pooling_layer=False)).eval()
    g = torch.Generator().manual_seed(seed)

    def ids(batch, length):
        return torch.randint(0, 2000, (batch, length), generator=g), torch.ones(batch, length, dtype=torch.long)

    b32, b1, third = ids(32, 32), ids(1, 16), ids(8, 40)
    calib = [ids(32, 32) for _ in range(2)]
    eager = {"fp32 eager": model,
             "fxpress int8 eager": fxpress.compress(model, "quantize{bits=8}", b32, calibration=calib,
                                                    policy="warn", progress=False).module}
    compiled, compile_s, notes = {}, {}, []
    batch, length = Dim("batch", min=1, max=1024), Dim("length", min=2, max=128)
    qm, why = _pt2e(model, b32, ({0: batch, 1: length}, {0: batch, 1: length}), unary=False)
    if qm is None:
        notes.append(why)
    else:
        eager["torchao PT2E int8 eager"] = qm
        compiled["torchao PT2E int8 compiled"], compile_s["torchao PT2E int8 compiled"] = \
            _compiled(qm, b32, "inductor")
    for label in ("fp32", "fxpress int8"):
        compiled[f"{label} compiled"], compile_s[f"{label} compiled"] = _compiled(
            eager[f"{label} eager"], b32, "inductor")
    baseline = "torchao PT2E int8 compiled" if qm is not None else None
    return _measure(f"BERT, random weights (4 layers, hidden 256, seed {seed}): batch 32 x 32 "
                    f"tokens and batch 1 x 16", eager, compiled, compile_s, {"b32": b32, "b1": b1},
                    third, {"full": 15, "quick": 9}[size], baseline, notes)


def _digits(size: str, kind: str) -> Table:
    import fxpress
    from examples import digits

    data = digits.digits_data()
    if kind == "mlp":
        model = digits.trained_mlp(hidden=(32,), epochs=5) if size == "tiny" else digits.trained_mlp()
    else:
        model = digits.trained_cnn()
    model.eval()
    x = data.x_test if kind == "mlp" else data.x_test.view(-1, 1, 8, 8)
    big, one, third = (x[:128],), (x[:1],), (x[128:165],)
    calib = [(x[i:i + 128],) for i in range(0, 256, 128)]
    eager = {"fp32 eager": model,
             "fxpress int8 eager": fxpress.compress(model, "quantize{bits=8,activations=dynamic}",
                                                    big, calibration=calib, policy="warn").module}
    backend = "aot_eager" if size == "tiny" else "inductor"
    compiled, compile_s, notes = {}, {}, []
    baseline = None
    if size != "tiny":
        from torch.export import Dim

        qm, why = _pt2e(model, big, ({0: Dim("batch", min=1, max=4096)},))
        if qm is None:
            notes.append(why)
        else:
            eager["torchao PT2E int8 eager"] = qm
            compiled["torchao PT2E int8 compiled"], compile_s["torchao PT2E int8 compiled"] = \
                _compiled(qm, big, backend)
            baseline = "torchao PT2E int8 compiled"
    for label in ("fp32", "fxpress int8"):
        compiled[f"{label} compiled"], compile_s[f"{label} compiled"] = _compiled(
            eager[f"{label} eager"], big, backend)
    if backend != "inductor":
        notes.append(f"compiled with backend={backend!r} (--tiny): traced, no code generated")
    name = "64-300-100-10 MLP" if kind == "mlp" and size != "tiny" else \
        "64-32-10 MLP" if kind == "mlp" else "CNN"
    return _measure(f"digits {name}: batch 128 and batch 1", eager, compiled, compile_s,
                    {"b128": big, "b1": one}, third, {"full": 25, "quick": 9, "tiny": 1}[size],
                    baseline, notes)


#: the matrix's columns: every weight-rewriting built-in pass (and the binarize modes)
MATRIX_PASSES = {
    "prune": "prune{sparsity=0.5}", "int8": "quantize{bits=8}",
    "4-bit g16": "quantize{bits=4,granularity=group,group_size=16}", "share 4": "share{bits=4}",
    "sign": "binarize{mode=sign}", "ternary": "binarize{mode=ternary}", "pow2": "binarize{mode=pow2}",
    "small": "small", "fold_bn + int8": "fold_bn,quantize{bits=8}",
    "prune + int8": "prune{sparsity=0.5},quantize{bits=8}",
}


def _matrix() -> Table:
    """``tests/test_compile_matrix.py``'s check over the whole product: every model x
    every pass x (in memory, loaded); a cell gives the graphs compiled for batch 4, 1, 32
    and another length (1: no recompile), "fail" with the error otherwise."""
    import tempfile

    from tests.test_compile_matrix import CELLS, GRAPHS, compile_cell

    t = Table("fxpress.compile matrix (Dynamo whole graph, backend='eager'): graphs compiled "
              "for batch 4, 1, 32 and another length, in memory / loaded",
              ["model", *MATRIX_PASSES])
    for name in CELLS:
        row = [name]
        for text in MATRIX_PASSES.values():
            cell = []
            for form in ("memory", "loaded"):
                with tempfile.TemporaryDirectory() as folder:
                    try:
                        cell.append(str(compile_cell(name, text, form, folder)))
                    except Exception as e:  # noqa: BLE001 - a cell reports what failed
                        cell.append(f"fail ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            row.append(" / ".join(cell))
        t.add(*row)
    t.notes.append(f"expected: 1 graph, except {GRAPHS} (torch's conv kernel choice per batch "
                   f"range); every cell also equals the uncompiled graph at the four shapes")
    return t


def run(size: str) -> list[Table]:
    if size == "tiny":
        return [_digits(size, "mlp")]
    tables = [_minilm(size), _tiny_bert(size), _digits(size, "mlp")]
    if size == "full":
        tables += [_digits(size, "cnn"), _matrix()]
    return tables
