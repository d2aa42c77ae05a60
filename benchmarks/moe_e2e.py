"""A Mixtral-like MoE layer compiled end to end: bf16 Inductor against fp8hpf recipes.

The layer is one decoder block of Mixtral-8x7B's sizes (d=4096, 32 heads, 8 experts of
SwiGLU 14336, top-2), written as transformers writes its experts: tokens sorted by expert,
``F.grouped_mm`` over 3-D expert weights, the weighted sum by ``index_add_``.  Compiled with
``mode="reduce-overhead"`` (CUDA graphs), bf16, forward only, at 1x4096 tokens (prefill) and
1x16 (decode).  Prints ``do_bench`` ms, GPU ms per step (steps queued behind a sleep, the
GPU's own time), × bf16 Inductor, and the error against an fp32 run; with which GEMMs ran in
FP8.

    python benchmarks/moe_e2e.py [--tokens 4096 16] [--only "bf16 Inductor,fp8hpf rowwise fast"]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from e2e import AttentionHalf, gpu_and_host_ms, median_ms, rel_err  # noqa: E402

import fp8compile  # noqa: E402

D, HEADS, FFN, EXPERTS, TOP_K = 4096, 32, 14336, 8, 2
VARIANTS = {
    "bf16 Inductor": None,
    "fp8hpf blockwise": {},
    "fp8hpf rowwise fast": {"recipe": "rowwise", "accumulation": "fast"},
}


def grouped_mm(x, w, offs):
    """``F.grouped_mm`` (bf16, what the compiled variants run), or a loop over the groups
    for the fp32 reference, which torch's grouped GEMM does not take on a GPU."""
    if x.dtype == torch.bfloat16:
        return F.grouped_mm(x, w, offs=offs)
    out, start = torch.zeros(x.shape[0], w.shape[-1], device=x.device, dtype=x.dtype), 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[g]
        start = end
    return out


class MoEBlock(AttentionHalf):
    def __init__(self, d=D, heads=HEADS, ffn=FFN, experts=EXPERTS, top_k=TOP_K):
        super().__init__(d, heads)
        self.experts, self.top_k = experts, top_k
        self.router = nn.Linear(d, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * ffn, d) * 0.02)
        self.down = nn.Parameter(torch.randn(experts, d, ffn) * 0.02)

    def forward(self, x):
        b, t, d = x.shape
        x = self.attend(x)
        h = self.mlp_norm(x).reshape(-1, d)
        weights, chosen = torch.topk(F.softmax(self.router(h).float(), dim=-1), self.top_k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype).reshape(-1)
        order = chosen.reshape(-1).argsort()
        tokens = order // self.top_k
        picks = chosen.reshape(-1)
        counts = torch.zeros(self.experts, dtype=torch.int32, device=x.device).scatter_add_(
            0, picks, torch.ones_like(picks, dtype=torch.int32))
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = grouped_mm(h[tokens], self.gate_up.transpose(-2, -1), offs).chunk(2, dim=-1)
        y = grouped_mm(F.silu(gate) * up, self.down.transpose(-2, -1), offs)
        out = torch.zeros_like(h).index_add_(0, tokens, y * weights[order, None])
        return x + out.view(b, t, d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=[4096, 16])
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    model = MoEBlock().cuda().bfloat16().eval()
    ref_model = None
    names = args.only.split(",") if args.only else list(VARIANTS)
    for tokens in args.tokens:
        x = torch.randn(1, tokens, D, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            if ref_model is None:
                ref_model = MoEBlock().cuda().eval()
                ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
            ref = ref_model(x.float())
        base = None
        for name in names:
            torch._dynamo.reset()
            cfg = VARIANTS[name]
            if cfg is None:
                backend = None
                cm = torch.compile(model, mode="reduce-overhead")
            else:
                backend = fp8compile.backend(cfg, mode="reduce-overhead")
                cm = torch.compile(model, backend=backend)
            with torch.no_grad():
                for _ in range(3):
                    cm(x)
                err = rel_err(cm(x).clone(), ref)
                ms = median_ms(lambda: cm(x))
                gpu, host = gpu_and_host_ms(lambda: cm(x))
            base = base or (ms, gpu)
            fp8 = ""
            if cfg is not None:
                plan = backend.plan
                grouped = [e for e in plan.gemms if e.gemm == "grouped_mm"]
                fp8 = (f"  FP8: {len(plan.fp8)} of {len(plan.gemms)} GEMMs, experts "
                       f"{'fp8' if grouped and all(e.is_fp8 for e in grouped) else 'bf16'}"
                       f" ({grouped[0].rule if grouped else '-'})")
            print(f"1x{tokens:<5d} {name:22s} {ms:7.3f} ms ({base[0] / ms:.2f}x)  GPU "
                  f"{gpu:7.3f} ms ({base[1] / gpu:.2f}x)  host {host:.3f} ms  err {err:.2e}"
                  f"{fp8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
