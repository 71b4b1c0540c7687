"""Graphs: capture, weighted ops, inspection and artifacts. Knows nothing of passes or plugins."""
from fxpress.graph.capture import capture, capture_method, clone_structure, node_shape
from fxpress.graph.weights import (CompressedModule, WeightedOp, compressed_modules, select,
                                   stored_bytes, weighted_ops)

__all__ = ["capture", "capture_method", "clone_structure", "node_shape", "CompressedModule",
           "WeightedOp", "compressed_modules", "select", "stored_bytes", "weighted_ops"]
