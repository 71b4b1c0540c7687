"""The worst load of a crafted artifact at each of the loader's limits: time and memory.

Each file is built the way an attacker would (tests/helpers.py's ``tamper``: the header
edited and re-signed) just inside one default limit of ``fxpress.graph.artifact.Limits``
(or past it, where the refusal is what is timed), and loaded in a child process of its
own: wall seconds and the peak resident memory the load added (``VmHWM`` reset before
the load, minus ``VmRSS`` then; the imports paid before).

    python -m bench.crafted_load             # every file
    python -m bench.crafted_load nodes code  # only these
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ROOT


class _Relu(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x)


def _base() -> bytes:
    from fxpress.graph import artifact

    return artifact.dumps(torch.fx.symbolic_trace(_Relu()))


def _chain(names: list[str], fanin: int = 1) -> bytes:
    from tests.test_artifact_security import _relu_chain

    return _relu_chain(_base(), names, fanin)


def _modules(n: int) -> bytes:
    from tests.helpers import tamper

    return tamper(_base(), lambda h: h["modules"].extend(
        {"path": f"m{i}", "kind": "torch.nn", "class": "torch.nn.Identity", "config": {}}
        for i in range(n)))


def _tensors(n: int) -> bytes:
    from fxpress.graph import artifact

    gm = torch.fx.symbolic_trace(_Relu())
    sub = torch.nn.Module()
    for i in range(n):
        sub.register_buffer(f"b{i}", torch.tensor(float(i)))
    gm.add_submodule("sub", sub)
    return artifact.dumps(gm)


def _renames(n: int, resets: int) -> bytes:
    names = ["print"] + [f"print_{i}" for i in range(1, n + 1)]
    for k in range(resets):  # print_00 puts fx's counter back; print_<next> collides again
        names += ["print_" + "0" * (k + 2), f"print_{n + 1 + k}"]
    return _chain(names)


def files() -> dict[str, tuple[str, callable]]:
    """name -> (what it is, a function building it)"""
    from fxpress.graph.artifact import Limits

    lim = Limits()
    long = lambda i: "a" * 3990 + "%010d" % i  # noqa: E731 (a 4,000-character name)
    per = 12_100  # code characters a chained relu of a long name writes, as counted (12,027)
    return {
        "code": ("nodes of 4,000-character names, generated code just under code_chars",
                 lambda: _chain([long(i) for i in range(lim.code_chars // per)])),
        "code-fanin": ("20 nodes of 4,000-character names taking the 300 before each (refused)",
                       lambda: _chain([long(i) for i in range(20)], fanin=300)),
        "code-past": ("15,000 nodes of 4,000-character names (last round's file; refused)",
                      lambda: _chain([long(i) for i in range(15_000)])),
        "nodes": ("nodes just under the node limit, short names",
                  lambda: _chain([f"n{i}" for i in range(lim.nodes - 2)])),
        "modules": ("torch.nn.Identity modules just under the module limit",
                    lambda: _modules(lim.modules - 1)),
        "tensors": ("scalar buffers just under the tensor limit",
                    lambda: _tensors(lim.tensors - 1)),
        "renames": ("names fx renames, then collisions (quadratic before; refused)",
                    lambda: _renames(10_000, 2_000)),
    }


_CHILD = """
import sys, time
from fxpress.graph import artifact
def kb(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from now
before = kb("VmRSS")
t = time.perf_counter()
try:
    artifact.loads(data); out = "loaded"
except Exception as e:
    out = type(e).__name__
print(out, time.perf_counter() - t, (kb("VmHWM") - before) / 1024)
"""


def main(argv: list[str]) -> None:
    chosen = files()
    names = argv or list(chosen)
    print("| file | what | bytes | outcome | load s | peak MB added |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            what, build = chosen[name]
            data = build()
            path = Path(tmp) / f"{name}.fxp"
            path.write_bytes(data)
            r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], cwd=ROOT,
                               capture_output=True, text=True, timeout=600)
            out, secs, mb = r.stdout.split() if r.returncode == 0 else (
                f"child failed: {r.stderr[-200:]}", "nan", "nan")
            print(f"| {name} | {what} | {len(data):,} | {out} | {float(secs):.2f} | "
                  f"{float(mb):.0f} |", flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main(sys.argv[1:])
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
