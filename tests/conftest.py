"""Shared fixtures: real models on real data (digits MLP/CNN, pretrained MiniLM)."""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # examples/ holds the shared model and data helpers
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite sees the built-in passes only: a plugin installed in the environment (README's
# example, a user's own) must not change what the tests see. Tests that install a plugin
# of their own load it with entry_points=True or unset this variable.
os.environ["FXPRESS_DISABLE_PLUGINS"] = "1"

from examples import digits as _digits  # noqa: E402


def _worker_threads() -> None:
    """Under xdist, each worker gets its share of the cores as torch threads (one each for
    `make test`'s two workers on two cores), unless OMP_NUM_THREADS says otherwise. Two
    workers of two threads each on two cores spin against each other in every parallel
    region: the digits MLP trained in 20 s on one thread and in 296 s on two beside other
    work. Child processes the tests start inherit the count."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 2 or os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // workers)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_worker_threads()
_CACHE_OWNER: list = []


def pytest_configure(config):
    """One folder per run where the trained digits models are kept (examples/digits.py's
    FXPRESS_DIGITS_CACHE): the first process that needs a model trains it, the other worker
    and the recipes the CLI tests load (each a fresh copy of digits.py) read it back."""
    if not os.environ.get(_digits.CACHE_ENV):
        import tempfile

        os.environ[_digits.CACHE_ENV] = tempfile.mkdtemp(prefix="fxpress-digits-")
        _CACHE_OWNER.append(os.environ[_digits.CACHE_ENV])


def pytest_unconfigure(config):
    import shutil

    for folder in _CACHE_OWNER:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(_digits.CACHE_ENV, None)

#: the longest test files, collected first: `make test`'s two xdist workers (one file at a
#: time) start on them, so neither is left alone with a long file at the end. Ordered by
#: the per-file sums of an idle `-n 2 --dist loadfile --durations` run (round 16)
LONG_FIRST = ("test_bench_smoke.py", "test_zoo.py", "test_artifact_security.py", "test_readme.py",
              "test_onnx_export.py", "test_quantize.py", "test_share.py", "test_integration.py",
              "test_artifact.py", "test_distill.py", "test_binarize.py", "test_prune.py",
              "test_properties.py", "test_caller_guarantee.py", "test_cli.py", "test_recovery.py",
              "test_compile.py", "test_compile_matrix.py",
              "test_capture.py", "test_pipeline.py", "test_layer_rules.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


_gc_file: list = [None]


def pytest_runtest_setup(item):
    """Freeze what is alive before each test out of Python's garbage collector.

    Every pass ends with a full ``gc.collect()`` (passes/instruments.py: a replaced graph is a
    reference cycle holding its weights). In a test process that has imported torch,
    transformers and torch.export and holds captured models, one full collection walks about
    half a million objects (0.2-0.5 s idle): a third of the time of a pass-heavy file went
    there. Frozen objects (the imports, session and module fixtures, caches) are skipped, so a
    pass collects only what the test itself made, which is what its cycles are. The garbage of
    the previous test is collected before each freeze; at a new file everything is unfrozen
    first, so the module fixtures the last file dropped are collected too (one full collection
    per file)."""
    if item.path != _gc_file[0]:
        _gc_file[0] = item.path
        gc.unfreeze()
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def digits():
    return _digits.digits_data()


@pytest.fixture
def mlp():
    """A fresh copy of the trained 64-300-100-10 digits MLP."""
    return _digits.trained_mlp()


@pytest.fixture
def small_mlp():
    return _digits.trained_mlp(hidden=(32,), epochs=30)


@pytest.fixture
def cnn():
    return _digits.trained_cnn()


@pytest.fixture
def calib():
    return _digits.calibration()


@pytest.fixture(scope="session")
def minilm():
    from examples.minilm import sentence_encoder

    return sentence_encoder()


@pytest.fixture(scope="session")
def minilm_batches():
    from examples.minilm import batches

    return batches(32)[:2]


@pytest.fixture(scope="session")
def minilm_gm(minilm, minilm_batches):
    import fxpress

    return fxpress.capture(minilm, minilm_batches[0])


def _threads(count: int):
    n = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """Tiny MLPs train faster on one thread, and far faster on a busy machine."""
    yield from _threads(1)


@pytest.fixture
def two_threads():
    """Two torch threads (an xdist worker runs on one, where Inductor forks no threads)."""
    yield from _threads(2)


@pytest.fixture(scope="session")
def bert_batches():
    """Two batches of 8 tokenised sentences (MiniLM's tokenizer), for ``bert_gm``."""
    from examples.minilm import SENTENCES, batches

    return batches(8, SENTENCES[:16])


@pytest.fixture(scope="session")
def bert_gm(bert_batches):
    """A random BERT sentence encoder (2 layers, 32 wide, MiniLM's vocabulary and pooling)
    captured by torch.export: an export graph of the same BertModel code as ``minilm_gm``,
    for tests of what passes do on export graphs, at a fraction of MiniLM's cost. Weights
    drawn 5x wider than BERT's default init (std 0.1, not 0.02), so that each layer matters
    to the output as a trained model's do: a 50%-pruned layer costs cosine 0.97-0.99."""
    import fxpress
    from bench.models import random_bert
    from examples.minilm import tokenizer

    model = random_bert(hidden=32, layers=2, vocab=tokenizer().vocab_size, heads=2,
                        initializer_range=0.1)
    return fxpress.capture(model, bert_batches[0])
