"""FP8 GEMM for one to four rows (decode at batch 1-4): the weight streamed once through the
CUDA cores, no tensor cores.

At M <= 4 an FP8 linear is a read of its weight: 16 MiB for 4096x4096, against 32 KiB of
activations.  The tensor-core kernel of :mod:`.gemm` pads such an M to a 16-row tile and
splits K to fill the SMs.  Here every program instead owns ``BLOCK_N`` output columns for
all rows and walks all of K: no partial sums, no second launch, and many small programs
(``N / BLOCK_N``, several per SM) keep loads in flight.  Each ``128``-wide step loads a
``[BLOCK_N, 128]`` FP8 weight tile (rows of 128 contiguous bytes), converts it to fp32 and
multiplies it by each row of the activation step, summed over the 128 in fp32.

Not dispatched yet: ``benchmarks/gemv.py`` times it against :func:`.gemm.scaled_mm` at one
to four rows; it takes over those sizes only where it measures faster.

Numerics are those of the tensor-core kernel's ``precise`` mode and of
:func:`fp8compile.numerics.scaled_mm_reference`: products and sums in fp32, scales that
change along K (1x128 groups, 128x128 blocks) applied to each 128-wide partial sum
(promotion every 128 of K), scales constant along K (row, tensor) applied once after the
loop.  Only the summation order differs (a tree over each 128, then in K order), so results
equal the reference to fp32 rounding; ``fast`` accumulation asks for nothing less precise.

The epilogue (bias, activation, residual, cast) is :func:`.gemm._epilogue`, the same code as
the tensor-core kernel's.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..numerics import FP8_FORMATS, Granularity
from .gemm import _OUT_DTYPES, ACT_CODE, _check_scale, _epilogue, _operands_2d, _scale_strides
from .layout import contiguous_2d
from .quant import GRAN_CODE
from .tuning import cdiv, next_pow2

__all__ = ["GEMV_ROWS", "default_block_n", "scaled_gemv"]

# The most rows this kernel takes: at 4 rows a step holds 4 x BLOCK_N x 128 fp32 products;
# past that the fp32 FMAs (M per weight byte) outgrow the weight stream they hide under.
GEMV_ROWS = 4
_STEP = 128  # K per step: one 1x128 group / 128x128 block of scales


@triton.jit
def _scaled_gemv_kernel(
    a_ptr, w_ptr, as_ptr, ws_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K,
    stride_am, stride_wn, stride_as0, stride_as1, stride_ws0, stride_ws1,
    stride_rm, stride_rn, stride_om, stride_on,
    A_GRAN: tl.constexpr, W_GRAN: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RES: tl.constexpr, EVEN_K: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, STEP: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, ROWS)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, STEP)
    # Rows past M and columns past N wrap: loads stay unpredicated, the store masks.
    offs_am = offs_m % M
    offs_wn = offs_n % N
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + offs_wn[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, STEP):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[None, :] < K - k, other=0.0)
        # [ROWS, 1, STEP] x [1, BLOCK_N, STEP], summed over the step in fp32
        p = tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if (A_GRAN >= 2) or (W_GRAN >= 2):
            kb = k // STEP
            if A_GRAN == 2:
                s_row = tl.load(as_ptr + offs_am * stride_as0 + kb * stride_as1)
            elif A_GRAN == 3:
                s_row = tl.load(as_ptr + (offs_am // 128) * stride_as0 + kb * stride_as1)
            else:
                s_row = tl.full((ROWS,), 1.0, tl.float32)
            if W_GRAN >= 2:
                per = 128 if W_GRAN == 3 else 1
                s_col = tl.load(ws_ptr + (offs_wn // per) * stride_ws0 + kb * stride_ws1)
                acc += p * s_row[:, None] * s_col[None, :]
            else:
                acc += p * s_row[:, None]
        else:
            acc += p
        a_ptrs += STEP
        w_ptrs += STEP

    # Scales constant along K: once, after the loop.
    if A_GRAN == 1:
        acc = acc * tl.load(as_ptr + offs_am * stride_as0)[:, None]
    elif A_GRAN == 0:
        acc = acc * tl.load(as_ptr)
    if W_GRAN == 1:
        acc = acc * tl.load(ws_ptr + offs_wn * stride_ws0)[None, :]
    elif W_GRAN == 0:
        acc = acc * tl.load(ws_ptr)
    _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, res_ptr, out_ptr,
              stride_rm, stride_rn, stride_om, stride_on, HAS_BIAS, ACTIVATION, HAS_RES)


def default_block_n(m: int, n: int) -> int:
    """Output columns per program: 32 for one row, fewer for more rows, so that the step's
    ``rows x block_n x 128`` fp32 products stay near 72-80 registers a thread at 4 warps
    (sm_90, ``benchmarks/kernel_resources.py``; 32 columns of 4 rows take 208)."""
    return min(32 // next_pow2(max(1, m)), next_pow2(n))


def scaled_gemv(xq: torch.Tensor, xs: torch.Tensor, x_granularity, wq: torch.Tensor,
                ws: torch.Tensor, w_granularity, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16, activation: str = "none",
                residual: torch.Tensor | None = None, block_n: int | None = None,
                num_warps: int = 4) -> torch.Tensor:
    """``act(dequant(xq) @ dequant(wq).T + bias) + residual`` for ``xq (..., K)`` of at most
    :data:`GEMV_ROWS` rows, with the operands and scales :func:`.gemm.scaled_mm` takes.
    ``block_n`` (a power of two; default :func:`default_block_n`) and ``num_warps`` set the
    launch."""
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
    if m > GEMV_ROWS:
        raise ValueError(f"scaled_gemv: x has M={m} rows; this kernel takes at most "
                         f"{GEMV_ROWS} (kernels.scaled_mm takes any M)")
    if block_n is not None and (block_n < 1 or block_n & (block_n - 1)):
        raise ValueError(f"scaled_gemv: block_n={block_n} must be a power of two")
    if xg is Granularity.BLOCK and xq.dim() != 2:
        raise NotImplementedError("128x128 activation scales need a 2-D x")
    _check_scale(xs, xg, m, k, "x")
    _check_scale(ws, wg, n, k, "w")
    out = torch.empty((*lead, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise NotImplementedError("K == 0")
    a, xs2, w, ws2 = _operands_2d(xq, xs, xg, wq, ws, wg, contiguous_2d)
    o = out.view(m, n)
    if residual is not None:
        res = residual.expand(*lead, n).reshape(m, n)
        stride_rm, stride_rn = res.stride()
    else:
        res, stride_rm, stride_rn = o, 0, 0
    block_n = block_n or default_block_n(m, n)
    _scaled_gemv_kernel[(cdiv(n, block_n),)](
        a, w, xs2, ws2, bias if bias is not None else o, res, o,
        m, n, k, a.stride(0), w.stride(0), *_scale_strides(xs2), *_scale_strides(ws2),
        stride_rm, stride_rn, *o.stride(),
        A_GRAN=GRAN_CODE[xg], W_GRAN=GRAN_CODE[wg], HAS_BIAS=bias is not None,
        ACTIVATION=ACT_CODE[activation], HAS_RES=residual is not None, EVEN_K=k % _STEP == 0,
        ROWS=next_pow2(m), BLOCK_N=block_n, STEP=_STEP, num_warps=num_warps,
    )
    return out
