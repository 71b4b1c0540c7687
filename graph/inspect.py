"""See what a pipeline did: a networkx view of a graph, diffs, exports and per-layer tables.

>>> g = to_networkx(gm)                                  # doctest: +SKIP
>>> g.nodes["layers_0"]["nonzeros"], g.graph["passes"]   # doctest: +SKIP
(1920, ['prune{sparsity=0.9}'])
>>> print(diff(before, after))                           # doctest: +SKIP
>>> write_graphml(g, "model.graphml"); write_dot(g, "model.dot")   # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.fx

from fxpress.graph.artifact import artifact_header
from fxpress.graph.capture import node_shape
from fxpress.graph.memory import nonzeros, stored_bytes, tensor_memo
from fxpress.graph.runtime import CompressedModule, RuntimeModule
from fxpress.graph.weights import weighted_ops

#: node attributes compared by :func:`diff` (the digest catches values changed in place)
COMPARED = ("op", "target", "module_type", "shape", "dtype", "params", "nonzeros",
            "stored_bytes", "bits", "digest")


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t._schema.name.split('::')[-1]}.{t._overloadname}"
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)
    return f"{mod}.{name}" if mod and not mod.startswith("torch._C") else f"torch.{name}"


def _tensors_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[list[torch.Tensor], Any]:
    """Tensors a node owns (a module's state, a get_attr's tensor) and its module, if any."""
    if node.op == "call_module":
        try:
            m = gm.get_submodule(str(node.target))
        except AttributeError:
            return [], None
        return [t for t in m.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)], m
    if node.op == "get_attr":
        owner, _, attr = str(node.target).rpartition(".")
        try:
            obj = getattr(gm.get_submodule(owner) if owner else gm, attr)
        except AttributeError:
            return [], None
        if isinstance(obj, torch.Tensor):
            return [obj], None
        if isinstance(obj, torch.nn.Module):
            return [t for t in obj.state_dict(keep_vars=True).values()], obj
    return [], None


def _digest(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(_tensor_digest(t))
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> bytes:
    """A hash of one tensor's shape, dtype and values (remembered while it lives unwritten).
    A view's is its base's and its geometry, so a weight read both whole and transposed
    (GPT-2's Conv1D) is hashed once."""
    if t._base is not None:
        geometry = (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        return hashlib.blake2b(_tensor_digest(t._base) + str(geometry).encode(), digest_size=8).digest()
    return tensor_memo(t, "digest", _hash_values)


def _hash_values(t: torch.Tensor) -> bytes:
    h = hashlib.blake2b(digest_size=8)
    h.update(str((tuple(t.shape), t.dtype)).encode())
    t = t.detach().cpu()
    if t.numel():
        if t.dim() == 0 or t.is_contiguous():
            parts = (t,)
        else:  # a transposed tensor: row-major bytes a block of rows at a time, no copy
            parts = t.split(max(1, (1 << 20) // max(t[0].numel(), 1)))
        for part in parts:
            h.update(part.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.digest()


def _weight_stats(m: Any, tensors: list[torch.Tensor]) -> tuple[int, int, float]:
    """(weights, non-zeros, stored bits per weight) of a node's module or tensors."""
    if isinstance(m, CompressedModule):
        n, nz = m.count_weights()
        return n, nz, m.weight_bits() / max(n, 1)
    if m is not None and isinstance(getattr(m, "weight", None), torch.Tensor):
        w = m.weight
        return w.numel(), nonzeros(w), float(w.element_size() * 8)
    n = sum(t.numel() for t in tensors)
    nz = sum(nonzeros(t) for t in tensors)
    bits = float(tensors[0].element_size() * 8) if tensors else 0.0
    return n, nz, bits


def to_networkx(gm: torch.fx.GraphModule, *, digests: bool = True):
    """The graph as a ``networkx.MultiDiGraph`` keyed by node name.

    Node attributes: op, target, module_type, shape, dtype, params, nonzeros, stored_bytes,
    bits (stored bits per weight), pass (the pass that created or last changed the node)
    and digest (a hash of the node's tensors). Edges run producer -> user, keyed by the
    argument position (``args[0]``, ``kwargs.weight``, ``args[1][2]``). Graph attributes:
    the pass history, the capture method.

    >>> g = to_networkx(torch.fx.symbolic_trace(torch.nn.Linear(3, 2)))
    >>> g.nodes["linear"]["params"], sorted(k for _, _, k in g.in_edges("linear", keys=True))
    (6, ['args[0]', 'args[1]', 'args[2]'])
    """
    import networkx as nx

    g = nx.MultiDiGraph()
    meta = gm.meta.get("fxpress", {}) if hasattr(gm, "meta") else {}
    g.graph["passes"] = list(meta.get("passes", []))
    g.graph["capture"] = meta.get("method")
    g.graph["name"] = type(gm).__name__
    w_by_node = {op.node.name: op for op in weighted_ops(gm)}
    for node in gm.graph.nodes:
        shape, dtype = node_shape(node)
        tensors, module = _tensors_of(gm, node)
        attrs: dict[str, Any] = {
            "op": node.op, "target": _target_name(node),
            "module_type": type(module).__name__ if module is not None else "",
            "shape": list(shape) if shape is not None else None,
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
            "pass": node.meta.get("fxpress_pass", ""),
        }
        op = w_by_node.get(node.name)
        if op is not None and not tensors:  # a functional/aten weighted op: its weight's stats
            w = op.weight()
            tensors = [w] + ([op.bias()] if op.bias() is not None else [])
            module = None
            attrs["module_type"] = f"{op.kind} ({op.form})"
        if tensors or module is not None:
            # a functional op counts its weight, as a module's row does; bytes include the bias
            counted = tensors[:1] if op is not None and module is None else tensors
            n, nz, bits = _weight_stats(module, [t for t in counted if t is not None])
            attrs.update(params=n, nonzeros=nz, bits=round(bits, 3),
                         stored_bytes=stored_bytes(module) if module is not None else
                         sum(t.numel() * t.element_size() for t in tensors if t is not None))
            if digests:
                attrs["digest"] = _digest(t for t in tensors if t is not None)
        else:
            attrs.update(params=0, nonzeros=0, bits=0.0, stored_bytes=0)
        g.add_node(node.name, **attrs)
    for node in gm.graph.nodes:
        for pos, src in _inputs(node):
            g.add_edge(src.name, node.name, key=pos, position=pos)
    return g


def _inputs(node: torch.fx.Node) -> list[tuple[str, torch.fx.Node]]:
    out: list[tuple[str, torch.fx.Node]] = []

    def walk(v: Any, path: str) -> None:
        if isinstance(v, torch.fx.Node):
            out.append((path, v))
        elif isinstance(v, (tuple, list)):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]")
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{path}.{k}")
        elif isinstance(v, slice):
            for k in ("start", "stop", "step"):
                walk(getattr(v, k), f"{path}.{k}")

    for i, a in enumerate(node.args):
        walk(a, f"args[{i}]")
    for k, a in node.kwargs.items():
        walk(a, f"kwargs.{k}")
    return out


@dataclass
class GraphDiff:
    """What changed between two graphs (nodes matched by name)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)
    rewired: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    passes: tuple[list[str], list[str]] = ([], [])

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.rewired)

    def touched(self) -> set[str]:
        """Nodes of the second graph that are new, changed or rewired."""
        return set(self.added) | set(self.changed) | set(self.rewired)

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "removed": self.removed,
                "changed": {n: {k: list(v) for k, v in c.items()} for n, c in self.changed.items()},
                "rewired": {n: {"before": a, "after": b} for n, (a, b) in self.rewired.items()},
                "passes": {"before": self.passes[0], "after": self.passes[1]}}

    def __str__(self) -> str:
        lines = [f"{len(self.added)} added, {len(self.removed)} removed, {len(self.changed)} "
                 f"changed, {len(self.rewired)} rewired"]
        if self.passes[0] != self.passes[1]:
            lines.append(f"passes: {self.passes[0]} -> {self.passes[1]}")
        lines += [f"+ {n}" for n in self.added]
        lines += [f"- {n}" for n in self.removed]
        for n, c in self.changed.items():
            what = ", ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in c.items()
                             if k != "digest") or "tensor values"
            lines.append(f"~ {n}: {what}")
        for n, (a, b) in self.rewired.items():
            lines.append(f"> {n}: inputs {a} -> {b}")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def diff(before, after) -> GraphDiff:
    """Added, removed and changed nodes (attribute by attribute) and rewired edges.

    ``before``/``after``: GraphModules or graphs from :func:`to_networkx`.

    >>> d = diff(captured, res.module)                        # doctest: +SKIP
    >>> d.changed["layers_0"]["nonzeros"]                      # doctest: +SKIP
    (19200, 1920)
    """
    a = before if not isinstance(before, torch.nn.Module) else to_networkx(before)
    b = after if not isinstance(after, torch.nn.Module) else to_networkx(after)
    d = GraphDiff(passes=(list(a.graph.get("passes", [])), list(b.graph.get("passes", []))))
    d.added = [n for n in b.nodes if n not in a.nodes]
    d.removed = [n for n in a.nodes if n not in b.nodes]
    for n in b.nodes:
        if n not in a.nodes:
            continue
        na, nb = a.nodes[n], b.nodes[n]
        # a shape unknown on one side (a graph never run) is not a change
        c = {k: (na.get(k), nb.get(k)) for k in COMPARED if na.get(k) != nb.get(k)
             and not (k in ("shape", "dtype") and (na.get(k) is None or nb.get(k) is None))}
        if c:
            d.changed[n] = c
        ia = sorted(f"{k}<-{u}" for u, _, k in a.in_edges(n, keys=True))
        ib = sorted(f"{k}<-{u}" for u, _, k in b.in_edges(n, keys=True))
        if ia != ib:
            d.rewired[n] = (ia, ib)
    return d


def stamp_changes(before, after: torch.fx.GraphModule, pass_name: str) -> int:
    """Mark every node ``pass_name`` created, changed or rewired (``node.meta["fxpress_pass"]``);
    return how many. ``before``: a GraphModule or its :func:`to_networkx` graph. The
    pipeline calls it after each kept pass."""
    touched = diff(before, after).touched()
    for node in after.graph.nodes:
        if node.name in touched:
            node.meta["fxpress_pass"] = pass_name
    return len(touched)


# -- exports ------------------------------------------------------------------------------------

def to_node_link(g) -> dict:
    """node-link JSON data (``networkx.node_link_data``), JSON-safe."""
    import networkx as nx

    data = nx.node_link_data(g, edges="edges")
    return json.loads(json.dumps(data, default=str))


def _write(path: str | Path, data: bytes) -> None:
    """Every file inspect writes goes through the artifact's atomic write: a symbolic link
    is replaced, never written through, and a FIFO or device is refused (writing the
    node-link JSON to a FIFO had blocked forever)."""
    from fxpress.graph.artifact.files import write_atomic

    write_atomic(path, data)


def write_node_link(g, path: str | Path) -> None:
    _write(path, json.dumps(to_node_link(g), indent=1).encode())


def _scalar(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, default=str)


def graphml_ready(g):
    """A copy whose attributes are all scalars (GraphML, Gephi and yEd take nothing else)."""
    h = g.copy()
    h.graph.clear()
    h.graph.update({k: _scalar(v) for k, v in g.graph.items()})
    for _, d in h.nodes(data=True):
        for k in list(d):
            d[k] = _scalar(d[k])
    for _, _, d in h.edges(data=True):
        for k in list(d):
            d[k] = _scalar(d[k])
    return h


def write_graphml(g, path: str | Path) -> None:
    import networkx as nx

    buf = io.BytesIO()
    nx.write_graphml(graphml_ready(g), buf)
    _write(path, buf.getvalue())


_PASS_COLORS = ("#fde68a", "#bfdbfe", "#bbf7d0", "#fecaca", "#ddd6fe", "#fed7aa")


def pass_colors(g) -> dict[str, str]:
    names = []
    for _, d in g.nodes(data=True):
        if d.get("pass") and d["pass"] not in names:
            names.append(d["pass"])
    return {n: _PASS_COLORS[i % len(_PASS_COLORS)] for i, n in enumerate(names)}


def to_dot(g) -> str:
    """Graphviz DOT text; nodes a pass touched are filled with that pass's colour."""
    colors = pass_colors(g)

    def q(s: Any) -> str:
        return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {q(g.graph.get('name', 'graph'))} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=Helvetica, '
             'fontsize=10];']
    for n, d in g.nodes(data=True):
        parts = [n] if d["op"] in ("placeholder", "output") else [n, d["target"]]
        if d.get("params"):
            parts.append(f"{d['params']:,} w, {d['nonzeros'] / max(d['params'], 1):.0%} nz, "
                         f"{d['bits']:g} bit")
        if d.get("pass"):
            parts.append(f"[{d['pass']}]")
        label = "\\n".join(p.replace("\\", "/").replace('"', "'") for p in parts)  # DOT's \n
        fill = colors.get(d.get("pass"), "#f3f4f6" if d["op"] in ("placeholder", "output", "get_attr")
                          else "white")
        lines.append(f'  {q(n)} [label="{label}", fillcolor={q(fill)}];')
    for u, v, k in g.edges(keys=True):
        extra = "" if k == "args[0]" else f" [label={q(k)}, fontsize=8]"
        lines.append(f"  {q(u)} -> {q(v)}{extra};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(g, path: str | Path) -> None:
    _write(path, to_dot(g).encode())


# -- per-layer tables ---------------------------------------------------------------------------

@dataclass
class Layer:
    """One row of ``fxpress inspect``: a module (or parameter owner) and its tensors."""

    name: str
    type: str
    params: int
    nonzeros: int
    bits: float          # stored bits per weight in memory (packed codes count their real width)
    mem_bytes: int       # state_dict bytes
    disk_bytes: int      # bytes in the artifact (after sparse encoding / entropy coding)
    tensors: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "params": self.params,
                "nonzeros": self.nonzeros, "sparsity": self.sparsity, "bits": self.bits,
                "mem_bytes": self.mem_bytes, "disk_bytes": self.disk_bytes}


def layers(gm: torch.fx.GraphModule, header: dict | None = None) -> list[Layer]:
    """Rows per tensor owner: every module holding tensors directly, and each runtime module.

    ``header`` (from :func:`fxpress.graph.artifact.read_header`, or of the bytes ``save``
    would write) supplies the bytes on disk; without it they are counted (nothing is written).
    """
    if header is None:
        header = artifact_header(gm)
    disk = {k: e["stored_bytes"] for k, e in header.get("tensors", {}).items()}
    refs: dict[str, str] = {}
    for m in header.get("modules", []):
        for t, r in m.get("tensors", {}).items():
            if r.get("ref"):
                refs[f"{m['path']}.{t}" if m["path"] else t] = r["ref"]
    rows: list[Layer] = []
    counted: set[str] = set()

    def visit(prefix: str, m: torch.nn.Module) -> None:
        if isinstance(m, RuntimeModule) and not m._modules:  # a FusedCall: a row per child
            sd = {f"{prefix}.{k}" if prefix else k: v for k, v in m.state_dict(keep_vars=True).items()
                  if isinstance(v, torch.Tensor)}
            n, nz, bits = _weight_stats(m, list(sd.values()))
            rows.append(_row(prefix, type(m).__name__, n, nz, bits, stored_bytes(m), sd))
            return
        own = {}
        for k, v in list(m._parameters.items()) + list(m._buffers.items()):
            if isinstance(v, torch.Tensor):
                own[f"{prefix}.{k}" if prefix else k] = v
        if own:
            n, nz, bits = _weight_stats(m if isinstance(getattr(m, "weight", None), torch.Tensor)
                                        else None, [v for v in own.values() if v.is_floating_point()]
                                        or list(own.values()))
            mem = sum(v.numel() * v.element_size() for v in own.values())
            kind = type(m).__name__ if type(m) is not torch.nn.Module else "params"
            rows.append(_row(prefix or "(root)", kind, n, nz, bits, mem, own))
        for k, c in m._modules.items():
            if c is not None:
                visit(f"{prefix}.{k}" if prefix else k, c)

    def _row(name, kind, n, nz, bits, mem, tensors) -> Layer:
        keys = [refs.get(k, k) for k in tensors]
        d = sum(disk.get(k, 0) for k in keys if k not in counted)
        counted.update(keys)
        return Layer(name, kind, n, nz, bits, mem, d, list(tensors))

    visit("", gm)
    return rows


def histograms(gm: torch.fx.GraphModule, bins: int = 120) -> dict[str, dict]:
    """Weight histograms per layer (exact zeros counted apart, so codebooks show as spikes)."""
    return {name: _histogram(w, bins) for name, w in _layer_weights(gm)}


def _histogram(w: torch.Tensor, bins: int, step: int = 1 << 20) -> dict:
    """One layer's histogram, a block of weights at a time (a whole embedding table's
    float copy and non-zero copy would weigh more than the table)."""
    flat = w.detach().reshape(-1)
    lo, hi, nnz, bad = math.inf, -math.inf, 0, 0
    for block in flat.split(step):
        block = block.float()
        finite = torch.isfinite(block)
        bad += int(block.numel() - finite.sum())
        nz = block[(block != 0) & finite]
        if nz.numel():
            lo, hi, nnz = min(lo, float(nz.min())), max(hi, float(nz.max())), nnz + nz.numel()
    if not nnz:
        lo = hi = 0.0
    if hi <= lo:
        hi = lo + 1e-12
    counts = torch.zeros(bins, dtype=torch.int64)
    if nnz:
        for block in flat.split(step):
            block = block.float()
            counts += torch.histc(block[(block != 0) & torch.isfinite(block)], bins=bins,
                                  min=lo, max=hi).long()
    # NaN/Inf weights are counted apart (a histogram has no bin for them)
    return {"lo": lo, "hi": hi, "counts": [int(c) for c in counts.tolist()],
            "zeros": int(flat.numel() - nnz - bad), "nonfinite": bad, "numel": int(flat.numel()),
            "distinct": _distinct(flat) if nnz else 0}


#: Layers with more distinct non-zero values than this report ``distinct: None``.
DISTINCT_MAX = 4096


def _distinct(flat: torch.Tensor, step: int = 1 << 16) -> int | None:
    """How many distinct non-zero values ``flat`` holds, or None past :data:`DISTINCT_MAX`
    (a float layer): blocks are merged into the running set of values, so a layer of a
    few codebook values is counted exactly and a float layer stops at its first block
    instead of sorting all its weights."""
    seen = torch.empty(0)
    for block in flat.split(step):
        block = block.float()
        seen = torch.unique(torch.cat([seen, block[block != 0]]))
        if seen.numel() > DISTINCT_MAX:
            return None
    return int(seen.numel())


def _layer_weights(gm: torch.fx.GraphModule) -> Iterator[tuple[str, torch.Tensor]]:
    """(layer, weight) once per layer; runtime modules' weights decoded one at a time."""
    seen: set[str] = set()
    for op in weighted_ops(gm):
        if op.module_name not in seen:
            seen.add(op.module_name)
            yield op.module_name, op.weight()
    for name, m in gm.named_modules():
        if isinstance(m, CompressedModule):
            with torch.no_grad():
                yield name, m.weight_float()


def layer_summary(gm: torch.fx.GraphModule, bins: int = 120) -> dict[str, Any]:
    """Per-layer rows and histograms as JSON-able data (what artifacts embed as a baseline)."""
    header = artifact_header(gm)
    return {"layers": [r.as_dict() for r in layers(gm, header)], "histograms": histograms(gm, bins),
            "file_bytes": header["file_bytes"]}


def format_bits(bits: float) -> str:
    """Stored bits per weight for a table: three significant digits ("10.5", "8.5", "32");
    the full value ("10.4615") read as more precision than the figure has."""
    return f"{bits:.3g}"


def format_layers(rows: list[Layer], file_bytes: int | None = None) -> str:
    """The ``fxpress inspect`` table."""
    total = file_bytes or sum(r.disk_bytes for r in rows) or 1
    head = ["layer", "type", "params", "sparsity", "bits", "memory", "on disk", "share"]
    body = [[r.name, r.type, f"{r.params:,}", f"{r.sparsity:.1%}", format_bits(r.bits),
             human_bytes(r.mem_bytes), human_bytes(r.disk_bytes), f"{r.disk_bytes / total:.1%}"]
            for r in rows]
    params = sum(r.params for r in rows)
    nz = sum(r.nonzeros for r in rows)
    if file_bytes:
        rest = file_bytes - sum(r.disk_bytes for r in rows)
        body.append(["(header: graph, modules, tensor table)", "", "", "", "", "",
                     human_bytes(rest), f"{rest / total:.1%}"])
    body.append(["total", "", f"{params:,}", f"{1 - nz / max(params, 1):.1%}", "",
                 human_bytes(sum(r.mem_bytes for r in rows)), human_bytes(total), ""])
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


__all__ = ["to_networkx", "diff", "GraphDiff", "stamp_changes", "to_node_link", "write_node_link",
           "graphml_ready", "write_graphml", "to_dot", "write_dot", "layers", "Layer",
           "histograms", "layer_summary", "format_layers", "human_bytes"]
