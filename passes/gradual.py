"""Gradual compression: prune a little, recover, prune more (Zhu & Gupta 2017).

A pass that can be applied in stages says so with ``stages() -> list[Pass]`` (``prune``
with ``steps=N``: N prunes to the sparsities of Zhu & Gupta's cubic schedule). The
pipeline runs :func:`expand` on its list before running: each stage but the last is
followed by a copy of the next recovery step (a pass that ``recovers``, e.g. ``distill``),
so ``prune{sparsity=0.95,steps=3},distill`` runs as::

    prune{sparsity=0.669},distill,prune{sparsity=0.915},distill,prune{sparsity=0.95},distill

Nothing is reordered: the stages take the place of the pass, in order, and each stage's
record shows its own options (its sparsity).
"""
from __future__ import annotations

import warnings

from fxpress.errors import OptionError, PlanMissedWarning


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta's sparsities after each of ``steps`` equal stages:
    ``s_t = s_f + (s_i - s_f)·(1 - t/n)³``, t = 1..n; the last is ``final``.

    >>> [round(s, 3) for s in cubic_schedule(0.95, 3)]
    [0.669, 0.915, 0.95]
    """
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


#: ``prune{sparsity=s}`` with ``s`` at least this and no ``steps`` given runs in
#: :data:`AUTO_STEPS` stages when a recovery step that trains follows it (measured:
#: python -m bench.case_recovery, README "Gradual compression"); ``steps=1`` cuts once.
#: A ``prune`` with neither sparsity nor threshold (the sparsity it chooses itself) is
#: staged the same way whatever it chooses (README "Distillation", round 21).
AUTO_STAGE_FROM = 0.9
AUTO_STEPS = 3


def automatic(p) -> bool:
    """Whether ``p`` is a ``prune`` that chooses its own sparsity (neither given)."""
    return p.name == "prune" and getattr(p, "sparsity", None) is None \
        and getattr(p, "threshold", None) is None


def auto_steps(p, later: list, train_data) -> int:
    """How many stages ``p`` runs in when its options leave that to the pipeline: the
    ``steps`` it was given, else :data:`AUTO_STEPS` for a ``prune`` to a sparsity of
    :data:`AUTO_STAGE_FROM` or more, or one that chooses its own sparsity (the choice is
    a one-shot check on the training examples the model fits best, which understates what
    unseen examples lose), whose next recovery step (among ``later``) trains and
    sets its own budget (no ``epochs`` given: it stops early, so a copy after each stage
    trains as long as that stage needs; a fixed ``epochs`` is a budget the caller chose,
    which staging would multiply), else 1. A cut that large recovers better a little at
    a time. A prune with per-layer rules (``layers=``) is not staged by default."""
    if p.name != "prune" or "steps" in getattr(p, "_given", {}) or getattr(p, "layer_rules", None):
        return getattr(p, "steps", 1)
    if not automatic(p) and (p.sparsity is None or p.sparsity < AUTO_STAGE_FROM):
        return 1
    recovery = next((q for q in later if trains(q, train_data)), None)
    if recovery is None or "epochs" in getattr(recovery, "_given", {}):
        return 1
    return AUTO_STEPS


def expand(passes: list, train_data=None) -> list:
    """The passes with every staged pass replaced by its stages and recovery steps.

    With ``train_data`` (None: a run without it), a high sparsity with a recovery step
    after it is staged by default (:func:`auto_steps`); each stage is marked with
    ``stage_of = (k, n, the pass as written)`` so that the records say so."""
    out: list = []
    for i, p in enumerate(passes):
        auto = p.name == "prune" and "steps" not in getattr(p, "_given", {}) \
            and auto_steps(p, passes[i + 1:], train_data) > 1
        stages = p.stages(AUTO_STEPS) if auto else (p.stages() if hasattr(p, "stages") else [p])
        if len(stages) == 1:
            out.append(stages[0])
            continue
        recovery = next((q for q in passes[i + 1:]
                         if (trains(q, train_data) if auto else q.traits.recovers)), None)
        if recovery is None:
            raise OptionError(p.name, "steps", "compresses in stages with a recovery step after "
                              "each; add one after it (e.g. ',distill') or drop steps")
        for k, stage in enumerate(stages):
            stage.stage_of = (k + 1, len(stages), p)
            out.append(stage)
            if k + 1 < len(stages):
                out.append(type(recovery)(**recovery._given, tol=dict(recovery._tol_given)))
    return out


def trains(p, train_data) -> bool:
    """Whether ``p`` is a recovery step in a run with (or without) ``train_data``.

    A pass whose traits say it recovers is one, unless the run has no training data and
    the pass says it then does nothing to recover (``recovers_without_train_data = False``:
    ``distill`` without ``epochs`` trains when there is data and only inserts taps when
    there is none, so lossy passes before it are then judged on their own).
    """
    if not p.traits.recovers:
        return False
    if train_data is None and "train_data" not in p.traits.needs:
        return bool(getattr(p, "recovers_without_train_data", True))
    return True


def advise(passes: list, records: list, train_data=None) -> None:
    """Say in the records where a recovery step would do better; reorder nothing.

    A pass that changed the outputs after the last recovery step keeps its whole loss
    (nothing trains through it afterwards); a recovery step with no lossy pass before it
    has nothing to win back.
    """
    recovering = [i for i, p in enumerate(passes) if trains(p, train_data)]
    if not recovering:
        return

    def lossy(i: int) -> bool:
        inc = getattr(records[i], "incremental", None)
        rel = getattr(inc, "rel_l2", None)
        return (not passes[i].traits.recovers and records[i].status != "rolled back"
                and rel is not None and rel > 1e-5)

    last = recovering[-1]
    for i in range(last + 1, min(len(passes), len(records))):
        if lossy(i):
            _note(records[i], f"changed the outputs after the last recovery step (#{last + 1} "
                  f"{passes[last].name}), so nothing wins that back; '...,{passes[i].name},"
                  f"{passes[last].name}' trains through it (or move it before #{last + 1})")
    first = recovering[0]
    if first < len(records) and not any(lossy(i) for i in range(first)) \
            and "epochs" in getattr(records[first], "stats", {}):
        _note(records[first], "trained with no lossy pass before it: nothing to recover; "
              "put it after the pass it should recover from")
    for i in range(min(len(passes), len(records))):
        short_of_sparsity(passes[i], records[i])
        staged_by_default(passes[i], records[i])
    for k, i in enumerate(recovering):
        if i < len(records):
            start = recovering[k - 1] + 1 if k else 0
            likely_short(records[i], [passes[j] for j in range(start, i) if lossy(j)])
            held_out_nothing(records[i])
    if last < len(records):
        missed_promise(records[last], last + 1)


#: A recovery step whose kept epoch scores this many points below the original model on
#: its own held-out batches is reported as likely to miss (:func:`likely_short`).
MISS_POINTS = 2.0


def held_out_gap(record) -> tuple[float, float, int] | None:
    """(the original's accuracy, the kept epoch's, the kept epoch) on a recovery step's
    held-out batches, from its record; None when it held nothing out or had no labels."""
    st = getattr(record, "stats", {}) or {}
    teacher, epochs, best = st.get("teacher_val_accuracy"), st.get("epochs") or [], st.get("best_epoch")
    if teacher is None or not best or best > len(epochs):
        return None
    got = epochs[best - 1].get("val_accuracy")
    return None if got is None else (teacher, got, best)


def likely_short(record, lossy: list) -> None:
    """Note on a recovery step's record when its kept epoch is :data:`MISS_POINTS` or more
    below the original on the held-out batches, and what would likely do better."""
    gap = held_out_gap(record)
    if gap is None or 100 * (gap[0] - gap[1]) < MISS_POINTS:
        return
    teacher, got, best = gap
    st = record.stats
    what = [p for p in lossy if p.name == "prune" and getattr(p, "sparsity", None)
            and getattr(p, "steps", 1) == 1 and not getattr(p, "stage_of", None)]
    staged = [p for p in lossy if p.name == "prune" and getattr(p, "stage_of", None)]
    if what:
        options = [f"'{_spec(what[0], steps=3)}' (the sparsity in 3 stages, a recovery after "
                   "each)", "the 'deep-compression' recipe", "a lower sparsity"]
    elif staged:  # already in stages: what is left is the recipe or a smaller cut
        target = _target(staged[0])
        options = ["the 'deep-compression' recipe",
                   f"a sparsity below {target:g}" if target is not None else "a lower sparsity"]
    else:
        options = ["a milder setting of " + (", ".join(sorted({p.name for p in lossy}))
                                              or "the passes before it")]
    _note(record, f"likely short of the original: its kept epoch ({best}) scored {got:.3f} on "
          f"{st.get('holdout_batches', 0)} held-out batches against the original's {teacher:.3f} "
          f"({100 * (teacher - got):.1f} points); " + " or ".join(options) + " would likely do better "
          "(nothing was changed)")


#: The most points the pipeline's last recovery step may end below the original on its
#: held-out batches without a :class:`PlanMissedWarning` (:func:`missed_promise`): the
#: ``deep-compression`` recipe's promise (issue 18: within 1 point), kept for every
#: pipeline that recovers, so that no run loses more than the point silently.
PROMISE_POINTS = 1.0


def missed_promise(record, position: int) -> None:
    """Warn (``PlanMissedWarning``) and note on the last recovery step's record when its
    kept epoch is more than :data:`PROMISE_POINTS` below the original on its held-out
    batches: the model returned is likely that far below it on the caller's own data."""
    gap = held_out_gap(record)
    if gap is None or getattr(record, "status", None) == "rolled back" \
            or round(100 * (gap[0] - gap[1]), 6) <= PROMISE_POINTS:
        return
    teacher, got, best = gap
    points = 100 * (teacher - got)
    text = (f"more than {PROMISE_POINTS:g} point below the original: the last recovery step "
            f"(#{position} {record.name}) kept epoch {best}, which scored {got:.3f} on "
            f"{record.stats.get('holdout_batches', 0)} held-out batches against the original's "
            f"{teacher:.3f} ({points:.1f} points); a lower sparsity or more bits (share{{bits}}, "
            "bias_bits, small{bits}) would keep more (nothing was changed)")
    _note(record, text)
    warnings.warn(PlanMissedWarning("compress: " + text, {"accuracy_points": round(points, 2)}),
                  stacklevel=2)


def held_out_nothing(record) -> None:
    """Note on a recovery step's record when its batches were too few to hold any out: it
    trained a fixed budget of steps with no early stopping (passes/distill.AUTO_MIN_STEPS)."""
    few = (getattr(record, "stats", {}) or {}).get("held_out_nothing")
    if not few:
        return
    _note(record, f"held out nothing: {few['batches']} training batch(es) are too few to hold "
          f"one out (4 or more are needed), so it trained {few['epochs']} epochs (at least 300 "
          "steps) with no early stopping and kept the better of the start and the end on the "
          "training batches; more, smaller batches give it held-out early stopping")


def staged_by_default(p, record) -> None:
    """Note on the first stage's record of a prune the pipeline staged by itself
    (:func:`auto_steps`): what ran instead of the one cut written, and how to ask for it."""
    k, n, whole = getattr(p, "stage_of", None) or (0, 0, None)
    if k != 1 or whole is None or "steps" in whole._given:
        return
    if automatic(whole):
        auto = (getattr(record, "stats", {}) or {}).get("auto_stage") or {}
        schedule = ", ".join(f"{s:g}" for s in auto.get("schedule", []))
        _note(record, f"staged by default: {_spec(whole)} chose sparsity "
              f"{auto.get('chosen', 0):g} and ran as {n} prunes to the sparsities of Zhu & "
              f"Gupta's cubic schedule ({schedule}), each but the last followed by a copy of "
              "the recovery step after it (its choice is a one-shot check on training "
              "examples, which understates what unseen ones lose); "
              f"{_spec(whole, steps=1)} cuts once")
        return
    _note(record, f"staged by default: {_spec(whole)} ran as {n} prunes to the sparsities of "
          f"Zhu & Gupta's cubic schedule ({', '.join(f'{s:g}' for s in _stage_sparsities(whole, n))}"
          f"), each but the last followed by a copy of the recovery step after it (a sparsity "
          f"of {AUTO_STAGE_FROM:g} or more recovers better a little at a time); "
          f"{_spec(whole, steps=1)} cuts once")


def _stage_sparsities(p, n: int) -> list[float]:
    return [round(s, 4) for s in cubic_schedule(p.sparsity, n)]


def _target(p) -> float | None:
    """The sparsity a prune stage cuts towards: its own, or its staged automatic choice."""
    if getattr(p, "sparsity", None) is not None:
        return p.sparsity
    stage = getattr(p, "auto_stage", None)
    return stage[2].get("sparsity") if stage else None


def short_of_sparsity(p, record) -> None:
    """Note on a prune's record when the floor of weights per output unit kept it from
    the sparsity asked: the model is too narrow to lose that much evenly."""
    asked, got = getattr(p, "sparsity", None), (getattr(record, "stats", {}) or {}).get("sparsity")
    if p.name != "prune" or asked is None or got is None or got >= asked - 0.005:
        return
    _note(record, f"reached sparsity {got:.3f} of the {asked:g} asked: its layers keep at least "
          f"min_per_unit={p.min_per_unit} weights per output unit, and this model is too narrow "
          f"to lose {asked:g} of its weights above that floor; recovery from here is likely "
          "short (a lower sparsity keeps more per unit; min_per_unit=0 reaches the sparsity by "
          "emptying units)")


def _spec(p, **change) -> str:
    from fxpress.passes.recipes import format_pass

    return format_pass(p.name, list({**dict(p.spec_items()), **change}.items()))


def _note(record, text: str) -> None:
    record.message = f"{record.message}; {text}" if record.message else text


__all__ = ["cubic_schedule", "expand", "trains", "advise", "likely_short", "held_out_nothing",
           "short_of_sparsity", "staged_by_default", "auto_steps", "automatic", "AUTO_STAGE_FROM",
           "AUTO_STEPS",
           "held_out_gap", "missed_promise", "PROMISE_POINTS"]
