"""FP8 grouped GEMM (mixture-of-experts experts) against bf16 and torch's FP8 grouped GEMM.

Shapes are the expert projections of two MoE models, tokens routed at random (top-k), rows
sorted by expert as transformers sorts them:

* Mixtral-8x7B: 8 experts, gate/up 4096 -> 2x14336, down 14336 -> 4096, top-2;
* Qwen3-30B-A3B: 128 experts, gate/up 2048 -> 2x768, down 768 -> 2048, top-8;

at 4096 tokens (prefill) and 16 (decode).  Times are medians of CUDA-graph replays
(``gemm.py``'s ``bench``), GEMM only (both operands quantized beforehand) and with the
activation's quantization (``q+``); ``x bf16`` is a time ratio against ``F.grouped_mm`` on
bf16 in the same run (> 1: faster).  ``torch row`` is ``torch._scaled_grouped_mm`` (rowwise
scales, fast accumulation).  The error is against the fp32 product of the same quantized
operands (``numerics.fp8_grouped_linear_reference``).

    python benchmarks/grouped.py [--tokens 4096 512 128 16] [--tiles]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gemm import bench, log, rel_err  # noqa: E402

from fp8compile import kernels  # noqa: E402
from fp8compile import numerics as nx  # noqa: E402
from fp8compile.kernels.grouped import scaled_grouped_mm  # noqa: E402

G = nx.Granularity
# name: (experts, top-k, K, N)
SHAPES = {
    "mixtral gate/up": (8, 2, 4096, 28672),
    "mixtral down": (8, 2, 14336, 4096),
    "qwen3-moe gate/up": (128, 8, 2048, 1536),
    "qwen3-moe down": (128, 8, 768, 2048),
}
RECIPES = {"blockwise": (G.GROUP, G.BLOCK, "precise"), "row fast": (G.ROW, G.ROW, "fast"),
           "tensor fast": (G.TENSOR, G.TENSOR, "fast")}
TILES = [(64, 128, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (64, 256, 4, 3)]


def routed(tokens: int, experts: int, top_k: int, k: int):
    """x (tokens * top_k, K) bf16 sorted by expert, and int32 offsets of a random routing."""
    choice = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1).indices.flatten()
    counts = torch.bincount(choice, minlength=experts)
    offs = counts.cumsum(0).to(torch.int32)
    return torch.randn(tokens * top_k, k, device="cuda", dtype=torch.bfloat16), offs


def torch_rowwise(xq, xs, wq, ws, offs):
    try:
        return torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), xs.reshape(-1),
                                        ws.reshape(ws.shape[0], -1), offs=offs,
                                        out_dtype=torch.bfloat16, use_fast_accum=True)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def run(tokens_list, tiles: bool) -> None:
    for name, (experts, top_k, k, n) in SHAPES.items():
        for tokens in tokens_list:
            torch.manual_seed(0)
            x, offs = routed(tokens, experts, top_k, k)
            w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            s = x.shape[0]
            flop = 2 * s * n * k
            t_bf = bench(lambda a, b, o: F.grouped_mm(a, b.transpose(-2, -1), offs=o),
                         [(x, w, offs)])
            cells = [f"bf16 {t_bf * 1e3:8.1f} us ({flop / t_bf / 1e9:5.0f} TFLOP/s)"]
            for recipe, (xg, wg, acc) in RECIPES.items():
                xq, xs = kernels.quantize(x, xg, nx.Fp8Format.E4M3, False)
                wq, ws = nx.quantize_grouped_weight(w, wg)
                t = bench(lambda a, sa, b, sb, o: scaled_grouped_mm(
                    a, sa, xg, b, sb, wg, o, torch.bfloat16, acc), [(xq, xs, wq, ws, offs)])
                tq = bench(lambda a, b, sb, o: scaled_grouped_mm(
                    *kernels.quantize(a, xg, nx.Fp8Format.E4M3, False), xg, b, sb, wg, o,
                    torch.bfloat16, acc), [(x, wq, ws, offs)])
                y = scaled_grouped_mm(xq, xs, xg, wq, ws, wg, offs, torch.float32, acc)
                ref = nx.fp8_grouped_linear_reference(xq, xs, xg, wq, ws, wg, offs,
                                                      torch.float32)
                cells.append(f"{recipe} {t * 1e3:7.1f} ({t_bf / t:.2f}x, {flop / t / 1e9:4.0f}"
                             f" TFLOP/s) q+ {tq * 1e3:7.1f} ({t_bf / tq:.2f}x) "
                             f"err {rel_err(y, ref):.1e}")
                if recipe == "row fast":
                    probe = torch_rowwise(xq, xs, wq, ws, offs)
                    if isinstance(probe, str):
                        cells.append(f"torch row: {probe}")
                    else:
                        tt = bench(lambda a, sa, b, sb, o: torch_rowwise(a, sa, b, sb, o),
                                   [(xq, xs, wq, ws, offs)])
                        cells.append(f"torch row {tt * 1e3:7.1f} ({t_bf / tt:.2f}x; ours "
                                     f"{tt / t:.2f}x it) err {rel_err(probe.float(), ref):.1e}")
                if tiles:
                    sweep = []
                    for bm, bn, warps, stages in TILES:
                        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps,
                               "num_stages": stages}
                        try:
                            tc = bench(lambda a, sa, b, sb, o, cfg=cfg: scaled_grouped_mm(
                                a, sa, xg, b, sb, wg, o, torch.bfloat16, acc, config=cfg),
                                [(xq, xs, wq, ws, offs)])
                            sweep.append(f"{bm}x{bn}/{warps}w/{stages}s {tc * 1e3:.1f}")
                        except Exception as e:  # noqa: BLE001
                            sweep.append(f"{bm}x{bn}/{warps}w/{stages}s fail {type(e).__name__}")
                    cells.append(f"  tiles {recipe}: " + ", ".join(sweep))
            log(f"{name:18s} E={experts:3d} S={s:6d} N={n:5d} K={k:5d} | " + "\n    ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[4096, 512, 128, 16])
    ap.add_argument("--tiles", action="store_true", help="also sweep the kernel's tiles")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        log("no CUDA device: nothing to measure (python -m pytest tests/kernels/test_grouped.py "
            "runs the kernel under TRITON_INTERPRET=1)")
        return 0
    import triton

    log(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"triton {triton.__version__}  cuda {torch.version.cuda}")
    run(args.tokens, args.tiles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
