"""Inspection: networkx view, diffs, exports, per-layer tables, the CLI and the HTML report."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import networkx as nx
import pytest
import torch

import fxpress
from fxpress.cli import main
from fxpress.graph import inspect as gi

ROOT = Path(__file__).resolve().parents[1]
PRUNE = "prune{sparsity=0.8,scope=layer,tol.min_cosine=0.3,tol.min_top1=0.1}"


@pytest.fixture
def cnn_result(cnn, calib):
    return fxpress.compress(cnn, PRUNE, calibration=calib, progress=False)


def test_to_networkx_nodes_edges_and_history(cnn_result):
    g = fxpress.graph.to_networkx(cnn_result.module)
    assert isinstance(g, nx.MultiDiGraph)
    conv1 = g.nodes["conv1"]
    assert (conv1["op"], conv1["module_type"], conv1["params"]) == ("call_module", "Conv2d", 144)
    # fan-in 9: per-layer prune keeps 2 weights per filter (min_per_unit), not 20% of 144
    assert conv1["nonzeros"] == 2 * 16 and conv1["bits"] == 32
    assert conv1["shape"] == [128, 16, 8, 8] and conv1["dtype"] == "float32"
    assert conv1["pass"] == PRUNE and g.nodes["bn1"]["pass"] == ""  # only what the pass changed
    assert g.nodes["bn1"]["stored_bytes"] == 4 * (16 * 4) + 8
    assert ("conv1", "bn1", "args[0]") in g.edges(keys=True)
    assert g.graph["passes"] == [PRUNE] and g.graph["capture"] == "fx"


def test_to_networkx_on_an_export_graph(minilm_gm):
    g = fxpress.graph.to_networkx(minilm_gm, digests=False)
    linear = [n for n, d in g.nodes(data=True) if d["target"] == "aten.linear.default"]
    assert len(linear) == 37
    q = g.nodes[linear[0]]
    assert q["module_type"] == "linear (aten)" and q["params"] == 384 * 384
    assert g.graph["capture"] == "export"
    # the weight arrives as argument 1 of aten.linear, from its get_attr node
    assert any(k == "args[1]" and g.nodes[u]["op"] == "get_attr"
               for u, _, k in g.in_edges(linear[0], keys=True))


def test_diff_reports_changed_added_removed_and_rewired(cnn, calib, cnn_result):
    before = fxpress.capture(cnn, calib[0])
    d = fxpress.graph.diff(before, cnn_result.module)
    assert set(d.changed) == {"conv1", "conv2", "fc1", "fc2"} and not d.added and not d.removed
    assert d.changed["fc1"]["nonzeros"] == (8192, round(8192 * 0.2))
    assert "digest" in d.changed["fc1"]
    after = fxpress.graph.clone_structure(before)
    relu = next(n for n in after.graph.nodes if n.name == "relu")
    with after.graph.inserting_after(relu):
        neg = after.graph.call_function(torch.neg, (relu,))
    relu.replace_all_uses_with(neg, delete_user_cb=lambda u: u is not neg)
    after.recompile()
    d = fxpress.graph.diff(before, after)
    assert d.added == ["neg"] and set(d.rewired) == {"max_pool2d"}
    assert d.rewired["max_pool2d"] == (["args[0]<-relu"], ["args[0]<-neg"])
    assert "+ neg" in str(d) and json.dumps(d.as_dict())
    assert not fxpress.graph.diff(before, fxpress.graph.clone_structure(before))


def test_exports_graphml_node_link_dot(cnn_result, tmp_path):
    g = fxpress.graph.to_networkx(cnn_result.module)
    fxpress.graph.write_graphml(g, tmp_path / "g.graphml")
    back = nx.read_graphml(tmp_path / "g.graphml")
    assert set(back.nodes) == set(g.nodes)
    assert back.nodes["conv1"]["shape"] == "[128, 16, 8, 8]" and back.nodes["conv1"]["params"] == 144
    assert back.graph["passes"] == json.dumps([PRUNE])
    fxpress.graph.write_node_link(g, tmp_path / "g.json")
    h = nx.node_link_graph(json.loads((tmp_path / "g.json").read_text()), edges="edges")
    assert h.number_of_edges() == g.number_of_edges()
    dot = fxpress.graph.to_dot(g)
    assert all(f'"{n}"' in dot for n in g.nodes) and '"conv1" -> "bn1"' in dot
    if shutil.which("dot"):
        svg = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, check=True)
        assert b"<svg" in svg.stdout


def test_layer_table_adds_up_to_the_file(cnn_result, tmp_path):
    path = tmp_path / "c.fxp"
    size = fxpress.save(cnn_result.module, path)
    rows = gi.layers(fxpress.load(path), fxpress.graph.read_header(path))
    by = {r.name: r for r in rows}
    assert by["fc1"].params == 8192 and abs(by["fc1"].sparsity - 0.8) < 1e-3
    assert by["fc1"].disk_bytes < by["fc1"].mem_bytes / 3
    assert by["bn1"].disk_bytes == by["bn1"].mem_bytes  # dense: stored as is
    table = gi.format_layers(rows, size)
    header_share = float(re.search(r"\(header.*?([\d.]+)%", table).group(1))
    shares = sum(r.disk_bytes for r in rows) / size * 100
    assert abs(shares + header_share - 100) < 0.2


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.ids, self.srcs = [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if "src" in a or "href" in a:
            self.srcs.append(a.get("src") or a.get("href"))


def test_cli_run_output_inspect_diff_report(tmp_path, capsys):
    # the recipe's model comes from examples.digits, already trained in this process
    (tmp_path / "digits.py").write_text("from examples.digits import calibration, trained_mlp\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "digits.py:trained_mlp"\ncalibration = "digits.py:calibration"\n'
                      f'pipeline = "{PRUNE}"\noutput = "out/mlp.fxp"\n')
    assert main(["run", str(recipe)]) == 0
    art = tmp_path / "out" / "mlp.fxp"
    assert art.is_file() and "saved" in capsys.readouterr().out
    assert main(["inspect", str(art), "--graphml", str(tmp_path / "g.graphml")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"layers\.1\s+Linear\s+30,000\s+8\d\.\d%", out) and "(header" in out
    assert nx.read_graphml(tmp_path / "g.graphml").number_of_nodes() == 7
    assert main(["diff", f"{tmp_path / 'digits.py'}:trained_mlp", str(art)]) == 0
    out = capsys.readouterr().out
    assert "3 changed" in out and "~ layers_0: nonzeros: 19200 ->" in out
    html_path = tmp_path / "report.html"
    assert main(["report", str(art), "-o", str(html_path)]) == 0
    html = html_path.read_text()
    p = _Tags()
    p.feed(html)
    assert {"bytes", "histograms", "graph"} <= p.ids
    assert p.tags.count("table") == 2 and PRUNE in html
    # self-contained: every figure is inline SVG, nothing is fetched
    assert not p.srcs and html.count("<svg") >= 3
    assert main(["inspect", str(tmp_path / "nope.fxp")]) == 2
    # tests/test_report_browser.py renders the page in headless Chromium


def test_histogram_counts_distinct_values_of_codebook_layers_only():
    from fxpress.graph.inspect import DISTINCT_MAX, _histogram

    codes = torch.tensor([0.0, -0.5, 0.25, 1.0])[torch.randint(0, 4, (300_000,))]
    h = _histogram(codes, 16)
    assert h["distinct"] == 3 and h["zeros"] == int((codes == 0).sum())
    assert _histogram(torch.randn(300_000), 16)["distinct"] is None  # past DISTINCT_MAX
    few = torch.arange(1, DISTINCT_MAX + 1, dtype=torch.float32).repeat(3)
    assert _histogram(few, 16)["distinct"] == DISTINCT_MAX
    assert _histogram(torch.zeros(10), 16)["distinct"] == 0
