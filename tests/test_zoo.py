"""The zoo in the suite: a representative cell per architecture and failure class.

The full matrix (every zoo model x every built-in pass, plus held-out models) is
``python -m bench zoo``; these cells run it on a subset within the suite's budget. Each
cell captures the model, runs the pipeline, checks coverage, metrics, outputs on new
inputs and shapes, and save/load bit-exact in this process; then ONE fresh Python process
(importing neither transformers nor the zoo) loads every artifact and must reproduce the
outputs bit for bit. See tests/zoo_matrix.py.

A cell that is known to fail is marked xfail(strict=True) with its failure class, so a
fix flips it and the marker must go.
"""
from __future__ import annotations

import pytest

from tests.zoo_matrix import CLASSES, run_matrix

#: (model, pipeline column) -> None if it must pass, else the failure class it has today
SUITE: dict[tuple[str, str], str | None] = {
    ("bert", "quantize8"): None,
    ("distilbert", "share4"): None,
    ("gpt2", "prune"): None,
    ("llama", "quantize8"): None,
    ("t5", "share4"): None,
    ("vit", "ternary"): None,
    ("whisper_encoder", "prune+quantize8"): None,
    ("wav2vec2", "pow2"): None,
    ("resnet", "quantize8"): None,
    ("convnext", "share4"): None,
    ("transformer_encoder", "quantize8"): None,
    ("multihead_attention", "share4"): None,
    ("lstm", "prune"): None,
    ("gru", "quantize8"): None,
    ("conv_transpose", "quantize8"): None,
    ("tied_embeddings", "share4"): None,
    ("module_twice", "ternary"): None,
    ("inplace_ops", "prune+quantize8"): None,
    ("dict_outputs", "distill"): None,
}

#: failure classes of today's code, cell by cell (strict xfails: a fix must remove them)
KNOWN: dict[tuple[str, str], str] = {
    ("bert", "quantize8"): "1-fresh-load",
    ("distilbert", "share4"): "1-fresh-load",
    ("gpt2", "prune"): "2-cache-output",
    ("llama", "quantize8"): "2-cache-output",
    ("t5", "share4"): "2-cache-output",
    ("vit", "ternary"): "1-fresh-load",
    ("whisper_encoder", "prune+quantize8"): "1-fresh-load",
    ("wav2vec2", "pow2"): "1-fresh-load",
    ("resnet", "quantize8"): "1-fresh-load",
    ("convnext", "share4"): "5-lint-order",
    ("transformer_encoder", "quantize8"): "3-mha-rnn",
    ("multihead_attention", "share4"): "3-mha-rnn",
    ("lstm", "prune"): "3-mha-rnn",
    ("gru", "quantize8"): "3-mha-rnn",
    ("conv_transpose", "quantize8"): "4-conv-transpose",
    ("tied_embeddings", "share4"): "6-tied-twice",
    ("module_twice", "ternary"): "6-tied-twice",
}


class KnownFailure(AssertionError):
    """A cell failed with exactly the class KNOWN expects (anything else is a real failure)."""


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    cells = run_matrix([], cells=list(SUITE), workdir=tmp_path_factory.mktemp("zoo"))
    return {(c.model, c.column): c for c in cells}


def _params():
    for key in SUITE:
        marks = []
        if key in KNOWN:
            marks.append(pytest.mark.xfail(strict=True, raises=KnownFailure,
                                           reason=f"{KNOWN[key]}: {CLASSES.get(KNOWN[key], '')}"))
        yield pytest.param(key, id=f"{key[0]}-{key[1]}", marks=marks)


@pytest.mark.parametrize("key", list(_params()))
def test_zoo_cell(matrix, key):
    cell = matrix[key]
    if key in KNOWN and cell.status == "fail" and cell.failure == KNOWN[key]:
        raise KnownFailure(f"{cell.label()} at {cell.stage}: {cell.detail}")
    assert cell.status == "ok", f"{cell.label()} at {cell.stage}: {cell.detail}"


def test_fresh_process_imports_neither_transformers_nor_the_zoo(matrix):
    # run_matrix raises if the fresh process imported transformers, tests or examples;
    # every passing cell went through that process, transformers models among them
    ok = [c for c in matrix.values() if c.status == "ok"]
    assert ok and all(c.fresh for c in ok)
    reached = {c.model for c in matrix.values() if c.fresh or c.stage == "fresh"}
    assert {"bert", "dict_outputs"} <= reached
