"""distill: distillation taps in the graph, a KD trainer, and accuracy recovery as a pass.

Three pieces, one technique:

* **Taps.** ``distill{taps=[layers.*]}`` (or :func:`insert_taps`) puts an identity
  :class:`Tap` node after each chosen point: a module's output (glob over module paths,
  found from ``call_module`` targets and, in export graphs, ``node.meta["nn_module_stack"]``)
  or a node (glob over node names). Without ``taps`` it taps the output of each top-level
  block (items of the outermost ModuleList/Sequential, e.g. BERT's ``encoder.layer.N``).
  A tap returns its input unchanged, so the graph is bit-exact; at inference it is one
  Python call. Inside ``with collect(gm) as acts:`` each tap also stores its activation
  in ``acts[name]``, which is how training reads features. Taps are graph nodes, so they
  survive every later rewrite and the artifact stores them like any runtime module.
* **Distiller.** ``Distiller(teacher, student, pairs=..., temperature=4.0, alpha=0.5,
  beta=1.0).fit(train_data, epochs=5, lr=1e-3)``: KL between softened logits (×T²),
  cross-entropy on labels when batches carry them, and MSE between paired taps through a
  learned linear projection when widths differ (FitNets). Teacher and student may be
  different architectures, or the student the compressed copy of the teacher.
* **Recovery step.** ``prune{sparsity=0.95},distill{epochs=5,lr=1e-3}`` fine-tunes the
  compressed graph against the caller's original model on ``train_data`` and keeps each
  compression's invariants: weights that are exactly zero in plain float layers stay zero
  (gradients and weights masked in every optimizer step), and each
  :class:`~fxpress.graph.weights.CompressedModule` trains only the parameters its
  ``begin_training()`` returns and is folded back by ``end_training()``.

Under ``torchrun --nproc_per_node=N`` the same code trains with DistributedDataParallel
(gloo on CPU, nccl on GPUs): the process group is set up from torchrun's environment,
each rank takes its share of the batches (DistributedSampler's split) and DDP averages
gradients, so every rank ends with the same weights.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from fxpress.errors import InputError, MissingDataError, OptionError
from fxpress.graph.capture import capture, clone_structure, eval_mode
from fxpress.graph.weights import RuntimeModule, compressed_modules
from fxpress.passes.base import EXACT, Pass, PassContext, PassResult, Tolerance, option

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


# -- distributed ------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    created: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1


def _distributed() -> _Dist:
    """The process group torchrun asked for (set up here if the caller has not)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_available():
        raise InputError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    created = False
    if not dist.is_initialized():
        # nccl needs one GPU per rank; gloo runs anywhere
        use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world
        dist.init_process_group("nccl" if use_nccl else "gloo")
        created = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 str(dist.get_backend()), created)


def _epoch_batches(data: Any, epoch: int, seed: int, d: _Dist, state: dict) -> Iterator[Any]:
    """This rank's batches for one epoch.

    A sequence of batches is split like DistributedSampler: one seeded permutation per
    epoch, the same on every rank, padded to a multiple of the world size, every rank
    taking each world-th entry. A DataLoader is rebuilt around a DistributedSampler. Any
    other iterable is dealt round-robin.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    if isinstance(data, DataLoader):
        if not d.active:
            return iter(data)
        if "loader" not in state:
            if data.batch_size is None:
                raise InputError("distill: under torchrun a DataLoader needs a batch_size (a custom "
                                 "batch_sampler cannot be sharded); pass a list of batches instead")
            sampler = DistributedSampler(data.dataset, d.world, d.rank, shuffle=True, seed=seed)
            state["sampler"] = sampler
            state["loader"] = DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler,
                                         num_workers=data.num_workers, collate_fn=data.collate_fn,
                                         drop_last=data.drop_last, pin_memory=data.pin_memory)
        state["sampler"].set_epoch(epoch)
        return iter(state["loader"])
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, torch.Tensor):
        n = len(data)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        if d.active:
            order += order[: (-n) % d.world]
            order = order[d.rank::d.world]
        return (data[i] for i in order)
    return (b for i, b in enumerate(data) if i % d.world == d.rank)


def _steps(data: Any, d: _Dist) -> int | None:
    try:
        return math.ceil(len(data) / d.world)
    except TypeError:
        return None


def _in_step(batches: Iterator[Any], d: _Dist, device: torch.device) -> Iterator[Any]:
    """Yield batches while every rank still has one (DDP needs the same number of steps)."""
    if not d.active:
        yield from batches
        return
    import torch.distributed as dist

    flag_device = device if d.backend == "nccl" else torch.device("cpu")
    while True:
        b = next(batches, None)
        flag = torch.tensor([0 if b is None else 1], device=flag_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 0:
            return
        yield b


# -- the trainer ------------------------------------------------------------------------------

@dataclass
class History:
    """What :meth:`Distiller.fit` did: one dict per epoch (mean losses, steps, seconds).

    Losses are averaged over every rank, so each rank holds the same history.
    """

    epochs: list[dict] = field(default_factory=list)
    world_size: int = 1
    trained_parameters: int = 0
    kept_zeros: int = 0

    @property
    def loss(self) -> list[float]:
        return [e["loss"] for e in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, i: int) -> dict:
        return self.epochs[i]

    def as_dict(self) -> dict:
        return {"epochs": self.epochs, "world_size": self.world_size,
                "trained_parameters": self.trained_parameters, "kept_zeros": self.kept_zeros}


class FeatureProjection(nn.Module):
    """A learned linear map along the one dimension where student and teacher widths differ."""

    def __init__(self, dim: int, d_in: int, d_out: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.movedim(self.dim, -1)).movedim(-1, self.dim)


class _Trainee(nn.Module):
    """The student, the projections and any loose trainable parameters: what DDP wraps."""

    def __init__(self, student: nn.Module, student_taps: Sequence[str],
                 projections: Sequence[nn.Module], extra: Sequence[nn.Parameter]):
        super().__init__()
        self.student = student
        self.student_taps = list(student_taps)
        self.projections = nn.ModuleList(projections)
        self.extra = nn.ParameterList(extra)

    def forward(self, *inputs: Any) -> tuple[Any, list[torch.Tensor]]:
        if not self.student_taps:
            return self.student(*inputs), []
        with collect(self.student) as acts:
            out = self.student(*inputs)
        return out, [p(acts[n]) for p, n in zip(self.projections, self.student_taps)]


@contextlib.contextmanager
def _train_mode(model: nn.Module):
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:  # not model.train(): exported graphs refuse train()
        m.training = True
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


def _first_float(out: Any) -> torch.Tensor:
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    raise InputError(f"distill: the model's output has no float tensor ({type(out).__name__})")


def _device_of(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


def _to(batch: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def _loss_item(t: torch.Tensor | float) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


#: every part :meth:`Distiller.loss` may report
_LOSS_PARTS = ("loss", "kd", "ce", "feature")


class Distiller:
    """Knowledge distillation from ``teacher`` into ``student``.

    >>> d = Distiller(teacher, student, pairs={"layers.0": "layers.1"}, beta=1.0)  # doctest: +SKIP
    >>> history = d.fit(train_data, epochs=5, lr=1e-3)                             # doctest: +SKIP
    >>> history.loss                                                               # doctest: +SKIP

    The loss is ``alpha·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−alpha)·CE(s, y)`` when
    batches carry labels (``(inputs..., label)``), the KL term alone when they do not,
    plus ``beta`` times the mean over ``pairs`` of ``MSE(proj(student tap), teacher tap)``.
    ``output_loss="mse"`` matches raw outputs instead (embeddings, regression).

    Labelled and unlabelled batches may be mixed (Hinton's transfer set: inputs only the
    teacher labels). Each batch is judged on its own: ``labels=True``/``False`` says all
    batches do or do not end with a label; ``inputs=N`` says the model takes N inputs, so
    a batch with more items ends with a label; by default a batch (or a bare tensor) is
    labelled when its last item is an integer vector as long as the batch.

    ``pairs`` maps student tap names to teacher tap names (a list of names pairs each with
    itself). A model that lacks the named taps is captured on the first batch and tapped
    (see :func:`insert_taps`); ``distiller.student`` is then that graph, which shares its
    parameters with the module you passed. Where widths differ, a learned linear projection
    maps the student's feature to the teacher's. The teacher is never modified; the student
    is trained in place. Weights that are exactly zero in the student's plain layers stay
    zero (``keep_zeros``), and compressed runtime modules train through their
    ``begin_training()``/``end_training()`` hooks.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module,
                 pairs: Mapping[str, str] | Sequence[str] | Sequence[tuple[str, str]] | None = None,
                 temperature: float = 4.0, alpha: float = 0.5, beta: float = 1.0, *,
                 output_loss: str = "kl", labels: bool | None = None, inputs: int | None = None,
                 keep_zeros: bool = True):
        if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
            raise InputError("Distiller: teacher and student must be torch.nn.Module instances")
        if teacher is student:
            raise InputError("Distiller: teacher and student are the same object; distil into a "
                             "copy (e.g. the graph fxpress.compress returns)")
        if temperature <= 0 or not 0 <= alpha <= 1 or beta < 0:
            raise InputError(f"Distiller: need temperature > 0, 0 <= alpha <= 1, beta >= 0; got "
                             f"temperature={temperature}, alpha={alpha}, beta={beta}")
        if output_loss not in ("kl", "mse"):
            raise InputError(f"Distiller: output_loss must be 'kl' or 'mse', got {output_loss!r}")
        self.teacher, self.student = teacher, student
        if pairs is None:
            self.pairs: list[tuple[str, str]] = []
        elif isinstance(pairs, Mapping):
            self.pairs = [(str(s), str(t)) for s, t in pairs.items()]
        else:
            self.pairs = [(p, p) if isinstance(p, str) else (str(p[0]), str(p[1])) for p in pairs]
        self.temperature, self.alpha, self.beta = float(temperature), float(alpha), float(beta)
        if inputs is not None and (isinstance(inputs, bool) or not isinstance(inputs, int) or inputs < 1):
            raise InputError(f"Distiller: inputs must be a positive int (the model's input count), "
                             f"got {inputs!r}")
        self.output_loss, self.labels, self.keep_zeros = output_loss, labels, keep_zeros
        self.inputs = inputs
        self.projections: list[nn.Module] = []

    # -- data --------------------------------------------------------------------------------
    def _split(self, batch: Any) -> tuple[tuple, torch.Tensor | None]:
        if isinstance(batch, torch.Tensor):
            batch = (batch,)
        if not isinstance(batch, (tuple, list)) or not batch:
            raise InputError(f"distill: a batch must be a tuple (inputs..., label) or (inputs...), "
                             f"got {type(batch).__name__}")
        batch = tuple(batch)
        has = self.labels
        if has is None and self.inputs is not None:
            has = len(batch) > self.inputs
        if has is None:  # a trailing integer vector as long as the batch is a label
            y, x0 = batch[-1], batch[0]
            has = (len(batch) >= 2 and isinstance(y, torch.Tensor) and not y.is_floating_point()
                   and y.dim() == 1 and isinstance(x0, torch.Tensor) and x0.dim() >= 1
                   and x0.shape[0] == y.shape[0])
        return (batch[:-1], batch[-1]) if has else (batch, None)

    def _tapped(self, model: nn.Module, names: list[str], example: tuple) -> nn.Module:
        have = tap_modules(model)
        if all(n in have for n in names):
            return model
        if not isinstance(model, torch.fx.GraphModule):
            model = capture(model, example)
        missing = [n for n in names if n not in tap_modules(model)]
        if missing:
            insert_taps(model, missing)
        return model

    # -- training ----------------------------------------------------------------------------
    def loss(self, s_out: Any, t_out: Any, y: torch.Tensor | None, s_feats: Sequence[torch.Tensor],
             t_acts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The distillation loss of one batch and its parts."""
        s, t = _first_float(s_out), _first_float(t_out).detach()
        parts: dict[str, float] = {}
        if self.output_loss == "kl":
            T = self.temperature
            s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            out = F.kl_div(F.log_softmax(s2 / T, -1), F.log_softmax(t2 / T, -1), log_target=True,
                           reduction="batchmean") * (T * T)
        else:
            out = F.mse_loss(s, t)
        parts["kd"] = _loss_item(out)
        if y is not None and self.output_loss == "kl":
            ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
            parts["ce"] = _loss_item(ce)
            total = self.alpha * out + (1 - self.alpha) * ce
        else:
            total = out
        if s_feats:
            feat = sum(F.mse_loss(sf, t_acts[tn].detach()) for sf, (_, tn) in zip(s_feats, self.pairs))
            feat = feat / len(s_feats)
            parts["feature"] = _loss_item(feat)
            total = total + self.beta * feat
        parts["loss"] = _loss_item(total)
        return total, parts

    def _projections(self, s_acts: Mapping[str, torch.Tensor],
                     t_acts: Mapping[str, torch.Tensor]) -> list[nn.Module]:
        out: list[nn.Module] = []
        for s_name, t_name in self.pairs:
            s, t = s_acts[s_name], t_acts[t_name]
            if s.shape == t.shape:
                out.append(nn.Identity())
                continue
            diff = [d for d in range(1, s.dim()) if s.dim() == t.dim() and s.shape[d] != t.shape[d]]
            if s.dim() != t.dim() or len(diff) != 1 or s.shape[0] != t.shape[0]:
                raise InputError(f"distill: cannot pair student tap {s_name!r} {tuple(s.shape)} with "
                                 f"teacher tap {t_name!r} {tuple(t.shape)}: a projection maps one "
                                 "width; pick taps whose shapes differ in one dimension at most")
            d = diff[0]
            out.append(FeatureProjection(d, s.shape[d], t.shape[d]))
        return out

    def fit(self, train_data: Iterable[Any], epochs: int = 5, lr: float = 1e-3, *,
            optimizer: str = "adam", weight_decay: float = 0.0, schedule: str = "cosine",
            seed: int = 0, progress: bool | None = True,
            device: str | torch.device | None = None) -> History:
        """Train the student for ``epochs`` passes over ``train_data``; return the history.

        ``train_data``: a list of batches, a DataLoader, or any re-iterable of batches.
        ``schedule``: "cosine" anneals the learning rate to zero over the run; "constant".
        ``device``: where to train (default: the student's device; under torchrun with one
        GPU per rank, ``cuda:LOCAL_RANK``). The student returns to its device afterwards.
        """
        if epochs < 1:
            raise InputError(f"Distiller.fit: epochs must be >= 1, got {epochs}")
        if optimizer not in ("adam", "sgd"):
            raise InputError(f"Distiller.fit: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if schedule not in ("cosine", "constant"):
            raise InputError(f"Distiller.fit: schedule must be 'cosine' or 'constant', got {schedule!r}")
        first = next(iter(train_data), None)
        if first is None:
            raise MissingDataError("distill", "train_data is empty; pass batches of (inputs..., label)")
        d = _distributed()
        try:
            return self._fit(train_data, first, epochs, lr, (optimizer, weight_decay, schedule),
                             seed, progress, device, d)
        finally:
            if d.created:
                import torch.distributed as dist

                dist.destroy_process_group()

    def _fit(self, data, first, epochs, lr, opt, seed, progress, device, d):
        torch.manual_seed(seed)
        x0, y0 = self._split(first)
        if self.pairs:
            self.student = self._tapped(self.student, [s for s, _ in self.pairs], x0)
            self.teacher = self._tapped(self.teacher, [t for _, t in self.pairs], x0)
        student, teacher = self.student, self.teacher
        home = _device_of(student)
        if d.backend == "nccl":
            device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(device)
        device = torch.device(device) if device is not None else home
        student.to(device)
        if _device_of(teacher) != device:  # never move the caller's teacher: use a copy
            teacher = clone_structure(teacher, copy_tensors=True).to(device)

        # each compressed module says what may train; everything else float trains as is
        compressed = compressed_modules(student)
        flags = [(p, p.requires_grad) for p in student.parameters()]
        hooked: list[nn.Parameter] = []
        started: list = []
        try:
            for _, m in compressed:
                hooked += list(m.begin_training())
                started.append(m)
            # a compressed module's own tensors train only if its hook returned them
            owned = {id(p) for _, m in compressed for p in m.parameters()}
            plain = [p for p in student.parameters() if id(p) not in owned and p.is_floating_point()]
            for p in student.parameters():
                p.requires_grad_(False)
            trainable = list({id(p): p for p in plain + hooked}.values())
            for p in trainable:
                p.requires_grad_(True)
            history = self._loop(student, teacher, data, x0, y0, trainable, plain, epochs, lr,
                                 opt, seed, progress, device, d)
        finally:
            for m in started:
                m.end_training()
            for p, f in flags:
                p.requires_grad_(f)
            student.to(home)
        return history

    def _loop(self, student, teacher, data, x0, y0, trainable, plain, epochs, lr, opt_spec,
              seed, progress, device, d) -> History:
        opt_name, weight_decay, schedule = opt_spec
        s_names = [s for s, _ in self.pairs]
        x0 = _to(x0, device)
        with torch.no_grad(), eval_mode(teacher), eval_mode(student), \
                collect(teacher) as t_acts, collect(student) as s_acts:
            teacher(*x0)
            student(*x0)
            projections = self._projections(s_acts, t_acts)
        in_student = {id(p) for p in student.parameters()}
        trainee = _Trainee(student, s_names, projections,
                           [p for p in trainable if id(p) not in in_student]).to(device)

        # one probe step (no update) finds parameters the graph never uses (e.g. a pooler
        # whose output is dropped): DDP would wait forever for their gradients
        y0d = _to(y0, device)
        with eval_mode(trainee), eval_mode(teacher), collect(teacher) as t_acts:
            with torch.no_grad():
                t_out = teacher(*x0)
            s_out, s_feats = trainee(*x0)
            self.loss(s_out, t_out, y0d, s_feats, t_acts)[0].backward()
        params = [p for p in trainee.parameters() if p.requires_grad]
        unused = [p for p in params if p.grad is None]
        for p in unused:
            p.requires_grad_(False)
        params = [p for p in params if p.grad is not None]
        for p in params:
            p.grad = None
        if not params:
            raise InputError("distill: the student has no trainable parameter that reaches the loss")
        self.projections = list(trainee.projections)

        plain_ids = {id(p) for p in plain}
        masks = {p: p.detach() != 0 for p in params if self.keep_zeros and id(p) in plain_ids
                 and p.dim() >= 2 and not bool((p != 0).all())}
        model: nn.Module = trainee
        if d.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(trainee, device_ids=[device.index] if device.type == "cuda" else None)
        opt = (torch.optim.Adam(params, lr=lr, weight_decay=weight_decay) if opt_name == "adam"
               else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay))

        steps = _steps(data, d)
        sched = None
        if schedule == "cosine":
            # stepped per batch; an iterable of unknown length anneals per epoch instead
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * (steps or 1))
        history = History(world_size=d.world, trained_parameters=sum(p.numel() for p in params),
                          kept_zeros=sum(int((~m).sum()) for m in masks.values()))
        bar = _bar(epochs * steps if steps else None, progress and d.rank == 0)
        state: dict = {}
        try:
            for epoch in range(epochs):
                start = time.perf_counter()
                sums: dict[str, float] = {}
                counts: dict[str, int] = {}  # per part: "ce" only in labelled batches
                n = 0
                batches = _in_step(iter(_epoch_batches(data, epoch, seed, d, state)), d, device)
                with _train_mode(trainee):
                    for batch in batches:
                        x, y = self._split(batch)
                        x, y = _to(x, device), _to(y, device)
                        with torch.no_grad(), eval_mode(teacher), collect(teacher) as t_acts:
                            t_out = teacher(*x)
                        s_out, s_feats = model(*x)
                        loss, parts = self.loss(s_out, t_out, y, s_feats, t_acts)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        for p, m in masks.items():  # pruned weights get no update...
                            if p.grad is not None:
                                p.grad.mul_(m)
                        opt.step()
                        if sched is not None and steps:
                            sched.step()
                        with torch.no_grad():
                            for p, m in masks.items():  # ...and stay exactly zero
                                p.mul_(m)
                        for k, v in parts.items():
                            sums[k] = sums.get(k, 0.0) + v
                            counts[k] = counts.get(k, 0) + 1
                        n += 1
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(epoch=epoch + 1, loss=f"{parts['loss']:.4f}", refresh=False)
                if sched is not None and not steps:
                    sched.step()
                record = self._reduce(sums, counts, n, d, device)
                record.update(epoch=epoch + 1, seconds=time.perf_counter() - start)
                history.epochs.append(record)
                if bar is not None:  # one redraw per epoch with the epoch's mean loss
                    bar.set_postfix(epoch=epoch + 1, loss=f"{record['loss']:.4f}")
        finally:
            if bar is not None:
                bar.close()
        return history

    @staticmethod
    def _reduce(sums: dict[str, float], counts: dict[str, int], n: int, d: _Dist,
                device: torch.device) -> dict:
        """Each loss part's mean over the batches that had it, over every rank."""
        # a fixed key list: with mixed batches a rank may have seen no labelled one, and
        # all_reduce needs the same tensor everywhere
        keys = sorted(set(_LOSS_PARTS) | set(sums))
        local = n
        vals = [sums.get(k, 0.0) for k in keys] + [float(counts.get(k, 0)) for k in keys]
        if d.active:
            import torch.distributed as dist

            where = device if d.backend == "nccl" else torch.device("cpu")
            t = torch.tensor(vals + [float(n)], dtype=torch.float64, device=where)
            dist.all_reduce(t)
            vals, n = t[:-1].tolist(), int(t[-1].item())
        sums = dict(zip(keys, vals[:len(keys)]))
        counts = dict(zip(keys, (int(c) for c in vals[len(keys):])))
        out = {k: sums[k] / counts[k] for k in keys if counts[k]}
        out.setdefault("loss", float("nan"))  # no batch at all
        out["steps"] = local     # this rank's optimizer steps
        out["batches"] = n       # batches seen by all ranks together
        return out


def _bar(total: int | None, enabled: bool | None):
    if enabled is False:
        return None
    from tqdm.auto import tqdm

    # disable=None: shown only on a terminal, like the pipeline's own bar
    return tqdm(total=total, desc="distill", unit="step", leave=False, mininterval=0.5,
                disable=None if enabled is None else False)


# -- the pass --------------------------------------------------------------------------------

#: Recovery is judged on the task against the original model, not on raw output error.
RECOVERY = Tolerance(min_top1=0.95, min_accuracy_ratio=0.99, against="reference")


class Distill(Pass):
    """Insert distillation taps; with ``epochs > 0``, also fine-tune against the original model.

    ``distill{taps=[layers.*]}`` only inserts taps and is held to exactness (rel. L2 ≤ 1e-6).
    ``distill{epochs=5,lr=1e-3}`` is a recovery step: it distils the caller's model into the
    compressed graph on ``train_data`` and is verified against the original model on task
    metrics (top-1 agreement ≥ 0.95, accuracy ratio on labelled batches ≥ 0.99).
    """

    name = "distill"
    summary = ("Insert identity taps for feature distillation; with epochs>0, recover accuracy by "
               "distilling the original model into the compressed graph (KD + CE + tap MSE).")
    tolerance = RECOVERY
    runtime_modules = (Tap,)

    taps = option([], "globs over module paths or node names to tap (default: each top-level block)")
    epochs = option(0, "training epochs over train_data; 0 only inserts taps", low=0)
    lr = option(1e-3, "learning rate", low=0.0, low_open=True)
    temperature = option(4.0, "softmax temperature T of the KL term (scaled by T²)", low=0.0,
                         low_open=True)
    alpha = option(0.5, "weight of the KL term; 1-alpha weighs cross-entropy on labels", low=0.0,
                   high=1.0)
    beta = option(0.0, "weight of the MSE between the graph's taps and the original's", low=0.0)
    output_loss = option("kl", "'kl' on softened logits, or 'mse' on raw outputs (embeddings)",
                         choices=("kl", "mse"))
    optimizer = option("adam", "optimizer", choices=("adam", "sgd"))
    schedule = option("cosine", "learning-rate schedule", choices=("cosine", "constant"))
    weight_decay = option(0.0, "weight decay", low=0.0)

    def check_options(self) -> None:
        training = ("lr", "temperature", "alpha", "beta", "output_loss", "optimizer", "schedule",
                    "weight_decay")
        if self.epochs == 0:
            given = [k for k in training if k in self._given]
            if given:
                raise OptionError(self.name, given[0], "only applies when training; add epochs=N")
            self.tol = EXACT.merged(self._tol_given, self.name)
        # what the pipeline reads depends on the mode: an instance overrides the class
        self.recovers = self.epochs > 0
        self.needs = ("train_data",) if self.epochs > 0 else ()
        self.replaces_tensors = self.epochs == 0  # training writes weights in place

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        before = len(tap_modules(gm))
        names: list[str] = []
        if self.taps or self.epochs == 0 or self.beta > 0:
            names = insert_taps(gm, self.taps or None, pass_name=self.name)
        added = len(tap_modules(gm)) - before
        stats: dict[str, Any] = {"taps": names, "inserted": added}
        if self.epochs == 0:
            return PassResult(gm, changed=added > 0, stats=stats)

        data = ctx.require(self.name, "train_data")
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
        distiller = Distiller(teacher, gm, pairs=pairs, temperature=self.temperature,
                              alpha=self.alpha, beta=self.beta, output_loss=self.output_loss,
                              inputs=len(ctx.example_inputs))
        history = distiller.fit(data, self.epochs, self.lr, optimizer=self.optimizer,
                                weight_decay=self.weight_decay, schedule=self.schedule, seed=ctx.seed,
                                progress=ctx.progress)
        stats.update(history.as_dict())
        return PassResult(distiller.student, changed=True, stats=stats)


__all__ = ["Tap", "tap_modules", "collect", "tap_points", "default_tap_names", "insert_taps",
           "Distiller", "History", "FeatureProjection", "Distill", "RECOVERY"]
