"""The plan as a graph, grouped by module, and a layered top-to-bottom layout of it.

Everything the DOT, SVG and HTML writers draw comes from here: :func:`boxes` turns a plan into
the boxes to draw (one per entry, or, collapsed, one per GEMM / sensitive node plus one summary
per module), :func:`edges` connects them, :func:`layered` places them.

The fallback layout is the classic Sugiyama recipe reduced to what a dataflow graph needs:
rank = longest path from a source (so every edge points down), order within a rank by the mean
position of the parents (barycenter), a few down and up sweeps.  Graphviz does better; this one
is dependency-free beyond networkx and deterministic, so a committed picture is reproducible.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import networkx as nx

from ..config import Precision
from ..plan import Plan, PlanEntry

__all__ = ["Box", "boxes", "edges", "group_of", "layered", "node_id", "COLORS"]

# Fill colors by precision: FP8 green, BF16 blue, FP16 teal, FP32 orange; "mixed" for summaries.
COLORS: dict[str, str] = {
    Precision.FP8.value: "#7bc96f",
    Precision.BF16.value: "#7aa6e0",
    Precision.FP16.value: "#5fc4bd",
    Precision.FP32.value: "#f2a65a",
    "mixed": "#d9d9d9",
}

# Above this many entries, the HTML page draws only GEMMs and rule-protected nodes and folds
# the rest into one box per module: a 32-layer LLaMA has ~2,000 nodes, ~450 of them kept.
COLLAPSE_ABOVE = 300


def node_id(e: PlanEntry) -> str:
    """Stable id of an entry across DOT/SVG/HTML: graph index + FX node name."""
    return f"g{e.graph}_{e.name}"


@dataclasses.dataclass
class Box:
    """One drawn box: a plan entry, or (collapsed) a summary of several entries of a module."""

    id: str
    label: str
    detail: str
    precision: str
    group: str
    entries: list[PlanEntry]

    @property
    def entry(self) -> PlanEntry | None:
        return self.entries[0] if self.kind == "node" else None

    @property
    def kind(self) -> str:
        return "summary" if self.id.startswith(("sum_", "rep_")) else "node"


def _parent(module: str) -> str:
    return module.rsplit(".", 1)[0] if "." in module else ""


def _entry_ids(plan: Plan) -> dict[tuple[int, str], PlanEntry]:
    return {(e.graph, e.name): e for e in plan}


def group_of(plan: Plan) -> dict[str, str]:
    """Module group (cluster) of each entry id.

    A node with a module (``layers.3.mlp.up_proj``) belongs to its parent (``layers.3.mlp``);
    views and elementwise ops carry no module, so they join the group of their first input
    that has one (the ``silu`` after ``gate_proj`` sits in ``layers.3.mlp``).
    """
    by_key = _entry_ids(plan)
    ops = defaultdict(int)
    for e in plan:
        ops[(e.graph, e.module)] += 1
    out: dict[str, str] = {}
    for e in plan:  # entries are in graph (topological) order
        if e.module:
            # A module that is one op (Linear, RMSNorm as one call) sits in its parent's frame;
            # a module of several ops (an attention, a decomposed norm) is a frame of its own.
            alone = e.gemm or ops[(e.graph, e.module)] == 1
            out[node_id(e)] = _parent(e.module) if alone else e.module
            continue
        g = ""
        for i in e.inputs:
            p = by_key.get((e.graph, i))
            if p is not None:
                g = out[node_id(p)]
                break
        out[node_id(e)] = g
    return out


def _label(e: PlanEntry) -> tuple[str, str]:
    title = e.module.rsplit(".", 1)[-1] if e.gemm and e.module else e.name
    detail = e.op
    if e.out_shape is not None:
        detail += " " + "×".join("?" if d is None else str(d) for d in e.out_shape)
    return title, detail


# Norm ops that are one node; a norm written out as pow/mean/rsqrt/mul folds into a summary.
_NORM_OPS = frozenset({"rms_norm", "layer_norm", "group_norm", "batch_norm", "instance_norm"})


def _kept(e: PlanEntry) -> bool:
    if e.gemm:
        return True
    if e.rule == "rule:norm":
        return e.op in _NORM_OPS
    return e.rule.startswith("rule:")


def _block(module: str) -> tuple[str, int] | None:
    """``("model.layers", 3)`` for ``model.layers.3.mlp.up_proj``; None outside numbered blocks."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None


def _repeats(plan: Plan) -> dict[str, tuple[str, int, int]]:
    """Entries of numbered blocks (``layers.N``) that repeat an earlier block exactly (same ops,
    module paths, precisions and rules): ``{node id: (stem, first block of its run, rep)}``.

    A 32-layer model then draws one block in full and "layers.1–31: 31 × layers.0"; a block
    that differs (a demoted layer, an override) breaks the run and is drawn in full.
    """
    members: dict[tuple[int, str, int], list[PlanEntry]] = defaultdict(list)
    for e in plan:
        b = _block(e.module) if e.module else None
        if b is not None:
            members[(e.graph, *b)].append(e)

    def signature(key, entries):
        cut = len(key[1]) + len(str(key[2])) + 1
        return tuple((e.module[cut:], e.op, e.precision.value, e.rule) for e in entries)

    seen: dict[tuple, int] = {}
    out: dict[str, tuple[str, int, int]] = {}
    run_of: dict[tuple[int, str], tuple[int, int, int]] = {}  # (graph, stem) -> start, last, rep
    for key in sorted(members, key=lambda k: (k[0], k[1], k[2])):
        graph, stem, idx = key
        sig = (graph, stem, signature(key, members[key]))
        rep = seen.setdefault(sig, idx)
        if rep == idx:
            continue
        start, last, prev_rep = run_of.get((graph, stem), (-1, -2, -1))
        if not (last == idx - 1 and prev_rep == rep):
            start = idx
        run_of[(graph, stem)] = (start, idx, rep)
        for e in members[key]:
            out[node_id(e)] = (stem, start, rep)
    return out


def boxes(plan: Plan, collapse: bool | None = None) -> list[Box]:
    """The boxes to draw, in plan order.

    ``collapse=None`` collapses plans of more than :data:`COLLAPSE_ABOVE` entries: numbered
    blocks that repeat an earlier one fold into one box per run; in the rest, GEMMs and nodes a
    rule decided stay and the other nodes of a module between two of them fold into a summary.
    """
    if collapse is None:
        collapse = len(plan) > COLLAPSE_ABOVE
    groups = group_of(plan)
    repeats = _repeats(plan) if collapse else {}
    out: list[Box] = []
    summaries: dict[tuple[int, str, int], Box] = {}
    runs: dict[tuple[int, str, int], Box] = {}
    run = 0  # kept nodes so far: a module's ops between two kept nodes form one summary,
    # which keeps the collapsed graph (nearly) acyclic and in source order
    for e in plan:
        nid, g = node_id(e), groups[node_id(e)]
        if nid in repeats:
            stem, start, rep = repeats[nid]
            box = runs.get((e.graph, stem, start))
            if box is None:
                box = Box(f"rep_g{e.graph}_{stem}_{start}", "", f"{stem}.{rep}", "mixed",
                          stem, [])
                runs[(e.graph, stem, start)] = box
                out.append(box)
            box.entries.append(e)
            continue
        if not collapse or _kept(e):
            title, detail = _label(e)
            out.append(Box(nid, title, detail, e.precision.value, g, [e]))
            run += 1
            continue
        key = (e.graph, g, run)
        box = summaries.get(key)
        if box is None:
            short = ".".join(g.split(".")[-2:]) if g else "(top level)"
            box = Box(f"sum_g{e.graph}_{run}_{g or 'root'}", short, "", "", g, [])
            summaries[key] = box
            out.append(box)
        box.entries.append(e)
    for i, box in enumerate(out):  # a "summary" of one node is that node
        if box.kind == "summary" and len(box.entries) == 1:
            e = box.entries[0]
            out[i] = Box(node_id(e), *_label(e), e.precision.value, box.group, [e])
    for box in runs.values():
        stem, rep = box.group, box.detail
        idx = sorted({_block(e.module)[1] for e in box.entries})
        box.label = f"{stem}.{idx[0]}–{idx[-1]}" if len(idx) > 1 else f"{stem}.{idx[0]}"
        gemms = [e for e in box.entries if e.gemm]
        fp8 = sum(e.is_fp8 for e in gemms)
        box.detail = (
            f"{len(idx)} × same as {rep}; "
            f"{fp8 // len(idx)}/{len(gemms) // len(idx)} fp8"
        )
        precisions = {e.precision.value for e in box.entries}
        box.precision = precisions.pop() if len(precisions) == 1 else "mixed"
    for box in (b for b in out if b.kind == "summary" and not b.id.startswith("rep_")):
        precisions = {e.precision.value for e in box.entries}
        box.precision = precisions.pop() if len(precisions) == 1 else "mixed"
        ops = defaultdict(int)
        for e in box.entries:
            ops[e.op] += 1
        top = sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        box.detail = f"{len(box.entries)} ops: " + ", ".join(f"{n}×{op}" for op, n in top)
    return out


def edges(plan: Plan, drawn: list[Box]) -> list[tuple[str, str]]:
    """Edges between drawn boxes: entry inputs that are entries (weights and graph inputs are
    not), mapped onto the box that holds each end; self-loops and duplicates dropped."""
    where = {node_id(e): b.id for b in drawn for e in b.entries}
    by_key = _entry_ids(plan)
    out: dict[tuple[str, str], None] = {}
    for e in plan:
        dst = where[node_id(e)]
        for i in e.inputs:
            p = by_key.get((e.graph, i))
            if p is None:
                continue
            src = where[node_id(p)]
            if src != dst:
                out[(src, dst)] = None
    return list(out)


def layered(
    nodes: list[str], links: list[tuple[str, str]], sweeps: int = 4
) -> dict[str, tuple[int, int]]:
    """``{node: (rank, order)}``: rank = longest path from a source, order by barycenter.

    Collapsing can create cycles between summary boxes; edges that close one are ignored for
    ranking (they are still drawn).
    """
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    for s, d in links:
        g.add_edge(s, d)
        if not nx.is_directed_acyclic_graph(g):
            g.remove_edge(s, d)
    rank: dict[str, int] = {}
    for n in nx.topological_sort(g):
        rank[n] = max((rank[p] + 1 for p in g.predecessors(n)), default=0)
    # Pull sources (constants, arange, graph inputs used late) down to just above their first
    # user: at rank 0 they would send edges across the whole picture.
    for n in nodes:
        if g.in_degree(n) == 0 and g.out_degree(n):
            rank[n] = max(0, min(rank[m] for m in g.successors(n)) - 1)
    layers: dict[int, list[str]] = defaultdict(list)
    for n in nodes:  # plan order: a good first guess, it follows the source code
        layers[rank[n]].append(n)
    pos = {n: float(i) for layer in layers.values() for i, n in enumerate(layer)}
    depth = max(layers, default=-1) + 1
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        for r in range(depth) if down else reversed(range(depth)):
            near = g.predecessors if down else g.successors

            def bary(n: str) -> float:
                ns = list(near(n))
                return sum(pos[m] for m in ns) / len(ns) if ns else pos[n]

            layers[r].sort(key=lambda n: (bary(n), pos[n]))
            for i, n in enumerate(layers[r]):
                pos[n] = float(i)
    return {n: (r, i) for r, layer in layers.items() for i, n in enumerate(layer)}
