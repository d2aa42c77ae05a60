"""Reference FP8 numerics: the definition every kernel and op is tested against.

Conventions (SPEC §1):

* ``x ≈ q * s`` where ``s`` is a *dequantization* scale in fp32, ``s = amax / fmax``.
* Quantize is ``q = saturate(round_to_nearest_even(x / s))``: finite values beyond ±fmax clamp
  to ±fmax, never NaN.
* ``amax`` is taken over the *finite* values of a group.  NaN stays NaN in its own element and
  ±Inf becomes NaN (E4M3FN has no Inf) or ±Inf (E5M2), so a bad value damages only the output
  rows that read it and never the scale of its neighbours.
* ``amax == 0`` gives the finite scale ``AMAX_FLOOR / fmax`` and an all-zero payload.
* Optional power-of-two scales round ``s`` *up* to ``2**ceil(log2(s))`` so that rescaling is
  exact and no value saturates because of the rounding.

Granularities:

========== ====================================== =================================
recipe     activation ``x (M, K)``                 weight ``w (N, K)``
========== ====================================== =================================
tensorwise one scale, shape ``()``                 one scale, shape ``()``
rowwise    per token, shape ``(M, 1)``             per output channel, ``(N, 1)``
blockwise  per 1×128 group, ``(M, ceil(K/128))``   per 128×128 block,
           stored M-contiguous (strides ``(1,M)``) ``(ceil(N/128), ceil(K/128))``
========== ====================================== =================================

Partial groups at the end of K (or N) are allowed: their amax is taken over the elements that
exist.  The blockwise activation scales are stored M-contiguous because the GEMM reads, for one
K-block, the scales of ``BLOCK_M`` consecutive rows.

Example::

    >>> import torch
    >>> from fp8compile import numerics as nx
    >>> x = torch.randn(4, 256)
    >>> q, s = nx.quantize(x, nx.Granularity.GROUP)
    >>> err = (nx.dequantize(q, s, nx.Granularity.GROUP) - x).norm() / x.norm()
    >>> bool(err < 0.05)
    True
"""

from __future__ import annotations

import enum
import math

import torch

__all__ = [
    "AMAX_FLOOR",
    "BLOCK",
    "FP8_FORMATS",
    "Fp8Format",
    "PRODUCERS",
    "SWIGLU_RUN",
    "Granularity",
    "amax",
    "cast_to_fp8",
    "check_swiglu_rows",
    "compute_scale",
    "dequantize",
    "fp8_linear_reference",
    "m_contiguous",
    "produce",
    "quantize",
    "quantize_dual",
    "quantize_with_scale",
    "requantize_t",
    "residual_sum",
    "rmsnorm_quantize",
    "scaled",
    "silu_mul_quantize",
    "sqnr",
    "swiglu",
    "swiglu_in_groups",
]

BLOCK = 128
"""Group length along K (and block side for weights) of the blockwise recipe."""

AMAX_FLOOR = 1e-12
"""amax below this is treated as this, so an all-zero group gets a finite scale."""


class Fp8Format(enum.StrEnum):
    """The two OCP FP8 formats PyTorch exposes."""

    E4M3 = "e4m3"
    E5M2 = "e5m2"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self is Fp8Format.E4M3 else torch.float8_e5m2

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @classmethod
    def from_dtype(cls, dtype: torch.dtype) -> "Fp8Format":
        for fmt in cls:
            if fmt.dtype == dtype:
                return fmt
        raise ValueError(
            f"dtype={dtype} is not an FP8 format; use torch.float8_e4m3fn or torch.float8_e5m2"
        )


FP8_FORMATS = {fmt.dtype: fmt for fmt in Fp8Format}


class Granularity(enum.StrEnum):
    """How many elements share one scale."""

    TENSOR = "tensor"  # one scale for the whole tensor
    ROW = "row"  # one scale per row (token for activations, output channel for weights)
    GROUP = "group"  # 1x128 along the last dim (activations, blockwise recipe)
    BLOCK = "block"  # 128x128 tiles of a 2-D tensor (weights, blockwise recipe)


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    x = x.float().abs()
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def amax(x: torch.Tensor, granularity: Granularity, block: int = BLOCK) -> torch.Tensor:
    """Max of |x| over the finite values of each scale group.

    ``x`` is ``(..., K)``; leading dims are flattened into rows.  Returns the logical scale
    shape of the table in the module docstring (contiguous; :func:`quantize` fixes layout).
    """
    a = _finite_abs(x)
    if granularity is Granularity.TENSOR:
        return a.amax() if a.numel() else a.new_zeros(())
    k = a.shape[-1]
    rows = a.reshape(-1, k)
    if granularity is Granularity.ROW:
        if k == 0:
            return rows.new_zeros(rows.shape[0], 1)
        return rows.amax(dim=1, keepdim=True)
    kb = math.ceil(k / block)
    padded = torch.nn.functional.pad(rows, (0, kb * block - k))
    if granularity is Granularity.GROUP:
        return padded.view(rows.shape[0], kb, block).amax(dim=2)
    if granularity is Granularity.BLOCK:
        if x.dim() != 2:
            raise ValueError(
                f"128x128 block scaling needs a 2-D weight, got shape {tuple(x.shape)}; "
                "reshape it to (out_features, in_features) first"
            )
        n = rows.shape[0]
        nb = math.ceil(n / block)
        padded = torch.nn.functional.pad(padded, (0, 0, 0, nb * block - n))
        return padded.view(nb, block, kb, block).amax(dim=(1, 3))
    raise AssertionError(granularity)


def compute_scale(
    amax_: torch.Tensor, fmt: Fp8Format = Fp8Format.E4M3, power_of_2: bool = False
) -> torch.Tensor:
    """Dequantization scale ``s = max(amax, AMAX_FLOOR) / fmax`` (fp32), optionally 2**ceil."""
    a = amax_.float().clamp(min=AMAX_FLOOR)
    # Divide by a tensor, not a Python float: CUDA computes ``t / scalar`` as
    # ``t * (1 / scalar)``, one ulp off the IEEE quotient on about half the scales.
    s = a / torch.full_like(a, fmt.max)
    if power_of_2:
        # Exact: s = m * 2**e with m in [0.5, 1); s is a power of two iff m == 0.5.
        # (exp2(ceil(log2(s))) can round *down* for s just above a power of two.)
        m, e = torch.frexp(s)
        s = torch.ldexp(torch.ones_like(s), torch.where(m == 0.5, e - 1, e))
    return s


def cast_to_fp8(y: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of already-scaled fp32 values.

    Finite values clamp to ±fmax.  NaN stays NaN; ±Inf becomes NaN in E4M3FN (which has no
    Inf) and stays ±Inf in E5M2.
    """
    y = y.float()
    finite = torch.isfinite(y)
    sat = y.clamp(-fmt.max, fmt.max)
    if fmt is Fp8Format.E4M3:
        out = torch.where(finite, sat, torch.full_like(y, float("nan")))
    else:
        out = torch.where(finite, sat, y)
    return out.to(fmt.dtype)


def _apply_scale(
    rows: torch.Tensor, scale: torch.Tensor, granularity: Granularity, block: int, divide: bool
) -> torch.Tensor:
    """``rows / scale`` (or ``rows * scale``) with ``scale`` broadcast over its groups.

    ``rows`` is the fp32 ``(R, K)`` view of the data.  Each element's scale is gathered by
    index (column // block, row // block).  Neither ``repeat_interleave`` nor pad-view-slice:
    Inductor (torch 2.13, CPU) compiled both, fused into a multiply, into kernels that
    intermittently read uninitialized memory when K was not a multiple of the block.
    """
    r, k = rows.shape
    s = scale.float()

    def op(a, b):
        return a / b if divide else a * b

    if granularity is Granularity.TENSOR:
        return op(rows, s.reshape(1, 1))
    if granularity is Granularity.ROW:
        return op(rows, s.reshape(r, 1))
    cols = torch.arange(k, device=rows.device) // block
    if granularity is Granularity.GROUP:
        return op(rows, s.reshape(r, -1)[:, cols])
    row_blocks = torch.arange(r, device=rows.device) // block
    return op(rows, s[row_blocks][:, cols])


def scaled(
    x: torch.Tensor, scale: torch.Tensor, granularity: Granularity, block: int = BLOCK
) -> torch.Tensor:
    """``x / scale`` in fp32 as the ``(rows, K)`` view, before the FP8 cast (what saturates and
    what flushes to zero is decided on these values)."""
    k = x.shape[-1] if x.dim() else 1
    rows = x.contiguous().reshape(-1, k).float()
    return _apply_scale(rows, scale, granularity, block, True)


def quantize_with_scale(
    x: torch.Tensor,
    scale: torch.Tensor,
    granularity: Granularity,
    fmt: Fp8Format = Fp8Format.E4M3,
    block: int = BLOCK,
) -> torch.Tensor:
    """``saturate(rne(x / scale))`` with a given scale (static or delayed scaling)."""
    # scaled() makes the input contiguous: a permuted input can reshape to a strided view, and
    # the payload must come out row-major (the GEMM and the ops' fake impls assume it).
    return cast_to_fp8(scaled(x, scale, granularity, block), fmt).reshape(x.shape)


def quantize(
    x: torch.Tensor,
    granularity: Granularity,
    fmt: Fp8Format = Fp8Format.E4M3,
    power_of_2: bool = False,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic quantization: returns ``(q, scale)`` with ``x ≈ q * scale``.

    ``q`` has ``x``'s shape and ``fmt``'s dtype.  ``scale`` is fp32 with the shape of the
    module table; GROUP scales are M-contiguous (strides ``(1, M)``).
    """
    s = compute_scale(amax(x, granularity, block), fmt, power_of_2)
    q = quantize_with_scale(x, s, granularity, fmt, block)
    if granularity is Granularity.GROUP:
        s = m_contiguous(s)
    return q, s


def quantize_by_rows(
    x: torch.Tensor,
    granularity: Granularity,
    fmt: Fp8Format = Fp8Format.E4M3,
    power_of_2: bool = False,
    rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` of a 2-D ``x``, ``rows`` rows at a time (a multiple of 128; by default
    as many as hold ~2**25 elements): the same bits, with the fp32 temporaries of one slice
    rather than of all of ``x``.  Tensor scaling takes the largest of the slices' amaxes
    first."""
    if rows is None and x.dim() == 2:
        rows = max(BLOCK, (1 << 25) // max(1, x.shape[1]) // BLOCK * BLOCK)
    if rows is not None and (rows <= 0 or rows % BLOCK):
        raise ValueError(f"quantize_by_rows: rows={rows} must be a positive multiple of {BLOCK}")
    if rows is None or x.shape[0] <= rows:
        return quantize(x, granularity, fmt, power_of_2)
    slices = x.split(rows)
    if granularity is Granularity.TENSOR:
        top = torch.stack([amax(piece, granularity) for piece in slices]).amax()
        s = compute_scale(top, fmt, power_of_2)
        return torch.cat([quantize_with_scale(p, s, granularity, fmt) for p in slices]), s
    parts = [quantize(piece, granularity, fmt, power_of_2) for piece in slices]
    s = torch.cat([p[1] for p in parts])
    return (torch.cat([p[0] for p in parts]),
            m_contiguous(s) if granularity is Granularity.GROUP else s)


def m_contiguous(s: torch.Tensor) -> torch.Tensor:
    """``s (M, KB)`` stored with strides ``(1, M)``, also when a dim is 1 (where
    ``.t().contiguous().t()`` would keep ``s``'s own strides)."""
    out = torch.empty_strided(s.shape, (1, max(1, s.shape[0])), dtype=s.dtype, device=s.device)
    return out.copy_(s)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    granularity: Granularity,
    block: int = BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``q * scale`` in fp32, broadcast by granularity, returned as ``dtype``."""
    k = q.shape[-1] if q.dim() else 1
    rows = q.reshape(-1, k).float()
    return _apply_scale(rows, scale, granularity, block, False).reshape(q.shape).to(dtype)


def quantize_dual(
    x: torch.Tensor, fmt: Fp8Format = Fp8Format.E4M3, power_of_2: bool = False,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1x128-group quantization of a 2-D ``x (M, N)`` along both axes:
    ``quantize(x, GROUP) + quantize(x.t(), GROUP)``.

    The output gradient of a blockwise linear feeds two GEMMs: ``dX = dY W`` wants it grouped
    along N, ``dW = dYᵀ X`` wants ``dYᵀ`` grouped along M.
    """
    return (*quantize(x, Granularity.GROUP, fmt, power_of_2, block),
            *quantize(x.t(), Granularity.GROUP, fmt, power_of_2, block))


def requantize_t(
    q: torch.Tensor,
    scale: torch.Tensor,
    granularity: Granularity,
    to: Granularity,
    fmt: Fp8Format = Fp8Format.E4M3,
    power_of_2: bool = False,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ``(q, scale)`` of ``(M, K)`` → FP8 of its transpose ``(K, M)``, scaled by ``to``.

    The weight-gradient GEMM ``dW = dYᵀ X`` needs ``Xᵀ`` scaled along M, but training keeps
    only the forward's FP8 ``X`` (scaled along K).  The dequantized values are kept in fp32
    (no 16-bit rounding in between) and quantized again.
    """
    x = dequantize(q.reshape(-1, q.shape[-1]), scale, granularity, block)
    return quantize(x.t(), to, fmt, power_of_2, block)


def fp8_linear_reference(
    xq: torch.Tensor,
    xs: torch.Tensor,
    x_granularity: Granularity,
    wq: torch.Tensor,
    ws: torch.Tensor,
    w_granularity: Granularity,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = BLOCK,
) -> torch.Tensor:
    """``y = dequant(xq) @ dequant(wq).T + bias`` with exact products and fp32 accumulation.

    This is the ideal the kernels approximate: a tensor-core GEMM with promotion every
    128 elements of K differs from it only by fp32 summation order.
    """
    x = dequantize(xq, xs, x_granularity, block)
    w = dequantize(wq, ws, w_granularity, block)
    y = x.reshape(-1, x.shape[-1]) @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*xq.shape[:-1], wq.shape[0]).to(out_dtype)


def quantize_grouped_weight(
    w: torch.Tensor,
    granularity: Granularity,
    fmt: Fp8Format = Fp8Format.E4M3,
    power_of_2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A grouped GEMM's weight ``(E, N, K)`` (one ``(N, K)`` matrix per group, as a mixture of
    experts' expert projection) quantized one group at a time: ``q`` is ``(E, N, K)`` and
    ``scale`` stacks each group's :func:`quantize_by_rows` scale along a leading dim
    (tensor: ``(E,)``, row: ``(E, N, 1)``, block: ``(E, ceil(N/128), ceil(K/128))``)."""
    if w.dim() != 3:
        raise ValueError(f"quantize_grouped_weight: w has shape {tuple(w.shape)}; it must be "
                         "(groups, N, K)")
    if granularity is Granularity.GROUP:
        raise ValueError("quantize_grouped_weight: 1x128 groups are for activations; a weight "
                         "takes tensor, row or block scales")
    parts = [quantize_by_rows(w[g], granularity, fmt, power_of_2) for g in range(w.shape[0])]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])


def check_grouped_operands(xq: torch.Tensor, wq: torch.Tensor, offs: torch.Tensor) -> None:
    """Raise unless a grouped GEMM's operands are laid out as it takes them: FP8 ``xq (S, K)``
    and ``wq (G, N, K)``, ``offs`` int32 ``(G,)`` (its values are not read)."""
    if xq.dtype not in FP8_FORMATS or wq.dtype not in FP8_FORMATS:
        raise ValueError(f"scaled_grouped_mm takes FP8 operands, got {xq.dtype} and {wq.dtype}; "
                         "quantize them with fp8compile.quantize / quantize_grouped_weight")
    if xq.dim() != 2 or wq.dim() != 3 or xq.shape[1] != wq.shape[2]:
        raise ValueError(f"scaled_grouped_mm: x {tuple(xq.shape)} and w {tuple(wq.shape)} must "
                         "be (S, K) and (groups, N, K)")
    if offs.dim() != 1 or offs.dtype != torch.int32 or offs.numel() != wq.shape[0]:
        raise ValueError(f"grouped GEMM: offs is {offs.dtype} {tuple(offs.shape)}; it must be "
                         f"int32 ({wq.shape[0]},), the cumulative row count at each group's end")


def check_group_offsets(offs: torch.Tensor, rows: int) -> None:
    """Raise unless the group ends ``offs`` are non-decreasing and at most ``rows`` (reads
    the values: a host sync on a GPU)."""
    ends = offs.tolist()
    if any(b < a for a, b in zip([0] + ends, ends)) or (ends and ends[-1] > rows):
        raise ValueError(f"grouped GEMM: offs {ends} must be non-decreasing from 0 and at most "
                         f"the {rows} rows of x")


def fp8_grouped_linear_reference(
    xq: torch.Tensor,
    xs: torch.Tensor,
    x_granularity: Granularity,
    wq: torch.Tensor,
    ws: torch.Tensor,
    w_granularity: Granularity,
    offs: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Grouped :func:`fp8_linear_reference`: rows ``offs[g-1]:offs[g]`` of ``x (S, K)`` times
    group ``g``'s weight ``wq[g] (N, K)`` (scales as :func:`quantize_grouped_weight` stacks
    them); rows past ``offs[-1]`` are zero, as no group claims them."""
    check_grouped_operands(xq, wq, offs)
    check_group_offsets(offs, xq.shape[0])
    y = torch.zeros(xq.shape[0], wq.shape[1], dtype=torch.float32, device=xq.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            s = xs if x_granularity is Granularity.TENSOR else xs[start:end]
            y[start:end] = fp8_linear_reference(xq[start:end], s, x_granularity, wq[g], ws[g],
                                                w_granularity, None, torch.float32)
        start = end
    return y.to(out_dtype)


def rmsnorm_quantize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    granularity: Granularity,
    fmt: Fp8Format = Fp8Format.E4M3,
    power_of_2: bool = False,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize(x * rsqrt(mean(x², -1) + eps) * weight)`` with the norm in fp32.

    The fused producer of the blockwise recipe: the normed activation is never rounded to the
    model dtype before quantization.  With ``residual`` (x's shape) the norm is of
    ``x + residual``, added in fp32 (a residual stream's add fused in, as Inductor fuses it
    into a norm: the sum is not rounded to the model dtype either).
    """
    if residual is not None:
        x = x.float() + residual.float()
    return quantize(rmsnorm_fp32(x, weight, eps), granularity, fmt, power_of_2)


def check_norm_shapes(x: torch.Tensor, weight: torch.Tensor | None,
                      residual: torch.Tensor | None) -> None:
    """The shapes a fused RMSNorm takes: ``weight`` (when given) of x's last dim, and
    ``residual`` (when given) of x's own shape."""
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(
            f"rmsnorm_quantize: weight shape {tuple(weight.shape)} must be ({x.shape[-1]},), "
            "the last dim of x"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"rmsnorm_quantize: residual {tuple(residual.shape)} must have x's shape "
            f"{tuple(x.shape)} (broadcast it first)"
        )


def rmsnorm_fp32(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x², -1) + eps) * weight`` in fp32: what the fused producer quantizes."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight.float() if weight is not None else y


# What a fused quantization can cast besides its input itself (``produce``).
PRODUCERS = ("none", "rmsnorm", "add_rmsnorm", "silu_mul")


def produce(x: torch.Tensor, x2: torch.Tensor | None, norm_weight: torch.Tensor | None,
            eps: float, producer: str) -> torch.Tensor:
    """What a quantization fused into its producer casts, in fp32 as the fused kernels
    compute it: ``x`` itself (``"none"``, in its own dtype), ``RMSNorm(x) * norm_weight``
    (``"rmsnorm"``), the same of ``x + x2`` (``"add_rmsnorm"``) or ``silu(x) * x2``
    (``"silu_mul"``)."""
    if producer == "rmsnorm":
        return rmsnorm_fp32(x, norm_weight, eps)
    if producer == "add_rmsnorm":
        return rmsnorm_fp32(x.float() + x2.float(), norm_weight, eps)
    if producer == "silu_mul":
        return torch.nn.functional.silu(x.float()) * x2.float()
    if producer == "none":
        return x
    raise ValueError(f"produce: producer {producer!r} is not one of {PRODUCERS}")


def silu_mul_quantize(
    gate: torch.Tensor,
    up: torch.Tensor,
    granularity: Granularity,
    fmt: Fp8Format = Fp8Format.E4M3,
    power_of_2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize(silu(gate) * up)`` computed in fp32 (the SwiGLU producer of down_proj)."""
    y = torch.nn.functional.silu(gate.float()) * up.float()
    return quantize(y, granularity, fmt, power_of_2)


# The SwiGLU GEMM's weight: gate rows, then up rows, each a multiple of this many, so that
# each 128-wide output tile reads one 128-row block of gate and the matching one of up (and
# their own 128x128 weight scale blocks).
SWIGLU_RUN = 128


def check_swiglu_rows(n: int, who: str = "scaled_mm") -> None:
    """Raise unless ``n`` weight rows can hold gate then up rows, each a multiple of
    :data:`SWIGLU_RUN` (what a GEMM with the SwiGLU epilogue reads)."""
    if n % (2 * SWIGLU_RUN):
        raise ValueError(
            f"{who}: activation='swiglu' needs N % {2 * SWIGLU_RUN} == 0 (gate rows then up "
            f"rows, torch.cat([gate, up]), each a multiple of {SWIGLU_RUN}), got N={n}"
        )


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a GEMM output ``y`` (..., 2F) whose first F columns are gate's
    and last F up's (the weight ``torch.cat([gate, up])``): (..., F), computed in ``y``'s
    dtype."""
    n = y.shape[-1]
    if n % 2:
        raise ValueError(f"swiglu: the last dim {n} must be even (gate columns, then up's)")
    gate, up = y[..., : n // 2], y[..., n // 2:]
    return torch.nn.functional.silu(gate) * up


def swiglu_in_groups(x_granularity, w_granularity, h_granularity) -> bool:
    """Whether a SwiGLU gate/up GEMM with these operand scales, whose ``h`` the down
    projection reads quantized with ``h_granularity``, is the blockwise recipe's: 1x128
    activation groups x 128x128 weight blocks, ``h`` in 1x128 groups.  One op
    (``fp8compile::scaled_mm_swiglu_quantize``) then computes and quantizes ``h``."""
    return (Granularity(x_granularity), Granularity(w_granularity),
            Granularity(h_granularity)) == (Granularity.GROUP, Granularity.BLOCK,
                                            Granularity.GROUP)


def residual_sum(residual: torch.Tensor | None,
                 residual2: torch.Tensor | None) -> torch.Tensor | None:
    """The residual a GEMM epilogue adds: ``residual``, or with a second one (a residual
    stream ``x + o`` passed as its two terms) their sum in fp32, never rounded to the model
    dtype, as Inductor computes ``x + o`` inside the next add."""
    if residual2 is None:
        return residual
    return residual.float() + residual2.float()


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 log10(‖ref‖ / ‖ref − approx‖)``."""
    ref = ref.double()
    noise = (ref - approx.double()).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(ref.norm() / noise))
