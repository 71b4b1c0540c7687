"""Passes, the pipeline that runs them and the verifier that checks them."""
from fxpress.passes.base import (EQUIVALENCE, EXACT, Pass, PassContext, PassInfo, PassRegistry,
                                 PassResult, Tolerance, option)
from fxpress.passes.pipeline import (GraphDumper, Instrument, PassRecord, PassTimer, Pipeline,
                                     PipelineResult)
from fxpress.passes.verify import Metrics, Verifier

__all__ = ["EQUIVALENCE", "EXACT", "Pass", "PassContext", "PassInfo", "PassRegistry", "PassResult",
           "Tolerance", "option", "GraphDumper", "Instrument", "PassRecord", "PassTimer",
           "Pipeline", "PipelineResult", "Metrics", "Verifier"]
