"""Dynamic FP8 quantization kernels: ``x (..., K) -> (q, scale)`` for every granularity.

One kernel, :func:`_quantize_kernel`, serves all four granularities of
:mod:`fp8compile.numerics` and, through its ``PRODUCER`` switch, the fused producers of
:mod:`fp8compile.kernels.fused` (RMSNorm -> quant, SiLU(gate)*up -> quant).  A program owns
``BLOCK_M`` rows and a range of K; it never holds more than one ``BLOCK_M x BLOCK_K`` tile.

=========  ====================================  =======================================
GRAN       program                               scale written
=========  ====================================  =======================================
TENSOR     rows x K-range, two launches: amax,    ``()``: launch 1 writes one finite amax
           then quantize; a single small tile     per program (or, for a large grid, folds
           (a decode step's tokens) is one        it into one zeroed cell by atomic max),
           launch of one program                  launch 2 reduces them to the scale
ROW        rows x all of K: amax pass, then       ``(M, 1)``
           quantize pass (second read hits L2)
GROUP      rows x several 128-groups (RMSNorm:    ``(M, ceil(K/128))`` stored M-contiguous,
           one row x all of K, read once)         so a warp writes 32 consecutive floats
BLOCK      one 128x128 weight block               ``(ceil(N/128), ceil(K/128))``
=========  ====================================  =======================================

The payload is written as raw bytes through a ``uint8`` view so that NaN/Inf get exactly the
encodings numerics gives (E4M3FN has no Inf: NaN; E5M2 keeps ±Inf), independent of how a
Triton version's saturating fp32->fp8 conversion treats non-finite values.

``x / s`` is IEEE-exact, as numerics computes it, but costs no division per element: see
:func:`_div_exact` (a reciprocal per scale and two fma corrections).  With ``div.rn.f32``
per element these kernels were bound by the ALU on an H200.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .. import numerics as nx
from ..numerics import Fp8Format, Granularity
from ..ops import check_fp8_input
from ..ops._inline import launch
from .tuning import cdiv, next_pow2, num_sms

__all__ = ["amax_tensor", "quantize", "quantize_dual", "quantize_history_t", "quantize_rows",
           "quantize_with_scale", "quantize_from_amax", "requantize_t"]

# Granularity codes of the GRAN / A_GRAN / W_GRAN constexpr switches (shared with gemm.py).
GRAN_CODE = {
    Granularity.TENSOR: 0,
    Granularity.ROW: 1,
    Granularity.GROUP: 2,
    Granularity.BLOCK: 3,
}

# Producer codes: what is computed from the loaded inputs before quantization.
PRODUCER_NONE = 0
PRODUCER_RMSNORM = 1  # x * rsqrt(mean(x^2) + eps) * weight, in fp32
PRODUCER_SILU_MUL = 2  # silu(gate) * up, in fp32
PRODUCER_ADD_RMSNORM = 3  # RMSNorm of x + residual (the second input), in fp32
NORM_PRODUCERS = (PRODUCER_RMSNORM, PRODUCER_ADD_RMSNORM)  # producers that need whole rows


@triton.jit
def _finite_abs(x):
    a = tl.abs(x)
    # NaN < inf is False, so NaN and ±Inf both count as 0 towards amax.
    return tl.where(a < float("inf"), a, 0.0)


@triton.jit
def _scale_from_amax(amax, FMAX: tl.constexpr, POW2: tl.constexpr):
    # div_rn: IEEE division, so the scale is bit-equal to numerics.compute_scale (Triton's
    # default fp32 '/' may lower to an approximate division on the GPU).
    s = tl.math.div_rn(tl.maximum(amax, 1e-12), FMAX)
    if POW2:
        # 2**ceil(log2(s)) on the bits: s is a positive normal float (>= 1e-12/57344), so
        # bumping the exponent and clearing the mantissa is exact, unlike an approximate log2.
        bits = s.to(tl.int32, bitcast=True)
        up = (bits & 0x7F800000) + 0x800000
        bits = tl.where((bits & 0x7FFFFF) != 0, up, bits)
        s = bits.to(tl.float32, bitcast=True)
    return s


@triton.jit
def _round_to_fp8_grid(y, IS_E4M3: tl.constexpr):
    """Round finite, already saturated fp32 ``y`` to the nearest FP8 value (ties to even).

    The result is exactly representable, so the fp32->fp8 conversion that follows does no
    rounding of its own.  That makes the payload independent of the conversion's rounding:
    the Triton interpreter's cast is wrong at binade edges (SPEC §4: 127.06 -> 64), and this
    costs a few integer ops per element in a kernel bound by memory.
    """
    if IS_E4M3:
        SHIFT: tl.constexpr = 20  # 23 - 3 mantissa bits
        MIN_NORMAL: tl.constexpr = 0.015625  # 2**-6
        MAGIC: tl.constexpr = 16384.0  # 2**14: its fp32 ulp is 2**-9, the subnormal step
    else:
        SHIFT: tl.constexpr = 21  # 23 - 2 mantissa bits
        MIN_NORMAL: tl.constexpr = 6.103515625e-05  # 2**-14
        MAGIC: tl.constexpr = 128.0  # 2**7: its fp32 ulp is 2**-16
    a = tl.abs(y)
    bits = a.to(tl.int32, bitcast=True)
    half = (1 << (SHIFT - 1)) - 1
    bits = (bits + half + ((bits >> SHIFT) & 1)) & (-(1 << SHIFT))
    normal = bits.to(tl.float32, bitcast=True)
    sub = (a + MAGIC) - MAGIC
    r = tl.where(a < MIN_NORMAL, sub, normal)
    # Copy y's sign bit: Triton's unary minus is 0 - r, which turns -0.0 into +0.0.
    sign = y.to(tl.int32, bitcast=True) & -2147483648
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _div_exact(x, s, r):
    """``x / s`` rounded to nearest even, bit-equal to IEEE division, for fp32 ``x`` and
    normal ``s > 0`` with ``r = div_rn(1, s)`` (one per scale, not per element).

    Two fma corrections of ``x * r`` (Markstein): the first brings the quotient within one
    ulp, and the second then rounds correctly, since the residual ``x - y * s`` is exact in an
    fma.  ``div.rn.f32`` per element (a range check and a branch to a slow path around ~10
    instructions) made the quantization kernels bound by the ALU at under half the memory
    bandwidth on an H200.  Quotients below fp32's normal range (which quantize to ±0 in any
    FP8 format) may differ by an ulp; zeros keep their sign; non-finite x gives NaN.
    """
    # Signs: the residual is y*s - x, subtracted; zeros then keep their sign (x - y*s, added,
    # turns -0.0 into +0 + -0 = +0).  ``* -1.0`` is a true sign flip; Triton's unary minus is
    # 0 - v, which maps +0.0 to +0.0.
    nx = x * -1.0
    nr = r * -1.0
    y = x * r
    y = tl.fma(tl.fma(y, s, nx), nr, y)
    y = tl.fma(tl.fma(y, s, nx), nr, y)
    return y


@triton.jit
def _fp8_cast_bits(y, IS_E4M3: tl.constexpr):
    """Bit pattern (uint8) of fp32 ``y`` converted to E4M3 / E5M2 (saturating on the GPU)."""
    if IS_E4M3:
        return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return y.to(tl.float8e5).to(tl.uint8, bitcast=True)


@triton.jit
def _tile_scale(x, FMAX: tl.constexpr, POW2: tl.constexpr):
    """The one scale of a whole 2-D tile, from its finite amax."""
    return _scale_from_amax(tl.max(tl.max(_finite_abs(x), axis=1), axis=0), FMAX, POW2)


@triton.jit
def _quantize_bits(x, s, r, FMAX: tl.constexpr, IS_E4M3: tl.constexpr, HW_CAST: tl.constexpr,
                   GIVEN_SCALE: tl.constexpr = False, FINITE: tl.constexpr = False):
    """FP8 bit pattern (uint8) of ``saturate(rne(x / s))`` for fp32 ``x``, scales ``s``
    broadcastable to it and ``r = div_rn(1, s)``; non-finite quotients get numerics' codes.

    HW_CAST (compiled): the quotient comes from :func:`_div_exact` (or from ``div_rn`` for a
    ``GIVEN_SCALE``, which need not be a normal positive float), and the GPU's
    ``cvt.rn.satfinite`` rounds and saturates by itself (checked bit for bit against numerics
    on the H100, fp8 grid edges included).  In the interpreter, whose fma rounds twice and
    whose cast is wrong at binade edges (SPEC §4), the quotient is ``div_rn`` and the
    rounding to the FP8 grid is done in software first.

    FINITE (compiled only): the caller knows every x is finite, so NaN/Inf codes are not
    selected (11 of the dual kernel's 49 instructions per element).
    """
    if HW_CAST and not GIVEN_SCALE:
        y = _div_exact(x, s, r)
    else:
        y = tl.math.div_rn(x, s)
    if HW_CAST and FINITE:
        return _fp8_cast_bits(y, IS_E4M3)
    finite = tl.abs(y) < float("inf")
    if HW_CAST:
        bits = _fp8_cast_bits(y, IS_E4M3)
    else:
        sat = tl.minimum(tl.maximum(tl.where(finite, y, 0.0), -FMAX), FMAX)
        bits = _fp8_cast_bits(_round_to_fp8_grid(sat, IS_E4M3), IS_E4M3)
    # A quotient is NaN iff x is, and has x's sign (s > 0).
    if IS_E4M3:
        bad = tl.full(x.shape, 0x7F, tl.uint8)  # NaN for NaN and ±Inf (E4M3FN has no Inf)
    else:
        inf = tl.where(x > 0, 0x7C, 0xFC).to(tl.uint8)
        bad = tl.where(x != x, 0x7F, inf).to(tl.uint8)
    return tl.where(finite, bits, bad)


@triton.jit
def _fold_amax(amax_ptr, amax, pid_m, pid_k, AMAX_AT: tl.constexpr):
    """Tensorwise launch 1: hand this program's finite amax to launch 2 (see AMAX_AT)."""
    if AMAX_AT == 1:
        tl.store(amax_ptr + pid_m * tl.num_programs(1) + pid_k, amax)
    else:
        # amax >= 0, so fp32 atomic max is exact and order-independent.
        tl.atomic_max(amax_ptr, amax)


@triton.jit
def _history_or_slots_max(hist_max, slots_ptr, n_slots, SLOTS: tl.constexpr):
    """Delayed scaling's amax: the history's max once it holds a value, else (the first
    step, when launch 1 wrote them) the max of the ``n_slots`` slots, ``SLOTS`` at a time."""
    am = hist_max
    if hist_max <= 0:
        part = tl.zeros([SLOTS], dtype=tl.float32)
        for i in range(0, n_slots, SLOTS):
            idx = i + tl.arange(0, SLOTS)
            part = tl.maximum(part, tl.load(slots_ptr + idx, mask=idx < n_slots, other=0.0))
        am = tl.max(part, axis=0)
    return am


@triton.jit
def _row_or_tensor_scale(a, amax_ptr, s_ptr, rows, rmask, stride_sm, pid_m, pid_k, n_slots,
                         hist_max, GRAN: tl.constexpr, GIVEN_SCALE: tl.constexpr,
                         AMAX_AT: tl.constexpr, SLOTS: tl.constexpr, HISTORY: tl.constexpr,
                         FMAX: tl.constexpr, POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """The ``[BLOCK_M]`` scales of a row/tensor program, stored as they are computed: per row
    from the rows' amax ``a`` (ROW), or one for the tensor (program (0, 0) stores it): the
    ``GIVEN_SCALE`` in ``amax_ptr``, or from the amax launch 1 left there (the cell, or the
    max of its ``n_slots`` slots), or from ``a`` itself (``AMAX_AT == 2``).  ``HISTORY``
    (delayed scaling): ``hist_max``, the history's max, when non-zero, else the slots' max,
    read ``SLOTS`` at a time (only then: launch 1 wrote them only then)."""
    if GRAN == 1:
        s = _scale_from_amax(a, FMAX, POW2)
        tl.store(s_ptr + rows * stride_sm, s, mask=rmask)
    else:
        if GIVEN_SCALE:
            s1 = tl.load(amax_ptr)
        else:
            if HISTORY:
                am = _history_or_slots_max(hist_max, amax_ptr, n_slots, SLOTS)
            elif AMAX_AT == 2:
                am = tl.max(a, axis=0)
            elif AMAX_AT == 1:
                slots = tl.arange(0, SLOTS)
                am = tl.max(tl.load(amax_ptr + slots, mask=slots < n_slots, other=0.0), axis=0)
            else:
                am = tl.load(amax_ptr)
            s1 = _scale_from_amax(am, FMAX, POW2)
        if (pid_m == 0) & (pid_k == 0):
            tl.store(s_ptr, s1)
        s = tl.zeros([BLOCK_M], dtype=tl.float32) + s1
    return s


@triton.jit
def _rstd(sq, K, eps):
    """RMSNorm's ``1 / sqrt(mean(x²) + eps)`` per row, from the rows' sums of squares."""
    # eps arrives as fp32 from Triton's launcher but as fp64 from Inductor's (a kernel
    # inlined into a compiled graph): round it to fp32 in both cases.
    return tl.math.div_rn(1.0, tl.sqrt_rn(sq / K + tl.full(sq.shape, eps, tl.float32)))


@triton.jit
def _load_input(x_ptr, x2_ptr, rows, cols, rmask, K, stride_xm, stride_xk, stride_x2m,
                stride_x2k, PRODUCER: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] tile of x in fp32 (masked lanes 0), plus the residual for
    PRODUCER_ADD_RMSNORM: what the norm is of."""
    mask = rmask[:, None] & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask,
                other=0.0).to(tl.float32)
    if PRODUCER == 3:
        x += tl.load(x2_ptr + rows[:, None] * stride_x2m + cols[None, :] * stride_x2k,
                     mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _produce(x_ptr, x2_ptr, nw_ptr, rows, cols, rmask, K, rstd,
             stride_xm, stride_xk, stride_x2m, stride_x2k, PRODUCER: tl.constexpr, eps,
             ROW_IN_TILE: tl.constexpr):
    """Load a [BLOCK_M, BLOCK_K] tile and apply the producer, in fp32; masked lanes are 0.

    ROW_IN_TILE: the tile holds its rows' whole K, so RMSNorm takes ``rstd`` from it (with
    ``eps``) rather than from the caller: one read of x fewer, the same sums."""
    mask = rmask[:, None] & (cols[None, :] < K)
    x = _load_input(x_ptr, x2_ptr, rows, cols, rmask, K, stride_xm, stride_xk, stride_x2m,
                    stride_x2k, PRODUCER)
    if PRODUCER == 1 or PRODUCER == 3:
        if ROW_IN_TILE:
            rstd = _rstd(tl.sum(x * x, axis=1), K, eps)
        w = tl.load(nw_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        x = x * rstd[:, None] * w[None, :]
    elif PRODUCER == 2:
        up = tl.load(x2_ptr + rows[:, None] * stride_x2m + cols[None, :] * stride_x2k,
                     mask=mask, other=0.0).to(tl.float32)
        x = x * tl.sigmoid(x) * up
    return x


@triton.jit
def _quantize_kernel(
    # pointers: input, second input (SiLU*mul "up", or the residual added before RMSNorm),
    # RMSNorm weight
    x_ptr, x2_ptr, nw_ptr,
    # pointers: payload (uint8 view), scales, tensorwise amax (see AMAX_AT) or given scale,
    # a zeroed cell for the amax of x (AMAX_OUT), an amax history that makes an AMAX_ONLY
    # launch return at once when it holds a non-zero value (SKIP_BLOCK > 0); with HISTORY the
    # cast takes its scale from that history's max (see _row_or_tensor_scale), and the
    # AMAX_ONLY launch before it zeroes the AMAX_OUT cell, which needs no fill kernel then
    q_ptr, s_ptr, amax_ptr, amax_out_ptr, skip_ptr,
    # sizes: rows, columns, columns per program along axis 1, RMSNorm epsilon, amax slots,
    # the skip history's length
    M, K, k_per_prog, eps, n_slots, skip_n,
    # strides (elements)
    stride_xm, stride_xk, stride_x2m, stride_x2k, stride_qm, stride_sm, stride_sk,
    # meta-parameters
    GRAN: tl.constexpr,  # 0 tensor, 1 row, 2 group, 3 block
    PRODUCER: tl.constexpr,  # 0 none, 1 rmsnorm, 2 silu*mul, 3 rmsnorm of x + x2
    AMAX_ONLY: tl.constexpr,  # tensorwise launch 1: fold amax into amax_ptr, write nothing else
    GIVEN_SCALE: tl.constexpr,  # tensorwise: amax_ptr holds the scale itself (static/delayed)
    AMAX_OUT: tl.constexpr,  # tensorwise cast: also fold x's finite amax into amax_out_ptr
    SKIP_BLOCK: tl.constexpr,  # > 0: AMAX_ONLY checks skip_ptr's skip_n values first
    HISTORY: tl.constexpr,  # delayed scaling in two launches (SKIP_BLOCK > 0, see above)
    # tensorwise amax: 0 one zeroed fp32 cell (atomic max), 1 one slot per program of the
    # AMAX_ONLY launch (SLOTS >= n_slots, a power of two), 2 none: a single program holds all
    # of x in one tile (ONE_CHUNK) and computes the amax itself, in a single launch
    AMAX_AT: tl.constexpr, SLOTS: tl.constexpr,
    IS_E4M3: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # tensor/row/RMSNorm group: one tile holding its rows' whole K
    HW_CAST: tl.constexpr,  # round with the hardware conversion (compiled) or in software
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_SLICE: tl.constexpr,  # BLOCK only: rows per slice of the block (BLOCK_M: whole)
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    hist_max = tl.full([], 0.0, tl.float32)
    if SKIP_BLOCK > 0:
        hist = tl.load(skip_ptr + tl.arange(0, SKIP_BLOCK), mask=tl.arange(0, SKIP_BLOCK) < skip_n,
                       other=0.0)
        hist_max = tl.max(hist, axis=0)
    if AMAX_ONLY and HISTORY:
        if (pid_m == 0) & (pid_k == 0):
            tl.store(amax_out_ptr, 0.0)  # the cast launch's atomic max starts from it
    if AMAX_ONLY and SKIP_BLOCK > 0:
        # Delayed scaling needs this amax only while its history is all zero (the first
        # step); later the cast launch reports the amax as it goes (AMAX_OUT).
        if hist_max > 0:
            return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows = rows.to(tl.int64)
    k_lo = pid_k * k_per_prog
    k_hi = tl.minimum(k_lo + k_per_prog, K)
    offs_k = tl.arange(0, BLOCK_K)

    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if (PRODUCER == 1 or PRODUCER == 3) and not ONE_CHUNK:
        # RMSNorm needs whole rows: a pass over K first (a ONE_CHUNK tile has them already).
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _load_input(x_ptr, x2_ptr, rows, k0 + offs_k, rmask, K, stride_xm, stride_xk,
                            stride_x2m, stride_x2k, PRODUCER)
            sq += tl.sum(x * x, axis=1)
        rstd = _rstd(sq, K, eps)

    if GRAN == 3 and BLOCK_SLICE == BLOCK_M:
        # BLOCK, whole tile at once: for a transposed view (the backward's weight.t()), whose
        # loads then cover 128 contiguous elements per column; 1.3x faster than slices there
        # (H200), and 1.8x slower than slices for a row-major weight.
        cols = k_lo + offs_k
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=rmask[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
        s = _tile_scale(x, FMAX, POW2)
        tl.store(s_ptr + pid_m * stride_sm + (k_lo // BLOCK_K) * stride_sk, s)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :],
                 _quantize_bits(x, s, tl.math.div_rn(1.0, s), FMAX, IS_E4M3, HW_CAST),
                 mask=rmask[:, None] & (cols[None, :] < K))
    elif GRAN == 3:
        # BLOCK (weights; no producer): one 128x128 block per program, walked in
        # BLOCK_SLICE-row slices twice (amax, then quantize), in loops that are not unrolled.
        # 32-row slices take 31 registers; the second walk re-reads them from L1/L2.
        cols = k_lo + offs_k
        cmask = cols[None, :] < K
        amax = tl.zeros([BLOCK_SLICE], dtype=tl.float32)
        for h in range(0, BLOCK_M, BLOCK_SLICE):
            r = (pid_m * BLOCK_M + h + tl.arange(0, BLOCK_SLICE)).to(tl.int64)
            x = tl.load(x_ptr + r[:, None] * stride_xm + cols[None, :] * stride_xk,
                        mask=(r[:, None] < M) & cmask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(_finite_abs(x), axis=1))
        s = _scale_from_amax(tl.max(amax, axis=0), FMAX, POW2)
        inv = tl.math.div_rn(1.0, s)
        tl.store(s_ptr + pid_m * stride_sm + (k_lo // BLOCK_K) * stride_sk, s)
        for h in range(0, BLOCK_M, BLOCK_SLICE):
            r = (pid_m * BLOCK_M + h + tl.arange(0, BLOCK_SLICE)).to(tl.int64)
            mask = (r[:, None] < M) & cmask
            x = tl.load(x_ptr + r[:, None] * stride_xm + cols[None, :] * stride_xk,
                        mask=mask, other=0.0).to(tl.float32)
            tl.store(q_ptr + r[:, None] * stride_qm + cols[None, :],
                     _quantize_bits(x, s, inv, FMAX, IS_E4M3, HW_CAST), mask=mask)
    elif GRAN == 2 and ONE_CHUNK:
        # GROUP, the rows' whole K in one tile (RMSNorm, which needs whole rows anyway): x is
        # read once, and the tile is viewed as [BLOCK_M, groups, 128] for the group amaxes.
        GROUPS: tl.constexpr = BLOCK_K // 128
        x = _produce(x_ptr, x2_ptr, nw_ptr, rows, offs_k, rmask, K, rstd,
                     stride_xm, stride_xk, stride_x2m, stride_x2k, PRODUCER, eps, True)
        x3 = tl.reshape(x, (BLOCK_M, GROUPS, 128))
        s = _scale_from_amax(tl.max(_finite_abs(x3), axis=2), FMAX, POW2)
        groups = tl.arange(0, GROUPS)
        tl.store(s_ptr + rows[:, None] * stride_sm + groups[None, :] * stride_sk, s,
                 mask=rmask[:, None] & (groups[None, :] * 128 < K))
        inv = tl.math.div_rn(1.0, s)
        bits = _quantize_bits(x3, s[:, :, None], inv[:, :, None], FMAX, IS_E4M3, HW_CAST)
        tl.store(q_ptr + rows[:, None] * stride_qm + offs_k[None, :],
                 tl.reshape(bits, (BLOCK_M, BLOCK_K)),
                 mask=rmask[:, None] & (offs_k[None, :] < K))
    elif GRAN == 2:
        # GROUP: BLOCK_K == 128, one scale per (row, K-group).
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + offs_k
            x = _produce(x_ptr, x2_ptr, nw_ptr, rows, cols, rmask, K, rstd,
                         stride_xm, stride_xk, stride_x2m, stride_x2k, PRODUCER, eps, False)
            a = tl.max(_finite_abs(x), axis=1)
            s = _scale_from_amax(a, FMAX, POW2)
            tl.store(s_ptr + rows * stride_sm + (k0 // BLOCK_K) * stride_sk, s, mask=rmask)
            inv = tl.math.div_rn(1.0, s)
            tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :],
                     _quantize_bits(x, s[:, None], inv[:, None], FMAX, IS_E4M3, HW_CAST),
                     mask=rmask[:, None] & (cols[None, :] < K))
    elif ONE_CHUNK:
        # The program's whole K range is one tile: read x once, keep it in registers.
        cols = k_lo + offs_k
        x = _produce(x_ptr, x2_ptr, nw_ptr, rows, cols, rmask, K, rstd,
                     stride_xm, stride_xk, stride_x2m, stride_x2k, PRODUCER, eps, True)
        a = tl.max(_finite_abs(x), axis=1)
        if AMAX_ONLY:
            _fold_amax(amax_ptr, tl.max(a, axis=0), pid_m, pid_k, AMAX_AT)
        else:
            s = _row_or_tensor_scale(a, amax_ptr, s_ptr, rows, rmask, stride_sm, pid_m, pid_k,
                                     n_slots, hist_max, GRAN, GIVEN_SCALE, AMAX_AT, SLOTS,
                                     HISTORY, FMAX, POW2, BLOCK_M)
            inv = tl.math.div_rn(1.0, s)
            tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :],
                     _quantize_bits(x, s[:, None], inv[:, None], FMAX, IS_E4M3, HW_CAST,
                                    GIVEN_SCALE),
                     mask=rmask[:, None] & (cols[None, :] < K))
            if AMAX_OUT:
                tl.atomic_max(amax_out_ptr, tl.max(a, axis=0))
    else:
        a = tl.zeros([BLOCK_M], dtype=tl.float32)  # row amax; unused by a TENSOR quant pass
        if AMAX_ONLY or GRAN == 1:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                x = _produce(x_ptr, x2_ptr, nw_ptr, rows, k0 + offs_k, rmask, K, rstd,
                             stride_xm, stride_xk, stride_x2m, stride_x2k, PRODUCER, eps, False)
                a = tl.maximum(a, tl.max(_finite_abs(x), axis=1))
        if AMAX_ONLY:
            _fold_amax(amax_ptr, tl.max(a, axis=0), pid_m, pid_k, AMAX_AT)
        else:
            s = _row_or_tensor_scale(a, amax_ptr, s_ptr, rows, rmask, stride_sm, pid_m, pid_k,
                                     n_slots, hist_max, GRAN, GIVEN_SCALE, AMAX_AT, SLOTS,
                                     HISTORY, FMAX, POW2, BLOCK_M)
            inv = tl.math.div_rn(1.0, s)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                cols = k0 + offs_k
                x = _produce(x_ptr, x2_ptr, nw_ptr, rows, cols, rmask, K, rstd,
                             stride_xm, stride_xk, stride_x2m, stride_x2k, PRODUCER, eps, False)
                tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :],
                         _quantize_bits(x, s[:, None], inv[:, None], FMAX, IS_E4M3, HW_CAST,
                                        GIVEN_SCALE),
                         mask=rmask[:, None] & (cols[None, :] < K))
                if AMAX_OUT:
                    a = tl.maximum(a, tl.max(_finite_abs(x), axis=1))
            if AMAX_OUT:
                tl.atomic_max(amax_out_ptr, tl.max(a, axis=0))


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> a 2-D (M, K) view when strides allow, else a contiguous copy."""
    return x.reshape(-1, x.shape[-1])


def _launch_shape(m: int, k: int, granularity: Granularity, producer: int, sms: int = 132,
                  column_major: bool = False, cast_only: bool = False):
    """(BLOCK_M, BLOCK_K, k_per_prog, num_warps) for a rows x K problem.

    The loops over K are not software-pipelined, so parallelism comes from many small
    programs: plain GROUP quantization runs one 32x128 tile per program (8192 programs at
    8192x4096), and tensor/row scaling reads a whole row of up to 16384 values into
    registers once (one load, no second pass over x) instead of looping twice over K.

    ``column_major``: x is a transposed view (rows contiguous, K strided), as the backward
    GEMMs hand over ``dy.t()`` and ``weight.t()``.  A tile must then span many rows so that
    each column's load is a whole memory sector: 2 rows x 4096 columns read 4 useful bytes
    per 32-byte sector (measured 4x slower than the row-major case on an H100).  Row and
    tensor scaling then loop twice over K (amax, then quantize).

    ``cast_only``: a tensorwise cast with a given scale that records no amax (static
    scaling).
    """
    if granularity is Granularity.BLOCK:
        return nx.BLOCK, nx.BLOCK, nx.BLOCK, 8
    if column_major and producer == PRODUCER_NONE:
        if granularity is Granularity.GROUP:
            return 64, nx.BLOCK, nx.BLOCK, 4
        # 16 rows: one 32-byte sector per column in bf16, and m / 16 programs.
        block_m, block_k = 16, 256
        k_per_prog = k if granularity is Granularity.ROW else 4 * block_k
        return block_m, block_k, k_per_prog, 4
    if granularity is Granularity.GROUP:
        # SiLU·mul reads two inputs: 16 rows per program, 4% faster than 32 (H100, 4096x14336).
        block_m = min(16 if producer == PRODUCER_SILU_MUL else 32, next_pow2(max(m, 1)))
        if producer not in NORM_PRODUCERS:
            return block_m, nx.BLOCK, nx.BLOCK, 4
        if k <= 16384:
            # RMSNorm needs whole rows: one row per program, in one tile (ONE_CHUNK), read
            # once (H100, 4096x4096: 50 us for two walks over K in 4-row slices).
            block_k = next_pow2(max(k, nx.BLOCK))
            return 1, block_k, k, max(4, min(16, block_k // 1024))
        # Longer rows: rows are the only parallelism, and 32 rows per program left 128
        # programs for 4096 tokens on 132 SMs (0.87 TB/s).  Shrink the row block until there
        # are ~4 programs per SM.
        while block_m > 1 and cdiv(m, block_m) < 4 * sms:
            block_m //= 2
        return block_m, nx.BLOCK, math.ceil(k / nx.BLOCK) * nx.BLOCK, 4
    if k <= 16384:
        block_k = next_pow2(max(k, 16))
        if granularity is Granularity.ROW and block_k >= 4096:
            # One row per program, ~32 values (per input) a thread: 7-13% faster than two
            # rows at 8 warps for 4096 tokens (H100; plain and RMSNorm at K=4096, SiLU·mul at
            # K=14336 at 16 warps).
            return 1, block_k, k, min(16, block_k // 1024)
        block_m = max(1, min(32, 8192 // block_k, next_pow2(max(m, 1))))
        if cast_only and block_k == 4096:
            # Static scaling's cast, 4096 wide: one row per program at 8 warps took 14.5 /
            # 22.0 / 27.3 us (plain / RMSNorm / residual add + RMSNorm, 4096 tokens, H200)
            # against 16.5 / 22.9 / 29.8 at two rows.
            return 1, block_k, k, 8
        if block_k >= 16384:
            # Tensorwise, one row per program as before, at 16 warps instead of 8: the
            # delayed cast fused into SiLU·mul at K=14336 took 120.6 us instead of 133.7 (H100,
            # 4096 tokens); at 4096 wide, 1 row/4 warps was no faster than 2 rows/8 warps.
            return block_m, block_k, k, 16
        return block_m, block_k, k, 8 if block_m * block_k >= 8192 else 4
    block_k = 4096
    block_m = min(2, next_pow2(max(m, 1)))
    if granularity is Granularity.ROW or producer in NORM_PRODUCERS:
        return block_m, block_k, k, 8
    return block_m, block_k, 4 * block_k, 8  # TENSOR: split long rows over programs too


def quantize_rows(
    x: torch.Tensor,
    granularity: Granularity,
    fmt: Fp8Format,
    power_of_2: bool,
    producer: int = PRODUCER_NONE,
    x2: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    given_scale: torch.Tensor | None = None,
    amax_only: bool = False,
    amax_out: torch.Tensor | None = None,
    given_amax: torch.Tensor | None = None,
    skip_if: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`_quantize_kernel` for ``x (..., K)``; shared by quantize() and fused.py.

    Returns ``(q, scale)`` with numerics.quantize's shapes and scale layout.  Tensorwise only:
    ``given_scale`` (one fp32 element on x's device) quantizes with that scale in a single
    launch, and folds x's finite amax into ``amax_out`` (a zeroed fp32 cell) when given;
    ``amax_only`` returns ``(amax, _)`` after the first launch (the finite amax), or 0 without
    reading x when ``skip_if`` (an fp32 amax history) holds a non-zero value.

    ``history`` (a contiguous 1-D fp32 amax history, tensorwise; delayed scaling): the scale
    comes from the history's max, or from x's amax while the history is all zero, and x's
    finite amax goes into ``amax_out`` (any fp32 cell: the first launch zeroes it).  Two
    launches, as for a dynamic scale, and no others: the first returns at once on the device
    once the history holds a value, and neither the cell nor the choice between the history
    and this call's amax needs a kernel of its own.
    """
    if history is not None and (granularity is not Granularity.TENSOR or amax_out is None
                                or given_scale is not None or given_amax is not None
                                or amax_only or skip_if is not None):
        raise ValueError(
            "quantize_rows: history takes a tensorwise cast with amax_out, and none of "
            "given_scale, given_amax, amax_only, skip_if"
        )
    if history is not None:
        skip_if = history
    k = x.shape[-1]
    x2d = _as_rows(x)
    m = x2d.shape[0]
    # amax_only writes no payload: a 0-element placeholder stands in for it.
    q = torch.empty((0,) if amax_only else x.shape, dtype=fmt.dtype, device=x.device)
    q2d = q.view(torch.uint8) if amax_only else q.view(m, k).view(torch.uint8)
    if granularity is Granularity.TENSOR:
        # Shape (1,), returned as a 0-dim view: Inductor realizes an empty 0-dim tensor with
        # a kernel that writes a zero into it (no elements to skip), one launch per call.
        scale = torch.empty(1, dtype=torch.float32, device=x.device)
        stride_sm = stride_sk = 0
    elif granularity is Granularity.ROW:
        scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        stride_sm, stride_sk = 1, 0
    elif granularity is Granularity.GROUP:
        kb = math.ceil(k / nx.BLOCK)
        scale = torch.empty_strided((m, kb), (1, m), dtype=torch.float32, device=x.device)
        stride_sm, stride_sk = 1, m
    else:
        nb, kb = math.ceil(m / nx.BLOCK), math.ceil(k / nx.BLOCK)
        scale = torch.empty((nb, kb), dtype=torch.float32, device=x.device)
        stride_sm, stride_sk = kb, 1

    if x2 is not None:
        x2 = _as_rows(x2)
    column_major = m > 1 and k > 1 and x2d.stride(0) == 1 and x2d.stride(1) != 1
    # Tensor scaling that computes its own scale: the amax passes between two launches, or
    # for one small tile (the tokens of a decode step) stays inside one launch of one
    # program, which holds all of x in registers.
    own_amax = (granularity is Granularity.TENSOR and given_scale is None
                and given_amax is None and not amax_only)
    block_m, block_k = next_pow2(m), max(16, next_pow2(k))
    whole = (own_amax and history is None and not column_major
             and block_m * block_k <= _WHOLE_AMAX_MAX_ELEMS)
    if whole:
        k_per_prog, num_warps = k, max(4, min(32, block_m * block_k // 2048))
    else:
        block_m, block_k, k_per_prog, num_warps = _launch_shape(
            m, k, granularity, producer, num_sms(x.device), column_major,
            cast_only=given_scale is not None and amax_out is None)
    grid = (cdiv(m, block_m), cdiv(k, k_per_prog))
    n_slots = grid[0] * grid[1]
    # Where the tensorwise amax goes between the launches: one slot per program needs no
    # zeroed cell (a fill kernel before every quantization); past _AMAX_SLOTS_MAX programs,
    # the second launch's reading of every slot would cost more than the fill.
    # With a history, the cast reads the slots only on the first step, so any count will do.
    if whole:
        amax_at = 2
    elif own_amax and (n_slots <= _AMAX_SLOTS_MAX or history is not None):
        amax_at = 1
    else:
        amax_at = 0
    common = dict(
        x_ptr=x2d, x2_ptr=x2 if x2 is not None else x2d,
        nw_ptr=norm_weight if norm_weight is not None else x2d,
        q_ptr=q2d, s_ptr=scale,
        amax_out_ptr=amax_out if amax_out is not None else scale,
        skip_ptr=skip_if if skip_if is not None else scale,
        M=m, K=k, k_per_prog=k_per_prog, eps=float(eps), n_slots=n_slots,
        skip_n=skip_if.numel() if skip_if is not None else 0,
        stride_xm=x2d.stride(0), stride_xk=x2d.stride(1),
        stride_x2m=x2.stride(0) if x2 is not None else 0,
        stride_x2k=x2.stride(1) if x2 is not None else 0,
        stride_qm=k, stride_sm=stride_sm, stride_sk=stride_sk,
        GRAN=GRAN_CODE[granularity], PRODUCER=producer, AMAX_OUT=amax_out is not None,
        SKIP_BLOCK=next_pow2(skip_if.numel()) if skip_if is not None else 0,
        HISTORY=history is not None,
        IS_E4M3=fmt is Fp8Format.E4M3, FMAX=fmt.max, POW2=bool(power_of_2),
        ONE_CHUNK=(k <= k_per_prog <= block_k
                   and (granularity in (Granularity.TENSOR, Granularity.ROW)
                        or (granularity is Granularity.GROUP and producer in NORM_PRODUCERS))),
        AMAX_AT=amax_at,
        SLOTS=min(next_pow2(n_slots), _AMAX_SLOTS_MAX) if amax_at == 1 else 1,
        HW_CAST=os.environ.get("TRITON_INTERPRET") != "1",
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
        BLOCK_SLICE=block_m if column_major and granularity is Granularity.BLOCK
        else _BLOCK_SLICE,
    )
    if given_scale is not None:
        launch(_quantize_kernel)[grid](amax_ptr=given_scale, AMAX_ONLY=False, GIVEN_SCALE=True,
                                       **common)
        return q, scale.reshape(())
    if given_amax is not None:
        # The scale of an amax computed elsewhere (delayed scaling's history), derived in the
        # kernel as from launch 1's cell (AMAX_AT == 0, as own_amax is False): the same IEEE
        # quotient in eager and compiled code.
        launch(_quantize_kernel)[grid](amax_ptr=given_amax, AMAX_ONLY=False, GIVEN_SCALE=False,
                                       **common)
        return q, scale.reshape(())
    if granularity is Granularity.TENSOR and not whole:
        if amax_at == 1:
            amax = torch.empty(n_slots, dtype=torch.float32, device=x.device)
        else:
            amax = torch.zeros(1, dtype=torch.float32, device=x.device)
        launch(_quantize_kernel)[grid](amax_ptr=amax, AMAX_ONLY=True, GIVEN_SCALE=False, **common)
        if amax_only:
            return amax.reshape(()), scale
    else:
        amax = scale  # unused
    launch(_quantize_kernel)[grid](amax_ptr=amax, AMAX_ONLY=False, GIVEN_SCALE=False, **common)
    return q, scale.reshape(()) if granularity is Granularity.TENSOR else scale


def check_quantize_args(x: torch.Tensor, granularity, fmt, what: str):
    """Validate and normalise (granularity, fmt); raise ValueError naming the problem."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    check_fp8_input(x, what)
    granularity, fmt = Granularity(granularity), Fp8Format(fmt)
    if granularity is Granularity.BLOCK and x.dim() != 2:
        raise ValueError(
            f"128x128 block scaling needs a 2-D weight, got shape {tuple(x.shape)}; "
            "reshape it to (out_features, in_features) first"
        )
    return granularity, fmt


def quantize(
    x: torch.Tensor, granularity: Granularity, fmt: Fp8Format = Fp8Format.E4M3,
    power_of_2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`fp8compile.numerics.quantize` (same values, shapes, layout).

    Example::

        >>> q, s = quantize(x.cuda(), Granularity.GROUP, Fp8Format.E4M3, False)  # doctest: +SKIP
    """
    granularity, fmt = check_quantize_args(x, granularity, fmt, "quantize input")
    if x.dim() == 0 or x.numel() == 0:
        return nx.quantize(x, granularity, fmt, power_of_2)
    return quantize_rows(x, granularity, fmt, power_of_2)


# Rows per slice of a 128x128 weight block in _quantize_kernel (GRAN == 3, see there).
_BLOCK_SLICE = 32
# Tensorwise quantization of up to this many elements (rows and columns rounded up to powers
# of two) is one launch of one program (AMAX_AT == 2), up to 8 warps holding 64 values each.
# One SM then does all the arithmetic: on an H200 (benchmarks/quant.py --decode) 1x4096 took
# 1.8 us against 2.9 us for two launches, but 16x4096 10.1 us against 3.7 us.
_WHOLE_AMAX_MAX_ELEMS = 16384
# Tensorwise launch 1 writes one amax per program up to this many programs (AMAX_AT == 1),
# else folds them into one zeroed cell.
_AMAX_SLOTS_MAX = 1024
# Warps per program of the 128x128-tile kernels (the blockwise recipe's backward).  On an
# H200 (benchmarks/quant.py --tile-warps 4 8 16) 4 warps ran quantize_dual at 4096x14336 in
# 126 us against 182 us at 8 and 213 us at 16, although it then holds 255 registers and
# spills 48 bytes a thread (benchmarks/kernel_resources.py); requantize_t 74 us against 76
# and 92.  The fix-up launch (tiles holding NaN/Inf, see quantize_dual) keeps 8 warps: at 4
# it spills 224 bytes a thread with triton 3.6.
_TILE_WARPS = {"quantize_dual": 4, "quantize_dual_fixup": 8, "requantize_t": 4}


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Tensorwise ``numerics.quantize_with_scale`` (static or delayed scales) in one launch."""
    fmt = Fp8Format(fmt)
    check_fp8_input(x, "quantize_with_scale input")
    if x.dim() == 0 or x.numel() == 0 or scale.numel() != 1:
        return nx.quantize_with_scale(x, scale, Granularity.TENSOR, fmt)
    s = scale.reshape(1).to(device=x.device, dtype=torch.float32)
    return quantize_rows(x, Granularity.TENSOR, fmt, False, given_scale=s)[0]


def quantize_from_amax(x: torch.Tensor, amax: torch.Tensor, fmt: Fp8Format,
                       power_of_2: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale, amax(x))``: tensorwise quantization with the scale of a given ``amax``
    (one fp32 element; delayed scaling's history max), and the finite amax of ``x`` recorded
    in the same pass (0-dim fp32, as :func:`amax_tensor`).  One launch reads x once."""
    fmt = Fp8Format(fmt)
    check_fp8_input(x, "quantize_from_amax input")
    if amax.numel() != 1:
        raise ValueError(
            f"quantize_from_amax: amax has {amax.numel()} elements; it takes the one amax of "
            "a tensorwise scale"
        )
    if x.dim() == 0 or x.numel() == 0:
        s = nx.compute_scale(amax.reshape(()).float(), fmt, power_of_2)
        return (nx.quantize_with_scale(x, s, Granularity.TENSOR, fmt), s,
                nx.amax(x, Granularity.TENSOR).float())
    a = amax.reshape(1).to(device=x.device, dtype=torch.float32)
    out = torch.zeros(1, dtype=torch.float32, device=x.device)
    q, s = quantize_rows(x, Granularity.TENSOR, fmt, power_of_2, given_amax=a, amax_out=out)
    return q, s, out.reshape(())


def amax_tensor(x: torch.Tensor, unless: torch.Tensor | None = None) -> torch.Tensor:
    """``numerics.amax(x, TENSOR)``: the largest finite ``|x|`` (0-dim fp32), one launch.

    ``unless`` (an fp32 amax history on x's device): where it holds a non-zero value the
    launch returns at once and the result is 0, decided on the device (no host sync)."""
    check_fp8_input(x, "amax input")
    if x.dim() == 0 or x.numel() == 0:
        return nx.amax(x, Granularity.TENSOR).float()
    skip = None if unless is None else unless.reshape(-1).to(torch.float32).contiguous()
    return quantize_rows(x, Granularity.TENSOR, Fp8Format.E4M3, False, amax_only=True,
                         skip_if=skip)[0]


@triton.jit
def _fp8_bits_to_f32(raw, IS_E4M3: tl.constexpr):
    """Exact fp32 value of FP8 bit patterns (uint8), with integer ops only.

    Independent of how a Triton version (or its interpreter, which made E4M3 NaN finite)
    converts FP8: normals move exponent and mantissa into fp32's fields, subnormals are
    ``mantissa * 2**-9`` (E4M3) or ``* 2**-16`` (E5M2) with the sign bit OR-ed in (so -0.0
    stays -0.0; Triton's unary minus would give +0.0), and NaN/Inf are set explicitly.
    """
    r = raw.to(tl.int32)
    sign = (r & 0x80) << 24
    if IS_E4M3:
        e = (r >> 3) & 0xF
        m = r & 0x7
        normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 0.001953125
        sub = (sub.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        x = tl.where(e == 0, sub, normal)
        x = tl.where((r & 0x7F) == 0x7F, float("nan"), x)
    else:
        e = (r >> 2) & 0x1F
        m = r & 0x3
        normal = (sign | ((e + 112) << 23) | (m << 21)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 1.52587890625e-05
        sub = (sub.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        x = tl.where(e == 0, sub, normal)
        inf = tl.where(sign != 0, float("-inf"), float("inf"))
        x = tl.where(e == 31, tl.where(m == 0, inf, float("nan")), x)
    return x


@triton.jit
def _requantize_t_kernel(
    q_ptr, s_ptr, out_ptr, os_ptr, M, K,
    stride_qm, stride_sm, stride_sk, stride_om, stride_osk, stride_osm,
    IN_E4M3: tl.constexpr, IS_E4M3: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr,
    HW_CAST: tl.constexpr, BLOCK: tl.constexpr,
):
    """One 128x128 tile of FP8 ``q (M, K)`` with 1x128 group scales: dequantize in fp32, take
    the tile's amax, quantize, and write the tile transposed into ``out (K, M)`` with one
    block scale.  Reads 1 byte and writes 1 byte per element (dequantizing to bf16 and
    quantizing the transposed view moved 6).  The whole tile is loaded at once (167 registers
    at 4 warps, _TILE_WARPS), 1.2x faster on an H200 than two walks in 16-row slices."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK + tl.arange(0, BLOCK)
    rk = pid_k * BLOCK + tl.arange(0, BLOCK)
    mmask = rm < M
    kmask = rk < K
    rm64 = rm.to(tl.int64)
    raw = tl.load(q_ptr + rm64[:, None] * stride_qm + rk[None, :],
                  mask=mmask[:, None] & kmask[None, :], other=0)
    s = tl.load(s_ptr + rm64 * stride_sm + pid_k * stride_sk, mask=mmask, other=0.0)
    x = _fp8_to_f32(raw, IN_E4M3, HW_CAST) * s[:, None]
    sc = _tile_scale(x, FMAX, POW2)
    tl.store(os_ptr + pid_k * stride_osk + pid_m * stride_osm, sc)
    bits = _quantize_bits(x, sc, tl.math.div_rn(1.0, sc), FMAX, IS_E4M3, HW_CAST)
    tl.store(out_ptr + rk.to(tl.int64)[:, None] * stride_om + rm64[None, :], tl.trans(bits),
             mask=kmask[:, None] & mmask[None, :])


@triton.jit
def _fp8_to_f32(raw, IN_E4M3: tl.constexpr, HW_CAST: tl.constexpr):
    """fp32 values of FP8 bit patterns: the GPU's conversion (exact, NaN, ±Inf and
    subnormals included) when compiled, integer decoding in the interpreter."""
    if HW_CAST:
        if IN_E4M3:
            x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            x = raw.to(tl.float8e5, bitcast=True).to(tl.float32)
    else:
        x = _fp8_bits_to_f32(raw, IN_E4M3)
    return x


def requantize_t(
    q: torch.Tensor, scale: torch.Tensor, granularity: Granularity, to: Granularity,
    fmt: Fp8Format, power_of_2: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as :func:`fp8compile.numerics.requantize_t`; one Triton pass for 1x128 groups to
    128x128 blocks (the blockwise recipe's weight gradient), the reference otherwise."""
    granularity, to, fmt = Granularity(granularity), Granularity(to), Fp8Format(fmt)
    rows = q.reshape(-1, q.shape[-1]) if q.dim() else q
    if (granularity, to) != (Granularity.GROUP, Granularity.BLOCK) or rows.numel() == 0 \
            or rows.stride(-1) != 1 or q.dtype not in nx.FP8_FORMATS:
        return nx.requantize_t(q, scale, granularity, to, fmt, power_of_2)
    m, k = rows.shape
    out = torch.empty((k, m), dtype=fmt.dtype, device=q.device)
    out_scale = torch.empty((cdiv(k, nx.BLOCK), cdiv(m, nx.BLOCK)),
                            dtype=torch.float32, device=q.device)
    s2 = scale.reshape(m, -1)
    grid = (cdiv(m, nx.BLOCK), cdiv(k, nx.BLOCK))
    launch(_requantize_t_kernel)[grid](
        rows.view(torch.uint8), s2, out.view(torch.uint8), out_scale, m, k,
        rows.stride(0), s2.stride(0), s2.stride(1), out.stride(0),
        out_scale.stride(0), out_scale.stride(1),
        IN_E4M3=q.dtype == torch.float8_e4m3fn, IS_E4M3=fmt is Fp8Format.E4M3, FMAX=fmt.max,
        POW2=bool(power_of_2), HW_CAST=os.environ.get("TRITON_INTERPRET") != "1",
        BLOCK=nx.BLOCK, num_warps=_TILE_WARPS["requantize_t"],
    )
    return out, out_scale


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_dual_kernel(
    x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, flag_ptr, M, N,
    stride_xm, stride_xn, stride_sk, stride_stk,
    IS_E4M3: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr, HW_CAST: tl.constexpr,
    BLOCK: tl.constexpr,
    FIXUP: tl.constexpr,  # second launch: redo the tiles the first flagged
):
    """One 128x128 tile of ``x (M, N)`` quantized twice: 1x128 groups along N into
    ``q (M, N)`` and along M into ``qt (N, M)`` (the transpose), each with its scales stored
    M-contiguous like every GROUP scale (``s`` strides ``(1, M)``, ``st`` strides ``(1, N)``).

    Two launches.  The first assumes every value is finite: NaN-propagating maxima give
    the scales, and the payload skips the NaN/Inf codes.  It writes a flag for each tile where
    that was not true.  The second launch returns at once for unflagged tiles and redoes
    flagged ones with the full special-value handling, overwriting their outputs.  Splitting
    the two paths keeps each one's registers low; one kernel holding both paths took 255.

    The whole tile is loaded at once.  On an H200 that is 1.9x faster than walking the tile
    twice in 16-row slices, whose small loads left the memory system idle; 4 warps per tile
    are 1.4x faster again than 8 (_TILE_WARPS), although they hold 255 registers and spill
    a little (the fix-up launch keeps 8 warps, without a spill).  The transposed payload goes
    out through ``tl.trans``, so each row of ``qt`` is written as 128 contiguous bytes."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    flag = flag_ptr + pid_m * tl.num_programs(1) + pid_n
    if FIXUP:
        if tl.load(flag) == 0:
            return
    rm = pid_m * BLOCK + tl.arange(0, BLOCK)
    rn = pid_n * BLOCK + tl.arange(0, BLOCK)
    mmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    mask = mmask[:, None] & nmask[None, :]
    x = tl.load(x_ptr + rm64[:, None] * stride_xm + rn64[None, :] * stride_xn, mask=mask,
                other=0.0).to(tl.float32)
    if FIXUP:
        a = _finite_abs(x)
        row_amax = tl.max(a, axis=1)
        col_amax = tl.max(a, axis=0)
    else:
        a = tl.abs(x)
        row_amax = tl.reduce(a, 1, _nan_max)  # NaN or Inf if the row has one
        col_amax = tl.reduce(a, 0, _nan_max)
        # NaN < inf is False too.
        tl.store(flag, (tl.reduce(row_amax, 0, _nan_max) < float("inf")) == 0)
    s_row = _scale_from_amax(row_amax, FMAX, POW2)  # row m, group pid_n
    s_col = _scale_from_amax(col_amax, FMAX, POW2)  # column n, group pid_m
    tl.store(s_ptr + rm64 + pid_n * stride_sk, s_row, mask=mmask)
    tl.store(st_ptr + rn64 + pid_m * stride_stk, s_col, mask=nmask)
    q = _quantize_bits(x, s_row[:, None], tl.math.div_rn(1.0, s_row)[:, None], FMAX, IS_E4M3,
                       HW_CAST, FINITE=not FIXUP)
    tl.store(q_ptr + rm64[:, None] * N + rn64[None, :], q, mask=mask)
    qt = _quantize_bits(x, s_col[None, :], tl.math.div_rn(1.0, s_col)[None, :], FMAX, IS_E4M3,
                        HW_CAST, FINITE=not FIXUP)
    tl.store(qt_ptr + rn64[:, None] * M + rm64[None, :], tl.trans(qt),
             mask=nmask[:, None] & mmask[None, :])


def quantize_dual(
    x: torch.Tensor, fmt: Fp8Format, power_of_2: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same as :func:`fp8compile.numerics.quantize_dual`, reading ``x`` once."""
    fmt = Fp8Format(fmt)
    check_fp8_input(x, "quantize_dual input")
    if x.dim() != 2 or x.numel() == 0:
        return nx.quantize_dual(x, fmt, power_of_2)
    m, n = x.shape
    q = torch.empty((m, n), dtype=fmt.dtype, device=x.device)
    qt = torch.empty((n, m), dtype=fmt.dtype, device=x.device)
    s = torch.empty_strided((m, cdiv(n, nx.BLOCK)), (1, m), dtype=torch.float32,
                            device=x.device)
    st = torch.empty_strided((n, cdiv(m, nx.BLOCK)), (1, n), dtype=torch.float32,
                             device=x.device)
    grid = (cdiv(m, nx.BLOCK), cdiv(n, nx.BLOCK))
    flags = torch.empty(grid, dtype=torch.int8, device=x.device)
    for fixup in (False, True):
        launch(_quantize_dual_kernel)[grid](
            x, q.view(torch.uint8), s, qt.view(torch.uint8), st, flags, m, n,
            x.stride(0), x.stride(1), s.stride(1), st.stride(1),
            IS_E4M3=fmt is Fp8Format.E4M3, FMAX=fmt.max, POW2=bool(power_of_2),
            HW_CAST=os.environ.get("TRITON_INTERPRET") != "1", BLOCK=nx.BLOCK, FIXUP=fixup,
            num_warps=_TILE_WARPS["quantize_dual_fixup" if fixup else "quantize_dual"],
        )
    return q, s, qt, st


@triton.jit
def _history_cast_t_kernel(
    x_ptr, q_ptr, qt_ptr, s_ptr, slots_ptr, amax_out_ptr, hist_ptr,
    M, N, n_slots, hist_n, stride_xm, stride_xn,
    AMAX_ONLY: tl.constexpr,  # launch 1: this tile's finite amax into its slot (first step)
    HISTORY: tl.constexpr,  # False: dynamic scaling, the amax folded into a zeroed cell
    HIST_BLOCK: tl.constexpr, SLOTS: tl.constexpr,
    IS_E4M3: tl.constexpr, FMAX: tl.constexpr, POW2: tl.constexpr, HW_CAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Delayed scaling's tensorwise cast of ``x (M, N)`` into ``q (M, N)`` and its transpose
    ``qt (N, M)`` in one pass, by ``BLOCK x BLOCK`` tiles (the backward's dY: dX reads q,
    dW reads qt).  Launch 1 (``AMAX_ONLY``) writes each tile's finite amax into its slot while
    the history ``hist_ptr`` is all zero, and returns at once otherwise; it also zeroes the
    ``amax_out`` cell.  Launch 2 takes the scale from the history's max (or, on the first
    step, the slots' max), stores it, casts, and folds x's finite amax into ``amax_out``.

    Without ``HISTORY`` (dynamic scaling) launch 1 folds every tile's amax into the zeroed
    cell ``slots_ptr`` and launch 2 takes the scale from it (no ``amax_out``)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    hist_max = tl.full([], 0.0, tl.float32)
    if HISTORY:
        h = tl.arange(0, HIST_BLOCK)
        hist_max = tl.max(tl.load(hist_ptr + h, mask=h < hist_n, other=0.0), axis=0)
        if AMAX_ONLY:
            if (pid_m == 0) & (pid_n == 0):
                tl.store(amax_out_ptr, 0.0)
            if hist_max > 0:
                return
    rows = (pid_m * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (pid_n * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask,
                other=0.0).to(tl.float32)
    a = tl.max(tl.max(_finite_abs(x), axis=1), axis=0)
    if AMAX_ONLY:
        if HISTORY:
            tl.store(slots_ptr + pid_m * tl.num_programs(1) + pid_n, a)
        else:
            tl.atomic_max(slots_ptr, a)  # a >= 0: exact and order-independent
    else:
        if HISTORY:
            am = _history_or_slots_max(hist_max, slots_ptr, n_slots, SLOTS)
        else:
            am = tl.load(slots_ptr)
        s = _scale_from_amax(am, FMAX, POW2)
        if (pid_m == 0) & (pid_n == 0):
            tl.store(s_ptr, s)
        bits = _quantize_bits(x, s, tl.math.div_rn(1.0, s), FMAX, IS_E4M3, HW_CAST)
        tl.store(q_ptr + rows[:, None] * N + cols[None, :], bits, mask=mask)
        # Through tl.trans, each row of qt is written as BLOCK contiguous bytes.
        tl.store(qt_ptr + cols[:, None] * M + rows[None, :], tl.trans(bits),
                 mask=(cols[:, None] < N) & (rows[None, :] < M))
        if HISTORY:
            tl.atomic_max(amax_out_ptr, a)


_CAST_T_BLOCK = 64


def quantize_history_t(
    x: torch.Tensor, history: torch.Tensor | None, fmt: Fp8Format = Fp8Format.E4M3,
    power_of_2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, qt, scale, amax)``: delayed scaling's tensorwise cast of a 2-D ``x`` and of its
    transpose in one read (``qt == q.t().contiguous()``), with the scale of ``history``'s
    max (of x's amax while the history is all zero) and x's finite amax recorded.

    Two launches and no fill: as ``quantize_rows(history=...)``, by 64x64 tiles, so that the
    backward's dW GEMM gets dYᵀ without a transpose pass (1 byte read and written per
    element, and a launch, less per linear).

    ``history=None``: dynamic scaling (the scale of x's own amax, folded into a zeroed cell
    by launch 1); the returned amax is then that amax."""
    fmt = Fp8Format(fmt)
    check_fp8_input(x, "quantize_history_t input")
    if x.dim() != 2:
        raise ValueError(
            f"quantize_history_t: x must be 2-D (M, N), got shape {tuple(x.shape)}; reshape "
            "it to (tokens, features) first"
        )
    m, n = x.shape
    if m == 0 or n == 0:
        raise ValueError("quantize_history_t: x is empty; the op's reference serves it")
    dynamic = history is None
    hist = (torch.zeros(1, dtype=torch.float32, device=x.device) if dynamic
            else history.reshape(-1).to(torch.float32).contiguous())
    q = torch.empty((m, n), dtype=fmt.dtype, device=x.device)
    qt = torch.empty((n, m), dtype=fmt.dtype, device=x.device)
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    out = torch.empty(1, dtype=torch.float32, device=x.device)
    grid = (cdiv(m, _CAST_T_BLOCK), cdiv(n, _CAST_T_BLOCK))
    n_slots = grid[0] * grid[1]
    slots = (torch.zeros(1, dtype=torch.float32, device=x.device) if dynamic
             else torch.empty(n_slots, dtype=torch.float32, device=x.device))
    common = dict(
        x_ptr=x, q_ptr=q.view(torch.uint8), qt_ptr=qt.view(torch.uint8), s_ptr=scale,
        slots_ptr=slots, amax_out_ptr=out, hist_ptr=hist, M=m, N=n, n_slots=n_slots,
        hist_n=hist.numel(), stride_xm=x.stride(0), stride_xn=x.stride(1), HISTORY=not dynamic,
        HIST_BLOCK=next_pow2(max(hist.numel(), 1)),
        SLOTS=min(next_pow2(n_slots), _AMAX_SLOTS_MAX),
        IS_E4M3=fmt is Fp8Format.E4M3, FMAX=fmt.max, POW2=bool(power_of_2),
        HW_CAST=os.environ.get("TRITON_INTERPRET") != "1", BLOCK=_CAST_T_BLOCK, num_warps=4,
    )
    launch(_history_cast_t_kernel)[grid](AMAX_ONLY=True, **common)
    launch(_history_cast_t_kernel)[grid](AMAX_ONLY=False, **common)
    return q, qt, scale.reshape(()), (slots if dynamic else out).reshape(())
