"""Build the preset dictionary version 3 headers are compressed from (graph/artifact/header_dict.py).

The dictionary is the stored (version 3, minimized) header text of small reference
artifacts, untrained (a header does not depend on the weights' values beyond a few counts):
the demo's 64-300-100-10 digits MLP pruned and shared with 8-bit biases, int8 and 4-bit
quantized, binarized; the digits CNN with its BatchNorms folded, pruned and shared; a small
pre-norm transformer block (not the benchmark's) pruned, shared and with its norms and
position embedding on 8-bit grids; distillation taps; and a torch.export graph of the MLP.
None of bench/recovery_models.py's models is among them. Headers are concatenated with
the kinds most artifacts hold last (nearest to the data zlib compresses), and the last
32,768 bytes kept (zlib's window).

    python -m bench.header_dict            # prints the base64 zlib of the dictionary and its sha256
    python -m bench.header_dict --check    # the stored header sizes with the old and new dictionary
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import zlib

import torch
from torch import nn

import bench.common  # noqa: F401  (sets sys.path)


class _Block(nn.Module):
    """A pre-norm attention block over 6 tokens of width 32 with a learned position embedding."""

    def __init__(self, d: int = 32, heads: int = 2):
        super().__init__()
        self.inp = nn.Linear(12, d)
        self.pos = nn.Parameter(torch.randn(1, 6, d) * 0.02)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.out = nn.Linear(d, 5)
        self.heads = heads

    def forward(self, x):
        h = self.inp(x.reshape(-1, 6, 12)) + self.pos
        b, t, c = h.shape
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        split = lambda z: z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        a = nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, c))
        h = h + self.down(nn.functional.gelu(self.up(self.ln2(h))))
        return self.out(self.ln_f(h).mean(1))


def reference_headers() -> list[bytes]:
    import fxpress
    from examples.digits import DigitsCNN, DigitsMLP
    from fxpress.graph.artifact import artifact_header, minimize

    torch.manual_seed(0)
    x = torch.rand(32, 64)
    out = []

    def add(model, pipeline, inputs, method="auto"):
        res = fxpress.compress(model.eval(), pipeline, calibration=[(inputs,)], policy="warn",
                               progress=False, capture_method=method)
        h = minimize(artifact_header(res.module, entropy=True))
        h.pop("file_bytes", None)
        if isinstance(h.get("meta"), dict) and "seconds" in h["meta"]:
            h["meta"]["seconds"] = 0.1  # the capture's timing: the one value that varies by run
        out.append(json.dumps(h, separators=(",", ":")).encode())

    add(DigitsMLP(), "distill", x, method="export")  # taps, an export graph
    add(DigitsMLP(), "binarize{mode=ternary}", x)
    add(DigitsMLP(), "quantize{bits=4}", x)
    add(DigitsMLP(), "quantize{bits=8}", x)
    add(DigitsCNN(), "fold_bn,prune{sparsity=0.9,scope=global},share{bits=4,bias_bits=8}", x)
    add(_Block(), "prune{sparsity=0.9,scope=global},share{bits=4,bias_bits=8},small", torch.rand(16, 72))
    add(DigitsMLP(), "prune{sparsity=0.95,scope=global},share{bits=4,bias_bits=8}", x)
    return out


def build() -> bytes:
    return b"".join(reference_headers())[-32768:]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.header_dict")
    p.add_argument("--check", nargs="*", help="artifacts whose stored header to recompress")
    args = p.parse_args()
    torch.set_num_threads(1)
    zdict = build()
    if args.check is None:
        print(base64.b64encode(zlib.compress(zdict, 9)).decode())
        print(hashlib.sha256(zdict).hexdigest(), len(zdict), file=sys.stderr)
        return
    from fxpress.graph.artifact import _split_prefix, minimize
    from fxpress.graph.artifact.header_dict import HEADER_ZDICT, HEADER_ZDICT_V3

    print("rebuilt dictionary", "matches" if zdict == HEADER_ZDICT_V3 else "DIFFERS FROM",
          "graph/artifact/header_dict.py's HEADER_ZDICT_V3")

    for path in args.check:
        data = open(path, "rb").read()
        header, _, _ = _split_prefix(data, path)
        text = json.dumps(minimize(header), separators=(",", ":")).encode()
        sizes = []
        for d in (HEADER_ZDICT, zdict):
            z = zlib.compressobj(9, zdict=d)
            sizes.append(len(z.compress(text) + z.flush()))
        print(f"{path}: header JSON {len(text):,} bytes; stored with the version 1 dictionary "
              f"{sizes[0]:,}, with the new one {sizes[1]:,}")


if __name__ == "__main__":
    main()
