"""Nothing fxpress does writes outside the paths the user gave: capture -> compress -> save ->
load -> `fxpress run` of a recipe with an output -> inspect / diff / report, with a temp dir as cwd."""
from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import fxpress
from fxpress.cli import main

ROOT = Path(__file__).resolve().parents[1]
IGNORED = {"__pycache__", ".hypothesis", ".pytest_cache"}


def _listing(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in IGNORED and d != ".venv" and d != ".git"]
        out.update(str(Path(dirpath, f).relative_to(root)) for f in filenames)
    return out


def _repo_files() -> set[str]:
    r = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    return {p for p in r.stdout.splitlines() if not set(Path(p).parts) & IGNORED}


def test_nothing_is_written_outside_the_given_paths(tmp_path, monkeypatch, capsys):
    from examples.digits import calibration, trained_mlp

    work, outdir = tmp_path / "cwd", tmp_path / "out"
    work.mkdir(), outdir.mkdir()
    (work / "m.py").write_text(textwrap.dedent('''
        import sys
        sys.path.insert(0, %r)
        from examples.digits import trained_mlp, calibration
        def build():
            return trained_mlp(hidden=(32,), epochs=3)
        def inputs():
            return calibration(1, 32)[0]
    ''' % str(ROOT)))
    (work / "r.toml").write_text('model = "m.py:build"\nexample_inputs = "m.py:inputs"\n'
                                 'pipeline = "prune{sparsity=0.3}"\npolicy = "warn"\n'
                                 f'output = "{outdir / "run.fxp"}"\n')
    monkeypatch.chdir(work)
    before = (_listing(work), _listing(tmp_path), _repo_files())

    model, calib = trained_mlp(hidden=(32,), epochs=3), calibration(1, 32)
    gm = fxpress.capture(model, calib[0])
    res = fxpress.compress(model, "prune{sparsity=0.3},distill", calibration=calib,
                           policy="warn", progress=False)
    fxpress.save(res, outdir / "api.fxp")
    loaded = fxpress.load(outdir / "api.fxp")
    assert loaded is not None and gm is not None
    assert main(["run", "r.toml"]) == 0
    assert main(["inspect", str(outdir / "run.fxp")]) == 0
    assert main(["report", str(outdir / "run.fxp"), "-o", str(outdir / "report.html")]) == 0
    capsys.readouterr()

    after = (_listing(work), _listing(tmp_path), _repo_files())
    given = {"out/api.fxp", "out/run.fxp", "out/report.html"}
    assert after[0] == before[0], after[0] - before[0]
    assert after[1] - before[1] == given
    assert after[2] == before[2], after[2] - before[2]
