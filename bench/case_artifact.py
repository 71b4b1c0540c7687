"""Artifact sizes, and which entropy coder wins on the streams fxpress stores: Huffman
(as Deep Compression codes its indices) against zlib, bz2 and lzma from the standard library."""
from __future__ import annotations

import bz2
import heapq
import lzma
import math
import zlib
from collections import Counter

import numpy as np
import torch

from bench.common import Table

TITLE = "Artifacts: file sizes and entropy coding (Huffman vs zlib/bz2/lzma)"


def huffman_bytes(symbols: np.ndarray) -> int:
    """Exact size of a canonical Huffman coding of ``symbols``: the code lengths (one byte
    per symbol of the alphabet) plus sum(count x length) bits. A stream of one symbol still
    costs one bit per symbol."""
    counts = Counter(np.asarray(symbols).ravel().tolist())
    if not counts:
        return 0
    if len(counts) == 1:
        return 1 + math.ceil(next(iter(counts.values())) / 8)
    heap = [(c, i, (s,)) for i, (s, c) in enumerate(counts.items())]
    heapq.heapify(heap)
    depth = Counter()
    nxt = len(heap)
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        for s in a + b:
            depth[s] += 1
        heapq.heappush(heap, (c1 + c2, nxt, a + b))
        nxt += 1
    bits = sum(counts[s] * depth[s] for s in counts)
    alphabet = max(counts) + 1
    return alphabet + math.ceil(bits / 8)


def _streams(gm) -> list[tuple[str, np.ndarray, bytes]]:
    """(kind, Huffman symbols, raw bytes) of every index, bitmap and 8-bit stream save writes."""
    from fxpress.graph import artifact
    from fxpress.graph.packing import unpack_bits

    out = []
    for name, t in list(gm.state_dict().items()):
        entry, streams = artifact.encode_tensor(name, t)
        for sname, info in entry["streams"].items():
            st = streams[info["key"]]
            data = artifact._as_ints(st).tobytes()
            if sname == "index":  # Deep Compression codes the relative indices themselves
                symbols = unpack_bits(st, entry["bits"], entry["entries"]).numpy()
                out.append((f"relative index ({entry['bits']} bit)", symbols, data))
            elif sname == "bitmap":
                out.append(("bitmap", np.frombuffer(data, np.uint8), data))
            elif sname == "data" and st.element_size() == 1:
                out.append(("packed 8-bit buffer", np.frombuffer(data, np.uint8), data))
    return out


def run(size: str) -> list[Table]:
    import safetensors.torch

    import fxpress
    from examples.digits import calibration, trained_mlp
    from fxpress.graph import artifact
    from fxpress.passes.base import PassContext
    from fxpress.passes.prune import Prune
    from tests.runtime_fixtures import share_linears

    hidden = (32,) if size == "tiny" else (300, 100)
    mlp = trained_mlp(hidden=hidden, epochs=5 if size == "tiny" else 40)
    x = calibration()[0]
    cases = []
    gm = fxpress.capture(mlp, x)
    p90 = Prune(sparsity=0.9).run(fxpress.graph.clone_structure(gm), PassContext(x)).module
    cases.append(("digits MLP, 90% pruned", mlp, p90))
    cases.append(("digits MLP, 90% pruned + 4-bit codebook", mlp,
                  share_linears(fxpress.graph.clone_structure(p90))))
    if size == "full":
        from examples.minilm import batches, sentence_encoder

        enc = sentence_encoder()
        b = batches(32)[0]
        mgm = fxpress.capture(enc, b)
        cases.append(("MiniLM-L6, 50% pruned", enc,
                      Prune(sparsity=0.5).run(mgm, PassContext(b)).module))

    sizes = Table("File size", ["model", "fp32 safetensors", "fxpress", "fxpress entropy=True",
                                "x smaller", "x smaller (entropy)"])
    coders = Table("Entropy coders on the streams fxpress writes (bytes, summed per kind)",
                   ["model", "stream", "streams", "raw", "Huffman", "zlib -9", "bz2 -9", "lzma -6",
                    "smallest"])
    for label, model, g in cases:
        fp32 = len(safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()}))
        plain, ent = artifact.artifact_size(g), artifact.artifact_size(g, entropy=True)
        sizes.add(label, fp32, plain, ent, fp32 / plain, fp32 / ent)
        by_kind: dict[str, list[int]] = {}
        for kind, symbols, data in _streams(g):
            row = by_kind.setdefault(kind, [0, 0, 0, 0, 0, 0])
            row[0] += 1
            row[1] += len(data)
            row[2] += huffman_bytes(symbols)
            row[3] += len(zlib.compress(data, 9))
            row[4] += len(bz2.compress(data, 9))
            row[5] += len(lzma.compress(data, preset=6))
        for kind, r in by_kind.items():
            names = ["raw", "Huffman", "zlib", "bz2", "lzma"]
            coders.add(label, kind, r[0], r[1], r[2], r[3], r[4], r[5],
                       names[min(range(5), key=lambda i: r[1 + i])])
    coders.notes.append("Huffman sizes are exact for a canonical code over the stream's symbols "
                        "(relative indices at their bit width, bytes otherwise), code-length "
                        "table included; save(entropy=True) keeps, per stream, the smallest of "
                        "zlib/bz2/lzma, and the raw stream when none wins.")
    return [sizes, coders]
