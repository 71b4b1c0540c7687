"""Per-layer sensitivity: what each compression choice costs each layer, alone.

For every weighted op (:func:`fxpress.graph.weights.weighted_ops`) and every candidate
(a short pipeline such as ``quantize{bits=4}`` or ``prune{sparsity=0.9},share{bits=4}``),
the candidate is applied to that one layer of a structural copy of the graph (the copy
shares every other tensor), the copy is run on the calibration batches, and its outputs
are compared with the original model's, computed once:

>>> table = sensitivity(model, registry, calibration=batches)            # doctest: +SKIP
>>> print(table.format())                                                 # doctest: +SKIP

A candidate's bytes are what the artifact stores for the layer's tensors after it (each
tensor encoded as ``fxpress.save`` would encode it: dense, bitmap or relative indices), so
a plan's predicted size adds up to the saved file's payload. Its error is measured with
the verifier's metrics (``rel_l2``, ``cosine``, ``top1``) and, when given, a user's
``evaluate(module) -> score`` (higher is better).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx

from fxpress.errors import FxpressError, InputError, OptionError
from fxpress.graph.capture import as_input_tuple, capture, clone_structure, eval_mode
from fxpress.graph.memory import tensor_memo
from fxpress.graph.weights import CONV, EMBEDDING, LINEAR, weighted_ops
from fxpress.passes.base import Pass, PassContext, PassInfo
from fxpress.passes.recipes import PassSpec, format_spec, parse_spec
from fxpress.passes.verify import Metrics, Verifier

#: The metrics a budget can be stated in (``evaluate`` adds the user's own score).
METRICS = ("cosine", "rel_l2", "top1")
#: Estimated header bytes per stored tensor (its entry in the artifact's compressed JSON
#: header); the planner corrects the estimate against the measured file.
HEADER_BYTES_PER_TENSOR = 24
KEEP = "keep"
#: Files up to this size are measured whole for every candidate (header included).
EXACT_FILE_BYTES = 4 << 20


def _group(width: int) -> int | None:
    for g in (64, 32):
        if width % g == 0 and width > g:
            return g
    return None


def default_candidates(op, recovery: bool = False) -> list[str]:
    """The candidates tried on ``op`` by default (pipeline text, one layer at a time).

    Quantize at 8/4/3/2 bits (4 and below with group scales where the input width allows
    it), weight sharing with 2-6 bit codebooks, ternary and pow2 binarization; with a
    recovery step (``recovery=True``: train data is given) also magnitude pruning at
    50-97% followed by a codebook, Deep Compression's recipe.
    """
    cols = int(math.prod(op.weight().shape[1:]))
    out = ["quantize{bits=8}"]
    g = _group(cols)
    for b in (4, 3, 2):
        out.append(f"quantize{{bits={b},granularity=group,group_size={g},scheme=affine}}" if g
                   else f"quantize{{bits={b},scheme=affine}}")
    if op.kind == EMBEDDING:
        return out + ["share{bits=4}", "share{bits=6}"]
    out += [f"share{{bits={b},bias_bits=8}}" for b in (2, 3, 4, 5, 6)]
    out += ["binarize{mode=sign,keep_first_last=false}",
            "binarize{mode=ternary,keep_first_last=false}",
            "binarize{mode=pow2,keep_first_last=false}"]
    if recovery:
        for s in (0.5, 0.75, 0.9, 0.95, 0.97):
            for b in (3, 4, 5):
                out.append(f"prune{{sparsity={s}}},share{{bits={b},bias_bits=8}}")
    return out


@dataclass
class Trial:
    """One candidate measured on one layer."""

    candidate: str
    bytes: int                 # what the artifact stores for the layer after the candidate
    rel_l2: float
    cosine: float
    cosine_min: float
    top1: float | None
    score: float | None = None  # the user's evaluate(), when given
    seconds: float = 0.0
    error: float = 0.0          # in the units of the table's metric (see SensitivityTable)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("candidate", "bytes", "rel_l2", "cosine",
                                               "cosine_min", "top1", "score", "seconds", "error")}


@dataclass
class LayerSensitivity:
    """Every candidate's trial on one layer; ``keep_bytes``: the layer stored in float."""

    name: str
    kind: str
    params: int
    keep_bytes: int
    trials: list[Trial] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)   # candidate -> why it cannot apply

    def options(self) -> list[Trial]:
        """``keep`` (zero error, float bytes) and every trial."""
        keep = Trial(KEEP, self.keep_bytes, 0.0, 1.0, 1.0, 1.0, None, 0.0, 0.0)
        return [keep] + self.trials


@dataclass
class SensitivityTable:
    """What each candidate costs each layer, alone (see the module docstring).

    ``metric``: what ``Trial.error`` measures: ``"cosine"`` (1 - mean cosine), ``"rel_l2"``
    (squared relative L2: errors of independent layers add up in it), ``"top1"``
    (1 - argmax agreement), or ``"evaluate"`` (the drop of the user's score from
    ``base_score``). Drops in cosine and squared rel. L2 add up over layers (to first order),
    which is what lets the planner sum them.
    """

    layers: list[LayerSensitivity]
    metric: str
    base_score: float | None
    fixed_bytes: int          # file bytes outside the weighted layers (header, norms, ...)
    original_file_bytes: int  # the captured fp32 graph's artifact size
    entropy: bool = False
    seconds: float = 0.0

    def layer(self, name: str) -> LayerSensitivity:
        for ls in self.layers:
            if ls.name == name:
                return ls
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "base_score": self.base_score,
                "fixed_bytes": self.fixed_bytes, "original_file_bytes": self.original_file_bytes,
                "entropy": self.entropy, "seconds": self.seconds,
                "layers": [{"name": ls.name, "kind": ls.kind, "params": ls.params,
                            "keep_bytes": ls.keep_bytes, "failed": ls.failed,
                            "trials": [t.as_dict() for t in ls.trials]} for ls in self.layers]}

    def format(self, limit: int | None = None) -> str:
        """One row per layer and candidate: bytes, bits per weight and the errors."""
        head = ["layer", "candidate", "bytes", "bits/w", "error", "rel_l2", "cosine", "score"]
        rows = []
        for ls in self.layers[:limit]:
            for t in ls.options():
                rows.append([ls.name, t.candidate, str(t.bytes), f"{8 * t.bytes / max(ls.params, 1):.2f}",
                             f"{t.error:.3g}", f"{t.rel_l2:.3g}", f"{t.cosine:.5f}",
                             "-" if t.score is None else f"{t.score:.4f}"])
        widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h)
                  for k, h in enumerate(head)]
        line = lambda c: "  ".join(x.ljust(w) if k < 2 else x.rjust(w)  # noqa: E731
                                   for k, (x, w) in enumerate(zip(c, widths)))
        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def encoded_bytes(t: torch.Tensor, entropy: bool = False) -> int:
    """Bytes the artifact stores for tensor ``t`` (its payload streams, as ``save`` encodes
    it), remembered while ``t`` lives unwritten."""
    from fxpress.graph.artifact import encode_tensor

    def compute(x):
        return int(encode_tensor("t", x, entropy)[0]["stored_bytes"])

    return tensor_memo(t, f"encoded_bytes:{bool(entropy)}", compute)


def _state(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in gm.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}


def _layer_keys(op) -> set[str]:
    keys = set(op.tied or (op.name,))
    if op._bias_name is not None:
        keys.add(op._bias_name)
    return keys


def _bytes_of(tensors: Iterable[torch.Tensor], entropy: bool) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) \
            if t.numel() else (id(t),)
        if key in seen:
            continue
        seen.add(key)
        total += encoded_bytes(t, entropy) + HEADER_BYTES_PER_TENSOR
    return total


def candidate_bytes(base_state: Mapping[str, torch.Tensor], new: torch.nn.Module,
                    layer_keys: set[str], entropy: bool = False) -> int:
    """Bytes the artifact stores for one layer after a candidate: its tensors that the
    candidate added or replaced, plus its original tensors that are still there unchanged."""
    new_state = _state(new)
    changed = [t for k, t in new_state.items() if k not in base_state or base_state[k] is not t]
    kept = [t for k, t in new_state.items() if k in layer_keys and base_state.get(k) is t]
    return _bytes_of(changed + kept, entropy)


def build_steps(candidate: str, layer: str, registry: Mapping[str, PassInfo]) -> list[Pass]:
    """The passes of ``candidate`` (pipeline text) restricted to ``layer``."""
    out = []
    for spec in parse_spec(candidate):
        info = registry.get(spec.name)
        if info is None:
            raise OptionError("sensitivity", "candidates", f"unknown pass {spec.name!r} in "
                              f"candidate {candidate!r}; known: {', '.join(sorted(registry))}")
        cls = info.cls if isinstance(info, PassInfo) else info
        opts = dict(spec.options)
        if "include" in cls.options_spec():
            opts["include"] = [layer]
        out.append(cls(**opts))
    return out


def apply_candidate(gm: torch.fx.GraphModule, steps: Sequence[Pass], ctx: PassContext
                    ) -> torch.fx.GraphModule:
    """``steps`` run on a structural copy of ``gm`` (sharing every tensor no step replaces)."""
    work = gm
    for p in steps:
        work = clone_structure(work, copy_tensors=not p.traits.replaces_tensors)
        work = p.apply(work, ctx).module
    work.graph.lint()
    work.recompile()
    return work


def _error(metric: str, m: Metrics, score: float | None, base: float | None) -> float:
    if metric == "evaluate":
        # the drop of the user's score; the squared rel. L2 (scaled far below one example's
        # worth of score) breaks ties between candidates that keep the score
        drop = max(0.0, (base or 0.0) - (score if score is not None else -math.inf))
        return drop + 1e-4 * min(m.rel_l2, 10.0) ** 2
    if metric == "cosine":
        return max(0.0, 1.0 - m.cosine)
    if metric == "top1":
        return max(0.0, 1.0 - (m.top1 if m.top1 is not None else 1.0)) + 1e-4 * min(m.rel_l2, 10.0) ** 2
    return min(m.rel_l2, 1e3) ** 2


def sensitivity(model: torch.nn.Module, registry: Mapping[str, PassInfo], example_inputs: Any = None,
                *, calibration: Iterable[Any] | None = None, candidates: Any = None,
                metric: str = "cosine", evaluate: Callable[[torch.nn.Module], float] | None = None,
                max_samples: int | None = 64, recovery: bool = False, entropy: bool = False,
                layers: Sequence[str] | None = None, seed: int = 0, progress: bool | None = None,
                gm: torch.fx.GraphModule | None = None) -> SensitivityTable:
    """Measure every candidate on every weighted layer of ``model``, one layer at a time.

    ``candidates``: None (:func:`default_candidates`), a list of pipeline texts for every
    layer, or a callable ``op -> list of texts``. ``max_samples`` caps the calibration
    samples the trials run on (the first batches, cut to size). ``evaluate(module) ->
    score`` (higher is better) makes the error the drop of that score. A candidate that
    cannot apply to a layer (a group size that does not divide its width, say) is left out
    for it and named in ``LayerSensitivity.failed``.
    """
    if metric not in METRICS:
        raise InputError(f"sensitivity: metric must be one of {METRICS}, got {metric!r}")
    calib = [as_input_tuple(b, f"calibration batch {i}", model) for i, b in enumerate(calibration or [])]
    if example_inputs is None:
        if not calib:
            raise InputError("sensitivity: give example_inputs=(x,) or calibration=[(x,), ...]")
        example_inputs = calib[0]
    example_inputs = as_input_tuple(example_inputs, model=model)
    batches = _cut(calib or [example_inputs], max_samples)
    start = time.perf_counter()
    if gm is None:
        gm = capture(model, example_inputs) if not isinstance(model, torch.fx.GraphModule) \
            else clone_structure(model)
    verifier = Verifier(model, batches)
    ctx = PassContext(example_inputs=example_inputs, calibration=batches, reference=model,
                      seed=seed, progress=False)
    base_score = None
    use = metric
    if evaluate is not None:
        use = "evaluate"
        with eval_mode(gm), torch.no_grad():
            base_score = float(evaluate(gm))
    from fxpress.graph.artifact import artifact_size

    original_file = artifact_size(gm, entropy)
    base_state = _state(gm)
    # a small model's file is mostly header (module configs, tensor entries): there each
    # candidate's bytes are the whole file's change; a large one counts its tensors
    exact = original_file <= EXACT_FILE_BYTES
    ops = weighted_ops(gm)
    seen, unique = set(), []
    for op in ops:
        key = min(op.tied or (op.name,))
        if key not in seen:
            seen.add(key)
            unique.append(op)
    if layers is not None:
        wanted = set(layers)
        unique = [op for op in unique if op.module_name in wanted or op.name in wanted]
    table_layers: list[LayerSensitivity] = []
    layer_total = 0
    for op in unique:
        keys = _layer_keys(op)
        keep = _bytes_of([base_state[k] for k in sorted(keys) if k in base_state], entropy)
        layer_total += keep
        ls = LayerSensitivity(op.module_name, op.kind, op.numel, keep)
        texts = (candidates(op) if callable(candidates) else list(candidates)) \
            if candidates is not None else default_candidates(op, recovery)
        for text in texts:
            t0 = time.perf_counter()
            try:
                steps = build_steps(text, op.module_name, registry)
                new = apply_candidate(gm, steps, ctx)
            except FxpressError as e:
                ls.failed[text] = str(e)
                continue
            out = verifier.run(new)
            m = verifier.compare_to_reference(out)
            del out
            score = None
            if evaluate is not None:
                with eval_mode(new), torch.no_grad():
                    score = float(evaluate(new))
            if exact:  # the whole file's change, header included: exact, and cheap here
                nbytes = max(0, keep + artifact_size(new, entropy) - original_file)
            else:
                nbytes = candidate_bytes(base_state, new, keys, entropy)
            del new
            ls.trials.append(Trial(text, nbytes, m.rel_l2, m.cosine, m.cosine_min, m.top1, score,
                                   time.perf_counter() - t0, _error(use, m, score, base_score)))
        table_layers.append(ls)
    # everything the weighted layers do not account for: the header's fixed part, norms...
    fixed = max(0, original_file - layer_total)
    return SensitivityTable(table_layers, use, base_score, fixed, original_file, entropy,
                            time.perf_counter() - start)


def _cut(batches: list[tuple], max_samples: int | None) -> list[tuple]:
    """The first batches, holding at most ``max_samples`` samples (the last one cut)."""
    if max_samples is None:
        return batches
    out, n = [], 0
    for b in batches:
        rows = b[0].shape[0] if b and isinstance(b[0], torch.Tensor) and b[0].dim() else 1
        if n + rows > max_samples:
            take = max_samples - n
            if take > 0 and all(isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == rows
                                for x in b):
                out.append(tuple(x[:take] for x in b))
            break
        out.append(b)
        n += rows
    return out or batches[:1]


__all__ = ["sensitivity", "SensitivityTable", "LayerSensitivity", "Trial", "default_candidates",
           "encoded_bytes", "candidate_bytes", "build_steps", "apply_candidate", "METRICS", "KEEP"]
