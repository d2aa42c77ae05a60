"""Delayed scaling in training: the FP8 linear whose scales come from amax histories.

TransformerEngine's DelayedScaling, as functional state a compiled graph updates: each FP8
linear owns two fp32 buffers, graph inputs the backend feeds (:class:`AmaxHistory`)::

    history       (2, L)   row 0: activation amax, row 1: weight amax   newest first
    grad_history  (1, L)   output-gradient amax                          newest first

The scale of a tensor is ``max(its history) / fmax`` (this call's amax while the history is
still all zero, i.e. on the first step), so a tensor whose amax grows between steps
saturates to ±fmax until the history catches up — the trade delayed scaling makes for
not reducing over the tensor before quantizing it.  The rewritten graph reads::

    y, xq, xs, ws, amax = fp8compile.linear_delayed(x, w, b, history, grad_history, ...)
    fp8compile.push_amax(history, amax)              # forward: x and w amax pushed

and the backward of ``linear_delayed`` pushes the gradient amax into ``grad_history``.

Two buffers, not one, because the forward history is mutated after the op ran: autograd
forbids saving a tensor for backward and changing it afterwards, and a view of the same
storage shares its version counter.  The mutations are ``mutates_args`` custom ops, so
AOTAutograd functionalizes them (forward: an input mutation it replays; backward: a mutation
of a saved input) and ``torch.compile`` keeps one graph: no graph break.

Delayed scaling is tensorwise only (``Fp8Config`` enforces it): one amax per tensor is what a
history can hold, and one scale serves a tensor and its transpose, so each backward GEMM
reuses the forward's FP8 ``xq`` and the weight scale as they are.

Each of x, W and dY is read once: the cast with the history's scale records the tensor's
amax for the history in the same pass (``quantize_history``, which also derives the scale
in the kernel: an IEEE quotient in compiled graphs as in eager mode).  Only on the first step,
while a history is all zero, is the amax taken ahead of the cast (on the GPU that launch
returns at once once the history holds a value, and it zeroes the cell the cast records
the amax in: two launches per tensor and no fill or selection kernel).  Dynamic scaling
reads each tensor twice (amax, then cast).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .. import numerics as nx
from ..numerics import Granularity
from ._common import as_fmt, check_producer_args, device_of, empty_scale
from ._inline import inline_on_gpu
from .gemm import scaled_mm_impl
from .linear import _check_linear, _input_grads, _tensorwise_backward
from .quant import _transposed, delayed_amax

__all__ = ["AmaxHistory", "delayed_amax", "delayed_scale", "linear_delayed",
           "linear_delayed_q", "push_amax", "quantize_history", "quantize_history_t"]

_T = Granularity.TENSOR


def delayed_scale(history: Tensor, current: Tensor, fmt: nx.Fp8Format, power_of_2: bool):
    """Scale from the max over ``history``'s last dim; ``current`` where that max is 0."""
    return nx.compute_scale(delayed_amax(history, current), fmt, power_of_2)


@torch.library.custom_op("fp8compile::push_amax", mutates_args=("history",))
def push_amax(history: Tensor, amax: Tensor) -> None:
    """Shift ``history (R, L)`` one step older and write ``amax (R,)`` as the newest entry."""
    _push_amax_body(history, amax)


def _push_amax_body(history: Tensor, amax: Tensor) -> None:
    if history.dim() != 2 or amax.shape != history.shape[:1]:
        raise ValueError(
            f"push_amax: history {tuple(history.shape)} must be (R, L) and amax "
            f"{tuple(amax.shape)} must be (R,)"
        )
    new = torch.cat([amax.reshape(-1, 1).to(history.dtype), history[:, :-1]], dim=1)
    history.copy_(new)


@push_amax.register_fake
def _(history, amax):
    return None


# In a compiled graph the push is plain tensor code, which Inductor fuses with the stacking
# of the amaxes; as an opaque call it ran a cat and a copy kernel of its own.  The mutation
# of the history stays: AOTAutograd writes it back to the graph input, as it did for the op.
inline_on_gpu(push_amax, _push_amax_body, pin_strides=False)


def _delayed_cast(t: Tensor, history: Tensor, fmt: str, power_of_2: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, scale, amax(t))``: ``t`` cast with the delayed scale of ``history`` (a 1-D row),
    or of its own amax while the history is all zero.  The op, not its body, so that compiled
    graphs trace it as its own op (on the GPU: its two launches inlined, with no fill or
    selection kernel between them; see ``kernels.quant.quantize_rows``)."""
    return torch.ops.fp8compile.quantize_history(t, None, None, 0.0, "none", history, fmt,
                                                 power_of_2)


@torch.library.custom_op("fp8compile::linear_delayed", mutates_args=())
def linear_delayed(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    history: Tensor,
    grad_history: Tensor,
    act_fmt: str,
    weight_fmt: str,
    grad_fmt: str,
    power_of_2: bool,
    accumulation: str,
    grad_accumulation: str = "precise",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Tensorwise FP8 linear with delayed scales: ``(y, xq, xs, ws, amax)``.

    ``history (2, L)`` gives the activation and weight scales (it is read, not changed: the
    graph pushes the returned ``amax = [amax(x), amax(w)]`` with :func:`push_amax`).
    ``grad_history (1, L)`` gives the output-gradient scale in backward, which pushes the
    gradient's amax into it.  ``accumulation`` is the forward GEMM's, ``grad_accumulation``
    the backward GEMMs'.

    Example::

        >>> x = torch.randn(8, 256, requires_grad=True)
        >>> w = torch.randn(128, 256, requires_grad=True)
        >>> h, gh = torch.zeros(2, 16), torch.zeros(1, 16)
        >>> y, xq, xs, ws, amax = torch.ops.fp8compile.linear_delayed(
        ...     x, w, None, h, gh, "e4m3", "e4m3", "e5m2", False, "precise")
        >>> torch.ops.fp8compile.push_amax(h, amax)
        >>> y.sum().backward()
        >>> bool(gh[0, 0] == 1.0)  # d(sum)/dy is all ones
        True
    """
    _check_linear(x, weight, bias)
    # One pass over x and one over the weight: each is quantized with its history's scale and
    # the cast records this call's amax for the history as it goes (_delayed_cast).
    xq, xs, x_amax = _delayed_cast(x, history[0], act_fmt, power_of_2)
    wq, ws, w_amax = _delayed_cast(weight, history[1], weight_fmt, power_of_2)
    y = scaled_mm_impl(xq, xs, "tensor", wq, ws, "tensor", bias, x.dtype, accumulation, "none",
                       None)
    return y, xq, xs, ws, torch.stack([x_amax, w_amax])


@linear_delayed.register_fake
def _(x, weight, bias, history, grad_history, act_fmt, weight_fmt, grad_fmt, power_of_2,
      accumulation, grad_accumulation="precise"):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    xq = x.new_empty(x.shape, dtype=as_fmt(act_fmt).dtype)
    scale = empty_scale(x, _T)
    return y, xq, scale, scale.clone(), x.new_empty((2,), dtype=torch.float32)


def _delayed_setup(ctx, inputs, output):
    x, weight, bias, history, grad_history, act_fmt, weight_fmt, grad_fmt, p2, _, acc = inputs
    _, xq, xs, ws, amax = output
    ctx.save_for_backward(xq, xs, ws, weight, grad_history)
    ctx.meta = (weight_fmt, grad_fmt, p2, acc, x.dtype, bias.dtype if bias is not None else None)
    ctx.mark_non_differentiable(xq, xs, ws, amax)


def _delayed_backward(ctx, grad_y, *_unused):
    return (*_delayed_grads(ctx, grad_y, *ctx.needs_input_grad[:3]),
            None, None, None, None, None, None, None, None)


def _delayed_grads(ctx, grad_y, need_x, need_w, need_b):
    """``(dx, dw, db)`` of both delayed linear ops; dY's history is pushed on the way."""
    xq, xs, ws, weight, grad_history = ctx.saved_tensors
    weight_fmt, grad_fmt, p2, acc, x_dtype, bias_dtype = ctx.meta
    dy = grad_y.reshape(-1, weight.shape[0])
    # As in the forward: one pass over dY quantizes it (and its transpose, for dW) and
    # records its amax.
    dyq, dyq_t, gs, current = torch.ops.fp8compile.quantize_history_t(dy, grad_history[0],
                                                                      grad_fmt, p2)
    torch.ops.fp8compile.push_amax(grad_history, current.reshape(1))
    dx, dw = _tensorwise_backward(dy, xq, xs, weight, ws, weight_fmt, grad_fmt, p2, acc,
                                  x_dtype, need_x, need_w, grad_scale=gs, dyq=dyq,
                                  dyq_t=dyq_t)
    return _input_grads(grad_y, dy, dx, dw, weight, need_b, bias_dtype)


linear_delayed.register_autograd(_delayed_backward, setup_context=_delayed_setup)


def _linear_delayed_traced(x, weight, bias, history, grad_history, act_fmt, weight_fmt,
                           grad_fmt, power_of_2, accumulation, grad_accumulation="precise"):
    """The forward as the ops it is made of, for compiled graphs on the GPU (``_inline``):
    the same kernels as the eager body, launched by Inductor's generated code."""
    _check_linear(x, weight, bias)
    ops = torch.ops.fp8compile
    xq, xs, x_amax = _delayed_cast(x, history[0], act_fmt, power_of_2)
    wq, ws, w_amax = _delayed_cast(weight, history[1], weight_fmt, power_of_2)
    y = ops.scaled_mm(xq, xs, "tensor", wq, ws, "tensor", bias, x.dtype, accumulation, "none",
                      None)
    return y, xq, xs, ws, torch.stack([x_amax, w_amax])


inline_on_gpu(linear_delayed, _linear_delayed_traced)


@torch.library.custom_op("fp8compile::quantize_history", mutates_args=())
def quantize_history(
    x: Tensor,
    x2: Optional[Tensor],
    norm_weight: Optional[Tensor],
    eps: float,
    producer: str,
    history: Tensor,
    fmt: str,
    power_of_2: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, scale, amax)``: delayed scaling's shared cast of a linear's input.

    What is cast is ``x`` (``producer="none"``), ``RMSNorm(x) * norm_weight`` (``"rmsnorm"``,
    with ``eps``), the same of ``x + x2`` (``"add_rmsnorm"``) or ``silu(x) * x2``
    (``"silu_mul"``), computed in fp32 as the fused producers do.  The scale is
    ``history``'s max (1-D, the activation row of a linear's history), or this call's amax
    while the history is all zero; ``amax`` is the finite amax of what was cast, for the
    graph to push into the histories.  On the GPU: one pass
    over the inputs, plus an amax pass that returns at once once the history holds a value.
    """
    _check_history_args(x, x2, norm_weight, producer, history)
    return _quantize_history_ref(x, x2, norm_weight, eps, producer, history, as_fmt(fmt),
                                 power_of_2)


def _check_history_args(x, x2, norm_weight, producer, history) -> None:
    check_producer_args(x, x2, norm_weight, producer, "quantize_history")
    if history.dim() != 1:
        raise ValueError(
            f"quantize_history: history must be one 1-D amax history (a row of a linear's "
            f"(2, L) history), got shape {tuple(history.shape)}"
        )


def _quantize_history_ref(x, x2, norm_weight, eps, producer, history, fmt, power_of_2):
    y = nx.produce(x, x2, norm_weight, eps, producer)
    cur = nx.amax(y, _T).float()
    scale = nx.compute_scale(delayed_amax(history, cur), fmt, power_of_2)
    return nx.quantize_with_scale(y, scale, _T, fmt), scale, cur


@quantize_history.register_fake
def _(x, x2, norm_weight, eps, producer, history, fmt, power_of_2):
    return (x.new_empty(x.shape, dtype=as_fmt(fmt).dtype),
            x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=torch.float32))


@quantize_history.register_kernel("cuda")
def _quantize_history_cuda(x, x2, norm_weight, eps, producer, history, fmt, power_of_2):
    from .. import kernels

    _check_history_args(x, x2, norm_weight, producer, history)
    if kernels.available(x) and x.numel() > 0 and x.dim() > 0:
        from ..kernels.fused import quantize_history as _kernel

        return _kernel(x, x2, norm_weight, eps, producer, history, as_fmt(fmt), power_of_2)
    return _quantize_history_ref(x, x2, norm_weight, eps, producer, history, as_fmt(fmt),
                                 power_of_2)


inline_on_gpu(quantize_history, _quantize_history_cuda)


@torch.library.custom_op("fp8compile::quantize_history_t", mutates_args=())
def quantize_history_t(
    x: Tensor, history: Tensor, fmt: str, power_of_2: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(q, q_t, scale, amax)``: ``quantize_history(x, ..., "none", history, ...)`` of a 2-D
    ``x`` plus ``q_t``, ``q.t()`` in its own storage, the layout the dW GEMM reads.  On
    the GPU one read of x writes both (64x64 tiles), in two launches as quantize_history."""
    _check_history_t_args(x, history)
    q, scale, amax = _quantize_history_ref(x, None, None, 0.0, "none", history, as_fmt(fmt),
                                           power_of_2)
    return q, _transposed(q), scale, amax


def _check_history_t_args(x: Tensor, history: Tensor) -> None:
    _check_history_args(x, None, None, "none", history)
    if x.dim() != 2:
        raise ValueError(
            f"quantize_history_t: x must be 2-D (M, N), got shape {tuple(x.shape)}; reshape "
            "it to (tokens, features) first"
        )


@quantize_history_t.register_fake
def _(x, history, fmt, power_of_2):
    dtype = as_fmt(fmt).dtype
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[1], x.shape[0]), dtype=dtype),
            x.new_empty((), dtype=torch.float32), x.new_empty((), dtype=torch.float32))


@quantize_history_t.register_kernel("cuda")
def _quantize_history_t_cuda(x, history, fmt, power_of_2):
    from .. import kernels

    _check_history_t_args(x, history)
    if kernels.available(x) and x.numel() > 0:
        from ..kernels.quant import quantize_history_t as _kernel

        return _kernel(x, history, as_fmt(fmt), power_of_2)
    q, scale, amax = _quantize_history_ref(x, None, None, 0.0, "none", history, as_fmt(fmt),
                                           power_of_2)
    return q, _transposed(q), scale, amax


inline_on_gpu(quantize_history_t, _quantize_history_t_cuda)


@torch.library.custom_op("fp8compile::linear_delayed_q", mutates_args=())
def linear_delayed_q(
    x: Tensor,
    xq: Tensor,
    xs: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    history: Tensor,
    grad_history: Tensor,
    act_fmt: str,
    weight_fmt: str,
    grad_fmt: str,
    power_of_2: bool,
    accumulation: str,
    grad_accumulation: str = "precise",
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, ws, w_amax)`` of ``fp8compile::linear_delayed`` for an input quantized elsewhere:
    ``(xq, xs)`` is ``x`` quantized with its delayed scale, shared by every linear that reads
    ``x`` (q/k/v, gate/up; the graph pushes ``[x_amax, w_amax]`` into each one's ``history``).
    ``x`` carries the gradient and is not read otherwise; ``history[1]`` gives the weight's
    scale and ``grad_history`` dY's, as for ``linear_delayed``.
    """
    _check_linear(x, weight, bias)
    _check_shared_input(x, xq)
    wq, ws, w_amax = _delayed_cast(weight, history[1], weight_fmt, power_of_2)
    y = scaled_mm_impl(xq, xs, "tensor", wq, ws, "tensor", bias, x.dtype, accumulation, "none",
                       None)
    return y, ws, w_amax


def _check_shared_input(x: Tensor, xq: Tensor) -> None:
    if xq.shape != x.shape or xq.dtype not in nx.FP8_FORMATS:
        raise ValueError(
            f"linear_delayed_q: xq must be the FP8 quantization of x {tuple(x.shape)}, got "
            f"{xq.dtype} {tuple(xq.shape)}"
        )


@linear_delayed_q.register_fake
def _(x, xq, xs, weight, bias, history, grad_history, act_fmt, weight_fmt, grad_fmt,
      power_of_2, accumulation, grad_accumulation="precise"):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, empty_scale(x, _T), x.new_empty((), dtype=torch.float32)


def _delayed_q_setup(ctx, inputs, output):
    (x, xq, xs, weight, bias, _history, grad_history, _act_fmt, weight_fmt, grad_fmt, p2, _,
     acc) = inputs
    _, ws, w_amax = output
    ctx.save_for_backward(xq, xs, ws, weight, grad_history)
    ctx.meta = (weight_fmt, grad_fmt, p2, acc, x.dtype, bias.dtype if bias is not None else None)
    ctx.mark_non_differentiable(ws, w_amax)


def _delayed_q_backward(ctx, grad_y, *_unused):
    need = ctx.needs_input_grad
    dx, dw, db = _delayed_grads(ctx, grad_y, need[0], need[3], need[4])
    return dx, None, None, dw, db, None, None, None, None, None, None, None, None


linear_delayed_q.register_autograd(_delayed_q_backward, setup_context=_delayed_q_setup)


def _linear_delayed_q_traced(x, xq, xs, weight, bias, history, grad_history, act_fmt,
                             weight_fmt, grad_fmt, power_of_2, accumulation,
                             grad_accumulation="precise"):
    _check_linear(x, weight, bias)
    _check_shared_input(x, xq)
    ops = torch.ops.fp8compile
    wq, ws, w_amax = _delayed_cast(weight, history[1], weight_fmt, power_of_2)
    y = ops.scaled_mm(xq, xs, "tensor", wq, ws, "tensor", bias, x.dtype, accumulation, "none",
                      None)
    return y, ws, w_amax


inline_on_gpu(linear_delayed_q, _linear_delayed_q_traced)


class AmaxHistory:
    """Provider of one persistent amax-history buffer (a graph input the backend feeds).

    ``rows`` histories of ``length`` (``rows=None``: one 1-D history, as
    ``fp8compile::quantize_delayed`` takes it).  ``module`` and ``kind`` (``"forward"``: rows
    activation, weight; ``"grad"``: one row) let :func:`fp8compile.training.amax_histories`
    show the state per layer.  The buffer is created on the device of the first tensor
    argument and kept across calls.
    """

    def __init__(self, length: int, rows: int | None, module: str = "", kind: str = "forward"):
        self.length, self.rows, self.module, self.kind = length, rows, module, kind
        self.buf: Tensor | None = None

    def __call__(self, args: Sequence[Any]) -> Tensor:
        dev = device_of(args)
        if self.buf is None or self.buf.device != dev:
            shape = (self.length,) if self.rows is None else (self.rows, self.length)
            self.buf = torch.zeros(shape, dtype=torch.float32, device=dev)
        return self.buf

    def __repr__(self) -> str:
        return f"AmaxHistory({self.module!r}, {self.kind}, {self.rows or 1}x{self.length})"
