"""Where an artifact's bytes go: the prefix, the compressed header (and what each of its
sections costs in it), the safetensors index, and the stored streams grouped by what the
tensors are (weights, codebooks and codes, biases, norms, embeddings, ...).

>>> b = breakdown(fxpress.dumps(gm))                                    # doctest: +SKIP
>>> print(format_breakdown(b))                                          # doctest: +SKIP

Each header section is priced by its *marginal* compressed size: the stored header minus
the header compressed without that section (the sections share a preset dictionary and
each other's repetitions, so the parts need not add up to the whole exactly).
"""
from __future__ import annotations

import json
import struct
import zlib
from typing import Any

from fxpress.graph.artifact.compact import minimize
from fxpress.graph.artifact.format import PREFIX_SIZE, _split_prefix
from fxpress.graph.artifact.header_dict import HEADER_ZDICT_V3


def _zsize(obj: Any) -> int:
    z = zlib.compressobj(9, zdict=HEADER_ZDICT_V3)
    return len(z.compress(json.dumps(minimize(obj), separators=(",", ":"), allow_nan=False).encode())
               + z.flush())


def tensor_group(name: str, entry: dict) -> str:
    """A coarse label for a stored tensor, from its qualified name (what it is in a model)."""
    leaf = name.rpartition(".")[2]
    low = name.lower()
    if "norm" in low or "ln" in low.split(".")[-2:-1]:
        return "norms"
    if leaf in ("bias", "bias_codes", "bias_grid"):
        return "biases"
    if leaf in ("codebook", "codes", "mask", "indices", "latent", "codebook_codes", "codebook_grid"):
        return "matrices (codebooks, codes, masks)"
    if leaf in ("weight", "weight_codes", "scale", "zero_point", "scales", "zero"):
        return "matrices (dense or quantized)"
    if "pos" in low or "embed" in low:
        return "embeddings"
    if leaf.endswith("_codes") or leaf.endswith("_grid"):
        return "small tensors on a grid"
    return "other tensors"


def breakdown(data: bytes | memoryview) -> dict[str, Any]:
    """Bytes per part of the artifact ``data`` (see the module docstring)."""
    header, payload, text = _split_prefix(data, "artifact")
    head_len = len(data) - PREFIX_SIZE - len(payload)
    sections = {}
    for key in header:
        if key in ("format", "version"):
            continue
        rest = {k: v for k, v in header.items() if k != key}
        sections[key] = head_len - _zsize(rest)
    tensors = header.get("tensors", {})
    if isinstance(tensors, dict) and "graph" in header:
        graph = header["graph"]
        for part in ("nodes",):
            rest = {**header, "graph": {k: v for k, v in graph.items() if k != part}}
            sections[f"graph.{part}"] = head_len - _zsize(rest)
    index = struct.unpack("<Q", payload[:8])[0] + 8 if len(payload) >= 8 else 0
    groups: dict[str, int] = {}
    per_tensor: dict[str, int] = {}
    for name, entry in tensors.items() if isinstance(tensors, dict) else ():
        n = sum(s.get("bytes", 0) for s in entry.get("streams", {}).values())
        per_tensor[name] = n
        g = tensor_group(name, entry)
        groups[g] = groups.get(g, 0) + n
    return {"file": len(data), "prefix": PREFIX_SIZE, "header": head_len,
            "header_json": len(text), "sections": sections, "safetensors_index": index,
            "streams": len(payload) - index, "groups": groups, "tensors": per_tensor}


def format_breakdown(b: dict[str, Any], top: int = 12) -> str:
    """A plain-text table of :func:`breakdown`'s figures."""
    lines = [f"file {b['file']:>8,} bytes",
             f"  prefix {b['prefix']:>8,}",
             f"  header {b['header']:>8,}   ({b['header_json']:,} bytes of JSON)"]
    for k, v in sorted(b["sections"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {k:<28} ~{v:>7,}")
    lines.append(f"  safetensors index {b['safetensors_index']:>8,}")
    lines.append(f"  streams {b['streams']:>8,}")
    for k, v in sorted(b["groups"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {k:<36} {v:>7,}")
    lines.append("  largest tensors:")
    for k, v in sorted(b["tensors"].items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {k:<36} {v:>7,}")
    return "\n".join(lines)


__all__ = ["breakdown", "format_breakdown", "tensor_group"]
