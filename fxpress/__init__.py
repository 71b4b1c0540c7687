"""fxpress: make PyTorch models smaller and faster by rewriting their torch.fx graphs.

>>> import fxpress, torch
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> res = fxpress.compress(model, "prune{sparsity=0.5,tol.min_cosine=0}", example_inputs=(torch.randn(4, 8),))
>>> res.records[0].stats["sparsity"]
0.5
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from fxpress import errors
from fxpress._lazy import lazy_exports
from fxpress.errors import FxpressError

__version__ = "0.1.0"

# The public face loads lazily: ``import fxpress`` (or ``fxpress.errors``) imports neither
# torch.fx nor the passes, the plugins or the CLI; each name below imports its module on
# first use (PEP 562).
_LAZY = {
    "capture": "fxpress.graph.capture",
    "Pipeline": "fxpress.passes.pipeline", "PipelineResult": "fxpress.passes.records",
    "PassRecord": "fxpress.passes.records",
    "Pass": "fxpress.passes.base", "PassContext": "fxpress.passes.base",
    "PassInfo": "fxpress.passes.base", "PassResult": "fxpress.passes.base",
    "PassTraits": "fxpress.passes.base", "Tolerance": "fxpress.passes.base",
    "option": "fxpress.passes.base",
    "Instrument": "fxpress.passes.instruments", "PassTimer": "fxpress.passes.instruments",
    "GraphDumper": "fxpress.passes.instruments",
    "Distiller": "fxpress.passes.distill_train",
    "hookimpl": "fxpress.plugins.hookspecs",
    "export_onnx": "fxpress.onnx_export",
}
_SUBPACKAGES = ("graph", "passes", "plugins", "cli", "report", "onnx_export")

if TYPE_CHECKING:  # for type checkers and IDEs
    from fxpress.graph.capture import capture
    from fxpress.passes.base import (Pass, PassContext, PassInfo, PassRegistry, PassResult,
                                     PassTraits, Tolerance, option)
    from fxpress.passes.distill_train import Distiller
    from fxpress.passes.instruments import GraphDumper, Instrument, PassTimer
    from fxpress.passes.pipeline import Pipeline
    from fxpress.passes.records import PassRecord, PipelineResult
    from fxpress.onnx_export import export_onnx
    from fxpress.plugins.hookspecs import hookimpl


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY, _SUBPACKAGES)


@functools.lru_cache(maxsize=None)
def _cached_registry():
    from fxpress.plugins.manager import load_registry

    return load_registry()


def registry(reload: bool = False, *, entry_points: bool | None = None) -> "PassRegistry":
    """The pass registry (built-ins and installed plugins), loaded once and cached.

    ``reload=True`` scans the entry points again (after installing a plugin);
    ``entry_points=False`` returns the built-ins only, uncached.
    """
    if entry_points is not None:
        from fxpress.plugins.manager import load_registry

        return load_registry(entry_points=entry_points)
    if reload:
        _cached_registry.cache_clear()
    return _cached_registry()


def list_passes() -> dict[str, dict]:
    """name -> summary, options, default tolerance, plugin and distribution of every pass."""
    return {name: info.describe() for name, info in sorted(registry().items())}


def save(module, path: str | Path, *, entropy: bool = False, report: Any = None) -> int:
    """Save a GraphModule (or a :class:`PipelineResult`, with its records and the per-layer
    baseline embedded for ``fxpress report``) as one artifact; return its size in bytes.

    >>> res = fxpress.compress(model, "prune{sparsity=0.9}", calibration=batches)  # doctest: +SKIP
    >>> fxpress.save(res, "model.fxp")                                             # doctest: +SKIP
    """
    from fxpress.graph import artifact
    from fxpress.passes.records import PipelineResult

    if isinstance(module, PipelineResult):
        report = {**module.as_dict(), **(report or {})} if report is None or isinstance(report, dict) \
            else report
        module = module.module
    return artifact.save(module, path, entropy=entropy, report=report)


def load(path: str | Path, *, max_bytes: int | None = None):
    """Load an artifact; runtime modules resolve against the registered passes' classes.

    >>> gm = fxpress.load("model.fxp")                                             # doctest: +SKIP
    """
    from fxpress.graph import artifact

    return artifact.load(path, registry().runtime_modules(), max_bytes=max_bytes)


def compress(model, pipeline: str | Pipeline | Iterable[Pass], example_inputs: Any = None, *,
             calibration: Iterable[Any] | None = None, train_data: Any = None,
             policy: str = "strict", capture_method: str = "auto",
             instruments: Iterable[Instrument] = (), progress: bool | None = None,
             seed: int = 0, top1: bool | None = None, in_place: bool | None = None) -> PipelineResult:
    """Capture ``model`` and run ``pipeline`` on it, verifying after every pass.

    ``pipeline`` is text (``"prune{sparsity=0.9},quantize{bits=8}"``), a :class:`Pipeline`
    or a list of passes. The caller's model is never modified. ``in_place=True`` rewrites
    one graph instead of a copy per pass: a weight copy less at the peak, no ``last_good``
    (see :mod:`fxpress.passes.pipeline`).
    """
    from fxpress.passes.pipeline import Pipeline

    if isinstance(pipeline, str):
        pipe = Pipeline.parse(pipeline, policy=policy, instruments=instruments, progress=progress)
    elif isinstance(pipeline, Pipeline):
        pipe = pipeline
    else:
        pipe = Pipeline(list(pipeline), policy=policy, instruments=instruments, progress=progress)
    return pipe.run(model, example_inputs, calibration=calibration, train_data=train_data,
                    policy=policy, capture_method=capture_method, seed=seed, top1=top1,
                    in_place=in_place)


__all__ = ["__version__", "capture", "compress", "Pipeline", "PipelineResult", "PassRecord",
           "Pass", "PassContext", "PassResult", "PassInfo", "PassTraits", "Tolerance", "option",
           "Instrument", "PassTimer", "GraphDumper", "registry", "list_passes", "hookimpl",
           "errors", "FxpressError", "Distiller", "save", "load", "export_onnx"]
