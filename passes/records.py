"""What a pipeline run reports: one :class:`PassRecord` per pass, the
:class:`PipelineResult`, and the fixed-width table ``res.report()`` prints."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx

from fxpress.graph.inspect import human_bytes
from fxpress.graph.memory import nonzeros
from fxpress.graph.runtime import compressed_modules
from fxpress.graph.weights import weighted_ops
from fxpress.passes.verify import Metrics


@dataclass
class PassRecord:
    """What one pass did: timing, bytes, sparsity, error metrics and the verdict.

    ``status``: "ok"; "warn" (missed its tolerance, kept: policy warn); "deferred" (missed,
    kept because a later step such as distill recovers accuracy); "rolled back"; "failed".
    """

    index: int
    name: str
    spec: str
    seconds: float = 0.0
    verify_seconds: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    disk_bytes: int = 0         # what fxpress.save would write for the graph after the pass
    params: int = 0
    zeros: int = 0
    changed: bool = False
    status: str = "ok"
    message: str = ""
    cumulative: Metrics | None = None
    incremental: Metrics | None = None
    tolerance: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("index", "name", "spec", "seconds", "verify_seconds",
                                            "bytes_before", "bytes_after", "disk_bytes", "params", "zeros",
                                            "changed", "status", "message", "tolerance", "stats")}
        d["sparsity"] = self.sparsity
        d["cumulative"] = self.cumulative.as_dict() if self.cumulative else None
        d["incremental"] = self.incremental.as_dict() if self.incremental else None
        return d


@dataclass
class PipelineResult:
    """The compressed graph and one record per pass."""

    module: torch.fx.GraphModule
    records: list[PassRecord]
    pipeline: str = ""
    capture: dict = field(default_factory=dict)
    original_bytes: int = 0
    original_disk_bytes: int = 0
    #: per-layer rows and weight histograms of the captured graph (``fxpress report``'s "before")
    baseline: dict = field(default_factory=dict)
    #: what ``compress(..., target=...)`` planned (``fxpress.passes.planner.Plan``): per-layer
    #: choices, the sensitivity table, every round, the reproducing recipe; None otherwise
    plan: Any = None

    def report(self) -> str:
        """The per-pass table (time, sparsity, bytes, error metrics, status), and the plan's
        per-layer table when there is one."""
        text = format_records(self.records, self.original_bytes)
        return text + ("\n\n" + self.plan.format() if self.plan is not None else "")

    def as_dict(self) -> dict[str, Any]:
        d = {"pipeline": self.pipeline, "capture": self.capture,
             "original_bytes": self.original_bytes,
             "original_disk_bytes": self.original_disk_bytes, "baseline": self.baseline,
             "records": [r.as_dict() for r in self.records]}
        if self.plan is not None:
            d["plan"] = self.plan.as_dict()
        return d


def _fmt(v: float | None, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return format(v, spec)


def format_records(records: Sequence[PassRecord], original_bytes: int) -> str:
    """Render records as a fixed-width table."""
    head = ["#", "pass", "status", "time s", "verify s", "sparsity", "bytes", "on disk", "x smaller",
            "rel_l2 Δ", "rel_l2", "cosine", "top1"]
    rows = []
    for r in records:
        c, i = r.cumulative, r.incremental
        rows.append([
            str(r.index), r.spec, r.status, f"{r.seconds:.3f}", f"{r.verify_seconds:.3f}",
            f"{r.sparsity:.1%}", human_bytes(r.bytes_after), human_bytes(r.disk_bytes) if r.disk_bytes else "-",
            f"{original_bytes / r.disk_bytes:.2f}" if r.disk_bytes else "-",
            _fmt(i.rel_l2 if i else None, ".2e"), _fmt(c.rel_l2 if c else None, ".2e"),
            _fmt(c.cosine if c else None), _fmt(c.top1 if c else None),
        ])
    widths = [max(len(h), *(len(row[k]) for row in rows)) if rows else len(h)
              for k, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if k in (1, 2) else c.rjust(w)  # noqa: E731
                                   for k, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    notes = [f"  [{r.index}] {r.name}: {r.message}" for r in records if r.message]
    return "\n".join(out + notes)


def weight_counts(gm: torch.nn.Module) -> tuple[int, int]:
    """(weights, exact zeros) over every weighted op, decoding runtime modules."""
    params = zeros = 0
    seen: set[str] = set()
    for op in weighted_ops(gm):
        if op.name in seen:
            continue
        seen.add(op.name)
        w = op.weight()
        params += w.numel()
        zeros += w.numel() - nonzeros(w)
    for _, m in compressed_modules(gm):
        n, nz = m.count_weights()
        params += n
        zeros += n - nz
    return params, zeros


__all__ = ["PassRecord", "PipelineResult", "format_records", "weight_counts"]
