"""The two export-only ops and their ONNX translations.

``fp8compile_onnx::qdq_act(x, granularity, fmt, static_amax)`` quantizes and dequantizes an
activation with the recipe's granularity (dynamic scale, or the static one when
``static_amax >= 0``).  ``fp8compile_onnx::dq_linear(x, wq, ws, bias, granularity)`` dequantizes a
pre-quantized weight stored *transposed* as ``wq (K, N)`` and computes ``x @ W.T + bias``.

Both have a CPU reference built on :mod:`fp8compile.numerics`, so the export copy of a model runs
eagerly in PyTorch (the "PyTorch FP8 path" the exported file is compared with), and a
translation to standard ``ai.onnx`` ops:

* activation, any granularity: reshape ``x`` to 2-D rows that share one scale
  (``(-1, K)`` per token, ``(-1, 128)`` per 1×128 group, ``(1, -1)`` per tensor), scale =
  ``max(ReduceMax(Abs(rows)), 1e-12) / fmax`` per row, then a per-axis ``QuantizeLinear``
  (saturating, FP8 zero point) → ``DequantizeLinear`` (axis 0) and reshape back.  A static scale
  is a constant scalar and needs no reshape.
* weight: an FP8 initializer ``(K, N)`` → ``DequantizeLinear`` with a scalar scale (tensor),
  ``axis=1`` with ``(N,)`` scales (per output channel) or ``axis=0, block_size=128`` with
  ``(ceil(K/128), N)`` scales (128×128 blocks, repeated over the 128 columns of a block because
  ONNX blocks along one axis only), feeding ``MatMul`` directly, then ``Add`` of the bias.
"""

from __future__ import annotations

import math

import onnx
import torch

from .. import numerics as nx

__all__ = ["NAMESPACE", "dq_linear", "qdq_act", "translation_table", "weight_tensors"]

NAMESPACE = "fp8compile_onnx"

_ONNX_FP8 = {"e4m3": onnx.TensorProto.FLOAT8E4M3FN, "e5m2": onnx.TensorProto.FLOAT8E5M2}


# -- PyTorch side ------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::qdq_act", mutates_args=())
def qdq_act(x: torch.Tensor, granularity: str, fmt: str, static_amax: float) -> torch.Tensor:
    """Quantize-dequantize ``x`` (…, K): dynamic scale, or ``static_amax`` when >= 0."""
    g, f = nx.Granularity(granularity), nx.Fp8Format(fmt)
    if static_amax >= 0:
        s = nx.compute_scale(torch.tensor(static_amax), f)
        q = nx.quantize_with_scale(x, s, nx.Granularity.TENSOR, f)
        return nx.dequantize(q, s, nx.Granularity.TENSOR, dtype=x.dtype)
    q, s = nx.quantize(x, g, f)
    return nx.dequantize(q, s.contiguous(), g, dtype=x.dtype)


@qdq_act.register_fake
def _(x, granularity, fmt, static_amax):
    return torch.empty_like(x)


def _dequant_weight(wq: torch.Tensor, ws: torch.Tensor, granularity: str) -> torch.Tensor:
    """``W.T`` in fp32 from the ONNX-layout payload ``wq (K, N)`` and scales ``ws``."""
    w = wq.float()
    if granularity == "tensor":
        return w * ws
    if granularity == "row":
        return w * ws.reshape(1, -1)
    s = ws.repeat_interleave(nx.BLOCK, dim=0)[: w.shape[0]]
    return w * s


@torch.library.custom_op(f"{NAMESPACE}::dq_linear", mutates_args=())
def dq_linear(
    x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
    granularity: str,
) -> torch.Tensor:
    """``x @ dequant(wq, ws) + bias`` with ``wq`` the transposed FP8 weight ``(K, N)``."""
    w = _dequant_weight(wq, ws, granularity)
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@dq_linear.register_fake
def _(x, wq, ws, bias, granularity):
    return x.new_empty(*x.shape[:-1], wq.shape[1])


def weight_tensors(
    weight: torch.Tensor, granularity: nx.Granularity, fmt: nx.Fp8Format, power_of_2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight (N, K)`` with :mod:`numerics` and lay it out for ONNX.

    Returns ``wq (K, N)`` (FP8, contiguous) and ``ws``: ``()`` for TENSOR, ``(N,)`` for ROW,
    ``(ceil(K/128), N)`` for BLOCK (each block's scale repeated over its 128 output channels).
    """
    w = weight.detach().float()
    q, s = nx.quantize(w, granularity, fmt, power_of_2)
    n, k = w.shape
    if granularity is nx.Granularity.TENSOR:
        ws = s.reshape(())
    elif granularity is nx.Granularity.ROW:
        ws = s.reshape(n)
    elif granularity is nx.Granularity.BLOCK:
        ws = s.repeat_interleave(nx.BLOCK, dim=0)[:n].t()  # (N, KB) -> (KB, N)
        assert ws.shape == (math.ceil(k / nx.BLOCK), n)
    else:
        raise ValueError(f"weight granularity {granularity.value!r} has no ONNX layout")
    return q.t().contiguous(), ws.contiguous().float()


# -- ONNX side ---------------------------------------------------------------------------------


def translation_table(opset: int) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: ``ai.onnx`` ops of ``opset``."""
    import onnxscript

    op = getattr(onnxscript, f"opset{min(opset, 23)}")

    def _zero_point(fmt: str):
        return op.Constant(value=onnx.helper.make_tensor("zp", _ONNX_FP8[fmt], [], [0.0]))

    def _qdq_act(x, granularity: str, fmt: str, static_amax: float):
        fmax = nx.Fp8Format(fmt).max
        if static_amax >= 0:
            zp = _zero_point(fmt)
            s = op.Constant(value_float=max(static_amax, nx.AMAX_FLOOR) / fmax)
            s = op.CastLike(s, x)
            return op.DequantizeLinear(op.QuantizeLinear(x, s, zp, saturate=1), s)
        cols = {"tensor": -1, "row": 0, "group": nx.BLOCK}[granularity]
        if granularity == "tensor":
            rows = op.Reshape(x, op.Constant(value_ints=[1, -1]))
        else:
            # row: (-1, K) with K taken from x; group: (-1, 128)
            k = op.Slice(op.Shape(x), op.Constant(value_ints=[-1]), op.Constant(value_ints=[2**62]))
            width = k if granularity == "row" else op.Constant(value_ints=[cols])
            rows = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), width, axis=0))
        amax = op.ReduceMax(op.Abs(rows), op.Constant(value_ints=[1]), keepdims=0)
        floor = op.CastLike(op.Constant(value_float=nx.AMAX_FLOOR), x)
        s = op.Div(op.Max(amax, floor), op.CastLike(op.Constant(value_float=fmax), x))
        # Per-axis zero points must match the (run-time) number of rows: zeros cast to FP8.
        zp = op.Cast(op.Mul(s, op.CastLike(op.Constant(value_float=0.0), s)), to=_ONNX_FP8[fmt])
        q = op.QuantizeLinear(rows, s, zp, axis=0, saturate=1)
        return op.Reshape(op.DequantizeLinear(q, s, axis=0), op.Shape(x))

    def _dq_linear(x, wq, ws, bias, granularity: str):
        if granularity == "tensor":
            w = op.DequantizeLinear(wq, ws)
        elif granularity == "row":
            w = op.DequantizeLinear(wq, ws, axis=1)
        else:
            w = op.DequantizeLinear(wq, ws, axis=0, block_size=nx.BLOCK)
        y = op.MatMul(x, op.CastLike(w, x))
        if bias is not None:
            y = op.Add(y, bias)
        return y

    return {
        torch.ops.fp8compile_onnx.qdq_act.default: _qdq_act,
        torch.ops.fp8compile_onnx.dq_linear.default: _dq_linear,
    }
