"""The output structure artifacts store for models that return a named-field object.

transformers models return ``ModelOutput`` subclasses (``BaseModelOutput``,
``CausalLMOutputWithPast``, ...). An exported graph rebuilds its output with the pytree
node type it was captured with, and an artifact that named transformers' class could not
load in a process that has not imported transformers. Artifacts store such outputs as
:class:`ModelOutputs` instead: an ordered dict that also answers attribute and index
access, the ways people read a ``ModelOutput``.

>>> out = ModelOutputs(last_hidden_state=1, pooler_output=2)
>>> out["pooler_output"], out.pooler_output, out[0], out.to_tuple()
(2, 2, 1, (1, 2))
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch.utils import _pytree as pytree

#: the name artifacts store for ModelOutputs in pytree specs
SERIALIZED_NAME = "fxpress.ModelOutputs"


class ModelOutputs(OrderedDict):
    """Named outputs: ``out["logits"]``, ``out.logits`` and ``out[0]`` all work."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getitem__(name)
        except KeyError:
            raise AttributeError(f"ModelOutputs has no field {name!r}; fields: "
                                 f"{list(self.keys())}") from None

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __reduce__(self):  # a plain dict of the fields, for copy/deepcopy
        return (type(self), (), None, None, iter(self.items()))


def named_outputs(**fields: Any) -> ModelOutputs:
    """What an artifact calls where the graph built a dataclass output (see
    :func:`dataclass_fields`): the same fields, by name, as :class:`ModelOutputs`."""
    return ModelOutputs(fields)


def dataclass_fields(cls: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The fields a call ``cls(*args, **kwargs)`` gives a dataclass, by name (defaults of
    fields not given included when they are plain values); None when ``cls`` is no
    dataclass or the call does not fit its fields."""
    import dataclasses

    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return None
    init = [f for f in dataclasses.fields(cls) if f.init]
    if len(args) > len(init) or any(k not in {f.name for f in init} for k in kwargs):
        return None
    out = dict(zip((f.name for f in init), args))
    for f in init:
        if f.name in kwargs:
            out[f.name] = kwargs[f.name]
        elif f.name not in out:
            if f.default is dataclasses.MISSING or not (
                    f.default is None or isinstance(f.default, (bool, int, float, str))):
                return None
            out[f.name] = f.default
    return out


def plain_outputs(out: Any) -> Any:
    """``out`` with every dataclass instance (a user's output class, no pytree node) as a
    dict of its fields, recursively: pytree sees such an object as one leaf, not a tensor,
    and a model returning one was compared on nothing. ``pytree.tree_leaves(plain_outputs(
    out))`` lists the output's tensors in field order, as an artifact that stores the
    dataclass as :class:`ModelOutputs` gives them."""
    import dataclasses

    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return {f.name: plain_outputs(getattr(out, f.name)) for f in dataclasses.fields(out)}
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        return type(out)(plain_outputs(v) for v in out) if type(out) in (tuple, list) else out
    if type(out) is dict:
        return {k: plain_outputs(v) for k, v in out.items()}
    return out


def _flatten(out: ModelOutputs) -> tuple[list[Any], list[str]]:
    return list(out.values()), list(out.keys())


def _unflatten(values, context: list[str]) -> ModelOutputs:
    return ModelOutputs(zip(context, values))


def _flatten_with_keys(out: ModelOutputs):
    return [(pytree.MappingKey(k), v) for k, v in out.items()], list(out.keys())


pytree.register_pytree_node(ModelOutputs, _flatten, _unflatten, serialized_type_name=SERIALIZED_NAME,
                            flatten_with_keys_fn=_flatten_with_keys)

__all__ = ["ModelOutputs", "SERIALIZED_NAME", "plain_outputs"]
