"""The pass manager: for each pass, copy → run → lint/recompile → verify → commit.

>>> pipe = Pipeline.parse("prune{sparsity=0.5}", registry)          # doctest: +SKIP
>>> res = pipe.run(model, example_inputs=(x,), calibration=batches)  # doctest: +SKIP
>>> print(res.report())                                              # doctest: +SKIP

Runs are transactional. The caller's model is never modified: the pipeline works on a
structural copy (own module objects and graph; tensors shared, since passes replace
tensors instead of writing into them — a pass that does not promise this gets a full
copy). A pass that raises, returns the wrong thing, breaks the graph or fails
verification under policy ``strict`` raises an error carrying ``last_good``, the last
graph that passed.

``in_place=True`` trades that transaction for memory: a pass that promises to replace
tensors rewrites the pipeline's own graph instead of a copy, so each weight it replaces
is freed as it goes instead of living on in the graph before the pass (one copy of the
weights less at the peak on a large model). The caller's model is still never modified,
but there is no ``last_good`` (errors carry None) and policy ``rollback`` is refused.
"""
from __future__ import annotations

import difflib
import gc
import math
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx

from fxpress.errors import (FxpressError, InputError, OptionError, PassError,
                            PipelineSpecError, UnknownPassError, VerificationError)
from fxpress.graph.capture import (TRACE_LOCK, as_input_tuple, capture, clone_structure,
                                   tensors_of)
from fxpress.graph.artifact import artifact_size
from fxpress.graph.inspect import human_bytes, layer_summary, stamp_changes, to_networkx
from fxpress.graph.weights import (compressed_modules, nonzeros, runtime_caches, stored_bytes,
                                   trim_heap, weighted_ops)
from fxpress.passes.base import Pass, PassContext, PassInfo, PassResult
from fxpress.passes.spec import PassSpec, Recipe, format_spec, parse_recipe, parse_spec
from fxpress.passes.verify import Metrics, Verifier, misses

POLICIES = ("strict", "warn", "rollback")


@dataclass
class PassRecord:
    """What one pass did: timing, bytes, sparsity, error metrics and the verdict.

    ``status``: "ok"; "warn" (missed its tolerance, kept: policy warn); "deferred" (missed,
    kept because a later step such as distill recovers accuracy); "rolled back"; "failed".
    """

    index: int
    name: str
    spec: str
    seconds: float = 0.0
    verify_seconds: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    disk_bytes: int = 0         # what fxpress.save would write for the graph after the pass
    params: int = 0
    zeros: int = 0
    changed: bool = False
    status: str = "ok"
    message: str = ""
    cumulative: Metrics | None = None
    incremental: Metrics | None = None
    tolerance: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("index", "name", "spec", "seconds", "verify_seconds",
                                            "bytes_before", "bytes_after", "disk_bytes", "params", "zeros",
                                            "changed", "status", "message", "tolerance", "stats")}
        d["sparsity"] = self.sparsity
        d["cumulative"] = self.cumulative.as_dict() if self.cumulative else None
        d["incremental"] = self.incremental.as_dict() if self.incremental else None
        return d


@dataclass
class PipelineResult:
    """The compressed graph and one record per pass."""

    module: torch.fx.GraphModule
    records: list[PassRecord]
    pipeline: str = ""
    capture: dict = field(default_factory=dict)
    original_bytes: int = 0
    original_disk_bytes: int = 0
    #: per-layer rows and weight histograms of the captured graph (``fxpress report``'s "before")
    baseline: dict = field(default_factory=dict)

    def report(self) -> str:
        """The per-pass table (time, sparsity, bytes, error metrics, status)."""
        return format_records(self.records, self.original_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "capture": self.capture,
                "original_bytes": self.original_bytes,
                "original_disk_bytes": self.original_disk_bytes, "baseline": self.baseline,
                "records": [r.as_dict() for r in self.records]}


def _fmt(v: float | None, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return format(v, spec)


def format_records(records: Sequence[PassRecord], original_bytes: int) -> str:
    """Render records as a fixed-width table."""
    head = ["#", "pass", "status", "time s", "verify s", "sparsity", "bytes", "on disk", "x smaller",
            "rel_l2 Δ", "rel_l2", "cosine", "top1"]
    rows = []
    for r in records:
        c, i = r.cumulative, r.incremental
        rows.append([
            str(r.index), r.spec, r.status, f"{r.seconds:.3f}", f"{r.verify_seconds:.3f}",
            f"{r.sparsity:.1%}", human_bytes(r.bytes_after), human_bytes(r.disk_bytes) if r.disk_bytes else "-",
            f"{original_bytes / r.disk_bytes:.2f}" if r.disk_bytes else "-",
            _fmt(i.rel_l2 if i else None, ".2e"), _fmt(c.rel_l2 if c else None, ".2e"),
            _fmt(c.cosine if c else None), _fmt(c.top1 if c else None),
        ])
    widths = [max(len(h), *(len(row[k]) for row in rows)) if rows else len(h)
              for k, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if k in (1, 2) else c.rjust(w)  # noqa: E731
                                   for k, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    notes = [f"  [{r.index}] {r.name}: {r.message}" for r in records if r.message]
    return "\n".join(out + notes)


def weight_counts(gm: torch.nn.Module) -> tuple[int, int]:
    """(weights, exact zeros) over every weighted op, decoding runtime modules."""
    params = zeros = 0
    seen: set[str] = set()
    for op in weighted_ops(gm):
        if op.name in seen:
            continue
        seen.add(op.name)
        w = op.weight()
        params += w.numel()
        zeros += w.numel() - nonzeros(w)
    for _, m in compressed_modules(gm):
        n, nz = m.count_weights()
        params += n
        zeros += n - nz
    return params, zeros


class Instrument:
    """Observes a pipeline run. Override any of the three calls."""

    def run_before_pass(self, pass_: Pass, gm: torch.fx.GraphModule, ctx: PassContext) -> None:
        pass

    def run_after_pass(self, pass_: Pass, gm: torch.fx.GraphModule, record: PassRecord) -> None:
        pass

    def run_after_pipeline(self, result: PipelineResult) -> None:
        pass


class PassTimer(Instrument):
    """Wall time of each pass including verification, in ``self.times`` (name, seconds)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self._start = 0.0

    def run_before_pass(self, pass_, gm, ctx):
        self._start = time.perf_counter()

    def run_after_pass(self, pass_, gm, record):
        self.times.append((str(pass_), time.perf_counter() - self._start))


class GraphDumper(Instrument):
    """Writes each graph's code before and after every pass into ``folder``.

    Files: ``00-captured.py``, ``01-prune.before.py``, ``01-prune.after.py``, ...
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._i = 0

    def _write(self, name: str, gm: torch.fx.GraphModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / name).write_text(gm.code)

    def run_before_pass(self, pass_, gm, ctx):
        self._i += 1
        self._write(f"{self._i:02d}-{pass_.name}.before.py", gm)

    def run_after_pass(self, pass_, gm, record):
        self._write(f"{self._i:02d}-{pass_.name}.after.py", gm)


def resolve_pass(spec: PassSpec, registry: Mapping[str, PassInfo], text: str | None = None) -> Pass:
    """Build the pass a spec names, with a did-you-mean for unknown names."""
    info = registry.get(spec.name)
    if info is None:
        hint = difflib.get_close_matches(spec.name, list(registry), n=1)
        more = f"; did you mean '{hint[0]}'?" if hint else ""
        failed = [str(e) for e in getattr(registry, "errors", [])]
        fail = ("\n  plugins that failed to load: " + "; ".join(failed)) if failed else ""
        raise UnknownPassError(
            f"unknown pass '{spec.name}' (known: {', '.join(sorted(registry)) or 'none'}){more}"
            f"{fail}\n  `fxpress passes` lists every registered pass", text,
            spec.position if text is not None else None)
    cls = info.cls if isinstance(info, PassInfo) else info
    return cls(**dict(spec.options))


class Pipeline:
    """A list of passes and how to run them.

    >>> Pipeline.parse("prune{sparsity=0.5},prune{threshold=0.01}", registry)  # doctest: +SKIP
    Pipeline('prune{sparsity=0.5},prune{threshold=0.01}')
    """

    def __init__(self, passes: Iterable[Pass], *, policy: str = "strict",
                 instruments: Iterable[Instrument] = (), progress: bool | None = None,
                 in_place: bool = False):
        self.passes = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise InputError(f"Pipeline: expected Pass instances, got {type(p).__name__} {p!r}")
        if policy not in POLICIES:
            raise InputError(f"Pipeline: policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.in_place = bool(in_place)
        self.instruments = list(instruments)
        self.progress = progress
        self.recipe: Recipe | None = None
        self.last_good: torch.fx.GraphModule | None = None

    @classmethod
    def parse(cls, text: str, registry: Mapping[str, PassInfo], **kwargs: Any) -> "Pipeline":
        """Build a pipeline from text such as ``prune{sparsity=0.5},quantize{bits=8}``."""
        specs = parse_spec(text)
        return cls([resolve_pass(s, registry, text) for s in specs], **kwargs)

    @classmethod
    def from_recipe(cls, source: str | Path | dict, registry: Mapping[str, PassInfo],
                    **kwargs: Any) -> "Pipeline":
        """Build a pipeline from a TOML recipe (path, text or dict); keeps it as ``.recipe``."""
        recipe = parse_recipe(source)
        kwargs.setdefault("policy", recipe.policy)
        kwargs.setdefault("in_place", recipe.in_place)
        pipe = cls([resolve_pass(s, registry) for s in recipe.passes], **kwargs)
        pipe.recipe = recipe
        return pipe

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __len__(self) -> int:
        return len(self.passes)

    # -- running ---------------------------------------------------------------------------
    def run(self, model: torch.nn.Module, example_inputs: Any = None, *,
            calibration: Iterable[Any] | None = None, train_data: Any = None,
            policy: str | None = None, capture_method: str = "auto",
            seed: int = 0, top1: bool | None = None, in_place: bool | None = None) -> PipelineResult:
        """Capture (unless given a GraphModule), then run every pass with verification.

        ``top1``: measure argmax agreement (None: when the outputs look like class logits).
        ``in_place``: rewrite one graph instead of a copy per pass (see the module docs);
        None keeps the pipeline's setting.
        """
        policy = policy or self.policy
        if policy not in POLICIES:
            raise InputError(f"policy must be one of {POLICIES}, got {policy!r}")
        in_place = self.in_place if in_place is None else bool(in_place)
        if in_place and policy == "rollback":
            raise InputError("policy 'rollback' needs the graph before each pass, which "
                             "in_place=True does not keep; choose policy 'strict' or 'warn', "
                             "or run with in_place=False")
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
        calib = _calibration_list(calibration)
        if example_inputs is None:
            if not calib:
                raise InputError("give example_inputs=(x,) or calibration=[(x,), ...]")
            example_inputs = calib[0]
        example_inputs = as_input_tuple(example_inputs)

        if isinstance(model, torch.fx.GraphModule):
            gm = clone_structure(model)
            gm.meta.setdefault("fxpress", {"method": "given", "passes": []})
        else:
            gm = capture(model, example_inputs, capture_method)
        with TRACE_LOCK.running(), runtime_caches(False):
            batches = calib or [example_inputs]
            labelled = None
            if train_data is not None and any(p.tol.min_accuracy_ratio is not None for p in self.passes):
                labelled = _labelled(train_data, len(example_inputs))
            verifier = Verifier(model, batches, top1=top1, labelled=labelled)
            current_out = verifier.run(gm, annotate=True)
            capture_metrics = verifier.compare_to_reference(current_out)
            gm.meta["fxpress"]["capture_error"] = capture_metrics.as_dict()
            ctx = PassContext(example_inputs=example_inputs, calibration=calib or None,
                              train_data=train_data, reference=model, seed=seed,
                              progress=self.progress)
            original_bytes = stored_bytes(gm)
            baseline = layer_summary(gm)
            records: list[PassRecord] = []
            self.last_good = gm
            recovers_at = [i for i, p in enumerate(self.passes) if p.recovers]

            bar = _progress(len(self.passes), self.progress)
            try:
                for i, p in enumerate(self.passes):
                    if bar is not None:
                        bar.set_postfix_str(p.name)
                    # in place, only a pass that replaces tensors: a pass that may write
                    # into them gets its own copies (the first graph's are the caller's)
                    rewrite = in_place and p.replaces_tensors
                    if rewrite:
                        self.last_good = None  # rewritten as the pass goes
                    record, gm, current_out, before = self._run_one(
                        i + 1, p, gm, ctx, verifier, current_out, policy,
                        deferred_to=next((j + 1 for j in recovers_at if j > i), None),
                        in_place=rewrite)
                    records.append(record)
                    ctx.history.append(record)
                    self.last_good = gm
                    if before is not None:  # kept (a rollback returns the graph before)
                        release_memory()
                        self._finish(p, before, gm, record)
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
        result = PipelineResult(gm, records, str(self), dict(gm.meta.get("fxpress", {})),
                                original_bytes, baseline["file_bytes"], baseline)
        for inst in self.instruments:
            inst.run_after_pipeline(result)
        return result

    def _run_one(self, index, p, current, ctx, verifier, current_out, policy, deferred_to,
                 in_place=False):
        for inst in self.instruments:
            inst.run_before_pass(p, current, ctx)
        missing = [w for w in p.needs if not getattr(ctx, w)]
        if missing:
            try:
                ctx.require(p.name, missing[0])
            except FxpressError as e:
                e.last_good = current
                raise
        # what stamping the kept graph diffs against, taken while only ``current`` is held
        before = to_networkx(current)
        trim_heap()  # what verification and measuring freed
        work = current if in_place else clone_structure(current, copy_tensors=not p.replaces_tensors)
        last_good = None if in_place else current
        names = {id(t): n for n, t in list(current.named_parameters(remove_duplicate=False))
                 + list(current.named_buffers(remove_duplicate=False))}
        # weakly: in place, what the pass replaces must be free to go (a tensor that died
        # was no one else's, so a write into it harmed nothing)
        watched = [(weakref.ref(t), names.get(id(t), "?"), t._version) for t in tensors_of(current)]
        del names
        record = PassRecord(index, p.name, str(p), bytes_before=stored_bytes(current),
                            tolerance=p.tol.limits())
        start = time.perf_counter()
        try:
            result = p.run(work, ctx)
        except FxpressError as e:
            e.last_good = last_good
            raise
        except Exception as e:
            raise PassError(p.name, f"raised {type(e).__name__}: {e}", last_good=last_good) from e
        except KeyboardInterrupt as e:
            e.last_good = last_good  # type: ignore[attr-defined]
            raise
        record.seconds = time.perf_counter() - start

        if not isinstance(result, PassResult) or not isinstance(result.module, torch.fx.GraphModule):
            got = type(result.module if isinstance(result, PassResult) else result).__name__
            raise PassError(p.name, f"returned {got}; a pass must return "
                            "PassResult(module=<GraphModule>, changed=..., stats={...})",
                            last_good=last_good)
        touched = [name for ref, name, version in watched
                   if (t := ref()) is not None and t._version != version]
        if touched:
            raise PassError(p.name, f"wrote into shared tensor(s) {touched[:5]} in place; a pass "
                            "that sets replaces_tensors=True must replace tensors "
                            "(WeightedOp.set_weight) instead of writing into them",
                            last_good=last_good)
        new = result.module
        try:
            new.graph.lint()
            new.recompile()
        except Exception as e:
            raise PassError(p.name, f"left a graph that fails lint: {type(e).__name__}: {e}",
                            last_good=last_good) from e

        trim_heap()  # the pass's temporaries
        v_start = time.perf_counter()
        try:
            new_out = verifier.run(new, annotate=True)
            trim_heap()  # the run's activations and kernels' temporaries
            record.cumulative = verifier.compare_to_reference(new_out)
            record.incremental = verifier.compare(new_out, current_out)
        except Exception as e:
            raise PassError(p.name, f"the rewritten graph does not run on the calibration "
                            f"inputs: {type(e).__name__}: {e}", last_good=last_good) from e
        record.verify_seconds = time.perf_counter() - v_start
        record.changed = bool(result.changed)
        record.stats = dict(result.stats)
        record.bytes_after = stored_bytes(new)

        metrics = record.cumulative if p.tol.against == "reference" else record.incremental
        bad = misses(p.tol, metrics)
        if bad:
            key, limit, value = bad[0]
            what = ", ".join(f"{k} = {v:.6g} (limit {lim:.6g})" for k, lim, v in bad)
            broken = key == "nonfinite"  # NaN/Inf is never kept, whatever the policy
            if broken:
                what = f"produced {int(value)} NaN/Inf output values the original model does not have"
            if deferred_to is not None and not broken:
                record.status = "deferred"
                record.message = f"missed {what}; left to the recovery step #{deferred_to}"
            elif policy == "warn" and not broken:
                record.status = "warn"
                record.message = f"missed {what}; kept (policy warn)"
            elif policy == "rollback":
                record.status = "rolled back"
                record.message = f"missed {what}; change dropped (policy rollback)"
                record.bytes_after = record.bytes_before
                record.params, record.zeros = weight_counts(current)
                for inst in self.instruments:
                    inst.run_after_pass(p, current, record)
                return record, current, current_out, None
            else:
                record.status = "failed"
                record.message = what
                record.params, record.zeros = weight_counts(new)
                raise VerificationError(
                    p.name, key, limit, value,
                    f"pass '{p.name}' {what}" if broken else None,
                    last_good=last_good, record=record)

        new.meta.setdefault("fxpress", dict(current.meta.get("fxpress", {})))
        new.meta["fxpress"] = dict(new.meta["fxpress"])
        new.meta["fxpress"]["passes"] = list(current.meta.get("fxpress", {}).get("passes", [])) + [str(p)]
        # kept: run() finishes the record (_finish) once ``current`` is gone
        return record, new, new_out, before

    def _finish(self, p: Pass, before: Any, new: torch.fx.GraphModule, record: PassRecord) -> None:
        """Stamp, count and measure a kept pass's graph, then tell the instruments. Runs
        after the graph before the pass is released: none of it needs those weights, and
        decoding or encoding the new ones then costs no memory on top of them."""
        stamp_changes(before, new, str(p))
        record.params, record.zeros = weight_counts(new)
        record.disk_bytes = artifact_size(new)
        for inst in self.instruments:
            inst.run_after_pass(p, new, record)


def release_memory() -> None:
    """Free what a replaced graph held and hand the freed pages back to the OS.

    A GraphModule is a reference cycle (module <-> graph <-> nodes): until Python's next
    full collection, the graph a pass replaced keeps every tensor only it held.
    """
    gc.collect()
    trim_heap()


def _calibration_list(calibration: Iterable[Any] | None) -> list[tuple]:
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        raise InputError("calibration must be an iterable of input tuples, e.g. [(x1,), (x2,)], "
                         "not a single tensor")
    out = []
    for i, b in enumerate(calibration):
        out.append(as_input_tuple(b, what=f"calibration batch {i}"))
    return out


def _labelled(train_data: Any, n_inputs: int, limit: int = 32) -> list[tuple] | None:
    """Up to ``limit`` (inputs, label) pairs from ``train_data`` for task-accuracy checks."""
    out = []
    for batch in train_data:
        if len(out) >= limit:
            break
        if isinstance(batch, (tuple, list)) and len(batch) == n_inputs + 1:
            out.append((tuple(batch[:-1]), batch[-1]))
    return out or None


def _progress(total: int, enabled: bool | None):
    if enabled is False or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    # disable=None: shown only on a terminal; delay: only for pipelines that take a while
    return tqdm(total=total, desc="fxpress", unit="pass", delay=1.0,
                disable=None if enabled is None else not enabled, file=sys.stderr, leave=False)
