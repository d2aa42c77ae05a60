"""What a residual add costs an FP8 GEMM: fused into the Triton GEMM's epilogue, or as a
separate add after cuBLAS (the trade ``Fp8Config(fuse_epilogues=True)`` times per shape); on
Hopper also fused into the warp-specialized Gluon kernel's epilogue (fast or promoted), with
one residual and with two (a block's last add, ``(x + o) + down``, against cuBLAS followed by
that add compiled by Inductor into one kernel).

Run on a CUDA (Hopper) machine::

    python benchmarks/gemm_epilogue.py [--m 4096 16]

For each recipe and shape it prints the ``triton.testing.do_bench`` median (µs) of the
Triton GEMM alone and with the residual fused, of cuBLAS alone and followed by the add, all
in the same run.  At decode sizes the eager Triton calls are bound by the host's launch
path (a compiled graph launches the kernels from Inductor's code instead).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8compile.kernels import gemm, select  # noqa: E402
from fp8compile.kernels.quant import quantize  # noqa: E402
from fp8compile.numerics import Fp8Format  # noqa: E402
from fp8compile.numerics import Granularity as G  # noqa: E402

RECIPES = ((G.ROW, G.ROW, "fast"), (G.TENSOR, G.TENSOR, "fast"), (G.GROUP, G.BLOCK, "precise"))
NK = ((4096, 4096), (4096, 14336))


def us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[4096])
    args = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    bf16 = torch.bfloat16
    for xg, wg, acc in RECIPES:
        for m in args.m:
            for n, k in NK:
                x = torch.randn(m, k, device="cuda", dtype=bf16)
                w = torch.randn(n, k, device="cuda", dtype=bf16)
                (xq, xs), (wq, ws) = (quantize(x, xg, Fp8Format.E4M3, False),
                                      quantize(w, wg, Fp8Format.E4M3, False))
                r = torch.randn(m, n, device="cuda", dtype=bf16)

                def tri(res):
                    return gemm.scaled_mm(xq, xs, xg, wq, ws, wg, None, bf16, acc, "none", res,
                                          gluon=False)

                def cub(res):
                    return select.cublas_scaled_mm(xq, xs, xg, wq, ws, wg, None, bf16, acc,
                                                   "none", res)

                t = {"triton": us(lambda: tri(None)), "triton+res": us(lambda: tri(r)),
                     "cublas": us(lambda: cub(None)), "cublas+add": us(lambda: cub(r))}
                print(f"{xg.value:6s} {acc:7s} {m}x{n}x{k}: "
                      + "  ".join(f"{a} {b:7.1f}" for a, b in t.items())
                      + f"   residual costs triton {t['triton+res'] - t['triton']:+.1f}, "
                        f"cublas {t['cublas+add'] - t['cublas']:+.1f} us")
                if gemm.gluon_serves(xq, xs, xg, wq, ws, wg, bf16, "none", r, acc, r):
                    gluon_rows(xq, xs, xg, wq, ws, wg, acc, r, cub)


def gluon_rows(xq, xs, xg, wq, ws, wg, acc, r, cub) -> None:
    """The Gluon kernel alone, with one residual and with two, against cuBLAS followed by
    the add of one residual, and of two (one Inductor kernel, as in a compiled block)."""
    bf16 = torch.bfloat16
    r2 = torch.randn_like(r)
    add2 = torch.compile(lambda y, a, b: a + b + y)

    def glu(*res):
        return gemm.scaled_mm(xq, xs, xg, wq, ws, wg, None, bf16, acc, "none", *res[:1],
                              residual2=res[1] if len(res) > 1 else None)

    add2(cub(None), r, r2)  # compiled before timing
    ref = cub(None).float() + r.float() + r2.float()
    err = ((glu(r, r2).float() - ref).norm() / ref.norm()).item()
    t = {"gluon": us(glu), "gluon+res": us(lambda: glu(r)), "gluon+2res": us(lambda: glu(r, r2)),
         "cublas+add2": us(lambda: add2(cub(None), r, r2))}
    print(f"{'':15s}" + "  ".join(f"{a} {b:7.1f}" for a, b in t.items())
          + f"   two residuals: gluon {t['cublas+add2'] / t['gluon+2res']:.3f}x cuBLAS + add"
          + f" (relative difference {err:.1e})")


if __name__ == "__main__":
    main()
