"""README's Python snippets are self-contained and run, from a directory outside the
repository: the complete examples (those that start with imports) run as written, each
"# continues the first example" snippet runs after the first, and the rest compile."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _complete(block: str) -> bool:
    return block.lstrip().startswith(("import ", "from "))


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # one thread: float sums then come out the same whatever else runs on the machine (the
    # first example's recovery lands near its 0.99 accuracy-ratio limit, and a two-thread run
    # beside another test worker once fell to 0.988)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", FXPRESS_DISABLE_PLUGINS="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_snippets_do_not_reach_into_the_repository():
    assert BLOCKS
    for block in BLOCKS:
        compile(block, "README.md", "exec")
        assert "from examples" not in block and "import examples" not in block, block
    assert any("transformers" in b and "export_onnx" in b for b in BLOCKS)


def test_first_example_and_its_continuations_run(tmp_path):
    first = next(b for b in BLOCKS if _complete(b))
    continued = [b for b in BLOCKS if b.lstrip().startswith("# continues the first example")]
    assert continued
    r = _run("\n".join([first] + continued), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "digits.fxp").is_file() and "share{bits=4,bias_bits=8}" in r.stdout


@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if _complete(b)][1:])
def test_other_complete_examples_run(index, tmp_path):
    if "onnx" in BLOCKS[index]:
        pytest.importorskip("onnxruntime")
    r = _run(BLOCKS[index], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
