"""One self-contained HTML page about a compressed graph: what each pass did, where the bytes
went, how the weights changed, and the graph itself. Every image is inlined.

>>> html = render_report(gm, header=read_header("model.fxp"), title="model.fxp")  # doctest: +SKIP
>>> Path("report.html").write_text(html)                                          # doctest: +SKIP
"""
from __future__ import annotations

import base64
import html as _html
import io
import shutil
import subprocess
from typing import Any

import torch

from fxpress.graph.inspect import (histograms, human_bytes, layers, pass_colors, to_dot,
                                   to_networkx)

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px 32px;color:#111;max-width:1300px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f4f6} td.l,th.l{text-align:left} .meta{color:#555;font-size:13px}
.figure{margin:8px 0} .figure img,.figure svg{max-width:100%;height:auto;border:1px solid #eee}
.graph{max-height:1400px;overflow:auto;border:1px solid #eee}
.ok{color:#15803d} .bad{color:#b91c1c} .note{color:#555;font-size:12px}
"""


def _esc(v: Any) -> str:
    return _html.escape(str(v))


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(head: list[str], rows: list[list[Any]], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_esc(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _passes_section(report: dict) -> str:
    recs = report.get("records") or []
    if not recs:
        return '<p class="note">No pipeline records in this artifact (save a PipelineResult, ' \
               'or use <code>fxpress run</code> with <code>output</code>, to embed them).</p>'
    orig = report.get("original_disk_bytes") or 0
    rows = []
    for r in recs:
        c = r.get("cumulative") or {}
        status = r.get("status", "")
        cls = "ok" if status == "ok" else "bad"
        rows.append([_esc(r.get("index")), f"<code>{_esc(r.get('spec'))}</code>",
                     f'<span class="{cls}">{_esc(status)}</span>', f"{r.get('seconds', 0):.3f}",
                     f"{r.get('sparsity', 0):.1%}", human_bytes(r.get("bytes_after", 0)),
                     human_bytes(r.get("disk_bytes", 0)) if r.get("disk_bytes") else "-",
                     f"{orig / r['disk_bytes']:.2f}x" if orig and r.get("disk_bytes") else "-",
                     _num(c.get("rel_l2"), ".2e"), _num(c.get("cosine")), _num(c.get("top1")),
                     _esc(r.get("message", ""))])
    head = ["#", "pass", "status", "time s", "sparsity", "memory", "on disk", "smaller than captured",
            "rel L2", "cosine", "top-1", "note"]
    pre = f'<p class="meta">Captured graph: {human_bytes(orig)} as an artifact, ' \
          f'{human_bytes(report.get("original_bytes", 0))} of tensors in memory.</p>' if orig else ""
    return pre + _table(head, rows, left=2)


def _num(v: Any, spec: str = ".4f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _bytes_figure(before: dict[str, int], after: dict[str, int]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in after if after[n] or before.get(n)]
    names = sorted(names, key=lambda n: -(before.get(n, 0) or after[n]))[:40]
    if not names:
        return '<p class="note">No tensors.</p>'
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(names) + 1.2))
    y = range(len(names))
    b = [before.get(n, 0) / 1024 for n in names]
    a = [after.get(n, 0) / 1024 for n in names]
    ax.barh([i + 0.2 for i in y], b, height=0.4, color="#9ca3af", label="before (captured graph)")
    ax.barh([i - 0.2 for i in y], a, height=0.4, color="#2563eb", label="after (this artifact)")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("KiB on disk")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _hist_figure(before: dict[str, dict], after: dict[str, dict], limit: int = 8) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(after, key=lambda n: -after[n]["numel"])[:limit]
    if not names:
        return '<p class="note">No weighted layers.</p>'
    cols = 2
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        for data, color, label in ((before.get(name), "#9ca3af", "before"),
                                   (after[name], "#2563eb", "after")):
            if not data:
                continue
            counts = data["counts"]
            lo, hi = data["lo"], data["hi"]
            width = (hi - lo) / max(len(counts), 1)
            xs = [lo + (i + 0.5) * width for i in range(len(counts))]
            ax.bar(xs, counts, width=width, color=color, alpha=0.55 if label == "before" else 0.85,
                   label=f"{label}: {data['zeros'] / max(data['numel'], 1):.0%} zeros"
                         + (f", {data['distinct']} distinct" if data.get("distinct") is not None
                            and data["distinct"] <= 256 else ""))
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("non-zero weights (log count); exact zeros are counted in the legend", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _graph_figure(g) -> tuple[str, str]:
    """(html, how): Graphviz SVG when ``dot`` is installed, else a matplotlib drawing."""
    dot = shutil.which("dot")
    if dot:
        try:
            svg = subprocess.run([dot, "-Tsvg"], input=to_dot(g).encode(), capture_output=True,
                                 timeout=120, check=True).stdout.decode()
            return svg[svg.find("<svg"):], "Graphviz dot"
        except (subprocess.SubprocessError, OSError):
            pass
    return _graph_matplotlib(g), "networkx + matplotlib (Graphviz not installed)"


def _graph_matplotlib(g) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    simple = nx.DiGraph(g)
    for layer, nodes in enumerate(nx.topological_generations(simple)):
        for n in nodes:
            simple.nodes[n]["layer"] = layer
    # layers run top to bottom: multipartite puts each generation at its own x; turn it
    gens = [list(ns) for ns in nx.topological_generations(simple)]
    pos = {n: (y, -x) for n, (x, y) in nx.multipartite_layout(simple, subset_key="layer").items()}
    depth, width = len(gens), max(len(ns) for ns in gens)
    fig, ax = plt.subplots(figsize=(min(3 + 2.2 * width, 16), min(1.5 + 0.7 * depth, 80)))
    colors = pass_colors(g)
    fill = [colors.get(d.get("pass"), "#e5e7eb" if d["op"] in ("placeholder", "output", "get_attr")
                       else "#ffffff") for _, d in simple.nodes(data=True)]
    big = simple.number_of_nodes() > 120
    nx.draw_networkx_edges(simple, pos, ax=ax, arrows=not big, arrowsize=8, width=0.6,
                           edge_color="#9ca3af")
    nx.draw_networkx_nodes(simple, pos, ax=ax, node_color=fill, edgecolors="#374151",
                           node_size=60 if big else 900, node_shape="s", linewidths=0.6)
    labels = {n: (n if big else f"{n}\n{d['target'].split('.')[-1]}")
              for n, d in simple.nodes(data=True) if not big or d.get("params")}
    nx.draw_networkx_labels(simple, pos, labels, ax=ax, font_size=5 if big else 7)
    for name, c in colors.items():
        ax.scatter([], [], color=c, marker="s", label=f"changed by {name}")
    if colors:
        ax.legend(loc="upper right", fontsize=7)
    ax.axis("off")
    return _png(fig)


def _plan_section(plan: dict) -> str:
    """What ``compress(..., target=...)`` chose per layer, the sensitivity table behind it,
    and the size/error frontier it predicts for itself and for uniform settings."""
    head = (f'<p class="meta">{_esc(plan.get("file_bytes"))} bytes = {_num(plan.get("ratio"))}x '
            f'the fp32 file; target {_num(plan.get("target_ratio"))}x; {_esc(plan.get("metric"))} '
            f'drop {_num(plan.get("drop"))} (budget {_esc(plan.get("max_drop"))}); '
            f'{"met" if plan.get("met") else "MISSED " + _esc(plan.get("missed"))}; '
            f'{len(plan.get("attempts") or [])} round(s)</p>')
    rows = [[f"<code>{_esc(r['layer'])}</code>", _esc(r["kind"]), f"{r['params']:,}",
             f"<code>{_esc(r['choice'])}</code>", f"{r['bytes']:,}", f"{r['bits_per_weight']:.2f}",
             f"{r['error']:.3g}"] for r in plan.get("rows", [])]
    parts = [head, _table(["layer", "kind", "params", "choice", "bytes", "bits/weight",
                           "error alone"], rows, left=2)]
    sens = plan.get("sensitivity") or {}
    layers_ = sens.get("layers") or []
    cands = []
    for ls in layers_:
        for t in ls["trials"]:
            if t["candidate"] not in cands:
                cands.append(t["candidate"])
    if layers_ and cands:
        srows = []
        for ls in layers_:
            by = {t["candidate"]: t for t in ls["trials"]}
            srows.append([f"<code>{_esc(ls['name'])}</code>"] + [
                f"{by[c]['error']:.2g} @ {8 * by[c]['bytes'] / max(ls['params'], 1):.1f}b"
                if c in by else "-" for c in cands])
        parts.append(f"<h3>Sensitivity: error alone ({_esc(sens.get('metric'))}) @ bits per "
                     "weight, each candidate on each layer</h3>"
                     + _table(["layer"] + [f"<code>{_esc(c)}</code>" for c in cands], srows))
    front = plan.get("frontier") or {}
    if front.get("uniform"):
        parts.append('<h3>Predicted size/error frontier: planner vs uniform settings</h3>'
                     f'<div class="figure" id="frontier">{_frontier_figure(front, plan)}</div>')
    return "".join(parts)


def _frontier_figure(front: dict, plan: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    floor = 1e-9
    u, p = front["uniform"], front.get("planner") or []
    ax.scatter([d["ratio"] for d in u], [max(d["predicted_error"], floor) for d in u],
               color="#9ca3af", label="uniform settings (predicted)")
    for d in u:
        ax.annotate(d["setting"][:28], (d["ratio"], max(d["predicted_error"], floor)), fontsize=6)
    ax.plot([d["ratio"] for d in p], [max(d["predicted_error"], floor) for d in p], "o-",
            color="#2563eb", label="planner at the same sizes (predicted)")
    att = plan.get("attempts") or []
    if att and all(a.get("drop") is not None for a in att):
        ax.scatter([a["ratio"] for a in att], [max(a["drop"], floor) for a in att], marker="*",
                   s=90, color="#dc2626", label="planner rounds (measured drop)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("file size / fp32 file")
    ax.set_ylabel("error (sum of layers' errors alone)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def render_report(gm: torch.fx.GraphModule, header: dict, *, title: str = "fxpress report",
                  before: dict | None = None) -> str:
    """The HTML page (a string).

    ``header`` is the artifact's header (its embedded ``report`` holds the pipeline records
    and the per-layer baseline); ``before`` overrides the baseline with
    :func:`fxpress.graph.inspect.layer_summary` of another graph.
    """
    report = header.get("report") or {}
    baseline = before if before is not None else (report.get("baseline") or {})
    rows = layers(gm, header)
    file_bytes = int(header.get("file_bytes", 0)) or sum(r.disk_bytes for r in rows)
    g = to_networkx(gm, digests=False)
    meta = header.get("meta") or {}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{_esc(title)}</h1>",
             f'<p class="meta">{human_bytes(file_bytes)} on disk, format v{_esc(header.get("version"))}'
             f', {len(rows)} tensor owners, {g.number_of_nodes()} graph nodes; captured with '
             f'{_esc(meta.get("method", "?"))}; passes: '
             f'<code>{_esc(", ".join(meta.get("passes", [])) or "none")}</code>'
             f'{"; entropy-coded" if header.get("entropy") else ""}</p>']
    parts.append("<h2>Passes</h2>" + _passes_section(report))
    total = file_bytes or 1
    lrows = [[f"<code>{_esc(r.name)}</code>", _esc(r.type), f"{r.params:,}", f"{r.sparsity:.1%}",
              f"{r.bits:g}", human_bytes(r.mem_bytes), human_bytes(r.disk_bytes),
              f"{r.disk_bytes / total:.1%}"] for r in rows]
    rest = file_bytes - sum(r.disk_bytes for r in rows)
    lrows.append(["<i>header: graph, modules, tensor table</i>", "", "", "", "", "",
                  human_bytes(rest), f"{rest / total:.1%}"])
    parts.append("<h2>Layers</h2>" + _table(["layer", "type", "params", "sparsity", "bits",
                                             "memory", "on disk", "share of file"], lrows, left=2))
    before_bytes = {r["name"]: r["disk_bytes"] for r in baseline.get("layers", [])}
    after_bytes = {r.name: r.disk_bytes for r in rows}
    note = "" if before_bytes else '<p class="note">No baseline embedded: bars show this ' \
                                   'artifact only.</p>'
    parts.append("<h2>Bytes per layer, before and after</h2>" + note +
                 f'<div class="figure" id="bytes">{_bytes_figure(before_bytes, after_bytes)}</div>')
    parts.append("<h2>Weight histograms, before and after</h2>"
                 f'<div class="figure" id="histograms">'
                 f'{_hist_figure(baseline.get("histograms", {}), histograms(gm))}</div>')
    if report.get("plan"):
        parts.append("<h2>Plan: per-layer choices</h2>" + _plan_section(report["plan"]))
    drawing, how = _graph_figure(g)
    parts.append(f"<h2>Graph</h2><p class=\"note\">Drawn with {_esc(how)}; nodes a pass changed are "
                 f"coloured by pass.</p><div class=\"figure graph\" id=\"graph\">{drawing}</div>")
    if header.get("dropped"):
        parts.append("<p class='note'>Not stored: " + _esc("; ".join(header["dropped"])) + "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["render_report"]
