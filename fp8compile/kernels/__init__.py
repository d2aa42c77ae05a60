"""Triton kernels behind the fp8compile ops (CUDA).

``available(t)`` says whether the Triton path serves tensors like ``t``; the ops in
:mod:`fp8compile.ops` fall back to the reference in :mod:`fp8compile.numerics` otherwise.
"""

from __future__ import annotations

import torch

__all__ = ["available", "quantize", "scaled_mm"]


def available(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a device the Triton kernels run on."""
    return False


def quantize(x, granularity, fmt, power_of_2):
    raise NotImplementedError("Triton quantization kernels are not built yet")


def scaled_mm(xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, accumulation,
              activation, residual):
    raise NotImplementedError("Triton FP8 GEMM kernels are not built yet")
