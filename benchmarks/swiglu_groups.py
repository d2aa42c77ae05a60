"""A blockwise SwiGLU MLP's gate/up step: the GEMM quantizing ``silu(gate) * up`` in 1x128
groups in its epilogue (``kernels.gemm.swiglu_group_quantize``) against what the compiled
block runs without the fold: cuBLAS's blockwise GEMM writing gate and up in bf16, then the
fused SiLU·mul group quantization.

Run on a Hopper GPU::

    PYTHONUNBUFFERED=1 python benchmarks/swiglu_groups.py --m 2048 4096 8192

First the error of each against the fp32 SwiGLU of the same FP8 operands (dequantized
result, relative Frobenius norm), the share of equal payload bytes and the largest relative
difference of the scales, on odd shapes and one LLaMA shape; then, at K = 4096 and
F = 14336, the median time of each step (CUDA-graph replays over input sets that exceed the
L2, three timings each, in turns) and the ratio to the unfused step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from fp8compile import kernels as K  # noqa: E402
from fp8compile import numerics as nx  # noqa: E402
from fp8compile.kernels import blockwise_ws  # noqa: E402
from fp8compile.kernels.fused import silu_mul_quantize  # noqa: E402
from fp8compile.kernels.gemm import swiglu_group_quantize  # noqa: E402
from fp8compile.numerics import Fp8Format  # noqa: E402
from fp8compile.numerics import Granularity as G  # noqa: E402

E4 = Fp8Format.E4M3


def operands(m, f, k, seed=0):
    """x's 1x128 groups and the stacked [gate; up] weight's 128x128 blocks (what cuBLAS and
    the fused kernel run), twice: the fused kernel's operands are the second pair."""
    torch.manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wg = torch.randn(f, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wu = torch.randn(f, k, device="cuda", dtype=torch.bfloat16) * 0.02
    xq, xs = K.quantize(x, G.GROUP, E4, False)
    wq, ws = K.quantize(torch.cat([wg, wu]), G.BLOCK, E4, False)
    wqi, wsi = wq, ws
    return xq, xs, wq, ws, wqi, wsi


def unfused(cublas, xq, xs, wq, ws, f):
    if xq.shape[1] % 512:  # cuBLAS's blockwise GEMM refuses it: the Gluon kernel instead
        y = torch.empty(xq.shape[0], 2 * f, device="cuda", dtype=torch.bfloat16)
        blockwise_ws.blockwise_mm(xq, xs, wq, ws, None, y, G.GROUP, G.BLOCK, "precise")
    else:
        y = cublas(xq, xs, wq, ws)
    return silu_mul_quantize(y[:, :f], y[:, f:], G.GROUP)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, nargs="+", default=[2048, 4096, 8192])
    args = ap.parse_args()
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        print("no Hopper GPU: nothing to measure")
        return
    import gemm  # benchmarks/gemm.py: timing, cuBLAS's blockwise entry point
    import triton

    cublas, _ = gemm._probe_cublas_blockwise()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    for m, f, k in [(300, 384, 208), (777, 640, 1040), (4096, 14336, 4096)]:
        xq, xs, wq, ws, wqi, wsi = operands(m, f, k)
        y = nx.dequantize(xq, xs, G.GROUP) @ nx.dequantize(wq, ws, G.BLOCK).T
        ref = torch.nn.functional.silu(y[:, :f]) * y[:, f:]
        (qa, sa), (qb, sb) = unfused(cublas, xq, xs, wq, ws, f), swiglu_group_quantize(
            xq, xs, wqi, wsi, E4)
        ea = gemm.rel_err(nx.dequantize(qa, sa, G.GROUP), ref)
        eb = gemm.rel_err(nx.dequantize(qb, sb, G.GROUP), ref)
        same = (qa.view(torch.uint8) == qb.view(torch.uint8)).float().mean().item()
        srel = ((sa - sb).abs() / sa).max().item()
        print(f"{m}x{f}x{k}: error vs fp32 unfused {ea:.4e}, fused {eb:.4e}; payload equal "
              f"{same:.4f}; scales differ by {srel:.2e} at most", flush=True)
    f, k = 14336, 4096
    for m in args.m:
        nsets = max(1, -(-3 * gemm.L2_BYTES // (m * k + 4 * f * k)))
        sets = [operands(m, f, k, seed) for seed in range(nsets)]
        steps = {
            "cuBLAS + SiLU*mul quant": lambda xq, xs, wq, ws, wqi, wsi: unfused(
                cublas, xq, xs, wq, ws, f),
            "fused": lambda xq, xs, wq, ws, wqi, wsi: swiglu_group_quantize(
                xq, xs, wqi, wsi, E4),
        }
        times = {name: [] for name in steps}
        for _ in range(3):
            for name, fn in steps.items():
                times[name].append(gemm.bench(fn, sets))
        us = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        base = us["cuBLAS + SiLU*mul quant"]
        print(f"M={m} F={f} K={k}: " + "  ".join(
            f"{name} {t:.1f} us ({base / t:.3f}x)" for name, t in us.items()), flush=True)


if __name__ == "__main__":
    main()
