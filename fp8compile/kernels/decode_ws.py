"""FP8 GEMM for decode sizes on Hopper (Gluon): the weight streamed by TMA, swapped operands.

At a handful of tokens an FP8 linear is a read of its weight, and what decides its speed is
how much of that read is in flight.  :mod:`.gemm`'s Triton kernel loads its tiles with
pointer loads that Triton's software pipeline keeps a few steps ahead of the math, and at
one row :mod:`.gemv` streams the weight through the CUDA cores.  Here each program asks
the TMA engine for its first :data:`STAGES` K tiles before any math, and for the next one
as soon as a stage has been read, so the weight stream does not wait on the math's
latency:

* the 64-row weight tile is the ``wgmma``'s left operand (64 rows per warpgroup) and the
  16-row token tile its right one (both K-major as stored; tokens past M are the TMA's
  zero fill), so the accumulator is ``[64 weight rows, 16 tokens]``;
* a program owns one column tile and all of K where the column tiles alone fill the SMs
  (N >= 64 x SMs: a LLaMA-8B block's fused q/k/v and gate/up projections, 14336-row
  weights).  A narrower weight splits K (:func:`launch_split`): each split writes its fp32
  partial, and the last program of the column tile to arrive adds them in split order and
  runs the epilogue, counted by per-tile arrival counters that it zeroes again
  (:func:`.gemm._tile_counters`: made outside CUDA-graph trees' pools, since a buffer kept
  from a tree's warm-up breaks the tree; first needed inside a plain capture, it is made
  there and zeroed at each replay);
* each program starts its K walk at a tile of its own (``pid_n`` modulo its K tiles): the
  programs would otherwise all read the same token tile and the same scales from L2 at
  once.  The fp32 sum of K blocks then runs in a rotated order per column tile, which
  changes the result only by fp32 rounding;
* blockwise scales promote every 128 of K: each K block's product is waited for and added
  to the fp32 accumulator times ``x_scale[token, kb] * w_scale[n // 128, kb]``, loaded a
  block ahead.  ``precise`` row/tensor scales add each block's product unscaled and apply
  both scales after the loop; ``fast`` chains the products on the tensor cores.  Within a
  block the tensor core accumulates FP8 products as cuBLAS's and :mod:`.blockwise_ws`'s
  kernels do (promotion every 128 of K, the recipes' definition);
* the epilogue adds the bias and up to two residuals in fp32 and rounds once, as
  :func:`.gemm._epilogue` does (no activation: those GEMMs stay on the Triton kernel).

On an H200 (docs/performance.md, "Decode GEMMs streamed by TMA") 1 to 8 rows of 12288-,
14336- and 28672-row weights (K = 4096) ran 1.66-1.93x bf16 ``F.linear``, where the
kernels before ran 1.33-1.82x; split four ways, 1 to 8 rows of 4096-row weights ran as fast
as the Triton kernel or up to 13% faster (1x4096x14336: 17.7 against 20.3 us; "Decode GEMMs
on 4096-row weights: K split in the TMA kernel").  Only Hopper (sm_90), and only as an
opaque call in a compiled graph: Gluon kernels cannot be traced into Inductor's code, so
there :func:`.select.choose_traced` times it against the Triton kernel per GEMM.
``FP8COMPILE_DECODE_GLUON=0`` (or ``FP8COMPILE_GLUON=0``) turns it off.
"""

from __future__ import annotations

import os

import torch

from ..numerics import FP8_FORMATS, Granularity
from . import tuning
from .blockwise_ws import HAVE_GLUON, check_residuals, operands_unsupported, recipe_unsupported

if HAVE_GLUON:  # the Gluon names (and Triton-version shims) of the warp-specialized kernel
    from .blockwise_ws import (
        TensorDescriptor,
        _barrier,
        _gl_dtype,
        _tma_load,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

__all__ = ["MAX_M", "decode_mm", "decode_sized", "launch_split", "unsupported"]

# weight rows per program (one m64 warpgroup), token rows of the tile, K per stage
BLOCK_N, BLOCK_T, BLOCK_K = 64, 16, 128
# K tiles requested ahead: 4 measured as fast as 6 or 8 and leaves the most programs per SM
STAGES = 4
# GEMMs of at most this many rows take the kernel (docs/performance.md)
MAX_M = 8
# a weight whose column tiles leave SMs idle splits K for up to this many programs per SM,
# each split keeping at least MIN_SPLIT_TILES K tiles (docs/performance.md)
SPLIT_WAVES = 2
MIN_SPLIT_TILES = 4
_MODE = {"promote": 0, "precise": 1, "fast": 2}


def decode_sized(m) -> bool:
    """Whether a GEMM of ``m`` rows is of this kernel's sizes (a static M of at most
    :data:`MAX_M`): the launcher then asks :func:`unsupported` instead of
    :func:`.blockwise_ws.unsupported`, and the backend choice keys it apart."""
    return type(m) is int and m <= MAX_M


def unsupported(xq: torch.Tensor, xs: torch.Tensor, x_gran, wq: torch.Tensor,
                ws: torch.Tensor, w_gran, out_dtype: torch.dtype, activation: str,
                residuals: int, layout: bool = True) -> str | None:
    """Why this kernel cannot run the GEMM (``None`` when it can); ``xq`` is (M, K), or
    (..., K) with ``layout=False``, which skips the stride and alignment rules (the
    launcher meets them by copying).  Only sizes, dtypes, strides and the device are read."""
    if os.environ.get("FP8COMPILE_GLUON", "1") == "0":
        return "disabled by FP8COMPILE_GLUON=0"
    if os.environ.get("FP8COMPILE_DECODE_GLUON", "1") == "0":
        return "disabled by FP8COMPILE_DECODE_GLUON=0"
    why = recipe_unsupported(Granularity(x_gran), Granularity(w_gran))
    if why:
        return why
    if activation != "none":
        return f"no {activation} epilogue in the decode kernel"
    if int(residuals) > 2:
        return f"{int(residuals)} residuals: the epilogue adds two at most"
    if xq.dtype != wq.dtype or xq.dtype not in FP8_FORMATS:
        return "both operands in one FP8 format"
    if xs.dtype != torch.float32 or ws.dtype != torch.float32:
        return "fp32 scales"
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"a {out_dtype} output (bf16, fp16 or fp32 only)"
    k, n = xq.shape[-1], wq.shape[0]
    m = xq.numel() // max(1, k)
    if type(m) is not int:
        return "a dynamic M (the kernel serves a static decode size)"
    if m > MAX_M or m == 0:
        return f"M={m}: the decode kernel takes 1 to {MAX_M} rows"
    if k == 0 or k % 16:
        return "TMA needs 16-byte rows: K % 16 == 0 and K > 0"
    sms, tiles = tuning.num_sms(xq.device), tuning.cdiv(n, BLOCK_N)
    split = launch_split(n, k, sms)
    if tiles * split < sms:
        return (f"N={n}, K={k}: {tiles} column tiles of {BLOCK_N} in {split} split(s) of K "
                f"leave some of the {sms} SMs idle (each split keeps {MIN_SPLIT_TILES} K tiles "
                "of 128 at least; the Triton kernel serves it)")
    return operands_unsupported(xq, wq, layout)


def launch_split(n: int, k: int, sms: int) -> int:
    """How many ways the kernel splits K for an ``n``-row weight: none where its 64-row
    column tiles fill the SMs, else up to :data:`SPLIT_WAVES` programs per SM, each split
    keeping at least :data:`MIN_SPLIT_TILES` K tiles.  H200, 4096-row weights (64 tiles,
    docs/performance.md): splits of 4 and 5 within 0.4 us of each other at 1-8 rows, 4
    the faster in most cells; 2 up to 3.6 us slower, 8 up to 1.9 us."""
    tiles, k_tiles = tuning.cdiv(n, BLOCK_N), tuning.cdiv(k, BLOCK_K)
    if tiles >= sms:
        return 1
    return max(1, min(SPLIT_WAVES * sms // tiles, k_tiles // MIN_SPLIT_TILES))


if HAVE_GLUON:

    @gluon.jit
    def _block_factor(as_ptr, ws_ptr, toks, tmask, kb, stride_as0, stride_as1, w_row,
                      stride_ws1):
        """Blockwise scales of K block ``kb``: each token's group scale times the tile's
        weight block scale (64 rows lie in one 128-row block)."""
        return (gl.load(as_ptr + toks * stride_as0 + kb * stride_as1, mask=tmask, other=0.0)
                * gl.load(ws_ptr + w_row + kb * stride_ws1))

    @gluon.jit
    def _request(w_desc, x_desc, ready, w_bufs, x_bufs, s, n0, k):
        """Ask the TMA engine for the K tile at ``k`` into stage ``s``."""
        mbarrier.expect(ready.index(s), w_desc.block_type.nbytes + x_desc.block_type.nbytes)
        _tma_load(w_desc, [n0, k], ready.index(s), w_bufs.index(s))
        _tma_load(x_desc, [0, k], ready.index(s), x_bufs.index(s))

    @gluon.jit
    def _finish(acc, toks, cols, tmask, nmask, bias_ptr, r1_ptr, r2_ptr, out_ptr, stride_om,
                HAS_BIAS: gl.constexpr, RES: gl.constexpr):
        """The epilogue: bias, then the residuals (laid out as the output), in fp32; one
        rounding to the output's dtype."""
        if HAS_BIAS:
            acc = acc + gl.load(bias_ptr + cols, mask=nmask, other=0.0).to(gl.float32)[:, None]
        mask = nmask[:, None] & tmask[None, :]
        offs = toks[None, :] * stride_om + cols[:, None]
        if RES >= 1:
            acc = acc + gl.load(r1_ptr + offs, mask=mask, other=0.0).to(gl.float32)
        if RES == 2:
            acc = acc + gl.load(r2_ptr + offs, mask=mask, other=0.0).to(gl.float32)
        gl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def _decode_kernel(w_desc, x_desc, as_ptr, ws_ptr, bias_ptr, r1_ptr, r2_ptr, out_ptr,
                       part_ptr, cnt_ptr,
                       M, N, K, stride_as0, stride_as1, stride_ws0, stride_ws1, stride_om,
                       STAGES: gl.constexpr, MODE: gl.constexpr, SPLIT: gl.constexpr,
                       HAS_BIAS: gl.constexpr, RES: gl.constexpr):
        BN: gl.constexpr = w_desc.block_type.shape[0]
        BK: gl.constexpr = w_desc.block_type.shape[1]
        BT: gl.constexpr = x_desc.block_type.shape[0]
        PROMOTE: gl.constexpr = MODE == 0
        FAST: gl.constexpr = MODE == 2
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        n0 = pid_n * BN
        # this program's share of the K tiles: [k_lo, k_lo + k_tiles), walked from a tile of
        # its own (see the module's docstring)
        all_tiles = gl.cdiv(K, BK)
        k_lo = pid_k * all_tiles // SPLIT
        k_tiles = (pid_k + 1) * all_tiles // SPLIT - k_lo
        rot = pid_n % k_tiles

        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, BK], w_desc.layout)
        x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BT, BK], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        fence_async_shared()
        for i in gl.static_range(STAGES):
            if i < k_tiles:
                _request(w_desc, x_desc, ready, w_bufs, x_bufs, i, n0,
                         (k_lo + (i + rot) % k_tiles) * BK)

        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, BT, 32])
        toks = gl.arange(0, BT, layout=gl.SliceLayout(0, layout))
        cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, layout))
        tmask = toks < M
        nmask = cols < N
        acc = gl.zeros([BN, BT], gl.float32, layout)
        p = gl.zeros([BN, BT], gl.float32, layout)
        w_row = (n0 // 128) * stride_ws0
        if PROMOTE:
            f = _block_factor(as_ptr, ws_ptr, toks, tmask, k_lo + rot, stride_as0, stride_as1,
                              w_row, stride_ws1)
        for i in range(k_tiles):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            if FAST:
                acc = warpgroup_mma(w_bufs.index(s), x_bufs.index(s).permute((1, 0)), acc,
                                    use_acc=True, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            else:
                t = warpgroup_mma(w_bufs.index(s), x_bufs.index(s).permute((1, 0)), p,
                                  use_acc=False, is_async=True)
                if PROMOTE:  # the next block's factor, under this block's wgmma
                    f_next = _block_factor(as_ptr, ws_ptr, toks, tmask,
                                           k_lo + (i + 1 + rot) % k_tiles, stride_as0,
                                           stride_as1, w_row, stride_ws1)
                p = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
            _barrier()  # every warp's wgmma has read stage s: it may be refilled
            if i + STAGES < k_tiles:
                _request(w_desc, x_desc, ready, w_bufs, x_bufs, s, n0,
                         (k_lo + (i + STAGES + rot) % k_tiles) * BK)
            if PROMOTE:
                acc = acc + p * f[None, :]
                f = f_next
            elif not FAST:
                acc = acc + p
        if not PROMOTE:  # row/tensor scales (stride 0: one element), constant along K
            acc = acc * gl.load(as_ptr + toks * stride_as0, mask=tmask, other=0.0)[None, :]
            acc = acc * gl.load(ws_ptr + cols * stride_ws0, mask=nmask, other=0.0)[:, None]
        if SPLIT == 1:
            _finish(acc, toks, cols, tmask, nmask, bias_ptr, r1_ptr, r2_ptr, out_ptr,
                    stride_om, HAS_BIAS, RES)
        else:
            # Each split writes its fp32 partial ([SPLIT, M, N]); the last program of the
            # column tile to arrive adds them, in split order, and runs the epilogue.  The
            # barrier orders every thread's partial before the counter's release; the
            # acquire, every read after it.  That program zeroes the counter again.
            mask = nmask[:, None] & tmask[None, :]
            p_offs = toks[None, :] * N + cols[:, None]
            gl.store(part_ptr + pid_k * M * N + p_offs, acc, mask=mask)
            _barrier()
            arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:
                total = gl.zeros([BN, BT], gl.float32, layout)
                for j in gl.static_range(SPLIT):
                    other = gl.load(part_ptr + j * M * N + p_offs, mask=mask & (pid_k != j),
                                    other=0.0, cache_modifier=".cg")
                    total += gl.where(pid_k == j, acc, other)
                gl.store(cnt_ptr + pid_n, 0)
                _finish(total, toks, cols, tmask, nmask, bias_ptr, r1_ptr, r2_ptr, out_ptr,
                        stride_om, HAS_BIAS, RES)


def decode_mm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
              bias: torch.Tensor | None, out: torch.Tensor, x_gran=Granularity.GROUP,
              w_gran=Granularity.BLOCK, accumulation: str = "precise",
              residuals: tuple[torch.Tensor, ...] = (), split: int | None = None
              ) -> torch.Tensor:
    """Write ``(xq·xs) @ (wq·ws)ᵀ + bias (+ residuals)`` into ``out`` (M, N), M at most
    :data:`MAX_M`; call only when :func:`unsupported` returns ``None``.  Scales as
    :func:`.blockwise_ws.blockwise_mm` takes them (blockwise: ``xs`` (M, ceil(K/128)), ``ws``
    (ceil(N/128), ceil(K/128)); row/tensor: M or one element, N or one), any strides.
    Blockwise scales are always promoted; row/tensor scales follow ``accumulation``.
    ``residuals``: up to two (M, N) tensors laid out as ``out``, added in fp32 before the
    one rounding.  ``split`` forces the split of K (:func:`launch_split` otherwise, at most
    one per K tile); a split launch allocates its fp32 partials (split x M x N) and takes
    the launcher's per-tile arrival counters (:func:`.gemm._tile_counters`)."""
    from .gemm import _scale_strides, _tile_counters

    m, k = xq.shape
    n = wq.shape[0]
    xg, wg = Granularity(x_gran), Granularity(w_gran)
    check_residuals(residuals, out, "decode_mm")
    if len(residuals) > 2 or out.stride(1) != 1:
        raise ValueError("decode_mm: at most two residuals, and a row-major output")
    if xg is Granularity.GROUP:
        sa0, sa1 = _scale_strides(xs)
        sw0, sw1 = _scale_strides(ws)
        mode = _MODE["promote"]
    else:
        sa0 = _scale_strides(xs)[0] if xg is Granularity.ROW else 0
        sw0 = _scale_strides(ws)[0] if wg is Granularity.ROW else 0
        sa1 = sw1 = 0
        mode = _MODE["fast" if accumulation == "fast" else "precise"]
    g = _gl_dtype(xq.dtype)
    w_l = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], g)
    x_l = gl.NVMMASharedLayout.get_default_for([BLOCK_T, BLOCK_K], g)
    w_d = TensorDescriptor(wq, [n, k], [k, 1], [BLOCK_N, BLOCK_K], w_l)
    x_d = TensorDescriptor(xq, [m, k], [k, 1], [BLOCK_T, BLOCK_K], x_l)
    r = list(residuals) + [out] * (2 - len(residuals))  # out: unread
    tiles = tuning.cdiv(n, BLOCK_N)
    if split is None:
        split = launch_split(n, k, tuning.num_sms(xq.device))
    split = max(1, min(int(split), tuning.cdiv(k, BLOCK_K)))
    if split > 1:
        part = torch.empty(split * m * n, dtype=torch.float32, device=out.device)
        counters = _tile_counters(out.device, tiles)
    else:
        part = counters = out  # unread
    _decode_kernel[(tiles, split)](
        w_d, x_d, xs, ws, bias if bias is not None else out, r[0], r[1], out, part, counters,
        m, n, k, sa0, sa1, sw0, sw1, out.stride(0),
        STAGES=STAGES, MODE=mode, SPLIT=split, HAS_BIAS=bias is not None, RES=len(residuals),
        num_warps=4)
    return out
