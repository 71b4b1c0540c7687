"""Pipeline instrumentation: objects the pipeline calls at fixed points of every run.

As in MLIR's ``PassInstrumentation`` (or pytest's hooks), what is not the transaction
itself is an instrument: the pipeline calls, in order, for every instrument it holds

* ``run_before_pipeline(pipeline, gm, ctx)``  once, with the captured graph;
* ``run_before_pass(pass_, gm, ctx)``         before the snapshot of each pass;
* ``run_after_run(pass_, gm, record)``        after the pass ran and its graph linted, before
  the verdict (the verifier measures here, into ``record``);
* ``run_after_commit(pass_, gm, record)``     the pass was kept and the graph before it released;
* ``run_after_pass(pass_, gm, record)``       the record is complete (kept or rolled back);
* ``run_after_pass_failed(pass_, gm, error)`` the pass failed (``gm``: the last good graph);
* ``run_after_pipeline(result)``              once, with the result.

The built-in instruments (:class:`Verification`, :class:`MemoryTrim`, :class:`Progress`) run
before the caller's; :class:`PassTimer` and :class:`GraphDumper` are ready-made ones for
callers: ``fxpress.compress(..., instruments=[PassTimer()])``.
"""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fxpress.errors import PassError
from fxpress.graph.memory import trim_heap
from fxpress.passes.verify import Verifier, misses


class Instrument:
    """Observes a pipeline run. Override any of the calls (see the module docs)."""

    def run_before_pipeline(self, pipeline: Any, gm: torch.fx.GraphModule, ctx: Any) -> None:
        pass

    def run_before_pass(self, pass_: Any, gm: torch.fx.GraphModule, ctx: Any) -> None:
        pass

    def run_after_run(self, pass_: Any, gm: torch.fx.GraphModule, record: Any) -> None:
        pass

    def run_after_commit(self, pass_: Any, gm: torch.fx.GraphModule, record: Any) -> None:
        pass

    def run_after_pass(self, pass_: Any, gm: torch.fx.GraphModule, record: Any) -> None:
        pass

    def run_after_pass_failed(self, pass_: Any, gm: torch.fx.GraphModule | None,
                              error: BaseException) -> None:
        pass

    def run_after_pipeline(self, result: Any) -> None:
        pass


class PassTimer(Instrument):
    """Wall time of each pass including verification, in ``self.times`` (name, seconds)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self._start = 0.0

    def run_before_pass(self, pass_, gm, ctx):
        self._start = time.perf_counter()

    def run_after_pass(self, pass_, gm, record):
        self.times.append((str(pass_), time.perf_counter() - self._start))


class GraphDumper(Instrument):
    """Writes each graph's code before and after every pass into ``folder``.

    Files: ``00-captured.py``, ``01-prune.before.py``, ``01-prune.after.py``, ...
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._i = 0

    def _write(self, name: str, gm: torch.fx.GraphModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_text(gm.code)

    def run_before_pass(self, pass_, gm, ctx):
        self._i += 1
        self._write(f"{self._i:02d}-{pass_.name}.before.py", gm)

    def run_after_pass(self, pass_, gm, record):
        self._write(f"{self._i:02d}-{pass_.name}.after.py", gm)


class MemoryTrim(Instrument):
    """Hands freed heap pages back to the OS between the steps of a pass, and frees the graph
    a kept pass replaced at once.

    glibc keeps freed blocks below its mmap threshold resident: without trimming, what
    verification, measuring or a pass's temporaries freed still counts while the next step
    allocates its own. A GraphModule is a reference cycle (module <-> graph <-> nodes), so
    the graph a pass replaced lives until Python's next full collection unless collected.
    """

    def run_before_pass(self, pass_, gm, ctx):
        trim_heap()  # what verification and measuring freed

    def run_after_run(self, pass_, gm, record):
        trim_heap()  # the pass's temporaries

    def run_after_commit(self, pass_, gm, record):
        release_memory()

    def run_after_pass(self, pass_, gm, record):
        # stamping and measuring a kept graph leave cycles (a networkx view of it) that
        # hold its weights: collected now, the next pass frees each weight it replaces
        release_memory()


def release_memory() -> None:
    """Collect the reference cycles of replaced graphs and hand the freed pages back."""
    gc.collect()
    trim_heap()


class Verification(Instrument):
    """Runs every kept graph on the calibration batches and measures it against the
    original model's outputs (cumulative) and the graph before the pass (incremental).

    ``outputs`` are the outputs of the last kept graph; :meth:`verdict` turns a record's
    metrics and the pass's tolerance into "keep", "rollback", or a ``VerificationError``.
    """

    def __init__(self, verifier: Verifier, gm: torch.fx.GraphModule):
        self.verifier = verifier
        self.outputs = verifier.run(gm, annotate=True)
        self.capture_metrics = verifier.compare_to_reference(self.outputs)
        self._pending: Any = None

    def run_after_run(self, pass_, gm, record):
        start = time.perf_counter()
        self._pending = self.verifier.run(gm, annotate=True)
        trim_heap()  # the run's activations and kernels' temporaries
        record.cumulative = self.verifier.compare_to_reference(self._pending)
        record.incremental = self.verifier.compare(self._pending, self.outputs)
        record.verify_seconds = time.perf_counter() - start

    def run_after_commit(self, pass_, gm, record):
        self.outputs, self._pending = self._pending, None

    def run_after_pass(self, pass_, gm, record):
        self._pending = None  # rolled back: the outputs before the pass stay

    def run_after_pass_failed(self, pass_, gm, error):
        self._pending = None

    def verdict(self, pass_: Any, record: Any, policy: str, deferred_to: int | None) -> tuple[
            str, tuple | None, str]:
        """(status, first miss ``(metric, limit, value)`` or None, message) for a measured
        pass, under ``policy``; ``deferred_to``: the recovery step that follows, if any."""
        metrics = record.cumulative if pass_.tol.against == "reference" else record.incremental
        bad = misses(pass_.tol, metrics)
        if not bad:
            return "ok", None, ""
        key, _, value = miss = bad[0]
        what = ", ".join(f"{k} = {v:.6g} (limit {lim:.6g})" for k, lim, v in bad)
        if key == "nonfinite":  # NaN/Inf is never kept, whatever the policy
            what = f"produced {int(value)} NaN/Inf output values the original model does not have"
            return ("rolled back", miss, f"missed {what}; change dropped (policy rollback)") \
                if policy == "rollback" else ("failed", miss, what)
        if deferred_to is not None:
            return "deferred", miss, f"missed {what}; left to the recovery step #{deferred_to}"
        if policy == "warn":
            return "warn", miss, f"missed {what}; kept (policy warn)"
        if policy == "rollback":
            return "rolled back", miss, f"missed {what}; change dropped (policy rollback)"
        return "failed", miss, what


class CallerIntegrity(Instrument):
    """After every pass, checks that the caller's tensors hold the bytes they held when the
    run started (crc32 per storage, a block at a time): what the read-only views cannot
    stop (a raw pointer, a write into a storage object) fails the pass that did it."""

    def __init__(self, caller: Any):
        self.caller = caller

    def run_after_run(self, pass_, gm, record):
        changed = self.caller.changed()
        if changed:
            raise PassError(pass_.name, f"changed the caller's tensor(s) {changed[:5]} behind "
                            "the pipeline's back (through a raw pointer or a storage, not a "
                            "tensor operation); a pass must never write into the caller's model: "
                            "replace tensors instead (WeightedOp.set_weight)")


class Progress(Instrument):
    """A tqdm bar over the passes, shown on a terminal for pipelines that take a while."""

    def __init__(self, total: int, enabled: bool | None):
        self.bar = None
        if enabled is False or total == 0:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return
        # disable=None: shown only on a terminal; delay: only for pipelines that take a while
        self.bar = tqdm(total=total, desc="fxpress", unit="pass", delay=1.0,
                        disable=None if enabled is None else not enabled, file=sys.stderr,
                        leave=False)

    def run_before_pass(self, pass_, gm, ctx):
        if self.bar is not None:
            self.bar.set_postfix_str(pass_.name)

    def run_after_pass(self, pass_, gm, record):
        if self.bar is not None:
            self.bar.update(1)

    def run_after_pass_failed(self, pass_, gm, error):
        self.close()

    def run_after_pipeline(self, result):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["Instrument", "PassTimer", "GraphDumper", "MemoryTrim", "Verification",
           "CallerIntegrity", "Progress", "release_memory"]
