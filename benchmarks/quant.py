"""Quantization kernels at the shapes of a LLaMA block's training step, against a copy.

Run on a CUDA machine::

    PYTHONUNBUFFERED=1 python benchmarks/quant.py --out out/

Each kernel runs on a bf16 (or, for ``requantize_t``, FP8) tensor of 4096x4096, 4096x14336
and 14336x4096, as the training step of ``benchmarks/train.py`` quantizes them: activations
in 1x128 groups, per row and per tensor; weights and transposed weights in 128x128 blocks;
the output gradient along both axes at once (``quantize_dual``); and the saved FP8
activation requantized as blocks of its transpose (``requantize_t``).  Each line gives the
median time per call, the bytes the kernel must move per element, the bandwidth that makes,
and the time of ``torch.clone`` moving the same bytes in the same run (``vs copy``: 1.0
would be as fast as a copy).  Times are CUDA-graph replays (``do_bench_cudagraph``), as the
kernels run inside a compiled training step: timed one Python call at a time, a 4096x4096
quantization measures the launcher's host time (~60 us), not the GPU's.  Each replay runs
the kernel over enough copies of the input to exceed the L2 cache three times, so inputs
come from HBM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8compile.numerics import Fp8Format, Granularity  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
G = Granularity


def cases():
    """(name, bytes per element, FP8 input?, callable(one input)) for every kernel; the input
    is a bf16 (M, N) tensor, or for ``requantize_t`` its 1x128-group FP8 ``(q, scale)``."""
    from fp8compile.kernels import quant

    e4, e5 = Fp8Format.E4M3, Fp8Format.E5M2
    return [
        ("group 1x128", 3, False, lambda t: quant.quantize(t, G.GROUP, e4, False)),
        ("row", 3, False, lambda t: quant.quantize(t, G.ROW, e4, False)),
        ("row, transposed view", 3, False, lambda t: quant.quantize(t.t(), G.ROW, e4, False)),
        ("tensor (amax + cast)", 5, False, lambda t: quant.quantize(t, G.TENSOR, e4, False)),
        ("tensor, transposed view", 5, False,
         lambda t: quant.quantize(t.t(), G.TENSOR, e4, False)),
        ("block 128x128", 3, False, lambda t: quant.quantize(t, G.BLOCK, e4, False)),
        ("block, transposed view", 3, False,
         lambda t: quant.quantize(t.t(), G.BLOCK, e4, False)),
        ("dual (e5m2, both axes)", 4, False, lambda t: quant.quantize_dual(t, e5, False)),
        ("requantize_t (fp8 in)", 2, True,
         lambda t: quant.requantize_t(*t, G.GROUP, G.BLOCK, e4, False)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for quant_bench.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time (the kernels' CPU tests: pytest tests/kernels)")
        return
    from triton.testing import do_bench_cudagraph

    from fp8compile.kernels import quant

    l2 = torch.cuda.get_device_properties(0).L2_cache_size

    def median_us(fn, inputs) -> float:
        def run():
            for t in inputs:
                fn(t)

        run()  # compile outside the graph
        return do_bench_cudagraph(run, rep=100, return_mode="median") * 1e3 / len(inputs)

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(json.dumps(info))
    rows = []
    torch.manual_seed(0)
    for m, n in SHAPES:
        sets = -(-3 * l2 // (2 * m * n))
        xs = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        fp8 = [quant.quantize(x, G.GROUP, Fp8Format.E4M3, False) for x in xs]
        copy_us = median_us(torch.clone, xs)  # reads 2 and writes 2 bytes per element
        for name, bpe, fp8_in, fn in cases():
            us = median_us(fn, fp8 if fp8_in else xs)
            ideal = copy_us * bpe / 4
            row = {"shape": [m, n], "kernel": name, "us": us, "bytes_per_elt": bpe,
                   "tb_s": bpe * m * n / us / 1e6, "copy_us_same_bytes": ideal,
                   "vs_copy": ideal / us}
            rows.append(row)
            print(f"{m:6d}x{n:<6d} {name:26s} {us:8.1f} us  {bpe} B/elt {row['tb_s']:5.2f} TB/s"
                  f"  copy {ideal:6.1f} us  vs copy {row['vs_copy']:.2f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "quant_bench.json"), "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
