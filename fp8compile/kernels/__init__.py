"""Triton kernels behind the fp8compile ops (CUDA).

``available(t)`` says whether the Triton path serves tensors like ``t``; the ops in
:mod:`fp8compile.ops` fall back to the reference in :mod:`fp8compile.numerics` otherwise.

==========================  ===========================================================
module                      kernels
==========================  ===========================================================
``quant.py``                dynamic quantization, every granularity (also weights)
``gemm.py``                 FP8 GEMM, three recipes, fused epilogue, split-K for decode
``fused.py``                RMSNorm -> quant and SiLU(gate)*up -> quant
``grouped.py``              FP8 grouped GEMM (mixture-of-experts experts), three recipes
``tuning.py``               Hopper tile configs by M bucket, split-K heuristic
==========================  ===========================================================

Set ``FP8COMPILE_DISABLE_TRITON=1`` to force the reference path.  Tests call the launchers
directly on CPU tensors under ``TRITON_INTERPRET=1``.

Example::

    >>> from fp8compile import kernels
    >>> from fp8compile.numerics import Granularity
    >>> x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
    >>> xq, xs = kernels.quantize(x, Granularity.GROUP, Fp8Format.E4M3, False)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..numerics import Fp8Format, Granularity

__all__ = [
    "available",
    "quantize",
    "rmsnorm_quantize",
    "scaled_mm",
    "silu_mul_quantize",
]

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def available(t: torch.Tensor) -> bool:
    """True when ``t`` is on a CUDA GPU with FP8 tensor cores (compute capability >= 8.9:
    Ada, Hopper and later), Triton is importable, and ``FP8COMPILE_DISABLE_TRITON`` is unset.
    Elsewhere the ops run the reference in :mod:`fp8compile.numerics` (correct, slow)."""
    return (
        t.is_cuda
        and _HAS_TRITON
        and os.environ.get("FP8COMPILE_DISABLE_TRITON") != "1"
        and _fp8_capable(t.device.index if t.device.index is not None else 0)
    )


@functools.cache
def _fp8_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def quantize(
    x: torch.Tensor, granularity: Granularity, fmt: Fp8Format, power_of_2: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`fp8compile.numerics.quantize`, in one or two Triton launches."""
    from .quant import quantize as _quantize

    return _quantize(x, granularity, fmt, power_of_2)


def scaled_mm(xq, xs, x_granularity, wq, ws, w_granularity, bias, out_dtype, accumulation,
              activation, residual, residual2=None):
    """Same result as :func:`fp8compile.ops.scaled_mm_reference`, through the Triton GEMM or,
    where it is faster for the shape and computes the same function, cuBLAS (see
    :mod:`.select`).

    Cases the kernel does not serve (mixed E4M3 x E5M2 operands, K == 0) fall back to the
    reference.
    """
    from . import gemm, select
    from .gemm import scaled_mm as _scaled_mm

    xg, wg = Granularity(x_granularity), Granularity(w_granularity)

    def triton_fn():
        from ..ops._inline import pinned

        return _scaled_mm(xq, xs, xg, wq, ws, wg, bias, out_dtype, accumulation, activation,
                          pinned(residual), residual2=pinned(residual2))

    cublas_fn = None
    if select.cublas_unsupported(xq, xg, wq, wg, out_dtype, activation, residual) is None:
        def cublas_fn():
            return select.cublas_scaled_mm(xq, xs, xg, wq, ws, wg, bias, out_dtype,
                                           accumulation, activation, residual, residual2)
    try:
        gluon = gemm.gluon_serves(xq, xs, xg, wq, ws, wg, out_dtype, activation, residual,
                                  accumulation, residual2)
        key = select.gemm_key(xq, xg, wq, accumulation, out_dtype, gluon, activation,
                              residual, residual2)
        if select.choose(key, triton_fn, cublas_fn) == "cublas":
            return cublas_fn()
        return triton_fn()
    except NotImplementedError:
        from ..ops import scaled_mm_reference

        return scaled_mm_reference(xq, xs, str(x_granularity), wq, ws, str(w_granularity),
                                   bias, out_dtype, activation, residual, residual2)


def rmsnorm_quantize(x, weight, eps, granularity, fmt, power_of_2, residual=None):
    """FP8 ``(q, scale)`` of RMSNorm(x) or RMSNorm(x + residual) (fp32 inside); see
    :mod:`.fused`."""
    from .fused import rmsnorm_quantize as _f

    return _f(x, weight, eps, granularity, fmt, power_of_2, residual)


def silu_mul_quantize(gate, up, granularity, fmt, power_of_2):
    """FP8 ``(q, scale)`` of silu(gate) * up (fp32 inside); see :mod:`.fused`."""
    from .fused import silu_mul_quantize as _f

    return _f(gate, up, granularity, fmt, power_of_2)
