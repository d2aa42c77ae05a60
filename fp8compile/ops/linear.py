"""Training ops: the FP8 linear with FP8 backward GEMMs, and activation x activation matmul."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import numerics as nx
from ._common import as_fmt, as_gran, check_fp8_input, empty_scale

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
    g = as_gran(xg)
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, x.new_empty(x.shape, dtype=as_fmt(act_fmt).dtype), empty_scale(x, g)


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
    x = nx.dequantize(xq, xs, as_gran(xg)).reshape(-1, k)
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
