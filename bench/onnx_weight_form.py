"""The int8 export's weight form on this CPU: fxpress's export (uint8 weights, code + 128,
zero point 128: exact on every CPU) against the same file with int8 weights (the form
before round 22, whose uint8 x int8 products saturate on x86 CPUs without VNNI)::

    python -m bench.onnx_weight_form minilm|bert0|bert1 [rounds at batch 1] [rounds at batch 32]

One ``quantize{bits=8}`` model exported once (pad tokens skipped, the default); the int8
file is made from it by moving the weights back by 128 and dropping their zero point. Prints
each file's relative L2 error against fxpress's exact integer product (its reference
kernel, 255 input levels) and against fxpress's own kernels on this CPU at batch 32, and
interleaved medians of wall and CPU time (``time.process_time``), 2 threads, batch 1 = one
16-token input, batch 32 = 32 inputs padded to 128.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from bench.case_onnx import INT8, THREADS, _minilm_inputs, _random_bert, _random_inputs
from bench.common import interleaved_medians


def signed_weights(model):
    """A copy of an exported ONNX model with its uint8 weights of zero point 128 as int8
    codes without zero point (the export's form before round 22)."""
    import onnx
    from onnx import numpy_helper

    from fxpress.onnx_lowering import U8_WEIGHT_ZERO

    m = onnx.ModelProto()
    m.CopyFrom(model)
    zp = "u8_weight_zero_point"
    weights = set()
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            if name == zp:
                weights.add(n.input[1])
                n.input[i] = ""
        while n.input and n.input[-1] == "":
            n.input.pop()
    inits = {i.name: i for i in m.graph.initializer}
    for name in weights:
        a = numpy_helper.to_array(inits[name]).astype(np.int16) - U8_WEIGHT_ZERO
        inits[name].CopyFrom(numpy_helper.from_array(a.astype(np.int8), name))
    keep = [i for i in m.graph.initializer if i.name != zp]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def main(argv: list[str]) -> None:
    import fxpress
    from examples.minilm import SENTENCES, sentence_encoder
    from fxpress.onnx_export import export_onnx, session
    from fxpress.passes.decode import int8_kernels_only
    from fxpress.passes.int8 import int8_backend
    from fxpress.passes.verify import compare

    which = argv[0]
    rounds = {"1": int(argv[1]) if len(argv) > 1 else 40, "32": int(argv[2]) if len(argv) > 2 else 5}
    torch.set_num_threads(THREADS)
    if which == "minilm":
        b1, b32 = _minilm_inputs(SENTENCES[32:33], 16), _minilm_inputs(SENTENCES[32:64], 128)
        calib = [_minilm_inputs(SENTENCES[:32], 64)]
        enc = sentence_encoder()
    else:
        gen = torch.Generator().manual_seed(int(which[-1]))
        calib = [_random_inputs(32, 64, 2000, gen, (8, 64))]
        b32 = _random_inputs(32, 128, 2000, gen, (8, 128))
        b1 = _random_inputs(1, 16, 2000, gen)
        enc = _random_bert(int(which[-1]))
    res = fxpress.compress(fxpress.capture(enc, calib[0]), INT8, calibration=calib, policy="warn")
    out = export_onnx(res, None, b32)
    models = {"u8u8": out.model, "u8s8": signed_weights(out.model)}
    sessions = {k: session(m, threads=THREADS, spin=False) for k, m in models.items()}
    with torch.no_grad(), int8_kernels_only():
        fp32 = enc(*b32)
        own = res.module(*b32)
        with int8_backend("reference"):
            exact = res.module(*b32)

    def against(got):
        m = compare([got], [fp32], top1=False)
        return (f"vs fxpress exact product {compare([got], [exact], top1=False).rel_l2:.2e}, "
                f"vs fxpress's kernels here {compare([got], [own], top1=False).rel_l2:.2e}, "
                f"vs fp32 {m.rel_l2:.2e} (cosine mean {m.cosine:.5f} / min {m.cosine_min:.5f})")

    print(f"{which} fxpress's kernels here: {against(own)}")
    print(f"{which} fxpress exact product: {against(exact)}")
    for k, s in sessions.items():
        got = torch.as_tensor(s.run(None, {i.name: t.numpy() for i, t in zip(s.get_inputs(), b32)})[0])
        print(f"{which} ORT {k}: {against(got)}", flush=True)
    for batch, inputs in (("1", b1), ("32", b32)):
        fns = {}
        for k, s in sessions.items():
            feeds = {i.name: t.numpy() for i, t in zip(s.get_inputs(), inputs)}
            fns[k] = lambda s=s, feeds=feeds: s.run(None, feeds)
        cpu: dict = {}
        wall = interleaved_medians(fns, rounds[batch], cpu=cpu)
        print(f"{which} batch {batch} ({rounds[batch]} rounds): " + ", ".join(
            f"{k} {wall[k] * 1e3:.2f} ms wall / {cpu[k] * 1e3:.2f} ms CPU" for k in sessions)
            + f"; u8u8 / u8s8 CPU time {cpu['u8u8'] / cpu['u8s8']:.2f}x", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
