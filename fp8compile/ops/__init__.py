"""``torch.library`` custom ops that the rewritten graph calls.

Each op has a fake (meta) implementation for tracing, a reference implementation built on
:mod:`fp8compile.numerics` (CPU, and any device without a kernel), and a CUDA implementation
that dispatches to the Triton kernels in :mod:`fp8compile.kernels` when they support the case.

========================================  ==================================================
op                                         meaning
========================================  ==================================================
``fp8compile::quantize``                   dynamic quantization ``x -> (q, scale)``
``fp8compile::quantize_scaled``            quantization with a given scale (static and delayed
                                           scaling, the tensorwise backward's ``Wᵀ``)
``fp8compile::quantize_from_amax``         tensorwise with the scale of a given amax, and
                                           ``amax(x)`` from the same read (delayed scaling)
``fp8compile::amax_unless``                ``amax(x)`` while an amax history is all zero; on
                                           the GPU 0 without reading ``x`` otherwise
``fp8compile::quantize_delayed``           tensorwise, scale from an amax history it updates
``fp8compile::requantize_t``               FP8 ``(M, K)`` → FP8 of its transpose, rescaled
``fp8compile::quantize_dual``              1x128 groups of ``x`` and of ``x.t()``, one read
``fp8compile::quantize_tensor_t``          tensorwise ``x`` and its transpose, one read
``fp8compile::scaled_mm``                  ``dequant(xq) @ dequant(wq).T`` (+bias, act, residual)
``fp8compile::scaled_mm_quantized``        the same, cast to FP8 with a given scale (static
                                           scaling; on Hopper in the GEMM's epilogue)
``fp8compile::scaled_mm_swiglu_quantize``  a blockwise gate/up GEMM's ``silu(gate) * up``,
                                           quantized in 1x128 groups; ``(q, scale)``
``fp8compile::quantize_grouped_weight``    a grouped GEMM's ``(G, N, K)`` weight, each group's
                                           matrix quantized as ``quantize`` would
``fp8compile::scaled_grouped_mm``          rows of ``x`` grouped by ``offs``, each group times
                                           its own FP8 weight (mixture-of-experts experts)
``fp8compile::linear``                     ``x @ w.T + b`` quantizing both sides, with autograd
                                           (training: FP8 forward and both backward GEMMs);
                                           also returns the FP8 input and the weight scale
``fp8compile::linear_q``                   the same for an input quantized once elsewhere
                                           (shared by q/k/v or gate/up); ``(y, ws)``
``fp8compile::linear_w``                   the same with the weight's FP8 ``W`` and ``Wᵀ``
                                           given too (training weight cache)
``fp8compile::linear_delayed``             tensorwise ``linear`` with delayed scales: x, W
                                           and dY from amax histories the graph updates
``fp8compile::linear_delayed_q``           the same for an input quantized once elsewhere
``fp8compile::push_amax``                  shift an amax history and write the newest amax
``fp8compile::quantize_history``           delayed scaling's cast (every x, W and dY; a
                                           shared input's optionally fused into RMSNorm,
                                           residual add + RMSNorm, or SiLU·mul)
``fp8compile::quantize_history_t``         the same of a 2-D dY, with its transpose for dW
                                           from the same read
``fp8compile::matmul``                     ``a @ b`` of two activations, both quantized
``fp8compile::rmsnorm_quantize``           RMSNorm with the quantization fused in (and,
                                           with ``residual=``, the residual add before it)
``fp8compile::silu_mul_quantize``          ``silu(gate) * up`` with the quantization fused in
``fp8compile::quantize_static``            static scaling's cast of ``x``, or fused into RMSNorm,
                                           residual add + RMSNorm, or SiLU·mul; one pass
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

from . import fused, gemm, linear, quant, training_state  # noqa: F401  (registration happens on import)
from ._common import ACTIVATIONS, check_fp8_input, scale_shape
from .gemm import scaled_mm_reference
from .linear import fp8_mm

__all__ = ["ACTIVATIONS", "check_fp8_input", "fp8_mm", "scale_shape", "scaled_mm_reference"]
