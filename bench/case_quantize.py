"""Quantization: fxpress int8 (dynamic activations) and 4-bit weight-only vs fp32 and
torch's quantize_dynamic, on the real MiniLM and the digits MLP/CNN.

Latencies are medians of repeats taken in interleaved rounds (every variant once per
round), so load from other processes hits all variants alike; ratios are the point.
"""
from __future__ import annotations

import collections
import copy
import os
import time
import warnings

import torch

from bench.common import Table, interleaved_medians, kb, mb

TITLE = "Quantization: fxpress vs fp32 vs torch.ao quantize_dynamic"


def _torch_dynamic(model: torch.nn.Module) -> tuple[torch.nn.Module, float]:
    """torch.ao's quantize_dynamic on a copy (the baseline only; fxpress never uses it)."""
    m = copy.deepcopy(model)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    return q, time.perf_counter() - start


def _torch_prune(model: torch.nn.Module, amount: float) -> tuple[torch.nn.Module, float]:
    """torch.nn.utils.prune.global_unstructured (L1) over every Linear of a copy."""
    import torch.nn.utils.prune as tprune

    m = copy.deepcopy(model)
    params = [(mod, "weight") for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    start = time.perf_counter()
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=amount)
    return m, time.perf_counter() - start


def _state_bytes(module: torch.nn.Module) -> int:
    """state_dict bytes, including torch's packed params (which stored_bytes cannot see)."""
    total = 0
    for v in module.state_dict().values():
        if isinstance(v, torch.Tensor):
            if v.is_quantized:
                total += v.numel() * v.element_size() + 8 * (
                    v.q_per_channel_scales().numel() * 2 if v.qscheme() in (
                        torch.per_channel_affine, torch.per_channel_symmetric) else 2)
            else:
                total += v.numel() * v.element_size()
        elif isinstance(v, tuple):  # quantize_dynamic's (weight, bias) packed params
            total += sum(t.numel() * t.element_size() for t in v if isinstance(t, torch.Tensor))
    return total


def _minilm(size: str) -> Table:
    import fxpress
    from examples.minilm import SENTENCES, batches, sentence_encoder

    enc = sentence_encoder()
    data = batches(32, SENTENCES if size == "full" else SENTENCES[:32])
    gm = fxpress.capture(enc, data[0])
    with torch.no_grad():
        ref = [enc(*b) for b in data]
    fp32_bytes = _state_bytes(enc)
    variants = {"fxpress int8 (act_scale=auto)": "quantize{bits=8}",
                "fxpress int8 act_scale=tensor": "quantize{bits=8,act_scale=tensor}",
                "fxpress int8 act_scale=token": "quantize{bits=8,act_scale=token}",
                "fxpress 4-bit g64 affine weight-only":
                    "quantize{bits=4,granularity=group,group_size=64,scheme=affine}",
                "fxpress 4-bit g128 affine weight-only":
                    "quantize{bits=4,granularity=group,group_size=128,scheme=affine}",
                "fxpress prune 50% + int8": "prune{sparsity=0.5},quantize{bits=8}"}
    if size != "full":
        variants = {k: v for k, v in variants.items() if k in (
            "fxpress int8 (act_scale=auto)", "fxpress prune 50% + int8")}
    models: dict[str, torch.nn.Module] = {"fp32": enc}
    apply_s: dict[str, float] = {"fp32": 0.0}
    models["torch quantize_dynamic"], apply_s["torch quantize_dynamic"] = _torch_dynamic(enc)
    models["torch prune.global_unstructured 50%"], apply_s["torch prune.global_unstructured 50%"] = \
        _torch_prune(enc, 0.5)
    choices = {}
    for label, text in variants.items():
        start = time.perf_counter()
        res = fxpress.compress(gm, text, calibration=data[:2], policy="warn")
        apply_s[label] = time.perf_counter() - start
        models[label] = res.module
        if "auto" in label:
            picked = [(v["act_scale"], v.get("smooth_alpha")) for v in
                      res.records[0].stats["layers"].values() if v.get("act_scale")]
            choices = collections.Counter(a if s is None else f"{a}+smooth{s:g}" for a, s in picked)
    repeat = {"full": 15, "quick": 5, "tiny": 1}[size]
    lat = interleaved_medians({k: (lambda m=m: m(*data[0])) for k, m in models.items()}, repeat)
    t = Table(f"all-MiniLM-L6-v2, {len(data)} batches of up to 32 sentences "
              f"({sum(len(b[0]) for b in data)} sentences), latency on one batch of 32", [
        "variant", "apply s", "state_dict", "x fp32 bytes", "file", "fp32 safetensors / file",
        "mean cosine", "min cosine", "latency ms (median)", "speed-up vs fp32",
        "speed vs quantize_dynamic"])
    from bench.case_deep_compression import fp32_safetensors_bytes
    from fxpress.graph.artifact import artifact_size

    fp32_file = fp32_safetensors_bytes(enc)
    for k, m in models.items():
        with torch.no_grad():
            cos = torch.cat([torch.nn.functional.cosine_similarity(m(*b), r, dim=1)
                             for b, r in zip(data, ref)])
        b = _state_bytes(m)
        if k == "fp32":
            f = fp32_file
        elif isinstance(m, torch.fx.GraphModule):
            f = artifact_size(m)
        else:  # torch's modules have no fxpress file; their state_dict is what they save
            f = None
        t.add(k, round(apply_s[k], 2), mb(b), round(b / fp32_bytes, 4), mb(f) if f else "n/a",
              round(fp32_file / f, 2) if f else "n/a", round(float(cos.mean()), 4),
              round(float(cos.min()), 4), round(lat[k] * 1e3, 1), round(lat["fp32"] / lat[k], 2),
              round(lat["torch quantize_dynamic"] / lat[k], 2))
    t.notes.append("torch prune.global_unstructured keeps weight_orig and a float mask per "
                   "pruned weight: its state_dict grows (x fp32 bytes > 1) and it saves nothing; "
                   "file = the fxpress artifact (entropy=False), fp32 row = safetensors file.")
    if choices:
        t.notes.append("act_scale=auto chose, per linear layer: " + ", ".join(
            f"{k} x{n}" for k, n in sorted(choices.items())))
    t.notes.append("apply s for fxpress = capture reuse + the quantize pass + the verifier's run "
                   "on the calibration batches; quantize_dynamic keeps embeddings in float.")
    return t


def _digits(size: str) -> list[Table]:
    import fxpress
    from examples.digits import accuracy, calibration, digits_data, trained_cnn, trained_mlp

    d = digits_data()
    tiny = size == "tiny"
    out = []
    for name, model in (("MLP 64-300-100-10", trained_mlp(hidden=(16,) if tiny else (300, 100),
                                                        epochs=5 if tiny else 40)),
                        ("CNN", trained_cnn(epochs=3 if tiny else 30))):
        models = {"fp32": model}
        apply_s = {"fp32": 0.0}
        models["torch quantize_dynamic"], apply_s["torch quantize_dynamic"] = _torch_dynamic(model)
        for label, text in (("fxpress int8", "quantize{bits=8}"),
                            ("fxpress 4-bit", "quantize{bits=4}")):
            start = time.perf_counter()
            models[label] = fxpress.compress(model, text, calibration=calibration(),
                                             policy="warn").module
            apply_s[label] = time.perf_counter() - start
        repeat = {"full": 31, "quick": 9, "tiny": 1}[size]
        lat = interleaved_medians({k: (lambda m=m: m(d.x_test)) for k, m in models.items()}, repeat)
        t = Table(f"digits {name}, {len(d.x_test)} test images in one batch", [
            "variant", "apply s", "state_dict", "x fp32 bytes", "accuracy", "Δ accuracy (points)",
            "latency ms (median)", "speed-up vs fp32"])
        base = accuracy(model, d.x_test, d.y_test)
        fp = _state_bytes(model)
        for k, m in models.items():
            acc = accuracy(m, d.x_test, d.y_test)
            b = _state_bytes(m)
            t.add(k, round(apply_s[k], 3), kb(b), round(b / fp, 3), round(acc, 4),
                  round(100 * (acc - base), 2), round(lat[k] * 1e3, 3), round(lat["fp32"] / lat[k], 2))
        out.append(t)
    return out


#: threads inside the latency measurements (the project's figures: 2 cores);
#: BENCH_THREADS=1 measures on one, e.g. on a machine other jobs load
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
#: what each compressed variant is, for the decode-strategy table
STRATEGY_VARIANTS = {
    "int8": "quantize{bits=8}",
    "4-bit g64": "quantize{bits=4,granularity=group,group_size=64,scheme=affine}",
    "share 4-bit": "share{bits=4}",
}


def _random_bert():
    """A random-weight BERT (hidden 512, 4 layers, 8 heads, FFN 2048) behind the same
    mean-pooling head as MiniLM: a second transformer no default was tuned on."""
    from transformers import BertConfig, BertModel

    from examples.minilm import SentenceEncoder

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=8000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                     intermediate_size=2048, max_position_embeddings=128)
    model = SentenceEncoder(BertModel(cfg)).eval()
    g = torch.Generator().manual_seed(1)

    def batch(n, length=16):
        ids = torch.randint(1000, 8000, (n, length), generator=g)
        return ids, torch.ones_like(ids)

    return model, [batch(32), batch(32)], batch(1), batch(32)


def _minilm_inputs():
    from examples.minilm import SENTENCES, batches, sentence_encoder, tokenize

    data = batches(32, SENTENCES)
    # batch 1: one 16-token sentence (the serving case); batch 32: 32 sentences padded
    one = next(tokenize([s]) for s in SENTENCES if tokenize([s])[0].shape[1] == 16)
    return sentence_encoder(), data[:2], one, data[0]


def _strategies(size: str) -> list[Table]:
    """Per model and compressed variant, every decode strategy: latency ratios to fp32 eager
    at batch 1 and batch 32 (one interleaved run per batch size), cosine to fp32 and the
    memory each holds at run time beyond the stored tensors."""
    import copy as _copy

    import fxpress
    from fxpress.graph.memory import stored_bytes

    repeat = {"full": 15, "quick": 5, "tiny": 1}[size]
    models = [("all-MiniLM-L6-v2", _minilm_inputs)]
    if size != "tiny":
        models.append(("random BERT 512x4 (held out)", _random_bert))
    out = []
    for name, make in models:
        enc, calib, one, many = make()
        gm = fxpress.capture(enc, calib[0])
        with torch.no_grad():
            ref = enc(*calib[1])
        run: dict[str, torch.nn.Module] = {"fp32 eager": enc}
        info: dict[str, tuple] = {}
        for label, text in STRATEGY_VARIANTS.items():
            res = fxpress.compress(gm, text, calibration=calib[:1], policy="warn", progress=False)
            strategies = ("auto", "float", "per_call") if label == "int8" else (
                "auto", "int8", "float", "per_call")
            for strategy in strategies:
                m = _copy.deepcopy(res.module)
                plan = fxpress.set_decode(m, strategy)
                key = f"{label} decode={strategy}"
                run[key] = m
                info[key] = (stored_bytes(m), plan)
        lat = {}
        old = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            for rows, x in (("b1", one), ("b32", many)):
                lat[rows] = interleaved_medians({k: (lambda m=m, x=x: m(*x)) for k, m in run.items()},
                                                repeat)
        finally:
            torch.set_num_threads(old)
        t = Table(f"{name}: decode strategies, latency vs fp32 eager at batch 1 "
                  f"({one[0].shape[1]} tokens) and batch 32 ({tuple(many[0].shape)}), "
                  f"{THREADS} threads, medians of {repeat} interleaved rounds", [
                      "variant", "stored MB", "held at run time MB", "layers int8 / float / per call",
                      "cosine vs fp32", "speed b1 (x fp32)", "speed b32 (x fp32)",
                      "b1 ms", "b32 ms"])
        fp32_bytes = stored_bytes(enc)
        for k, m in run.items():
            with torch.no_grad():
                cos = float(torch.nn.functional.cosine_similarity(m(*calib[1]), ref, dim=1).mean())
            if k == "fp32 eager":
                stored, held, paths = fp32_bytes, 0, "-"
            else:
                stored, plan = info[k]
                plan = fxpress.decode_plan(m)  # after running: kernels actually prepacked
                held = sum(r["held_now"] for r in plan)
                c = collections.Counter(r["path"] for r in plan)
                paths = f"{c['int8']} / {c['float']} / {c['per_call']}"
            t.add(k, round(stored / 2**20, 2), round(held / 2**20, 2), paths, round(cos, 4),
                  round(lat["b1"]["fp32 eager"] / lat["b1"][k], 2),
                  round(lat["b32"]["fp32 eager"] / lat["b32"][k], 2),
                  round(lat["b1"][k] * 1e3, 2), round(lat["b32"][k] * 1e3, 1))
        t.notes.append("decode=auto is the default: wide linear layers re-quantized once to int8 "
                       "(per channel) on the int8 path, narrow ones and convs decoded once to "
                       "float, embeddings gathering their rows per call. held = decoded copies, "
                       "int8 codes and prepacked kernel weights (none in state_dict or the file). "
                       "int8 (quantize{bits=8}) runs its stored codes: decode=int8 is its auto.")
        out.append(t)
    return out


#: (in, out) of the layers of the small-call table
SMALL_CALL_SHAPES = ((64, 64), (128, 128), (128, 512), (256, 256), (384, 384), (384, 1536))
SMALL_CALL_ROWS = (1, 16, 64, 512)


def _small_calls(size: str) -> Table:
    """One int8 linear layer (quantize{bits=8}) at several widths and rows: decode=auto
    (small calls in float from a copy decoded once, the rest on the int8 kernels) and
    decode=int8 (every call on the kernels), each against torch's fp32 nn.Linear."""
    import fxpress
    from fxpress.passes.decode import AUTO_INT8_MIN_WORK

    repeat = {"full": 41, "quick": 21, "tiny": 3}[size]
    t = Table(f"int8 linear layers: speed vs fp32 nn.Linear by call size, {THREADS} threads, "
              f"medians of {repeat} interleaved rounds", [
                  "layer in x out", "rows", "work (x AUTO_INT8_MIN_WORK)", "auto path",
                  "decode=auto (x fp32)", "decode=int8 (x fp32)"])
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for i, o in SMALL_CALL_SHAPES:
            torch.manual_seed(0)
            lin = torch.nn.Sequential(torch.nn.Linear(i, o)).eval()
            calib = [(torch.randn(32, i),)]
            auto = fxpress.compress(lin, "quantize", calibration=calib, policy="warn",
                                    progress=False).module
            forced = copy.deepcopy(auto)
            fxpress.set_decode(forced, "int8")
            for rows in SMALL_CALL_ROWS:
                x = torch.randn(rows, i)
                lat = interleaved_medians({"fp32": lambda: lin(x), "auto": lambda: auto(x),
                                           "int8": lambda: forced(x)}, repeat)
                work = max(rows, 4) * i * o
                t.add(f"{i}x{o}", rows, round(work / AUTO_INT8_MIN_WORK, 2),
                      "float" if work < AUTO_INT8_MIN_WORK else "int8",
                      round(lat["fp32"] / lat["auto"], 2), round(lat["fp32"] / lat["int8"], 2))
    finally:
        torch.set_num_threads(old)
    t.notes.append("decode=auto runs a call of a stored int8 layer in float when max(rows, 4) x "
                   "in x out < AUTO_INT8_MIN_WORK (passes/decode.py), holding a float copy of "
                   "that layer (4 bytes per weight, at most AUTO_INT8_MIN_WORK weights)")
    return t


def run(size: str) -> list[Table]:
    tables = _digits(size) + [_small_calls(size)]
    if size != "tiny":  # the smoke test keeps to the digits models; MiniLM takes minutes
        tables[:0] = [_minilm(size)] + _strategies(size)
    return tables
