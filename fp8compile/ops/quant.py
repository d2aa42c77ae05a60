"""Quantization ops: dynamic, with a given scale, and delayed (amax history)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import numerics as nx
from ..numerics import Granularity
from ._common import as_fmt, as_gran, check_fp8_input, empty_scale, triton_available
from ._inline import inline_on_gpu

# --------------------------------------------------------------------------------------
# quantize


@torch.library.custom_op("fp8compile::quantize", mutates_args=())
def quantize(x: Tensor, granularity: str, fmt: str, power_of_2: bool) -> tuple[Tensor, Tensor]:
    check_fp8_input(x, "quantize input")
    return nx.quantize(x, as_gran(granularity), as_fmt(fmt), power_of_2)


@quantize.register_fake
def _(x, granularity, fmt, power_of_2):
    g = as_gran(granularity)
    q = x.new_empty(x.shape, dtype=as_fmt(fmt).dtype)
    return q, empty_scale(x, g)


@quantize.register_kernel("cuda")
def _(x, granularity, fmt, power_of_2):
    return quantize_impl(x, granularity, fmt, power_of_2)


def quantize_impl(x: Tensor, granularity: str, fmt: str, power_of_2: bool):
    """The op's body without the dispatcher, for other ops' bodies (they already run on real
    tensors): the Triton kernels where :func:`fp8compile.kernels.available`, else numerics."""
    check_fp8_input(x, "quantize input")
    g, f = as_gran(granularity), as_fmt(fmt)
    if triton_available(x):
        from ..kernels.quant import quantize

        return quantize(x, g, f, power_of_2)
    return nx.quantize(x, g, f, power_of_2)


inline_on_gpu(quantize, quantize_impl)


@torch.library.custom_op("fp8compile::quantize_dual", mutates_args=())
def quantize_dual(x: Tensor, fmt: str, power_of_2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(q, s, qt, st)``: 1x128-group quantization of a 2-D ``x`` and of ``x.t()``, from one
    read of ``x`` on the GPU (see :func:`fp8compile.numerics.quantize_dual`)."""
    _check_2d(x, "quantize_dual")
    return nx.quantize_dual(x, as_fmt(fmt), power_of_2)


def _check_2d(x: Tensor, op: str) -> None:
    check_fp8_input(x, f"{op} input")
    if x.dim() != 2:
        raise ValueError(
            f"{op} takes a 2-D tensor, got shape {tuple(x.shape)}; "
            "reshape it to (rows, columns) first"
        )


def _empty_pair(x: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """Fake ``(q, qt)`` of a 2-D ``x``: its FP8 copy and its transpose's."""
    dtype = as_fmt(fmt).dtype
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[1], x.shape[0]), dtype=dtype)


@quantize_dual.register_fake
def _(x, fmt, power_of_2):
    q, qt = _empty_pair(x, fmt)
    return q, empty_scale(q, Granularity.GROUP), qt, empty_scale(qt, Granularity.GROUP)


@quantize_dual.register_kernel("cuda")
def _quantize_dual_cuda(x, fmt, power_of_2):
    _check_2d(x, "quantize_dual")
    if triton_available(x):
        from ..kernels.quant import quantize_dual as _kernel

        return _kernel(x, as_fmt(fmt), power_of_2)
    return nx.quantize_dual(x, as_fmt(fmt), power_of_2)


inline_on_gpu(quantize_dual, _quantize_dual_cuda)


@torch.library.custom_op("fp8compile::quantize_tensor_t", mutates_args=())
def quantize_tensor_t(x: Tensor, fmt: str, power_of_2: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, q_t, scale)``: dynamic tensorwise quantization of a 2-D ``x`` (as
    ``quantize(x, "tensor", ...)``) and ``q_t``, ``q.t()`` in its own storage, the layout the
    backward's dW GEMM reads; on the GPU one read of ``x`` writes both (64x64 tiles)."""
    _check_2d(x, "quantize_tensor_t")
    q, scale = nx.quantize(x, Granularity.TENSOR, as_fmt(fmt), power_of_2)
    return q, _transposed(q), scale


def _transposed(q: Tensor) -> Tensor:
    """``q.t()`` in its own contiguous storage (``.contiguous()`` returns a view, aliasing
    ``q``, when a dim is 1, and an op's outputs may not alias each other)."""
    return q.t().clone(memory_format=torch.contiguous_format)


@quantize_tensor_t.register_fake
def _(x, fmt, power_of_2):
    return (*_empty_pair(x, fmt), empty_scale(x, Granularity.TENSOR))


@quantize_tensor_t.register_kernel("cuda")
def _quantize_tensor_t_cuda(x, fmt, power_of_2):
    _check_2d(x, "quantize_tensor_t")
    if triton_available(x) and x.numel() > 0:
        from ..kernels.quant import quantize_history_t as _kernel

        q, qt, scale, _ = _kernel(x, None, as_fmt(fmt), power_of_2)
        return q, qt, scale
    q, scale = nx.quantize(x, Granularity.TENSOR, as_fmt(fmt), power_of_2)
    return q, _transposed(q), scale


inline_on_gpu(quantize_tensor_t, _quantize_tensor_t_cuda)


@torch.library.custom_op("fp8compile::requantize_t", mutates_args=())
def requantize_t(
    q: Tensor, scale: Tensor, granularity: str, to: str, fmt: str, power_of_2: bool
) -> tuple[Tensor, Tensor]:
    """FP8 ``(q, scale)`` of ``(..., K)`` → FP8 of the transposed ``(K, M)`` view, scaled by
    ``to`` (see :func:`fp8compile.numerics.requantize_t`)."""
    _check_requantize(q)
    return nx.requantize_t(q, scale, as_gran(granularity), as_gran(to), as_fmt(fmt), power_of_2)


def _check_requantize(q: Tensor) -> None:
    if q.dtype not in nx.FP8_FORMATS or q.dim() < 1:
        raise ValueError(
            f"requantize_t takes an FP8 tensor of at least 1 dim, got {q.dtype} with shape "
            f"{tuple(q.shape)}; quantize it with torch.ops.fp8compile.quantize first"
        )


@requantize_t.register_fake
def _(q, scale, granularity, to, fmt, power_of_2):
    m = math.prod(q.shape[:-1])
    t = q.new_empty((q.shape[-1], m), dtype=as_fmt(fmt).dtype)
    return t, empty_scale(t, as_gran(to))


@requantize_t.register_kernel("cuda")
def _requantize_t_cuda(q, scale, granularity, to, fmt, power_of_2):
    _check_requantize(q)
    g, t, f = as_gran(granularity), as_gran(to), as_fmt(fmt)
    if triton_available(q):
        from ..kernels.quant import requantize_t as _kernel

        return _kernel(q, scale, g, t, f, power_of_2)
    return nx.requantize_t(q, scale, g, t, f, power_of_2)


inline_on_gpu(requantize_t, _requantize_t_cuda)


def quantize_with_scale_impl(x: Tensor, scale: Tensor, granularity: Granularity,
                             fmt: nx.Fp8Format) -> Tensor:
    """``numerics.quantize_with_scale`` for op bodies: one Triton launch for a tensorwise scale
    on the GPU (static and delayed scaling), the reference otherwise."""
    if granularity is Granularity.TENSOR and scale.numel() == 1 and triton_available(x):
        from ..kernels.quant import quantize_with_scale

        return quantize_with_scale(x, scale, fmt)
    return nx.quantize_with_scale(x, scale, granularity, fmt)


def amax_impl(x: Tensor, unless: Optional[Tensor] = None) -> Tensor:
    """``numerics.amax(x, TENSOR)`` as fp32 for op bodies: one Triton launch on the GPU.

    ``unless`` (an amax history): where it holds a non-zero value, the result is not needed
    (delayed scaling past its first step) and the GPU launch returns 0 without reading x;
    the reference path computes the amax anyway."""
    if triton_available(x):
        from ..kernels.quant import amax_tensor

        return amax_tensor(x, unless)
    return nx.amax(x, Granularity.TENSOR).float()


def delayed_amax(history: Tensor, current: Tensor) -> Tensor:
    """The amax a delayed scale comes from: the max over ``history``'s last dim, ``current``
    where that max is 0 (exact in any graph: no division)."""
    past = history.amax(dim=-1)
    return torch.where(past > 0, past, current)


def quantize_from_amax_impl(x: Tensor, amax: Tensor, fmt: nx.Fp8Format, power_of_2: bool
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, scale, amax(x))``: ``x`` quantized with the tensorwise scale of ``amax`` and its
    own finite amax; on the GPU one Triton pass that derives the scale and records the amax
    while it quantizes (delayed scaling)."""
    if triton_available(x):
        from ..kernels.quant import quantize_from_amax

        return quantize_from_amax(x, amax, fmt, power_of_2)
    scale = nx.compute_scale(amax.reshape(()), fmt, power_of_2)
    return (nx.quantize_with_scale(x, scale, Granularity.TENSOR, fmt), scale,
            nx.amax(x, Granularity.TENSOR).float())


@torch.library.custom_op("fp8compile::quantize_scaled", mutates_args=())
def quantize_scaled(x: Tensor, scale: Tensor, granularity: str, fmt: str) -> Tensor:
    """``x`` in FP8 with the given ``scale`` (static and delayed scaling; the tensorwise
    backward's ``Wᵀ`` with the forward's weight scale): one Triton launch for a tensorwise
    scale on the GPU."""
    return _quantize_scaled_body(x, scale, granularity, fmt)


@quantize_scaled.register_fake
def _(x, scale, granularity, fmt):
    return x.new_empty(x.shape, dtype=as_fmt(fmt).dtype)


def _quantize_scaled_body(x, scale, granularity, fmt):
    check_fp8_input(x, "quantize_scaled input")
    return quantize_with_scale_impl(x, scale, as_gran(granularity), as_fmt(fmt))


inline_on_gpu(quantize_scaled, _quantize_scaled_body)


@torch.library.custom_op("fp8compile::quantize_from_amax", mutates_args=())
def quantize_from_amax(x: Tensor, amax: Tensor, fmt: str, power_of_2: bool
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, scale, amax(x))`` from one read of ``x``: tensorwise quantization with the scale
    of ``amax`` (delayed scaling: the history's max), and this call's amax for the history.
    The scale is derived inside the op, so compiled graphs get eager mode's IEEE quotient
    (Inductor divides approximately)."""
    return _quantize_from_amax_body(x, amax, fmt, power_of_2)


@quantize_from_amax.register_fake
def _(x, amax, fmt, power_of_2):
    return (x.new_empty(x.shape, dtype=as_fmt(fmt).dtype),
            x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=torch.float32))


def _quantize_from_amax_body(x, amax, fmt, power_of_2):
    check_fp8_input(x, "quantize_from_amax input")
    if amax.numel() != 1:
        raise ValueError(
            f"quantize_from_amax: amax has {amax.numel()} elements; it takes the one amax of a "
            "tensorwise scale (use quantize_scaled for other granularities)"
        )
    return quantize_from_amax_impl(x, amax, as_fmt(fmt), power_of_2)


inline_on_gpu(quantize_from_amax, _quantize_from_amax_body)


@torch.library.custom_op("fp8compile::amax_unless", mutates_args=())
def amax_unless(x: Tensor, history: Tensor) -> Tensor:
    """``amax(x)`` (finite, 0-dim fp32) for delayed scaling's first step: where ``history``
    already holds a non-zero value the result is not used, and on the GPU the kernel then
    returns 0 without reading ``x`` (decided on the device, no host sync)."""
    return _amax_unless_body(x, history)


@amax_unless.register_fake
def _(x, history):
    return x.new_empty((), dtype=torch.float32)


def _amax_unless_body(x, history):
    check_fp8_input(x, "amax_unless input")
    return amax_impl(x, unless=history)


inline_on_gpu(amax_unless, _amax_unless_body)


@torch.library.custom_op("fp8compile::quantize_delayed", mutates_args=("amax_history",))
def quantize_delayed(
    x: Tensor, amax_history: Tensor, fmt: str, power_of_2: bool
) -> tuple[Tensor, Tensor]:
    """Tensorwise quantization with the scale of the largest amax seen in the last N calls.

    The history (fp32, length N, newest first) is updated in place with this call's amax;
    the scale uses the history *before* this call (TransformerEngine's DelayedScaling), except
    on the first call, when the history is still all zero and this call's amax is used.
    """
    return _quantize_delayed_body(x, amax_history, fmt, power_of_2)


def _quantize_delayed_body(x, amax_history, fmt, power_of_2):
    check_fp8_input(x, "quantize_delayed input")
    as_fmt(fmt)
    if amax_history.dim() != 1:
        raise ValueError(
            f"quantize_delayed: amax_history must be 1-D (newest first), got shape "
            f"{tuple(amax_history.shape)}"
        )
    # The cast with the history's scale records this call's amax from the same read of x
    # (fp8compile::quantize_history: on the GPU two launches, the first of which returns
    # at once once the history holds a value); then the history takes it, newest first.
    q, scale, cur = torch.ops.fp8compile.quantize_history(x, None, None, 0.0, "none",
                                                          amax_history, fmt, power_of_2)
    amax_history.copy_(torch.cat([cur.to(amax_history.dtype).reshape(1), amax_history[:-1]]))
    return q, scale


@quantize_delayed.register_fake
def _(x, amax_history, fmt, power_of_2):
    return x.new_empty(x.shape, dtype=as_fmt(fmt).dtype), x.new_empty((), dtype=torch.float32)


# In compiled graphs: the cast's two launches and the history update as graph code (one
# small fused kernel), not an opaque call; the history's mutation is kept (see push_amax).
inline_on_gpu(quantize_delayed, _quantize_delayed_body, pin_strides=False)


