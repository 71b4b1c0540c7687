"""Artifacts of transformers models load without transformers (issue 17, item 1).

The output structure of an exported model (a ``ModelOutput`` subclass) is stored as
fxpress's own :class:`~fxpress.graph.outputs.ModelOutputs`: key, attribute and index access
keep working, and a fresh process that never imports transformers loads and runs the file.
Files written before (the structure stored by transformers' class name) load there too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxpress
from fxpress.graph import artifact
from fxpress.graph.outputs import ModelOutputs
from tests.helpers import tamper

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    import fxpress, safetensors.torch
    io = safetensors.torch.load_file(sys.argv[2])
    gm = fxpress.load(sys.argv[1])
    with torch.no_grad():
        out = gm(io["ids"])
    assert "transformers" not in sys.modules, "loading imported transformers"
    for i, key in enumerate(("last_hidden_state", "pooler_output")):
        assert torch.equal(out[key], io[key]), key          # key access, bit for bit
        assert torch.equal(getattr(out, key), io[key]), key  # attribute access
        assert torch.equal(out[i], io[key]), i               # index access
    assert type(out).__name__ == "ModelOutputs" and list(out) == ["last_hidden_state", "pooler_output"]
    assert "transformers" not in sys.modules
    print("FRESH OK")
""")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=37)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 99, (2, 7))
    gm = fxpress.capture(model, (ids,), method="export")
    path = tmp_path_factory.mktemp("bert") / "bert.fxp"
    fxpress.save(gm, path)
    with torch.no_grad():
        expected = model(ids)
    return path, ids, expected


def _fresh(path: Path, io: dict[str, torch.Tensor], tmp_path: Path) -> None:
    import safetensors.torch

    io_path = tmp_path / "io.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in io.items()}, io_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(io_path)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env={**env, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "FRESH OK" in r.stdout, r.stderr[-3000:]


def test_outputs_keep_key_attribute_and_index_access(bert):
    path, ids, expected = bert
    header = artifact.read_header(path)
    assert "transformers" not in header["graph"]["codegen"]["out_spec"]
    gm = fxpress.load(path)
    with torch.no_grad():
        out = gm(ids)
    assert isinstance(out, ModelOutputs)
    for i, key in enumerate(("last_hidden_state", "pooler_output")):
        assert torch.allclose(out[key], expected[key], atol=1e-5)
        assert torch.equal(getattr(out, key), out[key]) and torch.equal(out[i], out[key])
    assert out.to_tuple()[0] is out.last_hidden_state
    with pytest.raises(AttributeError, match="fields"):
        out.logits


def test_bert_loads_and_runs_in_a_fresh_process_without_transformers(bert, tmp_path):
    path, ids, _ = bert
    with torch.no_grad():
        out = fxpress.load(path)(ids)
    _fresh(path, {"ids": ids, "last_hidden_state": out.last_hidden_state,
                  "pooler_output": out.pooler_output}, tmp_path)


def test_files_naming_transformers_classes_still_load_without_it(bert, tmp_path):
    # what fxpress wrote before: the output structure by transformers' class name
    path, ids, _ = bert
    def old(h):
        spec = json.loads(h["graph"]["codegen"]["out_spec"])
        spec[1]["type"] = "transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions"
        h["graph"]["codegen"]["out_spec"] = json.dumps(spec)
    old_path = tmp_path / "old.fxp"
    old_path.write_bytes(tamper(path.read_bytes(), old))
    with torch.no_grad():
        out = fxpress.load(old_path)(ids)
    _fresh(old_path, {"ids": ids, "last_hidden_state": out["last_hidden_state"],
                      "pooler_output": out["pooler_output"]}, tmp_path)


@dataclasses.dataclass
class _Detections:
    logits: torch.Tensor
    heads: tuple
    stride: int = 8


class _DataclassNet(torch.nn.Module):
    """A hand-written net returning a plain dataclass (not a ModelOutput) holding a tuple of
    dicts: symbolic trace records a call to the dataclass, which no artifact may name."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.box = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return _Detections(self.head(h), ({"box": self.box(h)}, {"score": self.head(h).sigmoid()}))


def test_a_dataclass_output_is_stored_as_model_outputs(tmp_path):
    # every pass failed on such a model: the record's size estimate, and save, refused the
    # graph's call to the dataclass ("not an allowlisted function")
    torch.manual_seed(0)
    model, x = _DataclassNet().eval(), torch.randn(5, 6)
    res = fxpress.compress(model, "quantize", example_inputs=(x,), progress=False)
    assert isinstance(res.module(x), _Detections)  # in memory: the model's own class
    fxpress.save(res, tmp_path / "m.fxp")
    out, ref = fxpress.load(tmp_path / "m.fxp")(x), res.module(x)
    assert isinstance(out, ModelOutputs) and list(out) == ["logits", "heads", "stride"]
    assert torch.equal(out.logits, ref.logits) and out.stride == 8
    assert torch.equal(out.heads[0]["box"], ref.heads[0]["box"])
    assert torch.equal(out["heads"][1]["score"], ref.heads[1]["score"])
