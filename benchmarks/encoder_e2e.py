"""``nn.TransformerEncoder`` compiled end to end: PyTorch's own encoder against fp8hpf.

In inference each ``nn.TransformerEncoderLayer`` runs PyTorch's fused fast path
(``torch._transformer_encoder_layer_fwd``), in eager mode and under bf16 Inductor alike; fp8hpf
takes that call apart (``passes/decompose.py``) and runs its four projections as FP8 GEMMs.
Two sizes, bf16, forward only, pre-norm GELU layers (``--blocks vit``: torchvision's ViT
block instead, whose ``nn.MultiheadAttention`` is one ``F.multi_head_attention_forward``
call in the graph):

* ``vit-l``: ViT-L/16's sizes (d=1024, 16 heads, FFN 4096) at 32 images of 197 tokens;
* ``4k``: d=4096, 32 heads, FFN 16384 at 2x2048 tokens.

Every variant runs with CUDA graphs (``mode="reduce-overhead"``; eager bf16 is captured by
hand).  Prints ``do_bench`` ms, GPU ms per step (steps queued behind a sleep), × bf16 Inductor,
the error against an fp32 eager run, and how many GEMMs ran in FP8.

    python benchmarks/encoder_e2e.py [--blocks encoder vit] [--shapes vit-l 4k] [--layers 4]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from e2e import gpu_and_host_ms, median_ms, rel_err  # noqa: E402

import fp8compile  # noqa: E402

SHAPES = {  # name: (d, heads, ffn, batch, tokens)
    "vit-l": (1024, 16, 4096, 32, 197),
    "4k": (4096, 32, 16384, 2, 2048),
}
VARIANTS = {
    "bf16 Inductor": None,
    "bf16 eager (fast path)": "eager",
    "fp8hpf blockwise": {},
    "fp8hpf rowwise fast": {"recipe": "rowwise", "accumulation": "fast"},
}


def encoder(d: int, heads: int, ffn: int, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class VitBlock(nn.Module):
    """A ViT encoder block as torchvision writes it: ``nn.MultiheadAttention`` (one
    ``F.multi_head_attention_forward`` call in the graph) and an ``nn.Linear`` MLP."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def vit(d: int, heads: int, ffn: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*(VitBlock(d, heads, ffn) for _ in range(layers)))


BLOCKS = {"encoder": encoder, "vit": vit}


def graphed(model, x):
    """``model(x)`` captured in a CUDA graph (the eager baseline, launched as the compiled
    variants are)."""
    with torch.no_grad():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(x)

    def run():
        g.replay()
        return out

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--blocks", nargs="*", default=["encoder"], choices=list(BLOCKS),
                    help="encoder: nn.TransformerEncoderLayer (its fused fast path); vit: "
                         "torchvision's block, nn.MultiheadAttention and an nn.Linear MLP")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"layers {args.layers}", flush=True)
    names = args.only.split(",") if args.only else list(VARIANTS)
    for block, shape in ((b, s) for b in args.blocks for s in args.shapes):
        d, heads, ffn, batch, tokens = SHAPES[shape]
        torch.manual_seed(0)
        ref_model = BLOCKS[block](d, heads, ffn, args.layers).cuda().eval()
        model = BLOCKS[block](d, heads, ffn, args.layers).cuda().bfloat16().eval()
        model.load_state_dict({k: v.bfloat16() for k, v in ref_model.state_dict().items()})
        x = torch.randn(batch, tokens, d, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = ref_model(x.float())
        del ref_model
        base = None
        for name in names:
            torch._dynamo.reset()
            cfg = VARIANTS[name]
            backend = None
            if cfg == "eager":
                run = graphed(model, x)
            else:
                if cfg is None:
                    cm = torch.compile(model, mode="reduce-overhead")
                else:
                    backend = fp8compile.backend(cfg, mode="reduce-overhead")
                    cm = torch.compile(model, backend=backend)
                with torch.no_grad():
                    for _ in range(3):
                        cm(x)

                def run(cm=cm):
                    with torch.no_grad():
                        return cm(x)
            err = rel_err(run().clone().float(), ref)
            ms = median_ms(run)
            gpu, host = gpu_and_host_ms(run)
            if cfg is None:
                base = (ms, gpu)
            fp8 = ""
            if backend is not None:
                plan = backend.plan
                fp8 = (f"  FP8: {len(plan.fp8)} of {len(plan.gemms)} GEMMs, "
                       f"{len(plan.stats.get('decomposed', []))} fused calls taken apart")
            ratio = (f"({base[0] / ms:.2f}x)", f"({base[1] / gpu:.2f}x)") if base else ("", "")
            print(f"{block:7s} {shape:5s} {batch}x{tokens:<5d} {name:24s} {ms:7.3f} ms "
                  f"{ratio[0]:8s} GPU {gpu:7.3f} ms {ratio[1]:8s} host {host:.3f} ms  "
                  f"err {err:.2e}{fp8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
