"""The zoo matrix: every zoo architecture through every built-in pass, then save and load
in this process and in a fresh one (``tests/zoo.py``, ``tests/zoo_matrix.py``).

    python -m bench zoo              # the full matrix (zoo + held-out models), ~15 min
    python -m bench zoo --readme     # ... and write the zoo table into README.md
    python -m bench zoo --quick      # a few models
    python -c "from bench import case_zoo; case_zoo.update_readme()"   # README from bench/zoo.json

Writes the cells as JSON to ``bench/zoo.json`` on a full run.
"""
from __future__ import annotations

import sys
import time

from bench.common import ROOT

TITLE = "Zoo coverage: architectures x passes, saved and loaded in a fresh process"

QUICK = ["bert", "gpt2", "convnext", "multihead_attention", "lstm", "conv_transpose",
         "tied_embeddings", "module_twice"]
TINY = [("dict_outputs", "prune")]


class MarkdownBlock:
    """A pre-rendered Markdown section (the bench prints ``.markdown()`` of each table)."""

    def __init__(self, title: str, text: str):
        self.title, self.text = title, text

    def markdown(self) -> str:
        return f"### {self.title}\n\n{self.text}"


_LAST: dict[str, str] = {}


def run(size: str) -> list[MarkdownBlock]:
    from tests.zoo import HELD_OUT, ZOO
    from tests.zoo_matrix import PASSES, as_json, counts, markdown, run_matrix

    def log(line: str) -> None:  # progress, one line a cell, on stderr
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    if size == "tiny":
        blocks = [("tiny", run_matrix([], cells=TINY))]
    else:
        zoo = run_matrix(QUICK if size == "quick" else list(ZOO), PASSES, log=log)
        blocks = [("zoo", zoo)]
        if size == "full":
            blocks.append(("held out", run_matrix(list(HELD_OUT), PASSES, log=log)))
            (ROOT / "bench" / "zoo.json").write_text(as_json([c for _, b in blocks for c in b]))
    out = []
    for which, cells in blocks:
        n = counts(cells)
        title = (f"{which}: {len(cells)} cells, {n['ok']} ok / {n['skip']} skip / {n['fail']} fail")
        text = markdown(cells)
        _LAST[which] = text
        out.append(MarkdownBlock(title, text))
    out[-1].text += f"\n_{time.perf_counter() - start:.0f} s for the matrix._\n"
    return out


def update_readme() -> bool:
    """Write the last full run's tables between README's zoo markers (from this process's
    run, else from the cells a full run left in ``bench/zoo.json``)."""
    from tests.zoo import HELD_OUT
    from tests.zoo_matrix import from_json, markdown, write_readme

    saved = ROOT / "bench" / "zoo.json"
    if "zoo" not in _LAST and saved.exists():
        cells = from_json(saved.read_text())
        _LAST["zoo"] = markdown([c for c in cells if c.model not in HELD_OUT])
        _LAST["held out"] = markdown([c for c in cells if c.model in HELD_OUT])
    if "zoo" not in _LAST:
        return False
    text = ("Architectures of issue 17:\n\n" + _LAST["zoo"])
    if "held out" in _LAST:
        text += ("\nHeld-out architectures and configurations (not used while fixing):\n\n"
                 + _LAST["held out"])
    return write_readme(text, ROOT / "README.md")
