"""Train a tiny LLaMA-style LM on a synthetic task in FP32 and in FP8; compare loss curves.

The task: token sequences from a fixed random Markov chain (the next token is ``perm[tok]``
with probability 0.8, uniform otherwise), so the best achievable loss is the chain's entropy
(about 1.31 nats with 64 tokens) and both runs should approach it.  Same seed, same batches,
same initial weights; the FP8 run compiles with ``backend="fp8hpf"`` (every linear but the
output head in FP8, forward and backward), the reference runs the FP32 eager model.

    python examples/train_tiny.py                      # 400 steps, blockwise
    python examples/train_tiny.py --steps 1000 --recipe tensorwise --scaling delayed
    python examples/train_tiny.py --gradient-format e5m2   # the "hybrid" recipe

Prints the loss every 50 steps and the final figures; tests/training/test_convergence.py
runs a shorter version.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import fp8compile

VOCAB = 64


class Block(nn.Module):
    """RMSNorm → causal SDPA attention → residual → RMSNorm → SwiGLU → residual."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(d, d, bias=False)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in self.qkv)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLM(nn.Module):
    def __init__(self, d: int = 128, layers: int = 2, heads: int = 4, ffn: int = 256):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def markov_batches(steps: int, batch: int, seq: int, seed: int = 0, noise: float = 0.2):
    """``steps`` batches of ``(batch, seq + 1)`` token ids from one fixed Markov chain."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(VOCAB, generator=g)
    out = []
    for _ in range(steps):
        ids = torch.empty(batch, seq + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(seq):
            rand = torch.randint(0, VOCAB, (batch,), generator=g)
            keep = torch.rand(batch, generator=g) >= noise
            ids[:, t + 1] = torch.where(keep, perm[ids[:, t]], rand)
        out.append(ids)
    return out


def entropy(noise: float = 0.2) -> float:
    """Best achievable loss (nats) of :func:`markov_batches`."""
    p_hit = 1 - noise + noise / VOCAB
    p_miss = noise / VOCAB
    return -(p_hit * math.log(p_hit) + (VOCAB - 1) * p_miss * math.log(p_miss))


def train(model: nn.Module, batches, *, compile_options=None, lr: float = 3e-3,
          clip: float | None = 1.0) -> list[float]:
    """AdamW on FP32 master weights; FP8 through fp8hpf when ``compile_options`` is given.
    Returns the loss per step."""
    run = torch.compile(model, backend=fp8compile.backend(compile_options)) \
        if compile_options is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for ids in batches:
        logits = run(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def tail_mean(losses: list[float], n: int = 20) -> float:
    return sum(losses[-n:]) / len(losses[-n:])


def compare(steps: int = 400, batch: int = 16, seq: int = 32, options=None, seed: int = 0,
            verbose: bool = True, layers: int = 2) -> dict:
    """Train the FP32 reference and the FP8 model from the same weights on the same batches."""
    torch.manual_seed(seed)
    ref_model = TinyLM(layers=layers)
    fp8_model = copy.deepcopy(ref_model)
    batches = markov_batches(steps, batch, seq, seed)
    t0 = time.perf_counter()
    ref = train(ref_model, batches)
    t1 = time.perf_counter()
    fp8 = train(fp8_model, batches, compile_options=options or {})
    t2 = time.perf_counter()
    out = {
        "steps": steps, "layers": layers, "ref_final": tail_mean(ref), "fp8_final": tail_mean(fp8),
        "entropy": entropy(), "ref": ref, "fp8": fp8, "ref_s": t1 - t0, "fp8_s": t2 - t1,
    }
    out["rel_diff"] = abs(out["fp8_final"] - out["ref_final"]) / out["ref_final"]
    if verbose:
        for i in range(0, steps, 50):
            print(f"step {i:4d}  fp32 {ref[i]:.4f}  fp8 {fp8[i]:.4f}")
        print(f"final (mean of last 20 steps): fp32 {out['ref_final']:.4f}  "
              f"fp8 {out['fp8_final']:.4f}  ({100 * out['rel_diff']:.2f}% apart); "
              f"task entropy {out['entropy']:.4f}; time fp32 {out['ref_s']:.1f} s, "
              f"fp8 {out['fp8_s']:.1f} s (incl. compile)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--recipe", default="blockwise")
    ap.add_argument("--scaling", default="dynamic")
    ap.add_argument("--gradient-format", default="e4m3")
    args = ap.parse_args()
    options = {"recipe": args.recipe, "scaling": args.scaling,
               "gradient_format": args.gradient_format}
    compare(args.steps, args.batch, args.seq, options, layers=args.layers)


if __name__ == "__main__":
    main()
