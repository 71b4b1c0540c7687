"""Every weighted op of a graph — linear, conv, embedding — behind one interface.

A weighted op appears in three forms, depending on how the model was captured:

* ``call_module`` on ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
  ``nn.Embedding`` (and transformers' ``Conv1D``, a linear stored transposed), from
  ``torch.fx.symbolic_trace``; a module called more than once is one op (``op.calls``);
* ``call_function`` on ``F.linear``, ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d``,
  ``F.embedding`` with a ``get_attr`` weight, from symbolic tracing of functional code;
* ATen ops from ``torch.export`` (``aten.linear``, ``aten.addmm`` with a parameter,
  ``aten.conv1d/2d/3d``, ``aten.conv_transpose*``, ``aten.convolution``, ``aten.embedding``).

:func:`weighted_ops` yields a :class:`WeightedOp` for each, with one way to read the weight
(always ``[out, in, *kernel]``, or ``[num, dim]`` for embeddings; a transposed conv's
``[in, out/groups, *k]`` is presented output-channel first), to replace it
(:meth:`WeightedOp.set_weight`) and to swap the op for a runtime module
(:meth:`WeightedOp.replace_with`). Passes never pattern-match ``nn.Linear`` themselves.
Weights that a fused module or op reads inside one call (LSTM/GRU gates,
``nn.MultiheadAttention``) are :func:`fused_weights`: rewritten in place, or stored compressed
and decoded for the fused call (:mod:`fxpress.graph.fused`).

Tensors are replaced, never written in place: graphs inside a pipeline share tensors
with the graph before them (see ``clone_structure``). The modules a pass writes into a
graph are in :mod:`fxpress.graph.runtime`; sizes, memos and heap trimming in
:mod:`fxpress.graph.memory`.
"""
from __future__ import annotations

import fnmatch
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx
import torch.nn.functional as F

from fxpress.graph.memory import trim_heap

LINEAR, CONV, EMBEDDING = "linear", "conv", "embedding"
KINDS = (LINEAR, CONV, EMBEDDING)

_aten = torch.ops.aten

# target -> (kind, argument names in order, conv dims)
_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...], int]] = {
    F.linear: (LINEAR, ("input", "weight", "bias"), 0),
    _aten.linear.default: (LINEAR, ("input", "weight", "bias"), 0),
    _aten.addmm.default: ("addmm", ("bias", "input", "weight", "beta", "alpha"), 0),
    torch.addmm: ("addmm", ("bias", "input", "weight", "beta", "alpha"), 0),
    F.embedding: (EMBEDDING, ("input", "weight", "padding_idx", "max_norm", "norm_type",
                              "scale_grad_by_freq", "sparse"), 0),
    _aten.embedding.default: (EMBEDDING, ("weight", "input", "padding_idx", "scale_grad_by_freq",
                                          "sparse"), 0),
    _aten.convolution.default: (CONV, ("input", "weight", "bias", "stride", "padding", "dilation",
                                       "transposed", "output_padding", "groups"), -1),
}
# ``x @ W`` with a 2-D parameter ``W`` stored [in, out] (a hand-written layer using an
# nn.Parameter as a raw matmul operand): a linear of the transposed weight, as addmm's
for _t in (operator.matmul, torch.matmul, _aten.matmul.default, _aten.mm.default):
    _FUNCTIONS[_t] = ("matmul", ("input", "weight"), 0)
#: transposed convolutions (``ConvTransposeNd``): their own argument order
_TRANSPOSED_CONV: set[Any] = set()
for _n in (1, 2, 3):
    _conv_args = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    _FUNCTIONS[getattr(F, f"conv{_n}d")] = (CONV, _conv_args, _n)
    # .padding: string padding ("same"/"valid"), as export records Conv2d(padding="same")
    for _o in ("default", "padding"):
        _FUNCTIONS[getattr(getattr(_aten, f"conv{_n}d"), _o)] = (CONV, _conv_args, _n)
    _convt_args = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                   "dilation")
    _packet = getattr(_aten, f"conv_transpose{_n}d")
    for _t in (getattr(F, f"conv_transpose{_n}d"), *(getattr(_packet, o) for o in _packet.overloads())):
        _FUNCTIONS[_t] = (CONV, _convt_args, _n)
        _TRANSPOSED_CONV.add(_t)


def transposed_conv_layout(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A transposed conv's stored weight ``[in, out/groups, *k]`` as ``[out, in/groups, *k]``,
    the layout of every other conv (output channels first: per-channel scales and rows
    follow the real output channels). A new contiguous tensor.

    >>> transposed_conv_layout(torch.zeros(4, 3, 2, 2), groups=2).shape
    torch.Size([6, 2, 2, 2])
    """
    i, og, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
    return (w.reshape(groups, i // groups, og, *k).transpose(1, 2)
            .reshape(groups * og, i // groups, *k).contiguous())


def stored_conv_transpose_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`transposed_conv_layout`: ``[out, in/g, *k]`` back to
    ``[in, out/g, *k]`` as ``F.conv_transpose*d`` takes it."""
    o, ig, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
    return (w.reshape(groups, o // groups, ig, *k).transpose(1, 2)
            .reshape(groups * ig, o // groups, *k).contiguous())


def _is_hf_conv1d(m: torch.nn.Module) -> bool:
    # transformers' GPT-2 "Conv1D" is a linear layer whose weight is stored [in, out].
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(
        getattr(m, "weight", None), torch.Tensor)


def _module_kind(m: torch.nn.Module) -> tuple[str, int, bool] | None:
    if isinstance(m, torch.nn.Linear):
        return LINEAR, 0, False
    if isinstance(m, torch.nn.Embedding):
        return EMBEDDING, 0, False
    for n, cls in ((1, torch.nn.Conv1d), (2, torch.nn.Conv2d), (3, torch.nn.Conv3d),
                   (1, torch.nn.ConvTranspose1d), (2, torch.nn.ConvTranspose2d),
                   (3, torch.nn.ConvTranspose3d)):
        if type(m) is cls or (isinstance(m, cls) and type(m).forward is cls.forward):
            return CONV, n, False
    if _is_hf_conv1d(m):
        return LINEAR, 0, True
    return None


def _resolve(root: torch.nn.Module, qualname: str) -> tuple[torch.nn.Module, str]:
    owner_name, _, attr = qualname.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    return owner, attr


def _assign(owner: torch.nn.Module, attr: str, value: torch.Tensor | None) -> torch.Tensor | None:
    """Replace ``owner.attr`` by a new tensor, keeping its kind (parameter or buffer).

    Returns the object stored, so tied names can be given the very same object.
    """
    old = getattr(owner, attr, None)
    if value is None:
        setattr(owner, attr, None)
        return None
    if attr in owner._parameters or isinstance(old, torch.nn.Parameter):
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(
                value.detach(), requires_grad=bool(old.requires_grad) if old is not None else False)
        owner._parameters[attr] = value
    elif attr in owner._buffers:
        owner._buffers[attr] = value.detach()
    else:
        setattr(owner, attr, value.detach())
    return value


@dataclass
class WeightedOp:
    """One linear, conv or embedding op of a graph.

    ``name`` is the qualified name of its weight (e.g. ``"encoder.layer.0.output.dense.weight"``;
    ops that share a tied weight share the name), ``kind`` is "linear", "conv" or
    "embedding", ``form`` is "module", "function" or "aten". ``spec`` holds what a runtime
    module needs to compute the op: conv stride/padding/dilation/groups/padding_mode and
    dims, embedding padding_idx.
    """

    gm: torch.fx.GraphModule
    node: torch.fx.Node
    kind: str
    form: str
    name: str
    spec: dict = field(default_factory=dict)
    transposed: bool = False
    _bias_name: str | None = None
    _input: Any = None
    _weight_node: torch.fx.Node | None = None
    _bias_node: torch.fx.Node | None = None
    #: every qualified name bound to the same weight tensor (tied weights), own name first
    tied: tuple[str, ...] = ()
    #: further call_module nodes of the same module (a module called more than once is one
    #: op: replacing it replaces every call)
    calls: list = field(default_factory=list)

    # -- reading -----------------------------------------------------------------------
    @property
    def module_name(self) -> str:
        """Name of the layer: the weight's name without its trailing ``.weight``."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    def weight(self) -> torch.Tensor:
        """The weight as ``[out, in, *kernel]`` (linear/conv) or ``[num, dim]`` (embedding)."""
        owner, attr = _resolve(self.gm, self.name)
        w = getattr(owner, attr)
        if self.spec.get("transposed"):  # ConvTranspose: stored [in, out/groups, *k]
            return transposed_conv_layout(w, self.spec["groups"])
        return w.t() if self.transposed else w

    def bias(self) -> torch.Tensor | None:
        if self._bias_name is None:
            return None
        owner, attr = _resolve(self.gm, self._bias_name)
        return getattr(owner, attr)

    @property
    def numel(self) -> int:
        return self.weight().numel()

    def current_input(self, node: torch.fx.Node | None = None) -> Any:
        """The op's input as the graph has it now. ``_input`` is the node it had when the
        ops were listed (passes key calibration data by it); once an upstream weighted op
        is replaced, that node is erased and the graph feeds this op from its replacement."""
        node = self.node if node is None else node
        if self.form == "module":
            return node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        return _bind(_FUNCTIONS[node.target][1], node).get("input")

    @property
    def key(self) -> str:
        """One name per weight tensor: the same for every op of a tied weight (and for the
        calls of a module called more than once). Passes key what they build by it."""
        return min(self.tied or (self.name,))

    # -- writing -----------------------------------------------------------------------
    def set_weight(self, w: torch.Tensor) -> None:
        """Replace the weight with ``w`` (same layout as :meth:`weight` returns).

        The old tensor is left untouched (other graphs may share it).
        """
        old = self.weight()
        trim_heap(old.numel() * old.element_size())  # the temporaries that computed ``w``
        if tuple(w.shape) != tuple(old.shape):
            raise ValueError(f"{self.name}: new weight shape {tuple(w.shape)} != {tuple(old.shape)}")
        value: torch.Tensor | None = w.t().contiguous() if self.transposed else w
        if self.spec.get("transposed"):
            value = stored_conv_transpose_weight(w, self.spec["groups"])
        for name in self.tied or (self.name,):  # tied weights stay tied
            owner, attr = _resolve(self.gm, name)
            value = _assign(owner, attr, value)

    def set_bias(self, b: torch.Tensor | None) -> None:
        if self._bias_name is None:
            raise ValueError(f"{self.name}: the op has no bias to replace")
        owner, attr = _resolve(self.gm, self._bias_name)
        _assign(owner, attr, b)

    def replace_with(self, module: torch.nn.Module) -> str:
        """Swap this op for ``module`` (called with the op's input) and return its qualname.

        The module must compute the op: ``module(x)`` for linear/conv, ``module(indices)``
        for embeddings. Weight and bias tensors that no other node uses are dropped from
        the graph, so its state_dict holds only what the module stores.
        """
        owner, attr = _resolve(self.gm, self.name)  # the temporaries that built ``module``
        w = getattr(owner, attr)
        trim_heap(w.numel() * w.element_size())
        del owner, w
        gm, node, graph = self.gm, self.node, self.gm.graph
        # a lookup's output has the table's dtype; a runtime module decodes float32, so the
        # rows of a float64 table (``model.double()``) are cast back to what the model gave
        # (linear and conv compute in their input's dtype: ``op_forward``)
        cast = None
        if self.kind == EMBEDDING:
            dtype = self.weight().dtype
            cast = dtype if dtype.is_floating_point and dtype != torch.float32 else None
        if self.form == "module":
            qualname = str(node.target)
            _set_submodule(gm, qualname, module)
            for call in (node, *self.calls):  # a module called twice: every call site
                call.args, call.kwargs = (self.current_input(call),), {}
                if cast is not None:
                    _cast_after(graph, call, cast)
            return qualname
        tmp = _free_name(gm, "_fxpress_new_module")
        _set_submodule(gm, tmp, module)
        with graph.inserting_before(node):
            new = graph.call_module(tmp, (self.current_input(),))
        new.meta = dict(node.meta)
        new.meta.pop("nn_module_stack", None)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if cast is not None:
            _cast_after(graph, new, cast)
        for attr_node in (self._weight_node, self._bias_node):
            if attr_node is not None and attr_node.op == "get_attr" and not attr_node.users:
                target = str(attr_node.target)
                graph.erase_node(attr_node)
                # a tied weight may live under several names (export keeps GPT-2's token
                # embedding as both wte.weight and lm_head.weight): drop every alias that
                # no node reads any more, or the float weight would stay in the state_dict
                names = self.tied if attr_node is self._weight_node and self.tied else (target,)
                if any([_attr_used(graph, n) for n in names]):  # a list: erase every dead one
                    continue
                for n in names:
                    owner, attr = _resolve(gm, n)
                    if n != target and type(owner) is not torch.nn.Module:
                        continue  # an alias held by a real module (called elsewhere) stays
                    owner._parameters.pop(attr, None)
                    owner._buffers.pop(attr, None)
                    owner.__dict__.pop(attr, None)
        del gm._modules[tmp]
        qualname = _free_name(gm, self.module_name)
        _set_submodule(gm, qualname, module)
        new.target = qualname
        return qualname


def _cast_after(graph: torch.fx.Graph, node: torch.fx.Node, dtype: torch.dtype) -> None:
    """Make every user of ``node`` read it cast to ``dtype``."""
    with graph.inserting_after(node):
        cast = graph.call_method("to", (node, dtype))
    cast.meta = dict(node.meta)
    node.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)


def _attr_used(graph: torch.fx.Graph, target: str) -> bool:
    """Whether a live get_attr node reads ``target``; dead ones (export leaves some) are
    erased so the attribute can go."""
    used = False
    for n in list(graph.nodes):
        if n.op == "get_attr" and n.target == target:
            if n.users:
                used = True
            else:
                graph.erase_node(n)
    return used


def _is_empty_container(m: torch.nn.Module) -> bool:
    return (type(m) is torch.nn.Module and not m._parameters and not m._buffers
            and not m._modules)


def _free_name(gm: torch.fx.GraphModule, qualname: str) -> str:
    """``qualname`` if nothing lives there (or only an emptied container), else a suffixed name."""
    def taken(name: str) -> bool:
        owner, attr = _resolve_parent(gm, name)
        if owner is None:
            return False
        m = owner._modules.get(attr)
        if m is not None:
            return not _is_empty_container(m)
        return hasattr(owner, attr)

    if not taken(qualname):
        return qualname
    return next(f"{qualname}_{i}" for i in itertools.count(1) if not taken(f"{qualname}_{i}"))


def _resolve_parent(gm, qualname):
    owner_name, _, attr = qualname.rpartition(".")
    try:
        owner = gm.get_submodule(owner_name) if owner_name else gm
    except AttributeError:
        return None, attr
    return owner, attr


def _set_submodule(gm: torch.fx.GraphModule, qualname: str, module: torch.nn.Module) -> None:
    owner_name, _, attr = qualname.rpartition(".")
    owner = gm
    for part in owner_name.split(".") if owner_name else ():
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module().train(gm.training))
        owner = getattr(owner, part)
    # a new module is built in training mode; it takes the graph's mode instead, so a
    # saved and reloaded model is in the mode it was saved in, all the way down
    owner._modules[attr] = module.train(gm.training)


def _bind(names: Sequence[str], node: torch.fx.Node) -> dict[str, Any]:
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _op_from_module(gm, node) -> WeightedOp | None:
    try:
        m = gm.get_submodule(str(node.target))
    except AttributeError:
        return None
    kind = _module_kind(m)
    if kind is None:
        return None
    k, dims, transposed = kind
    name = f"{node.target}.weight"
    bias_name = f"{node.target}.bias" if getattr(m, "bias", None) is not None else None
    spec: dict[str, Any] = {}
    if k == CONV:
        spec = {"dims": dims, "stride": tuple(m.stride), "padding": m.padding if isinstance(
            m.padding, str) else tuple(m.padding), "dilation": tuple(m.dilation), "groups": m.groups,
            "padding_mode": m.padding_mode}
        if m.padding_mode != "zeros":
            spec["reversed_padding"] = tuple(m._reversed_padding_repeated_twice)
        if isinstance(m, torch.nn.modules.conv._ConvTransposeNd):
            if m.padding_mode != "zeros" or len(node.args) > 1 or node.kwargs.get("output_size") is not None:
                return None  # output_size picks output_padding at run time
            spec["transposed"] = True
            spec["output_padding"] = tuple(m.output_padding)
    elif k == EMBEDDING:
        spec = {"padding_idx": m.padding_idx}
        if m.max_norm is not None:
            return None  # max_norm renormalises the weight in place on every call
    x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return WeightedOp(gm, node, k, "module", name, spec, transposed, bias_name, x)


def _op_from_function(gm, node) -> WeightedOp | None:
    try:
        entry = _FUNCTIONS.get(node.target)
    except TypeError:  # unhashable target
        return None
    if entry is None:
        return None
    kind, names, dims = entry
    a = _bind(names, node)
    w = a.get("weight")
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
        return None  # a weight computed at run time is an activation, not a parameter
    b = a.get("bias")
    if b is not None and not (isinstance(b, torch.fx.Node) and b.op == "get_attr"):
        return None
    form = "aten" if isinstance(node.target, torch._ops.OpOverload) else "function"
    transposed = False
    spec: dict[str, Any] = {}
    if kind == "addmm":
        if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
            return None
        kind, transposed = LINEAR, True
    if kind == "matmul":  # x @ W: only a 2-D float parameter on the right, an activation left
        x_in, wt = a.get("input"), getattr(*_resolve(gm, str(w.target)))
        if (not isinstance(wt, torch.Tensor) or wt.dim() != 2 or not wt.is_floating_point()
                or not isinstance(x_in, torch.fx.Node) or x_in.op == "get_attr"):
            return None
        kind, transposed = LINEAR, True
    if kind == CONV:
        is_transposed = node.target in _TRANSPOSED_CONV or (dims == -1 and bool(a.get("transposed", False)))
        if not is_transposed and any(int(p) != 0 for p in (a.get("output_padding") or ())):
            return None
        wt = getattr(*_resolve(gm, str(w.target)))
        dims = wt.dim() - 2
        spec = {"dims": dims, "stride": _tuple(a.get("stride", 1), dims),
                "padding": a.get("padding", 0) if isinstance(a.get("padding", 0), str)
                else _tuple(a.get("padding", 0), dims),
                "dilation": _tuple(a.get("dilation", 1), dims), "groups": int(a.get("groups", 1)),
                "padding_mode": "zeros"}
        if is_transposed:
            if isinstance(spec["padding"], str):
                return None
            spec["transposed"] = True
            spec["output_padding"] = _tuple(a.get("output_padding", 0) or 0, dims)
    if kind == EMBEDDING:
        if a.get("max_norm") is not None:
            return None
        pi = a.get("padding_idx", None)
        spec = {"padding_idx": None if pi is None or pi == -1 else int(pi)}
    op = WeightedOp(gm, node, kind, form, str(w.target), spec, transposed,
                    str(b.target) if b is not None else None, a.get("input"), w, b)
    return op


def _tuple(v, n):
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v) if len(v) == n else tuple(int(x) for x in v) * (n // max(len(v), 1))
    return (int(v),) * n


def weighted_ops(gm: torch.fx.GraphModule, kinds: Iterable[str] | None = None, *,
                 fused: bool = False) -> list[WeightedOp]:
    """Every linear, conv and embedding op of ``gm``, in graph order; with ``fused`` (and
    linear among ``kinds``), the matrices of fused calls too (:func:`fused_weights`), in
    the order of their calls.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    >>> [(op.kind, op.name) for op in weighted_ops(gm)]
    [('linear', '0.weight')]
    """
    ops = _plain_ops(gm, kinds)
    if not fused or LINEAR not in (set(kinds) if kinds is not None else set(KINDS)):
        return ops
    from fxpress.graph.fused import fused_weights

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(ops + list(fused_weights(gm)), key=lambda op: order[op.node])  # stable


def _plain_ops(gm: torch.fx.GraphModule, kinds: Iterable[str] | None) -> list[WeightedOp]:
    wanted = set(kinds) if kinds is not None else set(KINDS)
    names: dict[int, list[str]] = {}
    for n, t in list(gm.named_parameters(remove_duplicate=False)) + list(
            gm.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(n)
    ops = []
    modules: dict[str, WeightedOp] = {}
    for node in gm.graph.nodes:
        op = None
        if node.op == "call_module":
            first = modules.get(str(node.target))
            if first is not None:  # the same module again: one op, another call site
                first.calls.append(node)
                continue
            op = _op_from_module(gm, node)
            if op is not None:
                modules[str(node.target)] = op
        elif node.op == "call_function":
            op = _op_from_function(gm, node)
        if op is not None and op.kind in wanted:
            owner, attr = _resolve(gm, op.name)
            group = names.get(id(getattr(owner, attr)), [op.name])
            op.tied = (op.name, *[n for n in group if n != op.name])
            ops.append(op)
    return ops


def uncovered_weights(gm: torch.fx.GraphModule, min_numel: int = 2) -> dict[str, str]:
    """Float tensors of ``gm`` (2-D or more, ``min_numel`` elements or more) that no
    weighted op reads, so no pass compresses them: name -> what reads them. Position
    embeddings added to activations, ``nn.Bilinear``'s 3-D weight, a weight reshaped into
    another shape before its op (capture already turns ``W @ x`` and views that give the
    weight back into weighted ops: :mod:`fxpress.graph.canonical`). Tensors of runtime modules (codebooks, scales) are left out;
    passes report their own skipped ops."""
    from fxpress.graph.runtime import RuntimeModule

    covered = {n for op in weighted_ops(gm, fused=True) for n in (op.tied or (op.name,))}
    inside = [name + "." for name, m in gm.named_modules() if name and isinstance(m, RuntimeModule)]
    readers: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(str(node.target), set()).update(
                str(getattr(u.target, "__name__", u.target)) for u in node.users
                if not str(getattr(u.target, "__name__", u.target)).startswith("_assert"))
        elif node.op == "call_module":
            readers.setdefault(str(node.target) + ".", set()).add(str(node.target))
    out = {}
    for name, t in itertools.chain(gm.named_parameters(), gm.named_buffers()):
        if (t is None or not t.is_floating_point() or t.dim() < 2 or t.numel() < min_numel
                or name in covered or any(name.startswith(p) for p in inside)):
            continue
        owner = name.rpartition(".")[0] + "."
        who = readers.get(name) or ({f"module {owner[:-1]}"} if owner in readers else set())
        out[name] = ("read by " + ", ".join(sorted(who)) if who else "not read by the graph") + (
            "; not a linear, conv or embedding op: kept float")
    return out


def select(ops: Sequence[WeightedOp], include: Sequence[str] = ("*",),
           exclude: Sequence[str] = ()) -> tuple[list[WeightedOp], list[str]]:
    """Filter ops by glob patterns on the weight name or layer name.

    Returns the selected ops and the include patterns that matched nothing (a pass
    reports those, since a typo in a pattern would otherwise silently select nothing).
    """
    def hit(op, pat):
        return fnmatch.fnmatchcase(op.name, pat) or fnmatch.fnmatchcase(op.module_name, pat)

    unmatched = [p for p in include if not any(hit(op, p) for op in ops)]
    chosen = [op for op in ops if any(hit(op, p) for p in include)
              and not any(hit(op, p) for p in exclude)]
    return chosen, unmatched


def unique_weights(ops: Iterable[WeightedOp]) -> list[WeightedOp]:
    """One op per distinct weight tensor (tied weights appear once)."""
    seen, out = set(), []
    for op in ops:
        if op.key not in seen:
            seen.add(op.key)
            out.append(op)
    return out

# names that lived here before graph/runtime.py, graph/memory.py and graph/fused.py were split out
_MOVED = {"RuntimeModule": "runtime", "CompressedModule": "runtime",
          "compressed_modules": "runtime", "op_forward": "runtime", "conv_forward": "runtime",
          "kind_classes": "runtime",
          "trim_heap": "memory", "runtime_caches": "memory", "caches_enabled": "memory",
          "stored_bytes": "memory", "sparsity": "memory", "nonzeros": "memory",
          "tensor_memo": "memory", "fused_weights": "fused", "FusedWeightOp": "fused"}


def __getattr__(name: str) -> Any:
    """Old import paths (``fxpress.graph.weights.CompressedModule``) keep working."""
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings
    warnings.warn(f"fxpress.graph.weights.{name} moved to fxpress.graph.{where}.{name}",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(f"fxpress.graph.{where}"), name)


__all__ = ["WeightedOp", "weighted_ops", "select", "unique_weights", "transposed_conv_layout",
           "stored_conv_transpose_weight", "LINEAR", "CONV", "EMBEDDING", "KINDS"]
