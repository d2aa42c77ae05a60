"""``torch.library`` custom ops that the rewritten graph calls.

Each op has a fake (meta) implementation for tracing, a reference implementation built on
:mod:`fp8compile.numerics` (CPU, and any device without a kernel), and a CUDA implementation
that dispatches to the Triton kernels in :mod:`fp8compile.kernels` when they support the case.

========================================  ==================================================
op                                         meaning
========================================  ==================================================
``fp8compile::quantize``                   dynamic quantization ``x -> (q, scale)``
``fp8compile::quantize_scaled``            quantization with a given scale (static scaling)
``fp8compile::quantize_delayed``           tensorwise, scale from an amax history it updates
``fp8compile::scaled_mm``                  ``dequant(xq) @ dequant(wq).T`` (+bias, act, residual)
``fp8compile::linear``                     ``x @ w.T + b`` quantizing both sides, with autograd
                                           (training: FP8 forward and both backward GEMMs)
``fp8compile::matmul``                     ``a @ b`` of two activations, both quantized
========================================  ==================================================

Granularities and formats travel as strings (``"group"``, ``"e4m3"``...) because op schemas
take no Python enums; they become enums on entry.

Example::

    >>> import torch, fp8compile.ops  # registers the ops
    >>> x, w = torch.randn(8, 256), torch.randn(128, 256)
    >>> xq, xs = torch.ops.fp8compile.quantize(x, "group", "e4m3", False)
    >>> wq, ws = torch.ops.fp8compile.quantize(w, "block", "e4m3", False)
    >>> y = torch.ops.fp8compile.scaled_mm(xq, xs, "group", wq, ws, "block", None,
    ...                                    torch.float32, "precise", "none", None)
    >>> y.shape
    torch.Size([8, 128])
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import numerics as nx
from .numerics import Fp8Format, Granularity

__all__ = ["ACTIVATIONS", "check_fp8_input", "scale_shape"]

ACTIVATIONS = ("none", "gelu", "silu", "relu")
_HIGH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gran(value: str) -> Granularity:
    try:
        return Granularity(value)
    except ValueError:
        raise ValueError(
            f"granularity={value!r} is not one of {[g.value for g in Granularity]}"
        ) from None


def _fmt(value: str) -> Fp8Format:
    try:
        return Fp8Format(value)
    except ValueError:
        raise ValueError(f"format={value!r} is not one of {[f.value for f in Fp8Format]}") from None


def check_fp8_input(x: Tensor, what: str) -> None:
    """Raise a ValueError naming ``what`` unless ``x`` is a bf16/fp16/fp32 tensor."""
    if x.dtype not in _HIGH_DTYPES:
        raise ValueError(
            f"{what} has dtype {x.dtype}; FP8 quantization takes float32, bfloat16 or float16 "
            f"(cast it with .float() first)"
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


def _empty_scale(x: Tensor, granularity: Granularity) -> Tensor:
    shape = scale_shape(tuple(x.shape), granularity)
    if granularity is Granularity.GROUP:
        return x.new_empty_strided(shape, (1, shape[0]), dtype=torch.float32)
    return x.new_empty(shape, dtype=torch.float32)


# --------------------------------------------------------------------------------------
# quantize


@torch.library.custom_op("fp8compile::quantize", mutates_args=())
def quantize(x: Tensor, granularity: str, fmt: str, power_of_2: bool) -> tuple[Tensor, Tensor]:
    check_fp8_input(x, "quantize input")
    return nx.quantize(x, _gran(granularity), _fmt(fmt), power_of_2)


@quantize.register_fake
def _(x, granularity, fmt, power_of_2):
    g = _gran(granularity)
    q = x.new_empty(x.shape, dtype=_fmt(fmt).dtype)
    return q, _empty_scale(x, g)


@quantize.register_kernel("cuda")
def _(x, granularity, fmt, power_of_2):
    check_fp8_input(x, "quantize input")
    from . import kernels

    g, f = _gran(granularity), _fmt(fmt)
    if kernels.available(x):
        return kernels.quantize(x, g, f, power_of_2)
    return nx.quantize(x, g, f, power_of_2)


@torch.library.custom_op("fp8compile::quantize_scaled", mutates_args=())
def quantize_scaled(x: Tensor, scale: Tensor, granularity: str, fmt: str) -> Tensor:
    check_fp8_input(x, "quantize_scaled input")
    return nx.quantize_with_scale(x, scale, _gran(granularity), _fmt(fmt))


@quantize_scaled.register_fake
def _(x, scale, granularity, fmt):
    return x.new_empty(x.shape, dtype=_fmt(fmt).dtype)


@torch.library.custom_op("fp8compile::quantize_delayed", mutates_args=("amax_history",))
def quantize_delayed(
    x: Tensor, amax_history: Tensor, fmt: str, power_of_2: bool
) -> tuple[Tensor, Tensor]:
    """Tensorwise quantization with the scale of the largest amax seen in the last N calls.

    The history (fp32, length N, newest first) is updated in place with this call's amax;
    the scale uses the history *before* this call (TransformerEngine's DelayedScaling), except
    on the first call, when the history is still all zero and this call's amax is used.
    """
    check_fp8_input(x, "quantize_delayed input")
    f = _fmt(fmt)
    cur = nx.amax(x, Granularity.TENSOR).to(amax_history.dtype)
    past = amax_history.max()
    use = torch.where(past > 0, past, cur)
    scale = nx.compute_scale(use, f, power_of_2)
    q = nx.quantize_with_scale(x, scale, Granularity.TENSOR, f)
    amax_history.copy_(torch.cat([cur.reshape(1), amax_history[:-1]]))
    return q, scale


@quantize_delayed.register_fake
def _(x, amax_history, fmt, power_of_2):
    return x.new_empty(x.shape, dtype=_fmt(fmt).dtype), x.new_empty((), dtype=torch.float32)


# --------------------------------------------------------------------------------------
# GEMM


def _check_mm(xq: Tensor, wq: Tensor, bias: Optional[Tensor], activation: str) -> None:
    if xq.dtype not in nx.FP8_FORMATS or wq.dtype not in nx.FP8_FORMATS:
        raise ValueError(
            f"scaled_mm takes FP8 operands, got {xq.dtype} and {wq.dtype}; "
            "quantize them with torch.ops.fp8compile.quantize first"
        )
    if wq.dim() != 2 or xq.shape[-1] != wq.shape[1]:
        raise ValueError(
            f"scaled_mm: x has K={xq.shape[-1]} but w has shape {tuple(wq.shape)}; "
            "w must be (N, K) like nn.Linear.weight"
        )
    if bias is not None and tuple(bias.shape) != (wq.shape[0],):
        raise ValueError(f"scaled_mm: bias shape {tuple(bias.shape)} must be ({wq.shape[0]},)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"scaled_mm: activation={activation!r} is not one of {ACTIVATIONS}")


def _epilogue(y: Tensor, activation: str, residual: Optional[Tensor]) -> Tensor:
    if activation == "gelu":
        y = torch.nn.functional.gelu(y)
    elif activation == "silu":
        y = torch.nn.functional.silu(y)
    elif activation == "relu":
        y = torch.relu(y)
    if residual is not None:
        y = y + residual.float()
    return y


def scaled_mm_reference(
    xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, activation, residual
) -> Tensor:
    y = nx.fp8_linear_reference(
        xq, xs, _gran(x_granularity), wq, ws, _gran(w_granularity), bias, torch.float32
    )
    return _epilogue(y, activation, residual).to(out_dtype)


@torch.library.custom_op("fp8compile::scaled_mm", mutates_args=())
def scaled_mm(
    xq: Tensor,
    xs: Tensor,
    x_granularity: str,
    wq: Tensor,
    ws: Tensor,
    w_granularity: str,
    bias: Optional[Tensor],
    out_dtype: torch.dtype,
    accumulation: str,
    activation: str,
    residual: Optional[Tensor],
) -> Tensor:
    """``act(dequant(xq) @ dequant(wq).T + bias) + residual`` in ``out_dtype``.

    ``xq`` is ``(..., K)``, ``wq`` is ``(N, K)``; ``accumulation`` is ``precise`` or ``fast``
    (the reference is always exact fp32; kernels honour the choice).
    """
    _check_mm(xq, wq, bias, activation)
    return scaled_mm_reference(
        xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, activation, residual
    )


@scaled_mm.register_fake
def _(xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, accumulation, activation,
      residual):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


@scaled_mm.register_kernel("cuda")
def _(xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, accumulation, activation,
      residual):
    _check_mm(xq, wq, bias, activation)
    from . import kernels

    if kernels.available(xq):
        return kernels.scaled_mm(
            xq, xs, _gran(x_granularity), wq, ws, _gran(w_granularity), bias, out_dtype,
            accumulation, activation, residual,
        )
    return scaled_mm_reference(
        xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, activation, residual
    )


# --------------------------------------------------------------------------------------
# linear with autograd (training)

_X_GRAN = {"blockwise": "group", "rowwise": "row", "tensorwise": "tensor"}
_W_GRAN = {"blockwise": "block", "rowwise": "row", "tensorwise": "tensor"}


def _recipe_grans(recipe: str) -> tuple[str, str]:
    if recipe not in _X_GRAN:
        raise ValueError(f"recipe={recipe!r} is not one of {sorted(_X_GRAN)}")
    return _X_GRAN[recipe], _W_GRAN[recipe]


def fp8_mm(
    a: Tensor, b_t: Tensor, recipe: str, a_fmt: str, b_fmt: str, accumulation: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """``a @ b_t.T`` with both operands quantized along their last dim by ``recipe``.

    ``a`` plays the activation (1x128 / row / tensor scales), ``b_t`` the weight
    (128x128 / row / tensor).  Used for the forward and both backward GEMMs.
    """
    xg, wg = _recipe_grans(recipe)
    aq, as_ = torch.ops.fp8compile.quantize(a, xg, a_fmt, False)
    bq, bs = torch.ops.fp8compile.quantize(b_t.contiguous(), wg, b_fmt, False)
    return torch.ops.fp8compile.scaled_mm(
        aq, as_, xg, bq, bs, wg, None, out_dtype, accumulation, "none", None
    )


@torch.library.custom_op("fp8compile::linear", mutates_args=())
def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    recipe: str,
    act_fmt: str,
    weight_fmt: str,
    grad_fmt: str,
    power_of_2: bool,
    accumulation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(x @ weight.T + bias, xq, xs)``: FP8 linear whose quantized input is kept for backward.

    The second and third outputs are the FP8 activation and its scales, saved for the weight
    gradient instead of the high-precision ``x`` (half or a quarter of its memory).
    """
    check_fp8_input(x, "linear input")
    check_fp8_input(weight, "linear weight")
    xg, wg = _recipe_grans(recipe)
    xq, xs = torch.ops.fp8compile.quantize(x, xg, act_fmt, power_of_2)
    wq, ws = torch.ops.fp8compile.quantize(weight, wg, weight_fmt, power_of_2)
    y = torch.ops.fp8compile.scaled_mm(
        xq, xs, xg, wq, ws, wg, bias, x.dtype, accumulation, "none", None
    )
    return y, xq, xs


@linear.register_fake
def _(x, weight, bias, recipe, act_fmt, weight_fmt, grad_fmt, power_of_2, accumulation):
    xg, _ = _recipe_grans(recipe)
    g = _gran(xg)
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, x.new_empty(x.shape, dtype=_fmt(act_fmt).dtype), _empty_scale(x, g)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, recipe, act_fmt, weight_fmt, grad_fmt, power_of_2, accumulation = inputs
    _, xq, xs = output
    ctx.save_for_backward(xq, xs, weight)
    ctx.meta = (recipe, act_fmt, weight_fmt, grad_fmt, accumulation, x.dtype, bias is not None)
    ctx.mark_non_differentiable(xq, xs)


def _linear_backward(ctx, grad_y, _grad_xq, _grad_xs):
    xq, xs, weight = ctx.saved_tensors
    recipe, act_fmt, weight_fmt, grad_fmt, accumulation, x_dtype, has_bias = ctx.meta
    xg, _ = _recipe_grans(recipe)
    n, k = weight.shape
    dy = grad_y.reshape(-1, n)
    # dX = dY @ W: dY quantized along N (its rows), W seen as (K, N) "weight".
    dx = fp8_mm(dy, weight.t(), recipe, grad_fmt, weight_fmt, accumulation, x_dtype)
    dx = dx.reshape(*grad_y.shape[:-1], k)
    # dW = dYᵀ @ X: both quantized along M.  X comes back from its saved FP8 copy.
    x = nx.dequantize(xq, xs, _gran(xg)).reshape(-1, k)
    dw = fp8_mm(dy.t(), x.t(), recipe, grad_fmt, act_fmt, accumulation, torch.float32)
    db = dy.float().sum(0).to(weight.dtype) if has_bias else None
    return dx, dw.to(weight.dtype), db, None, None, None, None, None, None


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# --------------------------------------------------------------------------------------
# activation x activation matmul


@torch.library.custom_op("fp8compile::matmul", mutates_args=())
def matmul(a: Tensor, b: Tensor, recipe: str, fmt: str, accumulation: str) -> Tensor:
    """``a @ b`` for batched activations ``a (..., M, K)``, ``b (..., K, N)``, both FP8.

    Each batch entry is one FP8 GEMM with ``a`` scaled like an activation and ``bᵀ`` like a
    weight of the recipe.
    """
    check_fp8_input(a, "matmul lhs")
    check_fp8_input(b, "matmul rhs")
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"matmul shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain; "
            "fp8compile.matmul needs (..., M, K) @ (..., K, N)"
        )
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = [fp8_mm(ai, bi.t(), recipe, fmt, fmt, accumulation, a.dtype) for ai, bi in zip(a3, b3)]
    if not out:
        return a.new_empty((*batch, a.shape[-2], b.shape[-1]))
    return torch.stack(out).reshape(*batch, a.shape[-2], b.shape[-1])


@matmul.register_fake
def _(a, b, recipe, fmt, accumulation):
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


def _matmul_setup(ctx, inputs, output):
    a, b, recipe, fmt, accumulation = inputs
    ctx.save_for_backward(a, b)
    ctx.meta = (recipe, fmt, accumulation)


def _matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    recipe, fmt, accumulation = ctx.meta
    mm = torch.ops.fp8compile.matmul
    da = mm(grad, b.transpose(-1, -2), recipe, fmt, accumulation)
    db = mm(a.transpose(-1, -2), grad, recipe, fmt, accumulation)
    return _sum_to(da, a.shape), _sum_to(db, b.shape), None, None, None


def _sum_to(g: Tensor, shape) -> Tensor:
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g


matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup)
