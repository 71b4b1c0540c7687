"""The CLI never replaces a file it reads, and hostile recipe tables are typed errors.

``fxpress report a.fxp -o a.fxp`` replaced the artifact with its HTML page, and
``fxpress run r.toml -o r.toml`` (or ``--json r.toml``) the recipe with the artifact, both
with exit code 0. Now each is exit code 2 (bad input, README "Command line") naming both
paths, before anything is written (the failure's --json outcome included), whatever
spelling (``..``, a symbolic link) names the file. ``pass = ["prune"]`` in a recipe raised
a raw ValueError.
"""
from __future__ import annotations

import os

import pytest
import torch

import fxpress
from fxpress.cli import main

MODEL = """import torch
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4)).eval()
def calibration():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 16, generator=g),) for _ in range(2)]
"""


@pytest.fixture
def recipe(tmp_path):
    (tmp_path / "m.py").write_text(MODEL)
    f = tmp_path / "r.toml"
    f.write_text('model = "m.py:model"\ncalibration = "m.py:calibration"\npolicy = "warn"\n'
                 '[[pass]]\nname = "prune"\nsparsity = 0.5\n')
    return f


@pytest.fixture
def artifact(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 4)).eval()
    res = fxpress.compress(model, "prune{sparsity=0.5}", (torch.randn(8, 16),), progress=False,
                           policy="warn")
    path = tmp_path / "a.fxp"
    fxpress.save(res, path)
    return path


def _unchanged(paths, capsys, *argv, match):
    before = {p: p.read_bytes() for p in paths}
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "writing it would replace that file; give another path" in err, err
    assert {p: p.read_bytes() for p in paths} == before


@pytest.mark.parametrize("flag, target, what", [
    ("-o", "r.toml", "recipe"), ("-o", "m.py", "recipe's model file"),
    ("--json", "r.toml", "recipe"), ("--json", "m.py", "recipe's model file")])
def test_run_never_writes_over_its_recipe_or_model_file(recipe, tmp_path, capsys, flag, target,
                                                        what):
    other = ["-o", str(tmp_path / "out.fxp")] if flag == "--json" else []
    _unchanged([recipe, tmp_path / "m.py"], capsys, "run", recipe, flag, tmp_path / target,
               *other, match=f"is also the command's {what} ")
    assert not (tmp_path / "out.fxp").exists()


def test_run_json_and_output_on_one_path_is_refused(recipe, tmp_path, capsys):
    out = tmp_path / "both"
    assert main(["run", str(recipe), "-o", str(out), "--json", str(out)]) == 2
    assert "is also the command's output" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("spelling", ["same", "dotdot", "link"])
@pytest.mark.parametrize("command", ["report", "export-onnx", "inspect"])
def test_report_export_and_inspect_never_write_over_the_artifact(artifact, tmp_path, capsys,
                                                                  command, spelling):
    read = artifact
    out = artifact
    if spelling == "dotdot":
        out = tmp_path / ".." / tmp_path.name / artifact.name
    elif spelling == "link":  # the artifact read through a link, written by its own name
        read = tmp_path / "link.fxp"
        os.symlink(artifact, read)
    flag = "--dot" if command == "inspect" else "-o"
    _unchanged([artifact], capsys, command, read, flag, out, match="is also the command's")


def test_writing_through_to_a_link_replaces_the_link_not_the_artifact(artifact, tmp_path, capsys):
    link = tmp_path / "page.html"
    os.symlink(artifact, link)
    before = artifact.read_bytes()
    assert main(["report", str(artifact), "-o", str(link)]) == 0
    assert artifact.read_bytes() == before and not link.is_symlink()


@pytest.mark.parametrize("passes, match", [
    ('pass = ["prune"]', "'pass' must be an array of tables ([[pass]] with name = \"...\"); "
                         "entry 1 is str 'prune'"),
    ('pass = [{name = "prune"}, 5]', "entry 2 is int 5"),
    ('[[pass]]\nname = 5', "[[pass]] number 1: name must be a string such as \"prune\", got int 5"),
    ('[[pass]]\nname = ["prune"]', "got list ['prune']")])
def test_pass_entries_that_are_not_named_tables_are_named(tmp_path, capsys, passes, match):
    (tmp_path / "m.py").write_text(MODEL)
    f = tmp_path / "r.toml"
    f.write_text(f'model = "m.py:model"\n{passes}\n')
    assert main(["run", str(f)]) == 2
    assert match in capsys.readouterr().err
