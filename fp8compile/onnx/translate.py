"""ONNX translations of the fp8compile ops (``custom_translation_table`` of ``torch.onnx.export``).

Only standard ``ai.onnx`` ops come out; FP8 lives in ``QuantizeLinear``/``DequantizeLinear``.

``fp8compile::quantize(x, granularity, fmt, power_of_2) -> (q, s)`` (dynamic scales)::

    x ─Cast(f32)─ Abs ─ Where(<inf) ─ [Pad K to 128, Reshape (M, K/128, 128)] ─ ReduceMax
      ─ Max(·, 1e-12) ─ Div(fmax) ─ [power of two] ──────────────────────────────── s
    x ─Cast(f32)─ [Where(IsInf → NaN)] ─ Reshape (M, K) ─ QuantizeLinear(s) ─ Reshape ─ q

  ``tensor``: one scalar ``s``; ``row``: ``s (M, 1)``, per-axis ``axis=0``; ``group``: ``s (M,
  ceil(K/128))``, blocked ``axis=1, block_size=128`` (a partial last group is allowed: its amax
  comes from the zero-padded copy, its quantization from ONNX's partial block).  The amax skips
  NaN/±Inf and ±Inf becomes NaN as in :mod:`fp8compile.numerics` (ONNX would saturate it to
  ±448); ``target="tensorrt"`` leaves these two guards out so that only the QDQ pattern remains.

``fp8compile::quantize_scaled(x, s, "tensor", fmt) -> q`` (static scale): one
``QuantizeLinear(x, s, zero_point)`` with the constant scale.

``fp8compile::scaled_mm(xq, xs, xg, wq, ws, wg, bias, out_dtype, acc, act, residual)``
(a ``residual2`` is added to ``residual`` in fp32 first)::

    xq ─ DequantizeLinear(xs) ───────────────────────────────────┐
    wq (N, K) FP8 initializer ─ DequantizeLinear(ws) ─ Transpose ─ MatMul ─ Add(bias)
                                                          ─ act ─ Add(residual) ─ Cast(out)

  Weight scales: scalar (``tensor``), ``axis=0`` with ``(N,)`` scales (``row``), or ``axis=1,
  block_size=128`` with the ``(ceil(N/128), ceil(K/128))`` block scales expanded over the 128
  rows of a block to ``(N, ceil(K/128))`` (ONNX blocks along one axis only; the expansion is a
  constant subgraph that the exporter's optimizer folds into one fp32 initializer, ~3% of the
  FP8 payload at K=N=4096).

Arithmetic mirrors :func:`fp8compile.numerics.compute_scale` (``max(amax, 1e-12) / fmax``, an
IEEE division) so scales, and hence FP8 payloads, are bit-identical to PyTorch's.
"""

from __future__ import annotations

import onnx
import torch

from .. import numerics as nx

__all__ = ["translation_table"]

_ONNX_FP8 = {"e4m3": onnx.TensorProto.FLOAT8E4M3FN, "e5m2": onnx.TensorProto.FLOAT8E5M2}
_F32 = onnx.TensorProto.FLOAT


def translation_table(opset: int, target: str = "ort") -> dict:
    """Translations of the fp8compile inference ops into ``ai.onnx`` opset ``opset``.

    Args:
        opset: 19..23; ``output_dtype`` and ``block_size`` need >= 21.
        target: ``"ort"`` (NaN/Inf guards as in numerics) or ``"tensorrt"`` (bare QDQ).
    """
    import onnxscript

    op = getattr(onnxscript, f"opset{opset}")
    guards = target != "tensorrt"

    def const_ints(*v):
        return op.Constant(value_ints=list(v))

    def const_f(v: float):
        return op.Constant(value_float=float(v))

    def zero_point(fmt: str, like=None):
        """FP8 zero point: a constant scalar, or zeros shaped like the (run-time) scale."""
        if like is None:
            return op.Constant(value=onnx.helper.make_tensor("zp", _ONNX_FP8[fmt], [], [0.0]))
        return op.Cast(op.Mul(like, const_f(0.0)), to=_ONNX_FP8[fmt])

    def quantize_linear(x, s, fmt: str, **axis):
        """``QuantizeLinear`` saturating to FP8, typed by ``output_dtype`` (opset >= 21) or,
        before opset 21 and for TensorRT (whose parser reads the type from it), by an FP8
        zero point: a constant scalar, or zeros shaped like a per-axis scale."""
        if not axis and (opset < 21 or not guards):
            return op.QuantizeLinear(x, s, zero_point(fmt), saturate=1)
        if opset >= 21:
            return op.QuantizeLinear(x, s, saturate=1, output_dtype=_ONNX_FP8[fmt], **axis)
        return op.QuantizeLinear(x, s, zero_point(fmt, s), saturate=1, **axis)

    def static_k(x) -> int | None:
        """The last dim of ``x`` when the exporter knows it (the feature dim usually is)."""
        shape = getattr(x, "shape", None)
        k = shape[-1] if shape is not None and len(shape) else None
        return k if isinstance(k, int) else None

    def last_dim(x):
        k = static_k(x)
        if k is not None:
            return const_ints(k)
        return op.Slice(op.Shape(x), const_ints(-1), const_ints(2**62))

    def rows_of(x):
        """``x (..., K)`` as ``(M, K)``."""
        k = static_k(x)
        if k is not None:
            return op.Reshape(x, const_ints(-1, k))
        return op.Reshape(x, op.Concat(const_ints(-1), last_dim(x), axis=0))

    def to_f32(x):
        if getattr(x, "dtype", None) == _F32:  # onnx_ir DataType is an IntEnum
            return x
        return op.Cast(x, to=_F32)

    def scale_of(amax, fmt: str, power_of_2: bool):
        # compute_scale: max(amax, AMAX_FLOOR) / fmax, a true division (not * 1/fmax).
        s = op.Div(op.Max(amax, const_f(nx.AMAX_FLOOR)), const_f(nx.Fp8Format(fmt).max))
        if power_of_2:
            # 2**ceil(log2 s), exactly: Log is approximate, so correct p by one step either
            # way (scales lie in [2e-15, 1e38], normal floats, where Pow(2, int) is exact).
            p = op.Pow(const_f(2.0), op.Ceil(op.Div(op.Log(s), const_f(0.6931471805599453))))
            p = op.Where(op.Less(p, s), op.Mul(p, const_f(2.0)), p)
            half = op.Mul(p, const_f(0.5))
            s = op.Where(op.GreaterOrEqual(half, s), half, p)
        return s

    def finite_abs(x):
        a = op.Abs(x)
        if not guards:
            return a
        # NaN < inf and inf < inf are false: non-finite values count as 0 (numerics.amax).
        return op.Where(op.Less(a, const_f(float("inf"))), a, const_f(0.0))

    def inf_to_nan(x):
        # E4M3FN has no Inf; numerics turns ±Inf into NaN where ONNX would saturate to ±448.
        return op.Where(op.IsInf(x), const_f(float("nan")), x) if guards else x

    def quantize(x, granularity: str, fmt: str, power_of_2: bool):
        x = to_f32(x)
        a = finite_abs(x)
        xv = inf_to_nan(x)
        if granularity == "tensor":
            s = scale_of(op.ReduceMax(a, keepdims=0), fmt, power_of_2)
            return quantize_linear(xv, s, fmt), s
        if granularity == "row":
            s = scale_of(op.ReduceMax(rows_of(a), const_ints(1), keepdims=1), fmt, power_of_2)
            q = quantize_linear(rows_of(xv), op.Reshape(s, const_ints(-1)), fmt, axis=0)
            return op.Reshape(q, op.Shape(x)), s
        if granularity == "group":
            k = static_k(x)
            rows = rows_of(a)
            if k is not None:
                # The common case: K known, pad only when it is not a whole number of groups.
                if k % nx.BLOCK:
                    rows = op.Pad(rows, const_ints(0, 0, 0, -k % nx.BLOCK))
                groups = op.Reshape(rows, const_ints(0, -1, nx.BLOCK))
            else:
                block = const_ints(nx.BLOCK)
                pad = op.Mod(op.Sub(block, op.Mod(last_dim(x), block)), block)
                rows = op.Pad(rows, op.Concat(const_ints(0, 0, 0), pad, axis=0))
                groups = op.Reshape(rows, const_ints(0, -1, nx.BLOCK))
            s = scale_of(op.ReduceMax(groups, const_ints(2), keepdims=0), fmt, power_of_2)
            q = quantize_linear(rows_of(xv), s, fmt, axis=1, block_size=nx.BLOCK)
            return op.Reshape(q, op.Shape(x)), s
        raise ValueError(
            f"ONNX export: activation granularity {granularity!r} has no translation; "
            "use 'tensor', 'row' or 'group'"
        )

    def quantize_scaled(x, scale, granularity: str, fmt: str):
        if granularity != "tensor":
            raise ValueError(
                f"ONNX export: static scales with granularity {granularity!r}; only one "
                "scale per tensor ('tensor') is supported"
            )
        return quantize_linear(inf_to_nan(to_f32(x)), scale, fmt)

    def dequant_act(xq, xs, granularity: str):
        if granularity == "tensor":
            return op.DequantizeLinear(xq, xs)
        if granularity == "row":
            x = op.DequantizeLinear(rows_of(xq), op.Reshape(xs, const_ints(-1)), axis=0)
        elif granularity == "group":
            x = op.DequantizeLinear(rows_of(xq), xs, axis=1, block_size=nx.BLOCK)
        else:
            raise ValueError(f"ONNX export: activation granularity {granularity!r} unsupported")
        return op.Reshape(x, op.Shape(xq))

    def dequant_weight_t(wq, ws, granularity: str):
        """``dequant(wq).T`` as ``DequantizeLinear`` of the transposed FP8 weight ``(K, N)``.

        The Transpose acts on the FP8 initializer, which the exporter's optimizer folds into a
        ``(K, N)`` FP8 initializer: the file holds ``W.T`` in FP8 and ``DequantizeLinear``
        feeds ``MatMul`` directly (the pattern TensorRT fuses into an FP8 GEMM).
        """
        wt = op.Transpose(wq, perm=[1, 0])
        if granularity == "tensor":
            return op.DequantizeLinear(wt, ws)
        if granularity == "row":
            return op.DequantizeLinear(wt, op.Reshape(ws, const_ints(-1)), axis=1)
        if granularity == "block":
            # (NB, KB) -> (NB, 128, KB) -> (NB*128, KB) -> first N rows -> (KB, N).
            nb_kb = op.Shape(ws)
            big = op.Expand(op.Unsqueeze(ws, const_ints(1)),
                            op.Concat(op.Slice(nb_kb, const_ints(0), const_ints(1)),
                                      const_ints(nx.BLOCK),
                                      op.Slice(nb_kb, const_ints(1), const_ints(2)), axis=0))
            per_row = op.Reshape(big, op.Concat(const_ints(-1),
                                                op.Slice(nb_kb, const_ints(1), const_ints(2)),
                                                axis=0))
            n = op.Slice(op.Shape(wq), const_ints(0), const_ints(1))
            per_row = op.Slice(per_row, const_ints(0), n, const_ints(0))
            return op.DequantizeLinear(wt, op.Transpose(per_row, perm=[1, 0]), axis=0,
                                       block_size=nx.BLOCK)
        raise ValueError(f"ONNX export: weight granularity {granularity!r} unsupported")

    def scaled_mm(xq, xs, x_granularity: str, wq, ws, w_granularity: str, bias, out_dtype: int,
                  accumulation: str, activation: str, residual, residual2=None):
        # accumulation: ONNX MatMul on dequantized fp32 operands is the exact-fp32 reference
        # (what "precise" approximates); there is nothing to choose.
        x = dequant_act(xq, xs, x_granularity)
        y = op.MatMul(x, dequant_weight_t(wq, ws, w_granularity))
        if bias is not None:
            y = op.Add(y, to_f32(bias))
        if activation == "gelu":
            y = op.Gelu(y) if opset >= 20 else op.Mul(
                op.Mul(y, const_f(0.5)),
                op.Add(const_f(1.0), op.Erf(op.Div(y, const_f(2.0**0.5)))))
        elif activation == "silu":
            y = op.Mul(y, op.Sigmoid(y))
        elif activation == "relu":
            y = op.Relu(y)
        elif activation != "none":
            raise ValueError(f"ONNX export: epilogue activation {activation!r} unsupported")
        if residual2 is not None:  # a residual stream's two terms, summed in fp32
            residual = op.Add(to_f32(residual), to_f32(residual2))
        if residual is not None:
            y = op.Add(y, to_f32(residual))
        return y if out_dtype == _F32 else op.Cast(y, to=out_dtype)

    ops = torch.ops.fp8compile
    return {
        ops.quantize.default: quantize,
        ops.quantize_scaled.default: quantize_scaled,
        ops.scaled_mm.default: scaled_mm,
    }
