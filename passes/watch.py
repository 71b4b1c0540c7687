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

from typing import Any, Iterable

import torch
import torch.fx

from fxpress.graph.capture import _flat_graph_inputs, eval_mode


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

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch:
            self.watched(n, out)
        if n is self._last:
            raise _Done
        return out

    def record(self, batches: Iterable) -> "WatchInterpreter":
        """Run every batch (positional inputs, as calibration gives them) up to the last
        watched node, without gradients, in eval mode."""
        gm = self.module
        if self._last is None:  # nothing to watch
            return self
        with torch.no_grad(), eval_mode(gm):
            for b in batches:
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


__all__ = ["WatchInterpreter"]
