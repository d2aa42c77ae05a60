"""Quantization fused into its producer: RMSNorm → FP8 and SiLU(gate)·up → FP8.

The activation is written once, in FP8, instead of in the model dtype and then again in FP8.
The fuse pass (``passes/fuse.py``) introduces these ops where every consumer of the
producer's output is the same quantization.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import numerics as nx
from ._common import (
    as_fmt,
    as_gran,
    check_fp8_input,
    check_producer_args,
    check_static_scale,
    empty_scale,
)
from ._inline import inline_on_gpu


def _check_gran(granularity: str, what: str) -> nx.Granularity:
    g = as_gran(granularity)
    if g is nx.Granularity.BLOCK:
        raise ValueError(
            f"{what}: granularity='block' is for weights; fused producers quantize activations "
            "('tensor', 'row' or 'group')"
        )
    return g


def _check_norm(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor]) -> None:
    check_fp8_input(x, "rmsnorm_quantize input")
    if residual is not None:
        check_fp8_input(residual, "rmsnorm_quantize residual")
    nx.check_norm_shapes(x, weight, residual)


@torch.library.custom_op("fp8compile::rmsnorm_quantize", mutates_args=())
def rmsnorm_quantize(
    x: Tensor, weight: Optional[Tensor], eps: float, granularity: str, fmt: str,
    power_of_2: bool, residual: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """FP8 ``(q, scale)`` of RMSNorm(x) over the last dim, the norm computed in fp32; with
    ``residual`` (x's shape), of RMSNorm(x + residual), the sum also in fp32 (a residual
    stream's add fused in)."""
    _check_norm(x, weight, residual)
    g = _check_gran(granularity, "rmsnorm_quantize")
    return nx.rmsnorm_quantize(x, weight, eps, g, as_fmt(fmt), power_of_2, residual)


@rmsnorm_quantize.register_fake
def _(x, weight, eps, granularity, fmt, power_of_2, residual=None):
    g = _check_gran(granularity, "rmsnorm_quantize")
    return x.new_empty(x.shape, dtype=as_fmt(fmt).dtype), empty_scale(x, g)


@rmsnorm_quantize.register_kernel("cuda")
def _rmsnorm_quantize_cuda(x, weight, eps, granularity, fmt, power_of_2, residual=None):
    from .. import kernels

    _check_norm(x, weight, residual)
    g, f = _check_gran(granularity, "rmsnorm_quantize"), as_fmt(fmt)
    if kernels.available(x):
        w = weight if weight is not None else x.new_ones(x.shape[-1])
        return kernels.rmsnorm_quantize(x, w, eps, g, f, power_of_2, residual)
    return nx.rmsnorm_quantize(x, weight, eps, g, f, power_of_2, residual)


def _check_swiglu(gate: Tensor, up: Tensor) -> None:
    check_fp8_input(gate, "silu_mul_quantize gate")
    check_fp8_input(up, "silu_mul_quantize up")
    if gate.shape != up.shape:
        raise ValueError(
            f"silu_mul_quantize: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have "
            "the same shape"
        )


@torch.library.custom_op("fp8compile::silu_mul_quantize", mutates_args=())
def silu_mul_quantize(
    gate: Tensor, up: Tensor, granularity: str, fmt: str, power_of_2: bool
) -> tuple[Tensor, Tensor]:
    """FP8 ``(q, scale)`` of ``silu(gate) * up``, computed in fp32."""
    _check_swiglu(gate, up)
    g = _check_gran(granularity, "silu_mul_quantize")
    return nx.silu_mul_quantize(gate, up, g, as_fmt(fmt), power_of_2)


@silu_mul_quantize.register_fake
def _(gate, up, granularity, fmt, power_of_2):
    g = _check_gran(granularity, "silu_mul_quantize")
    return gate.new_empty(gate.shape, dtype=as_fmt(fmt).dtype), empty_scale(gate, g)


@silu_mul_quantize.register_kernel("cuda")
def _silu_mul_quantize_cuda(gate, up, granularity, fmt, power_of_2):
    from .. import kernels

    _check_swiglu(gate, up)
    g, f = _check_gran(granularity, "silu_mul_quantize"), as_fmt(fmt)
    if kernels.available(gate):
        return kernels.silu_mul_quantize(gate, up, g, f, power_of_2)
    return nx.silu_mul_quantize(gate, up, g, f, power_of_2)


def _check_static(x, x2, norm_weight, producer, scale) -> None:
    check_producer_args(x, x2, norm_weight, producer, "quantize_static")
    check_static_scale(scale, "quantize_static: scale")


@torch.library.custom_op("fp8compile::quantize_static", mutates_args=())
def quantize_static(
    x: Tensor, x2: Optional[Tensor], norm_weight: Optional[Tensor], eps: float, producer: str,
    scale: Tensor, fmt: str,
) -> Tensor:
    """Static scaling's tensorwise cast of ``x`` or of its producer's output, with the given
    (calibrated) ``scale``: ``producer`` ``"none"``, ``"rmsnorm"`` (``norm_weight``,
    ``eps``), ``"add_rmsnorm"`` (of ``x + x2``) or ``"silu_mul"`` (``silu(x) * x2``), as
    :func:`fp8compile.numerics.produce` computes them.  The scale is known, so on the GPU
    this is one pass over the inputs: no amax to find first."""
    _check_static(x, x2, norm_weight, producer, scale)
    return _quantize_static_ref(x, x2, norm_weight, eps, producer, scale, as_fmt(fmt))


def _quantize_static_ref(x, x2, norm_weight, eps, producer, scale, fmt):
    y = nx.produce(x, x2, norm_weight, eps, producer)
    return nx.quantize_with_scale(y, scale.reshape(()), nx.Granularity.TENSOR, fmt)


@quantize_static.register_fake
def _(x, x2, norm_weight, eps, producer, scale, fmt):
    return x.new_empty(x.shape, dtype=as_fmt(fmt).dtype)


@quantize_static.register_kernel("cuda")
def _quantize_static_cuda(x, x2, norm_weight, eps, producer, scale, fmt):
    from .. import kernels

    _check_static(x, x2, norm_weight, producer, scale)
    if kernels.available(x) and x.numel() > 0 and x.dim() > 0:
        from ..kernels.fused import quantize_static as _kernel

        return _kernel(x, x2, norm_weight, eps, producer, scale, as_fmt(fmt))
    return _quantize_static_ref(x, x2, norm_weight, eps, producer, scale, as_fmt(fmt))


inline_on_gpu(rmsnorm_quantize, _rmsnorm_quantize_cuda)
inline_on_gpu(silu_mul_quantize, _silu_mul_quantize_cuda)
inline_on_gpu(quantize_static, _quantize_static_cuda)
