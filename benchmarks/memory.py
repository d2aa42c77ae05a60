"""Weight memory of a compiled LLaMA-like stack: bf16 Inductor against fp8hpf, with and
without ``release_weights``.

The model is ``--blocks`` LLaMA-like blocks (``e2e.Block``: d=4096, 32 heads, SwiGLU 14336),
bf16, compiled with ``mode="reduce-overhead"`` (CUDA graphs) and run at 2x2048 tokens
(prefill) and 1x16 (decode): two graphs of one model, as a server runs them.  Each variant
gets a fresh model with the same weights.  Per variant:

* ``params``: bytes still held by the model's parameters (a released one holds none);
* ``fp8 unique``: bytes of the FP8 weight copies (scales included) the compiled graphs hold,
  each tensor counted once; ``fp8 per graph``: the same summed over graphs, each graph's
  caches counted on their own (what holding one copy per graph would take);
* ``allocated``: ``torch.cuda.memory_allocated()`` once both graphs have run and the
  outputs are freed, less the same before the model was built: weights, CUDA graph pools and
  whatever else the compiled model keeps;
* ``peak``: the most allocated during the compiles and calls, on the same base;
* the prefill and decode step times (median of ``do_bench``), and whether the outputs equal
  those of the same recipe without ``release_weights`` bit for bit.

Each variant runs in a process of its own, so that no variant's allocations, compiled code
or CUDA graph pools are counted in another's.

    python benchmarks/memory.py [--blocks 4] [--decode-first] [--only "bf16 Inductor,..."]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from e2e import Block, median_ms  # noqa: E402

import fp8compile  # noqa: E402
from fp8compile.passes import weights  # noqa: E402

VARIANTS = {
    "bf16 Inductor": None,
    "fp8hpf blockwise": {},
    "fp8hpf blockwise release": {"release_weights": True},
    "fp8hpf rowwise fast": {"recipe": "rowwise", "accumulation": "fast"},
    "fp8hpf rowwise fast release": {"recipe": "rowwise", "accumulation": "fast",
                                    "release_weights": True},
}
SHAPES = {"prefill 2x2048": (2, 2048), "decode 1x16": (1, 16)}


def build_model(blocks: int, d: int, heads: int, ffn: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(Block(d, heads, ffn) for _ in range(blocks)))
    for p in model.parameters():  # weights of a trained model's scale
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    return model.to("cuda", torch.bfloat16).eval()


def fp8_bytes(backend: fp8compile.Fp8Backend) -> tuple[int, int]:
    """(unique, per graph) bytes of the FP8 copies the backend's graphs hold."""
    unique, per_graph = {}, 0
    for ctx in backend.contexts:
        for cache in ctx.weight_caches:
            for t in cache.value or ():
                per_graph += t.untyped_storage().nbytes()
                unique[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(unique.values()), per_graph


def run_variant(name, options, args, inputs):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(args.blocks, args.d, args.heads, args.ffn)
    torch._dynamo.reset()
    if options is None:
        be, compiled = None, torch.compile(model, mode="reduce-overhead")
    else:
        be = fp8compile.backend(options, mode="reduce-overhead")
        compiled = torch.compile(model, backend=be)

    def step(x):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x)

    outs, times = {}, {}
    order = [k for k in SHAPES if k.split()[0] in args.shapes]
    order = order[::-1] if args.decode_first else order
    with torch.no_grad():
        for shape in order:
            outs[shape] = step(inputs[shape]).clone()
        for shape in order:
            times[shape] = median_ms(lambda s=shape: step(inputs[shape]))
    torch.cuda.synchronize()
    params = sum(p.untyped_storage().nbytes() for p in model.parameters())
    unique, per_graph = fp8_bytes(be) if be is not None else (0, 0)
    gc.collect()
    allocated = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    released = sum(weights.released(p) for p in model.parameters())
    result = dict(params=params, unique=unique, per_graph=per_graph, allocated=allocated,
                  peak=peak, times=times, released=released,
                  outs={k: v.cpu() for k, v in outs.items()})
    torch._dynamo.reset()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--decode-first", action="store_true",
                    help="run the decode graph first (it then releases the weights)")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--shapes", nargs="+", default=["prefill", "decode"],
                    choices=["prefill", "decode"])
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # the child process's one variant
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("memory.py measures CUDA memory: it needs a CUDA GPU")
        return 1
    if args.variant:
        return child(args)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{args.blocks} blocks d={args.d} ffn={args.ffn}, "
          f"{'decode' if args.decode_first else 'prefill'} graph first; each variant in a "
          "process of its own", flush=True)
    only = [v for v in args.only.split(",") if v]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            if only and name not in only:
                continue
            save = os.path.join(tmp, f"{len(results)}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", name, "--save", save,
                   "--blocks", str(args.blocks), "--d", str(args.d), "--heads", str(args.heads),
                   "--ffn", str(args.ffn), "--shapes", *args.shapes,
                   *(["--decode-first"] if args.decode_first else [])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not lines:
                print(f"{name}: failed (exit {out.returncode})\n{out.stderr[-3000:]}", flush=True)
                continue
            r = results[name] = json.loads(lines[-1][len("RESULT "):])
            r["outs"] = torch.load(save)
            twin = results.get(name.removesuffix(" release")) if name.endswith(" release") \
                else None
            same = "" if twin is None else "  outputs " + (
                "equal" if all(torch.equal(r["outs"][k], twin["outs"][k]) for k in r["outs"])
                else "DIFFER")
            mib = 2.0 ** -20
            print(f"{name:28s} params {r['params'] * mib:8.1f} MiB  fp8 unique "
                  f"{r['unique'] * mib:8.1f} (per graph {r['per_graph'] * mib:8.1f})  allocated "
                  f"{r['allocated'] * mib:8.1f}  peak {r['peak'] * mib:8.1f} MiB  released "
                  f"{r['released']}  "
                  + "  ".join(f"{k} {v:.3f} ms" for k, v in r["times"].items()) + same,
                  flush=True)
    return 0


def child(args) -> int:
    """Run one variant; its figures go to stdout as a ``RESULT`` JSON line, its outputs to
    ``args.save``."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    inputs = {k: torch.randn(b, t, args.d, device="cuda", dtype=torch.bfloat16, generator=gen)
              for k, (b, t) in SHAPES.items()}
    r = run_variant(args.variant, VARIANTS[args.variant], args, inputs)
    torch.save(r.pop("outs"), args.save)
    print("RESULT " + json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
