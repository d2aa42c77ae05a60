"""The one-to-four-row FP8 GEMM (``kernels.gemv``, CUDA cores) against what runs today at
those sizes (``kernels.scaled_mm``: the tensor-core kernel on a 16-row tile, K split and
summed in the GEMM) and bf16 ``F.linear``, on LLaMA shapes.

Each time is the median of CUDA-graph replays over operand sets that together exceed L2
(``gemm.py``'s harness), so the weight is read from HBM as in a decode step.  For each
recipe the GEMV kernel is timed at every ``block_n`` x ``num_warps`` launch below and at its
default; its error against the fp32 reference is printed next to the tensor-core kernel's.

Run on a CUDA (Hopper) machine::

    python benchmarks/gemv.py --m 1 2 4
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemm as harness  # noqa: E402  (benchmarks/gemm.py: bench, operand sets, log)

from fp8compile.numerics import Granularity as G  # noqa: E402

RECIPES = [("blockwise", G.GROUP, G.BLOCK, "precise"), ("row fast", G.ROW, G.ROW, "fast"),
           ("tensor fast", G.TENSOR, G.TENSOR, "fast")]
LAUNCHES = list(itertools.product((8, 16, 32, 64), (2, 4, 8)))


def run(ms: list[int]) -> None:
    from fp8compile.kernels.gemm import scaled_mm
    from fp8compile.kernels.gemv import scaled_gemv
    from fp8compile.ops import scaled_mm_reference

    log = harness.log
    log("us per GEMM (x bf16 F.linear); gemv: default launch, then the best "
        "(block_n, num_warps)")
    for (n, k), m in itertools.product(harness.NK, ms):
        xs, ws, t_bf = harness._decode_operands(m, n, k)
        log(f"\n{m}x{n}x{k}: bf16 {t_bf * 1e3:.1f} us")
        for name, xg, wg, acc in RECIPES:
            sets = harness._fp8_sets(xs, ws, xg, wg)
            xq, xsc, wq, wsc = sets[0]
            ref = scaled_mm_reference(xq, xsc, xg, wq, wsc, wg, None, torch.float32, "none",
                                      None)
            now = scaled_mm(xq, xsc, xg, wq, wsc, wg, None, torch.float32, acc)
            t_now = harness.bench(lambda a, sa, b, sb: scaled_mm(
                a, sa, xg, b, sb, wg, None, torch.bfloat16, acc), sets)
            got = scaled_gemv(xq, xsc, xg, wq, wsc, wg, out_dtype=torch.float32)
            t_def = harness.bench(lambda a, sa, b, sb: scaled_gemv(
                a, sa, xg, b, sb, wg), sets)
            timed = []
            for block_n, warps in LAUNCHES:
                def f(a, sa, b, sb, block_n=block_n, warps=warps):
                    return scaled_gemv(a, sa, xg, b, sb, wg, block_n=block_n, num_warps=warps)
                try:
                    timed.append((harness.bench(f, sets), block_n, warps))
                except Exception as e:  # noqa: BLE001  (a launch this GPU refuses)
                    log(f"    block_n {block_n} warps {warps}: {type(e).__name__}: "
                        f"{str(e)[:80]}")
            best = min(timed)
            log(f"  {name:12s} scaled_mm {t_now * 1e3:6.1f} ({t_bf / t_now:.2f}x)  gemv "
                f"{t_def * 1e3:6.1f} ({t_bf / t_def:.2f}x)  best {best[0] * 1e3:6.1f} "
                f"({t_bf / best[0]:.2f}x, block_n {best[1]}, {best[2]} warps)  error vs fp32: "
                f"scaled_mm {harness.rel_err(now, ref):.2e}, gemv {harness.rel_err(got, ref):.2e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="*", default=[1, 2, 4], help="rows (at most 4)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        harness.log("no CUDA device: nothing to time (tests/kernels/test_gemv.py runs the "
                    "kernel under TRITON_INTERPRET=1)")
        return 0
    import triton
    harness.log(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  "
                f"triton {triton.__version__}")
    run(args.m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
