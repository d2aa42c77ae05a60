"""The one-row FP8 GEMM (``kernels.gemv``, CUDA cores) against the tensor-core kernel that
ran M = 1 before it (``kernels.scaled_mm(gemv=False)``: a 16-row tile, K split and summed in
the GEMM) and bf16 ``F.linear``, on LLaMA shapes.

Each time is the median of CUDA-graph replays over operand sets that together exceed L2
(``gemm.py``'s harness), so the weight is read from HBM as in a decode step.  For each
recipe the gemv kernel is timed at its default launch (:func:`kernels.gemv.default_launch`)
and, unless ``--no-sweep``, at every ``block_n`` x ``block_k`` x ``num_warps`` launch below;
its error against the fp32 reference is printed next to the tensor-core kernel's.

Run on a CUDA (Hopper) machine::

    python benchmarks/gemv.py
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
BLOCK_NS, BLOCK_KS, WARPS = (4, 8, 16), (512, 1024, 2048), (2, 4, 8)
# fp32 products a thread holds per step; past this a launch only spills
MAX_PRODUCTS = 128


def run(block_ks=BLOCK_KS, sweep: bool = True) -> None:
    from fp8compile.kernels.gemm import scaled_mm
    from fp8compile.kernels.gemv import default_launch, scaled_gemv
    from fp8compile.ops import scaled_mm_reference

    log = harness.log
    log("us per GEMM at M=1 (x bf16 F.linear): the tensor-core kernel (16-row tile, split K) "
        "and the gemv kernel at its default launch; then every launch of the gemv kernel, "
        "fastest first (us, block_n, block_k, num_warps)")
    for n, k in harness.NK:
        xs, ws, t_bf = harness._decode_operands(1, n, k)
        log(f"\n1x{n}x{k}: bf16 {t_bf * 1e3:.1f} us; gemv default "
            f"{default_launch(n, torch.device('cuda'))}")
        for name, xg, wg, acc in RECIPES:
            sets = harness._fp8_sets(xs, ws, xg, wg)
            xq, xsc, wq, wsc = sets[0]
            ref = scaled_mm_reference(xq, xsc, xg, wq, wsc, wg, None, torch.float32, "none",
                                      None)
            now = scaled_mm(xq, xsc, xg, wq, wsc, wg, None, torch.float32, acc, gemv=False)
            t_now = harness.bench(lambda a, sa, b, sb: scaled_mm(
                a, sa, xg, b, sb, wg, None, torch.bfloat16, acc, gemv=False), sets)
            got = scaled_gemv(xq, xsc, xg, wq, wsc, wg, out_dtype=torch.float32)
            t_def = harness.bench(lambda a, sa, b, sb: scaled_gemv(a, sa, xg, b, sb, wg), sets)
            line = (f"  {name:12s} tensor cores {t_now * 1e3:6.1f} ({t_bf / t_now:.2f}x)  gemv "
                    f"{t_def * 1e3:6.1f} ({t_bf / t_def:.2f}x, {t_now / t_def:.2f}x the tensor "
                    f"cores)  error vs fp32: {harness.rel_err(now, ref):.2e} / "
                    f"{harness.rel_err(got, ref):.2e}")
            if sweep:
                timed = []
                for bn, bk, warps in itertools.product(BLOCK_NS, block_ks, WARPS):
                    if bn * bk > MAX_PRODUCTS * 32 * warps:
                        continue

                    def f(a, sa, b, sb, bn=bn, bk=bk, warps=warps):
                        return scaled_gemv(a, sa, xg, b, sb, wg, block_n=bn, block_k=bk,
                                           num_warps=warps)
                    timed.append((harness.bench(f, sets), bn, bk, warps))
                timed.sort()
                line += "\n    launches: " + ", ".join(
                    f"{t * 1e3:.1f} ({bn} {bk} {w})" for t, bn, bk, w in timed)
            log(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-k", type=int, nargs="*", default=list(BLOCK_KS),
                    help="K per step to sweep (128 times a power of two)")
    ap.add_argument("--no-sweep", action="store_true", help="the default launch only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        harness.log("no CUDA device: nothing to time (tests/kernels/test_gemv.py runs the "
                    "kernel under TRITON_INTERPRET=1)")
        return 0
    import triton
    harness.log(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  "
                f"triton {triton.__version__}")
    run(args.block_k, not args.no_sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
