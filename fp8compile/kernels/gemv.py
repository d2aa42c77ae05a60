"""FP8 GEMM of one row (decode at batch 1): the weight streamed once through the CUDA cores,
no tensor cores.

At M = 1 an FP8 linear is a read of its weight: 16 MiB for 4096x4096, against 4 KiB of
activation.  The tensor-core kernel of :mod:`.gemm` pads the row to a 16-row tile and splits
K to fill the SMs.  Here each program owns ``BLOCK_N`` output columns and walks all of K in
steps of ``BLOCK_K``: it loads a ``[BLOCK_N, BLOCK_K]`` FP8 weight tile (rows of contiguous
bytes), converts it to fp32, multiplies it by the step's slice of x and sums each 128 of K.
The next step's weight tile is loaded before a step's arithmetic, so every program keeps
two tiles of the weight stream in flight, and weight loads are ``evict_first`` (it is read
once).  A first version without the load ahead, in 128-wide steps, waited out one memory
latency per step: 14-93 us at 1x4096x4096 on an H200, against 7.7-7.8 us now and 9.3 us for
the tensor-core kernel (``benchmarks/gemv.py``).

Two rows or more are left to the tensor-core kernel: they were slower here at every launch
measured (``docs/performance.md``, "Decode at batch 1: one row on the CUDA cores").

Numerics are those of the tensor-core kernel's ``precise`` mode and of
:func:`fp8compile.numerics.scaled_mm_reference`: products and sums in fp32, scales that
change along K (1x128 groups, 128x128 blocks) applied to each 128-wide partial sum
(promotion every 128 of K), scales constant along K (row, tensor) applied once after the
loop.  Only the summation order differs, so results equal the reference to fp32 rounding;
``fast`` accumulation asks for nothing less precise.

The epilogue (bias, activation, residual, cast) is :func:`.gemm._epilogue`, the same code as
the tensor-core kernel's.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..numerics import FP8_FORMATS, Granularity
from ..ops._inline import launch
from .gemm import _OUT_DTYPES, ACT_CODE, _check_scale, _epilogue, _operands_2d, _scale_strides
from .layout import contiguous_2d
from .quant import GRAN_CODE
from .tuning import cdiv, num_sms

__all__ = ["default_launch", "gemv_2d", "scaled_gemv"]

_STEP = 128  # K of one 1x128 group / 128x128 block of scales


@triton.jit
def _gemv_step(w, a_ptr, as_ptr, s_col, k, K, offs_k, offs_g, stride_as1,
               A_GRAN: tl.constexpr, W_GRAN: tl.constexpr, GROUPS: tl.constexpr,
               STEP: tl.constexpr):
    """One step's ``[BLOCK_N]`` contribution: x[k:k+BLOCK_K] against the weight tile ``w``,
    each 128 of K times its scales when these change along K."""
    a = tl.load(a_ptr + k + offs_k, mask=offs_k < K - k, other=0.0)
    prod = w.to(tl.float32) * a.to(tl.float32)[None, :]  # [BLOCK_N, BLOCK_K]
    if (A_GRAN >= 2) or (W_GRAN >= 2):
        part = tl.sum(tl.reshape(prod, (prod.shape[0], GROUPS, STEP)), axis=2)
        kb = k // STEP + offs_g
        if W_GRAN >= 2:
            part = part * s_col
        if A_GRAN >= 2:  # one row: its 1x128 group or 128x128 block row is row 0
            part = part * tl.load(as_ptr + kb * stride_as1, mask=kb * STEP < K,
                                  other=0.0)[None, :]
        return tl.sum(part, axis=1)
    return tl.sum(prod, axis=1)


@triton.jit
def _scaled_gemv_kernel(
    a_ptr, w_ptr, as_ptr, ws_ptr, bias_ptr, res_ptr, out_ptr,
    N, K,
    stride_wn, stride_as1, stride_ws0, stride_ws1, stride_rn, stride_on,
    A_GRAN: tl.constexpr, W_GRAN: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, STEP: tl.constexpr,
):
    pid = tl.program_id(0)
    BLOCK_K: tl.constexpr = GROUPS * STEP
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, GROUPS)
    # Columns past N wrap: weight loads stay in bounds, the store masks.
    offs_wn = offs_n % N
    w_ptrs = w_ptr + offs_wn[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    per: tl.constexpr = 128 if W_GRAN == 3 else 1
    s_ptrs = ws_ptr + (offs_wn[:, None] // per) * stride_ws0 + offs_g[None, :] * stride_ws1
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # The weight is read once: evict_first keeps it from displacing x, the scales and the
    # output in L2 (H200: 7.9-8.3 -> 7.7-7.8 us at 1x4096x4096, 21.7-21.8 -> 19.7-19.9 with
    # row/tensor scales at 1x4096x14336).
    w = tl.load(w_ptrs, mask=offs_k[None, :] < K, other=0.0, eviction_policy="evict_first")
    for k in range(0, K, BLOCK_K):
        # The next step's tile is loaded before this step's arithmetic (masked off past K).
        nk = k + BLOCK_K
        w_next = tl.load(w_ptrs + nk, mask=offs_k[None, :] < K - nk, other=0.0,
                         eviction_policy="evict_first")
        if W_GRAN >= 2:  # weight scales that change along K: this step's [BLOCK_N, GROUPS]
            s_col = tl.load(s_ptrs + (k // STEP) * stride_ws1,
                            mask=(k // STEP + offs_g[None, :]) * STEP < K, other=0.0)
        else:
            s_col = 1.0
        acc += _gemv_step(w, a_ptr, as_ptr, s_col, k, K, offs_k, offs_g, stride_as1,
                          A_GRAN, W_GRAN, GROUPS, STEP)
        w = w_next

    # Scales constant along K: once, after the loop.
    if A_GRAN <= 1:  # one row: its row scale or the tensor's
        acc = acc * tl.load(as_ptr)
    if W_GRAN == 1:
        acc = acc * tl.load(ws_ptr + offs_wn * stride_ws0)
    elif W_GRAN == 0:
        acc = acc * tl.load(ws_ptr)
    _epilogue(acc[None, :], tl.arange(0, 1), offs_n, 1, N, bias_ptr, res_ptr, out_ptr,
              0, stride_rn, 0, stride_on, HAS_BIAS, ACTIVATION, HAS_RES)


def default_launch(n: int, device: torch.device) -> dict:
    """``block_n``, ``block_k`` and ``num_warps`` for ``N`` output columns: 8 columns a
    program, 4 warps, and steps of 1024 of K while there are at most four programs per SM,
    512 past that.  On an H200 (``benchmarks/gemv.py``, M = 1) 1024 was fastest at N = 4096
    (7.9-8.3 us against 8.7-9.1 at 512, K = 4096) and 512 at N = 14336 (20.5-20.7 against
    22.8-24.1 us); a second step loaded ahead was slower at every launch."""
    programs = cdiv(n, 8)
    return {"block_n": 8, "block_k": 1024 if programs <= 4 * num_sms(device) else 512,
            "num_warps": 4}


def scaled_gemv(xq: torch.Tensor, xs: torch.Tensor, x_granularity, wq: torch.Tensor,
                ws: torch.Tensor, w_granularity, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16, activation: str = "none",
                residual: torch.Tensor | None = None, block_n: int | None = None,
                block_k: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """``act(dequant(xq) @ dequant(wq).T + bias) + residual`` for an ``xq (..., K)`` of one
    row, with the operands and scales :func:`.gemm.scaled_mm` takes.  ``block_n`` (a power of
    two), ``block_k`` (K per step: 128 times a power of two) and ``num_warps`` set the launch;
    each defaults to :func:`default_launch`'s."""
    xg, wg = Granularity(x_granularity), Granularity(w_granularity)
    if xq.dtype not in FP8_FORMATS or wq.dtype != xq.dtype:
        raise ValueError(f"scaled_gemv: xq and wq must share one FP8 dtype, got {xq.dtype} and "
                         f"{wq.dtype}; quantize both with one format")
    if wq.dim() != 2 or xq.dim() < 1 or xq.shape[-1] != wq.shape[1]:
        raise ValueError(f"scaled_gemv: xq {tuple(xq.shape)} and wq {tuple(wq.shape)} must be "
                         "(..., K) and (N, K)")
    if activation not in ACT_CODE:
        raise ValueError(f"scaled_gemv: activation={activation!r} is not one of "
                         f"{sorted(ACT_CODE)} (SwiGLU runs in the tensor-core kernels)")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"scaled_gemv: out_dtype={out_dtype} is not one of {_OUT_DTYPES}")
    lead, k, n = xq.shape[:-1], xq.shape[-1], wq.shape[0]
    m = math.prod(lead)
    if m != 1:
        raise ValueError(f"scaled_gemv: x has M={m} rows; this kernel takes one "
                         "(kernels.scaled_mm takes any M)")
    cfg = default_launch(n, xq.device)
    cfg.update((key, v) for key, v in (("block_n", block_n), ("block_k", block_k),
                                       ("num_warps", num_warps)) if v is not None)
    block_n, block_k = cfg["block_n"], cfg["block_k"]
    if block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"scaled_gemv: block_n={block_n} must be a power of two")
    groups = block_k // _STEP
    if block_k % _STEP or groups < 1 or groups & (groups - 1):
        raise ValueError(f"scaled_gemv: block_k={block_k} must be 128 times a power of two "
                         "(one scale group per 128 of K)")
    _check_scale(xs, xg, m, k, "x")
    _check_scale(ws, wg, n, k, "w")
    out = torch.empty((*lead, n), dtype=out_dtype, device=xq.device)
    if n == 0:
        return out
    if k == 0:
        raise NotImplementedError("K == 0")
    a, xs2, w, ws2 = _operands_2d(xq, xs, xg, wq, ws, wg, contiguous_2d)
    o = out.view(1, n)
    res = residual.expand(*lead, n).reshape(1, n) if residual is not None else None
    gemv_2d(a, xs2, xg, w, ws2, wg, bias, o, activation, res, cfg)
    return out


def gemv_2d(a: torch.Tensor, xs2: torch.Tensor, xg: Granularity, w: torch.Tensor,
            ws2: torch.Tensor, wg: Granularity, bias: torch.Tensor | None, out: torch.Tensor,
            activation: str, residual: torch.Tensor | None, cfg: dict | None = None) -> None:
    """The launch of :func:`scaled_gemv` on operands already checked and laid out as
    :func:`.gemm.scaled_mm` prepares them (``_operands_2d``): ``a (1, K)`` and ``w (N, K)``
    K-major, their 2-D scale views, ``out (1, N)`` and ``residual (1, N)`` or None.
    ``cfg`` is a launch (:func:`default_launch`'s keys, checked), by default that one."""
    n, k = w.shape
    cfg = cfg or default_launch(n, a.device)
    res = residual if residual is not None else out
    launch(_scaled_gemv_kernel)[(cdiv(n, cfg["block_n"]),)](
        a, w, xs2, ws2, bias if bias is not None else out, res, out,
        n, k, w.stride(0), _scale_strides(xs2)[1], *_scale_strides(ws2), res.stride(1),
        out.stride(1),
        A_GRAN=GRAN_CODE[xg], W_GRAN=GRAN_CODE[wg], HAS_BIAS=bias is not None,
        ACTIVATION=ACT_CODE[activation], HAS_RES=residual is not None,
        BLOCK_N=cfg["block_n"], GROUPS=cfg["block_k"] // _STEP, STEP=_STEP,
        num_warps=cfg["num_warps"],
    )
