"""Passes, the pipeline that runs them and the verifier that checks them.

Names load lazily, so ``import fxpress.passes.base`` does not import the pipeline.
"""
from __future__ import annotations

from fxpress._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("EQUIVALENCE", "EXACT", "Pass", "PassContext", "PassInfo", "PassRegistry",
                     "PassResult", "PassTraits", "Tolerance", "option"), ".base"),
    **dict.fromkeys(("GraphDumper", "Instrument", "PassTimer"), ".instruments"),
    **dict.fromkeys(("PassRecord", "PipelineResult"), ".records"),
    "Pipeline": ".pipeline",
    **dict.fromkeys(("Metrics", "Verifier"), ".verify"),
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = sorted(_EXPORTS)
