"""Registers and spills of the quantization kernels for Hopper, compiled offline (no GPU).

Run it after changing a kernel, before any GPU time::

    python benchmarks/kernel_resources.py

The launch settings mirror the launchers in :mod:`fp8compile.kernels.quant` and
:mod:`fp8compile.kernels.layout`; see :mod:`fp8compile.kernels.resources` for the method.
"""

from __future__ import annotations

import os
import sys
import warnings

import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8compile.kernels import layout, quant  # noqa: E402
from fp8compile.kernels.resources import sm90_resources  # noqa: E402

E4M3 = {"IS_E4M3": True, "FMAX": 448.0, "POW2": False, "HW_CAST": True}


def quantize_kernel(gran: int, block_m: int, block_k: int, one_chunk: bool, warps: int,
                    transposed: bool = False, block_slice: int = quant._BLOCK_SLICE,
                    producer: int = 0, amax_out: bool = False, history: bool = False):
    sig = {"x_ptr": "*bf16", "x2_ptr": "*bf16", "nw_ptr": "*bf16", "q_ptr": "*u8",
           "s_ptr": "*fp32", "amax_ptr": "*fp32", "amax_out_ptr": "*fp32", "skip_ptr": "*fp32",
           "M": "i32", "K": "i32", "k_per_prog": "i32", "eps": "fp32", "n_slots": "i32",
           "skip_n": "i32", "stride_xm": "i32", "stride_x2m": "i32",
           "stride_qm": "i32", "stride_sm": "i32", "stride_sk": "i32"}
    consts = {"stride_x2k": 1, "GRAN": gran, "PRODUCER": producer, "AMAX_ONLY": False,
              "GIVEN_SCALE": False, "AMAX_OUT": amax_out, "SKIP_BLOCK": 16 if history else 0,
              "HISTORY": history, "AMAX_AT": 1 if history else 0,
              "SLOTS": quant._AMAX_SLOTS_MAX if history else 1,
              "ONE_CHUNK": one_chunk, "BLOCK_M": block_m, "BLOCK_K": block_k,
              "BLOCK_SLICE": block_slice, **E4M3}
    if transposed:  # a transposed view: unit row stride, strided K
        sig["stride_xk"] = sig.pop("stride_xm")
        consts["stride_xm"] = 1
    else:
        consts["stride_xk"] = 1
    return sm90_resources(quant._quantize_kernel, sig, consts, warps)


def quantize_groups():
    """1x128 activation groups, as the launcher runs them (32x128 tiles, 4 warps)."""
    return quantize_kernel(2, 32, 128, False, 4)


def quantize_rows():
    """Per-row scaling of a 4096-wide row held in registers (1x4096, 4 warps)."""
    return quantize_kernel(1, 1, 4096, True, 4)


def rmsnorm_groups():
    """1x128 groups fused into RMSNorm, the 4096-wide row read once (1x4096, 4 warps)."""
    return quantize_kernel(2, 1, 4096, True, 4, producer=quant.PRODUCER_RMSNORM)


def silu_mul_rows():
    """Per-row scaling fused into SiLU·mul at 14336 wide (1x16384, 16 warps)."""
    return quantize_kernel(1, 1, 16384, True, 16, producer=quant.PRODUCER_SILU_MUL)


def quantize_blocks():
    """128x128 weight blocks, as the launcher runs them (8 warps, default slice)."""
    return quantize_kernel(3, 128, 128, False, 8)


def quantize_blocks_transposed():
    """128x128 blocks of a transposed view (the backward's weight.t()): the whole tile."""
    return quantize_kernel(3, 128, 128, False, 8, transposed=True, block_slice=128)


def delayed_rmsnorm_cast():
    """Delayed scaling's cast fused into RMSNorm at d=4096 (2x4096, 8 warps), the scale from
    a 16-long history (or the first step's amax slots) and x's amax recorded
    (``quantize_history``)."""
    return quantize_kernel(0, 2, 4096, True, 8, producer=quant.PRODUCER_RMSNORM, amax_out=True,
                           history=True)


def delayed_silu_mul_cast():
    """The same fused into SiLU·mul at 14336 wide (1x16384, 16 warps)."""
    return quantize_kernel(0, 1, 16384, True, 16, producer=quant.PRODUCER_SILU_MUL,
                           amax_out=True, history=True)


def delayed_cast():
    """The same cast of a weight or dY, no producer (2x4096, 8 warps)."""
    return quantize_kernel(0, 2, 4096, True, 8, amax_out=True, history=True)


def delayed_cast_t(history: bool = True):
    """dY's delayed cast with its transpose (``quantize_history_t``): 64x64 tiles, 4 warps."""
    return sm90_resources(
        quant._history_cast_t_kernel,
        {"x_ptr": "*bf16", "q_ptr": "*u8", "qt_ptr": "*u8", "s_ptr": "*fp32",
         "slots_ptr": "*fp32", "amax_out_ptr": "*fp32", "hist_ptr": "*fp32", "M": "i32",
         "N": "i32", "n_slots": "i32", "hist_n": "i32", "stride_xm": "i32"},
        {"stride_xn": 1, "AMAX_ONLY": False, "HISTORY": history, "HIST_BLOCK": 16,
         "SLOTS": quant._AMAX_SLOTS_MAX, "BLOCK": quant._CAST_T_BLOCK, **E4M3}, 4)


def dynamic_cast_t():
    """The same with a dynamic scale (``quantize_tensor_t``)."""
    return delayed_cast_t(history=False)


def quantize_dual(fixup: bool = False):
    return sm90_resources(
        quant._quantize_dual_kernel,
        {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "qt_ptr": "*u8", "st_ptr": "*fp32",
         "flag_ptr": "*i8", "M": "i32", "N": "i32", "stride_xm": "i32", "stride_sk": "i32",
         "stride_stk": "i32"},
        {"stride_xn": 1, "BLOCK": 128, "FIXUP": fixup, **E4M3},
        quant._TILE_WARPS["quantize_dual_fixup" if fixup else "quantize_dual"])


def quantize_dual_fixup():
    """The second launch, which redoes tiles holding NaN/Inf with the full handling."""
    return quantize_dual(fixup=True)


def requantize_t():
    return sm90_resources(
        quant._requantize_t_kernel,
        {"q_ptr": "*u8", "s_ptr": "*fp32", "out_ptr": "*u8", "os_ptr": "*fp32", "M": "i32",
         "K": "i32", "stride_qm": "i32", "stride_sk": "i32", "stride_om": "i32",
         "stride_osk": "i32"},
        {"stride_sm": 1, "stride_osm": 1, "IN_E4M3": True, "BLOCK": 128,
         **E4M3}, quant._TILE_WARPS["requantize_t"])


def transpose_copy():
    return sm90_resources(
        layout._copy_2d_kernel,
        {"src_ptr": "*u8", "dst_ptr": "*u8", "R": "i32", "C": "i32", "stride_sc": "i32",
         "stride_dr": "i32"},
        {"stride_sr": 1, "BLOCK_R": 64, "BLOCK_C": 64}, 4)


def gemv(block_k: int = 1024, a_gran: int = 2, w_gran: int = 3):
    """The one-row GEMM (``kernels.gemv``) at the default launch for 4096 columns on an H200
    (steps of ``block_k``: 1024 there, 512 for 14336 columns), blockwise scales by default."""
    import torch

    from fp8compile.kernels import gemv as g

    launch = g.default_launch(4096, torch.device("cpu"))
    sig = {"a_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "as_ptr": "*fp32", "ws_ptr": "*fp32",
           "bias_ptr": "*bf16", "res_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32",
           "stride_wn": "i32", "stride_as1": "i32", "stride_ws0": "i32", "stride_ws1": "i32",
           "stride_rn": "i32"}
    consts = {"stride_on": 1, "A_GRAN": a_gran, "W_GRAN": w_gran, "HAS_BIAS": False,
              "ACTIVATION": 0, "HAS_RES": False, "BLOCK_N": launch["block_n"],
              "GROUPS": block_k // 128, "STEP": 128}
    return sm90_resources(g._scaled_gemv_kernel, sig, consts, launch["num_warps"])


def gemv_short_steps():
    return gemv(block_k=512)


_W = quant._TILE_WARPS
KERNELS = {
    "quantize, 1x128 groups (32x128, 4 warps)": quantize_groups,
    "quantize, rows (1x4096, 4 warps)": quantize_rows,
    "quantize, 1x128 groups fused into RMSNorm (1x4096, 4 warps)": rmsnorm_groups,
    "quantize, rows fused into SiLU·mul (1x16384, 16 warps)": silu_mul_rows,
    "quantize, 128x128 blocks (32-row slices, 8 warps)": quantize_blocks,
    "quantize, 128x128 blocks of a transposed view (whole)": quantize_blocks_transposed,
    "delayed cast fused into RMSNorm (2x4096, 8 warps)": delayed_rmsnorm_cast,
    "delayed cast fused into SiLU·mul (1x16384, 16 warps)": delayed_silu_mul_cast,
    "delayed cast, no producer (2x4096, 8 warps)": delayed_cast,
    "delayed cast of dY with its transpose (64x64, 4 warps)": delayed_cast_t,
    "dynamic cast of dY with its transpose (64x64, 4 warps)": dynamic_cast_t,
    f"quantize_dual (whole 128x128 tile, {_W['quantize_dual']} warps)": quantize_dual,
    "quantize_dual, fix-up launch for NaN/Inf tiles": quantize_dual_fixup,
    f"requantize_t (whole 128x128 tile, {_W['requantize_t']} warps)": requantize_t,
    "FP8 transpose copy (64x64, 4 warps)": transpose_copy,
    "GEMM of one row on CUDA cores, blockwise, steps of 1024": gemv,
    "GEMM of one row on CUDA cores, blockwise, steps of 512": gemv_short_steps,
}


def main() -> None:
    warnings.filterwarnings("ignore")
    print(f"sm_90, triton {triton.__version__}")
    for name, fn in KERNELS.items():
        print(f"{name:52s} {fn()}")


if __name__ == "__main__":
    main()
