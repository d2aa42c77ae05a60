"""Where the warp-specialized blockwise GEMM loses to cuBLAS: a target for Nsight Compute.

On a Hopper machine with ``ncu`` (hardware counters readable), from the repository root::

    ncu --clock-control none --profile-from-start off --set full --import-source no \\
        -o out/blk python benchmarks/ncu_blockwise.py
    ncu --import out/blk.ncu-rep --page details > out/details.txt
    ncu --import out/blk.ncu-rep --page source --print-source sass --csv > out/src.csv
    python benchmarks/ncu_blockwise.py --summarize out/src.csv

The target runs, per shape, the Gluon kernel (:mod:`fp8compile.kernels.blockwise_ws`) and
cuBLAS's blockwise GEMM (``torch.nn.functional.scaled_mm``) once each between
``cudaProfilerStart`` and ``cudaProfilerStop``, after three warm-up calls outside.
``--clock-control none`` leaves the clocks as a benchmark finds them.

``--summarize`` reads the SASS source page and prints, per kernel, the warp-stall samples by
opcode and the instructions with the most samples.  Samples on warps parked at a barrier
for the whole kernel (the loader's idle warps) are attributed to the instruction after the
barrier, usually a ``NOP``; they cost no issue slots.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import sys

SHAPES = [(4096, 4096, 4096), (4096, 14336, 4096)]


def target() -> None:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from fp8compile.kernels import blockwise_ws, quant, select
    from fp8compile.numerics import Fp8Format, Granularity

    if not (blockwise_ws.HAVE_GLUON and torch.cuda.is_available()
            and torch.cuda.get_device_capability() == (9, 0)):
        raise SystemExit("needs a Hopper GPU (sm_90) and a Triton with Gluon's Hopper API")
    calls = []
    for m, n, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = 0.02 * torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = quant.quantize(x, Granularity.GROUP, Fp8Format.E4M3, False)
        wq, ws = quant.quantize(w, Granularity.BLOCK, Fp8Format.E4M3, False)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        calls.append(lambda a=(xq, xs, wq, ws, None, out): blockwise_ws.blockwise_mm(*a))
        calls.append(lambda a=(xq, xs, Granularity.GROUP, wq, ws, Granularity.BLOCK, None,
                               torch.bfloat16, "precise"): select.cublas_scaled_mm(*a))
    for call in calls:
        for _ in range(3):
            call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for call in calls:
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"ran {len(calls)} GEMMs between cudaProfilerStart/Stop")


def summarize(path: str, top: int = 12) -> None:
    rows = list(csv.reader(open(path, newline="")))
    starts = [i for i, r in enumerate(rows) if r and r[0] == "Kernel Name"] + [len(rows)]
    for begin, end in zip(starts, starts[1:]):
        header, body = rows[begin + 1], [r for r in rows[begin + 2:end] if len(r) > 2]
        col = header.index("Warp Stall Sampling (All Samples)")
        samples = [(float(r[col] or 0), r[0], r[1]) for r in body]
        total = sum(s for s, _, _ in samples) or 1.0
        by_op = collections.Counter()
        for s, _, src in samples:
            words = src.split()
            if words and words[0].startswith("@"):
                words = words[1:]
            by_op[words[0].split(".")[0] if words else "?"] += s
        print(f"{rows[begin][1][:70]}: {total:.0f} samples")
        print("  by opcode: " + ", ".join(f"{op} {100 * s / total:.1f}%"
                                          for op, s in by_op.most_common(10)))
        for s, addr, src in sorted(samples, reverse=True)[:top]:
            print(f"  {s:6.0f}  {addr[-5:]}  {src[:70]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summarize", metavar="SRC_CSV",
                        help="summarize ncu's SASS source page (CSV) instead of running")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        target()


if __name__ == "__main__":
    main()
