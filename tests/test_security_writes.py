"""Nothing fxpress does writes outside the paths the user gave: capture -> compress -> save ->
load -> `fxpress run` of a recipe with an output -> inspect / diff / report, with a temp dir as cwd."""
from __future__ import annotations

import os
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

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


def test_every_file_the_cli_writes_replaces_a_link_and_refuses_a_fifo(tmp_path, capsys):
    """The report and artifacts were written atomically, but export-onnx, inspect's
    --dot/--graphml/--node-link and run's --json opened the path as it was: through a
    symbolic link into the file it points at, and into a FIFO (blocking until a reader came,
    or feeding one). Now each goes through the same atomic write: the link itself is
    replaced, a FIFO or device is refused with exit code 2 naming it."""
    import torch

    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    art = tmp_path / "m.fxp"
    fxpress.save(fxpress.capture(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()),
                                 torch.randn(2, 4)), art)
    (tmp_path / "m.py").write_text("import torch\ndef build():\n    torch.manual_seed(0)\n"
                                   "    return torch.nn.Linear(4, 3)\n"
                                   "def inputs():\n    return torch.randn(2, 4)\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "m.py:build"\nexample_inputs = "m.py:inputs"\n'
                      'pipeline = "prune{sparsity=0.3}"\npolicy = "warn"\n')
    commands = {"dot": ["inspect", str(art), "--dot"], "graphml": ["inspect", str(art), "--graphml"],
                "node-link": ["inspect", str(art), "--node-link"],
                "report": ["report", str(art), "-o"], "onnx": ["export-onnx", str(art), "-o"],
                "json": ["run", str(recipe), "--json"]}
    for name, argv in commands.items():
        victim, link = tmp_path / f"{name}.victim", tmp_path / f"{name}.link"
        victim.write_text("keep")
        link.symlink_to(victim)
        assert main([*argv, str(link)]) == 0, (name, capsys.readouterr())
        assert victim.read_text() == "keep", name
        assert link.is_file() and not link.is_symlink() and link.stat().st_size > 0, name
        fifo = tmp_path / f"{name}.fifo"
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the write would not block
        try:
            code = main([*argv, str(fifo)])
            err = capsys.readouterr().err
            assert code == 2, (name, code, err)
            assert "FIFO" in err and str(fifo) in err, (name, err)
            assert os.read(reader, 1) == b"", name  # nothing went into the pipe
        finally:
            os.close(reader)
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode), name


def test_a_write_keeps_the_permissions_of_the_file_it_replaces(tmp_path):
    """A private file (0600) saved again became 0644, readable by everyone: the atomic
    write's temporary file took the default mode. It takes the replaced file's mode now
    (a new file: 0666 less the umask, read without setting it); a symbolic link at the
    path is replaced by a file of the default mode, its target left alone."""
    import torch

    from fxpress.graph.artifact import write_atomic

    target = tmp_path / "private.fxp"
    target.write_bytes(b"old")
    target.chmod(0o600)
    fxpress.save(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    write_atomic(tmp_path / "group.json", b"{}")
    (tmp_path / "group.json").chmod(0o640)
    write_atomic(tmp_path / "group.json", b"[]")
    assert stat.S_IMODE((tmp_path / "group.json").stat().st_mode) == 0o640
    umask = os.umask(0o022)
    os.umask(umask)
    write_atomic(tmp_path / "new.json", b"{}")
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o666 & ~umask
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_bytes(b"keep")
    elsewhere.chmod(0o600)
    (tmp_path / "link.json").symlink_to(elsewhere)
    write_atomic(tmp_path / "link.json", b"{}")
    assert not (tmp_path / "link.json").is_symlink() and elsewhere.read_bytes() == b"keep"
    assert stat.S_IMODE((tmp_path / "link.json").stat().st_mode) == 0o666 & ~umask
