"""distill: distillation taps in the graph, and accuracy recovery as a pass.

* **Taps.** ``distill{taps=[layers.*]}`` (or :func:`insert_taps`) puts an identity
  :class:`Tap` node after each chosen point: a module's output (glob over module paths,
  found from ``call_module`` targets and, in export graphs, ``node.meta["nn_module_stack"]``)
  or a node (glob over node names). Without ``taps`` it taps the output of each top-level
  block (items of the outermost ModuleList/Sequential, e.g. BERT's ``encoder.layer.N``).
  A tap returns its input unchanged, so the graph is bit-exact; at inference it is one
  Python call. Inside ``with collect(gm) as acts:`` each tap also stores its activation
  in ``acts[name]``, which is how training reads features. Taps are graph nodes, so they
  survive every later rewrite and the artifact stores them like any runtime module.
* **Recovery step.** ``prune{sparsity=0.95},distill{epochs=5,lr=1e-3}`` fine-tunes the
  compressed graph against the caller's original model on ``train_data`` with the
  trainer of :mod:`fxpress.passes.distill_train` (:class:`Distiller`), which keeps each
  compression's invariants (pruned zeros stay zero; compressed modules train through
  their ``begin_training()``/``end_training()`` hooks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import re
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.fx
from torch import nn

from fxpress.errors import GradientWarning, MissingDataError, OptionError
from fxpress.graph.capture import capture, clone_structure
from fxpress.graph.runtime import RuntimeModule
from fxpress.passes.base import EXACT, Pass, PassContext, PassResult, PassTraits, Tolerance, option

#: learning-rate schedules (the trainer's TrainConfig checks the same list)
SCHEDULES = ("cosine", "constant", "plateau")

TAPS_CONTAINER = "fxpress_taps"


# -- taps -----------------------------------------------------------------------------------

class Tap(RuntimeModule):
    """Identity that, inside :func:`collect`, records what flows through it under ``name``.

    >>> tap = Tap("layers.0")
    >>> x = torch.randn(2, 3)
    >>> with collect(tap) as acts:
    ...     y = tap(x)
    >>> y is x and acts["layers.0"] is x
    True
    """

    _sink: dict | None = None  # set only inside collect(); a class default keeps artifacts tensor-free

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: Any) -> Any:
        sink = self._sink
        if sink is not None:
            sink[self.name] = x
        return x

    def config(self) -> dict:
        return {"name": self.name}

    def extra_repr(self) -> str:
        return repr(self.name)


def tap_modules(module: nn.Module) -> dict[str, Tap]:
    """Every tap of ``module`` by tap name."""
    return {m.name: m for m in module.modules() if isinstance(m, Tap)}


@contextlib.contextmanager
def collect(*modules: nn.Module) -> Iterator[dict[str, Any]]:
    """Within the block, every tap of ``modules`` stores its activation in the yielded dict.

    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> names = insert_taps(gm)
    >>> with collect(gm) as acts:
    ...     _ = gm(torch.randn(5, 4))
    >>> {k: tuple(v.shape) for k, v in acts.items()}
    {'0': (5, 8), '1': (5, 8), '2': (5, 2)}
    """
    acts: dict[str, Any] = {}
    found = [t for m in modules for t in m.modules() if isinstance(t, Tap)]
    before = [t.__dict__.get("_sink") for t in found]
    for t in found:
        t._sink = acts
    try:
        yield acts
    finally:
        for t, prev in zip(found, before):
            if prev is None:
                t.__dict__.pop("_sink", None)
            else:
                t._sink = prev


def _is_tap_node(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op != "call_module":
        return False
    try:
        return isinstance(gm.get_submodule(str(node.target)), Tap)
    except AttributeError:
        return False


def _is_tensor_node(node: torch.fx.Node) -> bool:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if val is None:  # no shape information: assume a tensor unless the graph says otherwise
        return node.op not in ("output", "get_attr")
    return isinstance(val, torch.Tensor) or hasattr(val, "shape")


def _module_paths(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, list[str]]:
    """Node -> the paths of the modules it was computed in (outermost first).

    Export graphs record them in ``nn_module_stack``; symbolic tracing records them for
    ``call_module`` nodes. A module node that a pass swapped in has lost its stack: its
    target and those of its prefixes that other nodes name stand in for it.
    """
    paths: dict[torch.fx.Node, list[str]] = {}
    known: set[str] = set()
    for node in gm.graph.nodes:
        if _is_tap_node(gm, node):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        ps = [str(v[0]) if isinstance(v, (tuple, list)) else str(v) for v in stack.values()]
        ps = [p for p in ps if p and not p.startswith("_")]  # "" is the root; "_..." are export's hooks
        if ps:
            paths[node] = ps
            known.update(ps)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node not in paths and not _is_tap_node(gm, node):
            target = str(node.target)
            if target.startswith("_"):
                continue  # export's _guards_fn and the like
            parts = target.split(".")
            prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
            paths[node] = [p for p in prefixes if p in known] + [target]
    return paths


def _live_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes the output depends on (export keeps dead code such as BERT's unused pooler)."""
    todo = [n for n in gm.graph.nodes if n.op == "output"]
    live: set[torch.fx.Node] = set()
    while todo:
        n = todo.pop()
        if n not in live:
            live.add(n)
            todo.extend(n.all_input_nodes)
    return live


def tap_points(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Where a tap can go, by name: each module's output (by module path) and each node.

    A module's output is the node computed inside it that something outside it uses; a
    module with several such nodes offers them as ``path:0``, ``path:1``, ...
    """
    live = _live_nodes(gm)
    paths = {n: ps for n, ps in _module_paths(gm).items() if n in live}
    inside: dict[str, list[torch.fx.Node]] = {}
    for node, ps in paths.items():
        for p in ps:
            inside.setdefault(p, []).append(node)
    points: dict[str, torch.fx.Node] = {}
    for p, nodes in inside.items():
        members = set(nodes)
        outs = [n for n in nodes if _is_tensor_node(n) and any(
            u not in members or u.op == "output" for u in n.users)]
        if len(outs) == 1:
            points[p] = outs[0]
        else:
            for i, n in enumerate(outs):
                points[f"{p}:{i}"] = n
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method", "placeholder") \
                and node in live and not _is_tap_node(gm, node) and _is_tensor_node(node):
            points.setdefault(node.name, node)
    return points


def default_tap_names(gm: torch.fx.GraphModule) -> list[str]:
    """The output of each top-level block, in graph order.

    Wrappers with one called child are looked through (``SentenceEncoder.bert``), and the
    items of a container whose children are numbered (ModuleList, Sequential) are the
    blocks (``layers.0``, ``bert.encoder.layer.3``).
    """
    points = tap_points(gm)
    called = {p for ps in _module_paths(gm).values() for p in ps if p in points}  # live ones

    def parent(p: str) -> str:
        parts = p.split(".")
        for i in range(len(parts) - 1, 0, -1):
            q = ".".join(parts[:i])
            if q in called:
                return q
        return ""

    kids: dict[str, list[str]] = {}
    for p in called:
        kids.setdefault(parent(p), []).append(p)

    def numbered(ps: list[str]) -> bool:
        return bool(ps) and all(p.rsplit(".", 1)[-1].isdigit() for p in ps)

    def block(p: str) -> list[str]:
        ks = kids.get(p, [])
        if numbered(ks):
            return ks
        if len(ks) == 1:
            inner = block(ks[0])
            return inner if len(inner) > 1 else [p]
        return [p]

    top = kids.get("", [])
    while len(top) == 1 and kids.get(top[0]) and not numbered(top):
        top = kids[top[0]]
    names = [n for p in top for n in block(p)]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(dict.fromkeys(names), key=lambda n: order[points[n]])


def insert_taps(gm: torch.fx.GraphModule, patterns: Sequence[str] | str | None = None, *,
                pass_name: str = "distill") -> list[str]:
    """Put a :class:`Tap` after each point ``patterns`` select; return the tap names.

    ``patterns`` are globs over module paths and node names (a module path wins when both
    match a node); ``None`` taps the top-level blocks (:func:`default_tap_names`). Points
    that already carry a tap of that name are left as they are (and still returned).

    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> insert_taps(gm, ["0"])
    ['0']
    """
    points = tap_points(gm)
    if patterns is None:
        chosen = default_tap_names(gm)
    else:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in points)]
        if unmatched:
            mods = [n for n in points if n not in {x.name for x in gm.graph.nodes}]
            shown = ", ".join(mods[:10]) + (", ..." if len(mods) > 10 else "")
            raise OptionError(pass_name, "taps", f"pattern(s) {unmatched} match no module or node; "
                              f"module names look like: {shown or '(none)'}; node names are "
                              "those of gm.graph")
        chosen = [n for n in points if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    node_names = {n.name for n in gm.graph.nodes}
    seen_nodes: dict[torch.fx.Node, str] = {}
    names: list[str] = []
    # module paths before node names, so a node matched both ways is tapped by its module
    for name in sorted(chosen, key=lambda n: n in node_names):
        node = points[name]
        if node in seen_nodes:
            continue
        seen_nodes[node] = name
        names.append(name)
        _tap_node(gm, node, name)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    names.sort(key=lambda n: order[points[n]])
    gm.graph.lint()
    gm.recompile()
    return names


def _tap_node(gm: torch.fx.GraphModule, node: torch.fx.Node, name: str) -> None:
    for u in node.users:
        if _is_tap_node(gm, u) and gm.get_submodule(str(u.target)).name == name:
            return
    if not hasattr(gm, TAPS_CONTAINER):
        gm.add_module(TAPS_CONTAINER, nn.Module())
    box = getattr(gm, TAPS_CONTAINER)
    base = re.sub(r"\W", "_", name) or "tap"
    attr, i = base, 1
    while hasattr(box, attr):
        attr, i = f"{base}_{i}", i + 1
    box.add_module(attr, Tap(name))
    with gm.graph.inserting_after(node):
        t = gm.graph.call_module(f"{TAPS_CONTAINER}.{attr}", (node,))
    node.replace_all_uses_with(t, delete_user_cb=lambda u: u is not t)
    t.meta = {k: node.meta[k] for k in ("val", "tensor_meta") if k in node.meta}


# -- the pass --------------------------------------------------------------------------------

#: Recovery is judged on the task against the original model, not on raw output error.
RECOVERY = Tolerance(min_top1=0.95, min_accuracy_ratio=0.99, against="reference")


#: The most epochs a recovery step trains when ``epochs`` is not given (early stopping
#: usually ends it sooner).
AUTO_EPOCHS = 30
#: With ``epochs`` not given, the first plateau restores the best epoch and anneals the
#: rate to zero over ``patience`` more epochs instead of stopping (TrainConfig.lr_drops).
AUTO_LR_DROPS = 1
#: With ``epochs`` not given, a run whose held-out loss is still falling when its epochs
#: run out, or that is still far from the original (distill_config.FAR_POINTS) after a cycle
#: that gained, gets up to this many more cycles (TrainConfig.restarts): a compressed model
#: far from the original (a narrow transformer or MLP pruned to 95% starts near chance)
#: trains longer; one that converged does not.
AUTO_RESTARTS = 2
#: The fraction of the batches held out for early stopping when ``epochs`` is not given.
AUTO_HOLDOUT = 0.1
#: With ``epochs`` not given and too few batches to hold any out (fewer than 4), the
#: fewest optimizer steps a recovery takes: AUTO_EPOCHS epochs of 10 batches. With no
#: held-out loss there is no early stopping and no restart, and 30 epochs of 2 or 3 batches
#: are 60-90 steps: on scikit-learn's iris (2 batches) and wine (3), MLPs pruned to 95% and
#: shared at 4 bits ended up to 16.2 and 9.1 points below the original, and within 2.3
#: points (every one of 12 model-seed pairs no worse) with 300 steps
#: (bench/case_recovery.py). The better of the start and the end on the training batches
#: is kept, as before.
AUTO_MIN_STEPS = 300
_NONE = type(None)


class Distill(Pass):
    """Recover accuracy by distilling the original model into the compressed graph; or
    only insert taps.

    ``distill`` with ``train_data`` is a recovery step that needs no tuning: it holds out
    10% of the batches, picks its learning rate with a short range test, trains (KD + CE)
    until the held-out loss stops improving (a cycle of 30 epochs; up to two more: at half
    the rate while the loss is still falling when one ends, or of 120 epochs at the same
    rate while the kept epoch is 2 points or more below the original's) and keeps the best
    epoch's weights. It is verified against the original model on task metrics (top-1
    agreement ≥ 0.95, accuracy ratio on labelled batches ≥ 0.99). Without ``train_data``
    it only inserts taps (and is no recovery step: lossy passes before it are judged on
    their own). ``distill{epochs=0}`` inserts taps only, held to exactness (rel. L2 ≤ 1e-6);
    ``distill{epochs=N}`` needs ``train_data``.
    """

    name = "distill"
    summary = ("Recover accuracy by distilling the original model into the compressed graph "
               "(KD + CE, held-out early stopping, automatic learning rate); without train_data "
               "or with epochs=0, only insert identity taps.")
    traits = PassTraits(tolerance=RECOVERY, runtime_modules=(Tap,))

    taps = option([], "globs over module paths or node names to tap (default: each top-level block)")
    epochs = option(None, "most training epochs (default: up to 30 with early stopping when "
                    "train_data is given); 0 only inserts taps", type=(int, _NONE), low=0)
    lr = option(None, "learning rate (default: chosen by a learning-rate range test)",
                type=(float, _NONE), low=0.0, low_open=True)
    holdout = option(None, "fraction of the train_data batches held out for early stopping "
                     "(default: 0.1 when epochs is not given, else 0: every epoch runs and the "
                     "last is kept)", type=(float, _NONE), low=0.0, high=0.5)
    patience = option(5, "stop after this many epochs without a better held-out loss "
                      "(0: never stop early)", low=0)
    temperature = option(4.0, "softmax temperature T of the KL term (scaled by T²)", low=0.0,
                         low_open=True)
    alpha = option(0.5, "weight of the KL term; 1-alpha weighs cross-entropy on labels", low=0.0,
                   high=1.0)
    beta = option(0.0, "weight of the MSE between the graph's taps and the original's", low=0.0)
    mixup = option(0.0, "weight of a KL term on blends of each batch's float inputs, which "
                   "only the original model labels (0: off)", low=0.0)
    output_loss = option("auto", "'kl' on softened logits, 'mse' on raw outputs (embeddings, "
                         "regression: plus MSE to float labels), or 'auto': mse when the labels "
                         "are floats or the output has one value per row, else kl",
                         choices=("auto", "kl", "mse"))
    optimizer = option("adam", "optimizer", choices=("adam", "sgd"))
    schedule = option("cosine", "learning-rate schedule over the epochs", choices=SCHEDULES)
    weight_decay = option(0.0, "weight decay", low=0.0)

    #: without epochs and without train_data it only inserts taps (see passes/gradual.trains)
    recovers_without_train_data = False

    TRAINING = ("lr", "holdout", "patience", "temperature", "alpha", "beta", "mixup", "output_loss",
                "optimizer", "schedule", "weight_decay")

    def check_options(self) -> None:
        if self.epochs == 0:
            given = [k for k in self.TRAINING if k in self._given]
            if given:
                raise OptionError(self.name, given[0], "only applies when training; drop epochs=0")

    def configure_traits(self, traits: PassTraits) -> PassTraits:
        if self.epochs == 0:  # taps only: exact, and no tensor is written
            return dataclasses.replace(traits, tolerance=EXACT, replaces_tensors=True)
        # training recovers accuracy and writes weights in place; epochs=None trains when
        # the run has train_data (and only inserts taps without it), so it needs none
        return dataclasses.replace(traits, recovers=True,
                                   needs=("train_data",) if self.epochs else ())

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        # without epochs, train when the run has data; only insert taps when it has none
        training = self.epochs != 0 and ctx.train_data is not None
        before = len(tap_modules(gm))
        names: list[str] = []
        if self.taps or not training or self.beta > 0:
            names = insert_taps(gm, self.taps or None, pass_name=self.name)
        added = len(tap_modules(gm)) - before
        stats: dict[str, Any] = {"taps": names, "inserted": added}
        if not training:
            return PassResult(gm, changed=added > 0, stats=stats)

        data = ctx.require(self.name, "train_data")
        inlined = gm.meta.get("fxpress", {}).get("autograd_functions_inlined")
        if inlined:
            stats["autograd_functions_inlined"] = list(inlined)
            warnings.warn(GradientWarning(
                f"{self.name}: the graph was captured with torch.export, which records the "
                f"custom torch.autograd.Function(s) {', '.join(inlined)} as their forward's ops "
                "and not their backward: training differentiates those ops (torch.round, "
                "sign: zero gradient), so the layers before them may not train. Make the model "
                "traceable by torch.fx.symbolic_trace (fxpress keeps such calls whole there, "
                "backward included), or train outside fxpress.", inlined), stacklevel=2)
        if ctx.reference is None:
            raise MissingDataError(self.name, "needs the original model as the teacher; run it in "
                                   "a pipeline (fxpress.compress) or set ctx.reference")
        teacher = ctx.reference
        pairs = None
        if self.beta > 0 and names:
            if isinstance(teacher, torch.fx.GraphModule):
                teacher = clone_structure(teacher)  # tapping the clone leaves the caller's graph alone
            else:  # the same capture method gives the same module paths, hence the same tap names
                method = gm.meta.get("fxpress", {}).get("method")
                teacher = capture(teacher, ctx.example_inputs,
                                  method if method in ("fx", "export") else "auto")
            insert_taps(teacher, names, pass_name=self.name)
            pairs = {n: n for n in names}
        # a batch longer than the model's inputs ends with a label; shorter ones (a transfer
        # set the teacher labels) get the KL term alone, so the two kinds may be mixed
        from fxpress.passes.distill_train import Distiller, TrainConfig  # they import the taps

        distiller = Distiller(teacher, gm, pairs=pairs, temperature=self.temperature,
                              alpha=self.alpha, beta=self.beta, output_loss=self.output_loss,
                              inputs=len(ctx.example_inputs), mixup=self.mixup)
        epochs = self.epochs or AUTO_EPOCHS
        if self.epochs is None and self.holdout != 0:
            few = _too_few_to_hold_out(data, self.holdout or AUTO_HOLDOUT, ctx.seed)
            if few:  # no early stopping: a budget in steps, not in passes over 2 batches
                epochs = max(epochs, -(-AUTO_MIN_STEPS // few))
                stats["held_out_nothing"] = {"batches": few, "epochs": epochs}
        config = TrainConfig(epochs=epochs, lr=self.lr,
                             optimizer=self.optimizer, weight_decay=self.weight_decay,
                             schedule=self.schedule, patience=self.patience,
                             lr_drops=AUTO_LR_DROPS if self.epochs is None else 0,
                             restarts=AUTO_RESTARTS if self.epochs is None else 0,
                             holdout=AUTO_HOLDOUT if self.holdout is None and self.epochs is None
                             else self.holdout or 0.0,
                             seed=ctx.seed, progress=ctx.progress)
        history = distiller.fit(data, config=config)
        stats.update(history.as_dict())
        return PassResult(distiller.student, changed=True, stats=stats)


def _too_few_to_hold_out(data: Any, fraction: float, seed: int) -> int:
    """How many batches ``data`` has when they are too few for the held-out split to hold
    any out (fewer than 4; see ``split_holdout``), else 0."""
    from fxpress.passes.distill_data import split_holdout

    if split_holdout(data, fraction, seed)[1] is not None:
        return 0
    n = sum(1 for _ in zip(range(4), iter(data)))
    return n if n < 4 else 0


class FeatureProjection(nn.Module):
    """A learned linear map along the one dimension where student and teacher widths differ."""

    def __init__(self, dim: int, d_in: int, d_out: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.movedim(self.dim, -1)).movedim(-1, self.dim)


#: the trainer's public names, still importable from here (loaded on first use)
_TRAINER_NAMES = ("Distiller", "History", "TrainConfig")


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        from fxpress.passes import distill_train

        return getattr(distill_train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Tap", "tap_modules", "collect", "tap_points", "default_tap_names", "insert_taps",
           "Distill", "RECOVERY", "FeatureProjection", *_TRAINER_NAMES]
