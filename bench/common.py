"""Helpers every benchmark case uses: machine description, medians, tables, memory."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # examples/ holds the shared models and data
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Table:
    """One Markdown table of a benchmark case."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append(list(cells))

    def markdown(self) -> str:
        def cell(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.4g}"
            return str(v)
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join("---" for _ in self.columns) + "|"]
        out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def median_time(fn: Callable[[], Any], repeat: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (the machines are shared and noisy)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, from the OS."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024 if sys.platform != "darwin" else kb


def kb(n: int) -> str:
    return f"{n / 1024:.1f} KB"


def mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def interleaved_medians(fns: dict, repeat: int, cpu: dict | None = None) -> dict[str, float]:
    """Median seconds of each callable, timed round-robin (one call each per round).

    ``cpu``: a dict to fill with each callable's median CPU seconds over the same calls
    (``time.process_time``: every thread of this process, so torch's and ONNX Runtime's
    worker threads count, and time spent waiting for a core on a loaded machine does not)."""
    with torch.inference_mode():
        for f in fns.values():
            f()
        times: dict[str, list[float]] = {k: [] for k in fns}
        cpus: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeat):
            for k, f in fns.items():
                c, t = time.process_time(), time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
                cpus[k].append(time.process_time() - c)
    if cpu is not None:
        cpu.update({k: statistics.median(v) for k, v in cpus.items()})
    return {k: statistics.median(v) for k, v in times.items()}
