"""budget: choose the compression targets that make the saved file fit a byte budget.

``budget{ratio=40}`` in front of a Deep Compression chain (``prune{sparsity=...}``, a
recovery, ``share``, ``small``) makes the chain meet ``fp32 bytes / ratio`` for the model it
is given, instead of one sparsity for every model: the fp32 bytes are those of the model's
float tensors, the artifact's those of ``fxpress.save(..., entropy=True)``. Before the
pipeline runs (:func:`resolve`), it walks a ladder of settings, least damaging first,

* the chain's own sparsity (``0.95`` in the ``deep-compression`` recipe), then more
  sparsity in the big matrices (global pruning takes its extra survivors from them),
* biases on a 6-, then a 4-bit grid (``share{bias_bits}``), the small float tensors (norms,
  position embeddings) on a 6-bit grid (``small{bits}``), then 3-bit codebook indices
  (``share{bits}``), each with more sparsity (:data:`LADDER`),

and takes the first setting whose file fits the budget less a margin. The size of a setting
is not guessed: the chain's lossy passes run once, one-shot (no recovery), on a structural
copy of the graph, and the file is sized by the writer itself (entropy coding included;
codebooks at the float16 precision a recovery after them leaves).
Recovery moves centroids and biases afterwards but keeps every pruned weight pruned, so the
file it ends with is within the margin of that estimate. It binary-searches the ladder
(about five trial compressions; each is a prune, a k-means per layer and a sizing: seconds
on the small models this recipe is for).

Size is not the only judge: with labelled ``train_data`` and a recovery step in the chain,
the setting that fits and the chain as written each get a short recovery (``check`` epochs of
the chain's first recovery step, one-shot on a copy, a tenth of the batches held out), and a
setting whose best held-out accuracy falls more than ``max_drop`` below the chain as
written's is backed off a step down the ladder, to the chain as written at worst: accuracy
is kept over size, with a ``PlanMissedWarning``. On the 64x2 digits transformer (seed 2) the
3-epoch checks scored the chain as written 0.914, sparsity 0.96 0.867, 0.96 with 6-bit biases
and norms 0.844, 0.96 with 3-bit codes and 4-bit biases 0.891 (128 held-out images): every
fitting setting was backed off. The check is one-shot and short, so it flags settings whose
recovery starts far behind, not one image's difference.

The choice is the pass's record: ``stats["chosen"]`` (the options set), ``"bytes"``
(estimated) against ``"budget"``, ``"tried"`` (every setting sized, with its
``check_accuracy`` where checked), ``"met"`` and ``"check"`` (the chain as written's
accuracy, ``backed_off``). When no setting fits (a tiny model whose header alone is over), the chain runs as written, since
more damage would buy no file that fits, and the record and a ``PlanMissedWarning`` say
so. The passes it sets show their chosen options in their own
records. Nothing is reordered; the passes keep every option the budget does not set.

Example::

    res = fxpress.compress(model, "fold_bn,budget{ratio=40},prune{sparsity=0.95,scope=global,"
                           "steps=3},distill,share{bits=4,bias_bits=8},small,distill",
                           calibration=calib, train_data=train)
    res.records[1].stats["chosen"]      # e.g. {'sparsity': 0.96, 'bias_bits': 4, 'share_bits': 3, 'bits': 6}
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from fxpress.errors import OptionError, PlanMissedWarning
from fxpress.passes.base import Pass, PassContext, PassResult, PassTraits, option

#: (sparsity, share bias_bits, small bits, share bits), least damaging first; ``None``
#: keeps the chain's own value. Sizes fall along it. On the 64x2 digits transformer
#: sparsity 0.97 with 4-bit codes lost 10 points on seed 2 (0.45 on seed 1), 0.96 with
#: 3-bit codes, 4-bit biases and 6-bit small tensors 0.22 on seed 2 (1.56 on seed 1):
#: codes go to 3 bits before the sparsity passes 0.96.
LADDER: tuple[tuple[float | None, int | None, int | None, int | None], ...] = (
    (None, None, None, None),
    (0.96, None, None, None),
    (0.96, 6, 6, None),
    (0.96, 4, 6, 3),
    (0.97, 4, 6, 3),
    (0.98, 4, 6, 3),
    (0.99, 4, 6, 3),
    (0.99, 4, 4, 3),
)


class Budget(Pass):
    """Choose the following prune's sparsity, share's bits and bias bits and small's bits so that
    the entropy-coded file fits ``fp32 bytes / ratio`` (see :mod:`fxpress.passes.budget`)."""

    name = "budget"
    summary = ("Choose the sparsity, bias bits and small-tensor bits of the passes after it "
               "so the entropy-coded file is at most fp32 bytes / ratio (sized by trial).")
    traits = PassTraits(tolerance=None, replaces_tensors=True)

    ratio = option(40.0, "the file's target: at most the fp32 bytes of the model's float "
                   "tensors divided by this", type=(int, float), low=1.0)
    margin = option(0.03, "fraction of the budget left free for what recovery changes after "
                    "the one-shot sizing (retrained biases and centroids)", type=(int, float),
                    low=0.0, high=0.5)

    check = option(3, "epochs of the short recovery each setting more damaging than the chain "
                   "as written gets, one-shot on a copy, before it is chosen (0: size only; "
                   "needs train_data with labels and a recovery step in the chain)", type=int,
                   low=0, high=100)
    max_drop = option(0.02, "a setting whose short recovery's held-out accuracy is more than "
                      "this (a fraction) below the chain as written's is backed off: the next "
                      "less damaging one is checked, down to the chain as written", type=(int, float),
                      low=0.0, high=1.0)

    #: set by :func:`resolve` before the pipeline runs (what this run's record reports)
    choice: dict | None = None

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.choice is None:
            raise OptionError(self.name, "ratio", "runs inside a pipeline, which resolves it "
                              "before the first pass (Pipeline.run / fxpress.compress)")
        return PassResult(gm, changed=False, stats=dict(self.choice))


def fp32_bytes(gm: torch.nn.Module) -> int:
    """Bytes of the model's floating-point tensors at 4 bytes each (tied ones once)."""
    seen, total = set(), 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            total += 4 * t.numel()
    return total


def _with(p: Pass, **options: Any) -> Pass:
    given = {**p._given, **{k: v for k, v in options.items() if v is not None}}
    return type(p)(**given, tol=dict(p._tol_given))


def _setting(passes: list[Pass], i: int, step) -> tuple[list[Pass], dict]:
    """The passes after budget ``i`` with ladder ``step`` applied to the first prune,
    share and small after it; and the options it set."""
    sparsity, bias_bits, small_bits, share_bits = step
    out, chosen, seen = list(passes), {}, set()
    for j in range(i + 1, len(passes)):
        p = passes[j]
        if p.name in seen or p.name not in ("prune", "share", "small") \
                or (p.name == "prune" and p.sparsity is None):
            continue
        seen.add(p.name)
        if p.name == "prune" and p.sparsity is not None:
            s = p.sparsity if sparsity is None else max(sparsity, p.sparsity)
            out[j], chosen["sparsity"] = _with(p, sparsity=s), s
        elif p.name == "share" and (bias_bits, share_bits) != (None, None):
            set_ = {}
            if bias_bits is not None:
                set_["bias_bits"] = min(bias_bits, p.bias_bits) if p.bias_bits else bias_bits
            if share_bits is not None:
                set_["bits"] = min(share_bits, p.bits)
            out[j] = _with(p, **set_)
            chosen.update({("share_bits" if k == "bits" else k): v for k, v in set_.items()})
        elif p.name == "small" and small_bits is not None:
            b = min(small_bits, p.bits)
            out[j], chosen["bits"] = _with(p, bits=b), b
    return out, chosen


def _one_shot(gm: torch.fx.GraphModule, passes: list[Pass], ctx: PassContext
              ) -> tuple[torch.fx.GraphModule, bool]:
    """A structural copy of ``gm`` after ``passes``' lossy passes, one-shot (no recovery,
    a staged prune in one step); and whether a recovery step follows the last of them."""
    from fxpress.graph.capture import clone_structure

    g = clone_structure(gm)
    recovered = False  # a recovery step after the last lossy pass ends trained centroids
    for p in passes:
        if p.traits.recovers:
            recovered = True
        if p.traits.recovers or p.name == Budget.name:
            continue
        recovered = False
        if p.name == "prune" and p.steps > 1:
            p = _with(p, steps=1)
        g = p.run(g, ctx).module
    return g, recovered


def _size(gm: torch.fx.GraphModule, passes: list[Pass], ctx: PassContext) -> int:
    """The entropy-coded file of ``gm`` after ``passes``' lossy passes, one-shot."""
    from fxpress.graph.artifact import artifact_size

    from fxpress.passes.gradual import expand

    g, recovered = _one_shot(gm, passes, ctx)
    if recovered:  # ... at float16 precision (CodebookModule.end_training), 2 bytes each
        for m in g.modules():
            cb = m._buffers.get("codebook") if hasattr(m, "begin_training") else None
            if cb is not None and cb.dtype == torch.float32 and bool(cb.abs().max() < 65504):
                m._buffers["codebook"] = cb.to(torch.float16).to(torch.float32)
    # the file also lists every pass the pipeline will have run (its stages included)
    meta = dict(gm.meta.get("fxpress", {}))
    meta["passes"] = list(meta.get("passes", [])) + [str(p) for p in expand(passes, ctx.train_data)]
    g.meta["fxpress"] = meta
    return artifact_size(g, entropy=True)


def _score(gm: torch.fx.GraphModule, passes: list[Pass], epochs: int, ctx: PassContext
           ) -> float | None:
    """The short-recovery check of a setting: ``passes``' lossy passes one-shot on a copy,
    then ``epochs`` epochs of the chain's first recovery step holding out a tenth of the
    training batches; its best held-out accuracy (None without labels or a recovery)."""
    recovery = next((p for p in passes if p.traits.recovers), None)
    if recovery is None or "epochs" not in recovery.options_spec():
        return None
    from fxpress.graph.capture import clone_structure

    g = clone_structure(_one_shot(gm, passes, ctx)[0], copy_tensors=True)  # trained: its own
    short = _with(recovery, epochs=epochs, holdout=0.1, patience=epochs + 1)
    stats = short.run(g, ctx).stats
    accs = [e["val_accuracy"] for e in stats.get("epochs", ()) if e.get("val_accuracy") is not None]
    return max(accs) if accs else None


def resolve(passes: list[Pass], gm: torch.fx.GraphModule, ctx: PassContext) -> list[Pass]:
    """``passes`` with every budget's choice applied to the passes after it (each budget
    pass keeps its choice for its record). Called by the pipeline before it runs."""
    passes = list(passes)
    for i, b in enumerate(passes):
        if not isinstance(b, Budget):
            continue
        if not any(p.name == "prune" and getattr(p, "sparsity", None) is not None
                   for p in passes[i + 1:]):
            raise OptionError(b.name, "ratio", "chooses the sparsity of a prune{sparsity=...} "
                              "after it; add one (e.g. 'budget{ratio=40},prune{sparsity=0.95},"
                              "distill,share{bits=4},distill')")
        fp32 = fp32_bytes(gm)
        budget = int(fp32 / b.ratio)
        goal = int(budget * (1 - b.margin))
        tried: dict[int, int] = {}

        def size(k: int) -> int:
            if k not in tried:
                tried[k] = _size(gm, _setting(passes, i, LADDER[k])[0], ctx)
            return tried[k]

        if size(0) <= goal:
            k = 0
        else:  # the first step that fits: sizes fall along the ladder
            lo, hi = 0, len(LADDER) - 1
            if size(hi) > goal:
                k = 0  # out of reach: more damage would buy no file that fits
            else:
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if size(mid) <= goal else (mid, hi)
                k = hi
        # accuracy guard: the fitting step's short recovery against the chain as written's;
        # one that loses more than max_drop is backed off toward the chain as written
        scores: dict[int, float | None] = {}
        fits = k
        if k > 0 and b.check > 0 and ctx.train_data is not None and ctx.reference is not None:
            def score(j: int) -> float | None:
                if j not in scores:
                    scores[j] = _score(gm, _setting(passes, i, LADDER[j])[0], b.check, ctx)
                return scores[j]

            base = score(0)
            while k > 0 and base is not None and (score(k) is None or score(k) < base - b.max_drop):
                k -= 1
        size(k)  # a backed-off step may not have been sized yet
        settings = {j: _setting(passes, i, LADDER[j])[1] for j in sorted(tried)}
        passes, chosen = _setting(passes, i, LADDER[k])
        met = tried[k] <= goal
        b.choice = {"ratio": b.ratio, "fp32_bytes": fp32, "budget": budget, "goal": goal,
                    "bytes": tried[k], "met": met, "chosen": chosen,
                    "tried": [{"setting": settings[j], "bytes": n,
                               **({"check_accuracy": scores[j]} if j in scores else {})}
                              for j, n in sorted(tried.items())]}
        if scores:
            b.choice["check"] = {"epochs": b.check, "max_drop": b.max_drop,
                                 "as_written": scores.get(0), "backed_off": k < fits}
        if k < fits:
            warnings.warn(PlanMissedWarning(
                f"budget{{ratio={b.ratio}}}: the setting that fits {goal} bytes "
                f"({settings[fits]}) lost {scores[0] - (scores[fits] or 0):.3f} of held-out "
                f"accuracy in a {b.check}-epoch recovery against the chain as written (more than "
                f"max_drop={b.max_drop}); backed off to {chosen or 'the chain as written'} "
                f"({tried[k]} bytes): accuracy kept over size", {"bytes": tried[k] - goal}),
                stacklevel=2)
        elif not met:
            smallest = min(tried.values())
            warnings.warn(PlanMissedWarning(
                f"budget{{ratio={b.ratio}}}: no setting fits {goal} bytes ({budget} less a "
                f"{b.margin:.0%} margin): the most compressed sizes {smallest} bytes (its "
                f"header and small tensors alone are over); the chain runs as written "
                f"({tried[k]} bytes)", {"bytes": tried[k] - goal}), stacklevel=2)
    return passes


__all__ = ["Budget", "LADDER", "resolve", "fp32_bytes"]
