"""Registers and spills of the quantization kernels for Hopper, compiled offline (no GPU).

Triton compiles for ``sm_90`` with its bundled ``ptxas`` on any machine; ``cuobjdump`` then
reports each kernel's registers per thread and its stack (spill) bytes.  A spill in a
memory-bound kernel costs bandwidth, so this is the first check after changing one, before
any GPU time::

    python benchmarks/kernel_resources.py

The launch settings below mirror the launchers in :mod:`fp8compile.kernels.quant` and
:mod:`fp8compile.kernels.layout` (unit strides specialised as Triton does at run time).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8compile.kernels import layout, quant  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
E4M3 = {"IS_E4M3": True, "FMAX": 448.0, "POW2": False, "HW_CAST": True}


def usage(fn, signature: dict, constexprs: dict, num_warps: int) -> str:
    for name in constexprs:
        signature[name] = "constexpr"
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=TARGET, options={"num_warps": num_warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    return " ".join(x for x in line.split() if x.startswith(("REG:", "STACK:", "SHARED:")))


def quantize_kernel(gran: int, block_m: int, block_k: int, one_chunk: bool, warps: int):
    sig = {"x_ptr": "*bf16", "x2_ptr": "*bf16", "nw_ptr": "*bf16", "q_ptr": "*u8",
           "s_ptr": "*fp32", "amax_ptr": "*fp32", "M": "i32", "K": "i32", "k_per_prog": "i32",
           "eps": "fp32", "stride_xm": "i32", "stride_x2m": "i32", "stride_qm": "i32",
           "stride_sm": "i32", "stride_sk": "i32"}
    consts = {"stride_xk": 1, "stride_x2k": 1, "GRAN": gran, "PRODUCER": 0, "AMAX_ONLY": False,
              "ONE_CHUNK": one_chunk, "BLOCK_M": block_m, "BLOCK_K": block_k, **E4M3}
    return usage(quant._quantize_kernel, sig, consts, warps)


def main() -> None:
    warnings.filterwarnings("ignore")
    rows = [
        ("quantize, 1x128 groups (32x128, 4 warps)", lambda: quantize_kernel(2, 32, 128, False, 4)),
        ("quantize, rows (2x4096, 8 warps)", lambda: quantize_kernel(1, 2, 4096, True, 8)),
        ("quantize, 128x128 blocks (8 warps)", lambda: quantize_kernel(3, 128, 128, False, 8)),
        ("quantize_dual (16-row slices, 8 warps)", lambda: usage(
            quant._quantize_dual_kernel,
            {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "qt_ptr": "*u8",
             "st_ptr": "*fp32", "M": "i32", "N": "i32", "stride_xm": "i32",
             "stride_sk": "i32", "stride_stk": "i32"},
            {"stride_xn": 1, "BLOCK": 128, "HALF": quant._HALF, **E4M3}, 8)),
        ("requantize_t (16 warps)", lambda: usage(
            quant._requantize_t_kernel,
            {"q_ptr": "*u8", "s_ptr": "*fp32", "out_ptr": "*u8", "os_ptr": "*fp32", "M": "i32",
             "K": "i32", "stride_qm": "i32", "stride_sk": "i32", "stride_om": "i32",
             "stride_osk": "i32"},
            {"stride_sm": 1, "stride_osm": 1, "IN_E4M3": True, "BLOCK": 128, **E4M3}, 16)),
        ("FP8 transpose copy (64x64, 4 warps)", lambda: usage(
            layout._copy_2d_kernel,
            {"src_ptr": "*u8", "dst_ptr": "*u8", "R": "i32", "C": "i32", "stride_sc": "i32",
             "stride_dr": "i32"},
            {"stride_sr": 1, "BLOCK_R": 64, "BLOCK_C": 64}, 4)),
    ]
    print(f"sm_90, triton {triton.__version__}")
    for name, fn in rows:
        print(f"{name:44s} {fn()}")


if __name__ == "__main__":
    main()
