"""Compile a small LLaMA-style model with fp8hpf and see where FP8 went.

    python examples/quickstart.py            # CPU is fine; uses the GPU when there is one

Also a factory for the CLI:  fp8compile plan examples/quickstart.py:build
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(a.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(d), Attention(d, heads)
        self.mlp_norm, self.mlp = RMSNorm(d), MLP(d, ffn)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, vocab=2048, d=512, layers=4, heads=8, ffn=1408):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def build(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """CLI factory: returns (model, example_args)."""
    torch.manual_seed(0)
    model = TinyLlama().to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, 2048, (2, 64), device=device)
    return model, (ids,)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, (ids,) = build(device, dtype)

    import fp8compile  # only for the plan handle; backend="fp8hpf" works without the import

    be = fp8compile.backend()  # defaults: DeepSeek-V3 blockwise recipe
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = compiled(ids)
        first_call = time.perf_counter() - t0
        ref = model.float()(ids).float()  # FP32 reference
    plan = be.plan
    print(plan.summary(gemms_only=True))
    err = ((logits.float() - ref).norm() / ref.norm()).item()
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"\nrelative error of the logits vs FP32: {err:.2e}; top-1 agreement {agree:.1%}")
    print(f"first call (compile + run): {first_call:.1f} s on {device}")
    fp8 = sorted({e.module.rsplit('.', 1)[-1] for e in plan.fp8})
    kept = [(e.module, e.reason) for e in plan.gemms if not e.is_fp8]
    print(f"FP8 GEMMs ({len(plan.fp8)}): every {', '.join(fp8)} of the {len(model.layers)} layers")
    for module, reason in kept:
        print(f"kept in high precision: {module}: {reason}")


if __name__ == "__main__":
    main()
