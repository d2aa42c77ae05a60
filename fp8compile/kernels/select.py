"""Choosing the GEMM backend per shape: the Triton kernel family or cuBLAS FP8.

On Hopper (docs/performance.md) cuBLAS's FP8 GEMMs are faster than the Triton kernel for
large-M GEMMs with promotion (blockwise, precise: 1.3-1.7x, Triton cannot overlap the
per-128-K promotion with the tensor cores) and within a few percent of it, or of the Gluon
kernel, elsewhere at M >= 2048; the Triton kernel wins at decode sizes for row scales
(M <= 16, split-K: up to 1.9x on an H200), takes any M/N/K, and fuses activations and
residuals into its epilogue.  As Inductor does between ATen and its own templates, each
``(M bucket, N, K, recipe, accumulation, out dtype, layout)`` times both candidates once and
keeps the one with less GPU time for the process (host launch time left out, see
:func:`_gpu_ms`): when ``torch.compile`` traces the GEMM into a graph (:func:`choose_traced`,
on random operands), or else on the first eager call's real inputs.
On Hopper, "Triton" includes the warp-specialized Gluon kernel of :mod:`.blockwise_ws` for
the eager calls it serves, and for traced GEMMs that cuBLAS cannot compute, which it then
runs from an opaque call.

``FP8COMPILE_GEMM_BACKEND=triton|cublas|auto`` (default ``auto``) forces a choice; cuBLAS is
only ever used where it can compute the same function (:func:`cublas_unsupported`).
"""

from __future__ import annotations

import itertools
import os
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..numerics import Granularity
from .layout import contiguous_2d
from .tuning import m_bucket

__all__ = ["autotuning", "backend_choices", "choose", "choose_traced", "cublas_scaled_mm",
           "cublas_unsupported", "describe_key", "forced_backend", "note_traced",
           "swiglu_epilogue_ms", "take_traced_choices"]

_CHOICES: dict[tuple, str] = {}
_TRACED: list[tuple[tuple, str]] = []  # (key, choice) of each GEMM traced since the last take


def note_traced(key: tuple, choice: str) -> None:
    """Record the backend of a GEMM traced into a graph (for the plan; where cuBLAS cannot
    serve it, ``choice`` says why)."""
    _TRACED.append((key, choice))


def take_traced_choices() -> list[tuple[tuple, str]]:
    """The backend of every GEMM traced into a graph since the last call (for the plan)."""
    out = list(_TRACED)
    _TRACED.clear()
    return out


def backend_choices() -> dict[tuple, str]:
    """The decisions taken so far: ``{key: "triton" | "cublas" | "gluon"}`` (for reports;
    ``"gluon"``: a traced GEMM left as an opaque call, which runs the Gluon kernel), those
    taken by rule (:func:`autotuning`) included."""
    return dict(_CHOICES)


def cublas_unsupported(xq, xg, wq, wg, out_dtype, activation, residual) -> str | None:
    """Why cuBLAS cannot serve this GEMM, or None when it can.  An epilogue (activation,
    residual) runs after a cuBLAS GEMM as separate pointwise ops, which Inductor fuses into
    one kernel in a compiled graph; the Triton kernel runs it in its own epilogue."""
    m, k = xq.numel() // max(1, xq.shape[-1]), xq.shape[-1]
    n = wq.shape[0]
    if xq.dtype != torch.float8_e4m3fn or wq.dtype != torch.float8_e4m3fn:
        return "not e4m3 x e4m3"
    if m < 16 or k % 16 or n % 16:
        return "M < 16 or K, N not multiples of 16"
    if (xg, wg) == (Granularity.GROUP, Granularity.BLOCK):
        if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
            return "this torch has no blockwise cuBLAS GEMM"
        if k % 512 or n % 128 or m % 4 or out_dtype != torch.bfloat16:
            # cuBLAS wants scale tensors padded to multiples of 4 blocks along K ("scale_b
            # must have shape 12 x 4" for K=1408) and rows: we hand it exact shapes only.
            return "blockwise cuBLAS needs K % 512, N % 128, M % 4 == 0 and bf16 output"
    elif (xg, wg) == (Granularity.ROW, Granularity.ROW):
        if out_dtype != torch.bfloat16:
            return "rowwise cuBLAS needs bf16 output"
    elif (xg, wg) != (Granularity.TENSOR, Granularity.TENSOR):
        return "mixed granularities"
    return None


def cublas_scaled_mm(xq, xs, xg, wq, ws, wg, bias, out_dtype, accumulation,
                     activation: str = "none", residual: torch.Tensor | None = None,
                     residual2: torch.Tensor | None = None) -> torch.Tensor:
    """The same GEMM through cuBLAS (``torch._scaled_mm`` / ``F.scaled_mm``); bias,
    activation and residual follow as pointwise ops on the ``out_dtype`` product."""
    k, n = xq.shape[-1], wq.shape[0]
    # cuBLAS's FP8 GEMMs take both operands K-major: transposed views (the backward GEMMs'
    # dy_q.t(), x_q.t()) are copied by a tiled transpose first.
    a = xq.reshape(-1, k)
    if a.stride(1) != 1:
        a = contiguous_2d(a)
    if wq.stride(1) != 1:
        wq = contiguous_2d(wq)
    fast = accumulation == "fast"
    if xg is Granularity.GROUP:
        st = F.ScalingType
        y = F.scaled_mm(a, wq.t(), xs, st.BlockWise1x128, ws.t(), st.BlockWise128x128,
                        output_dtype=out_dtype)
    elif xg is Granularity.ROW:
        y = torch._scaled_mm(a, wq.t(), xs, ws.reshape(1, n), out_dtype=out_dtype,
                             use_fast_accum=fast)
    else:
        y = torch._scaled_mm(a, wq.t(), xs.reshape(()), ws.reshape(()), out_dtype=out_dtype,
                             use_fast_accum=fast)
    if bias is not None:
        y = y + bias.to(y.dtype)
    y = y.reshape(*xq.shape[:-1], n)
    if activation == "none" and residual is None:
        return y
    from ..ops.gemm import epilogue

    return epilogue(y, activation, residual, residual2).to(out_dtype)


def _time_ms(fn: Callable[[], torch.Tensor], reps: int = 10) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _gpu_ms(fn: Callable[[], torch.Tensor], reps: int = 10) -> float:
    """Milliseconds per call of ``fn`` on the GPU alone, the host's launch time left out.

    Called back to back from Python (:func:`_time_ms`), a decode-sized GEMM times at its
    launcher's host time: the Triton launcher spends tens of microseconds of Python per call
    on ~10 us of GPU work, cuBLAS's launcher less, so cuBLAS was chosen at decode sizes
    where its kernel is up to 1.8x slower (H200, docs/performance.md).  A compiled graph
    launches the kernel from Inductor's code, and a CUDA graph replays it with no host work
    at all, so the backends are ranked by GPU time: a sleep kernel holds the stream while
    the host queues all ``reps`` calls, and the events then bracket the GPU's work only.
    If the sleep ended before the host had queued them, it is lengthened and the timing
    redone.
    """
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = _HOLD_CYCLES
    for _ in range(_HOLD_TRIES):
        torch.cuda._sleep(cycles)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        held = not start.query()  # the GPU was still asleep when the last call was queued
        end.synchronize()
        if held:
            break
        cycles *= 4
    return start.elapsed_time(end) / reps


# The first hold of _gpu_ms: ~1 ms at an H100/H200's clocks, ten calls of 100 us of Python;
# each retry holds 4x longer.
_HOLD_CYCLES = 2_000_000
_HOLD_TRIES = 4


def _faster(triton_fn: Callable[[], torch.Tensor], cublas_fn: Callable[[], torch.Tensor],
            rounds: int = 3, timer: Callable[[Callable[[], torch.Tensor]], float] | None = None
            ) -> str:
    """``"cublas"`` or ``"triton"``: the median of ``rounds`` alternating timings of each.

    A single timing of each, back to back, charges clock ramp-up and any other work on the
    GPU at that moment to whichever candidate runs first.  Alternating the candidates and
    taking medians makes one noisy timing unable to decide.  Triton must also be faster by
    :data:`_TRITON_MARGIN`: near a tie the choice would otherwise follow the timing noise of
    the moment of compiling, and differ from one process (or machine) to the next.
    ``timer`` (default :func:`_gpu_ms`) returns milliseconds per call.
    """
    t_tri, t_cub = _medians(triton_fn, cublas_fn, rounds, timer)
    return "triton" if t_tri < (1.0 - _TRITON_MARGIN) * t_cub else "cublas"


def _medians(first: Callable[[], object], second: Callable[[], object], rounds: int = 3,
             timer: Callable[[Callable[[], object]], float] | None = None
             ) -> tuple[float, float]:
    """Median milliseconds per call of ``first`` and ``second``, after a warm-up (compile,
    autotune, cuBLAS heuristics), from ``rounds`` alternating timings of each (``timer``,
    default :func:`_gpu_ms`)."""
    timer = timer or _gpu_ms
    for fn in (first, second):
        for _ in range(3):
            fn()
    t_first, t_second = [], []
    for _ in range(rounds):
        t_first.append(timer(first))
        t_second.append(timer(second))
    return statistics.median(t_first), statistics.median(t_second)


# How much faster than cuBLAS the Triton GEMM must time to be chosen.  Without a margin, two
# compiles of the same LLaMA block on H100s chose Triton for 0 and for 8 of the 15
# 4096-wide GEMMs of a training step, whose medians were within ~1% of cuBLAS's; the
# step with 8 was 4% slower (docs/performance.md).  Where Triton wins (decode-sized M,
# split-K) it wins by far more.
_TRITON_MARGIN = 0.03


def forced_backend() -> str:
    """``FP8COMPILE_GEMM_BACKEND`` as set (``"auto"`` when unset); :func:`choose` rejects a
    value other than ``auto``, ``triton`` or ``cublas``."""
    return os.environ.get("FP8COMPILE_GEMM_BACKEND", "auto")


def choose(key: tuple, triton_fn: Callable[[], torch.Tensor],
           cublas_fn: Callable[[], torch.Tensor] | None) -> str:
    """``"triton"`` or ``"cublas"`` for ``key``; times both on first sight (see module doc)."""
    forced = forced_backend()
    if forced not in ("auto", "triton", "cublas"):
        raise ValueError(
            f"FP8COMPILE_GEMM_BACKEND={forced!r} is not 'auto', 'triton' or 'cublas'"
        )
    if cublas_fn is None or forced == "triton":
        return "triton"
    if forced == "cublas":
        return "cublas"
    got = _CHOICES.get(key)
    if got is None:
        if torch.cuda.is_current_stream_capturing():
            return "triton"  # no timing inside a CUDA-graph capture; decide on a later call
        try:
            got = _faster(triton_fn, cublas_fn)
        except (RuntimeError, ValueError):  # cuBLAS refused this case (status or shape check)
            got = "triton"
        _CHOICES[key] = got
    return got


def choose_traced(xq, xs, xg, wq, ws, wg, bias, out_dtype, accumulation, activation="none",
                  residual=None, residual2=None) -> str:
    """:func:`choose` for a GEMM that ``torch.compile`` is tracing (compile-time decision).

    The operands are fake tensors, so on first sight of a key the candidates are timed on
    real random operands with the same sizes, strides and dtypes (as Inductor's autotuning
    does).  Successive calls cycle through copies of the operands that together exceed the
    L2 cache: in a model the weights come from HBM, and a decode-sized GEMM timed on one
    L2-resident weight ranks the backends as they do not run there.  With an epilogue,
    cuBLAS is timed with it as separate eager ops (one kernel each; a compiled graph fuses
    them into one), the Triton kernel with it fused.

    Where cuBLAS cannot compute the GEMM (:func:`cublas_unsupported`) but the Gluon kernel
    of :mod:`.blockwise_ws` would serve the eager call, the Gluon kernel is timed against
    the Triton kernel instead, by the same margin; with a SwiGLU epilogue, which only the
    Gluon kernel fuses, against cuBLAS followed by the SwiGLU's pointwise ops.  Gluon
    kernels cannot be traced into Inductor's graph, so where it wins (``"gluon"``) the
    caller keeps the op opaque; under CUDA graphs its launch then costs nothing more.
    Elsewhere, where cuBLAS serves, the Gluon kernel is not timed: it runs at cuBLAS's
    speed (docs/performance.md), and timing it adds seconds of compilation per shape.

    Above the split-K sizes (M > 256) the choice is made by rule unless Inductor autotunes
    (:func:`autotuning`, ``mode="max-autotune"``): see :func:`_by_rule`.
    Returns ``"cublas"``, ``"triton"`` or ``"gluon"``.
    """
    key = gemm_key(xq, xg, wq, accumulation, out_dtype, activation=activation,
                   residual=residual, residual2=residual2)
    why = cublas_unsupported(xq, xg, wq, wg, out_dtype, activation, residual)
    got = _choose_traced(key, xq, xs, xg, wq, ws, wg, bias, out_dtype, accumulation,
                         activation, residual, residual2, why)
    note = got if why is None else f"{got} (cuBLAS: {why})"
    note_traced(key, f"{note} (by rule)" if key in _RULED else note)
    if got == "gluon":
        # The opaque op's body dispatches eagerly, where the Gluon kernel is "triton": the
        # compile-time choice stands there too, not timed a second time at the first call.
        _CHOICES[gemm_key(xq, xg, wq, accumulation, out_dtype, True, activation,
                          residual, residual2)] = "triton"
    return got


def autotuning() -> bool:
    """Whether compile-time GEMM decisions time every candidate: under Inductor's
    ``max_autotune`` or ``max_autotune_gemm`` (``torch.compile(..., mode="max-autotune")``),
    when Inductor also benchmarks its own GEMM templates against ATen's.  Otherwise the
    large GEMMs are decided by rule (:func:`_by_rule`), as Inductor then calls ATen's GEMM
    untimed: each timing compiles and tunes a kernel, seconds of compile time per shape."""
    cfg = torch._inductor.config
    return bool(cfg.max_autotune or cfg.max_autotune_gemm)


# Keys of _CHOICES decided by _by_rule, not timed: an autotuning compile times them after all.
_RULED: set[tuple] = set()


def _by_rule(xq, activation: str, residual, cublas_why: str | None, gluon: bool) -> str | None:
    """The backend of a traced GEMM taken without timing, or None to time it.

    Only above the split-K sizes (M > 256) and only where cuBLAS computes the GEMM:

    * no epilogue: cuBLAS.  At M >= 2048 on an H100 the Triton kernel ran at 0.58-0.73x
      cuBLAS with promoted accumulation and 0.76-1.07x with fast accumulation, and on an
      H200 the compile-time timing kept cuBLAS for every GEMM of the LLaMA block
      (docs/performance.md);
    * the SwiGLU epilogue where the Gluon kernel serves it: the Gluon kernel, which is what
      the fold into that epilogue was made for (:mod:`fp8compile.passes.epilogue`);
    * a residual epilogue (one or two residuals, no activation) where the Gluon kernel
      serves it: the Gluon kernel, which loads the residual tiles under its K loop
      (``benchmarks/gemm_epilogue.py``: faster than cuBLAS and the add, docs/performance.md).

    Other residual and activation epilogues (``fuse_epilogues``) stay timed: there the fused
    Triton epilogue can beat cuBLAS and a separate pointwise kernel, by shape.
    """
    m = xq.numel() // max(1, xq.shape[-1])
    if autotuning() or m <= 256 or cublas_why is not None:
        return None
    if residual is not None:
        return "gluon" if gluon and activation == "none" else None
    if activation == "none":
        return "cublas"
    if activation == "swiglu" and gluon:
        return "gluon"
    return None


def _choose_traced(key, xq, xs, xg, wq, ws, wg, bias, out_dtype, accumulation, activation,
                   residual, residual2, cublas_why: str | None) -> str:
    from ..ops._inline import outside_tracing, random_like
    from .gemm import gluon_serves
    from .gemm import scaled_mm as triton_scaled_mm

    if forced_backend() != "auto":
        return choose(key, _never, _never if cublas_why is None else None)
    gluon = gluon_serves(xq, xs, xg, wq, ws, wg, out_dtype, activation, residual, accumulation,
                         residual2)
    ruled = _by_rule(xq, activation, residual, cublas_why, gluon)
    if ruled is not None:
        # Filed like a timed choice: the traced body's own dispatch (kernels.scaled_mm)
        # looks it up, and would otherwise time the candidates inside the trace.
        _CHOICES[key] = ruled
        _RULED.add(key)
        return ruled
    if key in _RULED:  # an autotuning compile times what a rule decided before
        _RULED.discard(key)
        del _CHOICES[key]
    if key in _CHOICES:
        return _CHOICES[key]
    if cublas_why is not None and not gluon:
        return "triton"  # the one candidate
    operands = (xq, xs, wq, ws, bias, residual, residual2)
    size = sum(t.numel() * t.element_size() for t in operands if t is not None)
    copies = max(1, min(8, -(-_COLD_BYTES // max(1, size))))
    with outside_tracing():
        sets = [tuple(random_like(t) for t in operands) for _ in range(copies)]

        def run(backend: str) -> Callable[[], torch.Tensor]:
            cycle = itertools.cycle(sets)

            def fn():
                a, sa, b, sb, bb, r, r2 = next(cycle)
                if backend == "cublas":
                    return cublas_scaled_mm(a, sa, xg, b, sb, wg, bb, out_dtype, accumulation,
                                            activation, r, r2)
                return triton_scaled_mm(a, sa, xg, b, sb, wg, bb, out_dtype, accumulation,
                                        activation, r, gluon=backend == "gluon", residual2=r2)
            return fn

        if cublas_why is not None:
            got = "gluon" if _gluon_faster(run("gluon"), run("triton")) else "triton"
        elif gluon and (activation == "swiglu" or residual is not None):
            # The one fused SwiGLU epilogue, against cuBLAS with the SwiGLU as pointwise ops
            # (the Triton kernel computes it the same way, after its fp32 product); and the
            # residual epilogue of the kernel that loads its tiles under the K loop.
            got = "gluon" if _gluon_faster(run("gluon"), run("cublas")) else "cublas"
        else:  # "triton": the Triton kernel, which the graph launches
            return choose(key, run("triton"), run("cublas"))
        _CHOICES[key] = got
        return got


_SWIGLU_TIMES: dict[tuple, tuple[float, float]] = {}


def swiglu_epilogue_ms(m: int, n: int, k: int, xg: Granularity, wg: Granularity,
                       x_dtype: torch.dtype, out_dtype: torch.dtype, quant: tuple,
                       device: torch.device, accumulation: str = "fast"
                       ) -> tuple[float, float]:
    """``(fused, unfused)`` GPU milliseconds of a SwiGLU MLP's gate/up step at compile time,
    on random operands: the GEMM with the SwiGLU epilogue (``n`` = 2F rows, gate's then up's,
    ``accumulation``) followed by a plain quantization of its output, against the GEMM the graph
    runs otherwise followed by the SiLU·mul quantization of its two halves.  That GEMM is
    timed on cuBLAS where cuBLAS computes it (the compile-time choice keeps cuBLAS for these
    large fast GEMMs, docs/performance.md) and ``FP8COMPILE_GEMM_BACKEND`` does not force
    Triton, else on the Triton kernel: timing it through the eager dispatch would also build
    and time the Gluon kernel's plain variant, seconds of compile time for a kernel the
    compiled graph does not run.  ``quant`` is that quantization's ``(granularity, format,
    power_of_2)``.  With blockwise operands quantized again in 1x128 groups the fused step
    is :func:`.gemm.swiglu_group_quantize` alone (the kernel's epilogue writes the groups),
    both GEMMs with ``accumulation``.  Cached per (M bucket, sizes, recipe, dtypes,
    quantization, accumulation)."""
    from ..numerics import Fp8Format, swiglu_in_groups
    from ..ops._inline import outside_tracing
    from . import fused
    from . import quant as q
    from .gemm import scaled_mm as launcher
    from .gemm import swiglu_group_quantize

    key = (m_bucket(m), n, k, str(xg), str(wg), x_dtype, out_dtype, tuple(map(str, quant)),
           accumulation)
    if key in _SWIGLU_TIMES:
        return _SWIGLU_TIMES[key]
    gran, fmt, p2 = Granularity(quant[0]), Fp8Format(quant[1]), bool(quant[2])
    x_fmt, f = Fp8Format.from_dtype(x_dtype), n // 2
    with outside_tracing():
        xq, xs = q.quantize(torch.randn(m, k, device=device, dtype=torch.bfloat16), xg,
                            x_fmt, False)
        wq, ws = q.quantize(torch.randn(n, k, device=device, dtype=torch.bfloat16), wg,
                            x_fmt, False)

        groups = swiglu_in_groups(xg, wg, gran)

        def with_epilogue():
            if groups:
                return swiglu_group_quantize(xq, xs, wq, ws, fmt, accumulation, p2)
            h = launcher(xq, xs, xg, wq, ws, wg, None, out_dtype, accumulation, "swiglu")
            return q.quantize(h, gran, fmt, p2)

        on_cublas = (forced_backend() != "triton" and
                     cublas_unsupported(xq, xg, wq, wg, out_dtype, "none", None) is None)

        def without():
            if on_cublas:
                y = cublas_scaled_mm(xq, xs, xg, wq, ws, wg, None, out_dtype, accumulation)
            else:
                y = launcher(xq, xs, xg, wq, ws, wg, None, out_dtype, accumulation,
                             gluon=False)
            return fused.silu_mul_quantize(y[..., :f], y[..., f:], gran, fmt, p2)

        _SWIGLU_TIMES[key] = _medians(with_epilogue, without)
    return _SWIGLU_TIMES[key]


def _gluon_faster(gluon_fn: Callable[[], torch.Tensor],
                  best_fn: Callable[[], torch.Tensor]) -> bool:
    """Whether the Gluon kernel beats the other candidate (``best_fn``: the Triton kernel,
    or cuBLAS for the SwiGLU epilogue) by the margin; not when it fails to build or launch
    here (the graph then inlines the other candidate)."""
    try:
        return _faster(gluon_fn, best_fn) == "triton"
    except (RuntimeError, ValueError):
        return False


# Bytes of operands a compile-time timing cycles through: more than an H100/H200's 50 MB L2.
_COLD_BYTES = 128 << 20


def _never() -> torch.Tensor:  # a candidate that a cached or forced choice never runs
    raise AssertionError("not timed")


def gemm_key(xq, xg, wq, accumulation, out_dtype, gluon: bool = False,
             activation: str = "none", residual: torch.Tensor | None = None,
             residual2: torch.Tensor | None = None) -> tuple:
    """What the choice depends on: sizes (M bucketed), recipe, accumulation, output dtype,
    whether each operand arrives K-major (a transposed one costs both backends a copy),
    whether "triton" stands for the Gluon kernel (eager calls it serves on Hopper; traced
    graphs launch the Triton kernel, so their choices are kept apart), and the epilogue
    (which the Triton kernel fuses and cuBLAS follows with pointwise ops).

    The decode sizes (a static M of at most ``decode_ws.MAX_M``) are a bucket of their own:
    the decode Gluon kernel serves them and not 9-16 rows, so a ``"gluon"`` choice made at
    one token must not stand for a 16-row graph of the same weight."""
    from . import decode_ws

    m = xq.numel() // max(1, xq.shape[-1])
    bucket = decode_ws.MAX_M if decode_ws.decode_sized(m) else m_bucket(m)
    layout = (xq.stride(-1) == 1, wq.stride(-1) == 1)
    return (bucket, wq.shape[0], xq.shape[-1], str(xg), accumulation, out_dtype, layout,
            bool(gluon), (activation, (residual is not None) + (residual2 is not None)))


def describe_key(key: tuple) -> str:
    """``gemm_key`` in words: ``M~4096 N=14336 K=4096 group precise bfloat16`` (``M<=8``
    for the decode sizes), then
    `` + gelu``, `` + residual`` (`` + 2 residuals``) for an epilogue."""
    bucket, n, k, gran, accumulation, out_dtype, (a_kmajor, b_kmajor), gluon, epi = key
    layout = "" if a_kmajor and b_kmajor else " (transposed operand)"
    dtype = str(out_dtype).replace("torch.", "")
    kernel = " (Gluon kernel)" if gluon else ""
    activation, residuals = epi
    tail = (f" + {activation}" if activation != "none" else "") + \
        {0: "", 1: " + residual"}.get(int(residuals), f" + {int(residuals)} residuals")
    rows = f"M<={bucket}" if bucket < m_bucket(1) else f"M~{bucket}"  # the decode bucket
    return f"{rows} N={n} K={k} {gran} {accumulation} {dtype}{tail}{layout}{kernel}"
