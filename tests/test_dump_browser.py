"""The html dump in a real browser: headless Chromium loads the page of a tiny Hugging Face Llama
(one norm's eps made a tensor, so there is a near miss), offline.

A script added to a copy of the page checks, after the page's own script ran, that the rewritten
regions and the near miss are drawn, clicks a collapsed module group and checks it opened in
place with its nodes, and searches for a module; `--dump-dom` hands the result back.  A
screenshot is kept under tmp/test-artifacts/ (gitignored).  A slow test does the same at scale
(a 32-layer model).  Skipped, saying so, where Chromium is not installed (`.ci/run` installs
Debian's `chromium`).
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ligerfx.dump.picture import build as build_model
from ligerfx.dump.picture import default_expanded
from ligerfx.dump.svg import layout

ARTIFACTS = Path(__file__).resolve().parents[1] / "tmp" / "test-artifacts"

CHECK = """<script>
(function () {
  const r = {errors: window.__errors || []}, q = (s) => document.querySelectorAll("#graph-0 " + s);
  try {
    r.rw_nodes = q(".node.rw").length;
    r.nm_nodes = q(".node.nm").length;
    r.rw_groups = q(".grp.has-rw:not(.open)").length;
    r.nm_marks = [...q(".nmtext")].length;
    r.labels = [...q(".rlabel")].map((e) => e.textContent);
    r.nm_titles = [...q(".node.nm > title"), ...q(".grp.has-nm > title")].map((e) => e.textContent);
    r.boxes_before = +document.querySelector("#graph-0").dataset.boxes;
    r.rects = {};
    for (const el of q("g[data-node], g[data-group]")) {
      const b = el.querySelector("rect");
      const key = el.dataset.node !== undefined ? "n:" + el.dataset.node : "g:" + el.dataset.group;
      r.rects[key] = ["x", "y", "width", "height"].map((a) => Math.round(+b.getAttribute(a)));
    }
    const path = "model.layers.1.self_attn";
    const grp = document.querySelector(`#graph-0 .grp[data-group="${path}"]`);
    r.was_collapsed = !!grp && !grp.classList.contains("open");
    grp.querySelector("rect").dispatchEvent(new MouseEvent("click", {bubbles: true}));
    r.now_open = !!document.querySelector(`#graph-0 .grp.open[data-group="${path}"]`);
    r.boxes_after = +document.querySelector("#graph-0").dataset.boxes;
    r.rope_label = r.labels.filter((t) => t.startsWith("rope")).length;
    r.rope_label_after = [...q(".rlabel")].filter((e) => e.textContent.startsWith("rope")).length;
    r.details = document.querySelector("#details").textContent;
    const s = document.querySelector("#search");
    s.value = "q_proj";
    s.dispatchEvent(new Event("input"));
    r.results = [...document.querySelectorAll("#results li")].map((e) => e.textContent);
    s.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter"}));
    r.hit = [...document.querySelectorAll(".hit")].map((e) => e.dataset.group || e.dataset.node);
  } catch (e) { r.errors.push(String(e)); }
  const pre = document.createElement("pre");
  pre.id = "selftest";
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
})();
</script>"""
CATCH = "<script>window.__errors=[];addEventListener('error',e=>__errors.push(e.message));</script>"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; "
                ".ci/run installs it), so the html dump is not checked in a browser")


def _run(exe: str, profile, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
           # offline: any network lookup fails, so a page that needed one would break
           "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_html_dump_in_headless_chromium(tmp_path):
    exe = _chromium()
    pytest.importorskip("transformers")
    from ligerfx.dump import render, trace
    from ligerfx.dump.hf_targets import build

    model, args, kwargs = build("llama")
    model.model.layers[0].input_layernorm.variance_epsilon = torch.tensor(1e-6)
    d = trace(model, args, kwargs, target="hf:llama")
    page = render(d, "html")
    n_rw, n_nm = len(d.report.matches), len(d.report.near_misses)
    assert n_nm >= 1

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "dump_llama.html").write_text(page)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + CATCH, 1).replace("</body>", CHECK + "</body>"))

    out = _run(exe, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    m = re.search(r'<pre id="selftest">(.*?)</pre>', out.stdout, re.S)
    assert m, f"the page's check did not run; chromium said:\n{out.stderr[-2000:]}"
    r = json.loads(html.unescape(m.group(1)))
    assert r["errors"] == []
    # The first picture is the one `-f svg` draws: same boxes at the same places.
    gm = build_model(d, 0)
    want = {u: [math.floor(v + 0.5) for v in box]  # JS Math.round
            for u, box in layout(gm, default_expanded(gm)).items()}
    assert r["rects"] == want
    # Highlighted regions: the top layers are open, so the final norm and the loss are drawn
    # node by node, the decoder layers' rewrites as badges on their groups.
    assert r["rw_nodes"] > 0 and r["rw_groups"] > 0
    assert any(t == "fused_linear_cross_entropy \u2192 liger::fused_linear_cross_entropy"
               for t in r["labels"])
    # The near miss is marked (on its node, or on the collapsed group holding it) with its reason.
    # (layer 0's input norm is open: a region is opened first, so its nodes are drawn).
    order = list(d.before[0].graph.nodes)
    anchors = {order[nm.position].name for nm in d.report.near_misses}
    assert r["nm_nodes"] == len(anchors) and r["nm_marks"] >= len(anchors)
    # (a norm after a residual add is refused once, as add_rms_norm, which covers the add too)
    reason = re.compile(r"near miss (add_)?rms_norm: `eps` is a tensor here")
    assert sum(bool(reason.search(t)) for t in r["nm_titles"]) == len(anchors)
    # Clicking a collapsed group opens it in place: more boxes, its rope region now labelled.
    assert r["was_collapsed"] and r["now_open"], r
    assert r["boxes_after"] > r["boxes_before"]
    assert r["rope_label_after"] == r["rope_label"] + 1
    assert "model.layers.1.self_attn" in r["details"] and "rope" in r["details"]
    # Search finds modules and nodes and reveals the first one.
    assert any("model.layers.0.self_attn.q_proj" in t for t in r["results"])
    assert r["hit"] == ["model.layers.0.self_attn.q_proj"]
    assert n_rw == 9

    shot = ARTIFACTS / "dump_llama.png"
    if shot.exists():
        shot.unlink()
    out = _run(exe, tmp_path / "profile", "--window-size=1400,1000", f"--screenshot={shot}",
               "--virtual-time-budget=5000", (ARTIFACTS / "dump_llama.html").as_uri())
    assert shot.exists() and shot.stat().st_size > 20_000, out.stderr[-2000:]


SCALE = """<script>
(function () {
  const r = {errors: window.__errors || []};
  try {
    const g = ligerfxDump.data.graphs[0];
    r.boxes = +document.querySelector("#graph-0").dataset.boxes;
    r.layers_open = g.groups.filter((gr, j) => /^layers\\.\\d+$/.test(gr[0]) && g.open.has(j)).length;
    r.badges = document.querySelectorAll("#graph-0 .grp.has-rw:not(.open)").length;
    document.querySelector("[data-all=open]").click();
    r.all_boxes = +document.querySelector("#graph-0").dataset.boxes;
    r.rw_nodes = document.querySelectorAll("#graph-0 .node.rw").length;
  } catch (e) { r.errors.push(String(e)); }
  const pre = document.createElement("pre");
  pre.id = "selftest";
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
})();
</script>"""


@pytest.mark.slow
def test_html_dump_of_32_layers_in_headless_chromium(tmp_path):
    """The page of a 32-layer model stays small, opens on its layers (one box each, badged) and
    draws every node when everything is expanded.  (Load time: docs/dump.md, measured.)"""
    exe = _chromium()
    from ligerfx.dump import render, trace
    from ligerfx.tools.example_model import ExampleConfig, make_example

    model, ids, labels = make_example(seq=8, cfg=ExampleConfig(n_layers=32))
    d = trace(model, (ids, labels))
    page = render(d, "html")
    assert len(page) < 1_000_000
    probe = tmp_path / "probe32.html"
    probe.write_text(page.replace("<head>", "<head>" + CATCH, 1).replace("</body>", SCALE + "</body>"))
    out = _run(exe, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    m = re.search(r'<pre id="selftest">(.*?)</pre>', out.stdout, re.S)
    assert m, f"the page's check did not run; chromium said:\n{out.stderr[-2000:]}"
    r = json.loads(html.unescape(m.group(1)))
    assert r["errors"] == []
    gm = build_model(d, 0)
    assert r["layers_open"] == 0 and r["badges"] >= 32 and r["boxes"] <= 100
    assert r["all_boxes"] == gm.graph.number_of_nodes() + len(gm.groups)
    assert r["rw_nodes"] == sum(len(x.nodes) for x in gm.regions if x.kind == "rewrite")
