"""The pass contract: a registry name, typed options, a default tolerance, ``run(gm, ctx)``.

A pass is a class::

    class DoubleFirst(Pass):
        name = "double-first"
        summary = "Doubles the first linear weight (a deliberately wrong pass)."
        factor = option(2.0, "what to multiply by", low=0.0)

        def run(self, gm, ctx):
            op = weighted_ops(gm)[0]
            op.set_weight(op.weight() * self.factor)
            return PassResult(gm, changed=True, stats={})

Options are class attributes made with :func:`option`; they are validated (name, type,
range, choices) when the pass is built, so a pipeline fails at parse time, not halfway.
A pass that declares no ``tolerance`` is held to numerical equivalence by the verifier:
lossiness is something a pass must declare.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch

from fxpress.errors import MissingDataError, OptionError

_MISSING = object()


@dataclass(frozen=True)
class Option:
    """A declared pass option: default, help text, expected type and constraints."""

    default: Any
    help: str = ""
    type: Any = None            # int, float, str, bool, list (of str), or a tuple of those
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False      # low < value instead of low <= value
    high_open: bool = False
    name: str = ""

    def type_name(self) -> str:
        t = self.type
        if isinstance(t, tuple):
            return " or ".join(x.__name__ if x is not type(None) else "none" for x in t)
        return t.__name__ if t is not None else "any"

    def validate(self, pass_name: str, value: Any) -> Any:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        allowed = tuple(t for t in types if t is not None and t is not type(None))
        if value is None and self.choices is not None and "none" in self.choices:
            return "none"  # the bare word none in a spec names the choice "none"
        if value is None:
            if type(None) in types or self.default is None:
                return None
            raise OptionError(pass_name, self.name, f"expected {self.type_name()}, got none")
        if list in allowed and isinstance(value, (str, tuple, list)):
            value = [value] if isinstance(value, str) else list(value)
            if not all(isinstance(v, str) for v in value):
                raise OptionError(pass_name, self.name, f"expected a list of strings, got {value!r}")
        elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif allowed and ((isinstance(value, bool) and bool not in allowed)
                          or not isinstance(value, allowed)):
            raise OptionError(pass_name, self.name,
                              f"expected {self.type_name()}, got {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(pass_name, self.name, f"must be a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            raise OptionError(pass_name, self.name,
                              f"must be one of {', '.join(map(repr, self.choices))}, got {value!r}{more}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            hi_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if lo_bad or hi_bad:
                lo = "" if self.low is None else f"{self.low} {'<' if self.low_open else '<='} "
                hi = "" if self.high is None else f" {'<' if self.high_open else '<='} {self.high}"
                raise OptionError(pass_name, self.name, f"must satisfy {lo}{self.name}{hi}, got {value!r}")
        return value


def option(default: Any, help: str = "", *, type: Any = None, choices: Sequence | None = None,
           low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Any:
    """Declare a pass option as a class attribute (see the module docstring)."""
    if type is None:
        type = builtin_type(default)
    return Option(default, help, type, tuple(choices) if choices is not None else None,
                  low, high, low_open, high_open)


def builtin_type(default):
    if isinstance(default, bool):
        return bool
    if isinstance(default, (list, tuple)):
        return list
    return type(default) if default is not None else None


@dataclass(frozen=True)
class Tolerance:
    """Limits the verifier holds a pass to; ``None`` means no limit on that metric.

    ``against="previous"`` measures the pass's own effect (outputs before vs after it);
    ``"reference"`` measures drift from the original model (for steps such as distillation
    that change outputs on purpose and are judged on the end result).
    """

    max_rel_l2: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None
    max_abs: float | None = None
    min_accuracy_ratio: float | None = None
    against: str = "previous"

    KEYS: ClassVar[tuple[str, ...]] = ("max_rel_l2", "min_cosine", "min_top1", "max_abs",
                                       "min_accuracy_ratio", "against")

    def merged(self, overrides: Mapping[str, Any], pass_name: str) -> "Tolerance":
        clean = {}
        for k, v in overrides.items():
            if k not in self.KEYS:
                hint = difflib.get_close_matches(k, self.KEYS, n=1)
                more = f"; did you mean 'tol.{hint[0]}'?" if hint else ""
                raise OptionError(pass_name, f"tol.{k}",
                                  f"unknown tolerance; known: {', '.join(self.KEYS)}{more}")
            if k == "against":
                if v not in ("previous", "reference"):
                    raise OptionError(pass_name, "tol.against", "must be 'previous' or 'reference'")
            elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                    or not math.isfinite(v)):
                raise OptionError(pass_name, f"tol.{k}", f"expected a number, got {v!r}")
            clean[k] = float(v) if k != "against" and v is not None else v
        return dataclasses.replace(self, **clean)

    def limits(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.KEYS if k != "against" and getattr(self, k) is not None}


#: What a pass that declares no tolerance is held to: numerical equivalence.
EQUIVALENCE = Tolerance(max_rel_l2=1e-5)
#: For passes that promise to change nothing numerically (taps, re-ordering).
EXACT = Tolerance(max_rel_l2=1e-6)


@dataclass
class PassResult:
    """What a pass returns: the rewritten graph, whether it changed, and its statistics."""

    module: torch.fx.GraphModule
    changed: bool = True
    stats: dict = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may use besides the graph.

    ``reference`` is the caller's original model (read it, never write it);
    ``calibration`` a list of input tuples; ``train_data`` an iterable of
    ``(inputs..., label)`` batches; ``history`` the records of the passes before.
    """

    example_inputs: tuple
    calibration: list[tuple] | None = None
    train_data: Any = None
    reference: torch.nn.Module | None = None
    history: list = field(default_factory=list)
    seed: int = 0
    progress: bool | None = True  # None: progress bars only on a terminal

    def require(self, pass_name: str, what: str) -> Any:
        value = getattr(self, what)
        if value is None or (isinstance(value, (list, tuple)) and not value):
            arg = {"calibration": "calibration=[(x,), ...]",
                   "train_data": "train_data=[(x, y), ...]"}.get(what, what)
            raise MissingDataError(pass_name, f"needs {what.replace('_', ' ')}; pass {arg} to "
                                   f"compress()/Pipeline.run() or set '{what}' in the recipe")
        return value


class Pass:
    """Base class of every pass. Subclasses set ``name``, options and ``run``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: Default tolerance; None holds the pass to numerical equivalence.
    tolerance: ClassVar[Tolerance | None] = None
    #: Data the pass needs from the context ("calibration", "train_data").
    needs: ClassVar[tuple[str, ...]] = ()
    #: The pass promises to replace tensors, never to write into them; the pipeline then
    #: shares tensors with the previous graph instead of copying them.
    replaces_tensors: ClassVar[bool] = False
    #: The pass trains the graph to win back what earlier lossy passes cost.
    recovers: ClassVar[bool] = False
    #: Runtime module classes this pass writes into graphs (the artifact loader's allowlist).
    runtime_modules: ClassVar[tuple[type, ...]] = ()

    def __init__(self, **options: Any):
        tol = options.pop("tol", None) or {}
        for k in [k for k in options if k.startswith("tol.")]:
            tol[k[4:]] = options.pop(k)
        known = self.options_spec()
        for k in options:
            if k not in known:
                hint = difflib.get_close_matches(k, list(known), n=1)
                more = f"; did you mean '{hint[0]}'?" if hint else ""
                raise OptionError(self.name, k, f"unknown option (known: {', '.join(known) or 'none'}){more}")
        self.options: dict[str, Any] = {}
        for k, opt in known.items():
            value = options.get(k, opt.default)
            self.options[k] = opt.validate(self.name, value) if k in options else (
                list(value) if isinstance(value, tuple) else value)
        for k, v in self.options.items():
            setattr(self, k, v)  # instance attributes shadow the class's Option declarations
        self._given = {k: self.options[k] for k in options}
        base = self.tolerance if self.tolerance is not None else EQUIVALENCE
        self.tol = base.merged(tol, self.name)
        self._tol_given = dict(tol)
        self.check_options()

    @classmethod
    def options_spec(cls) -> dict[str, Option]:
        out = {}
        for klass in reversed(cls.__mro__):
            for k, v in vars(klass).items():
                if isinstance(v, Option):
                    out[k] = dataclasses.replace(v, name=k)
        return out

    def check_options(self) -> None:
        """Cross-option checks; raise OptionError. Override in subclasses."""

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    # -- text form ---------------------------------------------------------------------
    def spec_items(self) -> list[tuple[str, Any]]:
        items = list(self._given.items())
        items += [(f"tol.{k}", v) for k, v in self._tol_given.items()]
        return items

    def __str__(self) -> str:
        from fxpress.passes.spec import format_pass  # local: spec imports base
        return format_pass(self.name, self.spec_items())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"


def check_glob_matches(pass_name: str, unmatched: Iterable[str], available: Sequence[str]) -> None:
    """Raise OptionError for include patterns that match no weighted op."""
    unmatched = list(unmatched)
    if unmatched and not available:
        raise OptionError(pass_name, "include",
                          f"pattern(s) {unmatched} match nothing: the graph has no uncompressed "
                          "weighted op of the selected kinds left (an earlier pass replaced "
                          "them); put this pass before it or narrow that pass's include")
    if unmatched:
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise OptionError(pass_name, "include",
                          f"pattern(s) {unmatched} match no weighted op; names look like: {shown}")


@dataclass(frozen=True)
class PassInfo:
    """A registered pass: its class and where it came from."""

    cls: type
    plugin: str = "builtin"
    distribution: str | None = "fxpress"

    @property
    def name(self) -> str:
        return self.cls.name

    def describe(self) -> dict[str, Any]:
        tol = self.cls.tolerance
        return {
            "name": self.cls.name,
            "summary": self.cls.summary,
            "options": {k: {"default": o.default, "type": o.type_name(), "help": o.help,
                            **({"choices": list(o.choices)} if o.choices else {})}
                        for k, o in self.cls.options_spec().items()},
            "tolerance": (tol or EQUIVALENCE).limits(),
            "tolerance_against": (tol or EQUIVALENCE).against,
            "needs": list(self.cls.needs),
            "plugin": self.plugin,
            "distribution": self.distribution,
        }


class PassRegistry(dict):
    """name -> :class:`PassInfo`. ``errors`` holds the plugins that failed to load."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.errors: list = []

    def runtime_modules(self) -> list[type]:
        """Every runtime module class a registered pass declares (artifact allowlist)."""
        out: list[type] = []
        for info in self.values():
            for m in info.cls.runtime_modules:
                if m not in out:
                    out.append(m)
        return out
