"""The plan as SVG: Graphviz ``dot`` when installed, a pure-Python layered layout otherwise.

Both paths draw one ``<g class="node ...">`` per box with the box id (``g{graph}_{name}``) as
its ``id``, so the HTML page and the tests can find every node the same way.

Example::

    >>> svg = plan.to_svg("plan.svg")                      # doctest: +SKIP
    >>> svg = to_svg(plan, engine="python")                 # doctest: +SKIP  (reproducible)
"""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from xml.sax.saxutils import escape, quoteattr

from ..plan import Plan
from .dot import _tooltip, to_dot
from .layout import COLORS, Box, boxes, edges, layered

__all__ = ["to_svg", "render"]

# Box geometry in px: 168 wide fits "down_proj" plus "linear 2×16×256" at 10-11 px fonts.
W, H, HGAP, VGAP, MARGIN = 168, 38, 18, 30, 16
LEGEND_H = 34


def _write(text: str, path) -> str:
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return text


def to_svg(plan: Plan, path=None, *, engine: str = "auto", collapse: bool | None = False) -> str:
    """SVG text of ``plan`` (also written to ``path`` when given).

    ``engine``: ``"auto"`` (Graphviz ``dot`` when on ``PATH``), ``"dot"`` or ``"python"``.
    """
    if engine not in ("auto", "dot", "python"):
        raise ValueError(f"to_svg(engine={engine!r}): choose 'auto', 'dot' or 'python'")
    dot = shutil.which("dot") if engine != "python" else None
    if engine == "dot" and dot is None:
        raise RuntimeError("to_svg(engine='dot') needs Graphviz: install it or use 'python'")
    if dot:
        out = subprocess.run(
            [dot, "-Tsvg"], input=to_dot(plan, collapse), capture_output=True, text=True,
            check=True, timeout=120,
        ).stdout
        return _write(out, path)
    return _write(render(plan, collapse), path)


def _place(drawn: list[Box], links: list[tuple[str, str]]) -> dict[str, tuple[float, float]]:
    """Top-left corner of each box: ranks top to bottom; within a rank, each box as close to
    the mean x of its parents as the boxes to its left allow (keeps chains straight)."""
    ranks = layered([b.id for b in drawn], links)
    parents: dict[str, list[str]] = defaultdict(list)
    for s, d in links:
        parents[d].append(s)
    layers: dict[int, list[str]] = defaultdict(list)
    for n, (r, i) in sorted(ranks.items(), key=lambda kv: kv[1]):
        layers[r].append(n)
    x: dict[str, float] = {}
    for r in sorted(layers):
        prev = None
        for n in layers[r]:
            ps = [x[p] for p in parents[n] if p in x]
            want = sum(ps) / len(ps) if ps else (0.0 if prev is None else prev + W + HGAP)
            x[n] = want if prev is None else max(want, prev + W + HGAP)
            prev = x[n]
    lo = min(x.values(), default=0.0)
    top = MARGIN + LEGEND_H
    return {n: (x[n] - lo + MARGIN, top + ranks[n][0] * (H + VGAP)) for n in x}


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _legend(plan: Plan) -> list[str]:
    counts = plan.counts()
    out = ['<g class="legend">']
    x = MARGIN
    for p in ("fp8", "bf16", "fp16", "fp32"):
        out.append(
            f'<rect x="{x}" y="{MARGIN}" width="14" height="14" rx="3" fill="{COLORS[p]}" '
            f'stroke="#555"/><text x="{x + 19}" y="{MARGIN + 11}" class="lg">'
            f"{p.upper()} ({counts.get(p, 0)})</text>"
        )
        x += 100
    out.append("</g>")
    return out


def render(plan: Plan, collapse: bool | None = False) -> str:
    """The pure-Python SVG (no Graphviz)."""
    drawn = boxes(plan, collapse)
    links = edges(plan, drawn)
    xy = _place(drawn, links)
    width = max((x + W for x, _ in xy.values()), default=0) + MARGIN
    width = max(width, 4 * 100 + 2 * MARGIN)
    height = max((y + H for _, y in xy.values()), default=MARGIN + LEGEND_H) + MARGIN
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="fp8plan" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
        'font-family="Helvetica, Arial, sans-serif">',
        "<style>.lbl{font-size:11px;font-weight:bold;fill:#111}.dtl{font-size:9px;fill:#333}"
        ".lg{font-size:11px;fill:#222}.cl{font-size:9px;fill:#777}"
        ".edge{fill:none;stroke:#999;stroke-width:1}</style>",
        '<defs><marker id="arr" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0L8,4L0,8z" fill="#999"/></marker></defs>',
    ]
    out += _legend(plan)
    # Module clusters: a dashed frame around each group's boxes, drawn first (underneath).
    groups: dict[str, list[str]] = defaultdict(list)
    for b in drawn:
        if b.group:
            groups[b.group].append(b.id)
    for g, ids in groups.items():
        x0 = min(xy[i][0] for i in ids) - 6
        y0 = min(xy[i][1] for i in ids) - 13
        x1 = max(xy[i][0] for i in ids) + W + 6
        y1 = max(xy[i][1] for i in ids) + H + 5
        inside = set(ids)
        # A frame that would also enclose another module's boxes misleads more than it helps
        # (layered layouts interleave modules that run side by side): draw only clean ones.
        if any(
            b.id not in inside and x0 < xy[b.id][0] + W and xy[b.id][0] < x1
            and y0 < xy[b.id][1] + H and xy[b.id][1] < y1
            for b in drawn
        ):
            continue
        out.append(
            f'<g class="cluster" data-module={quoteattr(g)}><rect x="{x0:.0f}" y="{y0:.0f}" '
            f'width="{x1 - x0:.0f}" height="{y1 - y0:.0f}" rx="6" fill="#f6f6f6" '
            f'fill-opacity="0.5" stroke="#bbb" stroke-dasharray="4 3"/>'
            f'<text x="{x0 + 4:.0f}" y="{y0 + 9:.0f}" class="cl">{escape(g)}</text></g>'
        )
    for s, d in links:
        (sx, sy), (dx, dy) = xy[s], xy[d]
        x1, y1, x2, y2 = sx + W / 2, sy + H, dx + W / 2, dy
        if y2 <= y1:  # an edge closing a cycle between summary boxes: route it around
            y2 = dy + H
        mid = (y1 + y2) / 2
        out.append(
            f'<path class="edge" data-src="{s}" data-dst="{d}" marker-end="url(#arr)" '
            f'd="M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}"/>'
        )
    for b in drawn:
        x, y = xy[b.id]
        e = b.entry
        cls = f"node {b.precision}" if e is not None else f"summary {b.precision}"
        attrs = f'class="{cls}" id={quoteattr(b.id)}'
        if e is not None:
            attrs += f" data-name={quoteattr(e.name)} data-module={quoteattr(e.module)}"
        else:
            attrs += f' data-module={quoteattr(b.group)} data-count="{len(b.entries)}"'
        stroke = "#222" if e is not None and e.gemm else "#666"
        sw = 2 if e is not None and e.gemm else 1
        dash = ' stroke-dasharray="5 2"' if e is None else ""
        out.append(
            f"<g {attrs}><title>{escape(_tooltip(b))}</title>"
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{W}" height="{H}" rx="5" '
            f'fill="{COLORS.get(b.precision, COLORS["mixed"])}" stroke="{stroke}" '
            f'stroke-width="{sw}"{dash}/>'
            f'<text x="{x + W / 2:.0f}" y="{y + 15:.0f}" text-anchor="middle" class="lbl">'
            f"{escape(_clip(b.label, 26))}</text>"
            f'<text x="{x + W / 2:.0f}" y="{y + 29:.0f}" text-anchor="middle" class="dtl">'
            f"{escape(_clip(b.detail, 32))}</text></g>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"
