"""ONNX export: fxpress's compressed MiniLM in ONNX Runtime vs ORT's own quantizers.

Side by side in one process, 2 threads everywhere (torch and ORT), medians of interleaved
rounds: torch fp32 eager, ORT fp32 (fxpress's export of the uncompressed graph), ORT's own
``quantize_dynamic`` (int8, per channel) and ``MatNBitsQuantizer`` (4-bit, block 32) of that
fp32 model, and fxpress's ``quantize{bits=8}`` and ``quantize{bits=4,granularity=group,
group_size=32}`` exported by :func:`fxpress.export_onnx`. Batch 1 is one sentence of 16
tokens, batch 32 is 32 sentences padded to 128. Fidelity: cosine of the sentence embeddings
to torch fp32's, on sentences the calibration never saw (mean and min).
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Table, interleaved_medians, mb

TITLE = "ONNX export: fxpress-compressed MiniLM in ONNX Runtime vs ORT's own quantizers"
THREADS = 2


def _inputs(sentences: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from examples.minilm import tokenizer

    enc = tokenizer()(list(sentences), padding="max_length", truncation=True, max_length=length,
                      return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _cosines(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    c = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    return float(c.mean()), float(c.min())


def run(size: str) -> list[Table]:
    import fxpress
    from examples.minilm import SENTENCES, sentence_encoder
    from fxpress.onnx_export import export_onnx, session

    try:
        import onnxruntime  # noqa: F401
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:
        t = Table("skipped", ["reason"])
        t.add("onnxruntime is not installed: pip install 'fxpress[onnx]'")
        return [t]
    import onnx

    torch.set_num_threads(THREADS)
    n_calib = {"full": 32, "quick": 32, "tiny": 4}[size]
    n_eval = {"full": 40, "quick": 32, "tiny": 4}[size]
    repeat = {"full": 15, "quick": 7, "tiny": 1}[size]
    long = 128 if size != "tiny" else 32
    calib = [_inputs(SENTENCES[:n_calib], 64)]
    held_out = SENTENCES[n_calib:n_calib + n_eval]
    b32 = _inputs(held_out[:32], long)
    b1 = _inputs(held_out[:1], 16)
    enc = sentence_encoder()
    with torch.inference_mode():
        ref = torch.cat([enc(*_inputs(held_out[i:i + 32], long)) for i in range(0, len(held_out), 32)])

    tmp = Path(tempfile.mkdtemp(prefix="fxpress-onnx-bench-"))
    paths: dict[str, Path] = {}
    notes = []
    base = fxpress.capture(enc, calib[0])
    t0 = time.perf_counter()
    fp32 = export_onnx(base, tmp / "fp32.onnx", b32)
    notes.append(f"fp32 export {time.perf_counter() - t0:.1f} s")
    paths["ORT fp32"] = fp32.path
    t0 = time.perf_counter()
    quantize_dynamic(str(fp32.path), str(tmp / "ort_int8.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8)
    notes.append(f"ORT quantize_dynamic {time.perf_counter() - t0:.1f} s")
    paths["ORT quantize_dynamic int8"] = tmp / "ort_int8.onnx"
    t0 = time.perf_counter()
    q4 = MatMulNBitsQuantizer(onnx.load(str(fp32.path)), block_size=32, is_symmetric=True)
    q4.process()
    q4.model.save_model_to_file(str(tmp / "ort_int4.onnx"), use_external_data_format=False)
    notes.append(f"ORT MatMulNBitsQuantizer {time.perf_counter() - t0:.1f} s")
    paths["ORT MatMulNBits 4-bit (block 32)"] = tmp / "ort_int4.onnx"
    for label, pipe in [("fxpress quantize{bits=8}", "quantize{bits=8}"),
                        ("fxpress quantize{bits=4,group_size=32}",
                         "quantize{bits=4,granularity=group,group_size=32}")]:
        t0 = time.perf_counter()
        # The bench reports cosine itself; the pass's own tolerance must not stop the
        # measurement (tiny runs calibrate on 4 sentences).
        res = fxpress.compress(enc, pipe, calibration=calib, policy="warn")
        out = export_onnx(res, tmp / f"{label.split('{')[1][:6]}.onnx", b32)
        notes.append(f"{pipe}: compress + export {time.perf_counter() - t0:.1f} s; onnxruntime vs "
                     f"fxpress at batch 32: rel_l2 {out.check['rel_l2']:.2e}, min cosine "
                     f"{out.check['cosine_min']:.6f}")
        paths[label] = out.path

    sessions = {k: session(str(p), threads=THREADS) for k, p in paths.items()}

    def ort_run(s, inputs):
        names = [i.name for i in s.get_inputs()]
        return lambda: s.run(None, {n: t.numpy() for n, t in zip(names, inputs)})

    rows = {}
    for label, s in sessions.items():
        outs = [torch.as_tensor(ort_run(s, _inputs(held_out[i:i + 32], long))()[0])
                for i in range(0, len(held_out), 32)]
        rows[label] = _cosines(torch.cat(outs), ref)
    timings = {}
    for batch, inputs in (("1", b1), ("32", b32)):
        fns = {"torch fp32 eager": (lambda x=inputs: enc(*x))}
        fns.update({k: ort_run(s, inputs) for k, s in sessions.items()})
        with torch.inference_mode():
            timings[batch] = interleaved_medians(fns, repeat)
    table = Table(f"MiniLM, {THREADS} threads, medians of {repeat} interleaved rounds; cosine on "
                  f"{len(held_out)} held-out sentences",
                  ["variant", "file", "batch 1 ms", "x torch", "batch 32 ms", "x torch",
                   "cosine mean", "cosine min"])
    t_ref = {b: timings[b]["torch fp32 eager"] for b in timings}
    table.add("torch fp32 eager", "", timings["1"]["torch fp32 eager"] * 1e3, 1.0,
              timings["32"]["torch fp32 eager"] * 1e3, 1.0, 1.0, 1.0)
    for label in sessions:
        table.add(label, mb(os.path.getsize(paths[label])), timings["1"][label] * 1e3,
                  t_ref["1"] / timings["1"][label], timings["32"][label] * 1e3,
                  t_ref["32"] / timings["32"][label], *rows[label])
    table.notes += notes
    table.notes.append("speed vs ORT's own: int8 batch 1 "
                       f"{timings['1']['ORT quantize_dynamic int8'] / timings['1']['fxpress quantize{bits=8}']:.2f}x, "
                       f"batch 32 {timings['32']['ORT quantize_dynamic int8'] / timings['32']['fxpress quantize{bits=8}']:.2f}x; "
                       "4-bit batch 1 "
                       f"{timings['1']['ORT MatMulNBits 4-bit (block 32)'] / timings['1']['fxpress quantize{bits=4,group_size=32}']:.2f}x, "
                       f"batch 32 {timings['32']['ORT MatMulNBits 4-bit (block 32)'] / timings['32']['fxpress quantize{bits=4,group_size=32}']:.2f}x "
                       "(> 1: fxpress faster)")
    return [table]
