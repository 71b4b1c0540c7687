import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fxpress
from fxpress.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_passes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "fxpress 0.1.0" in capsys.readouterr().out
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "prune  [builtin (fxpress)]" in out and "sparsity" in out
    # a pass with include takes per-layer rules, and the listing says how to write one
    assert out.count("    layers = {} (rules)") == sum(
        "include" in d["options"] for d in fxpress.list_passes().values()) >= 4
    assert main(["passes", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passes"]["prune"]["plugin"] == "builtin"


def test_run_demo_recipe_prints_the_table(capsys, tmp_path):
    out_json = tmp_path / "r.json"
    artifact = tmp_path / "digits.fxp"
    assert main(["run", str(ROOT / "examples" / "digits.toml"), "--json", str(out_json),
                 "-o", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "captured with fx" in out and "prune{" in out and "test accuracy:" in out
    data = json.loads(out_json.read_text())
    assert [r["status"] for r in data["records"]] == ["deferred", "ok", "ok", "ok"]
    before, after = data["evaluate_before"]["test accuracy"], data["evaluate_after"]["test accuracy"]
    assert before - after <= 0.005  # Deep Compression's recovery keeps accuracy
    assert artifact.stat().st_size * 15 < data["original_disk_bytes"]


def test_inspect_a_model_reference_says_how_it_was_traced(tmp_path, capsys):
    """`fxpress inspect file.py:callable` printed "captured with ?"."""
    (tmp_path / "m.py").write_text("import torch\n\ndef model():\n"
                                   "    return torch.nn.Sequential(torch.nn.Linear(4, 3))\n")
    assert main(["inspect", f"{tmp_path / 'm.py'}:model"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "captured with fx (symbolic_trace" in first and "?" not in first


def test_inspect_bits_have_three_significant_digits(tmp_path, capsys):
    """An int8 layer of 13 inputs stores 10.4615... bits per weight (codes, scales, bias):
    inspect printed "10.4615"; the report's table too."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(13, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)).eval()
    res = fxpress.compress(model, "quantize{bits=8}", calibration=[(torch.randn(32, 13),)])
    fxpress.save(res, tmp_path / "m.fxp")
    assert main(["inspect", str(tmp_path / "m.fxp")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if "QuantizedLinear" in line]
    bits = [r[4] for r in rows]
    assert len(bits) == 2 and "10.5" in bits and all(len(b.replace(".", "")) <= 3 for b in bits)
    assert main(["report", str(tmp_path / "m.fxp"), "-o", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert ">10.5<" in html and "10.4615" not in html


def _recipe(tmp_path, passes):
    shutil.copy(ROOT / "examples" / "digits.py", tmp_path / "digits.py")
    f = tmp_path / "r.toml"
    f.write_text('model = "digits.py:trained_mlp"\ncalibration = "digits.py:calibration"\n'
                 f'pipeline = "{passes}"\n')
    return f


def test_exit_code_1_on_verification_failure(tmp_path, capsys):
    assert main(["run", str(_recipe(tmp_path, "prune{sparsity=0.95}"))]) == 1
    assert "verification failed" in capsys.readouterr().err


@pytest.mark.parametrize("passes, fragment", [
    ("prnue{sparsity=0.5}", "did you mean 'prune'"),
    ("prune{sparsity=2}", "option 'sparsity'"),
])
def test_exit_code_2_on_bad_input(tmp_path, capsys, passes, fragment):
    assert main(["run", str(_recipe(tmp_path, passes))]) == 2
    assert fragment in capsys.readouterr().err


def test_exit_code_2_on_missing_recipe(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "fxpress"
    r = subprocess.run([str(exe), "passes"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "prune" in r.stdout


def test_run_in_place_gives_the_same_artifact_and_refuses_rollback(tmp_path, capsys):
    recipe = _recipe(tmp_path, "prune{sparsity=0.5},quantize{bits=8}")
    a, b = tmp_path / "a.fxp", tmp_path / "b.fxp"
    assert main(["run", str(recipe), "-o", str(a)]) == 0
    assert main(["run", str(recipe), "--in-place", "-o", str(b)]) == 0
    import fxpress
    import torch

    x = torch.rand(8, 64)
    assert torch.equal(fxpress.load(a)(x), fxpress.load(b)(x))
    capsys.readouterr()
    assert main(["run", str(recipe), "--in-place", "--policy", "rollback"]) == 2
    assert "in_place" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "report", "diff"])
def test_commands_name_a_folder_or_fifo_given_as_artifact_as_not_a_regular_file(
        tmp_path, capsys, command):
    # they said "no such file; give an artifact path or file.py:callable" of a path that is there
    import os

    pipe = tmp_path / "pipe.fxp"
    os.mkfifo(pipe)
    for bad in (pipe, tmp_path):
        argv = {"inspect": [str(bad)], "report": [str(bad), "-o", str(tmp_path / "r.html")],
                "diff": [str(bad), str(bad)]}[command]
        assert main([command, *argv]) == 2
        assert f"{bad} is not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, says", [("binary", "not UTF-8 text (byte 0)"),
                                          ("/dev/zero", "over 4,194,304 bytes")])
def test_a_recipe_that_is_no_text_file_is_refused_with_exit_code_2(tmp_path, capsys, recipe, says):
    # a binary recipe printed a raw UnicodeDecodeError with exit code 1 (a verification
    # failure's code); /dev/zero was read until the memory ran out
    if recipe == "binary":
        recipe = tmp_path / "r.toml"
        recipe.write_bytes(b"\xff\xfe\x00pipeline")
    assert main(["run", str(recipe)]) == 2
    assert says in capsys.readouterr().err
