"""How much a file may make :func:`~fxpress.graph.artifact.load` read, parse and allocate.

Every limit is checked before the memory or time it bounds is spent: the stored header's
length against the prefix, the header's JSON text before it is parsed, node, module and
tensor counts before anything is built, every declared stream and tensor size before a
byte is decoded. A file over a limit raises
:class:`~fxpress.errors.ArtifactLimitError` naming the limit and how to raise it.

>>> Limits().decoded_limit(10_000) == max(Limits().floor, 10_000 * Limits().expansion)
True
>>> Limits(max_bytes=1 << 40).decoded_limit(10_000)
1099511627776
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from fxpress.errors import InputError


@dataclass(frozen=True)
class Limits:
    """The loader's bounds; override any of them per call: ``fxpress.load(path,
    max_bytes=...)`` or ``fxpress.load(path, limits=Limits(nodes=500_000))``."""

    #: decoded tensors (plus every decoded stream) may total at most this many bytes;
    #: ``None``: ``max(floor, expansion x file size)``
    max_bytes: int | None = None
    #: ... the file size times this, when ``max_bytes`` is not given
    expansion: int = 10_000
    #: ... but never less than this (small files of real models stay loadable)
    floor: int = 256 << 20
    #: the header as stored (compressed), and as JSON text once decompressed
    header_bytes: int = 16 << 20
    header_text_bytes: int = 64 << 20
    #: objects and arrays in the header's JSON (counted on the text, before parsing)
    json_containers: int = 2_000_000
    #: nesting of JSON values, of tagged values (tuples in tuples ...) and of modules
    depth: int = 64
    #: graph nodes, module entries, tensor entries (each loads in ~0.2 ms: 50,000 nodes
    #: 8.7 s, python -m bench.crafted_load; Llama with 32 layers has 2,516 nodes)
    nodes: int = 50_000
    modules: int = 20_000
    tensors: int = 50_000
    #: characters in a name, target, class name or string value of the graph and modules
    string: int = 4096
    #: characters of the Python code torch.fx generates for the graph, counted on the header
    #: before anything is built: each node's name and target, each reference to a node (its
    #: name again) and each string argument. A name is short in the file (a version 3
    #: reference is a distance back, a derived name is not stored) but written into the
    #: code at every use, and building and compiling the code costs ~0.1 µs and ~6 bytes
    #: of memory a character (python -m bench.crafted_load); the biggest real graphs write
    #: ~0.3 M (Llama with 32 layers, 2,516 nodes: 267,125 characters)
    code_chars: int = 16 << 20
    #: decoded bytes of all ``acW``-coded streams together (graph/artifact/arith.py decodes
    #: in Python, ~4 µs of CPU a byte: this bounds a file's decoding to seconds); writers
    #: stay under the default
    arith_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name == "max_bytes":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InputError(f"Limits.{f.name} must be a non-negative int, got {v!r}")

    def decoded_limit(self, file_size: int) -> int:
        """Bytes the tensors of a ``file_size``-byte file may decode to."""
        if self.max_bytes is not None:
            return self.max_bytes
        return max(self.floor, self.expansion * file_size)

    def with_overrides(self, **kw: Any) -> "Limits":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


DEFAULT_LIMITS = Limits()


def resolve(limits: Limits | None, max_bytes: int | None) -> Limits:
    """The limits of one call: ``limits`` (or the defaults), with ``max_bytes`` over them."""
    if limits is not None and not isinstance(limits, Limits):
        raise InputError(f"limits must be a fxpress.graph.artifact.Limits, got "
                         f"{type(limits).__name__}")
    base = limits or DEFAULT_LIMITS
    if max_bytes is not None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise InputError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        base = replace(base, max_bytes=max_bytes)
    return base


__all__ = ["Limits", "DEFAULT_LIMITS", "resolve"]
