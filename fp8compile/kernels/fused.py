"""Quantization fused into its producer: the high-precision activation is never written.

``rmsnorm_quantize`` reads ``x`` (bf16/fp16/fp32), computes RMSNorm in fp32 and writes FP8 +
scales: one read of ``x`` and a write of 1 byte per element instead of write-bf16 (2 B) +
read-bf16 (2 B) + write-fp8 (1 B).  ``silu_mul_quantize`` does the same for the SwiGLU
product ``silu(gate) * up``.  Both reuse
:func:`~fp8compile.kernels.quant._quantize_kernel`
through its ``PRODUCER`` switch, so the scale and cast logic exists once.

The references are the compositions with :func:`fp8compile.numerics.quantize` (below);
they agree with the kernels up to fp32 rounding of the producer (rsqrt, exp), so the scales
match to ~1e-6 relative rather than bit for bit.
"""

from __future__ import annotations

import torch

from .. import numerics as nx
from ..numerics import Fp8Format, Granularity
from .quant import (
    NORM_PRODUCERS,
    PRODUCER_ADD_RMSNORM,
    PRODUCER_NONE,
    PRODUCER_RMSNORM,
    PRODUCER_SILU_MUL,
    check_quantize_args,
    quantize_rows,
)

__all__ = [
    "quantize_history",
    "quantize_static",
    "rmsnorm_quantize",
    "silu_mul_quantize",
]

PRODUCERS = {"none": PRODUCER_NONE, "rmsnorm": PRODUCER_RMSNORM, "silu_mul": PRODUCER_SILU_MUL,
             "add_rmsnorm": PRODUCER_ADD_RMSNORM}


def _check_activation_gran(granularity: Granularity, what: str) -> None:
    if granularity is Granularity.BLOCK:
        raise ValueError(
            f"{what}: granularity 'block' is for weights; fused producers quantize "
            "activations with 'tensor', 'row' or 'group'"
        )


def rmsnorm_quantize(
    x: torch.Tensor, weight: torch.Tensor, eps: float, granularity: Granularity,
    fmt: Fp8Format = Fp8Format.E4M3, power_of_2: bool = False,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``(q, scale)`` of ``x * rsqrt(mean(x², -1) + eps) * weight``, computed in fp32;
    with ``residual`` (x's shape), of the norm of ``x + residual`` added in fp32, so a
    residual stream's add costs no pass of its own.

    Example::

        >>> q, s = rmsnorm_quantize(h, norm.weight, 1e-6, Granularity.GROUP)  # doctest: +SKIP
    """
    granularity, fmt = check_quantize_args(x, granularity, fmt, "rmsnorm_quantize input")
    _check_activation_gran(granularity, "rmsnorm_quantize")
    if residual is not None:
        check_quantize_args(residual, granularity, fmt, "rmsnorm_quantize residual")
    nx.check_norm_shapes(x, weight, residual)
    if x.dim() == 0 or x.numel() == 0:
        return nx.rmsnorm_quantize(x, weight, eps, granularity, fmt, power_of_2, residual)
    return quantize_rows(x, granularity, fmt, power_of_2,
                         producer=PRODUCER_RMSNORM if residual is None else PRODUCER_ADD_RMSNORM,
                         x2=residual, norm_weight=weight.contiguous(), eps=eps)


def silu_mul_quantize(
    gate: torch.Tensor, up: torch.Tensor, granularity: Granularity,
    fmt: Fp8Format = Fp8Format.E4M3, power_of_2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``(q, scale)`` of ``silu(gate) * up``, computed in fp32.

    Example::

        >>> q, s = silu_mul_quantize(g, u, Granularity.GROUP)  # doctest: +SKIP
    """
    granularity, fmt = check_quantize_args(gate, granularity, fmt, "silu_mul_quantize gate")
    check_quantize_args(up, granularity, fmt, "silu_mul_quantize up")
    _check_activation_gran(granularity, "silu_mul_quantize")
    if gate.shape != up.shape:
        raise ValueError(
            f"silu_mul_quantize: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have "
            "the same shape (split a fused gate_up projection first)"
        )
    if gate.dim() == 0 or gate.numel() == 0:
        return nx.silu_mul_quantize(gate, up, granularity, fmt, power_of_2)
    return quantize_rows(gate, granularity, fmt, power_of_2, producer=PRODUCER_SILU_MUL, x2=up)


def _producer_args(x, x2, norm_weight, eps, producer) -> dict:
    """``quantize_rows``'s producer arguments for a producer named as in
    :func:`fp8compile.numerics.produce` (a norm without weight gets ones)."""
    code = PRODUCERS[producer]
    return dict(producer=code, x2=x2, eps=eps,
                norm_weight=(None if code not in NORM_PRODUCERS else
                             norm_weight.contiguous() if norm_weight is not None
                             else x.new_ones(x.shape[-1])))


def quantize_history(
    x: torch.Tensor, x2: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
    producer: str, history: torch.Tensor, fmt: Fp8Format = Fp8Format.E4M3,
    power_of_2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Delayed scaling's tensorwise cast of ``x`` or of its producer's output (``producer``
    ``"none"``, ``"rmsnorm"`` with ``norm_weight`` and ``eps``, ``"add_rmsnorm"`` the same of
    ``x + x2``, ``"silu_mul"`` with ``x2`` as up): ``(q, scale, amax)`` with the scale of
    ``history``'s max (this call's amax while the history is all zero) and the finite amax
    of what was cast.

    Two launches and no others (``quantize_rows(history=...)``): the amax, which returns at
    once on the device once the history holds a value, and the cast, which takes the scale
    from the history's max (or that amax) and records x's amax as it goes.
    """
    fmt = Fp8Format(fmt)
    check_quantize_args(x, Granularity.TENSOR, fmt, "quantize_history input")
    kw = _producer_args(x, x2, norm_weight, eps, producer)
    hist = history.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty(1, dtype=torch.float32, device=x.device)
    q, s = quantize_rows(x, Granularity.TENSOR, fmt, power_of_2, history=hist, amax_out=out,
                         **kw)
    return q, s, out.reshape(())


def quantize_static(
    x: torch.Tensor, x2: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
    producer: str, scale: torch.Tensor, fmt: Fp8Format = Fp8Format.E4M3,
) -> torch.Tensor:
    """Static scaling's tensorwise cast of ``x`` or of its producer's output (``producer`` as
    for :func:`quantize_history`) with the given ``scale`` (one fp32 element on x's device):
    one launch, one pass over the inputs."""
    fmt = Fp8Format(fmt)
    check_quantize_args(x, Granularity.TENSOR, fmt, "quantize_static input")
    s = scale.reshape(1).to(device=x.device, dtype=torch.float32)
    return quantize_rows(x, Granularity.TENSOR, fmt, False, given_scale=s,
                         **_producer_args(x, x2, norm_weight, eps, producer))[0]
