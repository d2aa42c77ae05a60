"""Accuracy only: a LLaMA-like block's output error against fp32, fp8hpf vs torchao float8.

Runs on the GPU (Triton kernels, cuBLAS) or on the CPU (fp8compile's reference ops, and
torchao's float8 linear through ``torch._scaled_mm`` on the CPU)::

    python benchmarks/accuracy.py                       # d=1024, 1x512 tokens, CPU or GPU
    python benchmarks/accuracy.py --d 4096 --ffn 14336 --heads 32 --tokens 4096

Same block as benchmarks/e2e.py (RMSNorm, causal SDPA, SwiGLU; PyTorch's default
``nn.Linear`` init), built in fp32, then copied to bf16 for every variant.  The error is
‖y − y_fp32‖ / ‖y_fp32‖ on the same inputs.  Several seeds are run, because the differences
between recipes are a few percent and one draw can mislead; the table shows the mean and the
spread.  torchao is eager here (its numerics do not depend on compiling).  ``fp8hpf
tensorwise static`` takes its activation scales from ``fp8compile.calibrate`` on two batches
of 2x256 tokens drawn apart from the measured input.

``--unfused-producers`` adds each fp8hpf recipe with ``fuse_producers=False``: its
quantizations then read the RMSNorm and SiLU·mul outputs (and the residual sum before the
MLP norm) as the model computes them, rounded to bf16, instead of the fused producers' fp32.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

from e2e import Block, calibrate_static, rel_err  # noqa: E402

import fp8compile  # noqa: E402


def variants(unfused_producers: bool = False):
    out = {"bf16 eager": lambda m: m}
    for recipe in ("blockwise", "rowwise", "tensorwise"):
        out[f"fp8hpf {recipe}"] = lambda m, r=recipe: torch.compile(
            m, backend=fp8compile.backend({"recipe": r}))
        if unfused_producers:
            out[f"fp8hpf {recipe}, unfused"] = lambda m, r=recipe: torch.compile(
                m, backend=fp8compile.backend({"recipe": r, "fuse_producers": False}))
    # Static scaling, calibrated on two batches of its own (e2e.calibrate_static).
    out["fp8hpf tensorwise static"] = lambda m: torch.compile(
        m, backend=fp8compile.backend({"recipe": "tensorwise", **calibrate_static(m)}))
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        def ao(recipe):
            def make(m):
                convert_to_float8_training(m, config=Float8LinearConfig.from_recipe_name(recipe))
                return m
            return make

        out["torchao rowwise"] = ao("rowwise")
        out["torchao tensorwise"] = ao("tensorwise")
    except Exception as e:  # torchao absent or its API changed
        print(f"torchao not used: {type(e).__name__}: {e}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--unfused-producers", action="store_true",
                    help="also each fp8hpf recipe with fuse_producers=False")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    errors: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base32 = Block(args.d, args.heads, args.ffn).to(dev)
        x = torch.randn(1, args.tokens, args.d, device=dev)
        with torch.no_grad():
            ref = base32(x)
            base = copy.deepcopy(base32).bfloat16()
            for name, make in variants(args.unfused_producers).items():
                torch._dynamo.reset()
                y = make(copy.deepcopy(base))(x.bfloat16())
                errors.setdefault(name, []).append(rel_err(y, ref))
    print(f"block d={args.d} heads={args.heads} ffn={args.ffn}, {args.tokens} tokens, {dev}, "
          f"torch {torch.__version__}, {args.seeds} seeds")
    print(f"{'variant':28s} {'mean error':>11s} {'min':>9s} {'max':>9s}")
    for name, errs in errors.items():
        print(f"{name:28s} {statistics.mean(errs):11.3e} {min(errs):9.3e} {max(errs):9.3e}")


if __name__ == "__main__":
    main()
