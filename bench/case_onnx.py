"""ONNX export: fxpress's compressed encoders in ONNX Runtime vs ORT's own quantizers.

Side by side in one process, 2 threads everywhere (torch and ORT), medians of interleaved
rounds, at batch 1 (one sentence of 16 tokens) and batch 32 (32 sentences padded to 128):
torch fp32 eager, ORT fp32 (fxpress's export of the uncompressed graph, with its fusions:
attention as MultiHeadAttention, ONNX Runtime's LayerNorm / Gelu fusions), ORT's own
``quantize_dynamic`` (int8, per channel) and ``MatMulNBitsQuantizer`` (4-bit, block 32) of that fp32 model, and fxpress's
``quantize{bits=8}`` (its defaults: per layer the cheapest of per-tensor, SmoothQuant-ed
per-tensor and per-token input scaling that is accurate enough), ``quantize{bits=8,
act_scale=tensor}`` (ORT's own scheme: per-tensor inputs, per-channel weights) and
``quantize{bits=4,granularity=group,group_size=32,embeddings=false}`` (embeddings stay
float, as ORT's MatMulNBits leaves them; MatMulNBits' default accuracy_level 0, float),
exported by :func:`fxpress.export_onnx` (the same fusions, and its default
``skip_padding``: per-token layers on the real tokens only; the ``pad tokens kept`` row
is int8 with ``skip_padding=False``, ORT's own graphs keep every token), and (not at the tiny size)
the 4-bit pair at accuracy_level 4 (MatMulNBits' int8-activation kernel), and fp32, ORT's int8 and fxpress's int8 again without fusions
(``fuse=False``). Every ORT variant runs the same session options. Each call's wall time
and CPU time (``time.process_time``, every thread) are measured; the CPU time leaves out
waiting for a core, so its ratios hold on a machine that other jobs load. Fidelity:
cosine of the sentence embeddings to torch fp32's (mean and min) on inputs the
calibration never saw; "ORT vs fxpress" is the export check (relative L2 and min
cosine of ONNX Runtime's embeddings to fxpress's own int8/4-bit run at batch 32).

Models: the pretrained all-MiniLM-L6-v2 (real sentences) and a random BERT (hidden 256,
4 layers, random token ids and lengths) on seeds 0 and 1: weights, calibration and
held-out inputs all drawn from the seed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import Table, interleaved_medians, mb

TITLE = "ONNX export: fxpress-compressed encoders in ONNX Runtime vs ORT's own quantizers"
THREADS = 2
INT8 = "quantize{bits=8}"
# ORT's MatMulNBitsQuantizer quantizes MatMul weights only: fxpress's 4-bit leaves the
# embeddings in float too, like with like
INT4 = "quantize{bits=4,granularity=group,group_size=32,embeddings=false}"
# per-tensor activations everywhere, no smoothing: the scheme and graph of ORT's own int8
INT8_TENSOR = "quantize{bits=8,act_scale=tensor}"
ACC4 = "accuracy_level=4"
ROWS = [("ORT fp32", None), ("ORT quantize_dynamic int8", None), ("fxpress int8", INT8),
        ("fxpress int8 act_scale=tensor", INT8_TENSOR),
        # skip_padding=False: every token runs, pad tokens too (ORT's own graphs do)
        ("fxpress int8, pad tokens kept", INT8),
        ("ORT MatMulNBits 4-bit (block 32)", None), ("fxpress 4-bit (group 32)", INT4),
        # MatMulNBits' int8-activation kernel (accuracy_level=4) on both sides
        (f"ORT MatMulNBits 4-bit (block 32), {ACC4}", None), (f"fxpress 4-bit (group 32), {ACC4}", INT4),
        # the same without fusions (export_onnx(fuse=False): attention as plain ops)
        ("ORT fp32, unfused", None), ("ORT quantize_dynamic int8, unfused", None),
        ("fxpress int8, unfused", INT8)]


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime.quantization logs every node at INFO on the root logger."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _minilm_inputs(sentences: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from examples.minilm import tokenizer

    enc = tokenizer()(list(sentences), padding="max_length", truncation=True, max_length=length,
                      return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _random_inputs(n: int, length: int, vocab: int, gen: torch.Generator,
                   lengths: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of random token ids, random lengths in ``lengths`` (default: full),
    padded to ``length`` (id 0, mask 0)."""
    lo, hi = lengths or (length, length)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    real = torch.randint(lo, hi + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None, :] < real[:, None]).long()
    return ids * mask, mask


def _cosines(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    c = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    return float(c.mean()), float(c.min())


def _case(title: str, enc, calib: list, held_out: list, b1: tuple, b32: tuple, repeat: dict,
          tmp: Path, unfused: bool = True) -> Table:
    """One model: export and quantize every variant (``unfused``: also without fusions),
    then cosine and interleaved timings."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import fxpress
    from fxpress.onnx_export import export_onnx, session

    with torch.inference_mode():
        ref = torch.cat([enc(*b) for b in held_out])
    paths: dict[str, Path] = {}
    notes, checks = [], {}
    t0 = time.perf_counter()
    captured = fxpress.capture(enc, calib[0])
    # ORT's own side: the padded graph (ONNX Runtime removes no padding on CPU)
    fp32 = export_onnx(captured, tmp / "fp32.onnx", b32, skip_padding=False)
    paths["ORT fp32"] = fp32.path
    if unfused:
        paths["ORT fp32, unfused"] = export_onnx(captured, tmp / "fp32_unfused.onnx", b32,
                                                 fuse=False, check=False).path
    notes.append(f"fp32 exports {time.perf_counter() - t0:.1f} s (ORT vs torch at batch 32: "
                 f"rel_l2 {fp32.check['rel_l2']:.1e})")
    with _quiet_logging():
        t0 = time.perf_counter()
        for suffix in ("", ", unfused") if unfused else ("",):
            quantize_dynamic(str(paths["ORT fp32" + suffix]), str(tmp / f"ort_int8{suffix[2:]}.onnx"),
                             per_channel=True, weight_type=QuantType.QInt8)
            paths["ORT quantize_dynamic int8" + suffix] = tmp / f"ort_int8{suffix[2:]}.onnx"
        for level in (0, 4) if unfused else (0,):
            q4 = MatMulNBitsQuantizer(onnx.load(str(fp32.path)), block_size=32, is_symmetric=True,
                                      accuracy_level=level)
            q4.process()
            q4.model.save_model_to_file(str(tmp / f"ort_int4_{level}.onnx"), use_external_data_format=False)
            paths["ORT MatMulNBits 4-bit (block 32)" + (f", {ACC4}" if level else "")] = \
                tmp / f"ort_int4_{level}.onnx"
        notes.append(f"ORT quantize_dynamic + MatMulNBitsQuantizer {time.perf_counter() - t0:.1f} s")
    compressed: dict[str, Any] = {}
    # the tiny size (code paths only, in the smoke test) leaves out the repeats of a path
    # (act_scale=tensor is int8's export path with another option: tests/test_onnx_export.py
    # exports it into ORT)
    rows = [r for r in ROWS if unfused or not (r[0].endswith(("unfused", "kept")) or r[0].endswith(ACC4)
                                               or r[1] == INT8_TENSOR)]
    for label, pipe in rows:
        if pipe is None:
            continue
        t0 = time.perf_counter()
        # the bench reports cosine itself: the pass's own tolerance must not stop it; the
        # graph captured above is compressed (compress() captures a module again every call)
        res = compressed.get(pipe) or fxpress.compress(captured, pipe, calibration=calib,
                                                           policy="warn")
        compressed[pipe] = res
        out = export_onnx(res, tmp / f"fxpress{len(paths)}.onnx", b32,
                          fuse=not label.endswith("unfused"), accuracy_level=4 if ACC4 in label else 0,
                          skip_padding=not label.endswith("kept"))
        paths[label] = out.path
        checks[label] = out.check
        notes.append(f"{label} ({pipe}): compress + export {time.perf_counter() - t0:.1f} s")

    # worker threads that spin after a run would take the cores from the next variant of
    # the interleaved rounds (the same options for every variant)
    sessions = {k: session(str(p), threads=THREADS, spin=False) for k, p in paths.items()}

    def ort_run(s, inputs):
        names = [i.name for i in s.get_inputs()]
        feeds = {n: t.numpy() for n, t in zip(names, inputs)}
        return lambda: s.run(None, feeds)

    fidelity = {k: _cosines(torch.cat([torch.as_tensor(ort_run(s, b)()[0]) for b in held_out]), ref)
                for k, s in sessions.items()}
    timings: dict[str, dict] = {}
    cpu: dict[str, dict] = {"1": {}, "32": {}}  # CPU seconds of the same calls
    for batch, inputs in (("1", b1), ("32", b32)):
        fns = {"torch fp32 eager": (lambda x=inputs: enc(*x))}
        fns.update({k: ort_run(s, inputs) for k, s in sessions.items()})
        timings[batch] = interleaved_medians(fns, repeat[batch], cpu=cpu[batch])
    table = Table(f"{title}: {THREADS} threads, medians of {repeat['1']} (batch 1) / "
                  f"{repeat['32']} (batch 32) interleaved rounds; cosine on "
                  f"{sum(len(b[0]) for b in held_out)} held-out inputs",
                  ["variant", "file", "batch 1 ms", "x torch", "batch 32 ms", "x torch",
                   "batch 1 CPU ms", "batch 32 CPU ms", "cosine mean", "cosine min", "ORT vs fxpress rel_l2", "ORT vs fxpress cos min"])
    t_ref = {b: timings[b]["torch fp32 eager"] for b in timings}
    table.add("torch fp32 eager", "", t_ref["1"] * 1e3, 1.0, t_ref["32"] * 1e3, 1.0,
              cpu["1"]["torch fp32 eager"] * 1e3, cpu["32"]["torch fp32 eager"] * 1e3, "1", "1", "", "")
    for label, _ in rows:
        check = checks.get(label)
        table.add(label, mb(os.path.getsize(paths[label])), timings["1"][label] * 1e3,
                  t_ref["1"] / timings["1"][label], timings["32"][label] * 1e3,
                  t_ref["32"] / timings["32"][label], cpu["1"][label] * 1e3, cpu["32"][label] * 1e3,
                  *(f"{c:.5f}" for c in fidelity[label]),
                  f"{check['rel_l2']:.1e}" if check else "", f"{check['cosine_min']:.5f}" if check else "")
    table.notes += notes

    def vs(ours: str, theirs: str, batch: str, clock: dict | None = None) -> str:
        t = (clock or timings)[batch]
        return f"{t[theirs] / t[ours]:.2f}x"

    table.notes.append(
        f"speed vs ORT's own, both attention-fused (> 1: fxpress faster): int8 batch 1 "
        f"{vs('fxpress int8', 'ORT quantize_dynamic int8', '1')}, batch 32 "
        f"{vs('fxpress int8', 'ORT quantize_dynamic int8', '32')}"
        + (f" (act_scale=tensor: {vs('fxpress int8 act_scale=tensor', 'ORT quantize_dynamic int8', '1')}, "
           f"{vs('fxpress int8 act_scale=tensor', 'ORT quantize_dynamic int8', '32')})"
           if 'fxpress int8 act_scale=tensor' in paths else "") + "; 4-bit batch 1 "
        f"{vs('fxpress 4-bit (group 32)', 'ORT MatMulNBits 4-bit (block 32)', '1')}, batch 32 "
        f"{vs('fxpress 4-bit (group 32)', 'ORT MatMulNBits 4-bit (block 32)', '32')}")
    q8, o8 = "fxpress int8", "ORT quantize_dynamic int8"
    q4, o4 = "fxpress 4-bit (group 32)", "ORT MatMulNBits 4-bit (block 32)"
    table.notes.append(
        f"the same in CPU time (all threads; waiting for a core does not count, so it holds on a "
        f"loaded machine where wall time does not): int8 batch 1 {vs(q8, o8, '1', cpu)}, batch 32 "
        f"{vs(q8, o8, '32', cpu)}; 4-bit batch 1 {vs(q4, o4, '1', cpu)}, batch 32 {vs(q4, o4, '32', cpu)}"
        + (f"; 4-bit both at {ACC4}: {vs(q4 + ', ' + ACC4, o4 + ', ' + ACC4, '1', cpu)}, "
           f"{vs(q4 + ', ' + ACC4, o4 + ', ' + ACC4, '32', cpu)}" if unfused else ""))
    if unfused:
        ours, ort = f"fxpress 4-bit (group 32), {ACC4}", f"ORT MatMulNBits 4-bit (block 32), {ACC4}"
        table.notes.append(f"4-bit both at {ACC4}: batch 1 {vs(ours, ort, '1')}, batch 32 {vs(ours, ort, '32')}")
    if unfused:
        ort, ours = "ORT quantize_dynamic int8", "fxpress int8"
        table.notes.append(
            f"both unfused: int8 batch 1 {vs(ours + ', unfused', ort + ', unfused', '1')}, batch 32 "
            f"{vs(ours + ', unfused', ort + ', unfused', '32')}; the fusions' own speed-up (fused vs "
            f"unfused, batch 1 / 32): ORT int8 {vs(ort, ort + ', unfused', '1')} / "
            f"{vs(ort, ort + ', unfused', '32')}, fxpress int8 {vs(ours, ours + ', unfused', '1')} / "
            f"{vs(ours, ours + ', unfused', '32')}")
    return table


def _random_bert(seed: int, hidden: int = 256, layers: int = 4):
    from bench.models import random_bert

    return random_bert(seed, hidden, layers, vocab=2000)


def run(size: str) -> list[Table]:
    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import quantize_dynamic  # noqa: F401
    except ImportError:
        t = Table("skipped", ["reason"])
        t.add("onnxruntime is not installed: pip install 'fxpress[onnx]'")
        return [t]
    torch.set_num_threads(THREADS)
    repeat = {"full": {"1": 40, "32": 7}, "quick": {"1": 15, "32": 3},
              "tiny": {"1": 1, "32": 1}}[size]
    long = 128 if size != "tiny" else 32
    tmp = Path(tempfile.mkdtemp(prefix="fxpress-onnx-bench-"))
    try:
        return _run_cases(size, repeat, long, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a few hundred MB of models


def _run_cases(size: str, repeat: dict, long: int, tmp: Path) -> list[Table]:
    from examples.minilm import SENTENCES, sentence_encoder

    tables = []
    if size != "tiny":  # MiniLM's exports take minutes: tiny runs the random BERT only
        n_calib = 32
        held = SENTENCES[n_calib:n_calib + 40 if size == "full" else n_calib + 32]
        enc = sentence_encoder()
        (tmp / "minilm").mkdir()
        tables.append(_case(
            "all-MiniLM-L6-v2 (pretrained)", enc, [_minilm_inputs(SENTENCES[:n_calib], 64)],
            [_minilm_inputs(held[i:i + 32], long) for i in range(0, len(held), 32)],
            _minilm_inputs(held[:1], 16), _minilm_inputs(held[:32], long), repeat, tmp / "minilm"))
    for seed in ((0, 1) if size == "full" else (0,)):
        gen = torch.Generator().manual_seed(seed)
        hidden, layers = (64, 1) if size == "tiny" else (256, 4)  # tiny: the code paths only
        enc = _random_bert(seed, hidden, layers)
        calib = [_random_inputs(32, 64, 2000, gen, (8, 64))]
        held = [_random_inputs(32, long, 2000, gen, (8, long)) for _ in range(2)]
        b1 = _random_inputs(1, 16, 2000, gen)
        (tmp / f"bert{seed}").mkdir()
        tables.append(_case(f"random BERT (hidden {hidden}, {layers} layers), seed {seed}", enc, calib, held,
                            b1, held[0], repeat, tmp / f"bert{seed}", unfused=size != "tiny"))
    return tables
