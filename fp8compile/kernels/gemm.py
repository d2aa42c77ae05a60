"""FP8 GEMM with fused dequantization epilogue: ``act(xq·s_x @ (wq·s_w)ᵀ + bias) + residual``.

One kernel, :func:`_scaled_mm_kernel`, serves every recipe through two constexpr switches,
``A_GRAN`` and ``W_GRAN`` (0 tensor, 1 row, 2 1x128 group, 3 128x128 block; the launcher
runs a per-tensor activation scale as row scales of stride 0, see :func:`scaled_mm`):

* scales that change along K (group / block, code >= 2) are applied inside the K loop: each
  ``BLOCK_K = 128`` step computes ``tl.dot(a, b)`` into a fresh fp32 tile and adds it times
  ``s_a[:, None] * s_w[None, :]`` to the fp32 accumulator.  That is the DeepSeek-V3 promotion:
  the tensor core's reduced-precision accumulator never spans more than 128 of K;
* scales constant along K (tensor / row) are applied once in the epilogue.  ``PRECISE`` then
  chooses between promoting every 128 of K (``acc += tl.dot(a, b)``) and the single
  tensor-core accumulator (``acc = tl.dot(a, b, acc)``), which on Hopper accumulates with
  ~2e-2 relative error at K=8192 (SPEC §4) but runs at full rate.

Both operands are K-major, as Hopper's FP8 ``wgmma`` needs: ``xq (M, K)`` and ``wq (N, K)``
row-major; the weight tile is loaded as ``[BLOCK_K, BLOCK_N]`` with K contiguous.

A 16-row tile is too short for Hopper's ``wgmma`` (64 rows per warpgroup): with
``SWAP_AB`` the kernel computes ``(W @ x^T)^T``, the 64-row weight tile as the MMA's left
operand and the tokens as its N, both operands K-major as stored; ``SCALES_AHEAD`` loads the
next K step's promotion scales before this step's MMA.  The tuned configs of 16-row tiles set
both (``tuning.py``).

When the output tiles alone leave SMs idle (decode, M <= 256), K is split across programs
that write fp32 partial sums.  With 16-row tiles (M <= 16) the last program of each output
tile to finish (a per-tile arrival counter) adds them up and runs the epilogue; otherwise,
and in graphs being traced, which cannot carry the counters,
:func:`_splitk_epilogue_kernel` does, as a second launch.

On Hopper, eager GEMMs with promoted accumulation (blockwise 1x128 x 128x128 scales, or row/
tensor scales with ``precise`` accumulation; M > 256, no activation or residual) go to the
warp-specialized Gluon kernel of :mod:`.blockwise_ws` instead, which overlaps the promotion
with the tensor cores (1.5x this kernel for blockwise); ``config=...`` or
``FP8COMPILE_GLUON=0`` keeps them here.  Eager GEMMs of at most ``decode_ws.MAX_M`` rows
without an activation go to :mod:`.decode_ws`'s Gluon kernel, which streams the weight by
TMA (whole where its 64-row tiles fill the SMs, else with K split), under the same two
switches and ``FP8COMPILE_DECODE_GLUON=0``.  The SwiGLU epilogue (``activation="swiglu"``,
gate rows then up rows) is fused by the warp-specialized kernel only (fast
accumulation, row/tensor scales); here the fp32 product goes through it as pointwise ops.
"""

from __future__ import annotations

import math
import os
import threading

import torch
import triton
import triton.language as tl

from ..numerics import FP8_FORMATS, Granularity, check_swiglu_rows, residual_sum
from ..numerics import swiglu as swiglu_of
from ..ops._inline import deciding, launch, outside_tracing, random_like, tracing
from . import blockwise_ws, decode_ws, tuning
from .layout import contiguous_2d
from .quant import GRAN_CODE
from .tuning import cdiv

__all__ = ["ACT_CODE", "gluon_serves", "precompile_gluon", "precompile_swiglu_groups",
           "scaled_mm", "swiglu_group_quantize"]

ACT_CODE = {"none": 0, "gelu": 1, "silu": 2, "relu": 3}
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, res_ptr, out_ptr,
              stride_rm, stride_rn, stride_om, stride_on,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr):
    """bias -> activation -> residual -> cast and store, in the order of ops._epilogue."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:  # exact (erf) GELU, as torch.nn.functional.gelu's default
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == 2:
        acc = acc * tl.sigmoid(acc)
    elif ACTIVATION == 3:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, like torch.relu
    if HAS_RES:
        r_ptrs = res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_step(a_ptrs, w_ptrs, k, k_hi, offs_k, EVEN_K: tl.constexpr):
    """The ``[BLOCK_M, BLOCK_K]`` activation and ``[BLOCK_K, BLOCK_N]`` weight tiles at ``k``;
    K past ``k_hi`` loads as zero."""
    if EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(w_ptrs)
    else:
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_hi - k, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_hi - k, other=0.0)
    return a, b


@triton.jit
def _dot(a, b, acc, SWAP_AB: tl.constexpr):
    """``a @ b`` (plus ``acc`` on the tensor core), transposed where ``SWAP_AB``: the weight
    tile is then the MMA's left operand, so 64 weight rows fill Hopper's ``wgmma`` (64 rows
    per warpgroup) where a 16-row activation tile cannot.  (One return: Triton types every
    return of a function alike, even in branches a constexpr prunes.)"""
    if SWAP_AB:
        out = tl.dot(tl.trans(b), tl.trans(a), acc)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _step_scales(k, K, offs_am, offs_wn, pid_n, as_ptr, ws_ptr,
                 stride_as0, stride_as1, stride_ws0, stride_ws1,
                 A_GRAN: tl.constexpr, W_GRAN: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row factor ``[BLOCK_M]`` and column factor ``[BLOCK_N]`` of the K step at ``k`` (scales
    that change along K).  A tile inside one 128-wide weight block folds its scalar weight
    scale into the row factor, which saves the column vector (32 registers/thread at 128x128,
    8 warps: 255 -> no spills); the column factor is then unused.  A step past K (masked,
    all zero) reads the last block's scales."""
    kb = tl.minimum(k, K - 1) // 128
    if A_GRAN == 2:
        s_row = tl.load(as_ptr + offs_am * stride_as0 + kb * stride_as1)
    elif A_GRAN == 3:
        s_row = tl.load(as_ptr + (offs_am // 128) * stride_as0 + kb * stride_as1)
    else:
        s_row = tl.full((BLOCK_M,), 1.0, tl.float32)
    if (W_GRAN == 3) and (BLOCK_N <= 128):
        s_row = s_row * tl.load(ws_ptr + ((pid_n * BLOCK_N) // 128) * stride_ws0
                                + kb * stride_ws1)
        s_col = s_row
    elif W_GRAN >= 2:
        rows_per_scale = 128 if W_GRAN == 3 else 1
        s_col = tl.load(ws_ptr + (offs_wn // rows_per_scale) * stride_ws0 + kb * stride_ws1)
    else:
        s_col = s_row
    return s_row, s_col


@triton.jit
def _promote(acc, prod, s_row, s_col, W_GRAN: tl.constexpr, SWAP_AB: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """``acc + prod * s_row * s_col``, the factors broadcast along ``acc``'s layout."""
    if (W_GRAN >= 2) and not ((W_GRAN == 3) and (BLOCK_N <= 128)):
        if SWAP_AB:
            acc = acc + prod * s_col[:, None] * s_row[None, :]
        else:
            acc = acc + prod * s_row[:, None] * s_col[None, :]
    elif SWAP_AB:
        acc = acc + prod * s_row[None, :]
    else:
        acc = acc + prod * s_row[:, None]
    return acc


@triton.jit
def _tile_scales(acc, offs_am, offs_wn, as_ptr, ws_ptr, stride_as0, stride_ws0,
                 A_GRAN: tl.constexpr, W_GRAN: tl.constexpr):
    """``acc`` times the row/tensor scales (constant along K: once per tile)."""
    if A_GRAN == 1:
        acc = acc * tl.load(as_ptr + offs_am * stride_as0)[:, None]
    elif A_GRAN == 0:
        acc = acc * tl.load(as_ptr)
    if W_GRAN == 1:
        acc = acc * tl.load(ws_ptr + offs_wn * stride_ws0)[None, :]
    elif W_GRAN == 0:
        acc = acc * tl.load(ws_ptr)
    return acc


@triton.jit
def _scaled_mm_kernel(
    # pointers: FP8 operands, their fp32 scales, epilogue operands, output, fp32 partials
    # and per-tile arrival counters (split-K only)
    a_ptr, w_ptr, as_ptr, ws_ptr, bias_ptr, res_ptr, out_ptr, part_ptr, cnt_ptr,
    # sizes; k_per_split is a multiple of BLOCK_K (and of 128 for blockwise scales)
    M, N, K, k_per_split,
    M_BUCKET,  # autotuning key only
    # strides (elements)
    stride_am, stride_ak, stride_wn, stride_wk,
    stride_as0, stride_as1, stride_ws0, stride_ws1,
    stride_rm, stride_rn, stride_om, stride_on, stride_split,
    # recipe switches
    A_GRAN: tl.constexpr, W_GRAN: tl.constexpr, PRECISE: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr,
    SPLIT_K: tl.constexpr, FOLD_SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    # 16-row tiles (tuning.py): the weight as the MMA's left operand; scales loaded ahead.
    # No defaults: a traced launch names every parameter (Inductor's wrapper of a Triton
    # kernel rejects a call that leaves one to its default).
    SWAP_AB: tl.constexpr, SCALES_AHEAD: tl.constexpr,
):
    # Grouped ordering: GROUP_M row-tiles share each weight column-tile while it is in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge rows/columns wrap instead of being masked: loads stay unpredicated, the store masks.
    offs_am = offs_m % M
    offs_wn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_wn[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk

    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    a_ptrs += k_lo * stride_ak
    w_ptrs += k_lo * stride_wk
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    PROMOTE: tl.constexpr = (A_GRAN >= 2) or (W_GRAN >= 2)
    AHEAD: tl.constexpr = BLOCK_K if SCALES_AHEAD else 0  # K offset of the scales loaded
    if PROMOTE and SCALES_AHEAD:
        s_row, s_col = _step_scales(k_lo, K, offs_am, offs_wn, pid_n, as_ptr, ws_ptr,
                                    stride_as0, stride_as1, stride_ws0, stride_ws1,
                                    A_GRAN, W_GRAN, BLOCK_M, BLOCK_N)
    for k in range(k_lo, k_hi, BLOCK_K):
        a, b = _load_step(a_ptrs, w_ptrs, k, k_hi, offs_k, EVEN_K)
        if PROMOTE:
            # each BLOCK_K of K in a fresh fp32 tile, then scaled into the accumulator; with
            # SCALES_AHEAD the next step's scales load here, before this step's MMA
            f_row, f_col = _step_scales(k + AHEAD, K, offs_am, offs_wn, pid_n, as_ptr, ws_ptr,
                                        stride_as0, stride_as1, stride_ws0, stride_ws1,
                                        A_GRAN, W_GRAN, BLOCK_M, BLOCK_N)
            if SCALES_AHEAD:
                c_row, c_col = s_row, s_col
                s_row, s_col = f_row, f_col
            else:
                c_row, c_col = f_row, f_col
            acc = _promote(acc, _dot(a, b, None, SWAP_AB), c_row, c_col, W_GRAN, SWAP_AB,
                           BLOCK_N)
        elif PRECISE:
            acc += _dot(a, b, None, SWAP_AB)
        else:
            acc = _dot(a, b, acc, SWAP_AB)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if SWAP_AB:
        acc = tl.trans(acc)

    acc = _tile_scales(acc, offs_am, offs_wn, as_ptr, ws_ptr, stride_as0, stride_ws0,
                       A_GRAN, W_GRAN)

    if SPLIT_K > 1:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        p_ptrs = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(p_ptrs + pid_k * stride_split, acc, mask=mask)
        if FOLD_SPLIT:
            # The last program of the tile to arrive sums the partials and runs the
            # epilogue, in place of a second kernel.  The barrier orders every thread's
            # partial before the counter's release; the acquire, every read after it.
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                # in split order, as _splitk_epilogue_kernel adds: the same bits
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(SPLIT_K):
                    # (not mask & (pid_k != s): Triton 3.9's interpreter rejects that mask)
                    other = tl.load(p_ptrs + s * stride_split,
                                    mask=tl.where(pid_k != s, mask, False), other=0.0,
                                    cache_modifier=".cg")
                    total += tl.where(pid_k == s, acc, other)
                tl.store(cnt_ptr + pid, 0)  # zero again for the next launch
                _epilogue(total, offs_m, offs_n, M, N, bias_ptr, res_ptr, out_ptr,
                          stride_rm, stride_rn, stride_om, stride_on, HAS_BIAS, ACTIVATION,
                          HAS_RES)
    else:
        _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, res_ptr, out_ptr,
                  stride_rm, stride_rn, stride_om, stride_on, HAS_BIAS, ACTIVATION, HAS_RES)


@triton.jit
def _splitk_epilogue_kernel(
    part_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, stride_split, stride_rm, stride_rn, stride_om, stride_on,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    p_ptrs = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(p_ptrs + s * stride_split, mask=mask, other=0.0)
    _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, res_ptr, out_ptr,
              stride_rm, stride_rn, stride_om, stride_on, HAS_BIAS, ACTIVATION, HAS_RES)


_kernel = triton.heuristics(
    {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0 and a["k_per_split"] % a["BLOCK_K"] == 0}
)(_scaled_mm_kernel)


def _bench(kernel_call, quantiles):
    # 5 ms warm-up / 25 ms of repeats per config: a shape tunes in ~1 s, not ~10 s.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


# What the autotuner keys on; _precompile_configs keys on the same.
_TUNING_KEY = ("M_BUCKET", "N", "K", "A_GRAN", "W_GRAN", "PRECISE", "SPLIT_K")

_tuned = triton.autotune(
    configs=tuning.configs(),
    key=list(_TUNING_KEY),
    prune_configs_by={"early_config_prune": tuning.prune},
    do_bench=_bench,
)(_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Autotuning keys whose tile configs have been compiled (see _precompile_configs).
_PRECOMPILED: set[tuple] = set()


def _precompile_configs(args: dict, extra_key: tuple) -> None:
    """Compile the tile configs the autotuner is about to time, all at once in threads.

    The autotuner compiles one config after another before timing each: seven configs of
    the large-M fast path took ~4.5 s of a prefill block's first call, more than the rest
    of its compile (docs/performance.md).  Triton's async-compile mode runs ``warmup``
    compiles on an executor and files each kernel in the JIT's cache, where the autotuner's
    launches then find it.  A config that fails to compile is left to the autotuner, which
    reports or skips it as before; so is everything if the mode is missing or fails.
    """
    key = (tuple(args[name] for name in _TUNING_KEY), *extra_key)
    if key in _PRECOMPILED:
        return
    _PRECOMPILED.add(key)
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return
    configs = tuning.prune(tuning.configs(), args)
    workers = min(len(configs), os.cpu_count() or 1, _MAX_COMPILE_THREADS)
    if workers < 2:
        return
    # The autotuner compiles whatever is missing, as before: a config that fails here, or all
    # of them if the mode itself fails.
    try:
        with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for config in configs:
                try:
                    _kernel.warmup(**args, **config.all_kwargs(), grid=(1,))
                except Exception:  # noqa: BLE001, S112
                    continue
    except Exception:  # noqa: BLE001
        return


_MAX_COMPILE_THREADS = 8


def _scale_strides(s: torch.Tensor) -> tuple[int, int]:
    if s.dim() == 2:
        return s.stride(0), s.stride(1)
    return (s.stride(0) if s.dim() == 1 else 0), 0


def _check_scale(s: torch.Tensor, gran: Granularity, rows: int, k: int, what: str) -> None:
    kb = cdiv(k, 128)
    want = {
        Granularity.TENSOR: 1,
        Granularity.ROW: rows,
        Granularity.GROUP: rows * kb,
        Granularity.BLOCK: cdiv(rows, 128) * kb,
    }[gran]
    if s.dtype != torch.float32 or s.numel() != want:
        raise ValueError(
            f"scaled_mm: {what} scale has shape {tuple(s.shape)} and dtype {s.dtype}; "
            f"{gran.value} scaling of {rows}x{k} needs fp32 with {want} elements "
            "(as numerics.quantize returns)"
        )


def scaled_mm(
    xq: torch.Tensor, xs: torch.Tensor, x_granularity: Granularity,
    wq: torch.Tensor, ws: torch.Tensor, w_granularity: Granularity,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
    accumulation: str = "precise", activation: str = "none",
    residual: torch.Tensor | None = None, config: dict | None = None, gluon: bool = True,
    out_scale: torch.Tensor | None = None, residual2: torch.Tensor | None = None,
    gemv: bool = True,
) -> torch.Tensor:
    """``act(dequant(xq) @ dequant(wq).T + bias) + residual (+ residual2)`` in ``out_dtype``.

    Same result as :func:`fp8compile.ops.scaled_mm_reference` up to fp32 summation order
    (``precise``) or Hopper's reduced-precision FP8 accumulation (``fast`` with tensor/row
    scales; blockwise scales are always promoted every 128 of K).  ``config`` forces a tile
    config (keys of :func:`tuning.default_config` plus optional ``SPLIT_K``) instead of the
    autotuned one; ``{"SPLIT_K": s}`` alone forces the split of an M <= 256 GEMM and keeps
    the autotuned tile (``benchmarks/gemm.py --splits``).  An FP8 ``out_dtype`` takes
    ``out_scale`` (one fp32 element, a static scale) and casts the output with it
    (``ops.scaled_mm_quantized``): in the Gluon kernel's epilogue where it serves the GEMM,
    else from an fp32 product in one more pass.  ``gluon=False`` keeps a blockwise
    GEMM on the Triton kernel where the Gluon kernel would serve it (see
    :func:`gluon_serves`): the compile-time decisions time and tune what a traced graph
    will launch.  ``residual2``, a second residual, is added in fp32 too (a residual stream
    ``x + o`` that is never rounded): the Gluon kernel loads both, other paths add their
    fp32 sum (:func:`fp8compile.numerics.residual_sum`).  One row (``M == 1``, a static
    shape) runs on the CUDA cores (:func:`.gemv.gemv_2d`) unless ``gemv=False`` or a
    ``config`` is given, or on Hopper the decode Gluon kernel serves it (``gluon``,
    :mod:`.decode_ws`).

    Example::

        >>> y = scaled_mm(xq, xs, Granularity.GROUP, wq, ws, Granularity.BLOCK)  # doctest: +SKIP
    """
    x_granularity, w_granularity = Granularity(x_granularity), Granularity(w_granularity)
    if xq.dtype not in FP8_FORMATS or wq.dtype not in FP8_FORMATS:
        raise ValueError(
            f"scaled_mm takes FP8 operands, got {xq.dtype} and {wq.dtype}; "
            "quantize them with fp8compile.kernels.quantize first"
        )
    if wq.dim() != 2 or xq.dim() < 1 or xq.shape[-1] != wq.shape[1]:
        raise ValueError(
            f"scaled_mm: x has shape {tuple(xq.shape)} but w has shape {tuple(wq.shape)}; "
            "w must be (N, K) like nn.Linear.weight with K = x.shape[-1]"
        )
    if accumulation not in ("precise", "fast"):
        raise ValueError(f"scaled_mm: accumulation={accumulation!r} is not 'precise' or 'fast'")
    swiglu = activation == "swiglu"
    if activation not in ACT_CODE and not swiglu:
        raise ValueError(f"scaled_mm: activation={activation!r} is not one of "
                         f"{[*ACT_CODE, 'swiglu']}")
    if swiglu:
        check_swiglu_rows(wq.shape[0])
    if out_dtype in FP8_FORMATS and out_scale is None:
        raise ValueError(f"scaled_mm: out_dtype={out_dtype} needs out_scale, the static scale "
                         "of the FP8 output")
    if out_dtype not in _OUT_DTYPES and out_dtype not in FP8_FORMATS:
        raise ValueError(f"scaled_mm: out_dtype={out_dtype} is not one of {_OUT_DTYPES} or "
                         "an FP8 format (with out_scale)")
    if out_scale is not None and out_dtype not in FP8_FORMATS:
        raise ValueError(f"scaled_mm: out_scale casts to FP8, but out_dtype={out_dtype}")
    if residual2 is not None and residual is None:
        raise ValueError("scaled_mm: residual2 is a second residual; give residual first")
    k = xq.shape[-1]
    n = wq.shape[0]
    lead = xq.shape[:-1]
    m = math.prod(lead)
    if x_granularity is Granularity.BLOCK and xq.dim() != 2:
        raise NotImplementedError("128x128 activation scales need a 2-D x")
    _check_scale(xs, x_granularity, m, k, "x")
    _check_scale(ws, w_granularity, n, k, "w")
    out_n = n // 2 if swiglu else n
    if m == 0 or n == 0:
        return torch.empty((*lead, out_n), dtype=out_dtype, device=xq.device)
    if k == 0:
        raise NotImplementedError("K == 0")
    a, xs2, w, ws2 = _operands_2d(xq, xs, x_granularity, wq, ws, w_granularity, contiguous_2d)
    # Hopper's FP8 dot takes one format per operand pair in Triton only when both match.
    if a.dtype != w.dtype:
        raise NotImplementedError("mixed E4M3 x E5M2 operands")
    if gluon and config is None and _gluon_takes(a, xs2, x_granularity, w, ws2, w_granularity,
                                                 out_dtype, activation, residual, accumulation,
                                                 residual2=residual2):
        out, residuals = _gluon_outputs(m, out_n, out_dtype, xq.device, residual, residual2)
        if decode_ws.decode_sized(m):
            decode_ws.decode_mm(a, xs2, w, ws2, bias, out, x_granularity, w_granularity,
                                accumulation, residuals)
            return out.reshape(*lead, out_n)
        return blockwise_ws.blockwise_mm(a, xs2, w, ws2, bias, out, x_granularity,
                                         w_granularity, accumulation, swiglu=swiglu,
                                         out_scale=out_scale,
                                         residuals=residuals).reshape(*lead, out_n)
    residual = residual_sum(residual, residual2)
    if out_scale is not None:
        # No FP8 cast in this epilogue: the fp32 product (with the epilogue), then one pass.
        from .quant import quantize_with_scale

        y = scaled_mm(xq, xs, x_granularity, wq, ws, w_granularity, bias, torch.float32,
                      accumulation, activation, residual, config, gluon)
        return quantize_with_scale(y, out_scale, FP8_FORMATS[out_dtype])
    if swiglu:
        # The Triton kernel has no SwiGLU epilogue: its fp32 product, then the epilogue as
        # the reference computes it (Inductor fuses these ops in a compiled graph).
        y = scaled_mm(xq, xs, x_granularity, wq, ws, w_granularity, bias, torch.float32,
                      accumulation, "none", None, config, gluon=False)
        h = swiglu_of(y)
        return (h if residual is None else h + residual).to(out_dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if residual is not None:
        res = residual.expand(*lead, n).reshape(m, n)
        stride_rm, stride_rn = res.stride()
    else:
        res, stride_rm, stride_rn = out, 0, 0
    if gemv and config is None and type(m) is int and m == 1 and _gemv_enabled():
        from .gemv import gemv_2d

        gemv_2d(a, xs2, x_granularity, w, ws2, w_granularity, bias, out, activation,
                res if residual is not None else None)
        return out.reshape(*lead, n)
    a_gran, w_gran = GRAN_CODE[x_granularity], GRAN_CODE[w_granularity]
    # A per-tensor activation scale runs as per-row scales that all read its one element
    # (row stride 0): the same products, and on an H200 the per-tensor variant of the kernel
    # ran 256x4096x14336 at split 2 in 40.2-41.0 us against 29.1-31.3 on either data
    # (docs/performance.md, "256 rows").
    tensor_x = a_gran == GRAN_CODE[Granularity.TENSOR]
    if tensor_x:
        a_gran = GRAN_CODE[Granularity.ROW]
    precise = accumulation == "precise"
    bucket = tuning.m_bucket(m)
    blockwise = tuning.blockwise_scales(a_gran, w_gran)
    forced_split = None
    if config is not None and set(config) == {"SPLIT_K"}:
        if bucket not in tuning.SMALL_TILES:
            raise ValueError(f"scaled_mm: SPLIT_K alone forces a split for M <= 256 only, "
                             f"got M={m}; give a whole tile config to split a larger GEMM")
        forced_split, config = int(config["SPLIT_K"]), None
        if forced_split < 1:
            raise ValueError(f"scaled_mm: SPLIT_K={forced_split} must be at least 1")
    sms = tuning.num_sms(xq.device)
    if config is None and _interpreting():
        config = tuning.default_config(bucket, blockwise, n, k, sms)
    if config is None and tracing():
        config = _compile_time_config(xq, xs, x_granularity, wq, ws, w_granularity, bias,
                                      out_dtype, accumulation, activation, residual)
    if config is not None:
        bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    else:
        bm, bn = tuning.small_tile(bucket, blockwise, n, k, sms) or (128, 128)
    if forced_split is not None:
        split = forced_split
    elif config is not None and "SPLIT_K" in config:
        split = int(config["SPLIT_K"])
    else:
        split = launch_split(m, n, k, bm, bn, x_granularity, w_granularity, xq.device)
    # Each split covers whole 128-groups (and whole BLOCK_K steps; 256 covers both).
    step = 256
    k_per_split = cdiv(cdiv(k, split), step) * step
    split = cdiv(k, k_per_split)
    part = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32,
                                              device=xq.device)
    fold = (split > 1 and bm <= FOLD_SPLIT_ROWS and FOLD_SPLIT and not tracing()
            and not deciding())
    counters = _tile_counters(xq.device, cdiv(m, bm) * cdiv(n, bn)) if fold else part
    stride_as0, stride_as1 = (0, 0) if tensor_x else _scale_strides(xs2)
    stride_ws0, stride_ws1 = _scale_strides(ws2)
    args = dict(
        a_ptr=a, w_ptr=w, as_ptr=xs2, ws_ptr=ws2,
        bias_ptr=bias if bias is not None else out, res_ptr=res, out_ptr=out, part_ptr=part,
        cnt_ptr=counters,
        M=m, N=n, K=k, k_per_split=k_per_split, M_BUCKET=bucket,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_wn=w.stride(0), stride_wk=w.stride(1),
        stride_as0=stride_as0, stride_as1=stride_as1, stride_ws0=stride_ws0, stride_ws1=stride_ws1,
        stride_rm=stride_rm, stride_rn=stride_rn, stride_om=out.stride(0), stride_on=out.stride(1),
        stride_split=m * n,
        A_GRAN=a_gran, W_GRAN=w_gran, PRECISE=precise,
        HAS_BIAS=bias is not None, ACTIVATION=ACT_CODE[activation],
        HAS_RES=residual is not None, SPLIT_K=split, FOLD_SPLIT=fold,
    )

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), split)

    if config is not None:
        meta = {"GROUP_M": 8, "SWAP_AB": False, "SCALES_AHEAD": False,
                **{key: v for key, v in config.items() if key != "SPLIT_K"}}
        if tuning.needs_k128(a_gran, w_gran, precise) and (128 % meta["BLOCK_K"]):
            raise ValueError(f"BLOCK_K={meta['BLOCK_K']} must divide 128 for this recipe")
        # The heuristic of ``_kernel``, by hand: a traced launch takes a @triton.jit function.
        even_k = k % meta["BLOCK_K"] == 0 and k_per_split % meta["BLOCK_K"] == 0
        launch(_scaled_mm_kernel)[grid(meta)](**args, **meta, EVEN_K=even_k)
    else:
        _precompile_configs(args, (xq.dtype, out_dtype, None if bias is None else bias.dtype,
                                   activation, residual is not None))
        _tuned[grid](**args)
    if split > 1 and not fold:
        sbm, sbn = 16, 128
        launch(_splitk_epilogue_kernel)[(cdiv(m, sbm), cdiv(n, sbn))](
            part, args["bias_ptr"], res, out, m, n, m * n, stride_rm, stride_rn,
            out.stride(0), out.stride(1),
            SPLIT_K=split, HAS_BIAS=bias is not None, ACTIVATION=ACT_CODE[activation],
            HAS_RES=residual is not None, BLOCK_M=sbm, BLOCK_N=sbn, num_warps=4,
        )
    return out.reshape(*lead, n)


# Whether a GEMM of one row runs on the CUDA cores (kernels.gemv) instead of a 16-row
# tensor-core tile with K split.  H200, CUDA graphs, weights from HBM (docs/performance.md,
# "Decode at batch 1: one row on the CUDA cores"): 1.19-1.24x faster at 1x4096x4096,
# 1.09-1.17x at 1x14336x4096, 0.99-1.04x at 1x4096x14336, every recipe.
# ``FP8COMPILE_GEMV=0`` keeps the tensor-core kernel (read at each call: a traced graph bakes
# the choice in, and the switch is part of Inductor's cache key, _cache_key.TRACE_SWITCHES).
def _gemv_enabled() -> bool:
    return os.environ.get("FP8COMPILE_GEMV", "1") != "0"


# Whether a split-K launch of tiles at most FOLD_SPLIT_ROWS tall sums its partials in the GEMM
# kernel (the last program of each tile to finish) rather than in _splitk_epilogue_kernel.
# H200, CUDA graphs, one process (docs/performance.md): 0-0.7 us faster at M <= 16 on
# 4096x4096 (9-10 us GEMMs), up to 2 us on 4096x14336; with 32-row swapped tiles, at the
# launcher's split, blockwise 9.8 against 10.3 us at 32x4096x4096 and 22.5 against 23.3 at
# 32x4096x14336 (21.9 against 21.7 at 32x14336x4096), row fast 9.2 against 9.5 and 19.9
# against 20.1; at M = 64 (64x64 tiles) the one program's serial sum of four 64x64 partials
# cost 0.4-7 us more than the second kernel, which spreads it over 128 programs.  A graph
# being traced keeps the second kernel, and so do the compile-time decisions for it (they time
# and tune what the graph launches): the counters below are state that outlives a launch,
# which Inductor's graph does not carry.
# ``FP8COMPILE_FOLD_SPLIT_K=0`` keeps it everywhere.
FOLD_SPLIT = os.environ.get("FP8COMPILE_FOLD_SPLIT_K", "1") != "0"
FOLD_SPLIT_ROWS = 32

# Per-tile arrival counters of folded split-K launches, by device and stream.  Zero between
# launches: the last program of each tile zeroes its own.  Two launches on one stream run
# one after the other; launches on two streams use two buffers.  A buffer that grew stays
# alive: a launch still in flight may use it.
_COUNTERS: dict[tuple, list[torch.Tensor]] = {}
# A launch captured into a CUDA graph takes counters of its own instead: a slice of an arena
# made before the capture, never handed out again.  Graphs captured on one stream (torch's
# default capture stream, say) may be replayed at once on different streams; with the
# stream's buffer they would count into each other's tiles.  An arena is made by a launch
# outside any capture (an eager call, a CUDA-graph warm-up), and a fresh one once the last
# is half given out; a captured launch that finds no room takes its stream's buffer, grown
# in the graph's pool if need be (the graph then zeroes it again at each replay).
ARENA_COUNTERS = 1 << 20  # 4 MiB of int32; a launch takes one per output tile (64 for 4096x64)
_ARENAS: dict[torch.device, list] = {}  # device -> [arena, index of the next free counter]
_ARENA_LOCK = threading.Lock()


def _zeros_outside_pools(size: int, device: torch.device, stream) -> torch.Tensor:
    """int32 zeros made by another thread, on the default stream, then ordered before
    ``stream``: CUDA-graph trees warm a graph up with every allocation of the warming thread
    going to the graph's memory pool, and refuse a tensor kept there past the warm-up
    ("tensor(s) in the cudagraph pool not tracked as outputs").  The pools are per thread."""
    made: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: made.append(
        torch.zeros(size, dtype=torch.int32, device=device)))
    worker.start()
    worker.join()
    if not made:
        raise RuntimeError(f"fp8compile: allocating {size} split-K tile counters on "
                           f"{device} failed (see the thread's error above)")
    stream.wait_stream(torch.cuda.default_stream(device))
    return made[0]


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    capturing = stream is not None and torch.cuda.is_current_stream_capturing()
    if capturing:
        with _ARENA_LOCK:
            arena = _ARENAS.get(device)
            if arena is not None and arena[1] + tiles <= arena[0].numel():
                arena[1] += tiles
                return arena[0][arena[1] - tiles:arena[1]]
    elif stream is not None:
        with _ARENA_LOCK:
            arena = _ARENAS.get(device)
            if arena is None or 2 * arena[1] > arena[0].numel():
                _ARENAS[device] = [_zeros_outside_pools(ARENA_COUNTERS, device, stream), 0]
    buffers = _COUNTERS.setdefault((device, stream.cuda_stream if stream else 0), [])
    if not buffers or buffers[-1].numel() < tiles:
        size = max(tiles, 2 * buffers[-1].numel() if buffers else 1024)
        if stream is None or capturing:
            buffers.append(torch.zeros(size, dtype=torch.int32, device=device))
        else:
            buffers.append(_zeros_outside_pools(size, device, stream))
    return buffers[-1]


def _operands_2d(xq, xs, xg, wq, ws, wg, copy):
    """x as (M, K) and both operands K-major (SPEC §4: anything else is copied once by
    ``copy``, a tiled transpose), with the scales' 2-D views."""
    k, n = xq.shape[-1], wq.shape[0]
    a = xq.reshape(-1, k)
    if a.stride(1) != 1:
        a = copy(a)
    w = wq if wq.stride(1) == 1 else copy(wq)
    m = a.shape[0]
    xs2 = xs.reshape(m, -1) if xg in (Granularity.ROW, Granularity.GROUP) else xs
    ws2 = ws.reshape(n, -1) if wg in (Granularity.ROW, Granularity.GROUP) else ws
    return a, xs2, w, ws2


def swiglu_group_quantize(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor,
                          ws: torch.Tensor, fmt, accumulation: str = "precise",
                          power_of_2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``(q, scale)`` of ``silu(gate) * up`` quantized in 1x128 groups, where
    ``gate, up`` are the fp32 product of a blockwise GEMM (1x128 ``xs``, 128x128 ``ws``)
    over the weight ``torch.cat([gate, up])`` (each half a multiple of 128 rows): what a
    SwiGLU MLP's down projection reads.  On Hopper the warp-specialized kernel does it all in its
    epilogue (E4M3, plain scales), and h is never written in high precision; elsewhere the fp32
    product and h are computed, then quantized.  Scales are M-contiguous, as
    :func:`.quant.quantize` lays out groups."""
    from ..numerics import Fp8Format
    from .quant import quantize

    fmt = Fp8Format(fmt)
    check_swiglu_rows(wq.shape[0], "swiglu_group_quantize")
    lead, f = xq.shape[:-1], wq.shape[0] // 2
    m = math.prod(lead)
    a, xs2, w, ws2 = _operands_2d(xq, xs, Granularity.GROUP, wq, ws, Granularity.BLOCK,
                                  contiguous_2d)
    if (m and fmt is Fp8Format.E4M3 and not power_of_2
            and _gluon_takes(a, xs2, Granularity.GROUP, w, ws2, Granularity.BLOCK, fmt.dtype,
                             "swiglu", None, accumulation, groups=True)):
        q, s = _group_outputs(m, f, xq.device)
        blockwise_ws.blockwise_mm(a, xs2, w, ws2, None, q, Granularity.GROUP,
                                  Granularity.BLOCK, accumulation, swiglu=True, out_scale=s)
        return q.reshape(*lead, f), s
    h = scaled_mm(xq, xs, Granularity.GROUP, wq, ws, Granularity.BLOCK, None, torch.float32,
                  accumulation, "swiglu")
    return quantize(h, Granularity.GROUP, fmt, power_of_2)


def _group_outputs(m: int, f: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The blockwise SwiGLU epilogue's outputs: h ``(M, F)`` in E4M3 and its ``(M, F/128)``
    group scales, M-contiguous as :func:`.quant.quantize` lays out groups."""
    q = torch.empty((m, f), dtype=torch.float8_e4m3fn, device=device)
    s = torch.empty_strided((m, f // 128), (1, m), dtype=torch.float32, device=device)
    return q, s


def _meta_stand_ins(operands: tuple) -> tuple | None:
    """Meta-device tensors with the sizes, strides and dtypes of a traced launch's
    ``operands`` (None kept), for :func:`.blockwise_ws.precompile`; None where no compile
    can start: under the interpreter, without Gluon, or with a symbolic size or stride."""
    if _interpreting() or not blockwise_ws.HAVE_GLUON or any(
            not isinstance(d, int) for t in operands if t is not None
            for d in (*t.shape, *t.stride())):
        return None
    with outside_tracing():
        return tuple(None if t is None else
                     torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                     for t in operands)


def _gluon_outputs(m, out_n, out_dtype, device, residual, residual2):
    """The Gluon kernel's (M, N) output, and its residuals as contiguous (M, N) tensors: for
    the launch, and for :func:`precompile_gluon`'s stand-ins, whose strides must match."""
    out = torch.empty((m, out_n), dtype=out_dtype, device=device)
    return out, tuple(r.reshape(m, out_n).contiguous() for r in (residual, residual2)
                      if r is not None)


def precompile_gluon(xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype,
                     accumulation, activation, residual=None, residual2=None,
                     out_scale=None) -> bool:
    """Start compiling the Gluon kernel that an eager :func:`scaled_mm` of operands like
    these launches (:func:`.blockwise_ws.precompile`), for a compiled graph that will call it
    (the traced operands' sizes, strides and dtypes are read, nothing else).  Call only where
    :func:`gluon_serves` said it would serve.  Static shapes only; returns whether a compile
    was started."""
    device = xq.device
    stand_ins = _meta_stand_ins((xq, xs, wq, ws, bias, residual, residual2, out_scale))
    if stand_ins is None:
        return False
    xg, wg = Granularity(x_granularity), Granularity(w_granularity)
    if decode_ws.decode_sized(xq.numel() // max(1, xq.shape[-1])):
        return False  # the decode kernel is small: its first launch compiles it in ~1 s
    with outside_tracing():
        xq, xs, wq, ws, bias, residual, residual2, out_scale = stand_ins
        a, xs2, w, ws2 = _operands_2d(xq, xs, xg, wq, ws, wg, torch.Tensor.contiguous)
        swiglu = activation == "swiglu"
        m, out_n = a.shape[0], w.shape[0] // 2 if swiglu else w.shape[0]
        out, residuals = _gluon_outputs(m, out_n, out_dtype, "meta", residual, residual2)
        return blockwise_ws.precompile(a, xs2, w, ws2, bias, out, xg, wg, accumulation, swiglu,
                                       out_scale, residuals, device)


def precompile_swiglu_groups(xq, xs, wq, ws, accumulation) -> bool:
    """:func:`precompile_gluon` for the launch :func:`swiglu_group_quantize` makes."""
    device = xq.device
    stand_ins = _meta_stand_ins((xq, xs, wq, ws))
    if stand_ins is None:
        return False
    xq, xs, wq, ws = stand_ins
    with outside_tracing():
        a, xs2, w, ws2 = _operands_2d(xq, xs, Granularity.GROUP, wq, ws, Granularity.BLOCK,
                                      torch.Tensor.contiguous)
        q, s = _group_outputs(a.shape[0], w.shape[0] // 2, "meta")
        return blockwise_ws.precompile(a, xs2, w, ws2, None, q, Granularity.GROUP,
                                       Granularity.BLOCK, accumulation, True, s, (), device)


def gluon_serves(xq, xs, x_granularity, wq, ws, w_granularity, out_dtype, activation,
                 residual, accumulation: str = "precise", residual2=None,
                 groups: bool = False) -> bool:
    """Whether an eager :func:`scaled_mm` of these operands runs a Gluon kernel, that of
    :mod:`.blockwise_ws` or, at decode sizes, of :mod:`.decode_ws` (layout aside: an
    operand that is not K-major is copied first).
    The backend choice keys on it, so that a choice timed against the Gluon kernel is never
    applied to a traced graph, which launches the Triton kernel.  Reads sizes and dtypes
    only: the compile-time choice asks it about traced operands."""
    if xq.dim() < 1 or wq.dim() != 2:
        return False
    # no reshape: at compile time the operands are functional tensors, outside their mode
    return _gluon_takes(xq, xs, x_granularity, wq, ws, w_granularity, out_dtype, activation,
                        residual, accumulation, layout=False, residual2=residual2,
                        groups=groups)


def _gluon_takes(a, xs, x_granularity, w, ws, w_granularity, out_dtype, activation, residual,
                 accumulation, layout: bool = True, residual2=None,
                 groups: bool = False) -> bool:
    """The one rule for both callers: eager, compiled (not interpreted), every rule of
    :func:`.blockwise_ws.unsupported` (:func:`.decode_ws.unsupported` at decode sizes) met
    for the 2-D operands, and residuals of the output's dtype and shape (the kernel loads
    them as output tiles; no broadcast).
    A blockwise SwiGLU writes 1x128-group E4M3 there, which only
    :func:`swiglu_group_quantize` asks for (``groups``): :func:`scaled_mm`'s FP8 output
    takes a static scale."""
    if (activation == "swiglu" and Granularity(x_granularity) is Granularity.GROUP) != groups:
        return False
    residuals = [r for r in (residual, residual2) if r is not None]
    m = a.numel() // max(1, a.shape[-1])
    if any(r.dtype != out_dtype or r.numel() != m * w.shape[0] or r.shape[-1] != w.shape[0]
           for r in residuals):
        return False
    if tracing() or _interpreting() or torch.compiler.is_dynamo_compiling():
        return False  # (Dynamo tracing this launcher itself cannot trace a Gluon launch)
    if decode_ws.decode_sized(m):
        return decode_ws.unsupported(a, xs, x_granularity, w, ws, w_granularity, out_dtype,
                                     activation, len(residuals), layout=layout) is None
    return blockwise_ws.unsupported(
        a, xs, x_granularity, w, ws, w_granularity, out_dtype, activation,
        len(residuals), layout=layout, accumulation=accumulation) is None


# Tile configs of GEMMs inlined into compiled graphs, by what the autotuner keys on.
_COMPILE_TIME_CONFIGS: dict[tuple, dict] = {}


def _compile_time_config(xq, xs, xg, wq, ws, wg, bias, out_dtype, accumulation, activation,
                         residual) -> dict:
    """The autotuner's config for a GEMM being traced (Inductor launches a fixed config): on
    first sight of the key, the same GEMM runs once on real random operands of the same
    sizes, strides and dtypes, and ``_tuned``'s choice is kept.  ``SPLIT_K`` is set as the
    autotuned launch sets it."""
    m, k, n = xq.numel() // max(1, xq.shape[-1]), xq.shape[-1], wq.shape[0]
    bucket = tuning.m_bucket(m)
    key = (bucket, n, k, xg, wg, accumulation, xq.dtype, out_dtype, activation,
           bias is not None, residual is not None)
    if key not in _COMPILE_TIME_CONFIGS:
        with outside_tracing():
            real = [random_like(t) for t in (xq, xs, wq, ws, bias, residual)]
            scaled_mm(real[0], real[1], xg, real[2], real[3], wg, real[4], out_dtype,
                      accumulation, activation, real[5], gluon=False)
        best = _tuned.best_config
        _COMPILE_TIME_CONFIGS[key] = {**best.kwargs, "num_warps": best.num_warps,
                                      "num_stages": best.num_stages}
    config = dict(_COMPILE_TIME_CONFIGS[key])
    config["SPLIT_K"] = launch_split(m, n, k, config["BLOCK_M"], config["BLOCK_N"], xg, wg,
                                     xq.device)
    return config


def launch_split(m: int, n: int, k: int, block_m: int, block_n: int, x_granularity,
                 w_granularity, device: torch.device) -> int:
    """The split of K the launcher picks when none is forced: :func:`tuning.split_k` for
    ``block_m x block_n`` tiles at M <= 256 (more programs with blockwise scales), none
    above."""
    if tuning.m_bucket(m) not in tuning.SMALL_TILES:
        return 1
    blockwise = tuning.blockwise_scales(GRAN_CODE[Granularity(x_granularity)],
                                        GRAN_CODE[Granularity(w_granularity)])
    return tuning.split_k(m, n, k, block_m, block_n, tuning.num_sms(device),
                          blockwise=blockwise)
