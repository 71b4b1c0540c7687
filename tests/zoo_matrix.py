"""The zoo matrix: every zoo model through every built-in pass, then save and load.

One cell is one model through one pipeline (``PASSES``). It checks, in order:

1. ``capture``: the model captures (once per model, as ``fxpress.capture`` does it);
2. ``pass``: the pipeline runs (policy ``warn``: random weights may miss a lossy pass's
   tolerance, which is the verifier's verdict to report, not a coverage failure) and
   leaves a graph that lints;
3. ``coverage``: every weighted layer the pass's docs say it handles (linear incl.
   MultiheadAttention's projections and RNN gates, conv incl. transposed, embedding) no
   longer holds its float weight, or the pass's report names it as a documented choice
   (binarize's ``kept_float``, prune's ``kept_dense``); a weight named only in the
   pipeline's ``float_weights`` (no weighted op reads it) fails, class ``8-float-weight``;
4. ``metrics``: the verifier's figures are finite; quantize's per-layer errors are sane;
5. ``outputs``: on a new input and on a different batch/sequence shape the graph runs,
   gives the model's output structure and shapes, finite values, and is not far worse on
   the new shape than on the calibration input (a baked-in shape);
6. ``save``/``load``: ``fxpress.save`` then ``fxpress.load`` in this process gives the same
   state and bit-identical outputs;
7. ``fresh``: a fresh Python process that imports neither transformers nor the model's code
   loads the artifact and reproduces the outputs bit for bit (one process loads every
   artifact of a run).

A cell is ``ok``, ``skip`` (the pass declines in a documented way, with the reason) or
``fail`` with a failure class (``CLASSES``: the classes of issue 17, else the stage and
the exception type).

    from tests.zoo_matrix import run_matrix
    cells = run_matrix(["bert", "lstm"], ["prune", "quantize8"])
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils import _pytree as pytree

ROOT = Path(__file__).resolve().parents[1]

#: column -> pipeline text (what a user would type)
PASSES: dict[str, str] = {
    "prune": "prune{sparsity=0.5}",
    "quantize8": "quantize{bits=8}",
    "quantize4g": "quantize{bits=4,granularity=group,group_size=16}",
    "share4": "share{bits=4}",
    "ternary": "binarize{mode=ternary}",
    "pow2": "binarize{mode=pow2}",
    "distill": "distill{epochs=1,lr=0.0001}",
    "prune+quantize8": "prune{sparsity=0.5},quantize{bits=8}",
}

#: columns that must stay close to the model on a new input whatever the random weights
#: (int8 is near-lossless; one tiny fine-tuning step barely moves the weights): a wrong
#: weight layout (a transposed conv's channels, a tied head) shows here
ACCURACY_FLOOR: dict[str, float] = {"quantize8": 0.98, "distill": 0.98}

#: the op kinds each pass's docs say it rewrites by default (distill rewrites no weight)
HANDLES: dict[str, tuple[str, ...]] = {
    "prune": ("linear", "conv"), "quantize": ("linear", "conv", "embedding"),
    "share": ("linear", "conv", "embedding"), "binarize": ("linear", "conv"), "distill": (),
}

#: failure classes: label -> (what it is, who owns it)
CLASSES: dict[str, str] = {
    "1-fresh-load": "artifact does not load in a fresh process without the model's library "
                    "(output structure saved by class name) [issue 17 item 1, engineer artifact]",
    "2-cache-output": "capture fails on a cache object in the outputs (use_cache=True) [item 2]",
    "3-mha-rnn": "nn.MultiheadAttention / LSTM / GRU fail or are left unreported [item 3]",
    "4-conv-transpose": "ConvTranspose layers left untouched [item 4]",
    "5-lint-order": "a new module node inserted before its input is defined [item 5]",
    "6-tied-twice": "tied weights or a module called twice break a pass [item 6]",
    "7-group-error": "4-bit group quantization with a large per-layer error [item 7, engineer "
                     "quantize]",
    "8-float-weight": "a linear/conv/embedding/RNN weight that no weighted op reads (a "
                      "``W @ x`` product, a weight reshaped before its op, an embedding table "
                      "indexed or read whole) stays float, named only in the pipeline's "
                      "float_weights",
}


@dataclass
class Cell:
    model: str
    column: str
    status: str = "ok"            # ok / skip / fail
    failure: str = ""             # class label for a fail, reason for a skip
    stage: str = ""               # where it failed
    detail: str = ""              # the error message or check that failed
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cosine: float | None = None   # outputs on the new input vs the model's
    cosine_reshaped: float | None = None
    fresh: bool = False           # a fresh process reproduced the outputs bit for bit
    #: weights no pass can reach (the pipeline's ``float_weights``: not read by a linear,
    #: conv or embedding op) -> their element count
    float_weights: dict[str, int] = field(default_factory=dict)

    def label(self) -> str:
        if self.status == "ok":
            return "ok" + ("*" if self.notes else "")
        if self.status == "skip":
            return f"skip: {self.failure}"
        return f"fail: {self.failure}"


class CellFailure(Exception):
    def __init__(self, stage: str, detail: str, cls: str | None = None):
        super().__init__(detail)
        self.stage, self.detail, self.cls = stage, detail, cls


class CellSkip(Exception):
    pass


# -- what a model holds -------------------------------------------------------------------

def weighted_layers(model: nn.Module) -> list[tuple[str, str, str, torch.Tensor]]:
    """(weight name, kind, layer type, tensor) of every weight of a weighted layer, each
    tensor once: linear (incl. transformers' Conv1D, MultiheadAttention's projections and
    the gate matrices of RNNs and RNN cells), conv (incl. transposed) and embedding."""
    out, seen = [], set()
    for mname, m in model.named_modules():
        kind = None
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            kind = "linear"
        elif isinstance(m, (nn.modules.conv._ConvNd,)):
            kind = "conv"
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            kind = "embedding"
        names = []
        if kind is not None:
            names = ["weight"]
        elif isinstance(m, nn.MultiheadAttention):
            kind = "linear"
            names = [n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                     if getattr(m, n, None) is not None]
        elif isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            kind = "linear"
            names = [n for n, _ in m.named_parameters(recurse=False) if n.startswith("weight_")]
        for n in names:
            t = getattr(m, n, None)
            if not isinstance(t, torch.Tensor) or id(t) in seen:
                continue
            seen.add(id(t))
            out.append((f"{mname}.{n}" if mname else n, kind, type(m).__name__, t))
    return out


def _digest(t: torch.Tensor) -> tuple:
    # as float32 (exact for half precision): a half model's weights are captured as
    # float32 copies, and one left float must still match its original
    t = t.detach().cpu()
    t = t.float() if t.is_floating_point() else t
    return (tuple(t.shape), hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest())


def _float_digests(module: nn.Module) -> set[tuple]:
    """Digests of every float tensor the module holds (in any layout: transposed too)."""
    out = set()
    for t in list(module.state_dict(keep_vars=True).values()):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2:
            out.add(_digest(t))
            if t.dim() == 2:
                out.add(_digest(t.t()))
    return out


def _strings(obj: Any) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _strings(v)


#: record stats that name weights the pipeline could not reach, not a documented choice of
#: the pass: a linear/conv/embedding/RNN weight named only there is a coverage failure (the
#: class "float weight": a weighted layer whose weight no weighted op reads)
UNREACHED_STATS = ("float_weights",)


def _reported(records, name: str) -> bool:
    """Whether a record's stats name this weight (or its layer) outside the rewritten
    layers as a documented choice of the pass: binarize's ``kept_float`` (first and last
    layers), prune's ``kept_dense`` (the floor) and the like. ``float_weights`` does not
    count: it names what no weighted op reads, which is a gap, not a choice."""
    layer = name.rsplit(".", 1)[0]
    for r in records:
        stats = {k: v for k, v in r.stats.items() if k != "layers" and k not in UNREACHED_STATS}
        for s in _strings(stats):
            if s in (name, layer) or s.startswith(layer + ".") or s.startswith(name + " ") \
                    or s.startswith(layer + " ") or f"'{layer}'" in s or f"'{name}'" in s:
                return True
        # a 'layers' entry that says it was skipped also counts
        for k, v in (r.stats.get("layers") or {}).items():
            if k in (name, layer) and isinstance(v, dict) and v.get("skipped"):
                return True
    return False


# -- outputs --------------------------------------------------------------------------------

def leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, in order (dicts, tuples, ModelOutputs, registered
    pytrees, a dataclass's fields as the verifier and the artifact read them; an object with
    ``to_tuple`` or ``items`` too)."""
    from fxpress.graph.outputs import plain_outputs

    res = []
    for leaf in pytree.tree_leaves(plain_outputs(out)):
        if isinstance(leaf, torch.Tensor):
            res.append(leaf)
        elif hasattr(leaf, "to_tuple"):
            res.extend(leaves(tuple(leaf.to_tuple())))
        elif hasattr(leaf, "items") and callable(leaf.items):
            res.extend(leaves(dict(leaf.items())))
    return res


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa = torch.cat([t.detach().double().flatten() for t in a if t.is_floating_point()] or
                   [torch.zeros(1, dtype=torch.float64)])
    fb = torch.cat([t.detach().double().flatten() for t in b if t.is_floating_point()] or
                   [torch.zeros(1, dtype=torch.float64)])
    if fa.shape != fb.shape:
        return float("nan")
    na, nb = fa.norm(), fb.norm()
    if na == 0 and nb == 0:
        return 1.0
    return float(fa @ fb / (na * nb).clamp(min=1e-30))


def _same_structure(got: list[torch.Tensor], ref: list[torch.Tensor]) -> str | None:
    if len(got) != len(ref):
        return f"{len(got)} output tensors, the model gives {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref)):
        if g.shape != r.shape:
            return f"output {i} shape {tuple(g.shape)}, the model gives {tuple(r.shape)}"
    return None


# -- classification -----------------------------------------------------------------------

def classify(model: str, column: str, stage: str, exc: BaseException | None, detail: str,
             layer_types: set[str]) -> str:
    """The failure class of a failed cell (see ``CLASSES``)."""
    text = f"{type(exc).__name__ if exc else ''}: {detail}"
    if stage == "fresh" and ("pytree" in text or "not registered" in text):
        return "1-fresh-load"
    if stage == "capture" and re.search(r"Cache|past_key_values|cache", text):
        return "2-cache-output"
    if stage == "coverage":
        if re.search(r"ConvTranspose", detail):
            return "4-conv-transpose"
        if re.search(r"MultiheadAttention|LSTM|GRU|RNN", detail):
            return "3-mha-rnn"
    if re.search(r"lint|not defined|used before", text, re.I) and stage == "pass":
        return "5-lint-order"
    if layer_types & {"MultiheadAttention", "LSTM", "GRU", "RNN"} and stage in (
            "pass", "save", "load", "fresh") and re.search(
            r"MultiheadAttention|LSTM|GRU|RNN|NonDynamicallyQuantizableLinear|Parameter|flat_weights",
            text):
        return "3-mha-rnn"
    if model in ("tied_embeddings", "module_twice") and stage == "pass" and \
            re.search(r"KeyError|AttributeError", text):
        return "6-tied-twice"
    if stage == "metrics" and "group" in detail:
        return "7-group-error"
    return f"{stage}: {type(exc).__name__ if exc else 'check'}"


# -- one cell -------------------------------------------------------------------------------

def _first_line(e: BaseException, limit: int = 240) -> str:
    s = str(e).strip().splitlines()
    s = (s[0] if s else "")
    return s[:limit]


def _check_metrics(records) -> None:
    for r in records:
        for which in ("cumulative", "incremental"):
            m = getattr(r, which)
            if m is None:
                raise CellFailure("metrics", f"record {r.index} {r.name}: no {which} metrics")
            for k in ("rel_l2", "cosine", "cosine_min", "max_abs"):
                v = getattr(m, k)
                if v is None or not math.isfinite(v):
                    raise CellFailure("metrics", f"record {r.index} {r.name}: {which} {k} = {v}")
        if r.name == "quantize":
            bits = r.stats.get("bits", 8)
            limit = 0.1 if bits >= 8 else 0.35
            for layer, s in (r.stats.get("layers") or {}).items():
                err = s.get("rel_error")
                if err is not None and not (err <= limit):
                    raise CellFailure("metrics", f"quantize {bits}-bit{' group' if s.get('granularity') == 'group' else ''}"
                                      f" layer {layer}: output error {err:.3f} > {limit}")


def _check_coverage(spec, res, column: str) -> list[str]:
    """Raise for a weighted layer a pass should have rewritten that still holds its float
    weight and is not named in the pass's report; return notes for reported skips."""
    passes = [r.name for r in res.records]
    kinds = set()
    for p in passes:
        kinds |= set(HANDLES.get(p, ("linear", "conv", "embedding")))
    if not kinds:
        return []
    left = _float_digests(res.module)
    tensors = _all_tensors(res.module)
    unreached = {d for r in res.records for n in r.stats.get("float_weights") or {}
                 if n in tensors for d in (_digest(tensors[n]),) + (
                     (_digest(tensors[n].t()),) if tensors[n].dim() == 2 else ())}
    missed, notes, unread = [], [], 0
    for name, kind, ltype, t in weighted_layers(spec.model):
        if kind not in kinds or _digest(t) not in left:
            continue
        if _reported(res.records, name):
            notes.append(f"{name} ({ltype}) skipped, reported")
        else:
            missed.append(f"{name} ({ltype})")
            unread += _digest(t) in unreached
    if missed:
        types = sorted({m.split("(")[-1].rstrip(")") for m in missed})
        why = (f"; {unread} named only in float_weights (no weighted op reads them)"
               if unread else "")
        raise CellFailure("coverage", f"{len(missed)} weighted layer(s) left untouched and not "
                          f"reported [{', '.join(types)}]: {', '.join(missed[:4])}"
                          + (" ..." if len(missed) > 4 else "") + why,
                          "8-float-weight" if unread else None)
    return notes


def _all_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by name."""
    return {**dict(m.named_parameters(remove_duplicate=False)),
            **dict(m.named_buffers(remove_duplicate=False))}


def _run(gm, x):
    with torch.no_grad():
        return gm(*x)


def run_cell(spec, gm, column: str, workdir: Path, train: list | None = None,
             passes: dict[str, str] | None = None) -> tuple[Cell, dict | None]:
    """Run one cell (``column`` of ``passes``, default ``PASSES``); return it and, when it
    got as far as a saved artifact, the job for the fresh-process check."""
    import fxpress
    from fxpress.graph.capture import eval_mode

    cell = Cell(spec.name, column)
    start = time.perf_counter()
    layer_types = {lt for _, _, lt, _ in weighted_layers(spec.model)}
    job = None
    stage = "pass"
    try:
        text = (passes or PASSES)[column]
        res = fxpress.compress(gm, text, example_inputs=spec.inputs, policy="warn",
                               progress=False, train_data=spec.train if "distill" in text else None)
        res.module.graph.lint()
        tensors = _all_tensors(res.module)
        for r in res.records:
            for name in r.stats.get("float_weights") or {}:
                cell.float_weights[name] = int(tensors[name].numel()) if name in tensors else 0
        stage = "coverage"
        cell.notes += _check_coverage(spec, res, column)
        stage = "metrics"
        _check_metrics(res.records)
        stage = "outputs"
        out = res.module
        cos = {}
        fixed = (gm.meta.get("fxpress") or {}).get("fixed_dims") or {}
        bounded = (gm.meta.get("fxpress") or {}).get("bounded_dims") or {}
        for which, x in (("new", spec.new), ("reshaped", spec.reshaped), ("calibration", spec.inputs)):
            stage = f"outputs ({which} input)"
            flat = pytree.tree_leaves(x)
            clash = [f"input {i} dim {d} = {n}" for i, dims in fixed.items() for d, n in dims.items()
                     if i < len(flat) and isinstance(flat[i], torch.Tensor)
                     and d < flat[i].dim() and flat[i].shape[d] != n]
            clash += [f"input {i} dim {d} in [{lo}, {hi}]" for i, dims in bounded.items()
                      for d, (lo, hi) in dims.items()
                      if i < len(flat) and isinstance(flat[i], torch.Tensor) and d < flat[i].dim()
                      and not (lo <= flat[i].shape[d] and (hi is None or flat[i].shape[d] <= hi))]
            if clash:  # the capture report says the graph runs only at these sizes
                cell.notes.append(f"{which} input not run: capture fixed {', '.join(clash)}")
                cos[which] = None
                continue
            with torch.no_grad(), eval_mode(spec.model):  # what capture compresses
                ref = leaves(spec.model(*x))
                got = leaves(_run(out, x))
            bad = _same_structure(got, ref)
            if bad:
                raise CellFailure(stage, bad)
            if not all(torch.isfinite(g).all() for g in got if g.is_floating_point()):
                raise CellFailure(stage, "non-finite outputs")
            cos[which] = cosine(got, ref)
        cell.cosine, cell.cosine_reshaped = cos["new"], cos["reshaped"]
        floor = ACCURACY_FLOOR.get(column)
        if floor is not None and not cos["new"] >= floor:
            raise CellFailure("outputs (new input)", f"cosine to the model {cos['new']:.4f} < "
                              f"{floor} for {text}")
        if cos["reshaped"] is not None and cos["reshaped"] < cos["calibration"] - 0.25:
            raise CellFailure("outputs (reshaped input)", f"cosine to the model {cos['reshaped']:.3f} "
                              f"on the new shape vs {cos['calibration']:.3f} on the calibration shape")
        stage = "save"
        path = workdir / f"{spec.name}.{column}.fxp"
        fxpress.save(res, path)
        stage = "load"
        loaded = fxpress.load(path)
        sd_a, sd_b = _all_tensors(res.module), _all_tensors(loaded)
        if set(sd_a) != set(sd_b):
            raise CellFailure("load", f"tensors differ: {sorted(set(sd_a) ^ set(sd_b))[:4]}")
        for k in sd_a:
            if not torch.equal(sd_a[k], sd_b[k]):
                raise CellFailure("load", f"tensor {k} differs after load")
        persisted = sorted(set(loaded.state_dict()) - set(res.module.state_dict()))
        if persisted:
            cell.notes.append(f"non-persistent buffers come back persistent: {persisted[:3]}")
        expected = leaves(_run(res.module, spec.new))
        got = leaves(_run(loaded, spec.new))
        if _same_structure(got, expected) or not all(torch.equal(a, b) for a, b in zip(got, expected)):
            raise CellFailure("load", "loaded outputs are not bit-identical")
        from safetensors.torch import save_file

        io = workdir / f"{spec.name}.{column}.io.safetensors"
        # inputs may be dicts or tuples of tensors: stored flat, rebuilt from the tree spec
        flat_new, tree = pytree.tree_flatten(tuple(spec.new))
        tensors = {f"in.{i}": t.contiguous() for i, t in enumerate(flat_new)}
        tensors.update({f"out.{i}": t.contiguous() for i, t in enumerate(expected)})
        save_file(tensors, str(io))
        # the child rebuilds each input in the layout the parent ran it in: float kernels may
        # round differently for another memory format (channels_last) or alignment
        layouts = ["channels_last" if t.dim() == 4 and not t.is_contiguous()
                   and t.is_contiguous(memory_format=torch.channels_last) else "contiguous"
                   for t in flat_new]
        job = {"key": f"{spec.name}/{column}", "artifact": str(path), "io": str(io),
               "inputs": len(flat_new), "layouts": layouts, "tree": pytree.treespec_dumps(tree)}
    except CellFailure as e:
        cell.status, cell.stage, cell.detail = "fail", e.stage, e.detail
        cell.failure = e.cls or classify(spec.name, column, e.stage, None, e.detail, layer_types)
    except CellSkip as e:
        cell.status, cell.failure = "skip", str(e)
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        cause = e.__cause__ or e
        detail = f"{type(e).__name__}: {_first_line(e)}"
        if cause is not e:
            detail += f" (from {type(cause).__name__})"
        if _is_documented_skip(e):
            m = re.search(r"(\d+) does not divide the input width (\d+) of layer '([^']+)'", str(e))
            cell.status, cell.stage = "skip", stage
            cell.failure = (f"group_size {m[1]} ∤ width {m[2]}" if m else _first_line(e, 120))
            cell.detail = _first_line(e)
        else:
            cell.status, cell.stage, cell.detail = "fail", stage.split(" ")[0], detail
            cell.failure = classify(spec.name, column, cell.stage, e, detail + " " + "".join(
                traceback.format_exception_only(type(cause), cause)), layer_types)
    cell.seconds = time.perf_counter() - start
    return cell, job


def _is_documented_skip(e: BaseException) -> bool:
    """An option error that names the layer and what to do (e.g. a group size that does not
    divide a layer's width): the pass declines, as documented."""
    from fxpress.errors import OptionError

    return isinstance(e, OptionError) and "group_size" in str(e) and "does not divide" in str(e)


# -- the fresh process ------------------------------------------------------------------------

_CHILD = r"""
import json, sys, traceback
import torch
torch.set_num_threads(int(sys.argv[2]))
from safetensors.torch import load_file
from torch.utils import _pytree as pytree
import fxpress
from fxpress.graph.outputs import plain_outputs

def leaves(out):
    res = []
    for leaf in pytree.tree_leaves(plain_outputs(out)):
        if isinstance(leaf, torch.Tensor):
            res.append(leaf)
        elif hasattr(leaf, "to_tuple"):
            res.extend(leaves(tuple(leaf.to_tuple())))
        elif hasattr(leaf, "items") and callable(leaf.items):
            res.extend(leaves(dict(leaf.items())))
    return res

results = {}
for job in json.load(open(sys.argv[1])):
    try:
        gm = fxpress.load(job["artifact"])
        io = load_file(job["io"])
        # safetensors hands back tensors at the file's offsets (not 64-byte aligned), and MKL's
        # float GEMM rounds differently for unaligned data: copy each input into a fresh
        # (aligned) tensor in the layout the parent ran it in
        fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
        x = pytree.tree_unflatten([io[f"in.{i}"].clone(memory_format=fmt[job["layouts"][i]])
                                   for i in range(job["inputs"])], pytree.treespec_loads(job["tree"]))
        with torch.no_grad():
            got = leaves(gm(*x))
        exp = [io[k] for k in sorted((k for k in io if k.startswith("out.")), key=lambda k: int(k[4:]))]
        if len(got) != len(exp):
            results[job["key"]] = f"check: {len(got)} output tensors, expected {len(exp)}"
        elif not all(torch.equal(a, b) for a, b in zip(got, exp)):
            results[job["key"]] = "check: outputs not bit-identical"
        else:
            results[job["key"]] = "ok"
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0][:240]
        results[job["key"]] = f"{type(e).__name__}: {msg}"
foreign = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "tests", "examples"))
print(json.dumps({"results": results, "foreign_modules": foreign[:10]}))
"""


def fresh_process_check(jobs: list[dict], workdir: Path) -> dict[str, str]:
    """Load every artifact in ONE fresh Python process that imports neither transformers
    nor the zoo; return key -> "ok" or the error. Raises if the process imported them."""
    if not jobs:
        return {}
    spec = workdir / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(spec), str(torch.get_num_threads())],
                          capture_output=True, text=True, env=env, cwd=str(workdir), timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"fresh process failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    if data["foreign_modules"]:
        raise AssertionError(f"the fresh process imported {data['foreign_modules']}")
    return data["results"]


# -- the matrix -----------------------------------------------------------------------------

def capture_model(spec):
    """fxpress.capture as a user calls it; (gm, None) or (None, failed cell template)."""
    import fxpress

    try:
        return fxpress.capture(spec.model, spec.inputs), None
    except Exception as e:  # noqa: BLE001
        detail = f"{type(e).__name__}: " + " | ".join(
            line.strip() for line in str(e).splitlines()[:3])[:400]
        return None, detail


def run_matrix(models: Iterable[str], columns: Iterable[str] | None = None, *,
               cells: Iterable[tuple[str, str]] | None = None, workdir: str | Path | None = None,
               log=None, passes: dict[str, str] | None = None, build=None) -> list[Cell]:
    """Run the cells (every model x column, or the given (model, column) pairs); the fresh
    process check runs once at the end for every saved artifact. ``passes`` maps columns
    to pipeline texts (default ``PASSES``); ``build(name)`` makes a specimen (default
    ``tests.zoo.build``)."""
    if build is None:
        from tests.zoo import build

    columns = list(columns or passes or PASSES)
    wanted = list(cells) if cells is not None else [(m, c) for m in models for c in columns]
    order: dict[str, list[str]] = {}
    for m, c in wanted:
        order.setdefault(m, []).append(c)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fxpress-zoo-")
        workdir = tmp.name
    workdir = Path(workdir)
    out: list[Cell] = []
    jobs: list[dict] = []
    by_key: dict[str, Cell] = {}
    try:
        for name, cols in order.items():
            t0 = time.perf_counter()
            spec = build(name)
            layer_types = {lt for _, _, lt, _ in weighted_layers(spec.model)}
            gm, err = capture_model(spec)
            for col in cols:
                if gm is None:
                    cell = Cell(name, col, "fail", stage="capture", detail=err)
                    cell.failure = classify(name, col, "capture", None, err, layer_types)
                    job = None
                else:
                    cell, job = run_cell(spec, gm, col, workdir, passes=passes)
                out.append(cell)
                by_key[f"{name}/{col}"] = cell
                if job:
                    jobs.append(job)
                if log:
                    log(f"{name:20s} {col:16s} {cell.label():40s} {cell.seconds:6.1f}s "
                        f"{cell.stage} {cell.detail[:150]}")
            del spec, gm
            if log:
                log(f"  ({name}: {time.perf_counter() - t0:.1f} s)")
        for key, verdict in fresh_process_check(jobs, workdir).items():
            cell = by_key[key]
            cell.fresh = verdict == "ok"
            if verdict != "ok":
                cell.status, cell.stage, cell.detail = "fail", "fresh", verdict
                cell.failure = classify(cell.model, cell.column, "fresh", None, verdict, set())
                if log:
                    log(f"{key:37s} fresh: {verdict[:150]}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


# -- the table ---------------------------------------------------------------------------

def counts(cells: list[Cell]) -> dict[str, int]:
    c = {"ok": 0, "skip": 0, "fail": 0}
    for cell in cells:
        c[cell.status] += 1
    return c


def markdown(cells: list[Cell], title: str = "", passes: dict[str, str] | None = None) -> str:
    """The coverage table (rows: models, columns: pipelines) plus a legend of the classes."""
    models = list(dict.fromkeys(c.model for c in cells))
    cols = [c for c in (passes or PASSES) if any(cell.column == c for cell in cells)]
    grid = {(c.model, c.column): c for c in cells}
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| model | " + " | ".join(f"`{c}`" for c in cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for m in models:
        row = []
        for col in cols:
            cell = grid.get((m, col))
            row.append("" if cell is None else cell.label().replace("|", "/"))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    n = counts(cells)
    lines += ["", f"{n['ok']} ok, {n['skip']} skip, {n['fail']} fail of {len(cells)} cells."]
    used = sorted({c.failure for c in cells if c.status == "fail"})
    if used:
        lines += ["", "Failure classes:", ""]
        for u in used:
            what = CLASSES.get(u)
            example = next(c for c in cells if c.status == "fail" and c.failure == u)
            lines.append(f"- `{u}`: {what or 'other'} (e.g. {example.model}/{example.column}: "
                         f"{example.detail[:160].replace('|', '/')})")
    kinds: dict[str, tuple[str, int]] = {}
    for c in cells:
        if c.status != "ok":
            continue
        for note in c.notes:
            kind = "persistent" if "non-persistent" in note else "skipped"
            first, n = kinds.get(kind, (f"{c.model}/{c.column}: {note}", 0))
            kinds[kind] = (first, n + 1)
    if kinds:
        lines += ["", "`ok*`: ok, with a remark:", ""]
        what = {"skipped": "a layer left in float that the pass's report names (binarize keeps "
                           "the first and last layers)",
                "persistent": "a non-persistent buffer comes back persistent after load (same "
                              "values; the reloaded state_dict has one more entry)"}
        for kind, (first, n) in sorted(kinds.items()):
            lines.append(f"- {what[kind]}: {n} remark(s), e.g. {first[:160]}")
    return "\n".join(lines) + "\n"


def as_json(cells: list[Cell]) -> str:
    return json.dumps([asdict(c) for c in cells], indent=1)


def from_json(text: str) -> list[Cell]:
    return [Cell(**d) for d in json.loads(text)]


BEGIN, END = "<!-- zoo-matrix:begin (generated by `python -m bench zoo --readme`) -->", "<!-- zoo-matrix:end -->"


def write_readme(table: str, readme: Path = ROOT / "README.md") -> bool:
    """Put ``table`` between the zoo markers of README.md; False when the markers are missing."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")
    return True
