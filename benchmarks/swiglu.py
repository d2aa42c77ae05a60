"""The SwiGLU MLP's gate/up step: SiLU·mul in the GEMM's epilogue or in the next quantization.

Run on a Hopper machine::

    python benchmarks/swiglu.py [--m 2048 4096 8192] [--ffn 14336] [--d 4096]

For ``h = silu(x Wgᵀ) * (x Wuᵀ)`` followed by its FP8 quantization for the down projection
(what a LLaMA MLP computes between its two GEMMs; x already in FP8), with row and tensor
scales and fast accumulation, it times in one run (medians of CUDA-graph replays, µs):

* ``bf16``: ``F.linear`` over the stacked gate/up weight (N = 2F), the GEMM alone;
* ``cuBLAS + fused quant``: ``torch._scaled_mm`` over the stacked weight, then the SiLU·mul
  quantization reading both halves (the graph without ``fuse_swiglu``);
* ``Gluon + fused quant``: the same with the warp-specialized kernel's plain GEMM;
* ``Gluon SwiGLU + quant``: the kernel with the SwiGLU epilogue over the same stacked weight
  (half-width bf16 output), then a plain quantization of it (the graph with
  ``fuse_swiglu``).

Each step is also given with its GEMM alone, and the relative error of the dequantized
FP8 ``h`` of both graphs against ``h`` computed in fp32 from the bf16 operands.

Then, for static scaling (tensor scales, ``h``'s scale calibrated from its amax): the
cuBLAS GEMM followed by static scaling's SiLU·mul cast (one pass, ``quantize_static``)
against the kernel whose SwiGLU epilogue casts ``h`` to FP8 itself
(``scaled_mm_quantized``: no quantization pass at all).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8compile import numerics as nx  # noqa: E402
from fp8compile.kernels import gemm, select  # noqa: E402
from fp8compile.kernels.fused import silu_mul_quantize  # noqa: E402
from fp8compile.kernels.quant import quantize  # noqa: E402
from fp8compile.numerics import Fp8Format  # noqa: E402
from fp8compile.numerics import Granularity as G  # noqa: E402

E4M3 = Fp8Format.E4M3


def us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3


def rel_err(y, ref) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--d", type=int, default=4096)
    args = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    bf16, f, k = torch.bfloat16, args.ffn, args.d
    torch.manual_seed(0)
    gate = torch.randn(f, k, device="cuda", dtype=bf16) / k ** 0.5
    up = torch.randn(f, k, device="cuda", dtype=bf16) / k ** 0.5
    stacked = torch.cat([gate, up])
    print(f"{'M':>5} {'recipe':7} | {'bf16':>7} | {'cuBLAS+q':>9} {'(GEMM)':>7} | "
          f"{'Gluon+q':>8} {'(GEMM)':>7} | {'SwiGLU+q':>9} {'(GEMM)':>7} | "
          f"{'vs cuBLAS+q':>11} {'vs bf16':>7} | err unfused / fused")
    for xg, wg in ((G.ROW, G.ROW), (G.TENSOR, G.TENSOR)):
        wq, ws = quantize(stacked, wg, E4M3, False)
        iq, is_ = wq, ws
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=bf16)
            xq, xs = quantize(x, xg, E4M3, False)

            def cublas():
                return select.cublas_scaled_mm(xq, xs, xg, wq, ws, wg, None, bf16, "fast")

            def gluon():
                return gemm.scaled_mm(xq, xs, xg, wq, ws, wg, None, bf16, "fast")

            def fused():
                return gemm.scaled_mm(xq, xs, xg, iq, is_, wg, None, bf16, "fast", "swiglu")

            def then_quant(mm):
                def step():
                    y = mm()
                    return silu_mul_quantize(y[:, :f], y[:, f:], xg, E4M3, False)
                return step

            def fused_quant():
                return quantize(fused(), xg, E4M3, False)

            assert gemm.gluon_serves(xq, xs, xg, iq, is_, wg, bf16, "swiglu", None, "fast")
            t = {"bf16": us(lambda: F.linear(x, stacked)),
                 "cublas": us(cublas), "cublas_q": us(then_quant(cublas)),
                 "gluon": us(gluon), "gluon_q": us(then_quant(gluon)),
                 "fused": us(fused), "fused_q": us(fused_quant)}
            ref = F.silu(x.float() @ gate.float().t()) * (x.float() @ up.float().t())
            (q0, s0), (q1, s1) = then_quant(cublas)(), fused_quant()
            e0 = rel_err(nx.dequantize(q0, s0, xg), ref)
            e1 = rel_err(nx.dequantize(q1, s1, xg), ref)
            print(f"{m:5d} {str(xg):7} | {t['bf16']:7.1f} | {t['cublas_q']:9.1f} "
                  f"{t['cublas']:7.1f} | {t['gluon_q']:8.1f} {t['gluon']:7.1f} | "
                  f"{t['fused_q']:9.1f} {t['fused']:7.1f} | "
                  f"{t['cublas_q'] / t['fused_q']:10.2f}x {t['bf16'] / t['fused_q']:6.2f}x | "
                  f"{e0:.3e} / {e1:.3e}")
    static(args.m, gate, up, stacked)


def static(ms, gate, up, stacked) -> None:
    """Static scaling's gate/up step: cuBLAS + the one-pass SiLU·mul cast, against the
    SwiGLU epilogue that writes FP8 (tensor scales; h's scale from its fp32 amax)."""
    from fp8compile.kernels.fused import quantize_static

    bf16, f, k = torch.bfloat16, gate.shape[0], gate.shape[1]
    print(f"\nstatic scale, tensor | {'bf16':>7} | {'cuBLAS+cast':>11} {'(GEMM)':>7} | "
          f"{'SwiGLU->FP8':>11} | {'vs cuBLAS+cast':>14} {'vs bf16':>7} | err unfused / fused")
    wq, ws = quantize(stacked, G.TENSOR, E4M3, False)
    iq, is_ = wq, ws
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=bf16)
        xq, xs = quantize(x, G.TENSOR, E4M3, False)
        ref = F.silu(x.float() @ gate.float().t()) * (x.float() @ up.float().t())
        hs = nx.compute_scale(nx.amax(ref, G.TENSOR), E4M3).reshape(1)

        def cublas():
            return select.cublas_scaled_mm(xq, xs, G.TENSOR, wq, ws, G.TENSOR, None, bf16,
                                           "fast")

        def unfused():
            y = cublas()
            return quantize_static(y[:, :f], y[:, f:], None, 0.0, "silu_mul", hs, E4M3)

        def fused():
            return gemm.scaled_mm(xq, xs, G.TENSOR, iq, is_, G.TENSOR, None,
                                  torch.float8_e4m3fn, "fast", "swiglu", out_scale=hs)

        assert gemm.gluon_serves(xq, xs, G.TENSOR, iq, is_, G.TENSOR, torch.float8_e4m3fn,
                                 "swiglu", None, "fast")
        t = {"bf16": us(lambda: F.linear(x, stacked)), "cublas": us(cublas),
             "unfused": us(unfused), "fused": us(fused)}
        e0 = rel_err(unfused().float() * hs, ref)
        e1 = rel_err(fused().float() * hs, ref)
        print(f"{m:5d}               | {t['bf16']:7.1f} | {t['unfused']:11.1f} "
              f"{t['cublas']:7.1f} | {t['fused']:11.1f} | "
              f"{t['unfused'] / t['fused']:13.2f}x {t['bf16'] / t['fused']:6.2f}x | "
              f"{e0:.3e} / {e1:.3e}")


if __name__ == "__main__":
    main()
