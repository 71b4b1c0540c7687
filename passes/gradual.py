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

from fxpress.errors import OptionError


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta's sparsities after each of ``steps`` equal stages:
    ``s_t = s_f + (s_i - s_f)·(1 - t/n)³``, t = 1..n; the last is ``final``.

    >>> [round(s, 3) for s in cubic_schedule(0.95, 3)]
    [0.669, 0.915, 0.95]
    """
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


def expand(passes: list) -> list:
    """The passes with every staged pass replaced by its stages and recovery steps."""
    out: list = []
    for i, p in enumerate(passes):
        stages = p.stages() if hasattr(p, "stages") else [p]
        if len(stages) == 1:
            out.append(stages[0])
            continue
        recovery = next((q for q in passes[i + 1:] if q.traits.recovers), None)
        if recovery is None:
            raise OptionError(p.name, "steps", "compresses in stages with a recovery step after "
                              "each; add one after it (e.g. ',distill') or drop steps")
        for k, stage in enumerate(stages):
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
    for k, i in enumerate(recovering):
        if i < len(records):
            start = recovering[k - 1] + 1 if k else 0
            likely_short(records[i], [passes[j] for j in range(start, i) if lossy(j)])
            held_out_nothing(records[i])


#: A recovery step whose kept epoch scores this many points below the original model on
#: its own held-out batches is reported as likely to miss (:func:`likely_short`).
MISS_POINTS = 2.0


def likely_short(record, lossy: list) -> None:
    """Note on a recovery step's record when its kept epoch is :data:`MISS_POINTS` or more
    below the original on the held-out batches, and what would likely do better."""
    st = getattr(record, "stats", {}) or {}
    teacher, epochs, best = st.get("teacher_val_accuracy"), st.get("epochs") or [], st.get("best_epoch")
    if teacher is None or not best or best > len(epochs):
        return
    got = epochs[best - 1].get("val_accuracy")
    if got is None or 100 * (teacher - got) < MISS_POINTS:
        return
    what = [p for p in lossy if p.name == "prune" and getattr(p, "sparsity", None)
            and getattr(p, "steps", 1) == 1]
    options = [f"'{_spec(what[0], steps=3)}' (the sparsity in 3 stages, a recovery after "
               "each)", "the 'deep-compression' recipe", "a lower sparsity"] if what else \
        ["a milder setting of " + (", ".join(sorted({p.name for p in lossy})) or "the passes before it")]
    _note(record, f"likely short of the original: its kept epoch ({best}) scored {got:.3f} on "
          f"{st.get('holdout_batches', 0)} held-out batches against the original's {teacher:.3f} "
          f"({100 * (teacher - got):.1f} points); " + " or ".join(options) + " would likely do better "
          "(nothing was changed)")


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
           "short_of_sparsity"]
