"""Calibration: run sample batches, measure per FP8 candidate what FP8 would cost in accuracy.

For every linear the plan would run in FP8, a forward hook quantizes the layer's real input and
weight with the config's recipe (the :mod:`fp8compile.numerics` reference), runs the GEMM on
the dequantized values, and compares with the high-precision output.  Per layer it records

* ``sqnr_db``: signal-to-quantization-noise ratio of the output over all batches
  (``10 log10(Σ ref² / Σ (ref − fp8)²)``, energies summed over batches, not dB averaged);
* ``amax``: max |activation| seen (the static activation scale for ``scaling="static"``);
* ``saturation``: share of quantized activations at ±max of the format (dynamic scaling puts
  the group's amax there by design, so a high share means heavy outliers), or, with static
  scaling, the share of |x| above the calibrated/static amax;
* ``underflow``: share of nonzero activations that quantize to 0;
* ``weight_underflow``: share of nonzero weights that quantize to 0 (one outlier column under a
  tensorwise scale sends the rest of the weight there).

:attr:`Calibration.config` writes the figures into the config; with ``min_sqnr_db`` the
precision pass demotes the layers below it (rule ``calibration``, the dB figure in the reason).

Example::

    >>> cal = fp8compile.calibrate(model, [(x,) for x in batches], min_sqnr_db=20)  # doctest: +SKIP
    >>> print(cal.table())                                                        # doctest: +SKIP
    >>> p = fp8compile.plan(model, x, config=cal.config)                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import Fp8Config, Scaling
from .numerics import dequantize, quantize

__all__ = ["Calibration", "LayerStats", "calibrate"]


@dataclasses.dataclass
class LayerStats:
    """Figures for one FP8 candidate, accumulated over the batches."""

    module: str
    signal: float = 0.0
    noise: float = 0.0
    amax: float = 0.0
    saturated: int = 0
    underflow: int = 0
    nonzero: int = 0
    count: int = 0
    calls: int = 0
    weight_underflow: float = 0.0

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10 * math.log10(self.signal / self.noise)

    @property
    def saturation(self) -> float:
        return self.saturated / self.count if self.count else 0.0

    @property
    def underflow_rate(self) -> float:
        return self.underflow / self.nonzero if self.nonzero else 0.0


@dataclasses.dataclass
class Calibration:
    """What :func:`calibrate` measured; ``config`` carries it into :func:`fp8compile.plan`."""

    base: Fp8Config
    layers: dict[str, LayerStats]
    min_sqnr_db: float | None
    batches: int
    seconds: float

    @property
    def config(self) -> Fp8Config:
        """``base`` with ``calibration=((module, sqnr_db, amax), ...)`` and ``min_sqnr_db``."""
        figures = tuple(
            (m, _finite(s.sqnr_db), float(s.amax)) for m, s in sorted(self.layers.items())
        )
        return self.base.replace(calibration=figures, min_sqnr_db=self.min_sqnr_db)

    @property
    def failing(self) -> list[str]:
        """Modules below ``min_sqnr_db`` (the plan demotes them)."""
        if self.min_sqnr_db is None:
            return []
        return [m for m, s in self.layers.items() if s.sqnr_db < self.min_sqnr_db]

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "seconds": self.seconds,
            "layers": len(self.layers),
            "failing": len(self.failing),
            "min_sqnr_db": self.min_sqnr_db,
            "per_layer": {
                m: {
                    "sqnr_db": s.sqnr_db,
                    "amax": s.amax,
                    "saturation": s.saturation,
                    "underflow": s.underflow_rate,
                    "weight_underflow": s.weight_underflow,
                }
                for m, s in self.layers.items()
            },
        }

    def table(self) -> str:
        """One line per layer: SQNR, amax, saturation, underflow, and the verdict."""
        header = ("module", "SQNR dB", "amax", "saturated", "underflow", "w underflow",
                  "verdict")
        rows = [header]
        for m, s in self.layers.items():
            ok = self.min_sqnr_db is None or s.sqnr_db >= self.min_sqnr_db
            verdict = "fp8" if ok else f"demote (< {self.min_sqnr_db:g} dB)"
            rows.append((
                m, f"{s.sqnr_db:.1f}", f"{s.amax:.4g}", f"{100 * s.saturation:.3f}%",
                f"{100 * s.underflow_rate:.3f}%", f"{100 * s.weight_underflow:.3f}%", verdict,
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"\n{len(self.layers)} FP8 candidates over {self.batches} batches in "
            f"{self.seconds:.1f} s; {len(self.failing)} below the threshold"
        )
        return "\n".join(lines)


def _finite(x: float) -> float:
    # JSON and the config validation want finite numbers: exact FP8 (zero noise) -> 1000 dB.
    return max(min(x, 1000.0), -1000.0)


def _args(batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise TypeError(
        f"calibrate: a batch must be a tensor or a tuple of model arguments, got "
        f"{type(batch).__name__}; wrap it as (x,)"
    )


class _Progress:
    """tqdm when installed, else a counter on stderr."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.bar = None
        self.n, self.total, self.enabled = 0, total, enabled
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="calibrate", unit="batch")
            except ImportError:
                pass

    def update(self) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            of = f"/{self.total}" if self.total else ""
            print(f"\rcalibrate: batch {self.n}{of}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n:
            print(file=sys.stderr)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    config: Fp8Config | dict | None = None,
    *,
    min_sqnr_db: float | None = None,
    progress: bool = True,
) -> Calibration:
    """Measure FP8 error per candidate linear of ``model`` over ``batches``.

    ``batches`` yields tuples of model arguments (or single tensors).  The first batch also
    builds the plan that names the candidates (``e.gemm == "linear"`` and FP8 in the plan for
    ``config``).  ``min_sqnr_db`` (default: ``config.min_sqnr_db``) is the threshold the
    returned ``Calibration.config`` carries.
    """
    from .passes.weights import check_model
    from .plan import plan as make_plan

    check_model(model, "fp8compile.calibrate")
    cfg = Fp8Config.from_dict(config) if config is not None else Fp8Config()
    if min_sqnr_db is None:
        min_sqnr_db = cfg.min_sqnr_db
    # Measure without earlier figures: a layer demoted last time must be a candidate again.
    # The plan only names the candidates, which the epilogue folds do not change; without
    # them it takes no compile-time timing (the SwiGLU fold's compiled and timed Hopper
    # kernels for 4 s of a cold calibration on an H200).
    probe_cfg = cfg.replace(calibration=(), min_sqnr_db=None, fuse_swiglu=False,
                            fuse_epilogues=False, fuse_residual=False)
    it = iter(batches)
    try:
        first = _args(next(it))
    except StopIteration:
        raise ValueError("calibrate: batches is empty; pass at least one batch") from None
    p = make_plan(model, *first, config=probe_cfg)
    modules: dict[str, nn.Linear] = {}
    for e in p:
        if e.gemm != "linear" or not e.is_fp8 or not e.module:
            continue
        try:
            m = model.get_submodule(e.module)
        except AttributeError:
            continue
        if isinstance(m, nn.Linear):
            modules[e.module] = m
    if not modules:
        raise ValueError(
            "calibrate: the plan has no FP8 nn.Linear to measure; check the config "
            "(min_weight_numel, overrides) with fp8compile.plan(model, x).summary()"
        )

    layers = {name: LayerStats(name) for name in modules}
    act_g, w_g = cfg.recipe.activation_granularity, cfg.recipe.weight_granularity
    a_fmt, w_fmt = cfg.activation_format, cfg.weight_format
    fmax = a_fmt.max
    weights: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def run(mod: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
            st = layers[name]
            x = inputs[0].detach().float()
            w = mod.weight.detach().float()
            if name not in weights:  # weights do not change during calibration
                qw, sw = quantize(w, w_g, w_fmt, cfg.power_of_2_scales)
                weights[name] = dequantize(qw, sw, w_g)
                nzw = w != 0
                st.weight_underflow = float((nzw & (qw.float() == 0)).sum()) / max(
                    1, int(nzw.sum())
                )
            b = None if mod.bias is None else mod.bias.detach().float()
            ref = F.linear(x, w, b)
            qx, sx = quantize(x, act_g, a_fmt, cfg.power_of_2_scales)
            xq = dequantize(qx, sx, act_g)
            approx = F.linear(xq, weights[name], b)
            st.signal += float(ref.double().pow(2).sum())
            st.noise += float((ref.double() - approx.double()).pow(2).sum())
            ax = x.abs()
            st.amax = max(st.amax, float(ax.max())) if x.numel() else st.amax
            qf = qx.float()
            if cfg.scaling is Scaling.STATIC:
                static = cfg.static_amax(name)
                st.saturated += int((ax > static).sum()) if static else 0
            else:
                st.saturated += int((qf.abs() >= fmax).sum())
            nz = x != 0
            st.nonzero += int(nz.sum())
            st.underflow += int((nz & (qf == 0)).sum())
            st.count += x.numel()
            st.calls += 1

        return run

    total = None
    try:
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    except TypeError:
        pass
    bar = _Progress(total, progress)
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    start = time.perf_counter()
    n = 0
    try:
        with torch.no_grad():
            for batch in _chain(first, it):
                model(*batch)
                n += 1
                bar.update()
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return Calibration(cfg, layers, min_sqnr_db, n, time.perf_counter() - start)


def _chain(first: tuple, rest):
    yield first
    for b in rest:
        yield _args(b)
