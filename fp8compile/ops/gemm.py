"""The FP8 GEMM op with its fused epilogue."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import numerics as nx
from ._common import (
    ACTIVATIONS,
    as_fmt,
    as_gran,
    check_static_scale,
    empty_scale,
    scale_shape,
    triton_available,
)
from ._inline import inline_on_gpu
from .quant import quantize_with_scale_impl

# --------------------------------------------------------------------------------------
# GEMM


def _check_mm(xq: Tensor, wq: Tensor, bias: Optional[Tensor], activation: str,
              residual: Optional[Tensor] = None, residual2: Optional[Tensor] = None) -> None:
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
    if activation == "swiglu":
        nx.check_swiglu_rows(wq.shape[0])
    if residual2 is not None and residual is None:
        raise ValueError("scaled_mm: residual2 is a second residual; pass the first as "
                         "residual")


def epilogue(y: Tensor, activation: str, residual: Optional[Tensor],
             residual2: Optional[Tensor] = None) -> Tensor:
    """``act(y) + residual`` in the promoted dtype of ``y`` and ``residual`` (fp32 for the
    reference's fp32 product; the output dtype after a cuBLAS GEMM).  ``swiglu`` halves the
    last dim (:func:`fp8compile.numerics.swiglu`).  A second residual is added to the first
    in fp32 (:func:`fp8compile.numerics.residual_sum`), and so is their sum to ``y``."""
    residual = nx.residual_sum(residual, residual2)
    if activation == "swiglu":
        y = nx.swiglu(y)
    elif activation == "gelu":
        y = torch.nn.functional.gelu(y)
    elif activation == "silu":
        y = torch.nn.functional.silu(y)
    elif activation == "relu":
        y = torch.relu(y)
    if residual is not None:
        y = y + residual
    return y


def scaled_mm_reference(
    xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, activation, residual,
    residual2=None,
) -> Tensor:
    y = nx.fp8_linear_reference(
        xq, xs, as_gran(x_granularity), wq, ws, as_gran(w_granularity), bias, torch.float32
    )
    return epilogue(y, activation, residual, residual2).to(out_dtype)


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
    residual2: Optional[Tensor] = None,
) -> Tensor:
    """``act(dequant(xq) @ dequant(wq).T + bias) + residual (+ residual2)`` in ``out_dtype``.

    ``xq`` is ``(..., K)``, ``wq`` is ``(N, K)``; ``accumulation`` is ``precise`` or ``fast``
    (the reference is always exact fp32; kernels honour the choice).  ``activation="swiglu"``
    takes ``wq`` (and its scales, bias) as gate rows then up rows (``torch.cat([gate,
    up])``, each half a multiple of 128 rows) and returns ``silu(gate) * up`` of the
    fp32 product, ``(..., N/2)``; a residual then has that shape.  ``residual2`` is a second
    residual, added in fp32 with the first (a residual stream ``x + o`` the epilogue sums
    without rounding it to the model dtype); give ``residual`` first.
    """
    _check_mm(xq, wq, bias, activation, residual, residual2)
    return scaled_mm_reference(
        xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, activation, residual,
        residual2,
    )


@scaled_mm.register_fake
def _(xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, accumulation, activation,
      residual, residual2=None):
    n = wq.shape[0] // 2 if activation == "swiglu" else wq.shape[0]
    return xq.new_empty((*xq.shape[:-1], n), dtype=out_dtype)


@scaled_mm.register_kernel("cuda")
def _(xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, accumulation, activation,
      residual, residual2=None):
    return scaled_mm_impl(xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype,
                          accumulation, activation, residual, residual2)


def scaled_mm_impl(xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, accumulation,
                   activation, residual, residual2=None) -> Tensor:
    """The op's body without the dispatcher (see :func:`fp8compile.ops.quant.quantize_impl`)."""
    _check_mm(xq, wq, bias, activation, residual, residual2)
    if triton_available(xq):
        from .. import kernels

        return kernels.scaled_mm(
            xq, xs, as_gran(x_granularity), wq, ws, as_gran(w_granularity), bias, out_dtype,
            accumulation, activation, residual, residual2,
        )
    return scaled_mm_reference(
        xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, activation, residual,
        residual2,
    )


def _decide_backend(xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype,
                    accumulation, activation, residual, residual2=None) -> bool:
    """Before a GEMM is traced into a compiled graph (see ``_inline``), take the choice of
    backend that eager mode takes on the first call, by timing the candidates on real
    random operands of the same shapes (:func:`fp8compile.kernels.select.choose_traced`).
    Inlines unless the Gluon kernel won: it cannot be traced, so the op then stays an
    opaque call, whose body runs it; its compile then starts in the background."""
    from ..kernels import select
    from ..kernels.gemm import precompile_gluon

    _check_mm(xq, wq, bias, activation, residual, residual2)
    args = (xq, xs, as_gran(x_granularity), wq, ws, as_gran(w_granularity), bias, out_dtype,
            accumulation, activation, residual, residual2)
    if select.choose_traced(*args) != "gluon":
        return True
    precompile_gluon(*args)
    return False


# The residual stays unpinned: after a cuBLAS GEMM it is read by a pointwise add, and
# Inductor then computes it where it is read, as without the fold (a residual stream
# ``x + o`` recomputed in fp32 by the next add instead of read back rounded to bf16).
# The Triton GEMM pins it where it passes it to its kernel.
inline_on_gpu(scaled_mm, scaled_mm_impl, when=_decide_backend,
              unpinned=("residual", "residual2"))


# --------------------------------------------------------------------------------------
# GEMM with its output quantized (static scaling)


def _check_out_scale(out_scale: Tensor, fmt: str) -> None:
    as_fmt(fmt)
    check_static_scale(out_scale, "scaled_mm_quantized: out_scale")


@torch.library.custom_op("fp8compile::scaled_mm_quantized", mutates_args=())
def scaled_mm_quantized(
    xq: Tensor,
    xs: Tensor,
    x_granularity: str,
    wq: Tensor,
    ws: Tensor,
    w_granularity: str,
    bias: Optional[Tensor],
    accumulation: str,
    activation: str,
    out_scale: Tensor,
    fmt: str,
) -> Tensor:
    """``fp8compile::scaled_mm`` whose output is cast to FP8 with a given tensorwise scale:
    ``saturate(rne(act(dequant(xq) @ dequant(wq).T + bias) / out_scale))`` from the fp32
    product, what static scaling's next quantization would do, without the product ever
    being written in high precision.  On Hopper the warp-specialized kernel casts in its
    epilogue (E4M3; with ``activation="swiglu"`` the SwiGLU MLP's gate/up GEMM writes the
    down projection's FP8 input); elsewhere the GEMM writes fp32 and one pass casts it."""
    _check_mm(xq, wq, bias, activation)
    _check_out_scale(out_scale, fmt)
    return _scaled_mm_quantized_ref(xq, xs, x_granularity, wq, ws, w_granularity, bias,
                                    activation, out_scale, fmt)


def _scaled_mm_quantized_ref(xq, xs, x_granularity, wq, ws, w_granularity, bias, activation,
                             out_scale, fmt):
    y = scaled_mm_reference(xq, xs, x_granularity, wq, ws, w_granularity, bias, torch.float32,
                            activation, None)
    return nx.quantize_with_scale(y, out_scale.reshape(()), nx.Granularity.TENSOR, as_fmt(fmt))


@scaled_mm_quantized.register_fake
def _(xq, xs, x_granularity, wq, ws, w_granularity, bias, accumulation, activation, out_scale,
      fmt):
    n = wq.shape[0] // 2 if activation == "swiglu" else wq.shape[0]
    return xq.new_empty((*xq.shape[:-1], n), dtype=as_fmt(fmt).dtype)


def _quantized_by_gluon(xq, xs, x_granularity, wq, ws, w_granularity, activation, accumulation,
                        fmt) -> bool:
    """Whether the warp-specialized kernel casts the output in its epilogue (eager calls;
    E4M3 only, its rules say)."""
    from ..kernels.gemm import gluon_serves

    return gluon_serves(xq, xs, as_gran(x_granularity), wq, ws, as_gran(w_granularity),
                        as_fmt(fmt).dtype, activation, None, accumulation)


@scaled_mm_quantized.register_kernel("cuda")
def _scaled_mm_quantized_cuda(xq, xs, x_granularity, wq, ws, w_granularity, bias, accumulation,
                              activation, out_scale, fmt):
    _check_mm(xq, wq, bias, activation)
    _check_out_scale(out_scale, fmt)
    if triton_available(xq) and _quantized_by_gluon(xq, xs, x_granularity, wq, ws,
                                                    w_granularity, activation, accumulation,
                                                    fmt):
        from ..kernels.gemm import scaled_mm as triton_mm

        return triton_mm(xq, xs, as_gran(x_granularity), wq, ws, as_gran(w_granularity), bias,
                         as_fmt(fmt).dtype, accumulation, activation, out_scale=out_scale)
    y = scaled_mm_impl(xq, xs, x_granularity, wq, ws, w_granularity, bias, torch.float32,
                       accumulation, activation, None)
    return quantize_with_scale_impl(y, out_scale, nx.Granularity.TENSOR, as_fmt(fmt))


def _inline_quantized(xq, xs, x_granularity, wq, ws, w_granularity, bias, accumulation,
                      activation, out_scale, fmt) -> bool:
    """Inline (trace the fallback's kernels) unless the Gluon kernel serves the call: it
    cannot be traced, so the op then stays an opaque call whose body runs it; its compile
    then starts in the background."""
    from ..kernels.gemm import precompile_gluon

    if not _quantized_by_gluon(xq, xs, x_granularity, wq, ws, w_granularity, activation,
                               accumulation, fmt):
        return True
    precompile_gluon(xq, xs, as_gran(x_granularity), wq, ws, as_gran(w_granularity), bias,
                     as_fmt(fmt).dtype, accumulation, activation, out_scale=out_scale)
    return False


inline_on_gpu(scaled_mm_quantized, _scaled_mm_quantized_cuda, when=_inline_quantized)


# --------------------------------------------------------------------------------------
# A blockwise SwiGLU MLP's gate/up GEMM quantizing its own output in 1x128 groups


def _check_swiglu_groups(xq, x_granularity, wq, w_granularity, fmt):
    _check_mm(xq, wq, None, "swiglu")
    if (as_gran(x_granularity), as_gran(w_granularity)) != (nx.Granularity.GROUP,
                                                            nx.Granularity.BLOCK):
        raise ValueError(f"scaled_mm_swiglu_quantize: blockwise operands only (1x128 groups x "
                         f"128x128 blocks), got {x_granularity!r} x {w_granularity!r}")
    as_fmt(fmt)


@torch.library.custom_op("fp8compile::scaled_mm_swiglu_quantize", mutates_args=())
def scaled_mm_swiglu_quantize(
    xq: Tensor, xs: Tensor, x_granularity: str, wq: Tensor, ws: Tensor, w_granularity: str,
    accumulation: str, fmt: str, power_of_2: bool,
) -> tuple[Tensor, Tensor]:
    """FP8 ``(q, scale)``, in 1x128 groups, of ``silu(gate) * up`` of the fp32 product of a
    blockwise GEMM over the weight ``torch.cat([gate, up])`` (each half a multiple of 128
    rows): a SwiGLU MLP's gate/up GEMM writing its down projection's input.  On Hopper the
    warp-specialized kernel does it in its epilogue (E4M3), so neither gate, up nor h is
    written in high precision; elsewhere h is computed in fp32, then quantized."""
    _check_swiglu_groups(xq, x_granularity, wq, w_granularity, fmt)
    h = scaled_mm_reference(xq, xs, x_granularity, wq, ws, w_granularity, None, torch.float32,
                            "swiglu", None)
    return nx.quantize(h, nx.Granularity.GROUP, as_fmt(fmt), power_of_2)


@scaled_mm_swiglu_quantize.register_fake
def _(xq, xs, x_granularity, wq, ws, w_granularity, accumulation, fmt, power_of_2):
    q = xq.new_empty((*xq.shape[:-1], wq.shape[0] // 2), dtype=as_fmt(fmt).dtype)
    return q, empty_scale(q, nx.Granularity.GROUP)


def _swiglu_groups_by_gluon(xq, xs, wq, ws, accumulation, fmt, power_of_2) -> bool:
    from ..kernels.gemm import gluon_serves

    return (not power_of_2 and as_fmt(fmt) is nx.Fp8Format.E4M3
            and gluon_serves(xq, xs, nx.Granularity.GROUP, wq, ws, nx.Granularity.BLOCK,
                             torch.float8_e4m3fn, "swiglu", None, accumulation, groups=True))


@scaled_mm_swiglu_quantize.register_kernel("cuda")
def _scaled_mm_swiglu_quantize_cuda(xq, xs, x_granularity, wq, ws, w_granularity,
                                    accumulation, fmt, power_of_2):
    _check_swiglu_groups(xq, x_granularity, wq, w_granularity, fmt)
    if triton_available(xq):
        from ..kernels.gemm import swiglu_group_quantize

        return swiglu_group_quantize(xq, xs, wq, ws, as_fmt(fmt), accumulation, power_of_2)
    h = scaled_mm_impl(xq, xs, x_granularity, wq, ws, w_granularity, None, torch.float32,
                       accumulation, "swiglu", None)
    return nx.quantize(h, nx.Granularity.GROUP, as_fmt(fmt), power_of_2)


def _inline_swiglu_groups(xq, xs, x_granularity, wq, ws, w_granularity, accumulation, fmt,
                          power_of_2) -> bool:
    """Inline the fallback's kernels unless the Gluon kernel serves the call (it cannot be
    traced: the op stays an opaque call, and its compile starts in the background)."""
    from ..kernels.gemm import precompile_swiglu_groups

    if not _swiglu_groups_by_gluon(xq, xs, wq, ws, accumulation, fmt, power_of_2):
        return True
    precompile_swiglu_groups(xq, xs, wq, ws, accumulation)
    return False


inline_on_gpu(scaled_mm_swiglu_quantize, _scaled_mm_swiglu_quantize_cuda,
              when=_inline_swiglu_groups)


# --------------------------------------------------------------------------------------
# grouped GEMM (a mixture of experts' expert projections)


@torch.library.custom_op("fp8compile::quantize_grouped_weight", mutates_args=())
def quantize_grouped_weight(w: Tensor, granularity: str, fmt: str,
                            power_of_2: bool) -> tuple[Tensor, Tensor]:
    """A grouped GEMM's ``(G, N, K)`` weight quantized one group at a time
    (:func:`fp8compile.numerics.quantize_grouped_weight`).  Inference graphs never run it:
    the weight cache does, once per parameter version."""
    return nx.quantize_grouped_weight(w, as_gran(granularity), as_fmt(fmt), power_of_2)


@quantize_grouped_weight.register_fake
def _(w, granularity, fmt, power_of_2):
    # each group's scale shape (numerics.quantize_grouped_weight), stacked
    shape = (w.shape[0], *scale_shape(tuple(w.shape[1:]), as_gran(granularity)))
    return (w.new_empty(w.shape, dtype=as_fmt(fmt).dtype),
            w.new_empty(shape, dtype=torch.float32))


@torch.library.custom_op("fp8compile::scaled_grouped_mm", mutates_args=())
def scaled_grouped_mm(xq: Tensor, xs: Tensor, x_granularity: str, wq: Tensor, ws: Tensor,
                      w_granularity: str, offs: Tensor, out_dtype: torch.dtype,
                      accumulation: str) -> Tensor:
    """Grouped ``dequant(xq) @ dequant(wq[g]).T`` in ``out_dtype``: ``xq`` is ``(S, K)`` with
    its rows sorted by group, ``offs`` (int32) each group's end row, ``wq`` ``(G, N, K)``;
    rows past ``offs[-1]`` are zero.  The reference reads ``offs`` on the host."""
    return nx.fp8_grouped_linear_reference(xq, xs, as_gran(x_granularity), wq, ws,
                                           as_gran(w_granularity), offs, out_dtype)


@scaled_grouped_mm.register_fake
def _(xq, xs, x_granularity, wq, ws, w_granularity, offs, out_dtype, accumulation):
    return xq.new_empty((xq.shape[0], wq.shape[1]), dtype=out_dtype)


@scaled_grouped_mm.register_kernel("cuda")
def _(xq, xs, x_granularity, wq, ws, w_granularity, offs, out_dtype, accumulation):
    if triton_available(xq):  # the kernel and the reference check the operands
        from ..kernels.grouped import scaled_grouped_mm as grouped_kernel

        return grouped_kernel(xq, xs, as_gran(x_granularity), wq, ws, as_gran(w_granularity),
                              offs, out_dtype, accumulation)
    return nx.fp8_grouped_linear_reference(xq, xs, as_gran(x_granularity), wq, ws,
                                           as_gran(w_granularity), offs, out_dtype)
