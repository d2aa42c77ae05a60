"""Row-major copies of strided 2-D tensors, FP8 transposes above all.

The FP8 tensor cores (and cuBLAS's FP8 GEMMs) take both operands K-major, so the backward
GEMMs need ``dy_q.t()`` and ``x_q.t()`` laid out row-major.  ATen's generic strided copy
moves one byte per thread for FP8 and ran at ~0.3 TB/s on an H100 for a 14336x4096
transpose; this kernel reads tiles along the source's contiguous dimension and writes along
the destination's (Triton converts the layout in shared memory between the two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._inline import launch
from .tuning import cdiv

__all__ = ["contiguous_2d"]


@triton.jit
def _copy_2d_kernel(src_ptr, dst_ptr, R, C, stride_sr, stride_sc, stride_dr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    rows = rows.to(tl.int64)
    cols = cols.to(tl.int64)
    v = tl.load(src_ptr + rows[:, None] * stride_sr + cols[None, :] * stride_sc, mask=mask)
    tl.store(dst_ptr + rows[:, None] * stride_dr + cols[None, :], v, mask=mask)


def contiguous_2d(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()`` for a 2-D tensor, through one tiled Triton copy when ``t`` is not
    already row-major (any strides; 1-byte and 2-byte dtypes are copied as raw bits)."""
    if t.dim() != 2:
        raise ValueError(f"contiguous_2d takes a 2-D tensor, got shape {tuple(t.shape)}")
    if t.is_contiguous():
        return t
    r, c = t.shape
    out = torch.empty((r, c), dtype=t.dtype, device=t.device)
    if t.numel() == 0:
        return out
    raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32}.get(t.element_size())
    if raw is None:
        return t.contiguous()
    src, dst = t.view(raw), out.view(raw)
    block = 64
    grid = (cdiv(r, block), cdiv(c, block))
    launch(_copy_2d_kernel)[grid](src, dst, r, c, src.stride(0), src.stride(1), dst.stride(0),
                                  BLOCK_R=block, BLOCK_C=block, num_warps=4)
    return out
