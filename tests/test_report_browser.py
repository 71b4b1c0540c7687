"""The HTML report reads at real size, in a real browser (headless Chromium, Debian's package).

Repeated blocks are drawn once with "×N", nodes carry the user's layer names, every
figure is inline SVG written by fxpress (no plotting library needed), and Chromium renders
the page without console errors into a screenshot that is large and not blank.
Locally the browser test skips when Chromium is absent; on CI (``CI=true``) it must run.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import fxpress
from fxpress.graph.artifact import read_header
from fxpress.report import render_report


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.external: list[str] = []
        self.svgs = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.svgs += tag == "svg"
        for k, v in attrs:
            if k in ("src", "href") and v and not v.startswith(("data:", "#")):
                self.external.append(v)

    def handle_data(self, data):
        self.text.append(data)


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI: chromium is not installed (.ci/run installs Debian's 'chromium')")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def _render(chromium: str, page: Path, shot: Path, tmp: Path, width: int = 1300,
            height: int = 2000) -> str:
    """Screenshot ``page``; return Chromium's log (console messages appear as CONSOLE lines)."""
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp / 'profile'}", f"--screenshot={shot}",
         f"--window-size={width},{height}", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert shot.is_file(), proc.stderr[-2000:]
    return proc.stderr


def _png_ink(path: Path) -> tuple[int, int, float]:
    """(width, height, ink) of a PNG: ink is the share of decoded-stream bytes that are
    neither 0 nor 255. Blank (one-colour) rows filter to runs of 0 or of 255 whatever
    filter the encoder picked; text, lines and bars do not."""
    import numpy as np

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            size = struct.unpack(">II", data[pos + 8:pos + 16])
        elif kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8)
    return size[0], size[1], float(((raw != 0) & (raw != 255)).mean())


def _bert(layers: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=layers,
                                             num_attention_heads=2, intermediate_size=64,
                                             vocab_size=200)).train(False)

        def forward(self, ids, mask):
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    return Encoder().train(False), (ids, torch.ones_like(ids))


@pytest.fixture(scope="module")
def bert_report(tmp_path_factory):
    model, inputs = _bert(4)
    res = fxpress.compress(model, "quantize{bits=8,act_scale=tensor}", calibration=[inputs],
                           policy="warn")
    path = tmp_path_factory.mktemp("report") / "bert.fxp"
    fxpress.save(res, path)
    html = render_report(fxpress.load(path), read_header(path), title="bert.fxp")
    page = path.with_suffix(".html")
    page.write_text(html, encoding="utf-8")
    return page, html


def test_report_collapses_repeats_and_names_user_layers(bert_report):
    _, html = bert_report
    p = _Page()
    p.feed(html)
    text = " ".join(p.text)
    assert "bert.encoder.layer.[0-3]" in text and "\u00d74" in text
    assert "attention.self.query" in text and "QuantizedLinear" in text
    assert "_fxpress_new_module" not in html
    assert p.svgs >= 3 and not p.external  # self-contained: inline SVG, nothing fetched
    # one encoder layer drawn once: each of its layers is one row of the drawing, not six
    model_svg = html[html.index('id="graph"'):]
    assert len(re.findall(r">attention\.self\.query<", model_svg)) == 1


def _blank_shot(chromium: str, tmp: Path) -> Path:
    page = tmp / "blank.html"
    page.write_text("<html><body></body></html>")
    _render(chromium, page, tmp / "blank.png", tmp)
    return tmp / "blank.png"


def test_report_renders_in_headless_chromium(bert_report, tmp_path):
    chromium = _chromium()
    page, _ = bert_report
    shot = tmp_path / "bert.png"
    log = _render(chromium, page, shot, tmp_path)
    console = [line for line in log.splitlines() if "CONSOLE" in line]
    assert not console, console
    width, height, ink = _png_ink(shot)
    assert (width, height) == (1300, 2000)
    assert ink > 0.01, f"screenshot is nearly blank ({ink:.2%})"
    _, _, blank = _png_ink(_blank_shot(chromium, tmp_path))
    assert blank < 0.2 * ink  # the measure tells a blank page from the report
    # the console check is live: a page that logs an error is caught
    probe = tmp_path / "probe.html"
    probe.write_text("<html><body>probe<script>console.error('fxpress-probe')</script></body></html>")
    assert "fxpress-probe" in _render(chromium, probe, tmp_path / "probe.png", tmp_path, 400, 300)


def test_report_needs_no_plotting_library(bert_report, monkeypatch, tmp_path):
    """A plain install (no matplotlib, no Graphviz) renders the whole report."""
    import builtins

    from fxpress.cli import main

    real = builtins.__import__

    def no_plotting(name, *a, **k):
        if name.split(".")[0] in ("matplotlib", "PIL"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_plotting)
    monkeypatch.setenv("PATH", "/nonexistent")  # no `dot` either
    page, _ = bert_report
    out = tmp_path / "r.html"
    assert main(["report", str(page.with_suffix(".fxp")), "-o", str(out)]) == 0
    assert out.read_text().count("<svg") >= 3


def test_collapse_groups_gpt2_sized_repeats_only_when_alike():
    from fxpress.report import _collapse

    names = (["transformer.wte", "transformer.wpe"]
             + [f"transformer.h.{i}.{part}" for i in range(12)
                for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")]
             + ["transformer.ln_f", "lm_head"])
    groups = _collapse(names, lambda n: n.rsplit(".", 1)[-1])
    labels = [label for label, _ in groups]
    assert "transformer.h.[0-11].attn.c_attn" in labels and len(groups) == 2 + 6 + 2
    assert all(len(m) == 12 for label, m in groups if "[0-11]" in label)
    # blocks that differ (another width in one layer) are not merged
    sizes = {n: 2 if n == "transformer.h.7.mlp.c_fc" else 1 for n in names}
    assert len(_collapse(names, sizes.get)) == len(names)
    # the digits MLP: layers.0 and layers.1 have different sizes, so both stay
    assert [label for label, _ in _collapse(["layers.0", "layers.1", "head"],
                                             {"layers.0": 19200, "layers.1": 30000, "head": 1000}.get)] \
        == ["layers.0", "layers.1", "head"]
