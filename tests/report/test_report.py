"""The plan as DOT, SVG and HTML: valid, self-contained, and one drawn node per plan entry."""

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
import torch

import fp8compile
from fp8compile import Plan, PlanEntry, Precision
from fp8compile.report import conflicts, to_dot, to_html, to_svg
from fp8compile.report.layout import boxes, edges, layered
from tests.models import LlamaBlock, tiny_hf_llama

SVG_NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def block_plan():
    torch._dynamo.reset()
    torch.manual_seed(0)
    return fp8compile.plan(LlamaBlock(), torch.randn(2, 16, 256))


@pytest.fixture(scope="module")
def hf_plan():
    torch._dynamo.reset()
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (2, 16))
    return fp8compile.plan(tiny_hf_llama(), ids, config={"min_weight_numel": 0})


@pytest.fixture(params=["block", "hf"])
def any_plan(request, block_plan, hf_plan):
    return block_plan if request.param == "block" else hf_plan


def _svg_nodes(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)
    return [g for g in root.iter(f"{SVG_NS}g") if "node" in g.get("class", "").split()]


@pytest.mark.parametrize("engine", ["python", "dot"])
def test_svg_parses_and_has_one_node_per_entry(any_plan, engine, tmp_path):
    if engine == "dot" and shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed")
    path = tmp_path / "plan.svg"
    svg = to_svg(any_plan, path, engine=engine)
    assert path.read_text() == svg
    nodes = _svg_nodes(svg)
    assert len(nodes) == len(any_plan)
    assert {g.get("id") for g in nodes} == {f"g{e.graph}_{e.name}" for e in any_plan}


def test_svg_falls_back_without_graphviz(block_plan, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    svg = block_plan.to_svg()
    assert len(_svg_nodes(svg)) == len(block_plan)
    fills = {g.find(f"{SVG_NS}rect").get("fill") for g in _svg_nodes(svg)}
    assert "#7bc96f" in fills and "#f2a65a" in fills  # FP8 green, FP32 orange


def test_dot_one_line_per_entry_and_balanced(any_plan):
    dot = any_plan.to_dot()
    assert dot.count("{") == dot.count("}")
    node_lines = [ln for ln in dot.splitlines() if re.match(r'\s*"g\d+_[^"]+" \[', ln)]
    assert len(node_lines) == len(any_plan)
    assert "->" in dot
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg"], input=dot, text=True, check=True, capture_output=True)


def test_dot_clusters_by_module(hf_plan):
    dot = to_dot(hf_plan)
    assert '"cluster_model_layers_1_mlp"' in dot and 'label="model.layers.1.mlp"' in dot


@pytest.mark.parametrize("engine", ["python", "dot"])
def test_html_is_self_contained_with_legend_search_and_every_node(any_plan, engine, tmp_path):
    if engine == "dot" and shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed")
    path = tmp_path / "plan.html"
    html = to_html(any_plan, str(path), engine=engine)
    assert path.read_text() == html
    assert 'id="search"' in html and 'class="legend"' in html and 'id="panel"' in html
    assert 'id="gemms"' in html and "GEMM FLOPs in FP8" in html
    assert "http://" not in html and "https://" not in html
    assert "<script src" not in html and "<link" not in html
    svg = html[html.index("<svg"): html.index("</svg>") + 6]
    root = ET.fromstring(svg)
    nodes = [g for g in root.iter("g") if "node" in g.get("class", "").split()]
    assert len(nodes) == len(any_plan)


def test_html_collapses_large_plans_keeping_gemms_and_counts(hf_plan):
    drawn = boxes(hf_plan, collapse=True)
    kept = [b for b in drawn if b.entry is not None]
    folded = [b for b in drawn if b.entry is None]
    assert len(kept) + sum(len(b.entries) for b in folded) == len(hf_plan)
    folded_gemms = {e.name for b in folded if b.id.startswith("rep_") for e in b.entries}
    assert {b.entry.name for b in kept} | folded_gemms >= {e.name for e in hf_plan.gemms}
    assert any(b.label == "model.layers.1" for b in folded)  # layer 1 repeats layer 0
    assert len(drawn) < len(hf_plan) / 4
    html = to_html(hf_plan, collapse=True, engine="python")
    counts = [int(c) for c in re.findall(r'data-count="(\d+)"', html)]
    assert len(re.findall(r'<g class="node ', html)) + sum(counts) == len(hf_plan)


def test_layout_ranks_follow_edges(hf_plan):
    drawn = boxes(hf_plan, collapse=False)
    links = edges(hf_plan, drawn)
    pos = layered([b.id for b in drawn], links)
    assert all(pos[s][0] < pos[d][0] for s, d in links)


def _entry(name, precision, rule, inputs=(), gemm=None, op="linear"):
    return PlanEntry(name, op, name if gemm else "", Precision(precision), rule, rule,
                     inputs=list(inputs), gemm=gemm)


def test_conflicts_finds_fp8_bf16_fp8_bounce():
    plan = Plan([
        _entry("a", "fp8", "fp8", ["x"], gemm="linear"),
        _entry("b", "bf16", "override:b", ["a"], gemm="linear"),
        _entry("g", "fp32", "as-is", ["b"], op="gelu"),
        _entry("c", "fp8", "fp8", ["g"], gemm="linear"),
        _entry("n", "fp32", "rule:norm", ["c"], op="rms_norm"),
        _entry("d", "fp8", "fp8", ["n"], gemm="linear"),
    ])
    msgs = conflicts(plan)
    assert len(msgs) == 1 and "a" in msgs[0] and "override:b" in msgs[0]


def test_conflicts_on_a_real_model_with_an_override():
    torch._dynamo.reset()
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    plan = fp8compile.plan(model, torch.randn(4, 256), config={"overrides": {"1": "bf16"}})
    assert [e.precision.value for e in plan.gemms][:3] == ["fp8", "bf16", "fp8"]
    (msg,) = conflicts(plan)
    assert "bf16" in msg and "override:1" in msg
    assert "Precision conflicts (1)" in plan.to_html()


def test_no_conflicts_in_a_default_llama(hf_plan):
    assert conflicts(hf_plan) == []


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_renders_in_headless_chromium(hf_plan, tmp_path):
    page = tmp_path / "plan.html"
    hf_plan.to_html(str(page))
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1400,1000", page.as_uri()],
        check=False, capture_output=True, timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repeated_blocks_fold_and_a_different_block_breaks_the_run():
    from tests.models import TinyLM

    torch._dynamo.reset()
    model = TinyLM(layers=5)
    plan = fp8compile.plan(model, torch.randint(0, 512, (2, 8)),
                           config={"overrides": {"layers.3.*": "bf16"}})
    drawn = boxes(plan, collapse=True)
    reps = {b.label: b for b in drawn if b.id.startswith("rep_")}
    assert set(reps) == {"layers.1–2", "layers.4"}, sorted(reps)
    assert "same as layers.0" in reps["layers.1–2"].detail
    shown = {e.module for b in drawn if b.entry is not None for e in b.entries}
    assert "layers.3.up_proj" in shown and "layers.0.up_proj" in shown
    assert sum(len(b.entries) for b in drawn) == len(plan)
    html = to_html(plan, collapse=True)
    assert "layers.1–2" in html and "layers.2" in html
