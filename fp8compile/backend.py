"""The ``fp8hpf`` Dynamo backend.

Registered as the ``torch_dynamo_backends`` entry point, so after ``pip install`` this works
without importing fp8compile::

    model = torch.compile(model, backend="fp8hpf")
    model = torch.compile(model, backend="fp8hpf", options={"recipe": "rowwise"})

To keep a handle on the plan, build the backend yourself::

    be = fp8compile.backend({"overrides": {"lm_head": "fp8"}})
    model = torch.compile(model, backend=be)
    model(x)
    print(be.plan.summary())

Flow per graph Dynamo hands over: passes (sensitivity → precision → rewrite → scales), then
Inductor (``compile_fx``) compiles the rewritten graph, so everything that is not an FP8 GEMM
fuses as it would without fp8compile.  Graph inputs added by the scales pass (cached FP8
weights, amax histories, static scales) are computed per call by a thin wrapper.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ._cache_key import keyed_patches
from .config import Fp8Config
from .passes import CompileContext, PassManager, default_passes, weights
from .plan import Plan

__all__ = ["Fp8Backend", "backend", "fp8hpf", "last_plan"]

_LAST: list[Plan] = []


def _split_options(options: Any) -> tuple[Fp8Config, dict]:
    """``torch.compile(..., options=...)`` → (Fp8Config, Inductor config patches)."""
    if options is None:
        return Fp8Config(), {}
    if isinstance(options, Fp8Config):
        return options, {}
    if isinstance(options, (str, os.PathLike)):
        return Fp8Config.from_json(options), {}
    if not isinstance(options, Mapping):
        raise ValueError(
            f"fp8hpf options must be a dict, an Fp8Config or a JSON path, got "
            f"{type(options).__name__}"
        )
    opts = dict(options)
    inductor = dict(opts.pop("inductor", None) or {})
    base = opts.pop("config", None)
    if base is None:
        return Fp8Config.from_dict(opts), inductor
    cfg = base if isinstance(base, Fp8Config) else (
        Fp8Config.from_json(base) if isinstance(base, (str, os.PathLike))
        else Fp8Config.from_dict(base)
    )
    return (Fp8Config.from_dict({**cfg.to_dict(), **opts}) if opts else cfg), inductor


class Fp8Backend:
    """A Dynamo backend object holding its configuration and the plans it produced.

    Args:
        config: an :class:`Fp8Config`, a dict of its fields, or a JSON path.
        compile: False runs the analysis passes only and returns the graph unchanged
            (what :func:`fp8compile.plan` uses).
        inductor: Inductor config patches for ``compile_fx``.
        mode: a ``torch.compile`` mode passed on to Inductor.
    """

    def __init__(
        self,
        config: Fp8Config | Mapping[str, Any] | str | None = None,
        *,
        compile: bool = True,
        inductor: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ) -> None:
        self.config, patches = _split_options(config)
        self.inductor = {**patches, **dict(inductor or {})}
        self.mode = mode
        self.compile = compile
        self.plans: list[Plan] = []
        self.contexts: list[CompileContext] = []
        self._restarted: set = set()  # compiles that asked Dynamo to trace them again

    @property
    def plan(self) -> Plan:
        """The plans of the latest compilation of each graph, merged."""
        latest: dict[Any, Plan] = {}
        for p in self.plans:
            latest[p.stats.get("frame", id(p))] = p
        return Plan.merge(list(latest.values()))

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        t0 = time.perf_counter()
        cfg = self.config
        inference = cfg.inference if cfg.inference is not None else not (
            torch.is_grad_enabled()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
        )
        ctx = CompileContext(cfg, list(example_inputs), inference, graph_index=len(self.plans))
        freezing = self._patches().get("freezing", torch._inductor.config.freezing)
        ctx.release = bool(cfg.release_weights and inference and self.compile and not freezing)
        # The passes rewrite a copy.  A plan-only backend rewrites it too, so that its plan
        # says what a compile would do (shared and fused quantizations included), and runs
        # Dynamo's graph as it came.
        work = _copy_graph_module(gm)
        # The passes' compile-time decisions time candidates only where Inductor autotunes
        # (kernels.select.autotuning): they see this compile's mode and patches.
        tuning = {k: v for k, v in self._patches().items() if k in _AUTOTUNE_KEYS}
        with torch._inductor.config.patch(tuning):
            PassManager(default_passes(ctx))(work)
        plan = Plan(ctx.plan_entries, cfg, ctx.stats)
        if ctx.weight_caches:
            plan.stats["weight_parts"] = weights.memory_parts(work.graph, ctx.weight_caches,
                                                              example_inputs)
        plan.stats["inference"] = inference
        plan.stats["frame"] = _frame_id()
        self.plans.append(plan)
        self.contexts.append(ctx)
        _LAST[:] = [plan]
        # Parameters another graph released (release_weights) cannot be read in high precision.
        readable = weights.readable_params(work.graph if self.compile else gm.graph,
                                           example_inputs)
        weights.check_readable([example_inputs[i] for i, _ in readable],
                               [name for _, name in readable], "fp8hpf: this graph")
        if not self.compile:
            return gm.forward
        _take_traced_gemms()  # drop what an earlier compile left
        try:
            compiled = self._inductor(work, list(example_inputs)
                                      + _static_fakes(example_inputs, ctx), plan)
        except torch._dynamo.exc.RestartAnalysis:  # Dynamo traces the frame again
            self.plans.remove(plan)
            self.contexts.remove(ctx)
            raise
        plan.stats["compile_s"] = time.perf_counter() - t0
        backends = _describe_gemms(_take_traced_gemms())
        if backends:
            plan.stats["gemm_backends"] = backends
        releaser = None
        if cfg.release_weights and ctx.weight_caches:
            if inference:
                releaser = weights.release_graph(work.graph, ctx.weight_caches, example_inputs,
                                                 plan.stats, bool(freezing))
            else:
                plan.stats["weights_kept"] = ["all: a training graph reads its parameters"]
        if ctx.extra_inputs:
            compiled = _with_extra_inputs(compiled, ctx.extra_inputs, releaser)
        return _guard_released(compiled, readable) if readable else compiled

    def _patches(self) -> dict[str, Any]:
        """Inductor config patches of this backend: its mode's options, then its own."""
        patches = dict(self.inductor)
        if self.mode:
            patches = {**torch._inductor.list_mode_options(self.mode), **patches}
        return patches

    def _inductor(self, gm: torch.fx.GraphModule, inputs: list, plan: Plan) -> Callable:
        """Inductor with the ops' kernels inlined (``fp8compile.ops._inline``); if that compile
        fails, once more with every op opaque, the reason kept in ``plan.stats``."""
        from torch._inductor.compile_fx import compile_fx

        from .ops._inline import inline_enabled, opaque_ops

        patches = self._patches()
        if not inline_enabled():
            return compile_fx(gm, inputs, config_patches=keyed_patches(patches))
        spare = _copy_graph_module(gm)  # Inductor's pre-grad passes edit the graph in place
        try:
            return compile_fx(gm, inputs, config_patches=keyed_patches(patches))
        except Exception as err:  # noqa: BLE001 - any failure gets the opaque retry
            # Inductor's request that Dynamo trace the frame again, a symbolic float it cannot
            # keep then specialized, is not a failure of the inlined kernels: passed on, once
            # per compile (a second request for the same compile gets the opaque retry, so a
            # torch that would ask again cannot loop).
            frame = _frame_id()
            if isinstance(err, torch._dynamo.exc.RestartAnalysis) \
                    and frame is not None and frame not in self._restarted:
                self._restarted.add(frame)
                raise
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            warnings.warn(
                f"fp8hpf: compiling with the FP8 kernels inlined failed ({reason}); compiled "
                "again with the FP8 ops as opaque calls (slower without CUDA graphs). "
                "FP8COMPILE_INLINE_KERNELS=0 skips the first attempt.",
                RuntimeWarning, stacklevel=2,
            )
            plan.stats["inline_failed"] = reason
            with opaque_ops():
                return compile_fx(spare, inputs, config_patches=keyed_patches(patches))


_AUTOTUNE_KEYS = ("max_autotune", "max_autotune_gemm")


def _take_traced_gemms() -> list[tuple[tuple, str]]:
    """``(key, backend)`` of each GEMM traced into a graph since the last call (none when the
    kernels were not inlined: CPU, symbolic shapes, a cache hit; the selection module is then
    not even imported)."""
    select = sys.modules.get("fp8compile.kernels.select")
    return select.take_traced_choices() if select is not None else []


def _describe_gemms(taken: list[tuple[tuple, str]]) -> list[str]:
    """One line per distinct GEMM shape: ``M~4096 N=512 K=256 group precise bfloat16: cublas``."""
    if not taken:
        return []
    from .kernels.select import describe_key

    seen = {describe_key(key): choice for key, choice in taken}
    return [f"{what}: {choice}" for what, choice in seen.items()]


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy whose graph the passes may change: Dynamo reads its own graph after the backend
    returns.  Node meta is copied shallowly; Dynamo's per-placeholder source and the module
    metadata AOTAutograd reads are carried over."""
    graph = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, val_map))
    for old, new in val_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    new_gm = torch.fx.GraphModule(gm, graph)
    new_gm.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source
    return new_gm


def _static_fakes(example_inputs: Sequence[Any], ctx: CompileContext) -> list:
    """Example values for the inputs the passes added, with static shapes.

    Handed over as real tensors, Inductor would give their dims fresh symbols (an FP8 weight
    of (s0, s1)) and lose the tile-shape specialisation; fakes of Dynamo's own fake mode with
    ``static_shapes=True`` keep them concrete.
    """
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return list(ctx.extra_examples)
    return [fake_mode.from_tensor(t, static_shapes=True) for t in ctx.extra_examples]


def _with_extra_inputs(compiled: Callable, providers: list[Callable],
                       releaser: Callable | None = None) -> Callable:
    """``compiled`` called with its extra inputs appended, each from its provider.

    The weight caches' inputs are checked for the whole graph at once: while no cached
    weight's storage or version changed since the last call, their tensors are the last
    call's, and only the other providers run.  A step of a 32-block LLaMA-8B-like model
    checks 224 weights per call; one ``(data_ptr, _version)`` pass over them took a fifth of
    the host time of a check per cache (``benchmarks/host_overhead.py``).  The parameters'
    shapes, dtypes and devices need no check here: Dynamo's guards recompile the graph
    when they change.  ``releaser`` (``release_weights``) releases the graph's parameters
    again once their new data is quantized."""
    from .passes.scales import CachedWeight

    # Dynamo calls what a backend returns as fn(*args).  (compile_fx's result may carry a
    # ``_boxed_call`` attribute copied from an inner function; its own convention is *args.)
    cached = [isinstance(p, CachedWeight) for p in providers]
    if not any(cached):
        def run(*args):
            return compiled(*args, *[p(args) for p in providers])

        return run

    indices = sorted({i for p, c in zip(providers, cached) if c for i in p.cache.indices})
    live = [(j, p) for j, (p, c) in enumerate(zip(providers, cached)) if not c]
    last: list = [None, None]  # the weights' (data_ptr, _version), the extra inputs

    def run_cached(*args):
        key = [(args[i].data_ptr(), args[i]._version) for i in indices]
        if key != last[0]:
            extras = [p(args) for p in providers]
            if releaser is not None and releaser(args):
                key = [(args[i].data_ptr(), args[i]._version) for i in indices]
            last[0], last[1] = key, extras
        elif live:
            extras = list(last[1])
            for j, p in live:
                extras[j] = p(args)
        else:
            extras = last[1]
        return compiled(*args, *extras)

    return run_cached


def _guard_released(compiled: Callable, readable: list[tuple[int, str]]) -> Callable:
    """``compiled`` checking, after any graph released parameters, that none of those it
    reads in high precision (``readable``: index, name) was among them: a ValueError instead
    of a read of freed memory."""
    seen = [weights.EPOCH[0]]

    def run(*args):
        if weights.EPOCH[0] != seen[0]:
            weights.check_readable([args[i] for i, _ in readable],
                                   [name for _, name in readable], "fp8hpf: a compiled graph")
            seen[0] = weights.EPOCH[0]
        return compiled(*args)

    return run


def _frame_id():
    try:
        from torch._guards import CompileContext as _CC

        cid = _CC.current_compile_id()
        return None if cid is None else (cid.frame_id, cid.frame_compile_id)
    except Exception:
        return None


def backend(config: Fp8Config | Mapping[str, Any] | str | None = None, **kwargs: Any) -> Fp8Backend:
    """``torch.compile(model, backend=fp8compile.backend(config))``; keeps ``.plan``."""
    return Fp8Backend(config, **kwargs)


def fp8hpf(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """The function behind ``backend="fp8hpf"``; ``options`` is an :class:`Fp8Config` dict."""
    options = kwargs.pop("options", None)
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise ValueError(f"fp8hpf got unsupported arguments {sorted(kwargs)}; use options={{...}}")
    return Fp8Backend(options, mode=mode)(gm, example_inputs)


def last_plan() -> Plan | None:
    """The plan of the most recent graph compiled by any fp8hpf backend in this process."""
    return _LAST[0] if _LAST else None
