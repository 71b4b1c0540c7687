"""The CLI explains its outcomes: a strict verification failure prints the failing pass's
record with every missed metric, ``--json`` is written on every outcome, and a closed
stdout (``fxpress passes | head``) ends quietly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fxpress.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, pipeline: str, extra: str = "") -> Path:
    (tmp_path / "digits_ref.py").write_text("from examples.digits import calibration, trained_mlp\n")
    r = tmp_path / "r.toml"
    r.write_text(f'model = "digits_ref.py:trained_mlp"\ncalibration = "digits_ref.py:calibration"\n'
                 f'pipeline = "{pipeline}"\n{extra}')
    return r


def test_strict_failure_prints_the_record_and_writes_json(tmp_path, capsys):
    out = tmp_path / "outcome.json"
    code = main(["run", str(_recipe(tmp_path, "prune{sparsity=0.995}")), "--json", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "the record of pass #1" in err and "prune{sparsity=0.995}" in err
    assert "min_cosine" in err and "min_top1" in err  # every missed metric, not the first
    data = json.loads(out.read_text())
    assert data["status"] == "verification_failed" and data["exit_code"] == 1
    rec = data["failed_record"]
    assert rec["status"] == "failed" and rec["cumulative"]["cosine"] < 0.9
    assert "min_top1" in data["error"]["message"] and "min_cosine" in data["error"]["message"]


def test_bad_input_writes_json_too(tmp_path, capsys):
    out = tmp_path / "outcome.json"
    bad = tmp_path / "bad.toml"
    bad.write_text('pipeline = "prune{sparsity=2}"\n')
    assert main(["run", str(bad), "--json", str(out)]) == 2
    data = json.loads(out.read_text())
    assert data["status"] == "error" and data["exit_code"] == 2
    assert "sparsity" in data["error"]["message"] and data["error"]["type"]
    assert "sparsity" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.fxp"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["status"] == "error"


def test_closed_stdout_is_not_a_traceback():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fxpress.cli", "passes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    proc.stdout.close()  # the reader is gone before fxpress writes a byte, as with `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
