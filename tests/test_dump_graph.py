"""The graph model behind the dump's picture (ligerfx/dump/picture.py) and its svg / dot drawings.

On the example model and a tiny Hugging Face Llama, each with one norm's eps turned into a tensor
(a real near miss): module groups, the layered layout, the regions each rewrite replaced (with
their kernel), the near-miss marks, the FLOP/byte summary, and that svg and dot mark the same.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from ligerfx.dump import picture
from ligerfx.dump import render, trace
from ligerfx.dump.cost import node_cost
from ligerfx.dump.picture import NEAR_MISS, REWRITE, build, default_expanded
from ligerfx.dump.svg import draw, layout
from ligerfx.tools.example_model import ExampleConfig, make_example


@pytest.fixture(scope="module")
def example_dump():
    model, ids, labels = make_example(seq=16)
    model.layers[1].mlp_norm.eps = torch.tensor(1e-5)  # eps held in a tensor: a near miss
    return trace(model, (ids, labels), target="example")


@pytest.fixture(scope="module")
def llama_dump():
    pytest.importorskip("transformers")
    from ligerfx.dump.hf_targets import build as hf_build

    model, args, kwargs = hf_build("llama")
    model.model.layers[0].input_layernorm.variance_epsilon = torch.tensor(1e-6)
    return trace(model, args, kwargs, target="hf:llama")


def _owner(m, region) -> set:
    return {m.group_of(n) for n in region.nodes}


def test_groups_follow_module_paths(example_dump):
    m = build(example_dump, 0)
    for path in ("", "layers", "layers.0", "layers.0.attn", "layers.0.attn.wq", "layers.1.mlp",
                 "layers.1.mlp_norm", "norm", "lm_head", "embed"):
        assert path in m.groups, path
    assert m.groups["layers.0.attn"].parent == "layers.0"
    assert m.groups["layers"].parent == "" and m.groups[""].parent is None
    # Every fx node is a child of exactly its own group; every group a child of its parent.
    for n, a in m.graph.nodes(data=True):
        assert ("n:" + n) in m.groups[a["group"]].children
    for p, g in m.groups.items():
        if g.parent is not None:
            assert ("g:" + p) in m.groups[g.parent].children
    assert m.groups[""].size == m.graph.number_of_nodes() == len(example_dump.before[0].graph.nodes)
    # The weight of a linear sits with it, in its module's group.
    assert any(a["op"] == "placeholder" for n, a in m.graph.nodes(data=True)
               if a["group"] == "layers.0.attn.wq")


def test_layers_respect_data_flow(example_dump):
    m = build(example_dump, 0)
    g = m.graph
    for path, grp in m.groups.items():
        row = {u: i for i, layer in enumerate(grp.layers) for u in layer}
        assert len(row) == len(grp.children)

        # Inside one group, a node's producers in the same group are on earlier layers.
        for n, a in g.nodes(data=True):
            if a["group"] != path:
                continue
            for p in g.predecessors(n):
                if g.nodes[p]["group"] == path:
                    assert row["n:" + p] < row["n:" + n], (path, p, n)
    # The decoder layers stack top to bottom in program order.
    layers = m.groups["layers"].layers
    assert [u for layer in layers for u in layer] == ["g:layers.0", "g:layers.1"]


def test_rewrites_are_regions_with_their_kernel(example_dump):
    m = build(example_dump, 0)
    rw = [r for r in m.regions if r.kind == REWRITE]
    assert sorted(r.pattern for r in rw) == sorted(
        mr.pattern for mr in example_dump.report.matches)
    kernels = {r.pattern: r.kernel for r in rw}
    assert kernels["rms_norm"] == "liger::rms_norm" and kernels["swiglu"] == "liger::gated_act"
    assert kernels["add_rms_norm"] == "liger::add_rms_norm"
    assert kernels["rope"] == "liger::rope"
    assert kernels["fused_linear_cross_entropy"] == "liger::fused_linear_cross_entropy"
    # The regions are the replaced nodes of the graph before the rewrite, where the user wrote them.
    norms = [r for r in rw if r.pattern == "rms_norm"]
    assert sorted(g for r in norms for g in _owner(m, r)) == ["layers.0.attn_norm"]
    # the norms after a residual add (layers.1.mlp_norm holds the tensor eps: a near miss)
    adds = {g for r in rw if r.pattern == "add_rms_norm" for g in _owner(m, r)}
    assert {"layers.0.mlp_norm", "layers.1.attn_norm", "norm"} <= adds, adds
    for r in rw:
        assert r.nodes and all(m.graph.nodes[n]["regions"] for n in r.nodes)
        assert r.location.file.endswith("example_model.py") and r.location.line > 0
    # No node belongs to two rewrites; the nodes outside any region are not marked.
    marked = [n for r in rw for n in r.nodes]
    assert len(marked) == len(set(marked))
    unmarked = set(m.graph.nodes) - set(marked)
    assert all(not any(m.regions[i].kind == REWRITE for i in m.graph.nodes[n]["regions"])
               for n in unmarked)
    # Groups know the regions inside them (what a collapsed box shows).
    inside = [m.regions[i].pattern for i in m.group_regions("layers.0")]
    # attn_norm; mlp_norm after the attention's residual add; layer 1's attn_norm, whose add
    # (the MLP's residual) is written in layer 0
    assert inside.count("rms_norm") == 1 and inside.count("add_rms_norm") == 2
    assert "rope" in inside and "swiglu" in inside


def test_near_miss_is_marked_where_it_happened(example_dump):
    m = build(example_dump, 0)
    nm = [r for r in m.regions if r.kind == NEAR_MISS]
    assert nm and all(r.pattern in ("rms_norm", "add_rms_norm") for r in nm)
    for r in nm:
        assert "tensor" in r.reason and r.nodes
        assert _owner(m, r) == {"layers.1.mlp_norm"}
    idx = {m.regions.index(r) for r in nm}
    assert idx <= m.groups["layers.1"].regions and not idx & m.groups["layers.0"].regions


def test_near_miss_of_a_later_pass_points_at_its_own_node():
    # The quantization pass runs on the rewritten graph: its positions are not the graph's
    # before the rewrite, so the anchor is found by module and source line.
    model, ids, labels = make_example(seq=8)
    d = trace(model, (ids, labels), options={"quantize": "int8"})  # gradients on: all refused
    m = build(d, 0)
    nm = [r for r in m.regions if r.kind == NEAR_MISS and r.pattern == "int8_linear"]
    assert len(nm) == len(d.report.near_misses) >= 2 * 7
    for r in nm:
        (n,) = r.nodes
        a = m.graph.nodes[n]
        assert a["label"] == "linear" and a["group"] == r.location.module, (n, r.location)
    assert len({r.nodes[0] for r in nm}) == len(nm)


def test_summary_counts_the_fused_share(example_dump):
    m = build(example_dump, 0)
    s = m.summary()
    tot = s.pop("_total")
    assert {k: v["rewrites"] for k, v in s.items()} == example_dump.report.counts
    # (the example's tensor-eps norm reads a residual add: refused once, as add_rms_norm)
    assert sum(s.get(k, {}).get("near_misses", 0) for k in ("rms_norm", "add_rms_norm")) >= 1
    assert tot["graph_nodes"] == m.graph.number_of_nodes()
    assert 0 < tot["flops"] < tot["graph_flops"] and 0 < tot["bytes"] < tot["graph_bytes"]
    assert tot["flops"] == sum(r["flops"] for r in s.values())
    # The lm head matmul is the largest FLOP count fused here: 2 * tokens * dim * vocab.
    cfg = ExampleConfig()
    assert s["fused_linear_cross_entropy"]["flops"] >= 2 * 2 * 16 * cfg.dim * cfg.vocab_size


def _with_values(fn, *args) -> fx.GraphModule:
    gm = fx.symbolic_trace(fn)
    env = iter(args)

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["example_value"] = out
            return out

    Rec(gm).run(*env)
    return gm


def test_node_cost_rules():
    x, w, b = torch.randn(2, 3, 8), torch.randn(16, 8), torch.randn(16)

    def f(x, w, b):
        y = F.linear(x, w, b)
        z = y.view(6, 16).double().float()  # a real cast, then one back
        return (torch.sigmoid(z) * z.float()).sum(-1)  # .float() of a float: no copy

    gm = _with_values(f, x, w, b)
    cost = {n.name: node_cost(n) for n in gm.graph.nodes}
    f4 = 4
    assert cost["linear"] == (2 * 2 * 3 * 16 * 8, f4 * (48 + 128 + 16 + 96))
    assert cost["view"] == (0, 0)  # re-indexing moves nothing
    assert cost["double"] == (0, (f4 + 8) * 96)  # a cast moves bytes, computes nothing
    assert cost["float_1"] == (0, (8 + f4) * 96) and cost["float_2"] == (0, 0)
    assert cost["sigmoid"] == (96, f4 * 96 * 2) and cost["mul"] == (96, f4 * 96 * 3)
    assert cost["sum_1"] == (96, f4 * (96 + 6))
    assert cost["x"] == (0, 0) and cost["output"] == (0, 0)

    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4)
    gm = _with_values(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    (attn,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node_cost(attn)[0] == 2 * 40 * 7 + 2 * 40 * 7


def test_default_expansion_opens_layers_together():
    model, ids, labels = make_example(seq=8, cfg=ExampleConfig(n_layers=8))
    m = build(trace(model, (ids, labels)), 0)
    opened = default_expanded(m)
    layers = [p for p in m.groups if re.fullmatch(r"layers\.\d+", p)]
    assert len(layers) == 8
    assert "layers" in opened and "" in opened
    assert all(p in opened for p in layers) or not any(p in opened for p in layers)
    boxes = layout(m, opened)
    closed = [u for u in boxes if u.startswith("n:") or u[2:] not in opened]
    assert len(closed) <= 80  # the budget counts boxes, not the frames of open groups
    # Everything open: one box per node and per group.
    assert len(layout(m, set(m.groups))) == m.graph.number_of_nodes() + len(m.groups)


def test_hf_llama_groups_regions_and_near_miss(llama_dump):
    m = build(llama_dump, 0)
    for p in ("model.layers.1.mlp", "model.layers.0.self_attn.q_proj", "model.norm", "lm_head"):
        assert p in m.groups
    rw = [r for r in m.regions if r.kind == REWRITE]
    counts = {}
    for r in rw:
        counts[r.pattern] = counts.get(r.pattern, 0) + 1
    # layer 0's input norm (no add before it) is the near miss; the four others follow an add
    assert counts == {"add_rms_norm": 4, "rope": 2, "swiglu": 2, "fused_linear_cross_entropy": 1}
    assert {g for r in rw if r.pattern == "swiglu" for g in _owner(m, r)} <= {
        "model.layers.0.mlp", "model.layers.1.mlp", "model.layers.0.mlp.act_fn",
        "model.layers.1.mlp.act_fn"}
    assert all("modeling_llama.py" in r.location.file for r in rw if r.pattern != "fused_linear_cross_entropy")
    nm = [r for r in m.regions if r.kind == NEAR_MISS]
    assert nm and {g for r in nm for g in _owner(m, r)} == {"model.layers.0.input_layernorm"}
    assert m.summary()["_total"]["near_misses"] == len(nm)


def test_svg_marks_every_visible_region(llama_dump):
    m = build(llama_dump, 0)
    opened = set(m.groups)  # everything visible
    svg = draw(m, opened)
    drawn = re.findall(r'<g class="node( rw)?( nm)?" data-node="([^"]+)"', svg)
    assert len(drawn) == m.graph.number_of_nodes()
    covered = {n for r in m.regions if r.kind == REWRITE for n in r.nodes}
    near = {n for r in m.regions if r.kind == NEAR_MISS for n in r.nodes}
    assert {n for rw, _, n in drawn if rw} == covered
    assert {n for _, nm, n in drawn if nm} == near
    # One label per rewrite, naming the kernel.
    assert svg.count('class="rlabel"') == len([r for r in m.regions if r.kind == REWRITE])
    assert "rms_norm \u2192 liger::" in svg  # rms_norm or add_rms_norm
    # Collapsed, a layer shows its rewrites as badges and its near miss as a warning.
    svg = draw(m, {"", "model", "model.layers"})
    layer0 = re.search(r'<g class="grp has-rw has-nm" data-group="model.layers.0">.*?</g>', svg)
    assert layer0 and "rms_norm" in layer0.group(0) and "\u26a0 " in layer0.group(0)


def test_dot_and_svg_formats(llama_dump):
    dot = render(llama_dump, "dot")
    n_rw = len(llama_dump.report.matches)
    assert len(re.findall(r"subgraph cluster_g0_before_r\d+ \{", dot)) == n_rw
    assert 'label="rope -> liger::rope\\nmodeling_llama.py:' in dot
    # one label per near-miss region (add_rms_norm and rms_norm may both report one norm)
    found = len(re.findall(r"near miss (add_)?rms_norm: `eps` is a tensor", dot))
    assert found == len({tuple(sorted(r.nodes)) for r in build(llama_dump, 0).regions
                         if r.kind == NEAR_MISS}), found
    assert dot.count("{") == dot.count("}")
    svg = render(llama_dump, "svg")
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>") and "<style>" in svg
    assert 'data-group="model.layers.0"' in svg and "http" not in svg.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")


def test_networkx_is_the_graph(example_dump):
    import networkx as nx

    m = build(example_dump, 0)
    assert isinstance(m.graph, nx.DiGraph) and nx.is_directed_acyclic_graph(m.graph)
    assert picture.kernels(example_dump.after[0])["rms_norm"] == "liger::rms_norm"
