"""The pass contract: a registry name, typed options, traits, ``run(gm, ctx)``.

A pass is a class::

    class DoubleFirst(Pass):
        name = "double-first"
        summary = "Doubles the first linear weight (a deliberately wrong pass)."
        traits = PassTraits(tolerance=Tolerance(min_cosine=0.5), replaces_tensors=True)
        factor = option(2.0, "what to multiply by", low=0.0)

        def run(self, gm, ctx):
            op = weighted_ops(gm)[0]
            op.set_weight(op.weight() * self.factor)
            return PassResult(gm, changed=True, stats={})

Options are class attributes made with :func:`option`; they are validated (name, type,
range, choices) when the pass is built, so a pipeline fails at parse time, not halfway.
What the pipeline needs to know about a pass (its tolerance, the data it needs, whether it
replaces tensors, whether it recovers accuracy, the runtime modules it writes) is its
:class:`PassTraits`: one object, documented in one place.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch

from fxpress.errors import MissingDataError, OptionError
from fxpress.passes.layer_rules import format_rules, glob_hint, parse_rules, run_with_rules

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
                raise OptionError(pass_name, self.name, f"expected a list of strings, got {_short(value)}")
        elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise OptionError(pass_name, self.name, f"{_short(value)} is too large for a "
                                  "float") from None
        elif allowed and ((isinstance(value, bool) and bool not in allowed)
                          or not isinstance(value, allowed)):
            raise OptionError(pass_name, self.name,
                              f"expected {self.type_name()}, got {type(value).__name__} {_short(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(pass_name, self.name, f"must be a finite number, got {_short(value)}")
        if self.choices is not None and value not in self.choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            raise OptionError(pass_name, self.name,
                              f"must be one of {', '.join(map(repr, self.choices))}, got {_short(value)}{more}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo_bad = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            hi_bad = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if lo_bad or hi_bad:
                lo = "" if self.low is None else f"{self.low} {'<' if self.low_open else '<='} "
                hi = "" if self.high is None else f" {'<' if self.high_open else '<='} {self.high}"
                raise OptionError(pass_name, self.name, f"must satisfy {lo}{self.name}{hi}, got {_short(value)}")
        return value


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (an int of 5,000 digits has no repr)."""
    try:
        text = repr(value)
    except ValueError:  # past sys.get_int_max_str_digits()
        text = f"<int of about {int(value.bit_length() * 0.30103) + 1} digits>"
    return text if len(text) <= limit else text[:limit] + "..."


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


@dataclass(frozen=True)
class PassTraits:
    """What a pass does, as the pipeline, the verifier and the artifact loader see it.

    A pass class declares ``traits = PassTraits(...)``; a pass whose traits depend on its
    options overrides :meth:`Pass.configure_traits` (e.g. ``distill`` recovers only when
    ``epochs > 0``). Each field:

    ``tolerance``
        The verifier's default limits for the pass (overridden per use with ``tol.`` keys).
        ``None`` holds the pass to numerical equivalence (relative L2 ≤ 1e-5): a lossy pass
        must say so.
    ``needs``
        Data the pass takes from the context: ``"calibration"``, ``"train_data"``. A pipeline
        run without it stops with a ``MissingDataError`` before the pass runs.
    ``replaces_tensors``
        The promise that the pass replaces tensors (``WeightedOp.set_weight``, new modules)
        and never writes into one in place. The pipeline then shares tensors with the graph
        before the pass instead of copying them, and ``in_place=True`` may rewrite the
        pipeline's own graph. A write into a shared tensor is detected (version counters)
        and fails the pass. ``False``: the pass gets a full copy of the weights.
    ``recovers``
        The pass trains the graph to win back what earlier lossy passes cost (distill): a
        lossy pass before it that misses its tolerance is ``deferred`` to it, not failed.
    ``runtime_modules``
        The runtime module classes the pass writes into graphs: the artifact loader's
        allowlist.

    Older plugins set these as loose class attributes (``replaces_tensors = True``); that
    still works, with a ``DeprecationWarning``, and reading ``pass_.replaces_tensors`` too.
    """

    tolerance: Tolerance | None = None
    needs: tuple[str, ...] = ()
    replaces_tensors: bool = False
    recovers: bool = False
    runtime_modules: tuple[type, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", tuple(self.needs))
        object.__setattr__(self, "runtime_modules", tuple(self.runtime_modules))


TRAIT_NAMES = tuple(f.name for f in dataclasses.fields(PassTraits))


#: what Pass.__init__ sets on an instance
_INIT_STATE = ("options", "_given", "_tol_given", "tol", "layer_rules")


class _TraitAlias:
    """``Pass.<trait>``: the old loose attribute, read from (and written into) ``traits``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type) -> Any:
        return getattr((obj if obj is not None else owner).traits, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        warnings.warn(f"{type(obj).__name__}: setting pass.{self.name} is deprecated; return "
                      f"the traits from configure_traits() instead", DeprecationWarning,
                      stacklevel=2)
        obj.traits = dataclasses.replace(obj.__dict__.get("traits", type(obj).traits),
                                         **{self.name: value})


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
    """Base class of every pass. Subclasses set ``name``, ``summary``, ``traits``, options
    and ``run``; see the module docs and :class:`PassTraits`."""

    #: The registry name (``prune``); a pipeline text names the pass by it.
    name: ClassVar[str] = ""
    #: One line for ``fxpress passes``.
    summary: ClassVar[str] = ""
    #: What the pass does (tolerance, data it needs, promises); see :class:`PassTraits`.
    traits: ClassVar[PassTraits] = PassTraits()

    # the old loose attributes, kept readable (and settable, deprecated) as aliases
    tolerance = _TraitAlias()
    needs = _TraitAlias()
    replaces_tensors = _TraitAlias()
    recovers = _TraitAlias()
    runtime_modules = _TraitAlias()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        loose = {k: cls.__dict__[k] for k in TRAIT_NAMES
                 if k in cls.__dict__ and not isinstance(cls.__dict__[k], _TraitAlias)}
        if loose:
            warnings.warn(f"{cls.__module__}.{cls.__qualname__} sets {', '.join(sorted(loose))} "
                          "as class attributes; declare traits = PassTraits(...) instead",
                          DeprecationWarning, stacklevel=2)
            for k in loose:
                delattr(cls, k)
            cls.traits = dataclasses.replace(cls.traits, **loose)

    def configure_traits(self, traits: PassTraits) -> PassTraits:
        """The traits of this instance, given the class's; options are set already.
        Override when they depend on options (return ``dataclasses.replace(traits, ...)``)."""
        return traits

    def __getattr__(self, name: str) -> Any:
        # only for attributes not found: the state Pass.__init__ sets, when a subclass's
        # own __init__ did not call it
        if name in _INIT_STATE and "_fxpress_adopting" not in self.__dict__:
            self._adopt_defaults()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _adopt_defaults(self) -> None:
        """Fill in what ``Pass.__init__`` sets (option defaults, traits, tolerance) for a
        pass class whose ``__init__`` did not call it, or fail naming the class."""
        cls = type(self)
        where = f"{cls.__module__}.{cls.__qualname__}"
        self.__dict__["_fxpress_adopting"] = True
        try:
            warnings.warn(f"{where}.__init__ does not call super().__init__(**options): its "
                          "options were not validated and take their defaults unless set; "
                          "call super().__init__(**options) first thing in __init__",
                          RuntimeWarning, stacklevel=3)
            options = {}
            for k, opt in self.options_spec().items():
                value = self.__dict__.get(k, opt.default)
                options[k] = list(value) if isinstance(value, tuple) else value
                self.__dict__.setdefault(k, options[k])
            self.options, self._given, self._tol_given = options, {}, {}
            self.layer_rules = []
            self.traits = self.configure_traits(self.__dict__.get("traits", cls.traits))
            tol = self.traits.tolerance
            self.tol = tol if isinstance(tol, Tolerance) else EQUIVALENCE
        except Exception as e:
            from fxpress.errors import PassError
            raise PassError(getattr(cls, "name", "") or where,
                            f"{where} overrides __init__ without calling "
                            f"super().__init__(**options), and its defaults could not be filled "
                            f"in ({type(e).__name__}: {e}); call super().__init__(**options) "
                            "first thing in its __init__") from e
        finally:
            self.__dict__.pop("_fxpress_adopting", None)

    def __init__(self, **options: Any):
        rules = options.pop("layers", None)  # per-layer options: passes/layer_rules.py
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
        self.traits = self.configure_traits(self.__dict__.get("traits", type(self).traits))
        base = self.traits.tolerance if self.traits.tolerance is not None else EQUIVALENCE
        self.tol = base.merged(tol, self.name)
        self._tol_given = dict(tol)
        self.check_options()
        self.layer_rules = parse_rules(type(self), self.name, self._given, rules)

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

    def apply(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        """Run the pass honouring its per-layer rules (``layers=``): :meth:`run` once over the
        layers no rule touches and once per distinct set of overrides. What the pipeline calls."""
        return run_with_rules(self, gm, ctx)

    # -- text form ---------------------------------------------------------------------
    def spec_items(self) -> list[tuple[str, Any]]:
        items = list(self._given.items())
        if self.layer_rules:
            items.append(("layers", format_rules(self.layer_rules)))
        items += [(f"tol.{k}", v) for k, v in self._tol_given.items()]
        return items

    def __str__(self) -> str:
        from fxpress.passes.recipes import format_pass  # local: recipes imports base
        return format_pass(self.name, self.spec_items())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"


def check_op_kinds(pass_name: str, ops: Sequence[str]) -> None:
    """Raise OptionError naming ``ops`` unless it lists at least one known weighted-op kind
    and nothing else (``prune{ops=[]}`` had reported an ``include`` that matched nothing)."""
    from fxpress.graph.weights import KINDS

    bad = [k for k in ops if k not in KINDS]
    if bad:
        raise OptionError(pass_name, "ops", f"unknown op kind(s) {bad}; choose from {KINDS}")
    if not ops:
        raise OptionError(pass_name, "ops", f"give at least one op kind of {KINDS}")


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
                          f"pattern(s) {unmatched} match no weighted op"
                          f"{''.join(glob_hint(u, available) for u in unmatched[:1])}; "
                          f"names look like: {shown}")


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
        tol = self.cls.traits.tolerance
        return {
            "name": self.cls.name,
            "summary": self.cls.summary,
            "options": {k: {"default": o.default, "type": o.type_name(), "help": o.help,
                            **({"choices": list(o.choices)} if o.choices else {})}
                        for k, o in self.cls.options_spec().items()},
            "tolerance": (tol or EQUIVALENCE).limits(),
            "tolerance_against": (tol or EQUIVALENCE).against,
            "needs": list(self.cls.traits.needs),
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
        from fxpress.graph.fused import FUSED_CLASSES

        out: list[type] = list(FUSED_CLASSES)  # fused calls' compressed weights, any pass's
        for info in self.values():
            for m in info.cls.traits.runtime_modules:
                if m not in out:
                    out.append(m)
        return out
