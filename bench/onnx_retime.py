"""A second, quicker timing of the ONNX bench's main pairs, on files kept in a folder:
fxpress's ``quantize{bits=8}`` and 4-bit exports against ORT's ``quantize_dynamic`` and
``MatMulNBitsQuantizer`` outputs of fxpress's fused fp32 export (as ``python -m bench
onnx`` makes them), for MiniLM or the bench's random BERT of one seed. Files already in
the folder are reused, so the timing can be repeated on the same models::

    python -m bench.onnx_retime DIR minilm|bert0|bert1 [rounds at batch 1] [rounds at batch 32]

Interleaved medians of wall and CPU time (``time.process_time``, every thread), 2 threads,
idle ORT workers sleeping, batch 1 = one 16-token input, batch 32 = 32 inputs padded to 128.
fxpress's exports skip pad tokens (``skip_padding``, the default); ``*_padded`` are the
same models exported with ``skip_padding=False``; ORT's quantizers read the padded fp32
export (ONNX Runtime removes no padding on CPU).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from bench.case_onnx import INT4, INT8, THREADS, _minilm_inputs, _random_bert, _random_inputs
from bench.common import interleaved_medians

NAMES = ("ort_int8", "fx_int8", "fx_int8_padded", "ort_int4", "fx_int4", "fx_int4_padded")


def _files(out: Path, which: str):
    """(b1, b32) inputs; the five .onnx files written into ``out`` where missing."""
    from examples.minilm import SENTENCES, sentence_encoder

    if which == "minilm":
        b1, b32 = _minilm_inputs(SENTENCES[32:33], 16), _minilm_inputs(SENTENCES[32:64], 128)
        calib = [_minilm_inputs(SENTENCES[:32], 64)]
    else:
        gen = torch.Generator().manual_seed(int(which[-1]))
        calib = [_random_inputs(32, 64, 2000, gen, (8, 64))]
        b32 = _random_inputs(32, 128, 2000, gen, (8, 128))
        b1 = _random_inputs(1, 16, 2000, gen)
    if all((out / f"{n}.onnx").is_file() for n in NAMES):
        return b1, b32
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import fxpress
    from fxpress.onnx_export import export_onnx

    enc = sentence_encoder() if which == "minilm" else _random_bert(int(which[-1]))
    captured = fxpress.capture(enc, calib[0])
    # ORT's quantizers start from the padded graph (ORT has no padding removal on CPU)
    export_onnx(captured, out / "fp32.onnx", b32, skip_padding=False)
    logging.disable(logging.WARNING)
    quantize_dynamic(str(out / "fp32.onnx"), str(out / "ort_int8.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8)
    q4 = MatMulNBitsQuantizer(onnx.load(str(out / "fp32.onnx")), block_size=32, is_symmetric=True,
                              accuracy_level=0)
    q4.process()
    q4.model.save_model_to_file(str(out / "ort_int4.onnx"), use_external_data_format=False)
    logging.disable(logging.NOTSET)
    for name, pipe in (("fx_int8", INT8), ("fx_int4", INT4)):
        res = fxpress.compress(captured, pipe, calibration=calib, policy="warn")
        export_onnx(res, out / f"{name}.onnx", b32)
        export_onnx(res, out / f"{name}_padded.onnx", b32, skip_padding=False)
    return b1, b32


def main(argv: list[str]) -> None:
    from fxpress.onnx_export import session

    out, which = Path(argv[0]), argv[1]
    rounds = {"1": int(argv[2]) if len(argv) > 2 else 60, "32": int(argv[3]) if len(argv) > 3 else 7}
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    b1, b32 = _files(out, which)
    sessions = {n: session(str(out / f"{n}.onnx"), threads=THREADS, spin=False) for n in NAMES}
    for batch, inputs in (("1", b1), ("32", b32)):
        fns = {}
        for n, s in sessions.items():
            feeds = {i.name: t.numpy() for i, t in zip(s.get_inputs(), inputs)}
            fns[n] = lambda s=s, feeds=feeds: s.run(None, feeds)
        cpu: dict = {}
        wall = interleaved_medians(fns, rounds[batch], cpu=cpu)
        print(f"{which} batch {batch} ({rounds[batch]} rounds): " + ", ".join(
            f"{n} {wall[n] * 1e3:.2f} ms wall / {cpu[n] * 1e3:.2f} ms CPU" for n in NAMES))
        print(f"  fxpress vs ORT (> 1: fxpress faster), wall; CPU: int8 "
              f"{wall['ort_int8'] / wall['fx_int8']:.2f}x; {cpu['ort_int8'] / cpu['fx_int8']:.2f}x, "
              f"4-bit {wall['ort_int4'] / wall['fx_int4']:.2f}x; {cpu['ort_int4'] / cpu['fx_int4']:.2f}x; "
              f"padded (skip_padding=False): int8 {cpu['ort_int8'] / cpu['fx_int8_padded']:.2f}x CPU, "
              f"4-bit {cpu['ort_int4'] / cpu['fx_int4_padded']:.2f}x CPU", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
