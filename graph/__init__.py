"""Graphs: capture, weighted ops, runtime modules, inspection and artifacts.

Knows nothing of passes or plugins. Names other than capture's load lazily:
``fxpress.graph.weighted_ops`` imports :mod:`fxpress.graph.weights` on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from fxpress._lazy import lazy_exports

#: public name -> the submodule that defines it
_EXPORTS = {
    "WeightedOp": ".weights", "weighted_ops": ".weights", "select": ".weights",
    "CompressedModule": ".runtime", "RuntimeModule": ".runtime", "compressed_modules": ".runtime",
    "stored_bytes": ".memory",
    "to_networkx": ".inspect", "diff": ".inspect", "GraphDiff": ".inspect",
    "stamp_changes": ".inspect", "to_node_link": ".inspect", "write_node_link": ".inspect",
    "write_graphml": ".inspect", "to_dot": ".inspect", "write_dot": ".inspect",
    "layers": ".inspect", "format_layers": ".inspect",
    "read_header": ".artifact", "artifact_size": ".artifact",
}
_SUBMODULES = ("artifact", "capture", "inspect", "memory", "packing", "runtime",
               "weights")

# eager: the function ``capture`` must shadow the submodule of the same name, as it always did
from fxpress.graph.capture import capture, capture_method, clone_structure, node_shape  # noqa: E402

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads on demand
    from fxpress.graph.artifact import artifact_size, read_header
    from fxpress.graph.inspect import (GraphDiff, diff, format_layers, layers, stamp_changes,
                                       to_dot, to_networkx, to_node_link, write_dot,
                                       write_graphml, write_node_link)
    from fxpress.graph.memory import stored_bytes
    from fxpress.graph.runtime import CompressedModule, RuntimeModule, compressed_modules
    from fxpress.graph.weights import WeightedOp, select, weighted_ops


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, _SUBMODULES)

__all__ = ["capture", "capture_method", "clone_structure", "node_shape", *sorted(_EXPORTS)]
