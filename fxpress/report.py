"""One self-contained HTML page about a compressed graph: what each pass did, where the bytes
went, how the weights changed, and the graph itself. Every image is inlined.

>>> html = render_report(gm, header=read_header("model.fxp"), title="model.fxp")  # doctest: +SKIP
>>> Path("report.html").write_text(html)                                          # doctest: +SKIP
"""
from __future__ import annotations

import html as _html
from typing import Any

import torch

from fxpress.graph.inspect import format_bits, histograms, human_bytes, layers, to_networkx

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px 32px;color:#111;max-width:1300px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:12px;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f3f4f6} td.l,th.l{text-align:left} .meta{color:#555;font-size:13px}
.figure{margin:8px 0} .figure img,.figure svg{max-width:100%;height:auto;border:1px solid #eee}
.figure{overflow-x:auto} .graph{border:1px solid #eee}
.ok{color:#15803d} .bad{color:#b91c1c} .note{color:#555;font-size:12px}
"""


def _esc(v: Any) -> str:
    return _html.escape(str(v))


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


# -- drawing: plain SVG written here (no plotting library), legible at model size -----------

_FONT = "font-family:Helvetica,Arial,sans-serif"
_CHAR_W = 6.6   # px per character of 11px text, generous so labels are never clipped


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{_esc(label)}" '
            f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'style="{_FONT};font-size:11px">' + "".join(body) + "</svg>")


def _text(x: float, y: float, s: Any, anchor: str = "start", size: int = 11, weight: str = "normal",
          fill: str = "#111") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
            f'font-weight="{weight}" fill="{fill}">{_esc(s)}</text>')


def _legend(x: float, y: float, items: list[tuple[str, str]]) -> tuple[list[str], float]:
    """Swatches and labels in one row from (x, y); returns the SVG and the width used."""
    out, cx = [], x
    for color, label in items:
        out.append(f'<rect x="{cx:.1f}" y="{y - 9:.1f}" width="12" height="12" fill="{color}" '
                   f'stroke="#374151" stroke-width="0.5"/>')
        out.append(_text(cx + 17, y + 1, label))
        cx += 17 + _CHAR_W * len(label) + 18
    return out, cx - x


#: a name of more parts than this is never grouped (module paths have a dozen or so)
_COLLAPSE_PARTS = 32
#: name parts :func:`_collapse` compares in all (a 100,000-layer model's paths fit)
_COLLAPSE_BUDGET = 1_000_000


def _collapse(names: list[str], signature) -> list[tuple[str, list[str]]]:
    """Group names that differ only in one repeated block index (``layer.0.x`` ...
    ``layer.5.x``) when every repeat has the same rows (``signature``): ``[(label, members)]``
    with labels like ``bert.encoder.layer.[0-5].attention.self.query``, in first-seen order.

    Bounded work on any names (a crafted artifact's report holds any strings): a prefix and
    the parts after an index are compared by ids interned part by part, never as copied
    strings (copying each prefix of a 20 KB name of ``.1.1.1...`` held 200 MB, growing with
    the square of its length); a name of more than :data:`_COLLAPSE_PARTS` parts, or past
    :data:`_COLLAPSE_BUDGET` parts in all, and an index of more than 18 digits are not
    grouped."""
    ids: dict[tuple, int] = {}

    def intern(key: tuple) -> int:
        return ids.setdefault(key, len(ids))

    # prefix id -> (its length in characters, index -> [(name, position of the index part)])
    by_block: dict[int, tuple[int, dict[int, list[tuple[str, int]]]]] = {}
    rests: dict[tuple[str, int], int] = {}  # (name, position) -> id of the parts after it
    split: dict[str, list[str]] = {}
    budget = _COLLAPSE_BUDGET
    for n in names:
        parts = n.split(".", _COLLAPSE_PARTS)
        if len(parts) > _COLLAPSE_PARTS or budget < len(parts):
            continue
        budget -= len(parts)
        split[n] = parts
        after = [0] * (len(parts) + 1)  # after[k]: id of parts[k:]
        after[len(parts)] = intern(("end",))
        for k in range(len(parts) - 1, -1, -1):
            after[k] = intern(("rest", parts[k], after[k + 1]))
        prefix, length = intern(("root",)), -1
        for k, part in enumerate(parts):
            if k and part.isdecimal() and len(part) <= 18:
                block = by_block.setdefault(prefix, (length, {}))[1]
                block.setdefault(int(part), []).append((n, k))
                rests[n, k] = after[k + 1]
            prefix, length = intern(("prefix", prefix, part)), length + 1 + len(part)
    chosen: dict[str, tuple[int, str]] = {}  # name -> (position of its index part, range)
    for _, (_, blocks) in sorted(by_block.items(), key=lambda kv: kv[1][0]):
        if len(blocks) < 2:
            continue
        idx = sorted(blocks)
        sig0 = [(rests[n, k], signature(n)) for n, k in blocks[idx[0]]]
        if all([(rests[n, k], signature(n)) for n, k in blocks[i]] == sig0 for i in idx[1:]):
            rng = f"[{idx[0]}-{idx[-1]}]" if idx == list(range(idx[0], idx[-1] + 1)) else "[*]"
            for i in idx:
                for n, k in blocks[i]:
                    chosen.setdefault(n, (k, rng))
    out: dict[str, list[str]] = {}
    for n in names:
        if n in chosen:
            k, rng = chosen[n]
            parts = split[n]
            label = ".".join([*parts[:k], rng, *parts[k + 1:]])
        else:
            label = n
        out.setdefault(label, []).append(n)
    return list(out.items())


def _bytes_figure(before: dict[str, int], after: dict[str, int],
                  params: dict[str, int] | None = None) -> str:
    names = [n for n in after if after[n] or before.get(n)] + [n for n in before if n not in after]
    params = params or {}
    # a repeated block (same names and sizes under each index) is one bar, summed
    groups = _collapse(names, lambda n: params.get(n, before.get(n)))
    rows = [(label + (f"  \u00d7{len(m)}" if len(m) > 1 else ""),
             sum(before.get(n, 0) for n in m), sum(after.get(n, 0) for n in m)) for label, m in groups]
    rows.sort(key=lambda r: -(r[1] or r[2]))
    more = len(rows) - 40
    rows = rows[:40]
    if not rows:
        return '<p class="note">No tensors.</p>'
    label_w = max(_CHAR_W * max(len(r[0]) for r in rows) + 16, 120)
    plot_w, bar_h, row_h, top = 560, 8, 24, 34
    width = label_w + plot_w + 120
    height = top + row_h * len(rows) + 40
    peak = max(max(r[1], r[2]) for r in rows) or 1
    body, _ = _legend(label_w, 16, [("#9ca3af", "before (captured graph)"), ("#2563eb", "after (this artifact)")])
    for i, (label, b, a) in enumerate(rows):
        y = top + i * row_h
        body.append(_text(label_w - 8, y + 12, label, "end"))
        for j, (v, color) in enumerate(((b, "#9ca3af"), (a, "#2563eb"))):
            w = plot_w * v / peak
            body.append(f'<rect x="{label_w:.1f}" y="{y + 2 + j * (bar_h + 1):.1f}" width="{max(w, 0.5):.1f}" '
                        f'height="{bar_h}" fill="{color}"><title>{_esc(label)}: {human_bytes(v)}</title></rect>')
        body.append(_text(label_w + plot_w * max(a, b) / peak + 6, y + 12,
                          f"{human_bytes(a)}" + (f" (was {human_bytes(b)})" if b else ""), size=10,
                          fill="#374151"))
    body.append(f'<line x1="{label_w}" y1="{top - 4}" x2="{label_w}" y2="{height - 30}" stroke="#374151"/>')
    body.append(_text(label_w, height - 12, "bytes on disk per layer (repeated blocks summed, \u00d7 = repeats)"
                      + (f"; {more} smaller rows not shown" if more > 0 else ""), size=10, fill="#555"))
    return _svg(width, height, body, "bytes per layer before and after")


def _hist_figure(before: dict[str, dict], after: dict[str, dict], limit: int = 8) -> str:
    names = sorted(after, key=lambda n: -after[n]["numel"])[:limit]
    if not names:
        return '<p class="note">No weighted layers.</p>'
    cell_w, cell_h, pad = 520, 170, 14
    cols = 2
    rows = (len(names) + cols - 1) // cols
    width, height = cols * (cell_w + pad) + pad, rows * (cell_h + 64) + 40
    body, _ = _legend(pad, 16, [("#9ca3af", "before"), ("#2563eb", "after")])
    body.append(_text(pad + 140, 17, "non-zero weights, log count; exact zeros and distinct values "
                      "in each caption", size=10, fill="#555"))
    for k, name in enumerate(names):
        x0 = pad + (k % cols) * (cell_w + pad)
        y0 = 36 + (k // cols) * (cell_h + 64)
        body.append(_text(x0, y0 + 12, name, weight="bold"))
        datas = [(before.get(name), "#9ca3af", "before", 0.6), (after[name], "#2563eb", "after", 0.85)]
        lo = min(d["lo"] for d, *_ in datas if d)
        hi = max(d["hi"] for d, *_ in datas if d)
        span = (hi - lo) or 1.0
        top = max(max(d["counts"] or [0]) for d, *_ in datas if d) or 1
        import math
        ly = math.log10(top + 1)
        py0, ph = y0 + 20, cell_h - 30
        body.append(f'<rect x="{x0}" y="{py0}" width="{cell_w}" height="{ph}" fill="none" stroke="#e5e7eb"/>')
        captions = []
        for d, color, label, alpha in datas:
            if not d:
                continue
            n = max(len(d["counts"]), 1)
            bw = (d["hi"] - d["lo"]) / n
            for i, c in enumerate(d["counts"]):
                if not c:
                    continue
                x = x0 + cell_w * (d["lo"] + i * bw - lo) / span
                h = ph * math.log10(c + 1) / ly
                body.append(f'<rect x="{x:.1f}" y="{py0 + ph - h:.1f}" width="{max(cell_w * bw / span, 1):.1f}" '
                            f'height="{h:.1f}" fill="{color}" fill-opacity="{alpha}"/>')
            zeros = d["zeros"] / max(d["numel"], 1)
            distinct = d.get("distinct")
            captions.append(f"{label}: {zeros:.0%} zeros" + (f", {distinct} distinct values"
                                                             if distinct is not None and distinct <= 256 else ""))
        body.append(_text(x0, py0 + ph + 14, f"{lo:.3g}", size=10, fill="#555"))
        body.append(_text(x0 + cell_w, py0 + ph + 14, f"{hi:.3g}", "end", size=10, fill="#555"))
        body.append(_text(x0 + cell_w / 2, py0 + ph + 14, "; ".join(captions), "middle", size=10))
    return _svg(width, height, body, "weight histograms before and after")


def _layer_passes(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Layer (module path) -> the pass that last rewrote it, from the graph's node metadata."""
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        p = node.meta.get("fxpress_pass")
        if p and node.op in ("call_module", "get_attr"):
            name = str(node.target)
            out[name] = p
            out[name.rsplit(".", 1)[0]] = out.get(name.rsplit(".", 1)[0], p)
    return out


def _block_figure(gm: torch.fx.GraphModule, rows: list) -> tuple[str, str]:
    """The model as the user wrote it: a box per top-level block, a row per layer (module
    path, type, bits, sparsity, bytes), repeated blocks drawn once with "×N", rows coloured by
    the pass that rewrote them."""
    passes = _layer_passes(gm)
    names = [r.name for r in rows if r.params or r.disk_bytes]
    info = {r.name: r for r in rows}
    colors = {}
    for p in passes.values():
        colors.setdefault(p, _PASS_PALETTE[len(colors) % len(_PASS_PALETTE)])

    def sig(n: str):  # the structure of a layer: what it is, how big, which pass rewrote it
        r = info[n]
        return (r.type, r.params, passes.get(n, ""))

    groups = _collapse(names, sig)
    # top-level block: the label up to and including its repeat marker, or its first part
    blocks: list[tuple[str, list[tuple[str, list[str]]]]] = []
    for label, members in groups:  # consecutive layers under one parent form a block
        if "]" in label:
            head = label[:label.index("]") + 1]
        else:
            head = ".".join(label.split(".")[:-1][:2]) or label
        if not blocks or blocks[-1][0] != head:
            blocks.append((head, []))
        blocks[-1][1].append((label, members))
    row_h, head_h, gap = 20, 26, 22
    inner = [label[len(head) + 1:] if label != head else label
             for head, items in blocks for label, _ in items]
    label_w = max(_CHAR_W * max((len(s) for s in inner), default=10) + 24, 160)
    cols_w = [140, 60, 80, 90]  # type, bits, sparsity, bytes
    width = 40 + label_w + sum(cols_w) + 40
    height = 40 + sum(head_h + row_h * len(items) + gap for _, items in blocks) + 30
    body, _ = _legend(40, 18, [(c, f"rewritten by {p}") for p, c in colors.items()]
                      or [("#ffffff", "no pass rewrote a layer")])
    y = 40
    for b, (head, items) in enumerate(blocks):
        reps = len(items[0][1])
        box_h = head_h + row_h * len(items)
        body.append(f'<rect x="30" y="{y}" width="{width - 60}" height="{box_h}" rx="6" fill="#f9fafb" '
                    f'stroke="#6b7280"/>')
        title = head + (f"   \u00d7{reps}" if "]" in head else "")
        body.append(_text(40, y + 17, title, weight="bold", size=12))
        hx = 40 + label_w
        for w, h in zip(cols_w, ("type", "bits", "sparsity", "bytes")):
            body.append(_text(hx + w - 8, y + 17, h + (" (all)" if h == "bytes" and "]" in head else ""),
                              "end", size=10, fill="#555"))
            hx += w
        for i, (label, members) in enumerate(items):
            rs = [info[n] for n in members]
            r = rs[0]
            ry = y + head_h + i * row_h
            fill = colors.get(passes.get(members[0], ""), "#ffffff")
            body.append(f'<rect x="36" y="{ry}" width="{width - 72}" height="{row_h - 2}" fill="{fill}" '
                        f'fill-opacity="0.35" stroke="#d1d5db"/>')
            short = label[len(head) + 1:] if label != head else label
            body.append(_text(44, ry + 13, short))
            bits = sorted({round(x.bits, 2) for x in rs})
            sparsity = sum(x.sparsity for x in rs) / len(rs)
            cells = [r.type, f"{bits[0]:g}" + (f"-{bits[-1]:g}" if len(bits) > 1 else ""),
                     f"{sparsity:.0%}", human_bytes(sum(x.disk_bytes for x in rs))]
            cx = 40 + label_w
            for w, c in zip(cols_w, cells):
                body.append(_text(cx + w - 8, ry + 13, c, "end"))
                cx += w
        if b < len(blocks) - 1:  # data flows to the next block
            ax = width / 2
            body.append(f'<line x1="{ax}" y1="{y + box_h}" x2="{ax}" y2="{y + box_h + gap - 4}" '
                        f'stroke="#374151" stroke-width="1.2"/>'
                        f'<path d="M{ax - 4},{y + box_h + gap - 9} L{ax},{y + box_h + gap - 2} '
                        f'L{ax + 4},{y + box_h + gap - 9} Z" fill="#374151"/>')
        y += box_h + gap
    return _svg(width, height, body, "model layers by block"), (
        f"{len(names)} layers in {len(blocks)} blocks; repeated blocks drawn once")


_PASS_PALETTE = ("#2563eb", "#16a34a", "#d97706", "#db2777", "#7c3aed", "#0891b2", "#dc2626")


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
    """Log-log scatter of predicted error against file size: uniform settings, the planner,
    and the planner's measured rounds (SVG)."""
    import math

    floor = 1e-9
    u, p = front["uniform"], front.get("planner") or []
    att = [a for a in (plan.get("attempts") or []) if a.get("drop") is not None]
    pts = ([(d["ratio"], max(d["predicted_error"], floor)) for d in u + p]
           + [(a["ratio"], max(a["drop"], floor)) for a in att])
    pts = [(x, y) for x, y in pts if x and x > 0]
    if not pts:
        return '<p class="note">No frontier points.</p>'
    lx = [math.log10(x) for x, _ in pts]
    ly = [math.log10(y) for _, y in pts]
    x0, x1 = min(lx), max(lx) if max(lx) > min(lx) else min(lx) + 1
    y0, y1 = min(ly), max(ly) if max(ly) > min(ly) else min(ly) + 1
    left, top, w, h = 70, 40, 560, 300
    width = left + w + 230

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + w * (math.log10(x) - x0) / (x1 - x0),
                top + h - h * (math.log10(max(y, floor)) - y0) / (y1 - y0))

    body, _ = _legend(left, 18, [("#9ca3af", "uniform settings (predicted)"),
                                 ("#2563eb", "planner (predicted)"),
                                 ("#dc2626", "planner rounds (measured drop)")])
    body.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#9ca3af"/>')
    for d in u:
        cx, cy = at(d["ratio"], d["predicted_error"])
        body.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="#9ca3af"/>')
        body.append(_text(cx + 6, cy - 4, str(d["setting"])[:28], size=9, fill="#374151"))
    line = [at(d["ratio"], d["predicted_error"]) for d in p]
    if line:
        body.append('<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="'
                    + " ".join(f"{x:.1f},{y:.1f}" for x, y in line) + '"/>')
        body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="#2563eb"/>' for x, y in line]
    for a in att:
        cx, cy = at(a["ratio"], a["drop"])
        body.append(f'<rect x="{cx - 5:.1f}" y="{cy - 5:.1f}" width="10" height="10" fill="#dc2626"/>')
    body.append(_text(left, top + h + 16, f"{10 ** x0:.3g}", size=10, fill="#555"))
    body.append(_text(left + w, top + h + 16, f"{10 ** x1:.3g}", "end", size=10, fill="#555"))
    body.append(_text(left + w / 2, top + h + 30, "file size / fp32 file (log)", "middle", size=10))
    body.append(_text(left - 6, top + 10, f"{10 ** y1:.2g}", "end", size=10, fill="#555"))
    body.append(_text(left - 6, top + h, f"{10 ** y0:.2g}", "end", size=10, fill="#555"))
    body.append(_text(left - 6, top + h / 2, "error (log)", "end", size=10))
    return _svg(width, top + h + 44, body, "predicted size/error frontier")


def _recovery_figure(records: list[dict]) -> str:
    """Per training step (distill): loss per epoch on the training batches and on the
    held-out ones, the kept epoch marked; the learning rate it used in the caption."""
    out = []
    for r in records:
        st = r.get("stats") or {}
        epochs = [e for e in st.get("epochs") or [] if isinstance(e.get("loss"), (int, float))]
        if not epochs:
            continue
        series = [("#2563eb", "training loss", [e["loss"] for e in epochs])]
        if all(isinstance(e.get("val_loss"), (int, float)) for e in epochs):
            series.append(("#dc2626", "held-out loss", [e["val_loss"] for e in epochs]))
        vals = [v for _, _, ys in series for v in ys if v == v and abs(v) != float("inf")]
        if not vals:
            continue
        w, h, left, top, bottom = 420.0, 180.0, 50.0, 24.0, 28.0
        lo, hi = min(vals), max(vals)
        span, n = (hi - lo) or 1.0, max(len(epochs) - 1, 1)

        def at(i: int, v: float) -> tuple[float, float]:
            return left + (w - left - 10) * i / n, top + (h - top - bottom) * (hi - v) / span

        body = [f'<line x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}" stroke="#999"/>',
                _text(left - 4, top + 4, f"{hi:.3g}", "end"), _text(left - 4, h - bottom, f"{lo:.3g}", "end"),
                _text((w + left) / 2, h - 6, f"epoch (1-{len(epochs)})", "middle")]
        for color, _, ys in series:
            pts = " ".join("%.1f,%.1f" % at(i, v) for i, v in enumerate(ys) if v == v)
            body.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
        best = st.get("best_epoch")
        if isinstance(best, int) and 1 <= best <= len(epochs):
            x, y = at(best - 1, series[-1][2][best - 1])
            body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="none" stroke="#111"/>')
        legend, _ = _legend(left, 12, [(c, label) for c, label, _ in series])
        lr = st.get("lr")
        cap = (f"#{_esc(r.get('index'))} <code>{_esc(r.get('spec'))}</code>: "
               f"{len(epochs)} epochs{', stopped early' if st.get('stopped_early') else ''}"
               f"{f'; kept epoch {best} (circled)' if isinstance(best, int) and best else ''}"
               f"{'; kept the starting weights (no epoch beat them on the held-out loss)' if best == 0 and st.get('start_val_loss') is not None else ''}"
               f"{f'; learning rate {lr:.2g}' if isinstance(lr, (int, float)) and lr else ''}"
               f"{' (range test)' if st.get('lr_test') else ''}")
        out.append(f'<div class="figure">{_svg(w, h, body + legend, "recovery curve")}'
                   f'<p class="note">{cap}</p></div>')
    return "".join(out)


# -- the header's fields the page reads, checked before drawing (a crafted or edited file) ----

_N, _C, _P, _S, _A = "a number", "a number from 0", "a number above 0", "a string", "anything"
# a dict or list the page reads with ``or {}`` / ``or []`` may also be null
_REPORT_SPEC: dict = {
    "original_bytes": _C, "original_disk_bytes": _C,
    "records": ([{"seconds": _N, "sparsity": _N, "bytes_after": _C, "disk_bytes": (_C, None),
                  "cumulative": ({}, None), "stats": ({"epochs": ([{}], None)}, None)}], None),
    "baseline": ({"layers": [{"name!": _S, "disk_bytes!": _C}],
                  "histograms": {"*": {"lo!": _N, "hi!": _N, "counts!": [_C], "zeros": _C,
                                       "numel": _C, "distinct": (_C, None)}}}, None),
    "plan": ({"attempts": ([{"drop": (_N, None), "ratio": (_P, None)}], None),
              "rows": [{"layer!": _A, "kind!": _A, "params!": _C, "choice!": _A, "bytes!": _C,
                        "bits_per_weight!": _N, "error!": _N}],
              "sensitivity": ({"layers": ([{"name!": _A, "params!": _C, "trials!": [
                  {"candidate!": (_S, _N), "error!": _N, "bytes!": _C}]}], None)}, None),
              "frontier": ({"uniform": ([{"ratio!": _P, "predicted_error!": _N, "setting!": _A}],
                                        None),
                            "planner": ([{"ratio!": _P, "predicted_error!": _N}], None)}, None)},
             None)}
_HEADER_SPEC = {"file_bytes": (_C, None), "meta": ({"passes": ([_S], None)}, None),
                "dropped": ([_S], None), "report": (_REPORT_SPEC, None)}


def _fits(v: Any, kind: Any) -> bool:
    if kind is None or kind == _A:
        return v is None if kind is None else True
    if kind == _S:
        return isinstance(v, str)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or abs(v) > 1e300:
        return False  # NaN passes (a metric may be NaN); the page draws it as such
    return kind == _N or (kind == _C and not v < 0) or (kind == _P and not v <= 0)


def _check_spec(v: Any, spec: Any, path: str) -> None:
    """Raise ArtifactFormatError naming ``path`` where ``v`` does not fit ``spec``: a dict
    of fields (``name!`` required, ``*`` any key), a one-item list (each item), a kind,
    or a tuple of alternatives (None: absent or null)."""
    from fxpress.errors import ArtifactFormatError
    from fxpress.graph.artifact.values import _short_repr

    alts = spec if isinstance(spec, tuple) else (spec,)
    for alt in alts:
        if isinstance(alt, dict) and isinstance(v, dict):
            for key, sub in alt.items():
                name = key.rstrip("!")
                items = v.items() if name == "*" else ([(name, v[name])] if name in v else [])
                if key.endswith("!") and name not in v:
                    raise ArtifactFormatError(f"{path} lacks {name!r}")
                for k, x in items:
                    _check_spec(x, sub, f"{path}.{k}" if isinstance(k, str) else f"{path}[{k!r}]")
            return
        if isinstance(alt, list) and isinstance(v, list):
            for i, x in enumerate(v):
                _check_spec(x, alt[0], f"{path}[{i}]")
            return
        if not isinstance(alt, (dict, list)) and _fits(v, alt):
            return
    want = " or ".join("null" if a is None else "an object" if isinstance(a, dict) else
                       "a list" if isinstance(a, list) else a for a in alts)
    raise ArtifactFormatError(f"{path} is {_short_repr(v, 60)}, not {want}")


def render_report(gm: torch.fx.GraphModule, header: dict, *, title: str = "fxpress report",
                  before: dict | None = None) -> str:
    """The HTML page (a string).

    ``header`` is the artifact's header (its embedded ``report`` holds the pipeline records
    and the per-layer baseline); ``before`` overrides the baseline with
    :func:`fxpress.graph.inspect.layer_summary` of another graph.
    """
    from fxpress.errors import ArtifactFormatError, FxpressError

    try:
        _check_spec(header, _HEADER_SPEC, "header")
        return _render(gm, header, title=title, before=before)
    except FxpressError as e:
        raise ArtifactFormatError(f"{title}: {e}; the page was not written (the model itself "
                                  "still loads with fxpress.load)") from None
    except Exception as e:  # a field the check does not cover: typed, never raw
        raise ArtifactFormatError(f"{title}: the header's report fields do not draw "
                                  f"({type(e).__name__}: {str(e)[:200]}); the page was not "
                                  "written (the model itself still loads with fxpress.load)") from None


def _render(gm: torch.fx.GraphModule, header: dict, *, title: str, before: dict | None) -> str:
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
    curves = _recovery_figure(report.get("records") or [])
    if curves:
        parts.append("<h2>Recovery curves</h2>" + curves)
    total = file_bytes or 1
    lrows = [[f"<code>{_esc(r.name)}</code>", _esc(r.type), f"{r.params:,}", f"{r.sparsity:.1%}",
              format_bits(r.bits), human_bytes(r.mem_bytes), human_bytes(r.disk_bytes),
              f"{r.disk_bytes / total:.1%}"] for r in rows]
    rest = file_bytes - sum(r.disk_bytes for r in rows)
    lrows.append(["<i>header: graph, modules, tensor table</i>", "", "", "", "", "",
                  human_bytes(rest), f"{rest / total:.1%}"])
    table = _table(["layer", "type", "params", "sparsity", "bits", "memory", "on disk",
                    "share of file"], lrows, left=2)
    parts.append("<h2>Layers</h2>" + (table if len(lrows) <= 30 else
                                      f"<details><summary>{len(lrows)} rows (every layer, "
                                      f"repeats included)</summary>{table}</details>"))
    before_bytes = {r["name"]: r["disk_bytes"] for r in baseline.get("layers", [])}
    after_bytes = {r.name: r.disk_bytes for r in rows}
    note = "" if before_bytes else '<p class="note">No baseline embedded: bars show this ' \
                                   'artifact only.</p>'
    parts.append("<h2>Bytes per layer, before and after</h2>" + note +
                 f'<div class="figure" id="bytes">{_bytes_figure(before_bytes, after_bytes, {r.name: r.params for r in rows})}</div>')
    parts.append("<h2>Weight histograms, before and after</h2>"
                 f'<div class="figure" id="histograms">'
                 f'{_hist_figure(baseline.get("histograms", {}), histograms(gm))}</div>')
    if report.get("plan"):
        parts.append("<h2>Plan: per-layer choices</h2>" + _plan_section(report["plan"]))
    drawing, how = _block_figure(gm, rows)
    parts.append(f"<h2>Model</h2><p class=\"note\">{_esc(how)}; rows a pass rewrote are "
                 f"coloured by pass.</p><div class=\"figure graph\" id=\"graph\">{drawing}</div>")
    if header.get("dropped"):
        parts.append("<p class='note'>Not stored: " + _esc("; ".join(header["dropped"])) + "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["render_report"]
