"""The built-in passes, registered through the same hook as any third-party plugin."""
from __future__ import annotations

from fxpress.passes.distill import Distill
from fxpress.passes.fold import FoldBatchNorm
from fxpress.passes.prune import Prune
from fxpress.passes.binarize import Binarize
from fxpress.passes.budget import Budget
from fxpress.passes.quantize import Quantize
from fxpress.passes.share import Share
from fxpress.passes.small import Small
from fxpress.plugins.hookspecs import hookimpl

BUILTIN_PASSES = (Prune, Share, Quantize, Binarize, Distill, FoldBatchNorm, Small, Budget)


@hookimpl
def register_passes(register):
    for cls in BUILTIN_PASSES:
        register(cls)
