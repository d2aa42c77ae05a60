"""The plan in Graphviz DOT: one node per entry, colored by precision, clustered by module.

Example::

    >>> dot = plan.to_dot()            # doctest: +SKIP
    >>> open("plan.dot", "w").write(dot)  # then: dot -Tsvg plan.dot > plan.svg
"""

from __future__ import annotations

from collections import defaultdict

from ..plan import Plan
from .layout import COLORS, Box, boxes, edges

__all__ = ["to_dot"]


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tooltip(b: Box) -> str:
    e = b.entry
    if e is None:
        return f"{b.group or '(top level)'}: {b.detail}"
    parts = [f"{e.name} ({e.op})", f"module: {e.module or '-'}", f"precision: {e.precision}"]
    if e.recipe:
        parts.append(f"recipe: {e.recipe}")
    parts.append(f"rule: {e.rule}: {e.reason}")
    if e.sqnr_db is not None:
        parts.append(f"SQNR: {e.sqnr_db:.1f} dB")
    return "\n".join(parts)


def _node(b: Box, indent: str) -> str:
    label = f"{b.label}\n{b.detail}" if b.detail else b.label
    shape = "box3d" if b.kind == "summary" else "box"
    attrs = {
        "id": _q(b.id),
        # Graphviz prepends "node" to the class of every node's <g> in SVG output.
        "class": _q(b.precision if b.kind == "node" else f"summary {b.precision}"),
        "label": _q(label),
        "fillcolor": _q(COLORS.get(b.precision, COLORS["mixed"])),
        "shape": shape,
        "tooltip": _q(_tooltip(b)),
    }
    if b.entry is not None and b.entry.gemm:
        attrs["penwidth"] = "2"
    return f"{indent}{_q(b.id)} [" + ", ".join(f"{k}={v}" for k, v in attrs.items()) + "];"


def _cluster_tree(groups: list[str]) -> dict[str, list[str]]:
    """``{group: child groups}`` including every prefix (``layers`` → ``layers.3``)."""
    children: dict[str, set[str]] = defaultdict(set)
    for g in groups:
        parts = g.split(".") if g else []
        for i in range(len(parts)):
            parent = ".".join(parts[:i])
            children[parent].add(".".join(parts[: i + 1]))
    return {k: sorted(v) for k, v in children.items()}


def to_dot(plan: Plan, collapse: bool | None = False) -> str:
    """DOT text of ``plan``: node id ``g{graph}_{name}``, edges along ``inputs``, a subgraph
    cluster per module prefix.  ``collapse`` as in :func:`fp8compile.report.layout.boxes`
    (off by default: the DOT file carries every node)."""
    drawn = boxes(plan, collapse)
    by_group: dict[str, list[Box]] = defaultdict(list)
    for b in drawn:
        by_group[b.group].append(b)
    tree = _cluster_tree(list(by_group))
    lines = [
        "digraph fp8plan {",
        "  rankdir=TB; nodesep=0.25; ranksep=0.35;",
        '  node [style="filled,rounded", fontname="Helvetica", fontsize=10, height=0.3];',
        '  edge [color="#888888", arrowsize=0.6];',
    ]

    def emit(group: str, indent: str) -> None:
        for b in by_group.get(group, []):
            lines.append(_node(b, indent))
        for child in tree.get(group, []):
            cid = "cluster_" + child.replace(".", "_")
            lines.append(f"{indent}subgraph {_q(cid)} {{")
            lines.append(
                f'{indent}  label={_q(child)}; style="rounded,dashed"; color="#999999"; '
                f'fontname="Helvetica"; fontsize=9;'
            )
            emit(child, indent + "  ")
            lines.append(f"{indent}}}")

    emit("", "  ")
    for s, d in edges(plan, drawn):
        lines.append(f"  {_q(s)} -> {_q(d)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
