"""The pass manager: for each pass, snapshot → run → check → commit or roll back.

>>> pipe = Pipeline.parse("prune{sparsity=0.5}")                     # doctest: +SKIP
>>> res = pipe.run(model, example_inputs=(x,), calibration=batches)  # doctest: +SKIP
>>> print(res.report())                                              # doctest: +SKIP

Runs are transactional. The caller's model is never modified: the pipeline works on a
structural copy (own module objects and graph; tensors shared, since passes replace
tensors instead of writing into them — a pass whose traits do not promise this gets a full
copy). A pass that raises, returns the wrong thing, breaks the graph or fails
verification under policy ``strict`` raises an error carrying ``last_good``, the last
graph that passed.

``in_place=True`` trades that transaction for memory: a pass that promises to replace
tensors rewrites the pipeline's own graph instead of a copy, so each weight it replaces
is freed as it goes instead of living on in the graph before the pass (one copy of the
weights less at the peak on a large model). The caller's model is still never modified,
but there is no ``last_good`` (errors carry None) and policy ``rollback`` is refused.

Verification, memory trimming and the progress bar are instruments
(:mod:`fxpress.passes.instruments`) the run calls at fixed points, like the caller's own.
"""
from __future__ import annotations

import difflib
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.fx

from fxpress.errors import (FxpressError, InputError, PassError, SharedTensorWriteError,
                            UnknownPassError, VerificationError)
from fxpress.graph.artifact import artifact_size
from fxpress.graph.capture import (TRACE_LOCK, as_input_tuple, capture_copy,
                                   capture_private_on_write, clone_structure, positional_batches,
                                   tensors_of)
from fxpress.graph.guard import CallerModel, preserved_rng, shared_write
from fxpress.graph.inspect import layer_summary, stamp_changes, to_networkx
from fxpress.graph.memory import RollbackRecord, runtime_caches, stored_bytes
from fxpress.graph.weights import uncovered_weights
from fxpress.passes.base import Pass, PassContext, PassInfo, PassResult
from fxpress.passes.gradual import advise, expand, trains
from fxpress.passes.instruments import (CallerIntegrity, GraphDumper, Instrument, MemoryTrim,
                                        PassTimer, Progress, Verification, release_memory)
from fxpress.passes.recipes import PassSpec, Recipe, parse_recipe, parse_spec, seed_error
from fxpress.passes.records import PassRecord, PipelineResult, format_records, weight_counts
from fxpress.passes.verify import Verifier

POLICIES = ("strict", "warn", "rollback")


def default_registry() -> Mapping[str, PassInfo]:
    """The registry names resolve through when none is given: the face's
    ``fxpress.registry()`` (built-ins and installed plugins), looked up at call time so
    that ``passes/`` imports nothing of ``plugins/``."""
    import fxpress

    return fxpress.registry()


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


@dataclass
class _Snapshot:
    """What a pass starts from: the graph to roll back to, the graph it may rewrite, and
    the version counters of the tensors it promised not to write into."""

    work: torch.fx.GraphModule
    kept: torch.fx.GraphModule | None
    before: Any  # the networkx view stamping diffs the kept graph against
    watched: list
    record: RollbackRecord | None = None

    @classmethod
    def take(cls, current: torch.fx.GraphModule, p: Pass, in_place: bool,
             originals: dict[str, torch.Tensor] | None = None) -> "_Snapshot":
        before = to_networkx(current)  # taken while only ``current`` is held
        work = current if in_place else clone_structure(
            current, copy_tensors=not p.traits.replaces_tensors)
        names = {id(t): n for n, t in list(current.named_parameters(remove_duplicate=False))
                 + list(current.named_buffers(remove_duplicate=False))}
        # weakly: in place, what the pass replaces must be free to go (a tensor that died
        # was no one else's, so a write into it harmed nothing)
        watched = [(weakref.ref(t), names.get(id(t), "?"), t._version) for t in tensors_of(current)]
        record = None
        if not in_place and p.traits.replaces_tensors and originals:
            # the graph kept for rollback holds its pruned weights as masks over the
            # caller's: the pass's copy is then the only holder of each, freed as replaced
            record = RollbackRecord.shrink(current, originals)
        return cls(work, None if in_place else current, before, watched, record)

    @property
    def last_good(self) -> torch.fx.GraphModule | None:
        """The graph before the pass, whole again (its weights restored if they were held
        as masks)."""
        self.restore()
        return self.kept

    def restore(self) -> None:
        if self.record is not None and self.record.pending:
            self.record.restore()

    def touched(self) -> list[str]:
        return [name for ref, name, version in self.watched
                if (t := ref()) is not None and t._version != version]


class Pipeline:
    """A list of passes and how to run them.

    >>> Pipeline.parse("prune{sparsity=0.5},prune{threshold=0.01}")  # doctest: +SKIP
    Pipeline('prune{sparsity=0.5},prune{threshold=0.01}')
    """

    def __init__(self, passes: Iterable[Pass], *, policy: str = "strict",
                 instruments: Iterable[Instrument] = (), progress: bool | None = None,
                 in_place: bool = False):
        if isinstance(passes, str):  # Pipeline("prune{sparsity=0.9},quantize{bits=8}")
            passes = [resolve_pass(s, _registry_arg(None, {}), passes) for s in parse_spec(passes)]
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
    def parse(cls, text: str, registry: Mapping[str, PassInfo] | None = None,
              **kwargs: Any) -> "Pipeline":
        """Build a pipeline from text such as ``prune{sparsity=0.5},quantize{bits=8}``;
        names resolve through ``registry`` (default: the plugin registry)."""
        registry = _registry_arg(registry, kwargs)
        specs = parse_spec(text)
        return cls([resolve_pass(s, registry, text) for s in specs], **kwargs)

    @classmethod
    def from_recipe(cls, source: str | Path | dict, registry: Mapping[str, PassInfo] | None = None,
                    **kwargs: Any) -> "Pipeline":
        """Build a pipeline from a TOML recipe (path, text or dict); keeps it as ``.recipe``."""
        registry = _registry_arg(registry, kwargs)
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
            seed: int = 0, top1: bool | None = None, in_place: bool | None = None,
            progress: bool | None = None, instruments: Iterable[Instrument] = ()) -> PipelineResult:
        """Capture (unless given a GraphModule), then run every pass with verification.

        ``top1``: measure argmax agreement (None: when the outputs look like class logits).
        ``policy``, ``in_place``, ``progress``: a value given here wins over the pipeline's
        own (None keeps it); ``instruments`` run after the pipeline's own.

        The caller's model, its train/eval flags and the process's random state are as
        before when this returns or raises (see :class:`~fxpress.graph.guard.CallerModel`).
        """
        policy = policy or self.policy
        if policy not in POLICIES:
            raise InputError(f"policy must be one of {POLICIES}, got {policy!r}")
        in_place = self.in_place if in_place is None else bool(in_place)
        if in_place and policy == "rollback":
            raise InputError("policy 'rollback' needs the graph before each pass, which "
                             "in_place=True does not keep; choose policy 'strict' or 'warn', "
                             "or run with in_place=False")
        if seed_error(seed):
            raise InputError(f"seed {seed_error(seed)}")
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
        calib = _calibration_list(calibration, model)
        _check_train_data(train_data)
        train_data = positional_batches(train_data, model)
        if example_inputs is None:
            example_inputs = calib[0] if calib else _first_inputs(train_data)
            if example_inputs is None:
                raise InputError("give example_inputs=(x,), calibration=[(x,), ...] or "
                                 "train_data=[(x, y), ...]")
        example_inputs = as_input_tuple(example_inputs, model=model)
        progress = self.progress if progress is None else progress
        instruments = [*self.instruments, *instruments]
        with preserved_rng():
            caller = CallerModel(model)
            result = None
            try:
                result = self._run(caller, example_inputs, calib, train_data, policy,
                                   capture_method, seed, top1, in_place, progress, instruments)
                return result
            except BaseException as e:
                caller.release(getattr(e, "last_good", None))
                raise
            finally:
                caller.release(self.last_good, result.module if result is not None else None)

    def _run(self, caller: CallerModel, example_inputs: tuple, calib: list[tuple], train_data: Any,
             policy: str, capture_method: str, seed: int, top1: bool | None, in_place: bool,
             progress: bool | None, user_instruments: list[Instrument]) -> PipelineResult:
        reference = caller.reference
        if isinstance(reference, torch.fx.GraphModule):
            gm = clone_structure(reference)
            gm.meta.setdefault("fxpress", {"method": "given", "passes": []})
        else:
            # a forward that writes into its own tensors (transformers' RWKV rescales its
            # weights at its first call in eval mode) is traced, verified and distilled from
            # a private, writable copy (the caller's model is never written)
            gm, reference = capture_private_on_write(reference, example_inputs, capture_method)
            gm = clone_structure(gm)
        caller.protect(reference)
        caller.protect(gm)
        # the caller's tensors (read-only views) by name: a later graph's weights that
        # differ from them only by zeros are held as masks while a pass runs
        originals = dict(list(gm.named_parameters(remove_duplicate=False))
                         + list(gm.named_buffers(remove_duplicate=False)))
        passes = self.passes
        if any(p.name == "budget" for p in passes):  # its choices, sized on this graph
            from fxpress.passes.budget import resolve

            passes = resolve(passes, gm, PassContext(example_inputs=example_inputs,
                                                     calibration=calib or None, seed=seed,
                                                     train_data=train_data, reference=reference,
                                                     progress=False))
        # staged passes (prune{steps=N}, and a high sparsity before a recovery that trains)
        passes = expand(passes, train_data)
        with TRACE_LOCK.running(), runtime_caches(False):
            labelled = None
            if train_data is not None and any(p.tol.min_accuracy_ratio is not None for p in passes):
                labelled = _labelled(train_data, len(example_inputs))
            # a model whose forward writes into its own weights (an Embedding with max_norm)
            # is verified against a copy with those writes done once, as capture bakes them
            ground = (capture_copy(reference, widen=False)[0]
                      if not isinstance(reference, torch.fx.GraphModule) else reference)
            check = Verification(Verifier(ground, calib or [example_inputs], top1=top1,
                                          labelled=labelled), gm)
            gm.meta["fxpress"]["capture_error"] = check.capture_metrics.as_dict()
            ctx = PassContext(example_inputs=example_inputs, calibration=calib or None,
                              train_data=train_data, reference=ground, seed=seed,
                              progress=progress)
            original_bytes = stored_bytes(gm)
            if gm.meta["fxpress"].get("widened_from") and isinstance(reference, torch.nn.Module):
                original_bytes = stored_bytes(reference)  # the caller's half-precision bytes
            baseline = layer_summary(gm)
            instruments = [MemoryTrim(), check, CallerIntegrity(caller),
                           Progress(len(passes), progress), *user_instruments]
            _notify(instruments, "run_before_pipeline", self, gm, ctx)
            records: list[PassRecord] = []
            self.last_good = gm
            # a step recovers only with data to train on (distill without epochs and without
            # train_data only inserts taps); one that needs the data recovers or stops
            recovers_at = [i + 1 for i, p in enumerate(passes) if trains(p, train_data)]
            for index, p in enumerate(passes, 1):
                # in place, only a pass that replaces tensors: a pass that may write
                # into them gets its own copies (the first graph's are the caller's)
                rewrite = in_place and p.traits.replaces_tensors
                if rewrite:
                    self.last_good = None  # rewritten as the pass goes
                deferred_to = next((j for j in recovers_at if j > index), None)
                try:
                    record, gm, before = self._run_one(index, p, gm, ctx, instruments, check,
                                                       policy, deferred_to, rewrite, originals)
                except BaseException as e:
                    _notify(instruments, "run_after_pass_failed", p, getattr(e, "last_good", None), e)
                    raise
                records.append(record)
                ctx.history.append(record)
                self.last_good = gm
                if before is not None:  # kept; the graph before it is released now
                    self._commit(p, before, gm, record, instruments)
        advise(passes, records, train_data)
        result = PipelineResult(gm, records, str(self), dict(gm.meta.get("fxpress", {})),
                                original_bytes, baseline["file_bytes"], baseline)
        _notify(instruments, "run_after_pipeline", result)
        return result

    def _run_one(self, index: int, p: Pass, current: torch.fx.GraphModule, ctx: PassContext,
                 instruments: list[Instrument], check: Verification, policy: str,
                 deferred_to: int | None, in_place: bool,
                 originals: dict[str, torch.Tensor] | None = None):
        """Snapshot, run, check; return (record, graph to go on with, ``before`` view if
        the pass is to be committed, None if it was rolled back)."""
        _notify(instruments, "run_before_pass", p, current, ctx)
        for what in p.traits.needs:
            if not getattr(ctx, what):
                try:
                    ctx.require(p.name, what)
                except FxpressError as e:
                    e.last_good = current
                    raise
        record = PassRecord(index, p.name, str(p), bytes_before=stored_bytes(current),
                            tolerance=p.tol.limits())
        snap = _Snapshot.take(current, p, in_place, originals)
        try:
            return self._check(p, snap, current, ctx, record, instruments, check, policy,
                               deferred_to)
        except BaseException:
            snap.restore()  # whatever escapes, the graph before the pass is whole
            raise

    def _check(self, p: Pass, snap: _Snapshot, current: torch.fx.GraphModule, ctx: PassContext,
               record: PassRecord, instruments: list[Instrument], check: Verification,
               policy: str, deferred_to: int | None):
        """:meth:`_run_one` after the snapshot: run, check, and decide."""
        new = self._execute(p, snap, ctx, record)
        for inst in instruments:
            try:
                inst.run_after_run(p, new, record)
            except SharedTensorWriteError as e:  # a node the pass added writes in place
                raise PassError(p.name, f"the rewritten graph does not run: {e}",
                                last_good=snap.last_good) from e
            except FxpressError as e:
                e.last_good = snap.last_good
                raise
            except Exception as e:
                write = shared_write(e)  # wrapped on its way (shape propagation does)
                if write is not None:
                    raise PassError(p.name, f"the rewritten graph does not run: {write}",
                                    last_good=snap.last_good) from e
                what = ("the rewritten graph does not run on the calibration inputs"
                        if inst is check else f"instrument {type(inst).__name__} failed")
                raise PassError(p.name, f"{what}: {type(e).__name__}: {e}",
                                last_good=snap.last_good) from e
        record.bytes_after = stored_bytes(new)
        record.status, miss, record.message = check.verdict(p, record, policy, deferred_to)
        if record.status == "failed":
            record.params, record.zeros = weight_counts(new)
            key, limit, value = miss
            raise VerificationError(p.name, key, limit, value,
                                    f"pass '{p.name}' {record.message}" if key == "nonfinite" else None,
                                    last_good=snap.last_good, record=record)
        if record.status == "rolled back":
            snap.restore()
            record.bytes_after = record.bytes_before
            record.params, record.zeros = weight_counts(current)
            _notify(instruments, "run_after_pass", p, current, record)
            return record, current, None
        meta = dict(current.meta.get("fxpress", {}))
        new.meta["fxpress"] = {**meta, **new.meta.get("fxpress", {}),
                               "passes": list(meta.get("passes", [])) + [str(p)]}
        return record, new, snap.before

    @staticmethod
    def _execute(p: Pass, snap: _Snapshot, ctx: PassContext, record: PassRecord) -> torch.fx.GraphModule:
        """Run the pass on its snapshot and check what it handed back: a GraphModule that
        lints, with no promised-shared tensor written into."""
        start = time.perf_counter()
        try:
            result = p.apply(snap.work, ctx)
        except SharedTensorWriteError as e:
            raise PassError(p.name, f"{e}", last_good=snap.last_good) from e
        except FxpressError as e:
            e.last_good = snap.last_good
            raise
        except Exception as e:
            hint = ("; it wrote into a read-only view of a tensor shared with the caller's model: "
                    "replace tensors instead (WeightedOp.set_weight), or declare "
                    "PassTraits(replaces_tensors=False) to get private copies"
                    if "read-only" in str(e) else "")
            raise PassError(p.name, f"raised {type(e).__name__}: {e}{hint}",
                            last_good=snap.last_good) from e
        except KeyboardInterrupt as e:
            e.last_good = snap.last_good  # type: ignore[attr-defined]
            raise
        record.seconds = time.perf_counter() - start
        if not isinstance(result, PassResult) or not isinstance(result.module, torch.fx.GraphModule):
            got = type(result.module if isinstance(result, PassResult) else result).__name__
            raise PassError(p.name, f"returned {got}; a pass must return "
                            "PassResult(module=<GraphModule>, changed=..., stats={...})",
                            last_good=snap.last_good)
        touched = snap.touched()
        if touched:
            raise PassError(p.name, f"wrote into shared tensor(s) {touched[:5]} in place; a pass "
                            "whose traits say replaces_tensors=True must replace tensors "
                            "(WeightedOp.set_weight) instead of writing into them",
                            last_good=snap.last_good)
        new = result.module
        try:
            new.graph.lint()
            new.recompile()
        except Exception as e:
            raise PassError(p.name, f"left a graph that fails lint: {type(e).__name__}: {e}",
                            last_good=snap.last_good) from e
        record.changed = bool(result.changed)
        record.stats = dict(result.stats)
        if isinstance(record.stats.get("layers"), dict):  # a pass that rewrites weighted ops
            uncovered = uncovered_weights(new)
            if uncovered:  # what no pass could reach, named in every such pass's report
                record.stats.setdefault("float_weights", uncovered)
        return new

    @staticmethod
    def _commit(p: Pass, before: Any, new: torch.fx.GraphModule, record: PassRecord,
                instruments: list[Instrument]) -> None:
        """Keep a pass: release the graph before it (the instruments' commit hook), then
        stamp, count and measure the kept graph. None of that needs the old weights, so
        decoding or encoding the new ones costs no memory on top of them."""
        _notify(instruments, "run_after_commit", p, new, record)
        stamp_changes(before, new, str(p))
        record.params, record.zeros = weight_counts(new)
        record.disk_bytes = artifact_size(new)
        _notify(instruments, "run_after_pass", p, new, record)


def _notify(instruments: Iterable[Instrument], hook: str, *args: Any) -> None:
    for inst in instruments:
        getattr(inst, hook)(*args)


def _registry_arg(registry: Mapping[str, PassInfo] | None, kwargs: dict) -> Mapping[str, PassInfo]:
    """``registry=``, or the old face's ``registry_=`` (deprecated), or the default."""
    if "registry_" in kwargs:
        warnings.warn("Pipeline.parse/from_recipe(registry_=...) is deprecated; use registry=",
                      DeprecationWarning, stacklevel=3)
        old = kwargs.pop("registry_")
        registry = old if registry is None else registry
    return default_registry() if registry is None else registry


def _check_train_data(train_data: Any) -> None:
    if train_data is None:
        return
    if isinstance(train_data, torch.Tensor) or not hasattr(train_data, "__iter__") or \
            isinstance(train_data, (str, bytes, dict)):
        raise InputError(
            f"train_data must be an iterable of batches, (inputs..., label) tuples such as "
            f"[(x, y), ...] or a DataLoader; got {type(train_data).__name__}"
            + (" (a single tensor: wrap it, e.g. [(x, y)])" if isinstance(train_data, torch.Tensor)
               else ""))


def _calibration_list(calibration: Iterable[Any] | None, model: torch.nn.Module) -> list[tuple]:
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor) or not hasattr(calibration, "__iter__") or \
            isinstance(calibration, (str, bytes, dict)):
        raise InputError("calibration must be an iterable of input tuples, e.g. [(x1,), (x2,)], "
                         f"not {'a single tensor' if isinstance(calibration, torch.Tensor) else type(calibration).__name__}")
    out = []
    for i, b in enumerate(calibration):
        out.append(as_input_tuple(b, what=f"calibration batch {i}", model=model))
    return out


def _first_inputs(train_data: Any) -> tuple | None:
    """The inputs of the first training batch (without its label), as example inputs."""
    if train_data is None or isinstance(train_data, torch.Tensor):
        return None
    batch = next(iter(train_data), None)
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if not isinstance(batch, (tuple, list)) or not batch:
        return None
    y, x = batch[-1], batch[0]
    labelled = (len(batch) >= 2 and isinstance(y, torch.Tensor) and not y.is_floating_point()
                and y.dim() == 1 and isinstance(x, torch.Tensor) and x.dim() >= 1
                and len(x) == len(y))
    return tuple(batch[:-1]) if labelled else tuple(batch)


def _labelled(train_data: Any, n_inputs: int, limit: int = 32) -> list[tuple] | None:
    """Up to ``limit`` (inputs, label) pairs from ``train_data`` for task-accuracy checks."""
    out = []
    for batch in train_data:
        if len(out) >= limit:
            break
        if isinstance(batch, (tuple, list)) and len(batch) == n_inputs + 1:
            out.append((tuple(batch[:-1]), batch[-1]))
    return out or None


__all__ = ["Pipeline", "PipelineResult", "PassRecord", "Instrument", "PassTimer", "GraphDumper",
           "resolve_pass", "format_records", "weight_counts", "release_memory", "POLICIES",
           "PassSpec"]
