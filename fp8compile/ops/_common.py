"""Shared helpers of the op files: argument parsing, checks, scale shapes."""


from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import numerics as nx
from ..numerics import Fp8Format, Granularity

__all__ = [
    "ACTIVATIONS", "FLOAT_DTYPES", "as_fmt", "as_gran", "check_fp8_input",
    "check_producer_args", "check_static_scale", "device_of", "empty_scale", "scale_shape",
]

ACTIVATIONS = ("none", "gelu", "silu", "relu", "swiglu")
"""GEMM epilogue activations; ``swiglu`` reads a weight of gate rows then up rows
(``torch.cat([gate, up])``) and outputs ``silu(gate) * up``, N/2 wide."""
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes FP8 quantization takes as input (and the high-precision GEMM dtypes)."""


def as_gran(value: str) -> Granularity:
    try:
        return Granularity(value)
    except ValueError:
        raise ValueError(
            f"granularity={value!r} is not one of {[g.value for g in Granularity]}"
        ) from None


def as_fmt(value: str) -> Fp8Format:
    try:
        return Fp8Format(value)
    except ValueError:
        raise ValueError(f"format={value!r} is not one of {[f.value for f in Fp8Format]}") from None


def check_fp8_input(x: Tensor, what: str) -> None:
    """Raise a ValueError naming ``what`` unless ``x`` is a bf16/fp16/fp32 tensor."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{what} has dtype {x.dtype}; FP8 quantization takes float32, bfloat16 or float16 "
            f"(cast it with .float() first)"
        )


def check_producer_args(x: Tensor, x2: Tensor | None, norm_weight: Tensor | None,
                        producer: str, what: str) -> None:
    """The inputs of a quantization fused into its producer (:func:`numerics.produce`)."""
    check_fp8_input(x, f"{what} input")
    if producer not in nx.PRODUCERS:
        raise ValueError(f"{what}: producer {producer!r} is not one of {nx.PRODUCERS}")
    if producer in ("silu_mul", "add_rmsnorm") and (x2 is None or x2.shape != x.shape):
        raise ValueError(
            f"{what}: {producer} needs x2 (up, or the residual) with x's shape "
            f"{tuple(x.shape)}, got {None if x2 is None else tuple(x2.shape)}"
        )
    if producer in ("rmsnorm", "add_rmsnorm") and norm_weight is not None and \
            tuple(norm_weight.shape) != (x.shape[-1],):
        raise ValueError(
            f"{what}: norm_weight {tuple(norm_weight.shape)} must be ({x.shape[-1]},), the "
            "last dim of x"
        )


def check_static_scale(scale: Tensor, what: str) -> None:
    """A given tensorwise scale (static scaling): one fp32 element."""
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(
            f"{what} must be one fp32 element (a tensorwise static scale), got "
            f"{scale.numel()} element(s) of {scale.dtype}; calibrated scales come from "
            "numerics.compute_scale(amax)"
        )


def scale_shape(shape: tuple[int, ...], granularity: Granularity, block: int = nx.BLOCK):
    """Logical shape of the scale tensor for data of ``shape`` (see numerics)."""
    if granularity is Granularity.TENSOR:
        return ()
    k = shape[-1]
    rows = math.prod(shape[:-1])
    if granularity is Granularity.ROW:
        return (rows, 1)
    if granularity is Granularity.GROUP:
        return (rows, (k + block - 1) // block)
    return ((shape[0] + block - 1) // block, (k + block - 1) // block)


def empty_scale(x: Tensor, granularity: Granularity) -> Tensor:
    shape = scale_shape(tuple(x.shape), granularity)
    if granularity is Granularity.GROUP:
        return x.new_empty_strided(shape, (1, shape[0]), dtype=torch.float32)
    return x.new_empty(shape, dtype=torch.float32)


def triton_available(t: Tensor) -> bool:
    """:func:`fp8compile.kernels.available` for op bodies, imported lazily (the kernels import
    the ops); a CPU tensor returns at once, without the import."""
    if not t.is_cuda:
        return False
    from .. import kernels

    return kernels.available(t)


def device_of(args) -> torch.device:
    """Device of the first tensor in ``args`` (CPU if none): where a graph-input provider puts
    the state it feeds to the compiled graph."""
    return next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))
