"""Checks and times ``blockwise_cluster.py`` (2-CTA clusters, with and without TMA multicast)
against the tree's promoted kernel (``fp8compile/kernels/blockwise_ws.py``, at its five
stages and at four) and cuBLAS, in one process.  Needs a Hopper GPU and Triton 3.8 or
later::

    python benchmarks/variants/cluster_ab.py --shapes "4096,4096,4096;4096,4096,14336"

The check compares every variant's output with the tree kernel's (bit for bit) and with
``numerics.fp8_linear_reference`` on odd shapes; a failed check ends the run.  Each timing
is the median of CUDA-graph replays over input sets that exceed the L2
(``benchmarks/gemm.py``'s ``bench``), the variants taking turns ``--repeat`` times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

SHAPES = "4096,4096,4096;4096,14336,4096;4096,4096,14336;8192,4096,4096;4096,28672,4096;" \
         "2048,4096,4096"
# (M, N, K): M=1 and M not a multiple of 128, odd numbers of K blocks (runs of 8, 4, 2, 1)
CHECKS = [(1, 256, 128), (300, 768, 1152), (1000, 1024, 2048), (4096, 4096, 4096)]


def operands(m, n, k, seed):
    from fp8compile import kernels as K
    from fp8compile.numerics import Fp8Format
    from fp8compile.numerics import Granularity as G

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    return (*K.quantize(x, G.GROUP, Fp8Format.E4M3, False),
            *K.quantize(w, G.BLOCK, Fp8Format.E4M3, False))


def tree(stages=None):
    """The tree's promoted kernel, at ``stages`` (default: its own)."""
    from fp8compile.kernels import blockwise_ws as bw

    def run(xq, xs, wq, ws, out):
        saved = bw.PROMOTED_STAGES
        bw.PROMOTED_STAGES = (stages, stages) if stages else saved
        try:
            return bw.blockwise_mm(xq, xs, wq, ws, None, out)
        finally:
            bw.PROMOTED_STAGES = saved
    return run


def check(variants) -> bool:
    from fp8compile.numerics import Granularity as G
    from fp8compile.numerics import fp8_linear_reference

    ok = True
    for m, n, k in CHECKS:
        xq, xs, wq, ws = operands(m, n, k, 0)
        ref = fp8_linear_reference(xq, xs, G.GROUP, wq, ws, G.BLOCK, out_dtype=torch.float32)
        base = tree()(xq, xs, wq, ws, torch.empty(m, n, device="cuda", dtype=torch.bfloat16))
        for label, f in variants.items():
            out = f(xq, xs, wq, ws, torch.full((m, n), float("nan"), device="cuda",
                                                dtype=torch.bfloat16))
            err = float((out.float() - ref).norm() / ref.norm())
            equal = torch.equal(out, base)
            print(f"check {label} {m}x{n}x{k}: bit-equal to the tree kernel {equal}, "
                  f"error {err:.3e}", flush=True)
            ok &= equal and err < 4e-3
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="M,N,K;M,N,K;...")
    ap.add_argument("--repeat", type=int, default=3, help="timings per variant, in turns")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        print("no Hopper GPU: nothing to measure")
        return
    import blockwise_cluster as bc
    import gemm  # benchmarks/gemm.py: the timing and cuBLAS's blockwise entry point
    import triton

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; TFLOP/s (x cuBLAS), median of {args.repeat}")
    clusters = {"cluster": lambda *a: bc.cluster_mm(*a),
                "cluster-no-multicast": lambda *a: bc.cluster_mm(*a, multicast=False)}
    if not check(clusters):
        sys.exit("check failed")
    cublas, _ = gemm._probe_cublas_blockwise()
    fns = {"cuBLAS": lambda xq, xs, wq, ws, out: cublas(xq, xs, wq, ws),
           "tree": tree(), "tree-4-stages": tree(4), **clusters}
    for shape in args.shapes.split(";"):
        m, n, k = map(int, shape.split(","))
        nsets = max(1, min(8, -(-3 * gemm.L2_BYTES // (m * k + n * k))))
        sets = [(*operands(m, n, k, i), torch.empty(m, n, device="cuda", dtype=torch.bfloat16))
                for i in range(nsets)]
        times = {label: [] for label in fns}
        for _ in range(args.repeat):
            for label, f in fns.items():
                times[label].append(gemm.bench(f, sets))
        med = {label: statistics.median(t) for label, t in times.items()}
        print(f"{m}x{n}x{k}: " + "  ".join(
            f"{label} {gemm.tflops(m, n, k, ms):5.0f} ({med['cuBLAS'] / ms:.3f})"
            for label, ms in med.items()), flush=True)
        del sets


if __name__ == "__main__":
    main()
