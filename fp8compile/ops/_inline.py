"""Letting Inductor see the Triton kernels behind an op.

An op called from a compiled graph normally stays opaque: at run time each call goes through
the dispatcher, the ``torch.library`` custom-op layers and the op's Python body, which picks
kernels and launches them through Triton's Python launcher.  In a training step that is about
100 calls, and the host time to issue them exceeds the GPU time of the step (docs/performance.md,
"Default mode").

:func:`inline_on_gpu` gives an op a rule for AOTAutograd's functionalization (the step where
``torch.compile`` traces the forward and backward graphs, also inside autograd formulas): where
the op will run its Triton kernels, the rule traces the op's body instead of recording a call to
the op.  Each kernel launch then becomes a ``triton_kernel_wrapper_functional`` node, which
Inductor compiles into its generated code with its own launcher, and every shape-dependent
decision of the body (tile sizes, grid, GEMM backend) is taken once, at compile time.

The rule keeps the op opaque (as before) when

* the tensors are not on a GPU the kernels serve (CPU, ``FP8COMPILE_DISABLE_TRITON=1``): the
  reference numerics then run exactly as in eager mode;
* a shape or stride is symbolic (``dynamic=True``, or a recompile after a shape change): the
  body's decisions depend on sizes, and baking them in would add a guard per size;
* the op's own ``when`` condition says no;
* ``torch.export`` traces (the exported program keeps the high-level ops),
  ``FP8COMPILE_INLINE_KERNELS=0``, or inside :func:`opaque_ops` (the backend's retry after
  Inductor failed on the inlined graph).

Decisions the eager body takes by running kernels (the GEMM backend, the Triton GEMM's
autotuned tile config) are taken at trace time on random operands, under
:func:`outside_tracing`, and cached for the process.

Kernel launchers call :func:`launch` on their ``@triton.jit`` function: the function itself,
or while a rule traces, its traceable wrapper (``torch.library.wrap_triton``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["concrete", "deciding", "inline_enabled", "inline_on_gpu", "launch", "opaque_ops",
           "outside_tracing", "pinned", "random_like", "tracing"]

_STATE = threading.local()


def inline_enabled() -> bool:
    """False when ``FP8COMPILE_INLINE_KERNELS=0`` or inside :func:`opaque_ops` (every op stays
    opaque)."""
    return (os.environ.get("FP8COMPILE_INLINE_KERNELS", "1") != "0"
            and not getattr(_STATE, "opaque", False))


@contextlib.contextmanager
def opaque_ops() -> Iterator[None]:
    """Keep every op opaque while compiling inside (the backend's retry after a compile of
    inlined kernels failed)."""
    before = getattr(_STATE, "opaque", False)
    _STATE.opaque = True
    try:
        yield
    finally:
        _STATE.opaque = before


def tracing() -> bool:
    """True while a rule traces an op's body (launches must then be traceable)."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


@contextlib.contextmanager
def outside_tracing() -> Iterator[None]:
    """Real tensors and eager launches again, inside a rule: for the decisions a body takes
    by running kernels at compile time (GEMM backend, autotuned tile config).  Launchers
    there run what a traced graph would (see :func:`deciding`)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.utils._python_dispatch import _disable_current_modes

    depth, _STATE.depth = getattr(_STATE, "depth", 0), 0
    deciding_before = getattr(_STATE, "deciding", False)
    _STATE.deciding = deciding_before or depth > 0  # a nested call stays inside the decision
    try:
        with _disable_current_modes(), unset_fake_temporarily():
            yield
    finally:
        _STATE.depth, _STATE.deciding = depth, deciding_before


def deciding() -> bool:
    """True while a rule's body runs kernels eagerly to take a compile-time decision
    (:func:`outside_tracing` inside a trace): a launcher then launches the kernels a traced
    graph would, so that what is timed and tuned is what the graph runs."""
    return getattr(_STATE, "deciding", False)


def random_like(t: Tensor | None) -> Tensor | None:
    """A real tensor with the sizes, strides, dtype and device of the traced ``t``, for
    compile-time timing: FP8 payloads from a normal distribution, everything else positive
    (as dequantization scales are).  Call it under :func:`outside_tracing`."""
    if t is None:
        return None
    out = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype,
                              device=t.device)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return out.copy_(torch.randn(t.shape, device=t.device).mul_(8).to(t.dtype))
    return out.copy_(torch.rand(t.shape, device=t.device).add_(0.5).mul_(1e-2))


def launch(kernel):
    """``kernel`` for ``kernel[grid](...)``: itself in eager mode, its traceable wrapper while a
    rule of :func:`inline_on_gpu` traces (the launch then becomes a graph node)."""
    if tracing():
        return torch.library.wrap_triton(kernel)
    return kernel


def _concrete_tensor(t: Tensor) -> bool:
    return all(type(s) is int for s in (*t.shape, *t.stride()))


def concrete(*values) -> bool:
    """True when every tensor among ``values`` has plain-int sizes and strides."""
    return all(_concrete_tensor(v) for v in values if isinstance(v, Tensor))


def _tensors(args) -> list[Tensor]:
    return [a for a in args if isinstance(a, Tensor)]


def inline_on_gpu(op, body: Callable, when: Callable[..., bool] | None = None, *,
                  pin_strides: bool = True, unpinned: tuple[str, ...] = ()) -> None:
    """Trace ``body`` (the op's CUDA implementation, written with :func:`launch`) in place of
    ``op`` when AOTAutograd functionalizes a graph on a GPU the kernels serve; see the module
    docstring for when the op stays opaque.  ``when(*args, **kwargs)`` is the op's own extra
    condition; it runs on the traced (fake) tensors and may take decisions it caches.

    ``pin_strides=False`` hands the body its arguments as they are (see :func:`_pin`):
    needed by an op that mutates an argument in place, which a pinned copy would hide.
    ``unpinned`` names arguments handed over as they are while the others are pinned: ones
    the body may read with pointwise ops only, which Inductor can then fuse with (and
    recompute from) their producer; the body pins them itself (:func:`pinned`) where it
    passes them to a kernel."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    from . import _common

    names = [a.name for a in op._opoverload._schema.arguments]
    unknown = set(unpinned) - set(names)
    if unknown:
        raise ValueError(f"inline_on_gpu: unpinned={sorted(unknown)} are not arguments of "
                         f"{op._opoverload}: {names}")

    def rule(mode, func, types, args, kwargs):
        tensors = _tensors((*args, *kwargs.values()))
        known = all(issubclass(t, (FakeTensor, FunctionalTensor)) or t is Tensor for t in types)
        if (
            known
            and inline_enabled()
            and not _export_tracing()
            and tensors
            and all(_common.triton_available(t) for t in tensors)
            and concrete(*tensors)
            and (when is None or when(*args, **kwargs))
        ):
            memoize_mutation_analysis()
            with mode, _tracing():
                if pin_strides:
                    args = [a if n in unpinned else _pin(a) for n, a in zip(names, args)]
                    kwargs = {n: a if n in unpinned else _pin(a) for n, a in kwargs.items()}
                return body(*args, **kwargs)
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, rule)


_TTIR_MEMO_MAX = 256


def _jitted_function(kernel):
    """The Python function under a jitted kernel or an autotuner of one."""
    inner = kernel
    while not inspect.isfunction(inner) and hasattr(inner, "fn"):
        inner = inner.fn
    return inner


def _ttir_memo_key(fn, kernel, kwargs: dict, tma_descriptor_metadata) -> tuple | None:
    """What Triton's frontend sees of a launch of ``kernel`` (the jitted ``fn``) when torch's
    mutation analysis compiles it: the kernel, each tensor's dtype (a 2-element tensor of
    that dtype stands in for every tensor), a symbolic value as the same stand-in (2), and
    every other value itself, with an autotuner's first config's constants among them.
    None when a value cannot be a key (unhashable) or a TMA descriptor is passed: that
    launch is analysed as before."""
    import sympy

    if tma_descriptor_metadata:
        return None
    configs = getattr(kernel, "configs", None)
    if configs:
        # An autotuner (torch wraps one around a launch that passes num_warps): the analysis
        # adds its first config's constants to the arguments and compiles with default
        # options, so the config's num_warps and num_stages do not reach the module.
        extra = getattr(configs[0], "kwargs", None)
        if not isinstance(extra, dict):
            return None
        kwargs = {**kwargs, **extra}
    parts: list = [fn]
    for name in sorted(kwargs):
        value = kwargs[name]
        if isinstance(value, Tensor) or hasattr(value, "get_dtype"):  # FakeTensor, TensorBox
            dtype = value.dtype if isinstance(value, Tensor) else value.get_dtype()
            parts.append((name, "tensor", dtype))
        elif isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
            parts.append((name, "symbolic"))
        else:
            parts.append((name, type(value), value))
    key = tuple(parts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def memoize_mutation_analysis() -> bool:
    """Let torch's analysis of which tensors an inlined kernel writes compile each of this
    package's kernels once per argument signature and process.

    Functionalization, Inductor's lowering and its graph each run Triton's frontend on every
    launch of a user Triton kernel (``triton_kernel_wrap.generate_ttir``) to find the
    tensors it stores to.  For the same kernel, dtypes and constants the module is the same
    each time: on an H200, 0.9-1.2 s of a compiled LLaMA block's compile went to it, over
    half of it on launches already analysed.  Kernels from elsewhere, and launches with TMA
    descriptors, are analysed as before.  ``FP8COMPILE_TTIR_MEMO=0`` turns this off.
    Returns whether the memo is installed.
    """
    if os.environ.get("FP8COMPILE_TTIR_MEMO", "1") == "0":
        return False
    try:
        from torch._higher_order_ops import triton_kernel_wrap as wrap
    except ImportError:  # pragma: no cover - torch without user Triton kernels
        return False
    original = getattr(wrap, "generate_ttir", None)
    if original is None:
        return False
    if getattr(original, "_fp8compile_memo", False):
        return True
    memo: dict[tuple, tuple] = {}
    counts = {"asked": 0, "ran": 0}  # analyses of this package's kernels, frontend runs

    def generate_ttir(kernel, kwargs, tma_descriptor_metadata, *rest, **more):
        fn = _jitted_function(kernel)
        ours = inspect.isfunction(fn) and fn.__module__.startswith("fp8compile.")
        key = _ttir_memo_key(fn, kernel, kwargs, tma_descriptor_metadata) if ours else None
        if key is None or rest or more:
            return original(kernel, kwargs, tma_descriptor_metadata, *rest, **more)
        counts["asked"] += 1
        hit = memo.get(key)
        if hit is None:
            counts["ran"] += 1
            hit = original(kernel, kwargs, tma_descriptor_metadata)
            if len(memo) >= _TTIR_MEMO_MAX:
                memo.pop(next(iter(memo)))
            memo[key] = hit
        return hit[0], list(hit[1])

    generate_ttir._fp8compile_memo = True
    generate_ttir.__wrapped__ = original
    generate_ttir.memo, generate_ttir.counts = memo, counts
    wrap.generate_ttir = generate_ttir
    return True


def _pin(v):
    """``v`` pinned to its own strides by Inductor's ``force_stride_order`` when it is a
    tensor (a no-op in eager mode).

    Inductor realizes each tensor argument of an inlined kernel on its own: a tensor that is
    still an unmaterialized view of a fused computation (the SiLU·mul backward's output,
    reshaped to 2-D) was computed into a separate buffer for every launch and argument that
    read it, 12 outputs instead of 2 for one kernel of the training step.  Pinned once here,
    every launch of the op reads the same buffer.
    """
    if not isinstance(v, Tensor):
        return v
    import torch._inductor.inductor_prims  # noqa: F401  (registers the prim)

    return torch.ops.prims.inductor_force_stride_order(v, v.stride())


def pinned(t: Tensor | None) -> Tensor | None:
    """``t`` pinned to its strides while a rule traces (see :func:`_pin`), for an
    argument of ``inline_on_gpu(..., unpinned=...)`` that reaches a kernel; else ``t``."""
    return _pin(t) if tracing() else t


def _export_tracing() -> bool:
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # pragma: no cover - older torch
        return False
    return custom_triton_ops_decomposition_disabled()
