"""Per-layer options: rules that override a pass's options on the layers they match.

In pipeline text a pass takes ``layers={pattern={option=value,...},...}``::

    quantize{bits=4,granularity=group,group_size=64,layers={"*.output.dense"={bits=8,granularity=channel,group_size=none}}}

and in a TOML recipe a table per rule under its ``[[pass]]``::

    [[pass]]
    name = "quantize"
    bits = 4
    [pass.layers."*.output.dense"]
    bits = 8

A pattern is a glob over the layer name (``encoder.layer.0.output.dense``) or its weight's
name (``...dense.weight``), or, with a ``re:`` prefix, a regular expression that must
match the whole name. Every rule that matches a layer applies, in order: later rules win.
A rule may set any option of the pass except ``include``, ``exclude`` and tolerances
(those select layers or judge the whole pass). Rules are checked when the pass is built:
an unknown option, a bad value, a bad regular expression, or a combination the pass
refuses for the layer's options names the rule. A rule that matches no weighted op when
the pass runs is an error too (a typo would otherwise silently change nothing).

The pass runs once over the layers no rule touched and once per distinct set of
overrides, each time restricted to those layers with ``include``; so a ``scope=global``
option spans only the layers that share its options.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fxpress.errors import OptionError
from fxpress.graph.weights import select, weighted_ops

#: Options a rule may not set: they choose the layers, or judge the whole pass.
NOT_PER_LAYER = ("include", "exclude", "layers", "tol")


@dataclass(frozen=True)
class LayerRule:
    """``pattern`` (glob, or ``re:`` + a regular expression) and the options it sets."""

    pattern: str
    options: tuple[tuple[str, Any], ...]

    @property
    def where(self) -> str:
        return f"layers[{self.pattern!r}]"

    def matches(self, *names: str) -> bool:
        if self.pattern.startswith("re:"):
            rx = re.compile(self.pattern[3:])
            return any(rx.fullmatch(n) for n in names)
        return any(fnmatch.fnmatchcase(n, self.pattern) for n in names)


def glob_hint(pattern: str, names: Sequence[str]) -> str:
    """" (did you mean '...'?)" for a glob that matches none of ``names`` but would with its
    misspelt parts (dot-separated, without wildcards) replaced by the closest part of a name
    ("*.classifer" -> "*.classifier", "bert.encoder.layers.*" -> "bert.encoder.layer.*"); ""
    where none does (and for "re:" patterns)."""
    if pattern.startswith("re:"):
        return ""
    parts = {part for n in names for part in n.split(".")}
    fixed = []
    for seg in pattern.split("."):
        if seg in parts or any(c in seg for c in "*?["):
            fixed.append(seg)
        else:
            close = difflib.get_close_matches(seg, list(parts), n=1)
            fixed.append(close[0] if close else seg)
    guess = ".".join(fixed)
    # "*.head" for a top-level head: the "*." asks for a parent it does not have
    for g in (guess, guess[2:] if guess.startswith("*.") else None):
        if g and g != pattern and any(fnmatch.fnmatchcase(n, g) for n in names):
            return f" (did you mean {g!r}?)"
    return ""


def _inner(e: OptionError) -> str:
    """The message of an OptionError without its ``pass: option 'x': `` prefix."""
    text = str(e)
    prefix = f"{e.pass_name}: option '{e.option}': " if e.option else f"{e.pass_name}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def parse_rules(cls: type, pass_name: str, given: Mapping[str, Any], raw: Any) -> list[LayerRule]:
    """Validate ``layers=`` of pass class ``cls`` built with options ``given``.

    Each rule is checked by building the pass with the options it would run a layer with.
    """
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        raise OptionError(pass_name, "layers", "expected a table of pattern = {option = value}, "
                          f'e.g. layers={{"*.output.dense"={{bits=8}}}}, got {type(raw).__name__} {raw!r}')
    spec = cls.options_spec()
    if "include" not in spec:
        raise OptionError(pass_name, "layers", "this pass has no include option, so it cannot "
                          "run on some layers with other options; per-layer rules need one")
    rules = []
    for pattern, overrides in raw.items():
        where = f"layers[{pattern!r}]"
        if not isinstance(pattern, str) or not pattern.strip():
            raise OptionError(pass_name, where, "a pattern must be a non-empty glob or 're:' + a "
                              "regular expression")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise OptionError(pass_name, where, f"bad regular expression {pattern[3:]!r}: {e}") from None
        if not isinstance(overrides, Mapping) or not overrides:
            raise OptionError(pass_name, where, "expected a table of options for the matching "
                              f"layers, e.g. {{bits=8}}, got {overrides!r}")
        for key in overrides:
            if key in NOT_PER_LAYER or str(key).startswith("tol"):
                raise OptionError(pass_name, f"{where}.{key}", "cannot be set per layer: it chooses "
                                  "the layers or judges the whole pass; set it on the pass")
            if key not in spec:
                hint = difflib.get_close_matches(str(key), list(spec), n=1)
                more = f"; did you mean '{hint[0]}'?" if hint else ""
                raise OptionError(pass_name, f"{where}.{key}", f"unknown option (known: "
                                  f"{', '.join(k for k in spec if k not in NOT_PER_LAYER)}){more}")
        try:
            cls(**{**given, **overrides})
        except OptionError as e:
            raise OptionError(pass_name, f"{where}.{e.option}" if e.option else where, _inner(e)) from None
        rules.append(LayerRule(pattern, tuple(overrides.items())))
    return rules


def format_rules(rules: list[LayerRule]) -> dict[str, dict[str, Any]]:
    """The rules as the ``layers=`` table they were given as."""
    return {r.pattern: dict(r.options) for r in rules}


def escape(name: str) -> str:
    """A glob that matches exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def run_with_rules(p, gm, ctx):
    """Run pass ``p`` honouring its layer rules (see the module docstring)."""

    from fxpress.passes.base import PassResult

    rules: list[LayerRule] = getattr(p, "layer_rules", [])
    if not rules:
        return p.run(gm, ctx)
    ops = weighted_ops(gm)
    hit = {r.pattern: False for r in rules}
    chosen, _ = select(ops, p.options.get("include", ["*"]), p.options.get("exclude", []))
    chosen_names = {op.module_name for op in chosen}
    groups: dict[tuple, list[str]] = {}
    seen: set[str] = set()
    for op in ops:
        if op.module_name in seen:
            continue
        seen.add(op.module_name)
        merged: dict[str, Any] = {}
        for r in rules:
            if r.matches(op.module_name, op.name):
                hit[r.pattern] = True
                merged.update(r.options)
        if merged and op.module_name in chosen_names:
            key = tuple(sorted((k, repr(v)) for k, v in merged.items()))
            groups.setdefault(key, [merged, []])[1].append(op.module_name)  # type: ignore[index]
    missing = [pat for pat, ok in hit.items() if not ok]
    if missing:
        shown = ", ".join(sorted(seen)[:8]) + (", ..." if len(seen) > 8 else "")
        raise OptionError(p.name, f"layers[{missing[0]!r}]", "matches no weighted op"
                          f"{glob_hint(missing[0], sorted(seen))}; layer names look like: {shown}")
    given = {k: v for k, v in p._given.items()}
    touched = [escape(n) for _, (_, names) in groups.items() for n in names]
    cls = type(p)
    stats: dict[str, Any] = {}
    changed = False
    runs = []
    if len(touched) < len(chosen_names):
        base = cls(**{**given, "exclude": list(given.get("exclude", [])) + touched})
        runs.append((base, {}))
    for merged, names in groups.values():
        runs.append((cls(**{**given, **merged, "include": [escape(n) for n in names]}), merged))
    for q, merged in runs:
        res = q.run(gm, ctx)
        gm = res.module
        changed = changed or res.changed
        if not stats:
            stats = dict(res.stats)
            if merged:
                stats["rule_groups"] = []
        else:
            layers = res.stats.get("layers")
            if isinstance(layers, dict) and isinstance(stats.get("layers"), dict):
                stats["layers"] = {**stats["layers"], **layers}
            stats.setdefault("rule_groups", []).append(
                {"options": merged, **{k: v for k, v in res.stats.items() if k != "layers"}})
    stats["layer_rules"] = {n: merged for merged, names in groups.values() for n in names}
    return PassResult(gm, changed=changed, stats=stats)


__all__ = ["LayerRule", "parse_rules", "format_rules", "run_with_rules", "escape", "NOT_PER_LAYER"]
