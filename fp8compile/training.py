"""FP8 training helpers: saved-activation accounting, amax state, overflow monitor, demotion.

Training itself needs nothing from this module: ``torch.compile(model, backend="fp8hpf")``
with gradients enabled rewrites each FP8 linear to ``fp8compile::linear`` (FP8 forward, FP8
``dX`` and ``dW``, FP8 activation saved) or, with ``scaling="delayed"``, to
``fp8compile::linear_delayed`` whose amax histories the compiled graph updates.  Parameters
stay in their own dtype (FP32 master weights get FP32 gradients), so optimizers,
``torch.amp.GradScaler`` and ``torch.nn.utils.clip_grad_norm_`` see ordinary tensors.

What this module adds:

* :func:`saved_tensor_bytes` measures what autograd keeps for backward (by dtype) with
  ``torch.autograd.graph.saved_tensors_hooks``; :func:`saved_activation_estimate` computes
  the FP8 linears' share from a plan.
* :func:`amax_histories` shows the delayed-scaling state of a backend, per layer.
* :class:`Fp8Monitor` counts, per layer, the values FP8 quantization saturates (clamps to
  ±fmax) and flushes to zero, for activations, weights and output gradients.  It runs *on
  demand*: one extra forward and backward of the eager module with hooks and the numerics
  reference, because counting inside the compiled graph would add a reduction per tensor to
  every step.  With ``demote=True`` it turns a layer whose overflow (or underflow) rate stays
  above a threshold into a BF16 override (the "dynamic precision" of the design brief);
  :meth:`Fp8Monitor.backend` compiles with it, and the plan's reason says why.

Example::

    >>> import torch, fp8compile
    >>> from fp8compile.training import saved_tensor_bytes
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
    ...                             torch.nn.Linear(256, 256))
    >>> x = torch.randn(64, 256)
    >>> saved = saved_tensor_bytes(lambda: model(x).sum(), exclude=model.parameters())
    >>> saved.total > 0
    True
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import numerics as nx
from .backend import Fp8Backend
from .config import Fp8Config, Precision, Scaling
from .numerics import Fp8Format, Granularity
from .ops.training_state import AmaxHistory, delayed_scale
from .plan import Plan

__all__ = [
    "Fp8Monitor",
    "LayerStats",
    "SavedBytes",
    "TensorStats",
    "amax_histories",
    "quantization_stats",
    "saved_activation_estimate",
    "saved_tensor_bytes",
]

log = logging.getLogger("fp8compile.training")


# --------------------------------------------------------------------------------------
# saved activations


@dataclasses.dataclass
class SavedBytes:
    """Bytes autograd saved for backward during one forward, by dtype (deduplicated by
    storage; tensors in ``exclude``, such as parameters, not counted)."""

    by_dtype: dict[str, int]
    tensors: int

    @property
    def total(self) -> int:
        return sum(self.by_dtype.values())

    @property
    def fp8(self) -> int:
        return sum(v for k, v in self.by_dtype.items() if "float8" in k)

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in sorted(self.by_dtype.items()))
        return f"{self.total / 2**20:.2f} MiB saved in {self.tensors} tensors ({parts} MiB)"


def saved_tensor_bytes(
    forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
) -> SavedBytes:
    """Run ``forward()`` and account for every tensor autograd saves for its backward.

    Works eagerly and through ``torch.compile`` (the compiled graph's saved tensors pass
    through the same hooks).  The tensors are kept alive until the backward as usual; the
    result of ``forward`` is dropped, so call ``.backward()`` inside ``forward`` if needed.

    Example: ``saved_tensor_bytes(lambda: model(x).sum(), exclude=model.parameters())``.
    """
    skip = {_storage_key(t) for t in exclude}
    seen: set = set()
    by_dtype: dict[str, int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in skip and key not in seen:
            seen.add(key)
            name = str(t.dtype).replace("torch.", "")
            by_dtype[name] = by_dtype.get(name, 0) + t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return SavedBytes(by_dtype, len(seen))


def _storage_key(t: torch.Tensor):
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes(), t.device)
    except (RuntimeError, NotImplementedError):
        return id(t)


def saved_activation_estimate(plan: Plan) -> dict[str, int]:
    """What the FP8 linears of a training plan save for backward, against a high-precision
    linear saving its input: ``{"high_precision_bytes", "fp8_bytes", "saved_bytes"}``.

    Per FP8 linear with input ``x (..., K)``: ``numel(x) * itemsize`` in high precision
    against ``numel(x)`` bytes of FP8 plus 4 bytes per scale (one per 128 elements in
    blockwise, per row in rowwise, one in tensorwise).
    """
    high = fp8 = 0
    for e in plan.fp8:
        if e.gemm != "linear" or not e.weight or not e.in_shapes or e.in_shapes[0] is None:
            continue
        shape = e.in_shapes[0]
        if None in shape:
            continue
        numel, k = math.prod(shape), shape[-1]
        rows = numel // max(k, 1)
        itemsize = torch.empty((), dtype=getattr(torch, e.dtype or "float32")).element_size()
        gran = plan.config.recipe.activation_granularity
        scales = {Granularity.TENSOR: 1, Granularity.ROW: rows}.get(gran, rows * math.ceil(k / 128))
        high += numel * itemsize
        fp8 += numel + 4 * scales
    return {"high_precision_bytes": high, "fp8_bytes": fp8, "saved_bytes": high - fp8}


# --------------------------------------------------------------------------------------
# delayed-scaling state


def amax_histories(backend: Fp8Backend) -> dict[str, dict[str, torch.Tensor]]:
    """The live amax histories of a backend compiled with ``scaling="delayed"``, per module:
    ``{"layers.0.mlp.up": {"activation": (L,), "weight": (L,), "grad": (L,)}}``, newest
    first (views of the buffers the compiled graph updates; zeros before the first step)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for ctx in backend.contexts:
        for p in ctx.extra_inputs:
            if not isinstance(p, AmaxHistory) or p.buf is None:
                continue
            d = out.setdefault(p.module, {})
            if p.kind == "forward":
                d["activation"], d["weight"] = p.buf[0], p.buf[1]
            else:
                d["grad"] = p.buf[0]
    return out


# --------------------------------------------------------------------------------------
# overflow / underflow monitor


@dataclasses.dataclass
class TensorStats:
    """Quantization outcome for one tensor: ``saturated`` finite values beyond ±fmax after
    scaling (clamped), ``flushed`` non-zero values that became zero."""

    numel: int = 0
    nonzero: int = 0
    saturated: int = 0
    flushed: int = 0
    amax: float = 0.0

    def add(self, other: "TensorStats") -> None:
        self.numel += other.numel
        self.nonzero += other.nonzero
        self.saturated += other.saturated
        self.flushed += other.flushed
        self.amax = max(self.amax, other.amax)


@dataclasses.dataclass
class LayerStats:
    """Per layer: :class:`TensorStats` for ``activation``, ``weight`` and ``grad`` (the
    output gradient, in the gradient format)."""

    module: str
    tensors: dict[str, TensorStats] = dataclasses.field(default_factory=dict)

    @property
    def saturated(self) -> int:
        return sum(t.saturated for t in self.tensors.values())

    @property
    def flushed(self) -> int:
        return sum(t.flushed for t in self.tensors.values())

    @property
    def overflow_rate(self) -> float:
        """Saturated fraction of the worst of the layer's tensors (a weight ten times the
        activation's size must not dilute the activation's overflow)."""
        return max((t.saturated / t.numel for t in self.tensors.values() if t.numel),
                   default=0.0)

    @property
    def underflow_rate(self) -> float:
        """Flushed fraction of the non-zero values of the worst of the layer's tensors."""
        return max((t.flushed / t.nonzero for t in self.tensors.values() if t.nonzero),
                   default=0.0)

    def __str__(self) -> str:
        cells = "  ".join(
            f"{k}: sat {t.saturated}/{t.numel} ftz {t.flushed}/{t.nonzero}"
            for k, t in self.tensors.items()
        )
        return f"{self.module}: {cells}"


def quantization_stats(
    x: torch.Tensor,
    granularity: Granularity,
    fmt: Fp8Format,
    power_of_2: bool = False,
    scale: torch.Tensor | None = None,
) -> TensorStats:
    """Count saturated and flushed-to-zero values of quantizing ``x`` (numerics reference);
    ``scale`` given (delayed/static) or computed from ``x`` (dynamic)."""
    x = x.detach()
    if scale is None:
        _, scale = nx.quantize(x, granularity, fmt, power_of_2)
    k = x.shape[-1] if x.dim() else 1
    rows = x.reshape(-1, k).float()
    y = nx.scaled(rows, scale, granularity)
    finite = torch.isfinite(y)
    q = nx.cast_to_fp8(y, fmt).float()
    nonzero = finite & (rows != 0)
    return TensorStats(
        numel=rows.numel(),
        nonzero=int(nonzero.sum()),
        saturated=int((finite & (y.abs() > _saturation_threshold(fmt))).sum()),
        flushed=int((nonzero & (q == 0)).sum()),
        amax=float(nx.amax(rows, Granularity.TENSOR)),
    )


def _saturation_threshold(fmt: Fp8Format) -> float:
    """Smallest |value| the clamp changes beyond rounding: fmax plus half an ulp of the top
    binade (E4M3: 448 + 16, E5M2: 57344 + 4096).  The amax of a dynamically scaled group
    lands on fmax up to fp32 rounding and is not counted."""
    mbits = 3 if fmt is Fp8Format.E4M3 else 2
    return fmt.max + 2.0 ** (math.floor(math.log2(fmt.max)) - mbits - 1)


class Fp8Monitor:
    """On-demand overflow/underflow counts per FP8 layer, and optional demotion to BF16.

    Args:
        model: the module (the original one; a ``torch.compile`` wrapper is unwrapped).
        config: the configuration the model trains with (recipe, formats, scaling).
        backend: the backend it is compiled with; gives the delayed-scaling histories (so
            saturation is counted with the scales the next step will use) and the plan (so
            only layers that run in FP8 are watched).
        max_overflow_rate: demote a layer whose saturated fraction exceeds this ...
        max_underflow_rate: ... or whose flushed fraction of non-zero values exceeds this
            (None: not a criterion) ...
        patience: ... in this many consecutive :meth:`measure` calls.

    Example::

        mon = Fp8Monitor(model, cfg, backend=be, max_overflow_rate=1e-3)
        for step, (x, y) in enumerate(batches):
            ...  # the compiled training step
            if step % 100 == 0:
                stats = mon.measure(lambda m: F.cross_entropy(m(x), y))
                if mon.demoted_since_last:
                    be = mon.backend()                     # recompile with the overrides
                    compiled = torch.compile(model, backend=be)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: Fp8Config | Mapping[str, Any] | None = None,
        *,
        backend: Fp8Backend | None = None,
        max_overflow_rate: float = 1e-3,
        max_underflow_rate: float | None = None,
        patience: int = 3,
    ) -> None:
        self.model = getattr(model, "_orig_mod", model)
        if config is None and backend is not None:
            config = backend.config
        self.config = Fp8Config.from_dict(config) if config is not None else Fp8Config()
        self.backend_ = backend
        self.max_overflow_rate = max_overflow_rate
        self.max_underflow_rate = max_underflow_rate
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"Fp8Monitor patience={patience!r} must be an integer >= 1")
        self.patience = patience
        self.history: list[dict[str, LayerStats]] = []
        self.demoted: dict[str, str] = {}
        self.demoted_since_last: list[str] = []

    # -- measuring --------------------------------------------------------------------------

    def layers(self) -> dict[str, torch.nn.Linear]:
        """The linears watched: those the backend's plan runs in FP8, else every linear that
        no override keeps in high precision."""
        fp8 = None
        if self.backend_ is not None and self.backend_.plans:
            fp8 = {e.module for e in self.backend_.plan.fp8 if e.gemm == "linear"}
        out = {}
        for name, mod in self.model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or name in self.demoted:
                continue
            if fp8 is not None and name not in fp8:
                continue
            ov = self.config.precision_override(name)
            if fp8 is None and ov and ov[1] not in (Precision.FP8, Precision.AUTO):
                continue
            out[name] = mod
        return out

    def measure(self, loss_fn: Callable[[torch.nn.Module], torch.Tensor]) -> dict[str, LayerStats]:
        """Run ``loss_fn(model)`` forward and backward eagerly with counting hooks.

        Gradients are taken with ``torch.autograd.grad``, so ``.grad`` of the parameters is
        left untouched.  Returns (and records) ``{module: LayerStats}``, then applies the
        demotion rule.
        """
        cfg = self.config
        hists = amax_histories(self.backend_) if self.backend_ is not None else {}
        stats: dict[str, LayerStats] = {}
        handles = []

        def hook(name):
            def fwd(mod, args, out):
                st = stats.setdefault(name, LayerStats(name))
                x, h = args[0], hists.get(name, {})
                st.tensors["activation"] = self._stats(x, cfg.activation_format, "x",
                                                       h.get("activation"))
                st.tensors["weight"] = self._stats(mod.weight, cfg.weight_format, "w",
                                                   h.get("weight"))
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    def grad_hook(g, st=st, gh=h.get("grad")):
                        st.tensors["grad"] = self._stats(g, cfg.gradient_format, "x", gh)

                    out.register_hook(grad_hook)
            return fwd

        for name, mod in self.layers().items():
            handles.append(mod.register_forward_hook(hook(name)))
        try:
            with torch.enable_grad():
                loss = loss_fn(self.model)
                params = [p for p in self.model.parameters() if p.requires_grad]
                if params and loss.requires_grad:
                    torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        self.history.append(stats)
        self._update_demotions()
        return stats

    def _stats(self, t, fmt: Fp8Format, role: str, history) -> TensorStats:
        cfg = self.config
        gran = (cfg.recipe.activation_granularity if role == "x"
                else cfg.recipe.weight_granularity)
        scale = None
        if cfg.scaling is Scaling.DELAYED and history is not None:
            cur = nx.amax(t.detach(), Granularity.TENSOR).float()
            scale = delayed_scale(history.to(t.device), cur, fmt, cfg.power_of_2_scales)
        return quantization_stats(t, gran, fmt, cfg.power_of_2_scales, scale)

    # -- dynamic precision -----------------------------------------------------------------

    def _update_demotions(self) -> None:
        self.demoted_since_last = []
        recent = self.history[-self.patience:]
        if len(recent) < self.patience:
            return
        for name in recent[-1]:
            rows = [h.get(name) for h in recent]
            if any(r is None for r in rows):
                continue
            why = self._over(rows)
            if why and name not in self.demoted:
                self.demoted[name] = why
                self.demoted_since_last.append(name)
                log.warning("fp8compile: demoting %s to bf16: %s", name, why)

    def _over(self, rows: list[LayerStats]) -> str | None:
        n = len(rows)
        if all(r.overflow_rate > self.max_overflow_rate for r in rows):
            rates = ", ".join(f"{100 * r.overflow_rate:.2f}%" for r in rows)
            return (f"FP8 overflow rate {rates} > {100 * self.max_overflow_rate:g}% "
                    f"in {n} consecutive checks")
        lim = self.max_underflow_rate
        if lim is not None and all(r.underflow_rate > lim for r in rows):
            rates = ", ".join(f"{100 * r.underflow_rate:.2f}%" for r in rows)
            return (f"FP8 underflow (flush-to-zero) rate {rates} > {100 * lim:g}% "
                    f"in {n} consecutive checks")
        return None

    def demoted_config(self, config: Fp8Config | None = None) -> Fp8Config:
        """``config`` (default: the monitor's) with a ``{module: "bf16"}`` override for each
        demoted layer, placed first so that it wins over the user's globs."""
        cfg = config or self.config
        extra = tuple((name, Precision.BF16) for name in self.demoted)
        kept = tuple(o for o in cfg.overrides if o[0] not in self.demoted)
        return cfg.replace(overrides=extra + kept)

    def backend(self, **kwargs: Any) -> Fp8Backend:
        """A backend compiling with :meth:`demoted_config`; its plans say, for each demoted
        layer, ``rule="override:<module>"`` and a reason naming the measured rate."""
        be = _DemotingBackend(self.demoted_config(), **kwargs)
        be.demoted = dict(self.demoted)
        self.config = be.config
        self.backend_ = be
        return be

    def annotate(self, plan: Plan) -> Plan:
        """Rewrite the reason of each demoted layer's plan entries to say why."""
        return _annotate(plan, self.demoted)

    def report(self, stats: Mapping[str, LayerStats] | None = None) -> str:
        """One line per layer of the latest (or given) measurement."""
        stats = stats if stats is not None else (self.history[-1] if self.history else {})
        return "\n".join(str(s) for s in stats.values())


def _annotate(plan: Plan, demoted: Mapping[str, str]) -> Plan:
    for e in plan:
        why = demoted.get(e.module)
        mine = e.rule == f"override:{e.module}" and "dynamic precision" not in e.reason
        if why and e.gemm and mine:
            e.reason = f"dynamic precision: {why}; demoted to bf16 ({e.reason})"
            e.extra["demoted"] = why
    return plan


class _DemotingBackend(Fp8Backend):
    """An :class:`Fp8Backend` whose plans explain the monitor's demotions."""

    demoted: dict[str, str] = {}

    def __call__(self, gm, example_inputs):
        out = super().__call__(gm, example_inputs)
        if self.plans:
            _annotate(self.plans[-1], self.demoted)
        return out
