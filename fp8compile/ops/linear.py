"""Training ops: the FP8 linear with FP8 backward GEMMs, and activation x activation matmul.

``fp8compile::linear`` (dynamic scales, every recipe).  Three FP8 GEMMs per step, each with
fp32 accumulation; ``a`` is quantized like an activation (1x128 / row / tensor along its last
dim), ``b`` like a weight (128x128 / row / tensor)::

    forward   y  = x  @ Wᵀ      a = x  (M, K)     b = W  (N, K)       saved: xq, xs (FP8)
    backward  dX = dY @ W       a = dY (M, N)     b = Wᵀ (K, N)       dY in gradient_format
              dW = dYᵀ @ X      a = dYᵀ (N, M)    b = Xᵀ (K, M)       X from its FP8 copy

so in the blockwise recipe the output gradient is scaled per 1x128 group along N for dX and
along M for dW (DeepSeek-V3 §3.3), and the weight per 128x128 block in both directions.  In the
tensorwise recipe one scale serves a tensor and its transpose, so dY is quantized once, the
saved ``xq`` is reused as is (no second rounding of X), and ``Wᵀ`` is quantized with the
forward's weight scale (one pass over W instead of an amax pass and a quantization pass).
The forward GEMM accumulates as ``accumulation`` says, the two backward GEMMs as
``grad_accumulation``.  In the blockwise recipe
``fp8compile::requantize_t`` turns the saved 1x128-group ``xq`` into 128x128 blocks of ``Xᵀ``
in one pass, in fp32 (the rowwise recipe dequantizes X and quantizes its transposed view).

The activation saved for backward is the FP8 ``xq`` (1 byte/element plus one fp32 scale per
128 elements in blockwise) instead of ``x`` (2 bytes in bf16, 4 in fp32).  The weight is saved
as the parameter itself (no copy) and requantized in backward.

``fp8compile::linear_w`` takes both FP8 copies of the weight (``W`` for the forward, ``Wᵀ``
for dX, from :func:`weight_quants`) as inputs instead: a cache keeps them across the calls
that see one parameter version (the micro-batches of gradient accumulation).

Delayed scaling in training lives in :mod:`fp8compile.ops.training_state`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import numerics as nx
from ._common import as_fmt, as_gran, check_fp8_input, empty_scale
from ._inline import inline_on_gpu
from .gemm import scaled_mm_impl
from .quant import quantize_impl

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
    out_dtype: torch.dtype, power_of_2: bool = False,
) -> Tensor:
    """``a @ b_t.T`` with both operands quantized along their last dim by ``recipe``.

    ``a`` plays the activation (1x128 / row / tensor scales), ``b_t`` the weight
    (128x128 / row / tensor).  Used for the forward and both backward GEMMs.
    """
    xg, wg = _recipe_grans(recipe)
    # Transposed views go in as they are: the quantization kernels read any 2-D strides and
    # write K-major FP8, which saves a bf16 transpose copy per operand.
    aq, as_ = torch.ops.fp8compile.quantize(a, xg, a_fmt, power_of_2)
    bq, bs = torch.ops.fp8compile.quantize(b_t, wg, b_fmt, power_of_2)
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
    grad_accumulation: str = "precise",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x @ weight.T + bias, xq, xs, ws)``: FP8 linear whose quantized input is kept for
    backward.

    ``xq, xs`` are the FP8 activation and its scales, saved for the weight gradient instead of
    the high-precision ``x`` (half or a quarter of its memory); ``ws`` is the weight's scale
    (the tensorwise backward quantizes ``Wᵀ`` with it).  The output has ``x``'s dtype; the
    gradients have the dtypes of ``x``, ``weight`` and ``bias`` (FP32 master weights get FP32
    gradients).  ``accumulation`` is the forward GEMM's, ``grad_accumulation`` the backward
    GEMMs'.

    Example::

        >>> x = torch.randn(4, 256, requires_grad=True)
        >>> w = torch.randn(128, 256, requires_grad=True)
        >>> y, xq, xs, ws = torch.ops.fp8compile.linear(x, w, None, "blockwise", "e4m3", "e4m3",
        ...                                             "e5m2", False, "precise")
        >>> y.sum().backward()
        >>> w.grad.shape, xq.dtype
        (torch.Size([128, 256]), torch.float8_e4m3fn)
    """
    _check_linear(x, weight, bias)
    xg, wg = _recipe_grans(recipe)
    # The op body runs on real tensors: the implementations are called directly, which
    # saves three dispatcher round trips per call (this op is CPU-bound at small sizes).
    xq, xs = quantize_impl(x, xg, act_fmt, power_of_2)
    wq, ws = quantize_impl(weight, wg, weight_fmt, power_of_2)
    y = scaled_mm_impl(xq, xs, xg, wq, ws, wg, bias, x.dtype, accumulation, "none", None)
    return y, xq, xs, ws


def _check_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    check_fp8_input(x, "linear input")
    check_fp8_input(weight, "linear weight")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input has K={x.shape[-1] if x.dim() else None} but weight has shape "
            f"{tuple(weight.shape)}; weight must be (N, K) like nn.Linear.weight"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear: bias shape {tuple(bias.shape)} must be ({weight.shape[0]},)")


def _fake_weight_scale(weight: Tensor, recipe: str) -> Tensor:
    return empty_scale(weight, as_gran(_recipe_grans(recipe)[1]))


@linear.register_fake
def _(x, weight, bias, recipe, act_fmt, weight_fmt, grad_fmt, power_of_2, accumulation,
      grad_accumulation="precise"):
    xg, _ = _recipe_grans(recipe)
    g = as_gran(xg)
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    xq = x.new_empty(x.shape, dtype=as_fmt(act_fmt).dtype)
    return y, xq, empty_scale(x, g), _fake_weight_scale(weight, recipe)


def _keep_for_backward(ctx, x, xq, xs, weight, ws, bias, options, grad_index,
                       w_t=(None, None)) -> None:
    """What the linear ops save: the FP8 input, the weight (the parameter itself), the
    tensorwise weight scale (``None`` for the other recipes: their ``Wᵀ`` scales differ from
    ``W``'s), ``Wᵀ``'s FP8 copy and scales where the op was given them (``linear_w``), the
    recipe ``options`` (recipe, formats, power_of_2, accumulations) and the dtypes of the
    gradients; ``grad_index`` is where x, weight and bias sit among the op's inputs."""
    ctx.save_for_backward(xq, xs, weight, ws if options[0] == "tensorwise" else None, *w_t)
    ctx.meta = (*options, x.dtype, bias.dtype if bias is not None else None)
    ctx.grad_index = grad_index


def _linear_setup(ctx, inputs, output):
    x, weight, bias, *options = inputs
    _, xq, xs, ws = output
    _keep_for_backward(ctx, x, xq, xs, weight, ws, bias, options, (0, 1, 2))
    ctx.mark_non_differentiable(xq, xs, ws)


@torch.library.custom_op("fp8compile::linear_q", mutates_args=())
def linear_q(
    x: Tensor,
    xq: Tensor,
    xs: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    recipe: str,
    act_fmt: str,
    weight_fmt: str,
    grad_fmt: str,
    power_of_2: bool,
    accumulation: str,
    grad_accumulation: str = "precise",
) -> tuple[Tensor, Tensor]:
    """``(y, ws)`` of ``fp8compile::linear`` for an input quantized elsewhere: ``(xq, xs)`` is
    ``quantize(x)`` with the recipe's activation granularity, shared by every linear that
    reads ``x`` (q/k/v, gate/up), so it is computed and saved for backward once.  ``x``
    carries the gradient (``dX`` is returned for it) and is not read otherwise.
    """
    _check_linear(x, weight, bias)
    if xq.shape != x.shape or xq.dtype not in nx.FP8_FORMATS:
        raise ValueError(
            f"linear_q: xq must be the FP8 quantization of x {tuple(x.shape)}, got "
            f"{xq.dtype} {tuple(xq.shape)}"
        )
    xg, wg = _recipe_grans(recipe)
    wq, ws = quantize_impl(weight, wg, weight_fmt, power_of_2)
    y = scaled_mm_impl(xq, xs, xg, wq, ws, wg, bias, x.dtype, accumulation, "none", None)
    return y, ws


@linear_q.register_fake
def _(x, xq, xs, weight, bias, recipe, act_fmt, weight_fmt, grad_fmt, power_of_2,
      accumulation, grad_accumulation="precise"):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, _fake_weight_scale(weight, recipe)


def _linear_q_setup(ctx, inputs, output):
    x, xq, xs, weight, bias, *options = inputs
    _keep_for_backward(ctx, x, xq, xs, weight, output[1], bias, options, (0, 3, 4))
    ctx.mark_non_differentiable(output[1])


def _linear_q_backward(ctx, grad_y, _grad_ws):
    dx, dw, db = _linear_backward(ctx, grad_y)[:3]
    return dx, None, None, dw, db, None, None, None, None, None, None, None


def _linear_backward(ctx, grad_y, *_unused):
    xq, xs, weight, ws, *w_t = ctx.saved_tensors
    w_t = tuple(w_t) if w_t and w_t[0] is not None else None
    recipe, act_fmt, weight_fmt, grad_fmt, p2, _, acc, x_dtype, bias_dtype = ctx.meta
    need_x, need_w, need_b = (ctx.needs_input_grad[i] for i in ctx.grad_index)
    dy = grad_y.reshape(-1, weight.shape[0])
    dx = dw = None
    if recipe == "tensorwise":
        dx, dw = _tensorwise_backward(dy, xq, xs, weight, ws, weight_fmt, grad_fmt, p2, acc,
                                      x_dtype, need_x, need_w, w_t=w_t)
    elif recipe == "blockwise" and need_x and need_w:
        dx, dw = _blockwise_backward(dy, xq, xs, weight, act_fmt, weight_fmt, grad_fmt, p2,
                                     acc, x_dtype, w_t)
    else:
        xg, wg = _recipe_grans(recipe)
        if need_x and w_t is not None:
            dyq, dys = torch.ops.fp8compile.quantize(dy, xg, grad_fmt, p2)
            dx = torch.ops.fp8compile.scaled_mm(dyq, dys, xg, *w_t, wg, None, x_dtype, acc,
                                                "none", None)
        elif need_x:
            # dX = dY @ W: dY scaled along N (1x128 / per token), Wᵀ (K, N) as the "weight".
            dx = fp8_mm(dy, weight.t(), recipe, grad_fmt, weight_fmt, acc, x_dtype, p2)
        if need_w and recipe == "blockwise":
            dw = _blockwise_dw(torch.ops.fp8compile.quantize(dy.t(), "group", grad_fmt, p2),
                               xq, xs, weight, act_fmt, p2, acc)
        elif need_w:
            # Rowwise: Xᵀ's rows span all of M, so X comes back from its FP8 copy first, in
            # its own dtype (not fp32): the transient copy is no larger than the original.
            x = _dequantize_rows(xq, xs, as_gran(xg), x_dtype)
            dw = fp8_mm(dy.t(), x.t(), recipe, grad_fmt, act_fmt, acc, _dw_dtype(weight), p2)
    return (*_input_grads(grad_y, dy, dx, dw, weight, need_b, bias_dtype),
            None, None, None, None, None, None, None)


def _input_grads(grad_y, dy, dx, dw, weight, need_b, bias_dtype):
    """``(dx, dw, db)`` of a linear's backward as autograd wants them: ``dx`` in ``grad_y``'s
    leading shape, ``dw`` in the weight's dtype, ``db`` summed from ``dy (M, N)`` in the
    bias's dtype (None where not needed)."""
    if dx is not None:
        dx = dx.reshape(*grad_y.shape[:-1], weight.shape[1])
    if dw is not None:
        dw = dw.to(weight.dtype)
    db = dy.float().sum(0).to(bias_dtype) if need_b and bias_dtype is not None else None
    return dx, dw, db


def _blockwise_backward(dy, xq, xs, weight, act_fmt, weight_fmt, grad_fmt, p2, acc, x_dtype,
                        w_t=None):
    """Both gradients of the blockwise recipe.  dY is read once and quantized in 1x128 groups
    along N (for dX) and along M, transposed (for dW).  ``w_t``: ``Wᵀ``'s FP8 blocks, when
    given."""
    ops = torch.ops.fp8compile
    dyq, dys, dyq_t, dys_t = ops.quantize_dual(dy, grad_fmt, p2)
    wq_t, ws_t = w_t or ops.quantize(weight.t(), "block", weight_fmt, p2)
    dx = ops.scaled_mm(dyq, dys, "group", wq_t, ws_t, "block", None, x_dtype, acc, "none",
                       None)
    return dx, _blockwise_dw((dyq_t, dys_t), xq, xs, weight, act_fmt, p2, acc)


def _blockwise_dw(dy_t, xq, xs, weight, act_fmt, p2, acc):
    """dW = dYᵀ @ X from ``dy_t = (dyq_t, dys_t)`` (dYᵀ in 1x128 groups along M).  X's FP8
    copy becomes 128x128 blocks of Xᵀ in one pass (1 byte read, 1 written per element; no
    16-bit copy of X)."""
    ops = torch.ops.fp8compile
    xq_t, xs_t = ops.requantize_t(xq, xs, "group", "block", act_fmt, p2)
    return ops.scaled_mm(*dy_t, "group", xq_t, xs_t, "block", None, _dw_dtype(weight), acc,
                         "none", None)


def _dw_dtype(weight: Tensor) -> torch.dtype:
    """The weight gradient GEMM's output dtype: the parameter's when it is bf16 (the result is
    cast there anyway, and the GEMM still accumulates in fp32; a bf16 output also lets cuBLAS
    serve the blockwise and rowwise GEMMs and saves an fp32 pass), else fp32."""
    return weight.dtype if weight.dtype == torch.bfloat16 else torch.float32


def _dequantize_rows(xq: Tensor, xs: Tensor, gran: nx.Granularity, dtype) -> Tensor:
    """``dequant(xq)`` as ``(M, K)`` in ``dtype``; 1x128 groups by a broadcast multiply
    (no ``repeat_interleave`` of the scales: at 4096x14336 that temporary is 235 MB)."""
    k = xq.shape[-1]
    rows = xq.reshape(-1, k)
    if gran is nx.Granularity.GROUP and k % nx.BLOCK == 0:
        g = rows.to(dtype).view(rows.shape[0], k // nx.BLOCK, nx.BLOCK)
        return (g * xs.to(dtype).unsqueeze(-1)).view(rows.shape[0], k)
    if gran is nx.Granularity.ROW:
        return rows.to(dtype) * xs.reshape(-1, 1).to(dtype)
    return nx.dequantize(rows, xs, gran, dtype=dtype)


def _tensorwise_backward(dy, xq, xs, weight, ws, weight_fmt, grad_fmt, p2, acc, x_dtype,
                         need_x, need_w, grad_scale=None, w_t=None, dyq=None, dyq_t=None):
    """Both backward GEMMs with one scale per tensor: dY is quantized once, the saved ``xq``
    is used transposed as is (no second rounding of X), and ``Wᵀ`` is quantized with the
    forward's weight scale ``ws`` (amax(Wᵀ) = amax(W): the same FP8 values as a fresh
    quantization, without its amax pass), unless ``w_t`` gives it.  ``grad_scale`` (delayed
    scaling) replaces dY's dynamic scale when given, and ``dyq`` is then dY quantized with
    it, when the caller has it already (``dyq_t``: also its transpose, contiguous, for dW)."""
    ops = torch.ops.fp8compile
    k = weight.shape[1]
    if grad_scale is None and need_w:
        # dY and its transpose from one read: dW reads dYᵀ K-major.
        dyq, dyq_t, gs = ops.quantize_tensor_t(dy, grad_fmt, p2)
    elif grad_scale is None:
        dyq, gs = ops.quantize(dy, "tensor", grad_fmt, p2)
    else:
        gs = grad_scale
        if dyq is None:
            dyq = ops.quantize_scaled(dy, gs, "tensor", grad_fmt)
    dx = dw = None
    if need_x:
        wq_t, ws_t = w_t or (ops.quantize_scaled(weight.t(), ws, "tensor", weight_fmt), ws)
        dx = ops.scaled_mm(dyq, gs, "tensor", wq_t, ws_t, "tensor", None, x_dtype, acc, "none",
                           None)
    if need_w:
        # Transposed FP8 views: the GEMM makes them K-major itself (1 byte per element).
        x_t = xq.reshape(-1, k).t()
        dy_t = dyq_t if dyq_t is not None else dyq.t()
        dw = ops.scaled_mm(dy_t, gs, "tensor", x_t, xs, "tensor", None, _dw_dtype(weight),
                           acc, "none", None)
    return dx, dw


def weight_quants(weight: Tensor, recipe: str, fmt: str, power_of_2: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(wq, ws, wq_t, ws_t)``: the FP8 weight as the forward GEMM reads it and ``Wᵀ`` as the
    dX GEMM reads it, each with its scales, exactly as the linear ops quantize them (for
    tensorwise ``Wᵀ`` takes ``W``'s scale)."""
    ops = torch.ops.fp8compile
    _, wg = _recipe_grans(recipe)
    wq, ws = ops.quantize(weight, wg, fmt, power_of_2)
    if recipe == "tensorwise":
        return wq, ws, ops.quantize_scaled(weight.t(), ws, "tensor", fmt), ws
    return (wq, ws, *ops.quantize(weight.t(), wg, fmt, power_of_2))


@torch.library.custom_op("fp8compile::linear_w", mutates_args=())
def linear_w(
    x: Tensor,
    xq: Tensor,
    xs: Tensor,
    weight: Tensor,
    wq: Tensor,
    ws: Tensor,
    wq_t: Tensor,
    ws_t: Tensor,
    bias: Optional[Tensor],
    recipe: str,
    act_fmt: str,
    weight_fmt: str,
    grad_fmt: str,
    power_of_2: bool,
    accumulation: str,
    grad_accumulation: str = "precise",
) -> Tensor:
    """``x @ weight.T + bias`` of ``fp8compile::linear_q`` with the weight's FP8 copies given:
    ``(wq, ws, wq_t, ws_t) = weight_quants(weight, ...)`` (a cache holds them per parameter
    version).  ``x`` and ``weight`` carry the gradients (dX, dW are returned for them) and
    are not read otherwise; dX uses ``wq_t``, dW the saved ``xq``."""
    _check_linear_w(x, xq, weight, wq, wq_t, bias)
    xg, wg = _recipe_grans(recipe)
    return scaled_mm_impl(xq, xs, xg, wq, ws, wg, bias, x.dtype, accumulation, "none", None)


def _check_linear_w(x, xq, weight, wq, wq_t, bias) -> None:
    _check_linear(x, weight, bias)
    for name, q, shape in (("wq", wq, weight.shape), ("wq_t", wq_t, weight.shape[::-1]),
                           ("xq", xq, x.shape)):
        if q.dtype not in nx.FP8_FORMATS or tuple(q.shape) != tuple(shape):
            raise ValueError(
                f"linear_w: {name} must be an FP8 tensor of shape {tuple(shape)} (see "
                f"fp8compile.ops.linear.weight_quants), got {q.dtype} {tuple(q.shape)}"
            )


@linear_w.register_fake
def _(x, xq, xs, weight, wq, ws, wq_t, ws_t, bias, recipe, act_fmt, weight_fmt, grad_fmt,
      power_of_2, accumulation, grad_accumulation="precise"):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_w_setup(ctx, inputs, output):
    x, xq, xs, weight, _wq, ws, wq_t, ws_t, bias, *options = inputs
    _keep_for_backward(ctx, x, xq, xs, weight, ws, bias, options, (0, 3, 8), (wq_t, ws_t))


def _linear_w_backward(ctx, grad_y):
    dx, dw, db = _linear_backward(ctx, grad_y)[:3]
    return dx, None, None, dw, None, None, None, None, db, *[None] * 7


linear.register_autograd(_linear_backward, setup_context=_linear_setup)
linear_q.register_autograd(_linear_q_backward, setup_context=_linear_q_setup)
linear_w.register_autograd(_linear_w_backward, setup_context=_linear_w_setup)


# In compiled graphs on the GPU the forward is traced as the ops it is made of, so that each
# of them can be inlined in turn (see ``_inline``); the eager bodies above call the
# implementations directly instead, which saves dispatcher round trips.
def _linear_traced(x, weight, bias, recipe, act_fmt, weight_fmt, grad_fmt, power_of_2,
                   accumulation, grad_accumulation="precise"):
    _check_linear(x, weight, bias)
    xg, _ = _recipe_grans(recipe)
    xq, xs = torch.ops.fp8compile.quantize(x, xg, act_fmt, power_of_2)
    y, ws = _linear_q_traced(x, xq, xs, weight, bias, recipe, act_fmt, weight_fmt, grad_fmt,
                             power_of_2, accumulation)
    return y, xq, xs, ws


def _linear_q_traced(x, xq, xs, weight, bias, recipe, act_fmt, weight_fmt, grad_fmt,
                     power_of_2, accumulation, grad_accumulation="precise"):
    _check_linear(x, weight, bias)
    xg, wg = _recipe_grans(recipe)
    ops = torch.ops.fp8compile
    wq, ws = ops.quantize(weight, wg, weight_fmt, power_of_2)
    y = ops.scaled_mm(xq, xs, xg, wq, ws, wg, bias, x.dtype, accumulation, "none", None)
    return y, ws


def _linear_w_traced(x, xq, xs, weight, wq, ws, wq_t, ws_t, bias, recipe, act_fmt,
                     weight_fmt, grad_fmt, power_of_2, accumulation, grad_accumulation="precise"):
    _check_linear_w(x, xq, weight, wq, wq_t, bias)
    xg, wg = _recipe_grans(recipe)
    return torch.ops.fp8compile.scaled_mm(xq, xs, xg, wq, ws, wg, bias, x.dtype, accumulation,
                                          "none", None)


inline_on_gpu(linear, _linear_traced)
inline_on_gpu(linear_q, _linear_q_traced)
inline_on_gpu(linear_w, _linear_w_traced)


# --------------------------------------------------------------------------------------
# activation x activation matmul


@torch.library.custom_op("fp8compile::matmul", mutates_args=())
def matmul(a: Tensor, b: Tensor, recipe: str, fmt: str, accumulation: str,
           grad_accumulation: str = "precise") -> Tensor:
    """``a @ b`` for batched activations ``a (..., M, K)``, ``b (..., K, N)``, both FP8.

    Each batch entry is one FP8 GEMM with ``a`` scaled like an activation and ``bᵀ`` like a
    weight of the recipe.  The backward runs the two gradient GEMMs the same way (FP8, same
    format, ``grad_accumulation``), and saves the high-precision operands (they are
    activations another op may also hold).
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
def _(a, b, recipe, fmt, accumulation, grad_accumulation="precise"):
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


def _matmul_setup(ctx, inputs, output):
    a, b, recipe, fmt, _, grad_accumulation = inputs
    ctx.save_for_backward(a, b)
    ctx.meta = (recipe, fmt, grad_accumulation)


def _matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    recipe, fmt, acc = ctx.meta
    mm = torch.ops.fp8compile.matmul
    da = db = None
    if ctx.needs_input_grad[0]:
        da = _sum_to(mm(grad, b.transpose(-1, -2), recipe, fmt, acc, acc), a.shape)
    if ctx.needs_input_grad[1]:
        db = _sum_to(mm(a.transpose(-1, -2), grad, recipe, fmt, acc, acc), b.shape)
    return da, db, None, None, None, None


def _sum_to(g: Tensor, shape) -> Tensor:
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g


matmul.register_autograd(_matmul_backward, setup_context=_matmul_setup)
