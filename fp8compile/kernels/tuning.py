"""Tile configurations of the FP8 GEMM for Hopper (H100 / H200), by M bucket.

The autotuner keys on ``(M_BUCKET, N, K, recipe switches)``, so a process tunes each layer
shape once per bucket and reuses the choice for every M in the bucket.

* M <= 256 (decode, small prefill): one fixed ``BLOCK_M x BLOCK_N`` per bucket, so the
  launcher knows the tile count and can pick split-K before launching; only ``BLOCK_K``,
  warps and stages are tuned (16-row tiles swap the operands, see ``_BY_BUCKET[16]``).  At
  M=16, N=4096 a 16x64 tile gives 64 programs for 132 SMs, and the GEMM is bound by
  reading the weight: split-K brings it to ~2 programs per SM (~4 with blockwise scales,
  see :func:`split_k`).
* M > 256: compute bound; 128x256x128 with 8 warps (two consumer warpgroups) and 3 stages
  (144 KB of shared memory) is the workhorse of the single-accumulator path, 128x128 and
  64x128 that of the promoted path (register counts below, from ptxas for sm_90a).
  BLOCK_K=128 so each K step sees one weight-block scale.
"""

from __future__ import annotations

import functools

import torch
import triton

__all__ = ["SMALL_TILES", "cdiv", "configs", "m_bucket", "next_pow2", "prune", "split_k"]

# M bucket -> (BLOCK_M, BLOCK_N) for the split-K regime.
SMALL_TILES = {16: (16, 64), 32: (32, 64), 64: (64, 64), 128: (64, 128), 256: (128, 128)}
_LARGE = 512


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host-side ints.

    ``triton.cdiv`` and ``triton.next_power_of_2`` also run on the host, but each call goes
    through Triton's constexpr-function wrapper (~5 µs).  At a dozen per launch they were half
    of the launchers' own Python time, so host code uses these two instead.
    """
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), for host-side ints."""
    return 1 << max(0, n - 1).bit_length()


def m_bucket(m: int) -> int:
    """Round M up to a power of two in [16, 8192]; buckets above 256 share one config list
    but tune separately (at M=8192 the 2048-tuned tile was 14% slow for one shape)."""
    return min(max(16, next_pow2(m)), 8192)


def _c(bm, bn, bk, warps, stages, group_m=8, swap_ab=False):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
         "SWAP_AB": swap_ab, "SCALES_AHEAD": swap_ab},
        num_warps=warps, num_stages=stages,
    )


def _small(bm, bn):
    warps = 8 if bm * bn >= 128 * 128 else 4
    # BLOCK_K=256 halves the loop trips of the weight stream (fast path only); 3 stages of
    # a 128x128x256 tile already take 192 KB of shared memory.
    deep = 3 if bm * bn >= 128 * 128 else 4
    return [_c(bm, bn, 128, warps, 4), _c(bm, bn, 128, warps, 6), _c(bm, bn, 256, warps, deep)]


_BY_BUCKET = {bucket: _small(bm, bn) for bucket, (bm, bn) in SMALL_TILES.items()}
# 16-row tiles swap the operands (SWAP_AB): the MMA is otherwise Ampere-style (wgmma takes
# 64 rows per warpgroup), and with the swap the 64 weight rows are wgmma's M, the tokens its
# N; each K step's promotion scales load a step ahead (SCALES_AHEAD; only promoted recipes
# read it).  H200, 16 x LLaMA shapes, best config of each kind (benchmarks/gemm.py
# --variants): blockwise 8.8 us swapped against 9.5-10.0 unswapped at 16x4096x4096, 19.0
# against 20.1 at 16x14336x4096, 19.7 against 21.2 at 16x4096x14336; row fast 8.0 against
# 9.1, 16.7 against 18.0, 18.1 against 19.4.  No unswapped config was fastest at any shape,
# so none is tuned.  Two calls ranked the stages alike: blockwise 3 or 4 first, 5 slowest
# (+0.3-0.9 us); row fast 4 or 5 first, 3 slowest (+0.8 us at 4096x4096).  The autotuner,
# timing without CUDA graphs, once took 3 stages for row fast (8.8 us in a graph against
# 8.0), so each recipe tunes only its own two (:data:`_STAGES_16`).  Row precise, tried
# with blockwise's two, took 9.0 us at 16x4096x4096 against 8.2 with all three: it waits
# on no scale loads in the K loop, and goes with the fast recipes.
_BY_BUCKET[16] = [_c(16, 64, 128, 4, stages, swap_ab=True) for stages in (3, 4, 5)]
# whether the scales change along K (1x128 / 128x128) -> the stages 16-row tiles tune
_STAGES_16 = {True: (3, 4), False: (4, 5)}
_BY_BUCKET[_LARGE] = [
    # single tensor-core accumulator (tensor / row scales, "fast"): 194 registers, no spills
    _c(128, 256, 128, 8, 3),
    _c(128, 256, 128, 8, 4),
    _c(256, 128, 128, 8, 3),
    # promoted every 128 of K (blockwise, "precise"): the fresh partial tile doubles the
    # accumulator registers, so keep 64 fp32 per thread per tile (128x128 at 8 warps: 175
    # registers; 128x256 spills 272 bytes).  64x128 at 4 warps fits 2 CTAs per SM, so one
    # CTA's promotion overlaps the other's wgmma.
    _c(128, 128, 128, 8, 3),
    _c(128, 128, 128, 8, 4),
    _c(64, 256, 128, 8, 3),
    _c(64, 128, 128, 4, 4),
]


def configs() -> list[triton.Config]:
    """Every config any bucket may use; :func:`prune` keeps the bucket's own."""
    return [c for cs in _BY_BUCKET.values() for c in cs]


def needs_k128(a_gran: int, w_gran: int, precise: bool) -> bool:
    """Blockwise scales (code >= 2) and precise promotion need BLOCK_K dividing 128."""
    return bool(precise) or a_gran >= 2 or w_gran >= 2


def prune(configs_, named_args, **kwargs):
    """Keep the configs of this call's M bucket whose BLOCK_K (and, for 16-row tiles,
    stages) the recipe allows."""
    args = {**named_args, **kwargs}
    mine = _BY_BUCKET.get(args["M_BUCKET"], _BY_BUCKET[_LARGE])
    keep = [c for c in configs_ if any(c is d for d in mine)]
    if needs_k128(args["A_GRAN"], args["W_GRAN"], args["PRECISE"]):
        keep = [c for c in keep if c.kwargs["BLOCK_K"] <= 128 and _acc_per_thread(c) <= 64]
    if args["M_BUCKET"] == 16:
        blockwise = args["A_GRAN"] >= 2 or args["W_GRAN"] >= 2
        keep = [c for c in keep if c.num_stages in _STAGES_16[blockwise]]
    return keep or [mine[0]]


def _acc_per_thread(c: triton.Config) -> int:
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)


def default_config(bucket: int) -> dict:
    """One fixed config per bucket, for the interpreter and for runs without autotuning."""
    if bucket in SMALL_TILES:
        bm, bn = SMALL_TILES[bucket]
        swap = bm == 16  # as the tuned configs of 16-row tiles
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8, "SWAP_AB": swap,
                "SCALES_AHEAD": swap, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "SWAP_AB": False,
            "SCALES_AHEAD": False, "num_warps": 8, "num_stages": 4}


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises split-K
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def split_k(m: int, n: int, k: int, block_m: int, block_n: int, sms: int,
            blockwise: bool = False) -> int:
    """Split K so that ~2 programs run per SM when the output tiles alone leave SMs idle,
    ~4 for ``blockwise`` scales (1x128 activations or 128x128 weights).

    Each split keeps at least 512 of K (4 steps of 128; 1024 for ``blockwise``) so the
    pipeline fills; the partial sums cost one extra fp32 pass over M x N, small next to the
    weight at M <= 256.  A blockwise K step is at most 128 wide and loads its scales before
    its promotion, and more programs per SM keep the weight stream busy.  H200, 16x64 tiles,
    one process (docs/performance.md): blockwise 1x12288x4096 took 20.3 us at split 2
    against 24.3 at split 1, 16x4096x14336 22.8 at split 8 against 25.1 at 4; 4096x4096
    stays at split 4 (11.0 us at 8 against 9.5).  Rowwise precise GEMMs lost 7-10% at 16
    tokens with the same rule (and gained 3-13% at one token), so they keep ~2.
    """
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    want = max(1, ((4 if blockwise else 2) * sms) // tiles)
    most = max(1, k // (1024 if blockwise else 512))
    return int(min(want, most, 16))
