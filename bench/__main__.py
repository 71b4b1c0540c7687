"""Run every benchmark case and print one Markdown table per case.

    python -m bench            # all cases, full sizes; writes bench/results.md
    python -m bench --quick    # a small subset (about 2 minutes)
    python -m bench --tiny     # every code path on tiny sizes (the smoke test uses this)
    python -m bench CASE ...   # only the named cases
    python -m bench zoo --readme   # also write the zoo coverage table into README.md

A case is a module ``bench/case_*.py`` with ``TITLE`` and ``run(size) -> list[Table]``
where size is "full", "quick" or "tiny".
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import pkgutil
import sys
import time
from pathlib import Path

from bench.common import ROOT, machine

HERE = Path(__file__).resolve().parent


def cases() -> list[str]:
    return sorted(m.name[len("case_"):] for m in pkgutil.iter_modules([str(HERE)])
                  if m.name.startswith("case_"))


@contextlib.contextmanager
def case_threads(size: str):
    """Run one case: a case may set torch's thread count for its measurements, and the
    harness puts the caller's count back afterwards. A tiny run checks code paths only
    (the smoke test, beside another test worker on a 2-core machine), so it stays on one
    thread whatever the case asks, child processes included: two threads on a core another
    process uses spin against each other and took the smoke test from ~2 to ~10 minutes."""
    import torch

    before, real = torch.get_num_threads(), torch.set_num_threads
    env = os.environ.get("OMP_NUM_THREADS")
    if size == "tiny":
        real(1)
        torch.set_num_threads = lambda n: None
        os.environ["OMP_NUM_THREADS"] = "1"
        # every pass ends with a full gc.collect(): frozen, the imports and the earlier
        # cases' survivors are not walked again each time (tests/conftest.py does the same)
        gc.collect()
        gc.freeze()
    try:
        yield
    finally:
        torch.set_num_threads = real
        real(before)
        if size == "tiny":
            gc.unfreeze()
            if env is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("cases", nargs="*", help=f"cases to run (default all: {', '.join(cases())})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--tiny", action="store_true")
    p.add_argument("--readme", action="store_true", help="write the tables of cases that "
                   "feed README (update_readme(): zoo) between their README markers")
    p.add_argument("--out", default=None, help="Markdown file to write (default bench/results.md "
                   "for full runs, none otherwise)")
    args = p.parse_args(argv)
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    names = args.cases or cases()
    unknown = [n for n in names if n not in cases()]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {cases()}")
    header = (f"# fxpress benchmarks\n\nMachine: {machine()}. Size: {size}. "
              f"Command: `python -m bench{' --' + size if size != 'full' else ''}`.\n")
    print(header)
    parts = [header]
    start = time.perf_counter()
    for name in names:
        mod = importlib.import_module(f"bench.case_{name}")
        t0 = time.perf_counter()
        with case_threads(size):
            tables = mod.run(size)
        text = f"## {mod.TITLE}\n\n" + "\n".join(t.markdown() for t in tables) + \
            f"\n_{name}: {time.perf_counter() - t0:.1f} s_\n"
        print(text, flush=True)
        parts.append(text)
        if args.readme and hasattr(mod, "update_readme"):
            print("README.md updated" if mod.update_readme() else
                  f"README.md not updated ({name}: no full run or no markers)")
    footer = f"\nTotal: {time.perf_counter() - start:.1f} s\n"
    print(footer)
    parts.append(footer)
    out = args.out or (str(HERE / "results.md") if size == "full" and not args.cases else None)
    if out:
        Path(out).write_text("\n".join(parts))
        print(f"wrote {Path(out).resolve().relative_to(ROOT) if Path(out).resolve().is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
