"""FP8 grouped GEMM (Triton): a mixture of experts' expert projections in one launch.

``y[rows of group g] = x[rows of group g] @ W[g]ᵀ``: ``x`` is ``(S, K)`` with its rows sorted
by group, ``offs`` (int32, one per group) the cumulative row count at each group's end, and
``W`` is ``(G, N, K)``, one ``(N, K)`` weight per group.  Rows past ``offs[-1]`` belong to no
group and come out zero.

The grid's first axis walks every group's row tiles one after another: the program at ``pid``
finds its group from the tile counts per group (``cdiv(rows, BLOCK_M)``, a cumulative sum over
``offs`` in registers), so no group boundary falls inside a tile and nothing is sorted or
counted on the host.  A group's tiles can leave at most one partial tile each, so
``cdiv(S, BLOCK_M) + G + 1`` programs cover every group and the unclaimed tail; the rest
return at once.  Programs next to each other along that axis share a weight column tile, which
L2 then serves to all of a group's row tiles.

The K loop is :mod:`.gemm`'s: the same tile loads, scale factors and promotion every 128 of K
for blockwise scales (1x128 activation groups, each group's 128x128 weight blocks), row/tensor
scales applied once per tile (``precise`` adds each K step's product in fp32, ``fast`` chains
them on the tensor cores).  Scales per group: tensor ``(G,)``, row ``(G, N, 1)``, block
``(G, ceil(N/128), ceil(K/128))`` (:func:`fp8compile.numerics.quantize_grouped_weight`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..numerics import FP8_FORMATS, Granularity, check_grouped_operands
from .gemm import (
    _OUT_DTYPES,
    _epilogue,
    _load_step,
    _promote,
    _scale_strides,
    _step_scales,
    _tile_scales,
)
from .quant import GRAN_CODE
from .tuning import cdiv

__all__ = ["scaled_grouped_mm"]


@triton.jit
def _group_of(pid_m, offs_ptr, M, G, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """(group, first row, end row) of row tile ``pid_m``.  Past the groups' tiles the group is
    ``G``: the tiles of the rows past ``offs[-1]``, which no group claims, up to ``M``."""
    gi = tl.arange(0, BLOCK_G)
    # clamped at 0: an offset below 0 makes an empty group, never a negative row
    ends = tl.maximum(tl.load(offs_ptr + gi, mask=gi < G, other=0), 0)
    starts = tl.maximum(tl.load(offs_ptr + gi - 1, mask=(gi > 0) & (gi < G), other=0), 0)
    tiles = tl.where(gi < G, tl.maximum(tl.cdiv(ends - starts, BLOCK_M), 0), 0)
    cum = tl.cumsum(tiles, axis=0)
    total = tl.sum(tiles, axis=0)
    g = tl.sum((cum <= pid_m).to(tl.int32), axis=0)  # G once past every group's tiles
    before = tl.sum(tl.where(gi == g, cum - tiles, 0), axis=0)
    start = tl.sum(tl.where(gi == g, starts, 0), axis=0)
    end = tl.sum(tl.where(gi == g, ends, 0), axis=0)
    tail = tl.sum(tl.where(gi == G - 1, ends, 0), axis=0)
    past = pid_m >= total
    row0 = tl.where(past, tail + (pid_m - total) * BLOCK_M, start + (pid_m - before) * BLOCK_M)
    return tl.where(past, G, g), row0, tl.where(past, M, end)


@triton.jit
def _grouped_kernel(
    a_ptr, w_ptr, as_ptr, ws_ptr, offs_ptr, out_ptr,
    M, N, K, G,
    stride_am, stride_ak, stride_wg, stride_wn, stride_wk,
    stride_as0, stride_as1, stride_wsg, stride_ws0, stride_ws1, stride_om, stride_on,
    A_GRAN: tl.constexpr, W_GRAN: tl.constexpr, PRECISE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g, row0, end = _group_of(pid_m, offs_ptr, M, G, BLOCK_M, BLOCK_G)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if g >= G:  # rows no group claims come out zero
        mask = (offs_m[:, None] >= 0) & (offs_m[:, None] < M) & (offs_n[None, :] < N)
        o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
        tl.store(o_ptrs, tl.zeros((BLOCK_M, BLOCK_N), tl.float32).to(out_ptr.dtype.element_ty),
                 mask=mask)
        return
    # rows past the group's end (or past x) wrap into it: loads stay in bounds, the store masks
    end = tl.minimum(end, M)
    offs_am = tl.minimum(offs_m, end - 1)
    offs_wn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + g.to(tl.int64) * stride_wg
    ws_base = ws_ptr + g * stride_wsg
    a_ptrs = a_ptr + offs_am[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_base + offs_wn[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    PROMOTE: tl.constexpr = (A_GRAN >= 2) or (W_GRAN >= 2)
    for k in range(0, K, BLOCK_K):
        a, b = _load_step(a_ptrs, w_ptrs, k, K, offs_k, EVEN_K)
        if PROMOTE:
            s_row, s_col = _step_scales(k, K, offs_am, offs_wn, pid_n, as_ptr, ws_base,
                                        stride_as0, stride_as1, stride_ws0, stride_ws1,
                                        A_GRAN, W_GRAN, BLOCK_M, BLOCK_N)
            acc = _promote(acc, tl.dot(a, b), s_row, s_col, W_GRAN, False, BLOCK_N)
        elif PRECISE:
            acc += tl.dot(a, b)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    acc = _tile_scales(acc, offs_am, offs_wn, as_ptr, ws_base, stride_as0, stride_ws0,
                       A_GRAN, W_GRAN)
    _epilogue(acc, offs_m, offs_n, end, N, out_ptr, out_ptr, out_ptr, 0, 0, stride_om,
              stride_on, False, 0, False)


def _check(xq, xs, x_gran, wq, ws, w_gran, offs, out_dtype) -> None:
    if xq.dtype not in FP8_FORMATS or xq.dtype != wq.dtype:
        raise ValueError(f"scaled_grouped_mm: x is {xq.dtype} and w {wq.dtype}; both must be "
                         "one FP8 format")
    check_grouped_operands(xq, wq, offs)
    if x_gran is Granularity.BLOCK or w_gran is Granularity.GROUP:
        raise ValueError(f"scaled_grouped_mm: {x_gran} activations with {w_gran} weights; "
                         "activations take tensor, row or 1x128 group scales, weights tensor, "
                         "row or 128x128 block scales")
    if (x_gran is Granularity.GROUP) != (w_gran is Granularity.BLOCK):
        raise ValueError("scaled_grouped_mm: 1x128 activation groups go with 128x128 weight "
                         f"blocks (got {x_gran} with {w_gran})")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"scaled_grouped_mm: out_dtype {out_dtype}; bf16, fp16 or fp32")


def _tile(rows_per_group: float, fast: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages).  H200, `benchmarks/grouped.py --tiles`: 64x128
    tiles of 4 warps for K steps that wait on the tensor cores (promoted or ``precise``),
    within 3% of the best of five tiles at every size; with ``fast`` accumulation 128x256
    tiles of 8 warps once groups fill them (1.13-1.37x the 128x128 tile), 64x128 while they
    are short (decode: many experts, a few rows each)."""
    if fast and rows_per_group > 64:
        return 128, 256, 8, 3
    return 64, 128, 4, 4


def scaled_grouped_mm(xq: torch.Tensor, xs: torch.Tensor, x_gran: Granularity, wq: torch.Tensor,
                      ws: torch.Tensor, w_gran: Granularity, offs: torch.Tensor,
                      out_dtype: torch.dtype, accumulation: str = "precise",
                      config: dict | None = None) -> torch.Tensor:
    """``y (S, N)``: rows ``offs[g-1]:offs[g]`` of ``xq·xs`` times ``(wq[g]·ws[g])ᵀ``, rows past
    ``offs[-1]`` zero.  Scales as :func:`fp8compile.numerics.quantize` (``xs``) and
    :func:`fp8compile.numerics.quantize_grouped_weight` (``ws``) lay them out.  ``offs`` is
    not read on the host: values that decrease or pass ``S`` make groups empty, clipped or
    overlapping (their rows then undefined), never an access out of bounds.  ``config``
    (benchmarks) sets the tile: ``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``."""
    x_gran, w_gran = Granularity(x_gran), Granularity(w_gran)
    _check(xq, xs, x_gran, wq, ws, w_gran, offs, out_dtype)
    m, k = xq.shape
    groups, n, _ = wq.shape
    out = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out
    if xq.stride(1) != 1:
        xq = xq.contiguous()
    if wq.stride(2) != 1:
        wq = wq.contiguous()
    if k == 0:
        return out.zero_()
    sa0, sa1 = _scale_strides(xs) if x_gran is not Granularity.TENSOR else (0, 0)
    wsg = ws.stride(0) if ws.dim() >= 1 and ws.shape[0] == groups else 0
    sw0, sw1 = _scale_strides(ws[0]) if w_gran is not Granularity.TENSOR else (0, 0)
    bm, bn, warps, stages = _tile(m / max(1, groups), accumulation == "fast")
    if config:
        bm, bn = config.get("BLOCK_M", bm), config.get("BLOCK_N", bn)
        warps, stages = config.get("num_warps", warps), config.get("num_stages", stages)
    bk = 128
    grid = (cdiv(m, bm) + groups + 1, cdiv(n, bn))
    _grouped_kernel[grid](
        xq, wq, xs, ws, offs, out, m, n, k, groups,
        xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1), wq.stride(2),
        sa0, sa1, wsg, sw0, sw1, out.stride(0), out.stride(1),
        A_GRAN=GRAN_CODE[x_gran], W_GRAN=GRAN_CODE[w_gran],
        PRECISE=accumulation != "fast", EVEN_K=k % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_G=triton.next_power_of_2(groups + 1),
        num_warps=warps, num_stages=stages,
    )
    return out
