"""Runtime modules used by the artifact tests, in the shape passes write them: a 4-bit
codebook linear packed with graph/packing.py (weight sharing after pruning), and a
non-compressed runtime module with a config of every JSON type. Importable by a fresh
process (``tests.runtime_fixtures``), which is all an artifact needs besides fxpress."""
from __future__ import annotations

import torch

from fxpress.graph.packing import pack_bits, unpack_bits
from fxpress.graph.runtime import CompressedModule, RuntimeModule
from fxpress.graph.weights import weighted_ops


class PackedCodebookLinear(CompressedModule):
    """A linear layer whose weight is ``codebook[index]``, indices packed at ``bits`` bits.
    Code 0 is the exact zero, so pruned weights stay pruned."""

    technique = "test-share"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int = 4):
        super().__init__("linear", {})
        flat = weight.detach().reshape(-1)
        nz = flat[flat != 0]
        k = (1 << bits) - 1
        qs = torch.linspace(0, 1, k) if nz.numel() else torch.zeros(k)
        centroids = torch.quantile(nz, qs) if nz.numel() else torch.zeros(k)
        codebook = torch.cat([torch.zeros(1), centroids])
        idx = (flat.unsqueeze(1) - centroids.unsqueeze(0)).abs().argmin(1) + 1
        idx[flat == 0] = 0
        self.bits, self.shape, self.numel = bits, list(weight.shape), flat.numel()
        self.register_buffer("codebook", codebook)
        self.register_buffer("packed", pack_bits(idx, bits))
        self.bias = torch.nn.Parameter(bias.detach().clone()) if bias is not None else None

    def weight_float(self) -> torch.Tensor:
        idx = unpack_bits(self.packed, self.bits, self.numel).long()
        return self.codebook[idx].reshape(self.shape)

    def config(self) -> dict:
        return {**super().config(), "bits": self.bits, "shape": self.shape, "numel": self.numel}


class ScaleShift(RuntimeModule):
    """y = x * scale + shift, with a config holding nested JSON values (checked on reload)."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, n))
        self.shift = torch.nn.Parameter(torch.full((n,), 0.25))
        self.options = {"mode": "affine", "eps": 1e-6, "dims": (1, n), "tags": ["a", "b"]}

    def forward(self, x):
        return x * self.scale + self.shift + self.options["eps"] * 0

    def config(self) -> dict:
        return {"options": self.options}


RUNTIME = (PackedCodebookLinear, ScaleShift)


def share_linears(gm: torch.fx.GraphModule, bits: int = 4) -> torch.fx.GraphModule:
    """Replace every linear op of ``gm`` by a PackedCodebookLinear (in place)."""
    for op in weighted_ops(gm, ["linear"]):
        op.replace_with(PackedCodebookLinear(op.weight(), op.bias(), bits))
    gm.graph.lint()
    gm.recompile()
    return gm
