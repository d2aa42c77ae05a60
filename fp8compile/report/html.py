"""The plan as one self-contained HTML page: summary, legend, searchable graph, details on
click, a sortable GEMM table and the precision conflicts.  No network: CSS, JS and SVG inline.

Example::

    >>> plan.to_html("plan.html")      # doctest: +SKIP  (then open plan.html in a browser)
"""

from __future__ import annotations

import json
import re
from collections import Counter
from html import escape

from ..plan import Plan, PlanEntry, _fmt_shape
from .conflicts import conflicts
from .layout import COLORS, boxes
from .svg import to_svg

__all__ = ["to_html"]


def _entry_data(e: PlanEntry) -> dict:
    d = {
        "name": e.name,
        "op": e.op,
        "module": e.module,
        "module type": e.module_type,
        "graph": e.graph,
        "inputs": ", ".join(_fmt_shape(s) for s in e.in_shapes) if e.in_shapes else None,
        "output": _fmt_shape(e.out_shape) if e.out_shape is not None else None,
        "dtype": e.dtype,
        "precision": e.precision.value,
        "recipe": e.recipe,
        "granularity": e.granularity,
        "rule": e.rule,
        "reason": e.reason,
        "GEMM": e.gemm,
        "GFLOP": round(e.flops / 1e9, 4) if e.flops else None,
        "weight": e.weight,
        "weight numel": e.weight_numel,
        "SQNR (dB)": round(e.sqnr_db, 2) if e.sqnr_db is not None else None,
        "amax": e.amax,
    }
    return {k: v for k, v in d.items() if v not in (None, "")}


def _svg_inline(svg: str) -> str:
    """SVG text fit to sit inside HTML: no XML prolog, DOCTYPE or comments, and no namespace
    URLs (HTML5 parses inline ``<svg>`` without them; the page must hold no http(s) link)."""
    svg = svg[svg.find("<svg"):]
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    return svg.replace("xlink:title=", "title=").replace("xlink:href=", "href=")


def _summary(plan: Plan) -> list[tuple[str, str]]:
    c = plan.counts()
    g = plan.gemms
    rows = [
        ("nodes", f"{len(plan)}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))),
        ("GEMMs in FP8", f"{len(plan.fp8)} / {len(g)}" if g else "0 / 0"),
        ("GEMM FLOPs in FP8", f"{100 * plan.fp8_flop_share():.1f}%"),
        ("recipe", f"{plan.config.recipe} ({plan.config.scaling} scaling)"),
    ]
    st = plan.stats
    if "weight_bytes" in st and "fp8_weight_bytes" in st:
        rows.append(
            ("weights", f"{st['weight_bytes'] / 2**20:.2f} MiB → "
             f"{st['fp8_weight_bytes'] / 2**20:.2f} MiB")
        )
    if "released_weight_bytes" in st:
        rows.append(("released", f"{st['released_weights']} high-precision weights, "
                     f"{st['released_weight_bytes'] / 2**20:.2f} MiB (release_weights)"))
    if "compile_s" in st:
        rows.append(("compile", f"{st['compile_s']:.2f} s"))
    return rows


def _gemm_table(plan: Plan, ids: dict[int, str]) -> str:
    head = ["node", "module", "shape", "precision", "recipe", "GFLOP", "SQNR dB", "rule",
            "reason"]
    rows = []
    for e in plan.gemms:
        shape = " × ".join(_fmt_shape(s) for s in e.in_shapes[:2]) if e.in_shapes else ""
        cells = [
            e.name, e.module or "-", shape, e.precision.value, e.recipe or "",
            f"{e.flops / 1e9:.4f}" if e.flops else "",
            f"{e.sqnr_db:.1f}" if e.sqnr_db is not None else "", e.rule, e.reason,
        ]
        tds = "".join(f"<td>{escape(str(c))}</td>" for c in cells)
        rows.append(f'<tr data-id="{escape(ids[id(e)])}" class="{e.precision.value}">{tds}</tr>')
    ths = "".join(f"<th>{h}</th>" for h in head)
    return f'<table id="gemms"><thead><tr>{ths}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


_CSS = """
*{box-sizing:border-box}body{margin:0;font:13px/1.4 Helvetica,Arial,sans-serif;color:#222}
header{padding:10px 16px;background:#263238;color:#eee}header h1{margin:0 0 6px;font-size:18px}
.stats{display:flex;flex-wrap:wrap;gap:6px 22px}.stats b{color:#fff}
#bar{display:flex;gap:14px;align-items:center;padding:8px 16px;border-bottom:1px solid #ddd;
background:#fafafa;position:sticky;top:0;z-index:2}
#search{width:280px;padding:4px 8px;font-size:13px}.legend{display:flex;gap:12px}
.legend span{display:inline-flex;align-items:center;gap:4px}
.sw{width:14px;height:14px;border:1px solid #555;border-radius:3px;display:inline-block}
main{display:flex;height:calc(100vh - 150px);min-height:420px}
#graph{flex:1;overflow:auto;background:#fff}#graph svg{display:block}
#panel{width:360px;overflow:auto;border-left:1px solid #ddd;padding:10px 14px;background:#fcfcfc}
#panel h2{font-size:15px;margin:0 0 8px;word-break:break-all}#panel table{border-collapse:collapse}
#panel td{padding:2px 6px;vertical-align:top;border-bottom:1px solid #eee}
#panel td:first-child{color:#666;white-space:nowrap}
g.node,g.summary{cursor:pointer}
svg.dim g.node:not(.hit),svg.dim g.summary:not(.hit){opacity:.25}
g.hit rect,g.hit polygon,g.hit path{stroke:#d0021b!important;stroke-width:3px!important}
g.sel rect,g.sel polygon{stroke:#000!important;stroke-width:4px!important}
section{padding:10px 16px}h3{margin:6px 0}
#gemms{border-collapse:collapse;font-size:12px}#gemms th{cursor:pointer;background:#eee;
text-align:left;padding:3px 8px;position:sticky;top:0}#gemms th:hover{background:#ddd}
#gemms td{padding:2px 8px;border-bottom:1px solid #eee}#gemms tr:hover td{background:#f4f8ff}
#gemms tr{cursor:pointer}#gemms td:nth-child(4){font-weight:bold}
.conf li{margin:3px 0;font-family:monospace;font-size:12px}#nhits{color:#666}
"""

_JS = """
const DATA = JSON.parse(document.getElementById('plan-data').textContent);
const svg = document.querySelector('#graph svg');
const nodes = Array.from(document.querySelectorAll('#graph g.node, #graph g.summary'));
const byId = {}; nodes.forEach(g => { byId[g.id] = g; });
function show(id) {
  nodes.forEach(g => g.classList.remove('sel'));
  const g = byId[id]; if (g) { g.classList.add('sel'); }
  const d = DATA[id]; const p = document.getElementById('panel');
  if (!d) { return; }
  let h = '<h2>' + esc(d.title) + '</h2><table>';
  for (const [k, v] of Object.entries(d.fields)) {
    h += '<tr><td>' + esc(k) + '</td><td>' + esc(String(v)) + '</td></tr>';
  }
  p.innerHTML = h + '</table>';
}
const ENT = {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'};
function esc(s) { return s.replace(/[&<>"]/g, c => ENT[c]); }
function focusNode(id) {
  const g = byId[id]; if (!g) { return; }
  show(id);
  const box = g.getBoundingClientRect(), view = document.getElementById('graph');
  const vb = view.getBoundingClientRect();
  view.scrollBy({left: box.left - vb.left - vb.width / 2, top: box.top - vb.top - vb.height / 2});
}
nodes.forEach(g => g.addEventListener('click', () => show(g.id)));
document.getElementById('search').addEventListener('input', ev => {
  const q = ev.target.value.trim().toLowerCase(); let first = null, n = 0;
  nodes.forEach(g => {
    const d = DATA[g.id]; const hit = q && d && d.search.includes(q);
    g.classList.toggle('hit', !!hit); if (hit) { n++; if (!first) { first = g.id; } }
  });
  svg.classList.toggle('dim', !!q);
  document.getElementById('nhits').textContent = q ? n + ' match' + (n === 1 ? '' : 'es') : '';
  if (first) { focusNode(first); }
});
let zoom = 1; const W0 = svg.getAttribute('width'), H0 = svg.getAttribute('height');
function setZoom(z) {
  zoom = Math.max(0.1, Math.min(3, z));
  svg.setAttribute('width', parseFloat(W0) * zoom + (W0.replace(/[0-9.]/g, '')));
  svg.setAttribute('height', parseFloat(H0) * zoom + (H0.replace(/[0-9.]/g, '')));
}
document.getElementById('zin').onclick = () => setZoom(zoom * 1.25);
document.getElementById('zout').onclick = () => setZoom(zoom / 1.25);
document.getElementById('zfit').onclick = () => {
  const v = document.getElementById('graph');
  setZoom(Math.min(v.clientWidth / parseFloat(W0), v.clientHeight / parseFloat(H0)));
};
document.querySelectorAll('#gemms tbody tr').forEach(tr =>
  tr.addEventListener('click', () => focusNode(tr.dataset.id)));
document.querySelectorAll('#gemms th').forEach((th, col) => th.addEventListener('click', () => {
  const body = document.querySelector('#gemms tbody'); const rows = Array.from(body.rows);
  const asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
  const val = r => { const t = r.cells[col].textContent; const f = parseFloat(t);
                     return isNaN(f) ? t : f; };
  rows.sort((a, b) => { const x = val(a), y = val(b);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); });
  rows.forEach(r => body.appendChild(r));
}));
"""


def to_html(
    plan: Plan,
    path=None,
    *,
    engine: str = "python",
    collapse: bool | None = None,
    title: str = "fp8compile precision plan",
) -> str:
    """One self-contained HTML page for ``plan`` (also written to ``path`` when given).

    ``collapse=None`` folds plans of more than 300 nodes: GEMMs and rule-protected nodes stay,
    the rest of each module becomes one summary box.  ``engine`` as in :func:`to_svg`; the
    default is the built-in layout, the same on every machine (``"dot"`` uses Graphviz, whose
    cluster frames nest every module prefix: exact, but wide for transformers).
    """
    drawn = boxes(plan, collapse)
    svg = _svg_inline(to_svg(plan, engine=engine, collapse=collapse))
    data: dict[str, dict] = {}
    ids: dict[int, str] = {}
    for b in drawn:
        for e in b.entries:
            ids[id(e)] = b.id
        if b.entry is not None:
            e = b.entry
            fields = _entry_data(e)
            title_ = f"{e.name} · {e.precision.value.upper()}"
            search = " ".join([e.name, e.module, e.op, e.module_type]).lower()
        elif b.id.startswith("rep_"):
            fields = {"blocks": b.label, "folded": b.detail, "nodes": len(b.entries)}
            fields.update(sorted(Counter(e.precision.value for e in b.entries).items()))
            title_ = f"{b.label} · {len(b.entries)} nodes"
            blocks = sorted({e.module.split(".")[: b.group.count(".") + 2][-1]
                             for e in b.entries})
            search = " ".join([b.label] + [f"{b.group}.{i}" for i in blocks]).lower()
        else:
            fields = {"module": b.group or "(top level)", "collapsed nodes": len(b.entries)}
            for e in b.entries:
                fields[e.name] = f"{e.op} · {e.precision.value} · {e.rule}"
            title_ = f"{b.group or '(top level)'} · {len(b.entries)} nodes"
            search = " ".join([b.group] + [e.name + " " + e.op for e in b.entries]).lower()
        data[b.id] = {"title": title_, "fields": fields, "search": search}
    legend = "".join(
        f'<span><i class="sw" style="background:{COLORS[p]}"></i>{p.upper()}</span>'
        for p in ("fp8", "bf16", "fp16", "fp32")
    )
    folded = sum(len(b.entries) for b in drawn if b.entry is None)
    if folded:
        legend += (
            f'<span><i class="sw" style="background:{COLORS["mixed"]};border-style:dashed">'
            f"</i>module summary ({folded} nodes folded)</span>"
        )
    stats = "".join(f"<span>{escape(k)}: <b>{escape(v)}</b></span>" for k, v in _summary(plan))
    conf = conflicts(plan)
    conf_html = (
        "<ul class='conf'>" + "".join(f"<li>{escape(c)}</li>" for c in conf) + "</ul>"
        if conf else "<p>none: no FP8 → high precision → FP8 round trips.</p>"
    )
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head>
<body>
<header><h1>{escape(title)}</h1><div class="stats">{stats}</div></header>
<div id="bar">
<input id="search" type="search" placeholder="search node or module (e.g. mlp, q_proj)">
<span id="nhits"></span>
<div class="legend">{legend}</div>
<span><button id="zout">−</button> <button id="zin">+</button> <button id="zfit">fit</button></span>
</div>
<main><div id="graph">{svg}</div>
<aside id="panel"><h2>Details</h2><p>Click a node for its op, module, shapes, precision,
recipe, scale granularity, the rule that decided and why, and measured SQNR and amax.</p>
</aside></main>
<section><h3>GEMMs ({len(plan.gemms)}; click a header to sort, a row to find the node)</h3>
{_gemm_table(plan, ids)}</section>
<section><h3>Precision conflicts ({len(conf)})</h3>{conf_html}</section>
<script type="application/json" id="plan-data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    return page
