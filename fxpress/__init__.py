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
    "compile": "fxpress.compiled", "CompiledModel": "fxpress.compiled",
    "set_decode": "fxpress.passes.decode", "decode_plan": "fxpress.passes.decode",
}
_SUBPACKAGES = ("graph", "passes", "plugins", "cli", "report", "onnx_export", "compiled")

if TYPE_CHECKING:  # for type checkers and IDEs
    from fxpress.graph.capture import capture
    from fxpress.passes.base import (Pass, PassContext, PassInfo, PassRegistry, PassResult,
                                     PassTraits, Tolerance, option)
    from fxpress.passes.distill_train import Distiller
    from fxpress.passes.instruments import GraphDumper, Instrument, PassTimer
    from fxpress.passes.pipeline import Pipeline
    from fxpress.passes.records import PassRecord, PipelineResult
    from fxpress.onnx_export import export_onnx
    from fxpress.compiled import CompiledModel, compile
    from fxpress.passes.decode import decode_plan, set_decode
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


def load(path: str | Path, *, max_bytes: int | None = None, limits: Any = None):
    """Load an artifact; runtime modules resolve against the registered passes' classes.

    >>> gm = fxpress.load("model.fxp")                                             # doctest: +SKIP

    ``max_bytes`` bounds the decoded tensors, ``limits`` (a
    ``fxpress.graph.artifact.Limits``) every other bound; see README "Threat model".
    """
    from fxpress.graph import artifact

    return artifact.load(path, registry().runtime_modules(), max_bytes=max_bytes, limits=limits)


def compress(model, pipeline: str | Pipeline | Iterable[Pass] | None = None,
             example_inputs: Any = None, *, target: Any = None, max_drop: float | None = None,
             metric: str = "cosine", evaluate: Any = None, candidates: Any = None,
             recovery: Any = "auto", entropy: bool = False, max_rounds: int = 5,
             calibration: Iterable[Any] | None = None, train_data: Any = None,
             policy: str | None = None, capture_method: str = "auto",
             instruments: Iterable[Instrument] = (), progress: bool | None = None,
             seed: int = 0, top1: bool | None = None, in_place: bool | None = None) -> PipelineResult:
    """Capture ``model`` and run ``pipeline`` on it, verifying after every pass; or, with
    ``target``/``max_drop`` and no pipeline, plan per-layer choices that meet them.

    ``pipeline`` is text (``"prune{sparsity=0.9},quantize{bits=8}"``), a :class:`Pipeline`
    or a list of passes. The caller's model, its train/eval flags and the process's random
    state are never changed. ``in_place=True`` rewrites one graph instead of a copy per
    pass: a weight copy less at the peak, no ``last_good`` (see :mod:`fxpress.passes.pipeline`).

    Options given in two places: a ``policy``, ``in_place`` or ``progress`` given here wins
    over the Pipeline's own (set when it was built, or by its recipe); None (the default)
    keeps the Pipeline's, and a pipeline built here from text or passes defaults to
    ``"strict"``, ``False`` and ``None``. ``instruments`` run after the Pipeline's own.

    Compress to a target (see :mod:`fxpress.passes.planner`)::

        res = fxpress.compress(model, (x,), target="40x", max_drop=0.005,
                               evaluate=val_accuracy, calibration=batches, train_data=train)
        res.plan.met, res.plan.missed, res.plan.toml      # did it, by how much not, the recipe

    ``target``: the file size as a fraction of the fp32 graph's (``0.16``) or a factor
    (``"40x"``); ``max_drop``: the budget, a drop in ``metric`` ("cosine", "top1", "rel_l2"
    against the original on the calibration batches) or in ``evaluate(module) -> score``.
    A miss of either is reported (``res.plan.missed``, a ``PlanMissedWarning``), never silent.
    """
    from fxpress.errors import InputError
    from fxpress.passes.base import _short
    from fxpress.passes.pipeline import Pipeline

    if target is not None or max_drop is not None:
        if pipeline is not None and not _looks_like_inputs(pipeline):
            raise errors.InputError("compress: give either a pipeline or target=/max_drop= "
                                    "(the planner writes the pipeline), not both")
        if pipeline is not None:
            if example_inputs is not None:
                raise errors.InputError("compress: example inputs given twice")
            example_inputs = pipeline
        from fxpress.passes.planner import compress_to_target

        return compress_to_target(
            model, registry(), example_inputs, target=target, max_drop=max_drop, metric=metric,
            evaluate=evaluate, calibration=calibration, train_data=train_data,
            candidates=candidates, recovery=recovery, entropy=entropy, max_rounds=max_rounds,
            seed=seed, progress=progress, pipeline_cls=Pipeline, capture_method=capture_method)
    if pipeline is None:
        raise errors.InputError("compress: give a pipeline (e.g. 'quantize{bits=8}') or a "
                                "target (target=0.16, target='40x') and/or max_drop=...")
    if isinstance(pipeline, str):
        pipe = Pipeline.parse(pipeline)
    elif isinstance(pipeline, Pipeline):
        pipe = pipeline
    elif isinstance(pipeline, (list, tuple)):
        pipe = Pipeline(list(pipeline))  # which names any item that is not a pass
    else:
        raise InputError(f"compress(): pipeline must be pipeline text such as "
                         f"'prune{{sparsity=0.5}}', a fxpress.Pipeline or a list of passes; got "
                         f"{type(pipeline).__name__} {_short(pipeline)}")
    return pipe.run(model, example_inputs, calibration=calibration, train_data=train_data,
                    policy=policy, capture_method=capture_method, seed=seed, top1=top1,
                    in_place=in_place, progress=progress, instruments=instruments)


def _looks_like_inputs(value: Any) -> bool:
    """Example inputs (a tensor, or a tuple of them) rather than a pipeline."""
    import torch

    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


__all__ = ["__version__", "capture", "compress", "Pipeline", "PipelineResult", "PassRecord",
           "Pass", "PassContext", "PassResult", "PassInfo", "PassTraits", "Tolerance", "option",
           "Instrument", "PassTimer", "GraphDumper", "registry", "list_passes", "hookimpl",
           "errors", "FxpressError", "Distiller", "save", "load", "export_onnx", "compile", "CompiledModel",
           "set_decode", "decode_plan"]
