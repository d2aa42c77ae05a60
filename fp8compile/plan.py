"""The precision plan: per node, what it runs in and why.

The backend, :func:`plan`, the report (table, DOT, SVG, HTML), the ONNX exporter and the CLI all
read the same :class:`Plan`.

Example::

    >>> import torch, fp8compile
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(),
    ...                             torch.nn.Linear(256, 256))
    >>> p = fp8compile.plan(model, torch.randn(4, 256))
    >>> [e.precision for e in p if e.op == "linear"]
    ['fp8', 'fp32']
    >>> print(p.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from .config import Fp8Config, Precision

__all__ = ["Plan", "PlanEntry", "plan"]


@dataclasses.dataclass
class PlanEntry:
    """One node of a compiled graph and the decision taken for it.

    ``precision`` is what the node runs in; ``rule`` says which rule decided (``override:GLOB``,
    ``rule:norm``, ``shape``, ``small``, ``fp8``, ``dtype``, ...), ``reason`` says why in words.
    """

    name: str
    op: str
    module: str
    precision: Precision
    reason: str
    rule: str
    recipe: str | None = None
    module_type: str = ""
    graph: int = 0
    inputs: list[str] = dataclasses.field(default_factory=list)
    in_shapes: list[tuple | None] = dataclasses.field(default_factory=list)
    out_shape: tuple | None = None
    dtype: str | None = None
    gemm: str | None = None
    flops: int | None = None
    weight: str | None = None
    weight_numel: int | None = None
    granularity: str | None = None
    sqnr_db: float | None = None
    amax: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_fp8(self) -> bool:
        return self.precision is Precision.FP8

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["precision"] = self.precision.value
        return d


class Plan:
    """An ordered collection of :class:`PlanEntry` (one per compute node), plus stats."""

    def __init__(
        self,
        entries: list[PlanEntry],
        config: Fp8Config | None = None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        self.entries = list(entries)
        self.config = config or Fp8Config()
        self.stats = dict(stats or {})

    # -- container protocol ---------------------------------------------------------------

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | str) -> PlanEntry:
        if isinstance(key, int):
            return self.entries[key]
        for e in self.entries:
            if e.name == key:
                return e
        raise KeyError(f"no node named {key!r} in the plan")

    def __repr__(self) -> str:
        c = self.counts()
        return f"Plan({len(self)} nodes, {c.get('fp8', 0)} fp8, recipe={self.config.recipe})"

    @classmethod
    def merge(cls, plans: list["Plan"]) -> "Plan":
        if not plans:
            return cls([])
        stats: dict[str, Any] = {}
        for p in plans:
            for k, v in p.stats.items():
                if k == "weights_kept":  # one model's weights, kept for the same reasons
                    stats[k] = list(dict.fromkeys([*stats.get(k, []), *v]))
                elif isinstance(v, list):
                    stats[k] = [*stats.get(k, []), *v]
                elif isinstance(v, dict):
                    stats[k] = {**stats.get(k, {}), **v}
                else:
                    stats[k] = stats.get(k, 0) + v if isinstance(v, (int, float)) else v
        parts = stats.get("weight_parts")
        if parts and all("weight_parts" in p.stats for p in plans if "weight_bytes" in p.stats):
            # Graphs of one model quantize the same weights and share the FP8 copies: each
            # counted once.
            stats["weight_bytes"] = sum(v for k, v in parts.items() if k.startswith("high:"))
            stats["fp8_weight_bytes"] = sum(v for k, v in parts.items() if k.startswith("fp8:"))
            stats["quantized_weights"] = sum(k.startswith("high:") for k in parts)
        return cls([e for p in plans for e in p], plans[-1].config, stats)

    # -- queries ------------------------------------------------------------------------

    @property
    def gemms(self) -> list[PlanEntry]:
        return [e for e in self if e.gemm]

    @property
    def fp8(self) -> list[PlanEntry]:
        return [e for e in self if e.is_fp8]

    def by_module(self, module: str) -> list[PlanEntry]:
        return [e for e in self if e.module == module]

    def counts(self) -> Counter:
        return Counter(e.precision.value for e in self)

    def fp8_flop_share(self) -> float:
        total = sum(e.flops or 0 for e in self.gemms)
        fp8 = sum(e.flops or 0 for e in self.gemms if e.is_fp8)
        return fp8 / total if total else 0.0

    # -- output ---------------------------------------------------------------------------

    def summary(self, gemms_only: bool = False) -> str:
        """A readable table: every GEMM, then the sensitive nodes, then totals."""
        rows = [e for e in self if e.gemm or (not gemms_only and e.rule.startswith("rule:"))]
        header = ("node", "op", "module", "shape", "precision", "reason")
        table = [header] + [
            (
                e.name,
                e.op,
                e.module or "-",
                _shape(e),
                e.precision.value + (f" ({e.recipe})" if e.recipe else ""),
                e.reason,
            )
            for e in rows
        ]
        widths = [min(max(len(r[i]) for r in table), 48) for i in range(len(header) - 1)]
        lines = []
        for r in table:
            cells = [c[:w].ljust(w) for c, w in zip(r[:-1], widths)]
            lines.append("  ".join(cells + [r[-1]]))
            if r is header:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
        c = self.counts()
        lines.append("")
        lines.append(
            f"{len(self.gemms)} GEMMs: {len(self.fp8)} fp8, {len(self.gemms) - len(self.fp8)} "
            f"high precision; {100 * self.fp8_flop_share():.1f}% of GEMM FLOPs in FP8; "
            f"nodes by precision: {dict(sorted(c.items()))}"
        )
        if "weight_bytes" in self.stats:
            what = ("weights quantized once" if self.stats.get("inference", True)
                    else "weights cached in FP8 per parameter version (W and Wᵀ)")
            lines.append(
                f"{what}: {self.stats['weight_bytes'] / 2**20:.2f} MiB -> "
                f"{self.stats['fp8_weight_bytes'] / 2**20:.2f} MiB in FP8 (scales included)"
            )
        if "released_weight_bytes" in self.stats:
            lines.append(
                f"high-precision weights released (release_weights): "
                f"{self.stats['released_weights']}, "
                f"{self.stats['released_weight_bytes'] / 2**20:.2f} MiB freed")
        if self.stats.get("weights_kept"):
            lines.append("weights kept in high precision:")
            lines.extend(f"  {line}" for line in self.stats["weights_kept"])
        if self.stats.get("decomposed"):
            lines.append("fused PyTorch calls taken apart into their GEMMs and attention:")
            lines.extend(f"  {line}" for line in self.stats["decomposed"])
        if self.stats.get("kept_whole"):
            lines.append("fused PyTorch calls kept whole (their GEMMs stay in them):")
            lines.extend(f"  {line}" for line in self.stats["kept_whole"])
        if "compile_s" in self.stats:
            lines.append(f"compile time: {self.stats['compile_s']:.2f} s")
        if self.stats.get("fused_gemms"):
            lines.append("FP8 GEMMs fused (one GEMM over stacked weights, each takes its "
                         "columns):")
            lines.extend(f"  {line}" for line in self.stats["fused_gemms"])
        if self.stats.get("gemm_backends"):
            lines.append("GEMM backends chosen at compile time:")
            lines.extend(f"  {line}" for line in self.stats["gemm_backends"])
        if "inline_failed" in self.stats:
            lines.append("FP8 ops compiled as opaque calls: inlining their kernels failed ("
                         f"{self.stats['inline_failed']})")
        return "\n".join(lines)

    def to_html(self, path: str | None = None, **options: Any) -> str:
        """A self-contained HTML page: the graph colored by precision, details per node.
        ``options`` go to :func:`fp8compile.report.to_html` (``engine``, ``collapse``)."""
        from .report import to_html

        return to_html(self, path, **options)

    def to_dot(self, **options: Any) -> str:
        """The graph in Graphviz DOT, nodes colored by precision (``collapse=...``)."""
        from .report import to_dot

        return to_dot(self, **options)

    def to_svg(self, path: str | None = None, **options: Any) -> str:
        """The graph as SVG (graphviz when installed, a pure-Python layout otherwise);
        ``options``: ``engine``, ``collapse``."""
        from .report import to_svg

        return to_svg(self, path, **options)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "stats": self.stats,
            "entries": [e.to_dict() for e in self],
        }

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, default=str)
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text


def _shape(e: PlanEntry) -> str:
    if e.gemm and e.in_shapes:
        return " x ".join(_fmt_shape(s) for s in e.in_shapes[:2])
    return _fmt_shape(e.out_shape)


def _fmt_shape(s) -> str:
    if s is None:
        return "?"
    return "(" + ",".join("?" if d is None else str(d) for d in s) + ")"


def plan(
    model: torch.nn.Module | Any,
    *args: Any,
    config: Fp8Config | dict | None = None,
    **kwargs: Any,
) -> Plan:
    """Analyse ``model(*args, **kwargs)`` as ``torch.compile(backend="fp8hpf")`` would, without
    compiling, and return the plan (merged over every graph Dynamo hands over).

    The model runs once, eagerly, on the given arguments.
    """
    from .backend import Fp8Backend
    from .passes.weights import check_model

    check_model(getattr(model, "_orig_mod", model), "fp8compile.plan")
    backend = Fp8Backend(config, compile=False)
    compiled = torch.compile(model, backend=backend, dynamic=False)

    with torch.no_grad():
        compiled(*args, **kwargs)
    if not backend.plans:
        raise RuntimeError(
            "Dynamo handed no graph to fp8compile (the model may be compiled too often for this "
            "code object: raise torch._dynamo.config.recompile_limit or call "
            "torch._dynamo.reset())"
        )
    return Plan.merge(backend.plans)
