"""Calibration statistics: run a graph for what chosen nodes compute, and no further.

Passes that measure the inputs of their layers on the calibration batches (quantize's
per-column ranges and samples, prune's ``criterion="activation"``) subclass
:class:`WatchInterpreter`: :meth:`~WatchInterpreter.watched` sees the value of every
watched node, and each run stops right after the last watched node in graph order. The
nodes after it cannot change a watched value (they run later), so they are not computed:
a language model's head (GPT-2's 50257-wide product, about 40% of its forward on a short
batch) only feeds the output, which no statistic reads.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx

from fxpress.errors import InputError
from fxpress.graph.capture import _flat_graph_inputs, eval_mode

#: the largest magnitude a watched value may reach: the square root of float32's largest
#: number. The statistics are computed in float32 (sums of squares, norms, scales from
#: ranges): past it they overflow to inf and NaN, and a pass failed inside its arithmetic
#: ("cannot convert float NaN to integer", 4-bit codes out of range) or silently ranked a
#: layer by magnitude alone (prune's activation criterion skipped a non-finite RMS)
OVERFLOW = torch.finfo(torch.float32).max ** 0.5


class _Done(Exception):
    """Raised after the last watched node: the rest of the graph is not run."""


class WatchInterpreter(torch.fx.Interpreter):
    """Runs a graph (:meth:`record`) and hands the value of each node of ``nodes``
    (node -> what the subclass keeps with it) to :meth:`watched`."""

    def __init__(self, gm: torch.fx.GraphModule, nodes: dict[torch.fx.Node, Any]):
        super().__init__(gm)
        self.watch = nodes
        self.extra_traceback = False
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self._last = max((n for n in nodes if n in order), key=order.__getitem__, default=None)

    def watched(self, node: torch.fx.Node, value: Any) -> None:
        raise NotImplementedError

    #: what the batch being run is called in errors (:meth:`record` sets it)
    batch_name = "calibration batch 0"

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch:
            self._check_finite(n, out)
            self.watched(n, out)
        if n is self._last:
            raise _Done
        return out

    def _check_finite(self, n: torch.fx.Node, out: Any) -> None:
        """A watched float value holding NaN or inf, or values past :data:`OVERFLOW`, is
        the data's (or the model's on the data): an :class:`InputError` naming the batch,
        the node and the layers reading it, and what to do."""
        if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel()):
            return
        lo, hi = torch.aminmax(out.detach())
        peak = max(-float(lo), float(hi))
        if peak < OVERFLOW:  # False for NaN
            return
        from fxpress.graph.artifact.calls import describe_node

        readers = [u.target if u.op == "call_module" else u.name for u in n.users][:3]
        what = ("NaN or inf" if not peak < float("inf") else
                f"values up to {peak:.3g}, past {OVERFLOW:.3g} (float32's largest number's "
                "square root), where the pass's float32 statistics overflow")
        raise InputError(
            f"{self.batch_name}: {describe_node(n, self.module)}, read by "
            f"{', '.join(map(repr, readers))}, holds {what}: the data holds such values or the model overflows on them; "
            "clean or rescale the data (torch.nan_to_num, normalise the inputs) or leave "
            "that batch out")

    def record(self, batches: Iterable, names: Sequence[str] | None = None) -> "WatchInterpreter":
        """Run every batch (positional inputs, as calibration gives them) up to the last
        watched node, without gradients, in eval mode. ``names``: what each batch is
        called in errors (default ``calibration batch i``)."""
        gm = self.module
        if self._last is None:  # nothing to watch
            return self
        with torch.no_grad(), eval_mode(gm):
            for i, b in enumerate(batches):
                self.batch_name = names[i] if names is not None else f"calibration batch {i}"
                try:
                    self.run(*_flat_graph_inputs(gm, b))
                except _Done:
                    pass
                finally:
                    # the interpreter keeps the values of nodes it never frees (get_attr
                    # nodes of weights read to the end: GPT-2's tied token embedding) in
                    # its environment; held there, a weight a pass replaces would live
                    # until the pass returns
                    self.env = {}
        return self


__all__ = ["OVERFLOW", "WatchInterpreter"]
