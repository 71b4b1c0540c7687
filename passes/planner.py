"""Compress to a target: per-layer choices under a size target and an accuracy budget.

>>> res = compress_to_target(model, registry, calibration=batches, target="40x",     # doctest: +SKIP
...                          max_drop=0.005, evaluate=val_accuracy, train_data=train)
>>> print(res.plan.format())        # one row per layer: the choice, bytes, bits, error      # doctest: +SKIP
>>> res.plan.toml                   # a recipe that reproduces res.module bit for bit         # doctest: +SKIP

How it works:

1. :func:`~fxpress.passes.sensitivity.sensitivity` measures every candidate on every
   weighted layer alone (bytes as the artifact stores them, error on the calibration
   batches or the user's ``evaluate``).
2. :func:`allocate` picks one candidate per layer: the least total error whose bytes fit
   the target (greedy on error per byte, refined by an exact multiple-choice knapsack over
   bytes); or, with only ``max_drop``, the fewest bytes whose predicted error fits it.
3. The choices become one pipeline (prune, recovery, the coding passes, recovery; each
   pass restricted to its layers) and it runs, verified, on the full calibration data.
4. The result is measured: the artifact's exact size (``artifact_size``) and the budget
   metric. Over the size target: the layer budget shrinks by the excess and it plans again.
   Over the accuracy budget: the most sensitive layers it compressed are backed off (their
   choice and every choice at least as harmful are forbidden) and it plans again.
5. It returns the best attempt that meets both, else the one that meets the size target
   and comes closest on accuracy, else the smallest, and then says by how much it missed
   (``plan.met``, ``plan.missed``, and a :class:`PlanMissedWarning`): never silently over.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from fxpress.errors import InputError, PlanMissedWarning
from fxpress.graph.capture import as_input_tuple, capture, clone_structure, eval_mode
from fxpress.passes.base import PassInfo
from fxpress.passes.sensitivity import (KEEP, METRICS, SensitivityTable, Trial, sensitivity)
from fxpress.passes.allocate import allocate
from fxpress.passes.layer_rules import escape
from fxpress.passes.recipes import format_pass, parse_spec

#: Default recovery steps with train data: after pruning, and after the coding passes.
RECOVERY = ("distill{epochs=30,lr=0.01}", "distill{epochs=10,lr=0.001}")
#: Passes that go before the first recovery step (their damage is trained away before
#: the coding passes snap the weights to a grid).
EARLY = ("prune",)


def parse_target(target: Any) -> float:
    """A size target as a fraction of the fp32 file: ``0.16``, ``"0.16"``, ``"40x"``.

    >>> parse_target("40x")
    0.025
    """
    value = target
    if isinstance(target, str):
        text = target.strip().lower()
        try:
            value = 1.0 / float(text[:-1]) if text.endswith("x") else float(text)
        except (ValueError, ZeroDivisionError):
            raise InputError(f"target {target!r}: expected a fraction of the fp32 size such as "
                             "0.16, or a compression factor such as '40x'") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 1:
        raise InputError(f"target {target!r}: expected a fraction of the fp32 size in (0, 1] "
                         "(e.g. 0.16) or a factor >= 1 such as '40x'")
    return float(value)


# -- allocation ------------------------------------------------------------------------------

# -- from choices to a pipeline --------------------------------------------------------------

def plan_passes(choices: Mapping[str, str], recovery: Sequence[str] | None = None,
                registry: Mapping[str, PassInfo] | None = None) -> list[tuple[str, dict]]:
    """The pipeline for per-layer ``choices`` (layer -> candidate text) as (pass, options).

    One pass per technique and stage, restricted to its layers with ``include``: its
    options are the ones most of those layers chose, and a ``layers`` rule per layer that
    chose others (see :mod:`fxpress.passes.layer_rules`). Pruning goes first, then
    ``recovery[0]``, then the coding passes, then ``recovery[1]`` (either may be None).
    ``registry`` gives the defaults a rule resets (an option the base sets and the layer's
    choice does not); without it each distinct choice becomes a pass of its own.
    """
    per_pass: dict[tuple[bool, str], list[tuple[str, dict]]] = {}
    for layer, text in choices.items():
        if text == KEEP:
            continue
        for spec in parse_spec(text):
            opts = dict(spec.options)
            if spec.name == "prune" and "sparsity" in opts:
                # a choice is one layer's sparsity, measured alone: the pass that groups
                # layers of the same choice must not spread it across them (prune's
                # default scope does)
                opts.setdefault("scope", "layer")
            per_pass.setdefault((spec.name not in EARLY, spec.name), []).append((layer, opts))
    out: dict[bool, list[tuple[str, dict]]] = {False: [], True: []}
    for (late, name), members in sorted(per_pass.items()):
        if registry is None or name not in registry:
            variants: dict[str, tuple[dict, list[str]]] = {}
            for layer, opts in members:
                key = format_pass(name, sorted(opts.items()))
                variants.setdefault(key, (opts, []))[1].append(escape(layer))
            for key in sorted(variants):
                opts, layers = variants[key]
                out[late].append((name, {**opts, "include": layers}))
            continue
        info = registry[name]
        spec = (info.cls if isinstance(info, PassInfo) else info).options_spec()
        counts: dict[str, int] = {}
        for _, opts in members:
            key = format_pass(name, sorted(opts.items()))
            counts[key] = counts.get(key, 0) + 1
        base_key = max(counts, key=lambda k: (counts[k], -list(counts).index(k)))
        base = next(o for _, o in members if format_pass(name, sorted(o.items())) == base_key)
        rules: dict[str, dict] = {}
        for layer, opts in members:
            if opts == base:
                continue
            diff = {k: v for k, v in opts.items() if base.get(k, _UNSET) != v}
            diff.update({k: spec[k].default for k in base if k not in opts and k in spec})
            rules[escape(layer)] = diff
        entry = {**base, "include": [escape(layer) for layer, _ in members]}
        if rules:
            entry["layers"] = rules
        out[late].append((name, entry))
    early, late = out[False], out[True]
    result: list[tuple[str, dict]] = list(early)
    rec = list(recovery or (None, None)) + [None, None]
    if early and late and rec[0]:
        result += [(s.name, dict(s.options)) for s in parse_spec(rec[0])]
    result += late
    if result and rec[1]:
        result += [(s.name, dict(s.options)) for s in parse_spec(rec[1])]
    elif result and early and not late and rec[0]:
        result += [(s.name, dict(s.options)) for s in parse_spec(rec[0])]
    return result


_UNSET = object()


def pipeline_text(passes: Sequence[tuple[str, dict]]) -> str:
    return ",".join(format_pass(n, list(o.items())) for n, o in passes)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        raise ValueError("TOML has no null")
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def _has_none(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, dict):
        return any(_has_none(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_none(x) for x in v)
    return False


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def recipe_toml(passes: Sequence[tuple[str, dict]], *, policy: str, seed: int, entropy: bool,
                comment: str = "") -> str:
    """A TOML recipe of ``passes`` that ``Pipeline.from_recipe`` reads: ``[[pass]]`` tables
    with a ``[pass.layers."pattern"]`` table per layer rule; the pipeline text instead (one
    pass a line) when an option must be reset to none, which TOML cannot say."""
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    lines += [f'policy = "{policy}"', f"seed = {seed}", f"entropy = {_toml_value(entropy)}", ""]
    if any(_has_none(o) for _, o in passes):
        text = ",\n".join(format_pass(n, list(o.items())) for n, o in passes)
        if "'''" not in text:
            return "\n".join(lines + ["pipeline = '''", text, "'''", ""])
        return "\n".join(lines + [f"pipeline = {_toml_value(text.replace(chr(10), ''))}", ""])
    for name, opts in passes:
        lines.append("[[pass]]")
        lines.append(f'name = "{name}"')
        for k, v in opts.items():
            if not k.startswith("tol.") and k != "layers":
                lines.append(f"{k} = {_toml_value(v)}")
        for k, v in opts.items():
            if k.startswith("tol."):
                lines.append(f"tol.{k[4:]} = {_toml_value(v)}")
        for pattern, rule in (opts.get("layers") or {}).items():
            lines.append(f"[pass.layers.{_toml_value(pattern)}]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in rule.items()]
        lines.append("")
    return "\n".join(lines)


# -- the plan ---------------------------------------------------------------------------------

@dataclass
class Plan:
    """What the planner chose and what it got.

    ``choices``: layer -> the option taken (a :class:`~fxpress.passes.sensitivity.Trial`);
    ``pipeline``: the pipeline text that ran; ``toml``: the same as a recipe that reproduces
    the result bit for bit with the same calibration and train data; ``file_bytes``: the
    artifact's exact size; ``ratio``: ``file_bytes`` over the fp32 file's; ``drop``: the
    budget metric's drop; ``met``: both the target and the budget held; ``missed``: by how
    much each was missed (empty when met); ``attempts``: every round.
    """

    choices: dict[str, Trial]
    pipeline: str
    toml: str
    table: SensitivityTable
    target_ratio: float | None
    target_bytes: int | None
    max_drop: float | None
    metric: str
    file_bytes: int = 0
    ratio: float = 0.0
    score: float | None = None
    drop: float | None = None
    met: bool = False
    missed: dict = field(default_factory=dict)
    attempts: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def predicted_error(self) -> float:
        return sum(t.error for t in self.choices.values())

    def rows(self) -> list[dict[str, Any]]:
        """Per layer: name, kind, params, choice, bytes, bits per weight, predicted error."""
        out = []
        for ls in self.table.layers:
            t = self.choices[ls.name]
            out.append({"layer": ls.name, "kind": ls.kind, "params": ls.params,
                        "choice": t.candidate, "bytes": t.bytes,
                        "bits_per_weight": 8 * t.bytes / max(ls.params, 1), "error": t.error})
        return out

    def format(self) -> str:
        head = ["layer", "kind", "params", "choice", "bytes", "bits/w", "error alone"]
        rows = [[r["layer"], r["kind"], str(r["params"]), r["choice"], str(r["bytes"]),
                 f"{r['bits_per_weight']:.2f}", f"{r['error']:.3g}"] for r in self.rows()]
        widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h)
                  for k, h in enumerate(head)]
        line = lambda c: "  ".join(x.ljust(w) if k in (0, 1, 3) else x.rjust(w)  # noqa: E731
                                   for k, (x, w) in enumerate(zip(c, widths)))
        text = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        tgt = f"target {self.target_ratio:.4g}x fp32 ({self.target_bytes} B)" \
            if self.target_ratio else "no size target"
        drop = "-" if self.drop is None else f"{self.drop:.4g}"
        text.append(f"file {self.file_bytes} B = {self.ratio:.4g}x fp32 "
                    f"({1 / self.ratio if self.ratio else math.inf:.1f}x smaller); {tgt}; "
                    f"{self.metric} drop {drop}"
                    + (f" (budget {self.max_drop:g})" if self.max_drop is not None else "")
                    + ("; met" if self.met else f"; MISSED {self.missed}"))
        return "\n".join(text)

    def as_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "toml": self.toml, "rows": self.rows(),
                "target_ratio": self.target_ratio, "target_bytes": self.target_bytes,
                "max_drop": self.max_drop, "metric": self.metric, "file_bytes": self.file_bytes,
                "ratio": self.ratio, "score": self.score, "drop": self.drop, "met": self.met,
                "missed": self.missed, "attempts": self.attempts, "seconds": self.seconds,
                "sensitivity": self.table.as_dict(), "frontier": predicted_frontier(self.table)}


def compress_to_target(model: torch.nn.Module, registry: Mapping[str, PassInfo],
                       example_inputs: Any = None, *, target: Any = None,
                       max_drop: float | None = None, metric: str = "cosine",
                       evaluate: Callable[[torch.nn.Module], float] | None = None,
                       calibration: Iterable[Any] | None = None, train_data: Any = None,
                       candidates: Any = None, recovery: Sequence[str] | None | str = "auto",
                       entropy: bool = False, table: SensitivityTable | None = None,
                       max_rounds: int = 5, max_samples: int | None = 64, seed: int = 0,
                       progress: bool | None = None, pipeline_cls: Any = None,
                       capture_method: str = "auto", warn: bool = True):
    """Plan per-layer choices to meet ``target`` (and ``max_drop``), run them, check, back off.

    ``target``: the artifact size as a fraction of the fp32 graph's (``0.16``) or a factor
    (``"40x"``). ``max_drop``: the accuracy budget, a drop in ``metric`` ("cosine": mean
    cosine to the original's outputs on the calibration batches; "top1"; "rel_l2": the
    relative L2 error itself) or, with ``evaluate(module) -> score``, in that score (higher
    is better; evaluate it on held-out data). At least one of the two must be given.
    ``recovery``: "auto" (:data:`RECOVERY` when ``train_data`` is given), None, or two
    pipeline texts (after pruning, at the end). ``table``: a sensitivity table to reuse.
    Returns a ``PipelineResult`` with ``.plan`` (:class:`Plan`).
    """
    start = time.perf_counter()
    if target is None and max_drop is None:
        raise InputError("compress: give target=... (e.g. 0.16 or '40x'), max_drop=... or both")
    ratio = parse_target(target) if target is not None else None
    if max_drop is not None and (isinstance(max_drop, bool) or not isinstance(max_drop, (int, float))
                                 or not math.isfinite(max_drop) or max_drop < 0):
        raise InputError(f"max_drop {max_drop!r}: expected a number >= 0 (a drop in {metric}"
                         f"{' or in evaluate()' if evaluate else ''})")
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
    if evaluate is not None and not callable(evaluate):
        raise InputError(f"evaluate must be callable(module) -> score, got {type(evaluate).__name__}")
    if max_rounds < 1:
        raise InputError(f"max_rounds must be >= 1, got {max_rounds!r}")
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if recovery == "auto":
        recovery = RECOVERY if train_data is not None else None
    elif isinstance(recovery, str):
        recovery = (recovery, recovery)
    if recovery is not None:
        recovery = tuple(recovery)
        for r in recovery:
            if r is not None:
                parse_spec(r)  # a typo fails now, not after the sensitivity analysis
    if pipeline_cls is None:
        from fxpress.passes.pipeline import Pipeline as pipeline_cls  # noqa: N813
    calib = list(calibration) if calibration is not None else None
    if example_inputs is None:
        if not calib:
            raise InputError("compress: give example_inputs=(x,) or calibration=[(x,), ...]")
        example_inputs = calib[0]
    example_inputs = as_input_tuple(example_inputs, model=model)

    if isinstance(model, torch.fx.GraphModule):
        gm = clone_structure(model)
    else:
        gm = capture(model, example_inputs, capture_method)
    if table is None:
        table = sensitivity(model, registry, example_inputs, calibration=calib, candidates=candidates,
                            metric=metric, evaluate=evaluate, max_samples=max_samples,
                            recovery=recovery is not None, entropy=entropy, seed=seed,
                            progress=progress, gm=gm)
    base_score = table.base_score
    target_bytes = None if ratio is None else int(ratio * table.original_file_bytes)
    correction = 0
    forbid: dict[str, set[str]] = {}
    attempts: list[tuple[dict, Any, dict[str, Trial], str, str]] = []
    from fxpress.graph.artifact import artifact_size

    for round_ in range(max_rounds):
        if target_bytes is not None:
            choices = allocate(table, target_bytes - table.fixed_bytes - correction, forbid=forbid)
        else:
            choices = allocate(table, max_error=max_drop, forbid=forbid)
        if choices is None:
            break
        passes = plan_passes({k: t.candidate for k, t in choices.items()}, recovery, registry)
        text = pipeline_text(passes)
        if not passes:  # everything kept in float
            passes, text = [("distill", {})], "distill"
        pipe = pipeline_cls.parse(text, registry, policy="warn", progress=progress)
        # from the caller's model, as the recipe will be run: the same capture, the same
        # reference outputs, the same teacher, hence the same bytes
        res = pipe.run(model, example_inputs, calibration=calib, train_data=train_data,
                       policy="warn", seed=seed, capture_method=capture_method)
        size = artifact_size(res.module, entropy)
        score, drop = _measure(res, evaluate, metric, base_score)
        info = {"round": round_ + 1, "pipeline": text, "file_bytes": size,
                "ratio": size / table.original_file_bytes, "score": score, "drop": drop,
                "predicted_error": sum(t.error for t in choices.values()),
                "predicted_bytes": table.fixed_bytes + sum(t.bytes for t in choices.values())}
        attempts.append((info, res, choices, text, passes))
        over = target_bytes is not None and size > target_bytes
        bad = max_drop is not None and drop is not None and drop > max_drop
        if not over and not bad:
            break
        if over:  # the estimate of the file's fixed part was short: shrink the layer budget
            # (a quarter more than the excess: the next choices' estimates err alike)
            correction += math.ceil(1.25 * (size - target_bytes)) + max(
                16, (target_bytes - table.fixed_bytes) // 100)
        if bad and not over:
            if not _back_off(table, choices, forbid):
                break
    if not attempts:
        raise InputError(_nothing_fits(table, target_bytes, max_drop))
    info, res, choices, text, passes = _best(attempts, target_bytes, max_drop)
    missed = {}
    if target_bytes is not None and info["file_bytes"] > target_bytes:
        missed["bytes"] = info["file_bytes"] - target_bytes
        missed["ratio"] = info["ratio"] - ratio
    if max_drop is not None and info["drop"] is not None and info["drop"] > max_drop:
        missed["drop"] = info["drop"] - max_drop
    toml = recipe_toml(passes, policy="warn", seed=seed, entropy=entropy, comment=(
        f"fxpress plan: {info['file_bytes']} bytes = {info['ratio']:.4g}x the fp32 file "
        f"({table.original_file_bytes} bytes)"
        + (f"; target {ratio:g}x" if ratio else "")
        + (f"; {table.metric} drop {info['drop']:.4g}" if info["drop"] is not None else "")
        + "\nrun with the same model, calibration and train data to reproduce it bit for bit"))
    plan = Plan(choices, text, toml, table, ratio, target_bytes, max_drop,
                table.metric, info["file_bytes"], info["ratio"], info["score"], info["drop"],
                not missed, missed, [a[0] for a in attempts], time.perf_counter() - start)
    res.plan = plan
    if missed and warn:
        parts = []
        if "bytes" in missed:
            parts.append(f"the file is {info['file_bytes']} bytes, {missed['bytes']} over the "
                         f"target {target_bytes} ({info['ratio']:.4g}x fp32 against {ratio:g}x)")
        if "drop" in missed:
            parts.append(f"the {table.metric} drop is {info['drop']:.4g}, {missed['drop']:.4g} "
                         f"over max_drop={max_drop:g}")
        warnings.warn(PlanMissedWarning("compress: missed: " + "; ".join(parts) + f" after "
                                        f"{len(attempts)} round(s); res.plan.attempts has each",
                                        missed), stacklevel=2)
    return res


def _measure(res, evaluate, metric: str, base_score: float | None) -> tuple[float | None, float | None]:
    """(score, drop) of a pipeline result: the user's evaluate, else the verifier's metric
    on the calibration batches against the original model (last record)."""
    if evaluate is not None:
        with eval_mode(res.module), torch.no_grad():
            score = float(evaluate(res.module))
        return score, (base_score - score if base_score is not None else None)
    m = res.records[-1].cumulative if res.records else None
    if m is None:
        return None, None
    if metric == "cosine":
        return m.cosine, 1.0 - m.cosine
    if metric == "top1":
        return m.top1, (1.0 - m.top1) if m.top1 is not None else None
    return m.rel_l2, m.rel_l2


def _back_off(table: SensitivityTable, choices: Mapping[str, Trial],
              forbid: dict[str, set[str]]) -> bool:
    """Forbid the most harmful chosen options (the top tenth of the compressed layers by
    error alone, at least one) and everything at least as harmful on those layers."""
    lossy = sorted((t.error, name) for name, t in choices.items() if t.candidate != KEEP)
    if not lossy:
        return False
    worst = lossy[-max(1, len(lossy) // 10):]
    for err, name in worst:
        ls = table.layer(name)
        forbid.setdefault(name, set()).update(t.candidate for t in ls.trials if t.error >= err)
    return True


def _best(attempts, target_bytes, max_drop):
    def key(a):
        info = a[0]
        over = max(0, info["file_bytes"] - target_bytes) if target_bytes is not None else 0
        drop = info["drop"] if info["drop"] is not None else 0.0
        bad = max(0.0, drop - max_drop) if max_drop is not None else 0.0
        # meeting the size target first, then the budget, then accuracy, then size
        return (over > 0, over, bad > 0, bad, drop, info["file_bytes"])
    return min(attempts, key=key)


def _nothing_fits(table: SensitivityTable, target_bytes, max_drop) -> str:
    smallest = table.fixed_bytes + sum(min(t.bytes for t in ls.options()) for ls in table.layers)
    if target_bytes is not None:
        return (f"compress: no choice of the candidates fits the target of {target_bytes} bytes: "
                f"the smallest plan is about {smallest} bytes "
                f"({smallest / table.original_file_bytes:.4g}x fp32); raise the target or add "
                "smaller candidates (candidates=[...], or train_data=... for pruning)")
    return (f"compress: no choice of the candidates keeps the predicted {table.metric} drop "
            f"within max_drop={max_drop:g}")


def uniform_candidates(table: SensitivityTable) -> list[str]:
    """Candidates measured on every layer of ``table`` (for uniform baselines)."""
    common = None
    for ls in table.layers:
        names = {t.candidate for t in ls.trials}
        common = names if common is None else common & names
    return sorted(common or ())


def predicted_frontier(table: SensitivityTable) -> dict[str, list[dict]]:
    """The size/error frontier the table predicts, with no pipeline run (for the report):
    each uniform setting (a candidate measured on every layer, all layers taking it) and
    the planner's allocation at the same file size. Errors are sums of the layers' errors
    alone, in the table's metric; bytes are file bytes."""
    uniform, planner = [], []
    for cand in uniform_candidates(table):
        picks = [next(t for t in ls.trials if t.candidate == cand) for ls in table.layers]
        size = table.fixed_bytes + sum(t.bytes for t in picks)
        uniform.append({"setting": cand, "bytes": size, "ratio": size / table.original_file_bytes,
                        "predicted_error": sum(t.error for t in picks)})
    uniform.sort(key=lambda d: d["bytes"])
    for u in uniform:  # the uniform setting itself fits its own size: never None
        choices = allocate(table, u["bytes"] - table.fixed_bytes)
        psize = table.fixed_bytes + sum(t.bytes for t in choices.values())
        planner.append({"at": u["setting"], "bytes": psize,
                        "ratio": psize / table.original_file_bytes,
                        "predicted_error": sum(t.error for t in choices.values())})
    return {"uniform": uniform, "planner": planner}


__all__ = ["compress_to_target", "allocate", "plan_passes", "pipeline_text", "recipe_toml",
           "Plan", "PlanMissedWarning", "parse_target", "RECOVERY", "predicted_frontier",
           "uniform_candidates"]
