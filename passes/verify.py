"""The verifier: compares a graph's outputs with the original model's after every pass.

Reference outputs are computed once, from the original model in eval mode, on the
calibration batches (or the example inputs), and kept. After each pass the pipeline runs
the new graph once on the same batches and measures, against the reference (cumulative)
and against the graph before the pass (incremental):

* ``max_abs``   largest absolute difference
* ``rel_l2``    ||new - ref|| / ||ref|| over all outputs
* ``cosine``    mean cosine similarity of each sample's flattened output (``cosine_min``: worst)
* ``top1``      argmax agreement, for ``[batch, classes]`` logits (a class the reference
                ties with its argmax agrees too: :data:`TOP1_TIE`)
* ``nonfinite`` NaN/Inf values that the reference does not have
* ``accuracy``, ``accuracy_ratio`` when the verifier has labelled batches: task accuracy
  (argmax against the label) and its ratio to the other graph's (for recovery steps)

A :class:`~fxpress.passes.base.Tolerance` turns these into a verdict.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from collections.abc import Mapping
from typing import Any, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

from fxpress.errors import InputError
from fxpress.graph.capture import annotate_shapes, dtype_hint, eval_mode, forward_parameters
from fxpress.graph.guard import forward_write_error
from fxpress.graph.outputs import plain_outputs
from fxpress.passes.base import Tolerance

Outputs = list[list[torch.Tensor]]  # per batch, the float tensor leaves of the output


@dataclass
class Metrics:
    """Output error of a graph against a reference (see the module docstring)."""

    max_abs: float
    rel_l2: float
    cosine: float
    cosine_min: float
    top1: float | None
    nonfinite: int
    accuracy: float | None = None
    accuracy_ratio: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def value_for(self, limit_key: str) -> float | None:
        """The metric a tolerance key limits (``min_cosine`` -> ``cosine``)."""
        return {"max_rel_l2": self.rel_l2, "min_cosine": self.cosine, "min_top1": self.top1,
                "max_abs": self.max_abs, "min_accuracy_ratio": self.accuracy_ratio}.get(limit_key)


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t.detach() for t in pytree.tree_leaves(plain_outputs(out))
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _leaf_names(out: Any) -> list[str] | None:
    """A name for each of :func:`_leaves`' tensors (``logits``, ``hidden_states.0``), or None.

    Names come from mappings (a dict, transformers' ``ModelOutput``) and sequence positions;
    None when the output holds no mapping or another container whose order is not known.
    """
    names: list[str] = []
    named = False

    def walk(x: Any, path: str) -> bool:
        nonlocal named
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                names.append(path)
            return True
        if isinstance(x, Mapping):
            named = True
            return all(walk(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()
                       if v is not None)
        if isinstance(x, (tuple, list)):
            return all(walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(x))
        return not pytree.tree_leaves(x) or x is None
    out = plain_outputs(out)
    ok = walk(out, "")
    return names if ok and named and len(names) == len(_leaves(out)) else None


def looks_like_logits(ref: Outputs, names: list[str] | None = None) -> bool | frozenset[int]:
    """Whether argmax agreement means something for the outputs.

    Named outputs (a dict, transformers' ``ModelOutput``): the positions of those whose
    name says logits (a ``last_hidden_state``'s argmax is no class). Unnamed: True when the
    ``[batch, classes]`` outputs are scores, not embeddings (rows of unit length are
    sentence embeddings).
    """
    if names is not None:
        return frozenset(i for i, n in enumerate(names) if "logit" in n.lower())
    twod = [r for rb in ref for r in rb if r.dim() == 2 and r.shape[1] >= 2]
    if not twod:
        return False
    unit = all(torch.allclose(r.float().norm(dim=1), torch.ones(r.shape[0], dtype=torch.float32), atol=1e-3) for r in twod)
    return not unit


def padding_mask_position(model: torch.nn.Module, batches: Sequence[tuple]) -> int | None:
    """Where ``model.forward`` takes an ``attention_mask`` that marks padding in ``batches``.

    A 2-D 0/1 integer or bool tensor at that position in every batch; None otherwise.
    """
    names = [prm.name for prm in forward_parameters(model)]
    if "attention_mask" not in names:
        return None
    at = names.index("attention_mask")
    for b in batches:
        m = b[at] if at < len(b) else None
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.is_floating_point() or \
                m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            return None
    return at


def _without_padding(leaves: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
    """``[batch, tokens, ...]`` outputs with the padded tokens' values zeroed."""
    if bool(mask.all()):
        return leaves
    out = []
    for t in leaves:
        if t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
            keep = mask.bool().reshape(*mask.shape, *([1] * (t.dim() - 2)))
            t = torch.where(keep, t, torch.zeros((), dtype=t.dtype))
        out.append(t)
    return out


#: Elements compared per step: float64 temporaries of whole outputs (a language model's
#: logits) would weigh hundreds of megabytes.
_STEP = 1 << 18


#: A sample's reference logits within this fraction of their row's standard deviation of
#: the largest are tied: an argmax on any of them agrees (a random-weight classifier's
#: near-tied logits flipped under 8-bit quantization at margins of 0.5-2.5 % of it).
TOP1_TIE = 0.03


def top1_agreement(new: torch.Tensor, ref: torch.Tensor) -> int:
    """Rows of ``[batch, classes]`` logits whose argmax in ``new`` is the reference's, or a
    class the reference ties with it (within :data:`TOP1_TIE` of the row's standard
    deviation): which of two near-equal scores wins is no decision of the model's."""
    r = ref.double()
    picked = r.gather(1, new.argmax(1, keepdim=True)).squeeze(1)
    tie = TOP1_TIE * r.std(1, unbiased=False)
    return int(((new.argmax(1) == ref.argmax(1)) | (picked >= r.max(1).values - tie)).sum())


def compare(new: Outputs, ref: Outputs, top1: bool | frozenset[int] = True) -> Metrics:
    """Metrics of outputs ``new`` against ``ref`` (same structure); ``top1`` for logits
    (all ``[batch, classes]`` outputs, or those at the given positions of each batch's).

    Sums run in float64, a block of each output at a time.
    """
    max_abs, err2, ref2 = 0.0, 0.0, 0.0
    cos_sum, cos_n, cos_min = 0.0, 0, 1.0
    agree, total, nonfinite = 0, 0, 0
    for nb, rb in zip(new, ref):
        if len(nb) != len(rb):
            raise ValueError(f"output structure changed: {len(rb)} tensors became {len(nb)}")
        for j, (n, r) in enumerate(zip(nb, rb)):
            if n.shape != r.shape:
                raise ValueError(f"output shape changed: {tuple(r.shape)} became {tuple(n.shape)}")
            # each sample (row) flattened; per row: dot product, squared norms, |x| sums
            rows = n.shape[0] if n.dim() >= 1 and n.shape[0] else 1
            if n.numel() == rows:  # one value per sample (a regression): its cosine is only
                rows = 1           # its sign, so the batch is compared as one column
            n2, r2 = n.reshape(rows, -1), r.reshape(rows, -1)
            cols = n2.shape[1]
            sums = torch.zeros(5, rows, dtype=torch.float64)
            row_step = max(1, _STEP // max(cols, 1))
            col_step = min(max(cols, 1), _STEP)
            for a in range(0, rows, row_step):
                for c in range(0, cols, col_step):
                    x = n2[a:a + row_step, c:c + col_step].double()
                    y = r2[a:a + row_step, c:c + col_step].double()
                    fx, fy = torch.isfinite(x), torch.isfinite(y)
                    nonfinite += int((~fx & fy).sum())
                    ok = fx & fy
                    d = torch.where(ok, x - y, torch.zeros((), dtype=x.dtype))
                    if d.numel():
                        max_abs = max(max_abs, float(d.abs().max()))
                    err2 += float((d * d).sum())
                    y0 = torch.where(ok, y, torch.zeros((), dtype=y.dtype))
                    ref2 += float((y0 * y0).sum())
                    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
                    part = sums[:, a:a + row_step]
                    part[0] += (x * y).sum(1)
                    part[1] += (x * x).sum(1)
                    part[2] += (y * y).sum(1)
                    part[3] += x.abs().sum(1)
                    part[4] += y.abs().sum(1)
            # cosine_similarity's definition: x / max(|x|, eps) . y / max(|y|, eps)
            eps = 1e-12
            cos = sums[0] / (sums[1].sqrt().clamp(min=eps) * sums[2].sqrt().clamp(min=eps))
            both_zero = (sums[3] == 0) & (sums[4] == 0)
            cos = torch.where(both_zero, torch.ones_like(cos), cos)
            cos_sum += float(cos.sum())
            cos_n += cos.numel()
            if cos.numel():
                cos_min = min(cos_min, float(cos.min()))
            wanted = j in top1 if isinstance(top1, frozenset) else top1
            if wanted and r.dim() == 2 and r.shape[1] >= 2:
                agree += top1_agreement(n, r)
                total += r.shape[0]
    rel = math.sqrt(err2) / math.sqrt(ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
    return Metrics(max_abs=max_abs, rel_l2=rel, cosine=cos_sum / cos_n if cos_n else 1.0,
                   cosine_min=cos_min, top1=agree / total if total else None, nonfinite=nonfinite)


def misses(tol: Tolerance, metrics: Metrics) -> list[tuple[str, float, float]]:
    """(limit key, limit, value) for each limit of ``tol`` that ``metrics`` break."""
    out = []
    if metrics.nonfinite:
        out.append(("nonfinite", 0.0, float(metrics.nonfinite)))
    for key, limit in tol.limits().items():
        value = metrics.value_for(key)
        if value is None:
            continue
        bad = value > limit if key.startswith("max_") else value < limit
        if bad or math.isnan(value):
            out.append((key, limit, value))
    return out


def one_shot_check(tol: Tolerance, gm: torch.fx.GraphModule, ctx) -> tuple["Verifier", Tolerance]:
    """What a pass that chooses its own setting (prune's sparsity, share's bits) measures its
    trials with: a verifier of ``gm`` on at most 4 of ``ctx``'s calibration batches (the
    example inputs without any), and ``tol`` with a quarter of its slack kept in reserve
    (the search sees those batches, the pipeline's verifier all of them)."""
    batches = list(ctx.calibration or [ctx.example_inputs])[:4]
    strict = dataclasses.replace(tol, **{
        k: 1 - 0.75 * (1 - getattr(tol, k)) for k in ("min_cosine", "min_top1")
        if getattr(tol, k) is not None})
    return Verifier(gm, batches), strict


def task_accuracy(outputs: Outputs, labels: Sequence[torch.Tensor]) -> float | None:
    """Argmax accuracy of each batch's first output against its labels (None if not logits)."""
    correct = total = 0
    for out, y in zip(outputs, labels):
        if not out or out[0].shape[:-1] != y.shape:
            return None
        correct += int((out[0].argmax(-1) == y).sum())
        total += y.numel()
    return correct / total if total else None


def _refuse_nan_outputs(reference: Sequence[Sequence[Any]], batches: Sequence[tuple],
                        n_calibration: int) -> None:
    """The model's own outputs must be numbers: NaN in them (NaN or inf in the data, or a
    model that overflows) makes every metric NaN, and a pass would fail with a message
    about its tolerance, or inside its statistics, instead of about the data."""
    for i, leaves in enumerate(reference):
        for j, t in enumerate(leaves):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()
                    and bool(torch.isnan(t).any())):
                continue
            what = f"calibration batch {i}" if i < n_calibration else \
                f"train_data batch {i - n_calibration}"
            bad = [k for k, x in enumerate(batches[i]) if isinstance(x, torch.Tensor)
                   and x.is_floating_point() and not bool(torch.isfinite(x).all())]
            cause = (f"its input(s) {bad} hold NaN or inf" if bad else
                     "its inputs are finite: the model itself overflows or divides by zero")
            raise InputError(
                f"{what}: the model's own output {j} holds NaN ({cause}); verification "
                "compares with the model's outputs and cannot compare with NaN: clean the "
                "data (torch.nan_to_num, drop the rows) or give other batches")


class Verifier:
    """Holds the reference outputs and measures graphs against them.

    ``labelled``: optional ``(inputs, label)`` pairs; graphs are also run on them and
    their task accuracy compared (``Metrics.accuracy``, ``accuracy_ratio``).

    >>> mlp = torch.nn.Linear(4, 2)
    >>> v = Verifier(mlp, [(torch.randn(8, 4),)])
    >>> v.compare_to_reference(v.run(mlp)).rel_l2
    0.0
    """

    def __init__(self, reference: torch.nn.Module, batches: Sequence[tuple],
                 top1: bool | None = None, labelled: Sequence[tuple[tuple, torch.Tensor]] | None = None):
        if not batches:
            raise ValueError("the verifier needs at least one batch of inputs")
        self.batches = [tuple(b) for b in batches]
        self.labelled = [(tuple(x), y) for x, y in (labelled or [])]
        #: where the inputs hold a padding mask: padded tokens' outputs are not compared
        #: (the model is told to ignore them; what it computes there is not its output)
        self.mask_at = padding_mask_position(
            reference, self.batches + [x for x, _ in self.labelled])
        #: the output leaves' names, from the reference's first batch (None: unnamed)
        self.names: list[str] | None = None
        start = time.perf_counter()
        try:
            self.reference = self.run(reference)
        except Exception as e:
            i = getattr(e, "fxpress_batch", None)
            if i is None:
                raise
            n = len(self.batches)
            what = f"calibration batch {i}" if i < n else f"train_data batch {i - n}"
            batch = (self.batches + [x for x, _ in self.labelled])[i]
            shapes = [tuple(t.shape) for t in batch if isinstance(t, torch.Tensor)]
            writes = forward_write_error(e, reference)
            if writes:
                raise InputError(f"{what}: {writes}") from e
            raise InputError(f"{what} (input shapes {shapes}) does not run on the model: "
                             f"{type(e).__name__}: {e}; every batch must be shaped like the "
                             f"example inputs.{dtype_hint(reference, batch)}") from e
        self.reference_seconds = time.perf_counter() - start
        tensors = [t for leaves in self.reference for t in leaves if isinstance(t, torch.Tensor)]
        if tensors and not any(t.numel() for t in tensors):
            # metrics over nothing are perfect: a pass that zeroed the model verified ok (one
            # empty batch among others is fine: a detector may find nothing in one image)
            shapes = [tuple(t.shape) for t in self.batches[0] if isinstance(t, torch.Tensor)]
            outs = [tuple(t.shape) for t in self.reference[0] if isinstance(t, torch.Tensor)]
            raise InputError(
                f"every calibration batch gives only empty outputs (batch 0: input shapes "
                f"{shapes}, outputs {outs[:4]}"
                f"{' once padding is left out' if self.mask_at is not None else ''}): "
                "verification would compare nothing and pass any change; give batches with "
                "at least one row (and, with a padding mask, one unmasked token)")
        _refuse_nan_outputs(self.reference, self.batches + [x for x, _ in self.labelled],
                            len(self.batches))
        #: whether top-1 agreement is measured (None: when the outputs look like logits)
        self.top1 = looks_like_logits(self.reference[:len(self.batches)], self.names) \
            if top1 is None else top1

    def run(self, module: torch.nn.Module, annotate: bool = False) -> Outputs:
        """Outputs of ``module`` on every batch (eval mode, no grad).

        ``annotate`` also stores shapes and dtypes on a graph's nodes from the first batch.
        """
        outs: Outputs = []
        with eval_mode(module), torch.no_grad():
            for i, batch in enumerate(self.batches + [x for x, _ in self.labelled]):
                try:
                    if annotate and i == 0 and isinstance(module, torch.fx.GraphModule):
                        out = annotate_shapes(module, batch)
                    else:
                        out = module(*batch)
                    if i == 0 and not hasattr(self, "reference"):
                        self.names = _leaf_names(out)
                    leaves = _leaves(out)
                    if self.mask_at is not None:
                        leaves = _without_padding(leaves, batch[self.mask_at])
                    outs.append(leaves)
                except Exception as e:
                    e.fxpress_batch = i  # which batch, for the caller's error message
                    raise
        return outs

    def compare_to_reference(self, outputs: Outputs) -> Metrics:
        return self.compare(outputs, self.reference)

    def compare(self, outputs: Outputs, previous: Outputs) -> Metrics:
        n = len(self.batches)
        m = compare(outputs[:n], previous[:n], self.top1)
        if self.labelled:
            labels = [y for _, y in self.labelled]
            new, old = task_accuracy(outputs[n:], labels), task_accuracy(previous[n:], labels)
            m.accuracy = new
            m.accuracy_ratio = new / old if new is not None and old else None
        return m
