"""Export graphs' pytree specs (their input and output structure) as artifacts store them.

A spec is JSON text: ``[1, node]`` with ``node = {"type", "context", "children_spec"}``.
Saving stores named-field outputs (transformers' ``ModelOutput`` classes and any other
pytree node whose context is a list of field names) as
:class:`fxpress.graph.outputs.ModelOutputs`, so loading needs no model library. Loading
checks the spec against a closed schema before torch parses it: known node types only,
contexts that are plain JSON (torch's parser would import the module an ``__enum__``
context names), bounded nesting. Files written before named-field outputs were converted
load too: a node type that this process has not registered and whose context is a list of
field names becomes ``ModelOutputs``.
"""
from __future__ import annotations

import json
from typing import Any

from torch.utils import _pytree as pytree

from fxpress.errors import ArtifactFormatError, ArtifactLimitError, UnsupportedGraphError
from fxpress.graph.outputs import SERIALIZED_NAME

#: node types stored as they are (besides ModelOutputs)
_BUILTIN = {"builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
            SERIALIZED_NAME}


def _field_names(context: Any) -> list[str] | None:
    try:
        keys = json.loads(context) if isinstance(context, str) else None
    except ValueError:
        return None
    if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
        return keys
    return None


def spec_for_file(spec: Any) -> str | None:
    """``treespec_dumps(spec)`` with named-field node types stored as ModelOutputs."""
    if spec is None:
        return None
    try:
        dumped = json.loads(pytree.treespec_dumps(spec))
    except Exception as e:
        raise UnsupportedGraphError(f"cannot store the graph's input/output structure: {e}") from None

    def walk(node: dict) -> None:
        t = node.get("type")
        if t is not None and t not in _BUILTIN and _field_names(node.get("context")) is not None:
            node["type"] = SERIALIZED_NAME
        for child in node.get("children_spec", []):
            walk(child)

    walk(dumped[1])
    return json.dumps(dumped)


def _plain_json(v: Any, depth: int) -> bool:
    if depth > 8:
        return False
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(_plain_json(x, depth + 1) for x in v)
    return False  # no objects: torch's parser reads {"__enum__": ...} as an import


def spec_from_file(text: Any, where: str, depth: int, nodes: int) -> Any:
    """The TreeSpec of a stored spec, checked first (see the module docstring)."""
    if not isinstance(text, str):
        raise ArtifactFormatError(f"{where}: a pytree spec must be JSON text")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ArtifactFormatError(f"{where}: pytree spec is not valid JSON") from None
    if not (isinstance(doc, list) and len(doc) == 2 and isinstance(doc[0], int)):
        raise ArtifactFormatError(f"{where}: pytree spec must be [protocol, tree]")
    count = 0

    def walk(node: Any, level: int) -> None:
        nonlocal count
        count += 1
        if level > depth or count > nodes:
            raise ArtifactLimitError(f"{where}: pytree spec nests deeper than {depth} levels or "
                                     f"holds more than {nodes} nodes")
        if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"} \
                or not isinstance(node["children_spec"], list):
            raise ArtifactFormatError(f"{where}: malformed pytree spec node")
        t, ctx = node["type"], node["context"]
        if t is None:
            if ctx is not None or node["children_spec"]:
                raise ArtifactFormatError(f"{where}: malformed pytree leaf")
            return
        if not isinstance(t, str) or not (ctx is None or isinstance(ctx, str)):
            raise ArtifactFormatError(f"{where}: malformed pytree spec node")
        try:
            parsed = json.loads(ctx) if ctx is not None else None
        except ValueError:
            raise ArtifactFormatError(f"{where}: pytree context of {t!r} is not JSON") from None
        if not _plain_json(parsed, 0):
            raise ArtifactFormatError(f"{where}: pytree context of {t!r} is not plain data")
        if t not in _BUILTIN:
            if _field_names(ctx) is not None and t not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
                node["type"] = SERIALIZED_NAME  # a named-field output of a library not loaded
            elif t not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
                raise ArtifactFormatError(
                    f"{where}: the graph's structure uses pytree type {t!r}, which this process "
                    "has not registered; import the library that defines it before loading")
        for child in node["children_spec"]:
            walk(child, level + 1)

    walk(doc[1], 0)
    try:
        return pytree.treespec_loads(json.dumps(doc))
    except Exception as e:
        raise ArtifactFormatError(f"{where}: pytree spec does not rebuild: "
                                  f"{type(e).__name__}: {e}") from None


__all__ = ["spec_for_file", "spec_from_file"]
