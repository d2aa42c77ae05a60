"""Warp-specialized FP8 GEMM with promoted accumulation for Hopper (Gluon).

``(xq·s_x) @ (wq·s_w)ᵀ + bias``, blockwise scales first of all.

The recipe is DeepSeek-V3's: 1x128 activation groups times 128x128 weight blocks, each
128-wide K block multiplied on the tensor cores and then promoted into an fp32 accumulator
with its two scales.  :mod:`.gemm`'s Triton kernel computes the same thing, but Triton lowers
a dot whose result is not the next dot's accumulator with a full ``wgmma`` wait right after
it, so the tensor cores idle while each warpgroup promotes (0.60-0.65x cuBLAS).  Here the
schedule is written out in Gluon, Triton's lower-level dialect:

* one 1-warp **loader** partition streams ``A`` (BM x 128) and ``B`` (BN x 128) tiles through
  a ring of ``STAGES`` shared-memory buffers with TMA, one ``ready`` mbarrier per stage
  (five, or four beside fp32 output tiles: :data:`PROMOTED_STAGES`);
* two 4-warp **math** partitions each own half of the BM=128 rows (one ``m64`` wgmma
  warpgroup each) and release a stage through its ``empty`` mbarrier (count 2);
* each math warpgroup takes the K blocks in runs of :data:`PROMOTED_RUN` (8), alternating
  between two partial tiles: it issues the first two blocks' wgmma, waits for the first only
  (``num_outstanding=1``), promotes it while the second runs on the tensor cores, then issues
  the third block into the freed tile, and so on; only the run's last promotion has no wgmma
  of its own under it.  Nothing is in flight across the loop's back edge: a loop-carried
  in-flight accumulator makes ptxas serialize every wgmma of the loop (C7514).  Each
  promotion is pinned before the next wgmma by an opaque move (``_settled``): otherwise the
  compiler sinks the promotion's multiply-adds below the wgmma that reuses the partial tile,
  both tiles' registers are live at once, and the kernel spills (2.4 KB at runs of four);
* each block's scale factor is loaded four blocks ahead, so its global-memory latency is
  hidden under the wgmma in between (two ahead left blockwise group scales, read from L2,
  late at K=14336);
* the grid is persistent (one program per SM, tiles in grouped order), and the bf16/fp16/
  fp32 tile leaves through shared memory with a TMA store, overlapping the next tile's loads.

The same kernel serves per-row and per-tensor scales (on both operands):

* with ``precise`` accumulation, where the Triton kernel has the same promotion problem:
  each K block is promoted with the row scale alone (the weight factor's load is masked to
  one), and the finished tile is multiplied by the per-column weight scales before the bias;
* with ``fast`` accumulation (``FAST``): no promotion, so each warpgroup chains its wgmma on
  one accumulator over all of K, and a stage is released as soon as the wgmma reading it
  has retired.  The tile is 128x256 (:data:`FAST_TILE`), three 48 KB stages: the wider
  wgmma reads less shared memory per FLOP, and it runs at cuBLAS's speed where the
  128x128 tile ran at 0.92-0.97x (docs/performance.md).  The epilogue's column vectors are
  loaded before the K loop, a few elements per thread, and spread to the accumulator's
  layout after it.  With ``SWIGLU`` the fast path's epilogue is SwiGLU: the weight is
  ``torch.cat([gate, up])``, and each 256-wide tile loads 128 rows of gate and the matching
  128 rows of up (two TMA loads into the two halves of the stage), so the tile holds a gate
  tile and its up tile, both halves of every thread's registers, and ``silu(gate) * up``
  leaves as a 128-wide tile.  With ``RES`` (one or two residuals: a transformer block's last add,
  ``(x + o) + down``, takes x and o apart so that ``x + o`` is never rounded) the
  epilogue adds residual tiles in fp32 before its one rounding, on this path and on the
  promoted one.  The first comes by TMA into the output tile's shared memory during the K
  loop, once the previous tile's store has left it; a second follows it there after the K
  loop.  An opaque move first fixes the scaled tile in registers: without it the compiler
  sinks the column scaling below the loads, and the scales, the bias and the loaded tile
  together spill.  With residuals the promoted path's partial tiles are the tile's own
  (zeroed per tile, not carried across tiles), so their registers are free for the
  residual tile after the K loop.

Blockwise scales with the SwiGLU epilogue take a 128x256 tile (:data:`WIDE_TILE`): gate in
the low and up in the high 128 columns, each with its own weight block's scales.  Each math
warpgroup keeps two 64x128 accumulators and one partial tile, so every promotion waits with
nothing of its own in flight (the other warpgroup's wgmma runs under it).  The epilogue
computes ``silu(gate) * up`` in fp32 and writes it in E4M3 with one scale per row of the
128-wide group, which is what the down projection reads: h is never written in high
precision.  On an H200 the step took 0.94-0.98x the time of cuBLAS's GEMM and the separate
quantization (docs/performance.md).

Registers: 64 fp32 per thread for the accumulator and for each partial tile (promoted,
128x128 tile, two warpgroups), 128 for the fast path's 64x256 accumulator; the math
partitions ask for 232 registers, the loader 40.  Offline compilation for sm_90a checks the
absence of spills and of ptxas' serialization warnings for both paths
(``tests/kernels/test_blockwise_ws.py``).

Only Hopper (sm_90) and only eager launches: Gluon kernels cannot be traced into an
Inductor graph, so compiled graphs keep the Triton kernel / cuBLAS choice of :mod:`.select`.
"""

from __future__ import annotations

import os

import torch

from ..numerics import FP8_FORMATS, Granularity
from . import tuning

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # TMA copies: async_load / async_store from Triton 3.7 on, which removed the older names
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    # a barrier of the calling partition's warps: gl.thread_barrier up to Triton 3.6, then
    # gl.barrier
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    HAVE_GLUON = True
except ImportError:  # a Triton without Gluon's Hopper API
    HAVE_GLUON = False

__all__ = ["HAVE_GLUON", "blockwise_mm", "precompile", "unsupported"]

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 128
# 32 KB a stage.  With pairs of K blocks 3 stages measured 6-7% slower than 4 and 6 no
# faster; with runs of eight, 5 measured 0-2.5% faster than 4 (H200, docs/performance.md).
# An fp32 output's tiles leave room for 4 only.
PROMOTED_STAGES = (5, 4)
PROMOTED_TILE = (BLOCK_M, BLOCK_N, BLOCK_K, PROMOTED_STAGES[0])
# K blocks per promoted run (:func:`_promoted_run`): 8 measured 1-5% faster than pairs on
# the H200, 16 no faster than 8
PROMOTED_RUN = gl.constexpr(8) if HAVE_GLUON else 8
# Fast accumulation: one accumulator of 64x256 per math warpgroup (128 registers) and three
# 48 KB stages; the output tiles take 64 KB of shared memory.
FAST_TILE = (128, 256, 128, 3)
MATH_REGS, LOAD_REGS = 232, 40
# The SwiGLU epilogue with promoted (blockwise) scales: a 128x256 tile, gate in the low and
# up in the high 128 columns (loaded from the two halves of the stacked weight), so that each row's
# 128 outputs of h are one 1x128 group, cast to E4M3 with its own scale in the epilogue.
# Each math warpgroup keeps two 64x128 accumulators and one partial tile (192 registers);
# three 48 KB stages.
WIDE_TILE = (128, 256, 128, 3)
MIN_M = 257  # below, the split-K Triton kernel keeps the SMs busy (decode)
# Shared memory a Hopper block may take (227 KB), less what the barriers and the compiler's
# scratch take besides the tiles (2 KB measured for the fast tile).
SHARED_MEMORY = 232448 - 4096


def _shared_bytes(tile, swiglu: bool, out_bytes: int) -> int:
    """The A/B stages and the two output tiles (one per math warpgroup) of ``tile``: an
    fp32 output of the fast tile (256 wide) does not fit beside its three stages."""
    bm, bn, bk, stages = tile
    out_n = bn // 2 if swiglu else bn
    return stages * (bm + bn) * bk + 2 * (bm // 2) * out_n * out_bytes


def _tile(fast: bool, swiglu: bool, out_bytes: int) -> tuple[int, int, int, int]:
    """``(BM, BN, BK, stages)`` of a launch: :data:`FAST_TILE` for fast accumulation,
    :data:`WIDE_TILE` for the promoted SwiGLU epilogue, else the promoted tile with as many
    of :data:`PROMOTED_STAGES` as fit beside its output tiles (the fewest when none fits:
    :func:`unsupported` says so)."""
    if fast:
        return FAST_TILE
    if swiglu:
        return WIDE_TILE
    for stages in PROMOTED_STAGES:
        tile = (BLOCK_M, BLOCK_N, BLOCK_K, stages)
        if _shared_bytes(tile, swiglu, out_bytes) <= SHARED_MEMORY:
            break
    return tile


_OUTER = (Granularity.ROW, Granularity.TENSOR)


def accumulates_fast(x_gran, w_gran, accumulation: str) -> bool:
    """Whether the kernel takes its fast path (:data:`FAST_TILE`, one tensor-core
    accumulator): row/tensor scales on both operands with ``fast`` accumulation; every other
    GEMM it serves is promoted."""
    return (Granularity(x_gran) in _OUTER and Granularity(w_gran) in _OUTER
            and accumulation == "fast")


def recipe_unsupported(xg: Granularity, wg: Granularity) -> str | None:
    """The scales a Gluon GEMM takes (this kernel's and :mod:`.decode_ws`'s): 1x128
    activation groups with 128x128 weight blocks, or row/tensor scales on both operands."""
    if (xg in _OUTER and wg in _OUTER) or (xg is Granularity.GROUP and wg is Granularity.BLOCK):
        return None
    return ("only 1x128 activation groups x 128x128 weight blocks, or row/tensor scales on "
            "both operands")


def check_residuals(residuals, out: torch.Tensor, caller: str) -> None:
    """Raise unless each residual is laid out as ``out`` (dtype, shape, strides): a Gluon
    GEMM's epilogue reads it with the output's addressing."""
    for r in residuals:
        if r.dtype != out.dtype or r.shape != out.shape or r.stride() != out.stride():
            raise ValueError(f"{caller}: a residual {r.dtype} {tuple(r.shape)} with strides "
                             f"{r.stride()} must be laid out as the output ({out.dtype} "
                             f"{tuple(out.shape)}, strides {out.stride()})")


def unsupported(xq: torch.Tensor, xs: torch.Tensor, x_gran, wq: torch.Tensor, ws: torch.Tensor,
                w_gran, out_dtype: torch.dtype, activation: str, residuals: int,
                layout: bool = True, accumulation: str = "precise") -> str | None:
    """Why this kernel cannot run the GEMM (``None`` when it can); ``xq`` is (M, K), or
    (..., K) with ``layout=False``.  Only sizes, dtypes and (with ``layout``) strides are
    read, so traced tensors may be asked.  The shape and format rules come first, so each
    can be checked without a GPU.
    ``layout=False`` skips the stride and alignment rules, which :func:`.gemm.scaled_mm`
    meets by copying an operand.  Blockwise scales are always promoted; row and tensor
    scales are served with either accumulation: ``precise`` promotes every K block,
    ``fast`` keeps one tensor-core accumulator over all of K (:data:`FAST_TILE`).
    ``residuals``: how many (M, N) tensors of the output's dtype are added to the product
    (0-2; True counts one)."""
    if os.environ.get("FP8COMPILE_GLUON", "1") == "0":
        return "disabled by FP8COMPILE_GLUON=0"
    xg, wg = Granularity(x_gran), Granularity(w_gran)
    outer = xg in _OUTER and wg in _OUTER
    why = recipe_unsupported(xg, wg)
    if why:
        return why
    if activation not in ("none", "swiglu"):
        return "no activation epilogue other than SwiGLU"
    residuals = int(residuals)
    if residuals > 2:
        return f"{residuals} residuals: the epilogue adds two at most"
    if residuals and activation != "none":
        return "no residual after the SwiGLU epilogue"
    if activation == "swiglu" and outer and accumulation != "fast":
        return "the SwiGLU epilogue needs fast accumulation with row/tensor scales"
    if activation == "swiglu" and not outer and out_dtype != torch.float8_e4m3fn:
        return ("the SwiGLU epilogue with blockwise scales writes E4M3 with 1x128 group "
                "scales (blockwise_mm's out_scale)")
    if xq.dtype != wq.dtype or xq.dtype not in FP8_FORMATS:
        return "both operands in one FP8 format"
    if xs.dtype != torch.float32 or ws.dtype != torch.float32:
        return "fp32 scales"
    k, n = xq.shape[-1], wq.shape[0]
    m = xq.numel() // max(1, k)  # (..., K) inputs count as (M, K): no reshape of a traced x
    if k == 0:
        return "K == 0: nothing to multiply"
    if activation == "swiglu" and n % FAST_TILE[1]:
        return (f"the SwiGLU epilogue needs N % {FAST_TILE[1]} == 0 (a gate tile and its up "
                "tile in each output tile)")
    if m < MIN_M:
        return f"M={m} < {MIN_M}: the split-K kernel serves small M"
    if out_dtype == torch.float8_e5m2:
        return "an E5M2 output (the epilogue's saturating cast would clip its Inf)"
    if residuals and out_dtype in FP8_FORMATS:
        return "no residual with an FP8 output"
    out_bytes = torch.finfo(out_dtype).bits // 8
    fast = accumulates_fast(xg, wg, accumulation)
    swiglu = activation == "swiglu"
    if _shared_bytes(_tile(fast, swiglu, out_bytes), swiglu, out_bytes) > SHARED_MEMORY:
        return (f"{out_dtype} output tiles of this tile shape need more shared memory than "
                f"the {SHARED_MEMORY // 1024} KB an SM has")
    if k % 16 or (n * out_bytes) % 16:
        return "TMA needs 16-byte rows: K % 16 == 0 and N * out bytes % 16 == 0"
    return operands_unsupported(xq, wq, layout)


def operands_unsupported(xq: torch.Tensor, wq: torch.Tensor, layout: bool) -> str | None:
    """The rules a Gluon GEMM's TMA operands and device share (this kernel's and
    :mod:`.decode_ws`'s): K-major, 16-byte aligned (with ``layout``), Gluon's Hopper API,
    and a Hopper GPU."""
    k = xq.shape[-1]
    if layout and (xq.stride() != (k, 1) or wq.stride() != (k, 1)):
        return "operands must be contiguous and K-major"
    if layout and any(t.data_ptr() % 16 for t in (xq, wq)):
        return "operands must be 16-byte aligned"
    if not HAVE_GLUON:
        return "this Triton has no Gluon Hopper API"
    if xq.device.type != "cuda" or torch.cuda.get_device_capability(xq.device) != (9, 0):
        return "needs a Hopper GPU (sm_90)"
    return None


if HAVE_GLUON:

    @gluon.jit
    def _tile_coords(tile, num_pid_m, num_pid_n):
        GROUP_M: gl.constexpr = 8  # row tiles sharing each weight column tile in L2
        in_group = GROUP_M * num_pid_n
        first_m = (tile // in_group) * GROUP_M
        size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
        return first_m + ((tile % in_group) % size_m), (tile % in_group) // size_m

    @gluon.jit
    def _loader(a_bufs, b_bufs, ready, empty, M, N, K, a_desc, b_desc):
        STAGES_: gl.constexpr = a_bufs.shape[0]
        BM: gl.constexpr = a_bufs.shape[1]
        BK: gl.constexpr = a_bufs.shape[2]
        BN: gl.constexpr = b_bufs.shape[1]
        # A SwiGLU tile's weight rows come in two loads of half the tile: gate rows
        # [pid_n * HB, +HB) into the low half, the matching up rows, N/2 further, into the
        # high half (the weight is torch.cat([gate, up])).
        HB: gl.constexpr = b_desc.block_type.shape[0]
        B_BYTES: gl.constexpr = b_desc.block_type.nbytes * (BN // HB)
        num_pid_m = gl.cdiv(M, BM)
        num_pid_n = gl.cdiv(N, BN)
        it = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n)
            for ki in range(gl.cdiv(K, BK)):
                s = it % STAGES_
                # a fresh barrier passes a wait on parity 1: the first lap finds every stage free
                mbarrier.wait(empty.index(s), ((it // STAGES_) & 1) ^ 1)
                mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + B_BYTES)
                _tma_load(a_desc, [pid_m * BM, ki * BK], ready.index(s), a_bufs.index(s))
                if HB == BN:
                    _tma_load(b_desc, [pid_n * BN, ki * BK], ready.index(s), b_bufs.index(s))
                else:
                    _tma_load(b_desc, [pid_n * HB, ki * BK], ready.index(s),
                              b_bufs.index(s).slice(0, HB))
                    _tma_load(b_desc, [N // 2 + pid_n * HB, ki * BK], ready.index(s),
                              b_bufs.index(s).slice(HB, HB))
                it += 1

    @gluon.jit
    def _issue(a_bufs, b_bufs, ready, it, half_rows, into, use_acc: gl.constexpr = False):
        """Wait for stage ``it``'s tiles and start its wgmma for this warpgroup's rows, into
        ``into`` (added to it with ``use_acc``)."""
        STAGES_: gl.constexpr = a_bufs.shape[0]
        HM: gl.constexpr = into.shape[0]
        s = it % STAGES_
        mbarrier.wait(ready.index(s), (it // STAGES_) & 1)
        return warpgroup_mma(a_bufs.index(s).slice(half_rows, HM),
                             b_bufs.index(s).permute((1, 0)), into, use_acc=use_acc,
                             is_async=True)

    @gluon.jit
    def _factor(as_ptr, s_rows, rmask, w_ptr, kb, stride_ask, stride_wsk, has_cs):
        """Row scales times the weight block's scale, for K block ``kb``; the row scales
        alone for the outer recipes (``has_cs``: their weight scales are per column).
        ``s_rows``: the rows' offsets into ``as_ptr``, 32-bit (64-bit addresses held
        across the K loop cost registers the promotion does not have)."""
        return (gl.load(as_ptr + (s_rows + kb * stride_ask), mask=rmask, other=0.0)
                * gl.load(w_ptr + kb * stride_wsk, mask=has_cs == 0, other=1.0))

    @gluon.jit
    def _promote(empty, acc, p, t, f, it, MORE: gl.constexpr):
        """Wait for the wgmma ``t`` of ring position ``it`` into the partial tile ``p`` (with
        ``MORE``, the next block's may stay in flight), release its stage and add ``p``
        scaled by the factor ``f`` to ``acc``.  The sum is pinned before the wgmma that
        reuses ``p`` (:func:`_settled`)."""
        STAGES_: gl.constexpr = empty.shape[0]
        if MORE:
            p = warpgroup_mma_wait(num_outstanding=1, deps=(t, ))
        else:
            p = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
        mbarrier.arrive(empty.index(it % STAGES_), count=1)
        return _settled(acc + p * f[:, None]), p

    @gluon.jit
    def _promoted_run(run, acc, pa, pb, f0, f1, f2, f3, it, kb, half_rows: gl.constexpr,
                      RUN: gl.constexpr):
        """``RUN`` consecutive K blocks from block ``kb`` (ring position ``it``), promoted
        into ``acc``.  Blocks alternate between the partial tiles ``pa`` and ``pb``; the
        first two are issued at once, and each block's promotion runs while the next one's
        wgmma does, after which the freed partial tile takes the block after that.  Only the
        run's last promotion waits with no wgmma in flight, so longer runs leave the tensor
        cores idle less often.  Nothing is in flight when the run returns: a wgmma carried
        across a loop's back edge makes ptxas serialize them all (C7514).

        ``f0``-``f3`` are the scale factors of blocks ``kb`` to ``kb + 3``: each promotion
        takes ``f0`` and shifts the window by one, loading the factor four blocks on."""
        (a_bufs, b_bufs, ready, empty, as_ptr, s_rows, rmask, w_ptr, last, stride_ask,
         stride_wsk, has_cs) = run
        ta = _issue(a_bufs, b_bufs, ready, it, half_rows, pa)
        if RUN > 1:
            tb = _issue(a_bufs, b_bufs, ready, it + 1, half_rows, pb)
        for i in gl.static_range(RUN):
            if i % 2 == 0:
                acc, pa = _promote(empty, acc, pa, ta, f0, it + i, i + 1 < RUN)
                if i + 2 < RUN:
                    ta = _issue(a_bufs, b_bufs, ready, it + i + 2, half_rows, pa)
            else:
                acc, pb = _promote(empty, acc, pb, tb, f0, it + i, i + 1 < RUN)
                if i + 2 < RUN:
                    tb = _issue(a_bufs, b_bufs, ready, it + i + 2, half_rows, pb)
            f0, f1, f2, f3 = f1, f2, f3, _factor(as_ptr, s_rows, rmask, w_ptr,
                                                 gl.minimum(kb + i + 4, last), stride_ask,
                                                 stride_wsk, has_cs)
        return acc, pa, pb, f0, f1, f2, f3, it + RUN, kb + RUN

    @gluon.jit
    def _fast_tile(a_bufs, b_bufs, ready, empty, it, k_tiles, half_rows, acc, c_smem, r_desc,
                   r_bar, r_coords, PREFETCH: gl.constexpr):
        """One tile's K loop with one accumulator: each wgmma chains on the one before, which
        may still run; once it has retired its stage is released.  With ``PREFETCH``, once
        the first wgmma runs, the previous tile's store is waited for and the residual tile
        at ``r_coords`` is loaded into ``c_smem`` (TMA, arriving on ``r_bar``) under the
        rest of the loop."""
        STAGES_: gl.constexpr = a_bufs.shape[0]
        acc = _issue(a_bufs, b_bufs, ready, it, half_rows, acc)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # a no-op: types the loop
        if PREFETCH:
            tma.store_wait(pendings=0)
            mbarrier.expect(r_bar, r_desc.block_type.nbytes)
            _tma_load(r_desc, r_coords, r_bar, c_smem)
        for _ in range(1, k_tiles):
            acc = _issue(a_bufs, b_bufs, ready, it + 1, half_rows, acc, True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty.index(it % STAGES_), count=1)  # block it has retired
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index(it % STAGES_), count=1)
        return acc, it + 1

    @gluon.jit
    def _wide_factors(as_ptr, s_off, rmask, w_lo, w_hi, kb, stride_ask, stride_wsk):
        """Row scales of K block ``kb`` and the two weight blocks' scales (gate, up)."""
        r = gl.load(as_ptr + (s_off + kb * stride_ask), mask=rmask, other=0.0)
        return r, gl.load(w_lo + kb * stride_wsk), gl.load(w_hi + kb * stride_wsk)

    @gluon.jit
    def _wide_tile(a_bufs, b_bufs, ready, empty, it, k_tiles, half_rows, acc, p, as_ptr,
                   s_off, rmask, w_lo, w_hi, stride_ask, stride_wsk):
        """One :data:`WIDE_TILE` tile's K loop, promoted: per K block the low (gate) and the
        high (up) 128 columns are multiplied in turn into the one partial tile ``p``, each
        promoted into its accumulator as soon as it is done (nothing of this warpgroup in
        flight then; the other warpgroup's wgmma runs under it).  Each block's factors are
        loaded two blocks ahead; ``w_lo`` and ``w_hi`` point at the gate's and the up's
        weight block row of scales."""
        STAGES_: gl.constexpr = a_bufs.shape[0]
        HM: gl.constexpr = p.shape[0]
        PN: gl.constexpr = p.shape[1]
        acc_hi = gl.zeros_like(acc)
        last = k_tiles - 1
        r0, l0, h0 = _wide_factors(as_ptr, s_off, rmask, w_lo, w_hi, 0, stride_ask, stride_wsk)
        r1, l1, h1 = _wide_factors(as_ptr, s_off, rmask, w_lo, w_hi, gl.minimum(1, last),
                                   stride_ask, stride_wsk)
        for kb in range(k_tiles):
            s = it % STAGES_
            mbarrier.wait(ready.index(s), (it // STAGES_) & 1)
            a = a_bufs.index(s).slice(half_rows, HM)
            b = b_bufs.index(s)
            t = warpgroup_mma(a, b.slice(0, PN).permute((1, 0)), p, use_acc=False,
                              is_async=True)
            p = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
            acc = _settled(acc + p * (r0 * l0)[:, None])
            t = warpgroup_mma(a, b.slice(PN, PN).permute((1, 0)), p, use_acc=False,
                              is_async=True)
            p = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
            mbarrier.arrive(empty.index(s), count=1)
            acc_hi = _settled(acc_hi + p * (r0 * h0)[:, None])
            r0, l0, h0 = r1, l1, h1
            r1, l1, h1 = _wide_factors(as_ptr, s_off, rmask, w_lo, w_hi,
                                       gl.minimum(kb + 2, last), stride_ask, stride_wsk)
            it += 1
        return acc, acc_hi, p, it

    @gluon.jit
    def _silu_mul(gate, up):
        """``silu(gate) * up = gate * up / (1 + exp(-gate))`` in fp32, the division
        approximate (2 ulp): a reciprocal and a multiply.  The exp and the reciprocal (two
        special-function ops per output) are what a SwiGLU epilogue adds: ~1 us per 128x256
        tile on an H200, while the tensor cores wait (docs/performance.md)."""
        return gl.fdiv(gate * up, 1.0 + gl.exp(-gate), ieee_rounding=False)

    @gluon.jit
    def _fp8_quotient(y, s, r):
        """``y / s`` rounded as IEEE division rounds it, from ``r = div_rn(1, s)`` normal:
        ``y * r`` corrected twice with fma (as ``kernels.quant._div_exact``), ``y * s - y'``
        subtracted so that zeros keep their sign (``* -1.0`` is a true flip); then ±Inf (an
        overflow or a non-finite ``y``) made NaN, as E4M3FN has no Inf and the saturating
        conversion would clip it.  ``s`` and ``r`` broadcast against ``y``."""
        ny = y * -1.0
        nr = r * -1.0
        q = y * r
        q = gl.fma(gl.fma(q, s, ny), nr, q)
        q = gl.fma(gl.fma(q, s, ny), nr, q)
        return gl.where(gl.abs(q) < float("inf"), q, float("nan"))

    @gluon.jit
    def _swiglu_groups(gate, up, c_half, s_ptr, rows, rmask, group, M):
        """``silu(gate) * up`` in fp32 (:func:`_silu_mul`), its finite amax per row, the
        scale ``max(amax, 1e-12) / 448`` (IEEE division, as numerics.compute_scale) stored
        at ``s_ptr[rows + group * M]``, and the tile divided by it into ``c_half`` as E4M3
        (:func:`_fp8_quotient`: the scale's reciprocal is normal for every finite amax);
        NaN and Inf products become E4M3's NaN, as numerics.quantize makes them."""
        h = _silu_mul(gate, up)
        a = gl.abs(h)
        amax = gl.max(gl.where(a < float("inf"), a, 0.0), axis=1)
        s = gl.div_rn(gl.maximum(amax, 1e-12), 448.0)
        gl.store(s_ptr + rows + group * M, s, mask=rmask)
        r = gl.div_rn(1.0, s)
        q = _fp8_quotient(h, s[:, None], r[:, None])
        c_half.store(q.to(c_half.dtype))

    @gluon.jit
    def _load_columns(cs_ptr, stride_cs, has_cs, bias_ptr, has_bias, first, N, layout:
                      gl.constexpr, BN: gl.constexpr, HALVES: gl.constexpr = False):
        """The tile's column scales and bias as loaded: per-column (or, stride 0, per-tensor)
        weight scales of the outer recipes, ones for blockwise scales (has_cs == 0), which
        the promotion applied; zeros without a bias.  At BN = 256 they are loaded a few
        elements per thread (:func:`_spread` moves them to the accumulator's columns):
        loaded in that layout, each thread computes 64-bit addresses for its 64 columns and
        the epilogue spills.  With ``HALVES`` (a SwiGLU tile) the low half of the tile is
        gate's rows from ``first // 2`` and the high half up's, N/2 further."""
        if BN > 128:
            load_layout: gl.constexpr = gl.BlockedLayout([BN // 128], [32], [4], [0])
        else:
            load_layout: gl.constexpr = gl.SliceLayout(0, layout)
        cols = first + gl.arange(0, BN, layout=load_layout)
        if HALVES:
            j = gl.arange(0, BN, layout=load_layout)
            cols = first // 2 + j + gl.where(j < BN // 2, 0, N // 2 - BN // 2)
        scale = gl.load(cs_ptr + cols * stride_cs, mask=(cols < N) & (has_cs != 0), other=1.0)
        bias = gl.load(bias_ptr + cols, mask=(cols < N) & (has_bias != 0), other=0.0)
        return scale, bias

    @gluon.jit
    def _spread(scale, bias, layout: gl.constexpr):
        """Column scales and fp32 bias in the accumulator's column layout."""
        cols_layout: gl.constexpr = gl.SliceLayout(0, layout)
        return (gl.convert_layout(scale, cols_layout),
                gl.convert_layout(bias.to(gl.float32), cols_layout))

    @gluon.jit
    def _math(a_bufs, b_bufs, ready, empty, c_smem, c_desc, r1_desc, r2_desc, r_bars, as_ptr,
              ws_ptr, bias_ptr, has_bias, cs_ptr, stride_cs, has_cs, os_ptr, M, N, K,
              stride_asm, stride_ask, stride_wsn, stride_wsk, HALF: gl.constexpr):
        BM: gl.constexpr = a_bufs.shape[1]
        BK: gl.constexpr = a_bufs.shape[2]
        BN: gl.constexpr = b_bufs.shape[1]
        HM: gl.constexpr = BM // 2
        # Promoted SwiGLU with 1x128 groups (WIDE_TILE): its output buffer has rank 3.
        WIDE: gl.constexpr = len(c_smem.shape) == 3
        # Fast accumulation has the wide tile (FAST_TILE), promotion the square one.
        FAST: gl.constexpr = (BN > BM) and not WIDE
        # A half-width output tile: the SwiGLU epilogue, silu(gate) * up of the two halves.
        CN: gl.constexpr = c_smem.shape[len(c_smem.shape) - 1]
        SWIGLU: gl.constexpr = (CN != BN) and not WIDE
        # the partial tiles' and accumulators' width: each half of WIDE_TILE has its own
        PN: gl.constexpr = BN // 2 if WIDE else BN
        # An FP8 output tile: the tile is cast with the static scale at os_ptr.
        QUANT_OUT: gl.constexpr = c_desc.dtype.is_fp8()
        # Residuals added to the tile (not after SwiGLU): one barrier per math warpgroup, and
        # one more per residual (unused; the count carries the mode, see _blockwise_ws_kernel).
        RES: gl.constexpr = r_bars.shape[0] - 2
        r_bar = r_bars.index(HALF)
        r_phase = 0
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, PN, 32])
        num_pid_m = gl.cdiv(M, BM)
        num_pid_n = gl.cdiv(N, BN)
        k_tiles = gl.cdiv(K, BK)
        if WIDE:
            pa = gl.zeros([HM, PN], gl.float32, layout)
        elif not FAST and RES == 0:
            pa = gl.zeros([HM, BN], gl.float32, layout)
            pb = gl.zeros([HM, BN], gl.float32, layout)
        it = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n)
            row0 = pid_m * BM + HALF * HM
            rows = row0 + gl.arange(0, HM, layout=gl.SliceLayout(1, layout))
            rmask = rows < M
            s_rows = as_ptr + rows * stride_asm
            acc = gl.zeros([HM, PN], gl.float32, layout)
            if WIDE:
                # gate rows [pid_n * PN, +PN) and up rows N/2 further: one 128-row block of
                # scales each (N/2 is a multiple of 128)
                w_lo = ws_ptr + ((pid_n * PN) // 128) * stride_wsn
                acc, acc_hi, pa, it = _wide_tile(
                    a_bufs, b_bufs, ready, empty, it, k_tiles, HALF * HM, acc, pa, as_ptr,
                    rows * stride_asm, rmask, w_lo, w_lo + (N // 256) * stride_wsn,
                    stride_ask, stride_wsk)
                tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
                # os_ptr: the (M, N/256) group scales, M-contiguous
                _swiglu_groups(acc, acc_hi, c_smem.index(0), os_ptr, rows, rmask, pid_n, M)
                fence_async_shared()
                _tma_store(c_desc, [row0, pid_n * PN], c_smem.index(0))
            elif FAST:  # row/tensor scales: one accumulator, the row scale in the epilogue
                # The epilogue's vectors are loaded before the K loop (a few registers each),
                # so that their latency does not hold the tensor cores after it.
                col_scale, bias = _load_columns(cs_ptr, stride_cs, has_cs, bias_ptr, has_bias,
                                                pid_n * BN, N, layout, BN, SWIGLU)
                row_scale = gl.load(s_rows, mask=rmask, other=0.0)
                acc, it = _fast_tile(a_bufs, b_bufs, ready, empty, it, k_tiles, HALF * HM,
                                     acc, c_smem, r1_desc, r_bar, (row0, pid_n * BN), RES > 0)
                acc = acc * row_scale[:, None]
            else:
                if RES > 0:
                    # Partial tiles of this tile only: they die with its K loop, and the
                    # residual tile takes their registers in the epilogue.  The first
                    # residual comes into c_smem under the K loop, once the previous
                    # tile's store has left it.
                    pa = gl.zeros([HM, BN], gl.float32, layout)
                    pb = gl.zeros([HM, BN], gl.float32, layout)
                    tma.store_wait(pendings=0)
                    mbarrier.expect(r_bar, r1_desc.block_type.nbytes)
                    _tma_load(r1_desc, [row0, pid_n * BN], r_bar, c_smem)
                w_ptr = ws_ptr + ((pid_n * BN) // 128) * stride_wsn
                # Each block's scale factor is loaded four blocks ahead: loaded next to its
                # own wgmma, its latency showed in the promotion's first multiply (ncu
                # stall samples).  f0-f3: the factors of the next four blocks.
                last = k_tiles - 1
                s_off = rows * stride_asm
                f0 = _factor(as_ptr, s_off, rmask, w_ptr, 0, stride_ask, stride_wsk, has_cs)
                f1 = _factor(as_ptr, s_off, rmask, w_ptr, gl.minimum(1, last), stride_ask,
                             stride_wsk, has_cs)
                f2 = _factor(as_ptr, s_off, rmask, w_ptr, gl.minimum(2, last), stride_ask,
                             stride_wsk, has_cs)
                f3 = _factor(as_ptr, s_off, rmask, w_ptr, gl.minimum(3, last), stride_ask,
                             stride_wsk, has_cs)
                kb = 0
                run = (a_bufs, b_bufs, ready, empty, as_ptr, s_off, rmask, w_ptr, last,
                       stride_ask, stride_wsk, has_cs)
                for _ in range(k_tiles // PROMOTED_RUN):
                    acc, pa, pb, f0, f1, f2, f3, it, kb = _promoted_run(
                        run, acc, pa, pb, f0, f1, f2, f3, it, kb, HALF * HM, PROMOTED_RUN)
                # the rest (fewer than PROMOTED_RUN blocks) in runs of 8, 4, 2 and 1
                if PROMOTED_RUN > 8:
                    if k_tiles % 16 >= 8:
                        acc, pa, pb, f0, f1, f2, f3, it, kb = _promoted_run(
                            run, acc, pa, pb, f0, f1, f2, f3, it, kb, HALF * HM, 8)
                if PROMOTED_RUN > 4:
                    if k_tiles % 8 >= 4:
                        acc, pa, pb, f0, f1, f2, f3, it, kb = _promoted_run(
                            run, acc, pa, pb, f0, f1, f2, f3, it, kb, HALF * HM, 4)
                if PROMOTED_RUN > 2:
                    if k_tiles % 4 >= 2:
                        acc, pa, pb, f0, f1, f2, f3, it, kb = _promoted_run(
                            run, acc, pa, pb, f0, f1, f2, f3, it, kb, HALF * HM, 2)
                if k_tiles % 2 == 1:
                    acc, pa, pb, f0, f1, f2, f3, it, kb = _promoted_run(
                        run, acc, pa, pb, f0, f1, f2, f3, it, kb, HALF * HM, 1)
            if not WIDE:  # the rest of the promoted and fast epilogues
                # per-column (or, stride 0, per-tensor) weight scales of the outer recipes; none
                # (has_cs == 0) for blockwise scales, which the promotion applied; then the bias
                # (none when has_bias == 0: nothing is read and zeros are added)
                if not FAST:  # after the loop: the partial tiles leave no registers for them
                    col_scale, bias = _load_columns(cs_ptr, stride_cs, has_cs, bias_ptr, has_bias,
                                                    pid_n * BN, N, layout, BN)
                col_scale, bias = _spread(col_scale, bias, layout)
                acc = acc * col_scale[None, :] + bias[None, :]
                if RES > 0:
                    # The first residual came into c_smem under the K loop (after the previous
                    # tile's store had left it); a second one follows it there.  fp32 sums,
                    # (product + r1) + r2, then one rounding.
                    acc = _settled(acc)
                    mbarrier.wait(r_bar, r_phase)
                    r_phase ^= 1
                    acc = acc + c_smem.load(layout).to(gl.float32)
                    if RES > 1:
                        acc = _settled(acc)
                        _barrier()  # this warpgroup has read r1 before the TMA overwrites it
                        fence_async_shared()
                        mbarrier.expect(r_bar, r2_desc.block_type.nbytes)
                        _tma_load(r2_desc, [row0, pid_n * BN], r_bar, c_smem)
                        mbarrier.wait(r_bar, r_phase)
                        r_phase ^= 1
                        acc = acc + c_smem.load(layout).to(gl.float32)
                    _barrier()  # and the last residual before the output tile overwrites it
                else:
                    tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
                if SWIGLU:
                    # columns c and c + CN hold gate and up of one output (their two loads);
                    # the accumulator layout keeps both in one thread, so this moves no data
                    gate, up = acc.reshape([HM, 2, CN]).permute((0, 2, 1)).split()
                    c_smem.store(_out_cast(_silu_mul(gate, up), os_ptr, c_desc.dtype,
                                           QUANT_OUT))
                else:
                    c_smem.store(_out_cast(acc, os_ptr, c_desc.dtype, QUANT_OUT))
                fence_async_shared()
                _tma_store(c_desc, [pid_m * BM + HALF * HM, pid_n * CN], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _settled(x):
        """``x``, computed here: an opaque move keeps the compiler from sinking the arithmetic
        that produced it below what follows, where its operands' registers would be live
        with the new ones and spill: the epilogue's shared-memory loads (beside the spread
        column scales and bias, 128 registers), or the wgmma that reuses a promoted partial
        tile (beside that tile's 64)."""
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=gl.float32,
                                         is_pure=False, pack=1)

    @gluon.jit
    def _out_cast(y, os_ptr, dtype: gl.constexpr, QUANT_OUT: gl.constexpr):
        """The output tile in ``dtype``; an FP8 one (E4M3) is ``saturate(rne(y / scale))``
        as numerics.quantize_with_scale: the quotient rounded as IEEE division rounds it,
        the saturating conversion, and ±Inf made NaN first (E4M3FN has no Inf; the
        conversion would saturate it).

        ``gl.fdiv(..., ieee_rounding=True)`` is not that division: on an H200 it rounded
        FP8 midpoints the other way (``test_fp8_output_rounds_midpoints_as_the_division``).
        For a scale whose reciprocal is normal (any calibrated one) the quotient is
        ``y * div_rn(1, scale)`` corrected twice with fma (:func:`_fp8_quotient`):
        bit-equal to the division above fp32's normal range floor (below it the cast gives
        ±0 either way), zeros keep their sign, and an overflow or a non-finite ``y`` gives
        NaN, as the division's ±Inf does here.  It costs the SwiGLU
        epilogue nothing measurable.  Other scales take ``div_rn`` per element."""
        if QUANT_OUT:
            s = gl.load(os_ptr)
            if (s > 1e-30) & (s < 1e30):
                q = _fp8_quotient(y, s, gl.div_rn(1.0, s))
            else:
                q = gl.div_rn(y, s)
                q = gl.where(gl.abs(q) < float("inf"), q, float("nan"))
            return q.to(dtype)
        else:
            return y.to(dtype)

    # Partition entry points: Gluon passes worker arguments as IR values, so each half is a
    # function of its own, and the mode (promoted / fast, SwiGLU) and shapes come from the
    # buffers' types, not constexpr args (a constexpr in a partition's argument tuple
    # reaches warp_specialize as a plain int and fails to lower, Triton 3.6).
    @gluon.jit
    def _math_lo(a_bufs, b_bufs, ready, empty, c_lo, c_hi, c_desc, r1_desc, r2_desc, r_bars,
                 as_ptr, ws_ptr, bias_ptr, has_bias, cs_ptr, stride_cs, has_cs, os_ptr, M, N, K,
                 stride_asm, stride_ask, stride_wsn, stride_wsk):
        _math(a_bufs, b_bufs, ready, empty, c_lo, c_desc, r1_desc, r2_desc, r_bars, as_ptr,
              ws_ptr, bias_ptr, has_bias, cs_ptr, stride_cs, has_cs, os_ptr, M, N, K,
              stride_asm, stride_ask, stride_wsn, stride_wsk, 0)

    @gluon.jit
    def _math_hi(a_bufs, b_bufs, ready, empty, c_lo, c_hi, c_desc, r1_desc, r2_desc, r_bars,
                 as_ptr, ws_ptr, bias_ptr, has_bias, cs_ptr, stride_cs, has_cs, os_ptr, M, N, K,
                 stride_asm, stride_ask, stride_wsn, stride_wsk):
        _math(a_bufs, b_bufs, ready, empty, c_hi, c_desc, r1_desc, r2_desc, r_bars, as_ptr,
              ws_ptr, bias_ptr, has_bias, cs_ptr, stride_cs, has_cs, os_ptr, M, N, K,
              stride_asm, stride_ask, stride_wsn, stride_wsk, 1)

    @gluon.jit
    def _blockwise_ws_kernel(a_desc, b_desc, c_desc, r1_desc, r2_desc, as_ptr, ws_ptr,
                             bias_ptr, has_bias, cs_ptr, stride_cs, has_cs, os_ptr, M, N, K,
                             stride_asm, stride_ask, stride_wsn, stride_wsk,
                             STAGES: gl.constexpr, MATH_REGS: gl.constexpr,
                             LOAD_REGS: gl.constexpr, FAST: gl.constexpr, RES: gl.constexpr,
                             WIDE: gl.constexpr = False, SWIGLU: gl.constexpr = False):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        # a SwiGLU tile: gate's and up's rows, one descriptor block each (see _loader)
        BN: gl.constexpr = b_desc.block_type.shape[0] * (2 if SWIGLU else 1)
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
        if WIDE:  # rank 3 tells the math partitions the mode (see _math_lo)
            CN: gl.constexpr = c_desc.block_type.shape[1]
            c_lo = gl.allocate_shared_memory(c_desc.dtype, [1, BM // 2, CN], c_desc.layout)
            c_hi = gl.allocate_shared_memory(c_desc.dtype, [1, BM // 2, CN], c_desc.layout)
        else:
            c_lo = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape,
                                             c_desc.layout)
            c_hi = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape,
                                             c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # The residual loads' barriers, one per math warpgroup, and RES more that carry the
        # number of residuals to the partitions in the buffer's shape.
        r_bars = gl.allocate_shared_memory(gl.int64, [2 + RES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrive per math warpgroup
        for i in gl.static_range(2):
            mbarrier.init(r_bars.index(i), count=1)
        fence_async_shared()
        args = (a_bufs, b_bufs, ready, empty, c_lo, c_hi, c_desc, r1_desc, r2_desc, r_bars,
                as_ptr, ws_ptr, bias_ptr, has_bias, cs_ptr, stride_cs, has_cs, os_ptr, M, N, K,
                stride_asm, stride_ask, stride_wsn, stride_wsk)
        loads = (a_bufs, b_bufs, ready, empty, M, N, K, a_desc, b_desc)
        # the math partitions tell the modes apart by the tile: FAST is its wide one
        gl.static_assert(FAST == ((BN > BM) and not WIDE), "FAST goes with FAST_TILE")
        gl.static_assert(RES == 0 or not WIDE, "no residual after the SwiGLU epilogue")
        gl.static_assert(not WIDE or BN == 2 * BM, "WIDE goes with WIDE_TILE")
        gl.static_assert(SWIGLU or not WIDE, "WIDE is a SwiGLU tile")
        gl.warp_specialize([(_math_lo, args), (_math_hi, args), (_loader, loads)],
                           [4, 1], [MATH_REGS, LOAD_REGS])

    def _gl_dtype(dtype: torch.dtype):
        return {torch.float8_e4m3fn: gl.float8e4nv, torch.float8_e5m2: gl.float8e5,
                torch.bfloat16: gl.bfloat16, torch.float16: gl.float16,
                torch.float32: gl.float32}[dtype]

    def layouts(in_dtype: torch.dtype, out_dtype: torch.dtype, tile=PROMOTED_TILE,
                out_n: int | None = None):
        """Shared-memory layouts of the A, B and output tiles (128-byte swizzles) for
        ``tile = (BM, BN, BK, stages)``; the output tile is ``out_n`` wide (default BN;
        BN/2 for the SwiGLU epilogue)."""
        bm, bn, bk, _ = tile
        gin, gout = _gl_dtype(in_dtype), _gl_dtype(out_dtype)
        return (gl.NVMMASharedLayout.get_default_for([bm, bk], gin),
                gl.NVMMASharedLayout.get_default_for([bn, bk], gin),
                gl.NVMMASharedLayout.get_default_for([bm // 2, out_n or bn], gout))


# Compiles started ahead of the first launch (:func:`precompile`): their futures, which a
# launch awaits, and the launches already asked for.
_PENDING: list = []
_STARTED: set[tuple] = set()
_POOL = None


def precompile(xq, xs, wq, ws, bias, out, x_gran, w_gran, accumulation: str, swiglu: bool,
               out_scale, residuals: tuple, device: torch.device) -> bool:
    """Start compiling the kernel that :func:`blockwise_mm` with these arguments launches, on
    a background thread; the tensors may be stand-ins on the meta device with the real ones'
    sizes, strides and dtypes, ``device`` the GPU the launch will use.

    A cold Triton cache compiles each variant of this kernel in 1.5-2 s.  A compiled model
    would spend that at its first call, one variant after the other; started while the
    graph is still being compiled, the compiles overlap Inductor's and each other's.  The
    compiled kernel lands in the JIT's cache, where the launch finds it; :func:`blockwise_mm`
    first waits for compiles still running.  Nothing touches the GPU here.  Returns whether
    a compile was started (not for a launch asked for before, nor without Gluon or a GPU)."""
    global _POOL
    if not HAVE_GLUON or device.type != "cuda":
        return False
    grid, args, kwargs = _launch_args(xq, xs, wq, ws, bias, out, x_gran, w_gran, accumulation,
                                      swiglu, out_scale, residuals, device)
    key = (device.index, *map(_arg_key, args), *sorted(kwargs.items()))
    if key in _STARTED:
        return False
    _STARTED.add(key)
    with torch.cuda.device(device):
        index = torch.cuda.current_device()
        _blockwise_ws_kernel.device_caches[index]  # made here: a thread racing for it loses
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fp8compile-gluon")
    _PENDING.append(_POOL.submit(_compile, index, grid, args, kwargs))
    return True


def _arg_key(a) -> tuple:
    """What the JIT's specialization can see of a launch argument, for the launches that
    :func:`precompile` has asked for."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.shape, a.stride())
    if hasattr(a, "block_shape"):  # a tensor descriptor
        return (a.base.dtype, tuple(a.shape), tuple(a.strides), tuple(a.block_shape))
    return (a,)


def _compile(index: int, grid, args, kwargs) -> None:
    """The JIT's compile without a launch, then the C launcher where this Triton builds one
    per kernel signature (a compiler run the launch would otherwise make)."""
    import triton

    with torch.cuda.device(index):
        kernel = _blockwise_ws_kernel.warmup(*args, grid=grid, **kwargs)
        try:
            triton.runtime.driver.active.launcher_cls(kernel.src, kernel.metadata)
        except Exception:  # noqa: BLE001 - the launch builds it then, and reports what fails
            pass


def _await_precompiles() -> None:
    """Wait for the compiles :func:`precompile` started; one that failed is compiled again
    by the launch, which reports its error."""
    while _PENDING:
        try:
            _PENDING.pop().result()
        except Exception:  # noqa: BLE001, S110
            pass


def blockwise_mm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                 bias: torch.Tensor | None, out: torch.Tensor,
                 x_gran=Granularity.GROUP, w_gran=Granularity.BLOCK,
                 accumulation: str = "precise", swiglu: bool = False,
                 out_scale: torch.Tensor | None = None,
                 residuals: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """Write ``(xq·xs) @ (wq·ws)ᵀ + bias`` into ``out`` (M, N); call only when
    :func:`unsupported` returns ``None``.  Blockwise: ``xs`` is (M, ceil(K/128)), ``ws``
    (ceil(N/128), ceil(K/128)).  Row/tensor scales (``x_gran``, ``w_gran``): ``xs`` has M
    elements or one, ``ws`` N or one; with ``precise`` accumulation the K blocks are promoted
    with the row scale alone, with ``fast`` one accumulator takes all of K and the row scale
    multiplies the finished tile; the column scale follows.  Scales may have any strides.
    With ``swiglu`` ``wq`` is ``torch.cat([gate, up])`` (N/2 a multiple of 128: gate's
    and up's 128-row blocks tile alike) and ``out`` (M, N/2) receives
    ``silu(gate) * up`` of the scaled fp32 tile: with row/tensor scales (fast only) as is,
    or cast with a static scale; with blockwise scales (always promoted) in E4M3, with
    ``out_scale`` the fp32 (M, N/256) scales of its 1x128 groups, strides (1, M), which the
    epilogue writes.  Otherwise an E4M3 ``out`` takes ``out_scale`` (one fp32 element, a
    static scale) and receives the tile cast with it.  ``residuals`` (not with ``swiglu``;
    at most two (M, N) tensors laid out as ``out``) are added in fp32 before the one
    rounding: ``(product + r1) + r2``.
    Nothing is allocated here (the call may run in a CUDA-graph pool's warm-up)."""
    _await_precompiles()
    grid, args, kwargs = _launch_args(xq, xs, wq, ws, bias, out, x_gran, w_gran, accumulation,
                                      swiglu, out_scale, residuals)
    _blockwise_ws_kernel[grid](*args, **kwargs)
    return out


def _launch_args(xq, xs, wq, ws, bias, out, x_gran, w_gran, accumulation, swiglu, out_scale,
                 residuals, device: torch.device | None = None):
    """``(grid, args, keyword args)`` of the kernel for :func:`blockwise_mm`'s arguments;
    reads only sizes, strides, dtypes and addresses (``device``: where the kernel runs, when
    the tensors are stand-ins on the meta device)."""
    m, k = xq.shape
    n = wq.shape[0]
    xg, wg = Granularity(x_gran), Granularity(w_gran)
    fast = accumulates_fast(xg, wg, accumulation)
    if xg is Granularity.GROUP:
        row = (xs, xs.stride(0), xs.stride(1))
        block = (ws, ws.stride(0), ws.stride(1))
        column = (out, 0, 0)  # unread
    else:
        row = (xs, xs.stride(0) if xg is Granularity.ROW else 0, 0)
        block = (ws, 0, 0)  # unread: has_cs masks the weight factor's load off
        column = (ws, ws.stride(0) if wg is Granularity.ROW else 0, 1)
    wide = swiglu and xg is Granularity.GROUP
    if swiglu and not (fast or wide):
        raise ValueError("blockwise_mm: swiglu needs blockwise scales, or fast accumulation "
                         "with row/tensor scales")
    if wide and (out.dtype != torch.float8_e4m3fn or out_scale is None
                 or out_scale.dtype != torch.float32 or out_scale.shape != (m, n // 256)
                 or out_scale.stride() != (1, m)):
        raise ValueError(
            "blockwise_mm: a blockwise swiglu writes an E4M3 out with its 1x128 group scales: "
            f"out_scale must be fp32 ({m}, {n // 256}) with strides (1, {m}), got "
            + ("None" if out_scale is None else
               f"{out_scale.dtype} {tuple(out_scale.shape)} strides {out_scale.stride()}")
            + f", out {out.dtype}")
    if residuals and (swiglu or len(residuals) > 2):
        raise ValueError("blockwise_mm: one or two residuals, and no SwiGLU")
    check_residuals(residuals, out, "blockwise_mm")
    if not wide and (out.dtype == torch.float8_e4m3fn) != (out_scale is not None):
        raise ValueError(f"blockwise_mm: an E4M3 output goes with out_scale (got out "
                         f"{out.dtype}, out_scale {'given' if out_scale is not None else 'None'})")
    tile = _tile(fast, swiglu, out.element_size())
    bm, bn, bk, stages = tile
    cn = bn // 2 if swiglu else bn
    a_l, b_l, c_l = layouts(xq.dtype, out.dtype, tile, cn)
    a_d = TensorDescriptor(xq, [m, k], [k, 1], [bm, bk], a_l)
    # SwiGLU: gate's and up's halves of each weight tile come in one load each (_loader)
    b_d = TensorDescriptor(wq, [n, k], [k, 1], [bn // 2 if swiglu else bn, bk], b_l)

    def tiles_of(t):  # the output and the residuals: (bm/2 x cn) tiles, one per warpgroup
        return TensorDescriptor(t, [m, t.shape[1]], [t.stride(0), 1], [bm // 2, cn], c_l)

    c_d = tiles_of(out)
    r_d = [tiles_of(r) for r in residuals] + [c_d] * (2 - len(residuals))  # c_d: unread
    tiles = -(-m // bm) * -(-n // bn)
    grid = (min(tuning.num_sms(device or xq.device), tiles),)
    args = (a_d, b_d, c_d, r_d[0], r_d[1], row[0], block[0],
            bias if bias is not None else out, int(bias is not None),
            column[0], column[1], column[2], out_scale if out_scale is not None else out,
            m, n, k, row[1], row[2], block[1], block[2])
    return grid, args, dict(STAGES=stages, MATH_REGS=MATH_REGS, LOAD_REGS=LOAD_REGS,
                            FAST=fast, RES=len(residuals), WIDE=wide, SWIGLU=swiglu,
                            num_warps=4)

