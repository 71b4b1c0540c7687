"""Pipeline text (MLIR's textual form) and TOML recipes, parsed into one spec.

Text: ``name{key=value,key=value},name2``. Values are numbers, ``true``/``false``,
``none``, bare words (``encoder.layer.*.output``), quoted strings (``"a,b"``) and lists
(``[fc1, "fc2"]``). Tolerance overrides use ``tol.`` keys: ``prune{sparsity=0.9,tol.min_top1=0.9}``.
A spec prints back to the same text: ``format_spec(parse_spec(t)) == t`` for canonical ``t``.

A TOML recipe (standard library ``tomllib``) holds the same list plus the model, the
inputs, the policy and the output path::

    model = "digits.py:trained_mlp"          # file.py:callable, relative to the recipe
    example_inputs = "digits.py:example_inputs"
    calibration = "digits.py:calibration"
    policy = "strict"
    output = "out/digits.fxp"
    entropy = true                           # entropy-code index and bitmap streams

    [[pass]]
    name = "prune"
    sparsity = 0.5
    tol.min_top1 = 0.98

``file.py:callable`` references run the recipe author's own Python, like a Makefile or a
conftest.py: recipes are code you trust. Artifacts (``fxpress.load``) never run code.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fxpress.errors import PipelineSpecError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-:]*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_BARE = re.compile(r"[A-Za-z0-9_.*?/\-+:]+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|nan)$")
_WORDS = {"true": True, "false": False, "none": None, "null": None}
#: how deep lists may nest in pipeline text, and how many digits a number may have
MAX_NESTING, MAX_DIGITS = 4, 100


@dataclass
class PassSpec:
    """One pass of a pipeline: its registry name and its options (``tol.*`` included)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    position: int = 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PassSpec) and (self.name, self.options) == (other.name, other.options)

    def __str__(self) -> str:
        return format_pass(self.name, list(self.options.items()))


class _Parser:
    def __init__(self, text: str):
        self.text, self.i = text, 0

    def error(self, msg: str, pos: int | None = None) -> PipelineSpecError:
        return PipelineSpecError(f"pipeline text: {msg}", self.text, self.i if pos is None else pos)

    def ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.ws()
        return self.text[self.i] if self.i < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            got = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {ch!r}, found {got}")
        self.i += 1

    def match(self, rx: re.Pattern, what: str) -> str:
        self.ws()
        m = rx.match(self.text, self.i)
        if not m:
            got = repr(self.text[self.i]) if self.i < len(self.text) else "end of text"
            raise self.error(f"expected {what}, found {got}")
        self.i = m.end()
        return m.group(0)

    def pipeline(self) -> list[PassSpec]:
        out = []
        if not self.peek():
            raise self.error("empty pipeline; write e.g. 'prune{sparsity=0.5}'")
        while True:
            out.append(self.pass_())
            if not self.peek():
                return out
            self.expect(",")

    def pass_(self) -> PassSpec:
        self.ws()
        pos = self.i
        name = self.match(_NAME, "a pass name")
        opts: dict[str, Any] = {}
        if self.peek() == "{":
            self.i += 1
            if self.peek() == "}":
                self.i += 1
                return PassSpec(name, opts, pos)
            while True:
                self.ws()
                kpos = self.i
                key = self.match(_KEY, "an option name")
                if key in opts:
                    raise self.error(f"option {key!r} given twice", kpos)
                self.expect("=")
                opts[key] = self.value()
                if self.peek() == ",":
                    self.i += 1
                    continue
                self.expect("}")
                break
        return PassSpec(name, opts, pos)

    def value(self, depth: int = 0) -> Any:
        ch = self.peek()
        if ch in "\"'":
            return self.string()
        if ch == "[":
            if depth >= MAX_NESTING:
                raise self.error(f"lists nested more than {MAX_NESTING} deep; an option takes "
                                 "a value or a list of values")
            self.i += 1
            items = []
            if self.peek() == "]":
                self.i += 1
                return items
            while True:
                items.append(self.value(depth + 1))
                if self.peek() == ",":
                    self.i += 1
                    continue
                self.expect("]")
                return items
        if ch == "{":  # a table: {key=value,...}; keys are bare words or quoted strings
            if depth >= MAX_NESTING:
                raise self.error(f"tables nested more than {MAX_NESTING} deep")
            self.i += 1
            table: dict[str, Any] = {}
            if self.peek() == "}":
                self.i += 1
                return table
            while True:
                self.ws()
                kpos = self.i
                key = self.string() if self.peek() in "\"'" else self.match(_BARE, "a key")
                if key in table:
                    raise self.error(f"key {key!r} given twice", kpos)
                self.expect("=")
                table[key] = self.value(depth + 1)
                if self.peek() == ",":
                    self.i += 1
                    continue
                self.expect("}")
                return table
        pos = self.i
        word = self.match(_BARE, "a value")
        digits = sum(c.isdigit() for c in word)
        if digits > MAX_DIGITS and _NUMBER.match(word):
            raise self.error(f"a number of {digits} digits; options take numbers of at most "
                             f"{MAX_DIGITS} digits", pos)
        return _word_value(word)

    def string(self) -> str:
        quote = self.text[self.i]
        start = self.i
        self.i += 1
        out = []
        while self.i < len(self.text):
            ch = self.text[self.i]
            if ch == "\\" and self.i + 1 < len(self.text):
                out.append(self.text[self.i + 1])
                self.i += 2
                continue
            if ch == quote:
                self.i += 1
                return "".join(out)
            out.append(ch)
            self.i += 1
        raise self.error("unterminated string", start)


def _word_value(word: str) -> Any:
    low = word.lower()
    if low in _WORDS:
        return _WORDS[low]
    if _NUMBER.match(word):
        if re.fullmatch(r"[+-]?\d+", word):
            return int(word)
        return float(word)
    return word


#: Built-in recipes: a name that stands for a whole pipeline (in compress(), in a TOML
#: recipe's ``pipeline = "..."`` and on the command line). Each needs only the model and
#: training data; save the result with ``entropy=True`` for the smallest file.
RECIPES = {
    # Deep Compression (Han et al. 2016) with gradual pruning (Zhu & Gupta 2017):
    # BatchNorms folded into their layers (exact; nothing of them left to store), layer-
    # adaptive magnitude pruning (LAMP scores, prune's default scope since round 17) to 95%
    # in three stages on the cubic schedule, each recovered by
    # distillation from the original model; 4-bit k-means sharing with biases on a 4-bit
    # grid; the small float tensors left (norms, position embeddings) on 4-bit grids
    # (passes/small.py); a last recovery that fine-tunes the centroids and trains through
    # the grids (biases, norms and position embeddings included). 4-bit rather than 8-bit
    # grids: the digits transformer d=64 x2 from 36.0x to 41.1x, accuracy as before. The
    # centroids on an 8-bit grid per layer (codebook_bits=8: 16 bytes and a 4-byte grid
    # instead of 32 bytes of float16; the last recovery trains through it): round 21.
    # scope=adaptive rather than global (round 23): plain magnitudes across layers sent the
    # hidden layer of a CNN with a wide flattened input to its floor of 2 weights per unit at
    # the second stage (CNN 24-48-96 seed 61: held-out distill loss 0.007 -> 11.9, -1.11
    # points at the end; adaptive +0.22), and a 1-D CNN's hidden layer and head (README,
    # round 23).
    "deep-compression": "fold_bn,prune{sparsity=0.95,scope=adaptive,steps=3},distill,"
                        "share{bits=4,bias_bits=4,codebook_bits=8},small{bits=4},distill",
}


def parse_spec(text: str) -> list[PassSpec]:
    """Parse pipeline text (or the name of a built-in recipe, :data:`RECIPES`) into pass specs.

    >>> [str(p) for p in parse_spec("prune{sparsity=0.5}, quantize{bits=8}")]
    ['prune{sparsity=0.5}', 'quantize{bits=8}']
    >>> [p.name for p in parse_spec("deep-compression")]
    ['fold_bn', 'prune', 'distill', 'share', 'small', 'distill']
    """
    if not isinstance(text, str):
        raise PipelineSpecError(f"pipeline text must be a string, got {type(text).__name__}")
    return _Parser(RECIPES.get(text.strip(), text)).pipeline()


def format_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{format_value(str(k))}={format_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if _BARE.fullmatch(s) and _word_value(s) == s:
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_pass(name: str, items: list[tuple[str, Any]]) -> str:
    if not items:
        return name
    return name + "{" + ",".join(f"{k}={format_value(v)}" for k, v in items) + "}"


def format_spec(specs: list[PassSpec]) -> str:
    """Print pass specs back as pipeline text."""
    return ",".join(str(p) for p in specs)


# -- TOML recipes --------------------------------------------------------------------------

RECIPE_KEYS = ("model", "example_inputs", "calibration", "train_data", "evaluate", "policy",
               "output", "entropy", "pipeline", "pass", "seed", "capture", "description",
               "in_place")


@dataclass
class Recipe:
    """A parsed TOML recipe. References (``file.py:callable``) are resolved on demand."""

    path: Path | None
    passes: list[PassSpec]
    model: str | None = None
    example_inputs: str | None = None
    calibration: str | None = None
    train_data: str | None = None
    evaluate: str | None = None
    policy: str = "strict"
    output: str | None = None
    entropy: bool = False
    in_place: bool = False
    seed: int = 0
    capture: str = "auto"
    description: str = ""

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    def resolve(self, key: str) -> Callable[..., Any] | None:
        ref = getattr(self, key)
        return None if ref is None else load_reference(ref, self.base_dir, key)

    def output_path(self) -> Path | None:
        return None if self.output is None else (self.base_dir / self.output)


def _toml_position(text: str, e: tomllib.TOMLDecodeError) -> int | None:
    line = getattr(e, "lineno", None)
    col = getattr(e, "colno", None)
    if line is None:
        m = re.search(r"line (\d+), column (\d+)", str(e))
        if not m:
            return None
        line, col = int(m.group(1)), int(m.group(2))
    lines = text.splitlines(keepends=True)
    return sum(len(x) for x in lines[: line - 1]) + max(col - 1, 0)


#: the most bytes a recipe file may hold (they are a few hundred)
RECIPE_MAX_BYTES = 4 << 20


def seed_error(seed: Any) -> str | None:
    """Why ``seed`` cannot seed a run (None when it can): an int (not a bool) that
    ``torch.manual_seed`` takes, with room for the offsets a run adds (epochs, streams)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"must be an integer, got {type(seed).__name__} {str(seed)[:40]!r}"
    if not -(1 << 63) <= seed < 1 << 63:
        return f"must be in [-2**63, 2**63), got {str(seed)[:40]}"
    return None


def parse_recipe(source: str | Path | dict, path: Path | None = None) -> Recipe:
    """Parse a TOML recipe (a path, TOML text, or an already-loaded dict)."""
    text = None
    if isinstance(source, Path) or (isinstance(source, str) and source.endswith(".toml")
                                    and "\n" not in source):
        path = Path(source)
        try:
            with open(path, "rb") as f:  # bounded: /dev/zero as a recipe filled the memory
                raw = f.read(RECIPE_MAX_BYTES + 1)
        except OSError as e:
            raise PipelineSpecError(f"recipe {path}: cannot read it: {e}") from e
        if len(raw) > RECIPE_MAX_BYTES:
            raise PipelineSpecError(f"recipe {path}: over {RECIPE_MAX_BYTES:,} bytes; a recipe is "
                                    "a short TOML text file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PipelineSpecError(f"recipe {path}: not UTF-8 text (byte {e.start}); a recipe "
                                    "is a TOML text file") from None
    elif isinstance(source, str):
        text = source
    if text is not None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PipelineSpecError(f"recipe {path or '<text>'}: invalid TOML: {e}", text,
                                    _toml_position(text, e)) from e
    else:
        data = dict(source)
    where = f"recipe {path or '<dict>'}"
    unknown = [k for k in data if k not in RECIPE_KEYS]
    if unknown:
        hints = [f"{k!r} -> {close[0]!r}" for k in unknown
                 if (close := difflib.get_close_matches(str(k), list(RECIPE_KEYS), n=1))]
        raise PipelineSpecError(f"{where}: unknown key(s) {unknown}; known: {', '.join(RECIPE_KEYS)}"
                                + (f"; did you mean {', '.join(hints)}?" if hints else ""))
    if ("pipeline" in data) == ("pass" in data):
        raise PipelineSpecError(f"{where}: give the passes either as pipeline = \"...\" or as "
                                "[[pass]] tables (exactly one of them)")
    if "pipeline" in data:
        passes = parse_spec(data["pipeline"])
    else:
        tables = data["pass"]
        if not isinstance(tables, list):
            raise PipelineSpecError(f"{where}: 'pass' must be an array of tables ([[pass]])")
        passes = []
        for i, t in enumerate(tables):
            if not isinstance(t, dict):  # pass = ["prune"]: dict() raised a raw ValueError
                from fxpress.graph.artifact.values import _short_repr

                raise PipelineSpecError(
                    f"{where}: 'pass' must be an array of tables ([[pass]] with name = \"...\"); "
                    f"entry {i + 1} is {type(t).__name__} {_short_repr(t, 60)}")
            t = dict(t)
            name = t.pop("name", None)
            if name is None:
                raise PipelineSpecError(f"{where}: [[pass]] number {i + 1} has no name = \"...\"")
            if not isinstance(name, str):
                from fxpress.graph.artifact.values import _short_repr

                raise PipelineSpecError(f"{where}: [[pass]] number {i + 1}: name must be a string "
                                        f"such as \"prune\", got {type(name).__name__} {_short_repr(name, 60)}")
            tol = t.pop("tol", None)
            if tol is not None:
                if not isinstance(tol, dict):
                    raise PipelineSpecError(f"{where}: pass '{name}': tol must be a table")
                t.update({f"tol.{k}": v for k, v in tol.items()})
            passes.append(PassSpec(name, t))
    for key in ("model", "example_inputs", "calibration", "train_data", "evaluate", "output",
                "policy", "capture", "description"):
        if key in data and not isinstance(data[key], str):
            raise PipelineSpecError(f"{where}: '{key}' must be a string")
    for key in ("entropy", "in_place"):
        if key in data and not isinstance(data[key], bool):
            raise PipelineSpecError(f"{where}: '{key}' must be true or false")
    if "seed" in data and seed_error(data["seed"]):
        raise PipelineSpecError(f"{where}: 'seed' {seed_error(data['seed'])}")
    kwargs = {k: data[k] for k in ("model", "example_inputs", "calibration", "train_data",
                                   "evaluate", "policy", "output", "entropy", "in_place", "seed",
                                   "capture", "description") if k in data}
    return Recipe(path=path, passes=passes, **kwargs)


def load_reference(ref: str, base_dir: Path, what: str = "reference") -> Callable[..., Any]:
    """Resolve ``file.py:name`` (relative to ``base_dir``) or ``package.module:name``."""
    if ":" not in ref:
        raise PipelineSpecError(f"recipe '{what}': expected 'file.py:callable' or "
                                f"'package.module:callable', got {ref!r}")
    mod_ref, _, attr = ref.rpartition(":")
    try:
        if mod_ref.endswith(".py"):
            file = (base_dir / mod_ref).resolve()
            if not file.is_file():
                raise PipelineSpecError(f"recipe '{what}': no such file {file}")
            mod_name = f"_fxpress_recipe_{file.stem}_{abs(hash(str(file)))}"
            module = sys.modules.get(mod_name)
            if module is None:
                spec = importlib.util.spec_from_file_location(mod_name, file)
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(mod_name, None)
                    raise
        else:
            module = importlib.import_module(mod_ref)
    except PipelineSpecError:
        raise
    except Exception as e:
        raise PipelineSpecError(f"recipe '{what}': importing {mod_ref!r} failed: "
                                f"{type(e).__name__}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=1)
        raise PipelineSpecError(f"recipe '{what}': {mod_ref!r} has no attribute {attr!r}"
                                + (f"; did you mean {close[0]!r}?" if close else "")) from None
