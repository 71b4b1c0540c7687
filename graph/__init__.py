"""Graphs: capture, weighted ops, inspection and artifacts. Knows nothing of passes or plugins."""
from fxpress.graph.artifact import artifact_size, read_header
from fxpress.graph.capture import capture, capture_method, clone_structure, node_shape
from fxpress.graph.inspect import (GraphDiff, diff, format_layers, layers, stamp_changes, to_dot,
                                   to_networkx, to_node_link, write_dot, write_graphml,
                                   write_node_link)
from fxpress.graph.weights import (CompressedModule, WeightedOp, compressed_modules, select,
                                   stored_bytes, weighted_ops)

__all__ = ["capture", "capture_method", "clone_structure", "node_shape", "CompressedModule",
           "WeightedOp", "compressed_modules", "select", "stored_bytes", "weighted_ops",
           "to_networkx", "diff", "GraphDiff", "stamp_changes", "to_node_link", "write_node_link",
           "write_graphml", "to_dot", "write_dot", "layers", "format_layers", "read_header",
           "artifact_size"]
