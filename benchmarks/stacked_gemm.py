"""Is one FP8 GEMM over stacked projection weights faster than its members? (GPU only)

Times cuBLAS tensorwise FP8 GEMMs (``torch._scaled_mm``, bf16 out) at 4096 tokens of the
LLaMA block: q/k/v (3 x 4096) and gate/up (2 x 14336) as separate GEMMs against one GEMM
over the stacked weights, for the forward, dX and dW shapes, with fast and precise
accumulation.  Medians of ``triton.testing.do_bench``.  docs/performance.md has the figures.

    python benchmarks/stacked_gemm.py
"""

from __future__ import annotations

import torch
import triton

M = 4096
# name: (member (M, N, K) shapes, stacked shape)
CASES = {
    "fwd q/k/v": ([(M, 4096, 4096)] * 3, (M, 12288, 4096)),
    "fwd gate/up": ([(M, 14336, 4096)] * 2, (M, 28672, 4096)),
    "dX q/k/v": ([(M, 4096, 4096)] * 3, (M, 4096, 12288)),
    "dX gate/up": ([(M, 4096, 14336)] * 2, (M, 4096, 28672)),
    "dW q/k/v": ([(4096, 4096, M)] * 3, (12288, 4096, M)),
    "dW gate/up": ([(14336, 4096, M)] * 2, (28672, 4096, M)),
}


def gemm(m: int, n: int, k: int, fast: bool):
    one = torch.ones((), device="cuda")
    a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    return lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16,
                                    use_fast_accum=fast)


def us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; µs, separate vs stacked")
    for fast in (True, False):
        for name, (parts, whole) in CASES.items():
            t_parts = sum(us(gemm(*s, fast)) for s in parts)
            t_whole = us(gemm(*whole, fast))
            print(f"{'fast' if fast else 'precise':8s} {name:12s} separate {t_parts:8.1f}  "
                  f"stacked {t_whole:8.1f}  saved {t_parts - t_whole:6.1f}")


if __name__ == "__main__":
    main()
