"""Precision conflicts: a tensor that leaves an FP8 GEMM, is forced to high precision, and
enters another FP8 GEMM through nothing but elementwise and view ops.

Each such path pays one extra dequantize/quantize round trip (and the high-precision node's
memory traffic) that a consistent decision would avoid: either run the middle node in FP8 too,
or keep its neighbours in high precision.

Example::

    >>> for msg in conflicts(plan):   # doctest: +SKIP
    ...     print(msg)
"""

from __future__ import annotations

from collections import defaultdict

from ..plan import Plan, PlanEntry

__all__ = ["conflicts"]

# Ops a value passes through without changing what precision it wants: pointwise math and
# views.  A norm or softmax reduces over a dim and is a real boundary, so it is not here.
PASS_THROUGH = frozenset(
    """view reshape transpose permute contiguous flatten unflatten squeeze unsqueeze expand
    t clone to type_as float half bfloat16 dropout identity getitem split chunk cat
    add sub mul div neg silu gelu relu tanh sigmoid exp pow sqrt rsqrt abs clamp where
    masked_fill""".split()
)


def _is_high(e: PlanEntry) -> bool:
    """A node that a decision (not mere pass-through) put in high precision."""
    return not e.is_fp8 and e.rule != "as-is"


def conflicts(plan: Plan) -> list[str]:
    """Messages, one per FP8 GEMM → high-precision node(s) → FP8 GEMM path.

    Between the two FP8 GEMMs only pass-through ops (:data:`PASS_THROUGH`) and demoted GEMMs
    may sit, and at least one of them must have been put in high precision by an override,
    calibration or a size/shape limit (``rule != "as-is"``); paths through nodes a sensitivity
    rule protects (``rule:norm``, ``rule:residual``...) are boundaries, not conflicts.
    """
    by_key = {(e.graph, e.name): e for e in plan}
    users: dict[tuple[int, str], list[PlanEntry]] = defaultdict(list)
    for e in plan:
        for i in e.inputs:
            if (e.graph, i) in by_key:
                users[(e.graph, i)].append(e)
    found: dict[tuple[int, str, str, tuple[str, ...]], None] = {}

    def walk(src: PlanEntry, e: PlanEntry, path: list[PlanEntry]) -> None:
        for u in users[(e.graph, e.name)]:
            if u.gemm and u.is_fp8:
                if any(_is_high(p) for p in path):
                    found[(src.graph, src.name, u.name, tuple(p.name for p in path))] = None
                continue
            # A node a sensitivity rule protects (norm, residual stream, softmax) is a boundary
            # by design: the next GEMM quantizes a fresh tensor, not the one that bounced.
            if u.rule.startswith("rule:"):
                continue
            passes = (u.gemm and not u.is_fp8) or u.op in PASS_THROUGH
            if passes and len(path) < 16 and u not in path:
                walk(src, u, path + [u])

    for e in plan:
        if e.gemm and e.is_fp8:
            walk(e, e, [])
    out = []
    for g, src, dst, mid in found:
        a, b = by_key[(g, src)], by_key[(g, dst)]
        hp = [by_key[(g, m)] for m in mid]
        why = "; ".join(f"{p.name}: {p.precision} by {p.rule}" for p in hp if _is_high(p))
        chain = " -> ".join([_fmt(a)] + [_fmt(p) for p in hp] + [_fmt(b)])
        out.append(
            f"precision conflict: {chain}: the tensor is dequantized from FP8 and quantized "
            f"again ({why}); run the middle in FP8 or its neighbours in high precision "
            f"(overrides) to save the casts"
        )
    return out


def _fmt(e: PlanEntry) -> str:
    where = f" [{e.module}]" if e.module else ""
    return f"{e.name}{where} ({e.precision})"
