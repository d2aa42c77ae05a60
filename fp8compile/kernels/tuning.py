"""Tile configurations of the FP8 GEMM for Hopper (H100 / H200), by M bucket.

The autotuner keys on ``(M_BUCKET, N, K, recipe switches)``, so a process tunes each layer
shape once per bucket and reuses the choice for every M in the bucket.

* M <= 256 (decode, small prefill): one fixed ``BLOCK_M x BLOCK_N`` per bucket and kind of
  scales (at 256 rows also per shape: :func:`small_configs`), so the launcher knows the tile
  count and can pick split-K before launching; only the stages of 16 and 32 rows are tuned,
  every other bucket up to 256 rows has one config.  Tiles of at most 32
  rows swap the operands (see ``_swapped``).  At M=16, N=4096 a 16x64 tile gives 64
  programs for 132 SMs, and the GEMM is bound by reading the weight: split-K brings it to
  ~2 programs per SM (~4 with blockwise scales, see :func:`split_k`).
* M > 256: compute bound; 128x256x128 with 8 warps (two consumer warpgroups) and 3 stages
  (144 KB of shared memory) is the workhorse of the single-accumulator path, 128x128 and
  64x128 that of the promoted path (register counts below, from ptxas for sm_90a).
  BLOCK_K=128 so each K step sees one weight-block scale.
"""

from __future__ import annotations

import functools

import torch
import triton

__all__ = ["SMALL_TILES", "blockwise_scales", "cdiv", "configs", "m_bucket", "next_pow2",
           "prune", "small_configs", "small_tile", "split_k"]


def blockwise_scales(a_gran: int, w_gran: int) -> bool:
    """Whether the scales change along K: 1x128 activations or 128x128 weights (granularity
    codes >= 2).  Such GEMMs promote every 128 of K and take their own small-M configs."""
    return a_gran >= 2 or w_gran >= 2


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


def _swapped(bm, stages):
    return [_c(bm, 64, 128, 4, n, swap_ab=True) for n in stages]


def _tile(c: triton.Config) -> tuple[int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]


# Tiles of 16 and 32 rows swap the operands (SWAP_AB): the MMA is otherwise Ampere-style
# (wgmma takes 64 rows per warpgroup), and with the swap the 64 weight rows are wgmma's M, the
# tokens its N; each K step's promotion scales load a step ahead (SCALES_AHEAD; only promoted
# recipes read it).  H200, LLaMA shapes, best config of each kind (benchmarks/gemm.py
# --variants), N x K = 4096^2, 14336x4096, 4096x14336:
#   16 rows: blockwise 8.8 / 19.0 / 19.7 us swapped against 9.5-10.0 / 20.1 / 21.2
#            unswapped; row fast 8.0 / 16.7 / 18.1 against 9.1 / 18.0 / 19.4.
#   32 rows: blockwise 10.3 / 21.6-21.7 / 23.3 against 11.8-11.9 / 24.1 / 25.2; row fast
#            9.5 / 17.3-17.4 / 20.1 against 10.7-10.8 / 19.6 / 22.3.  32x128 swapped was no
#            faster than 32x64.
# No unswapped config was fastest at any of these shapes, so none is tuned.  Stages, in every
# call: blockwise 3 or 4 first, 5 slowest; row fast 4 or 5 first, 3 slowest (+0.8 us at
# 16x4096x4096).  The autotuner, timing without CUDA graphs, once took 3 stages for row fast
# (8.8 us in a graph against 8.0), so each kind of scales tunes only its own two.  Row
# precise, tried with blockwise's two, took 9.0 us at 16x4096x4096 against 8.2 with all
# three: it waits on no scale loads in the K loop, and goes with the fast recipes.
#
# 64 and 128 rows run wgmma unswapped (swapped was within 0.2 us) and tune nothing: the
# autotuner (timing without CUDA graphs) picked configs 20-45% slower than the best one here,
# and differently from one process to the next.  H200, LLaMA shapes (benchmarks/gemm.py
# --variants and --fold), N x K as above:
#   blockwise (both buckets): 3 stages fastest at all six shapes.  At 128x4096x14336, 4
#     stages took over 36 us against 32.3, and a process whose tuner picked 4 there ran it
#     at 46.7; at 64x14336x4096 the tuner's old pick among 4 and 6 stages took 31.5 us
#     against 25.5.  At 128 rows blockwise takes 64x64 tiles: 13.4 / 27.3 / 32.3 us against
#     64x128's 13.8 / 32.6 / 35.0, and the launcher on 64x128 with its split 14.2 / 40.1 /
#     42.0.
#   other recipes, 64 rows: 5 stages 10.1 / 18.2 / 21.9 us against 4 stages' 10.5 / 19.0 /
#     22.4 (3 was 10% slower still); the tuner had lost 20% at 64x4096x4096 picking among
#     4 / 6 stages and BLOCK_K 256.
#   other recipes, 128 rows: 64x128 tiles (64x64 was 10-12% slower at the two 14336
#     shapes); at the launcher's splits 4 stages took 11.8 / 21.4 / 25.4 us against 5
#     stages' 11.6 / over 23.9 / over 25.7.  Tuning both, the launcher ran one recipe at
#     128x14336x4096 at 25.2-25.9 us in three processes of six (20.3-21.3 otherwise), and
#     128x4096x14336 at 30.3 us in one (25.1-25.3).
#
# 256 rows tune nothing either (the tuner's three configs had left one GEMM at 31.1-36.0 us
# from one process to the next).  H200, ``--variants --m 256``, two calls, us:
#   blockwise: 64x64, 3 stages, at the split rule's 2 / 1 / 2: 17.8 / 52.2 / 49.9 against
#     the launcher's 128x128 (autotuned) 20.2 / 60.0 / 56.5.
#   other recipes: 128x128, 6 stages (3 was 2-3% faster at 14336x4096 and over 9% slower at
#     4096x14336; BLOCK_K 256 never led), except where those tiles fill the SMs only by a
#     split whose partials outweigh the weight (4096^2: 64 tiles, split 2, 8 MiB of fp32
#     partials written and read for a 16 MiB weight).  There 64x128 tiles at split 1 run
#     row fast 10.7-11.4, row precise 14.0 and tensor fast 10.5 us, against 14.3-15.0,
#     16.4-17.2 and 13.8-16.7 on 128x128 tiles (:func:`_halve_rows`).
# (M bucket, blockwise_scales) -> the configs of a bucket of at most 256 rows; one tile each.
_SMALL_CONFIGS = {
    (16, True): _swapped(16, (3, 4)), (16, False): _swapped(16, (4, 5)),
    (32, True): _swapped(32, (3, 4)), (32, False): _swapped(32, (4, 5)),
    (64, True): [_c(64, 64, 128, 4, 3)], (64, False): [_c(64, 64, 128, 4, 5)],
    (128, True): [_c(64, 64, 128, 4, 3)], (128, False): [_c(64, 128, 128, 4, 4)],
    (256, True): [_c(64, 64, 128, 4, 3)], (256, False): [_c(128, 128, 128, 8, 6)],
}
# The half-height configs of a bucket whose own tiles would leave SMs idle (_halve_rows).
_HALF_HEIGHT = {(256, False): [_c(64, 128, 128, 4, 6)]}
# M bucket -> (BLOCK_M, BLOCK_N) of the split-K regime without blockwise scales (small_tile
# gives each kind of scales and shape its own).
SMALL_TILES = {bucket: _tile(cs[0]) for (bucket, blockwise), cs in _SMALL_CONFIGS.items()
               if not blockwise}
# Above 256 rows: tuned per bucket among these.
_LARGE_CONFIGS = [
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


def _halve_rows(bucket: int, n: int, k: int, block_m: int, block_n: int, sms: int) -> bool:
    """Whether ``block_m x block_n`` tiles of a bucket's rows fill the SMs only by a split of
    K whose fp32 partials would outweigh half the weight (see :func:`split_k`): then tiles
    of half the rows fill them without a split."""
    tiles = cdiv(bucket, block_m) * cdiv(n, block_n)
    return sms // tiles > max(1, k // (16 * bucket))


def small_configs(bucket: int, blockwise: bool, n: int | None = None, k: int | None = None,
                  sms: int | None = None) -> list[triton.Config] | None:
    """The configs of a bucket of at most 256 rows for a kind of scales (``blockwise``:
    :func:`blockwise_scales`) and, given ``n``, ``k`` and the SM count, the GEMM's shape
    (half-height tiles where the bucket's own would leave SMs idle); None above 256 rows."""
    configs_ = _SMALL_CONFIGS.get((bucket, blockwise))
    half = _HALF_HEIGHT.get((bucket, blockwise))
    if configs_ and half and None not in (n, k, sms) and _halve_rows(
            bucket, n, k, *_tile(configs_[0]), sms):
        return half
    return configs_


def small_tile(bucket: int, blockwise: bool, n: int | None = None, k: int | None = None,
               sms: int | None = None) -> tuple[int, int] | None:
    """``(BLOCK_M, BLOCK_N)`` of the split-K regime (:func:`small_configs`), or None above
    it."""
    configs_ = small_configs(bucket, blockwise, n, k, sms)
    return _tile(configs_[0]) if configs_ else None


def configs() -> list[triton.Config]:
    """Every config any bucket may use; :func:`prune` keeps the bucket's own."""
    return [c for cs in (*_SMALL_CONFIGS.values(), *_HALF_HEIGHT.values(),
                         _LARGE_CONFIGS) for c in cs]


def needs_k128(a_gran: int, w_gran: int, precise: bool) -> bool:
    """Blockwise scales (code >= 2) and precise promotion need BLOCK_K dividing 128."""
    return bool(precise) or blockwise_scales(a_gran, w_gran)


def prune(configs_, named_args, **kwargs):
    """Keep the configs of this call's M bucket (and kind of scales and shape, up to 256
    rows: :func:`small_configs`) whose BLOCK_K the recipe allows."""
    args = {**named_args, **kwargs}
    blockwise = blockwise_scales(args["A_GRAN"], args["W_GRAN"])
    a = args.get("a_ptr")
    sms = num_sms(a.device) if isinstance(a, torch.Tensor) else None
    mine = (small_configs(args["M_BUCKET"], blockwise, args["N"], args["K"], sms)
            or _LARGE_CONFIGS)
    keep = [c for c in configs_ if any(c is d for d in mine)]
    if needs_k128(args["A_GRAN"], args["W_GRAN"], args["PRECISE"]):
        keep = [c for c in keep if c.kwargs["BLOCK_K"] <= 128 and _acc_per_thread(c) <= 64]
    return keep or [mine[0]]


def _acc_per_thread(c: triton.Config) -> int:
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)


def default_config(bucket: int, blockwise: bool = False, n: int | None = None,
                   k: int | None = None, sms: int | None = None) -> dict:
    """One fixed config per bucket, kind of scales (and shape, as :func:`small_configs`), for
    the interpreter and for runs without autotuning."""
    tuned = small_configs(bucket, blockwise, n, k, sms)
    if tuned:
        c = tuned[0]
        return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
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
    weight at M <= 64.  A blockwise K step is at most 128 wide and loads its scales before
    its promotion, and more programs per SM keep the weight stream busy.  H200, 16x64 tiles,
    one process (docs/performance.md): blockwise 1x12288x4096 took 20.3 us at split 2
    against 24.3 at split 1, 16x4096x14336 22.8 at split 8 against 25.1 at 4; 4096x4096
    stays at split 4 (11.0 us at 8 against 9.5).  Rowwise precise GEMMs lost 7-10% at 16
    tokens with the same rule (and gained 3-13% at one token), so they keep ~2.

    Larger tiles hold fewer programs per SM, and each split adds fp32 partials (split x M x N,
    written and read back).  Blockwise 128x128 tiles (a forced config; 256 rows take 64x64)
    aim at one program per SM.  Other tiles of 64x128 and up go past one per SM only while
    the partials stay under half the FP8 weight's bytes (where even one per SM needs more,
    :func:`small_configs` halves the tile's rows instead).  H200, ``benchmarks/gemm.py
    --splits``, us at split 1 / 2 / 4: row fast 128x4096x4096 12.7 / 11.2 / 12.4,
    128x4096x14336 31.5 / 25.6 / 25.3, 256x4096x14336 38.1 / 33.6 / 38.2 (split 3: 39.9);
    row precise 256x4096x4096 20.8 / 16.4 / 21.9; blockwise (128x128) 256x4096x4096 28.0 /
    20.0 / 24.7, 256x14336x4096 59.2 / 75.0 / 89.3.
    """
    tiles = cdiv(m, block_m) * cdiv(n, block_n)
    if blockwise:
        want = ((1 if block_m * block_n >= 128 * 128 else 4) * sms) // tiles
    else:
        want = (2 * sms) // tiles
        if block_m * block_n >= 64 * 128:
            # past one program per SM, only while the fp32 partials stay under half the
            # weight's bytes; a power of two (K = 14336 split 3 ran slower than 2 or 4)
            want = min(want, max(sms // tiles, k // (16 * m)))
            want = 1 << max(0, want.bit_length() - 1)
    most = max(1, k // (1024 if blockwise else 512))
    return int(min(max(1, want), most, 16))
