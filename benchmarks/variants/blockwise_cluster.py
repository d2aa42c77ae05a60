"""The promoted blockwise kernel on 2-CTA clusters: a measured variant, not adopted.

Needs Triton 3.8 or later (Gluon's CGA layouts and TMA multicast; the warp-specialized
kernel in ``fp8compile/kernels/blockwise_ws.py`` runs on 3.6).  Each CTA computes a 128x128
tile the way that kernel's promoted path does (runs of eight K blocks, two partial tiles,
factors loaded four blocks ahead).  The two CTAs of a cluster take neighbouring weight
column tiles, a 128x256 cluster tile, and read the same 128x128 activation tile:

* ``multicast=True``: CTA 0 loads the activation tile once and multicasts it into both
  CTAs' stages; each CTA loads its own weight tile.  Before CTA 0 refills a stage, both
  CTAs' math warpgroups have released it on a barrier of CTA 0 (a two-CTA barrier, which
  both CTAs arrive on);
* ``multicast=False``: the same cluster launch and tiles, each CTA loading its own copy.

Four stages: Triton 3.9 wants power-of-2 shapes for buffers laid out over a cluster, so
the fifth stage of the tree's kernel does not fit here.  Blockwise scales (1x128 x
128x128), E4M3, bf16 output, no bias; N a multiple of 256, K of 128.  The outputs are
bit-equal to ``blockwise_ws``'s, whose helpers it calls where they are the same; its run of
promotions and the math partition are that kernel's with the second release barrier
added.  ``cluster_ab.py`` beside this file checks and times it;
``docs/performance.md``, "TMA multicast on 2-CTA clusters", has the figures.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fp8compile.kernels import tuning
from fp8compile.kernels.blockwise_ws import _factor, _issue, _settled, _tile_coords

BM, BN, BK = 128, 256, 128   # cluster tile: BN split over the two CTAs
STAGES = 4
RUN = gl.constexpr(8)
MATH_REGS, LOAD_REGS = gl.constexpr(232), gl.constexpr(40)


@gluon.jit
def _rank():
    """This CTA's rank in its cluster (0 or 1); Gluon has no call for it."""
    return gl.inline_asm_elementwise("mov.u32 $0, %cluster_ctarank;", "=r,r", [gl.program_id(0)],
                                     dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _loader(a_bufs, b_bufs, ready, empty, a_empty, M, N, K, a_desc, b_desc):
    STAGES_: gl.constexpr = a_bufs.shape[0]
    BM_: gl.constexpr = a_bufs.shape[1]
    BK_: gl.constexpr = a_bufs.shape[2]
    BN_: gl.constexpr = b_bufs.shape[1]
    # per CTA: the whole activation tile (multicast) and half the weight tile
    BYTES: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes // 2
    MULTICAST: gl.constexpr = a_empty.shape[1] == 1  # else [STAGES, 2]: no multicast
    rank = _rank()
    num_pid_m = gl.cdiv(M, BM_)
    num_pid_n = gl.cdiv(N, BN_)
    it = 0
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n)
        for ki in range(gl.cdiv(K, BK_)):
            s = it % STAGES_
            phase = ((it // STAGES_) & 1) ^ 1
            mbarrier.wait(empty.index(s), phase)
            if MULTICAST:
                if rank == 0:  # CTA 0 writes the activation stage of both CTAs
                    mbarrier.wait(a_empty.index(s), phase)
            mbarrier.expect(ready.index(s), BYTES)
            tma.async_load(a_desc, [pid_m * BM_, ki * BK_], ready.index(s), a_bufs.index(s),
                           multicast=MULTICAST)
            tma.async_load(b_desc, [pid_n * BN_, ki * BK_], ready.index(s), b_bufs.index(s))
            it += 1


@gluon.jit
def _promote(empty, a_empty, acc, p, t, f, it, MORE: gl.constexpr):
    STAGES_: gl.constexpr = empty.shape[0]
    if MORE:
        p = warpgroup_mma_wait(num_outstanding=1, deps=(t, ))
    else:
        p = warpgroup_mma_wait(num_outstanding=0, deps=(t, ))
    mbarrier.arrive(empty.index(it % STAGES_), count=1)
    if a_empty.shape[1] == 1:  # multicast
        mbarrier.arrive(a_empty.index(it % STAGES_), count=1)
    return _settled(acc + p * f[:, None]), p


@gluon.jit
def _promoted_run(run, acc, pa, pb, f0, f1, f2, f3, it, kb, half_rows: gl.constexpr,
                  RUN_: gl.constexpr):
    (a_bufs, b_bufs, ready, empty, a_empty, as_ptr, s_off, rmask, w_ptr, last, stride_ask,
     stride_wsk, has_cs) = run
    ta = _issue(a_bufs, b_bufs, ready, it, half_rows, pa)
    if RUN_ > 1:
        tb = _issue(a_bufs, b_bufs, ready, it + 1, half_rows, pb)
    for i in gl.static_range(RUN_):
        if i % 2 == 0:
            acc, pa = _promote(empty, a_empty, acc, pa, ta, f0, it + i, i + 1 < RUN_)
            if i + 2 < RUN_:
                ta = _issue(a_bufs, b_bufs, ready, it + i + 2, half_rows, pa)
        else:
            acc, pb = _promote(empty, a_empty, acc, pb, tb, f0, it + i, i + 1 < RUN_)
            if i + 2 < RUN_:
                tb = _issue(a_bufs, b_bufs, ready, it + i + 2, half_rows, pb)
        f0, f1, f2, f3 = f1, f2, f3, _factor(as_ptr, s_off, rmask, w_ptr,
                                             gl.minimum(kb + i + 4, last), stride_ask,
                                             stride_wsk, has_cs)
    return acc, pa, pb, f0, f1, f2, f3, it + RUN_, kb + RUN_


@gluon.jit
def _math(a_bufs, b_bufs, ready, empty, a_empty, c_smem, c_desc, as_ptr, ws_ptr, M, N, K,
          stride_asm, stride_ask, stride_wsn, stride_wsk, HALF: gl.constexpr):
    BM_: gl.constexpr = a_bufs.shape[1]
    BK_: gl.constexpr = a_bufs.shape[2]
    BN_: gl.constexpr = b_bufs.shape[1]
    HM: gl.constexpr = BM_ // 2
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BN_ // 2, 32],
                                                      cga_layout=[[0, 1]])
    rank = _rank()
    num_pid_m = gl.cdiv(M, BM_)
    num_pid_n = gl.cdiv(N, BN_)
    k_tiles = gl.cdiv(K, BK_)
    pa = gl.zeros([HM, BN_], gl.float32, layout)
    pb = gl.zeros([HM, BN_], gl.float32, layout)
    it = 0
    for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n)
        row0 = pid_m * BM_ + HALF * HM
        rows = row0 + gl.arange(0, HM, layout=gl.SliceLayout(1, layout))
        rmask = rows < M
        s_off = rows * stride_asm
        acc = gl.zeros([HM, BN_], gl.float32, layout)
        # this CTA's 128 weight rows: block row 2 * pid_n + rank of the weight scales
        w_ptr = ws_ptr + (pid_n * 2 + rank) * stride_wsn
        last = k_tiles - 1
        f0 = _factor(as_ptr, s_off, rmask, w_ptr, 0, stride_ask, stride_wsk, 0)
        f1 = _factor(as_ptr, s_off, rmask, w_ptr, gl.minimum(1, last), stride_ask, stride_wsk, 0)
        f2 = _factor(as_ptr, s_off, rmask, w_ptr, gl.minimum(2, last), stride_ask, stride_wsk, 0)
        f3 = _factor(as_ptr, s_off, rmask, w_ptr, gl.minimum(3, last), stride_ask, stride_wsk, 0)
        kb = 0
        run = (a_bufs, b_bufs, ready, empty, a_empty, as_ptr, s_off, rmask, w_ptr, last,
               stride_ask, stride_wsk, 0)  # has_cs 0: blockwise, the block scales are read
        for _ in range(k_tiles // RUN):
            acc, pa, pb, f0, f1, f2, f3, it, kb = _promoted_run(
                run, acc, pa, pb, f0, f1, f2, f3, it, kb, HALF * HM, RUN)
        if k_tiles % 8 >= 4:
            acc, pa, pb, f0, f1, f2, f3, it, kb = _promoted_run(
                run, acc, pa, pb, f0, f1, f2, f3, it, kb, HALF * HM, 4)
        if k_tiles % 4 >= 2:
            acc, pa, pb, f0, f1, f2, f3, it, kb = _promoted_run(
                run, acc, pa, pb, f0, f1, f2, f3, it, kb, HALF * HM, 2)
        if k_tiles % 2 == 1:
            acc, pa, pb, f0, f1, f2, f3, it, kb = _promoted_run(
                run, acc, pa, pb, f0, f1, f2, f3, it, kb, HALF * HM, 1)
        tma.store_wait(pendings=0)
        c_smem.store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_store(c_desc, [row0, pid_n * BN_], c_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _math_lo(a_bufs, b_bufs, ready, empty, a_empty, c_lo, c_hi, c_desc, as_ptr, ws_ptr, M, N,
             K, stride_asm, stride_ask, stride_wsn, stride_wsk):
    _math(a_bufs, b_bufs, ready, empty, a_empty, c_lo, c_desc, as_ptr, ws_ptr, M, N, K,
          stride_asm, stride_ask, stride_wsn, stride_wsk, 0)


@gluon.jit
def _math_hi(a_bufs, b_bufs, ready, empty, a_empty, c_lo, c_hi, c_desc, as_ptr, ws_ptr, M, N,
             K, stride_asm, stride_ask, stride_wsn, stride_wsk):
    _math(a_bufs, b_bufs, ready, empty, a_empty, c_hi, c_desc, as_ptr, ws_ptr, M, N, K,
          stride_asm, stride_ask, stride_wsn, stride_wsk, 1)


@gluon.jit
def cluster_kernel(a_desc, b_desc, c_desc, as_ptr, ws_ptr, M, N, K, stride_asm, stride_ask,
                   stride_wsn, stride_wsk, STAGES_: gl.constexpr, MULTICAST: gl.constexpr):
    BM_: gl.constexpr = a_desc.block_type.shape[0]
    BK_: gl.constexpr = a_desc.block_type.shape[1]
    BN_: gl.constexpr = b_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES_, BM_, BK_], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES_, BN_, BK_], b_desc.layout)
    c_lo = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    c_hi = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    ready = mbarrier.allocate_mbarrier(batch=STAGES_)
    empty = mbarrier.allocate_mbarrier(batch=STAGES_)
    # the multicast's release barrier; without multicast an unused one, whose shape says so
    a_empty = mbarrier.allocate_mbarrier(batch=STAGES_, two_ctas=MULTICAST)
    for i in gl.static_range(STAGES_):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)    # this CTA's two math warpgroups
        # a barrier of CTA 0 that both CTAs arrive on: the count is per CTA
        mbarrier.init(a_empty.index(i), count=2)
    fence_async_shared()
    gl.barrier(cluster=True)  # both CTAs' barriers exist before either signals the other's
    args = (a_bufs, b_bufs, ready, empty, a_empty, c_lo, c_hi, c_desc, as_ptr, ws_ptr, M, N, K,
            stride_asm, stride_ask, stride_wsn, stride_wsk)
    loads = (a_bufs, b_bufs, ready, empty, a_empty, M, N, K, a_desc, b_desc)
    gl.warp_specialize([(_math_lo, args), (_math_hi, args), (_loader, loads)], [4, 1],
                       [MATH_REGS, LOAD_REGS])
    gl.barrier(cluster=True)  # no CTA leaves while the other may still signal it


def layouts():
    """Shared-memory layouts of the activation, weight and output tiles over the cluster: the
    activation tile is whole in both CTAs (broadcast), the 256-row weight tile and the
    64x256 output tiles are split in halves, one per CTA."""
    return (gl.NVMMASharedLayout(128, 8, rank=2, cga_layout=[[0, 0]]),
            gl.NVMMASharedLayout(128, 8, rank=2, cga_layout=[[1, 0]]),
            gl.NVMMASharedLayout(128, 16, rank=2, cga_layout=[[0, 1]]))


def cluster_mm(xq, xs, wq, ws, out, stages=STAGES, multicast=True):
    """``out = (xq·xs) @ (wq·ws)ᵀ`` in bf16, blockwise: ``xs`` (M, K/128) with any strides,
    ``ws`` (N/128, K/128); E4M3 operands, K-major; N a multiple of 256, K of 128."""
    m, k = xq.shape
    n = wq.shape[0]
    if n % BN or k % BK or xq.dtype != torch.float8_e4m3fn or wq.dtype != torch.float8_e4m3fn \
            or out.dtype != torch.bfloat16:
        raise ValueError(f"cluster_mm: E4M3 operands, N % {BN} == 0 and K % {BK} == 0, a bf16 "
                         f"out; got {xq.dtype} x {wq.dtype} -> {out.dtype}, N={n}, K={k}")
    a_l, b_l, c_l = layouts()
    a_d = TensorDescriptor(xq, [m, k], [k, 1], [BM, BK], a_l)
    b_d = TensorDescriptor(wq, [n, k], [k, 1], [BN, BK], b_l)
    c_d = TensorDescriptor(out, [m, n], [out.stride(0), 1], [BM // 2, BN], c_l)
    tiles = -(-m // BM) * -(-n // BN)
    grid = (min(tuning.num_sms(xq.device) // 2, tiles),)
    cluster_kernel[grid](a_d, b_d, c_d, xs, ws, m, n, k, xs.stride(0), xs.stride(1),
                         ws.stride(0), ws.stride(1), stages, multicast,
                         num_warps=4, num_ctas=2)
    return out
