"""Training step of a LLaMA-like block: fp8hpf (each recipe) vs bf16 Inductor vs torchao float8.

Run on a CUDA (Hopper) machine::

    PYTHONUNBUFFERED=1 python benchmarks/train.py --out out/
    python benchmarks/train.py --small          # CPU smoke run of the same code, tiny dims

The block (benchmarks/e2e.py's): d=4096, 32 heads, SwiGLU 14336, RMSNorm, causal SDPA, bf16
parameters, 2x2048 tokens.  One step is forward + backward of ``y = block(x)`` against a fixed
``dy`` (``y.backward(dy)``), gradients set to None before each step; no optimizer (the
optimizer's cost does not depend on the precision of the GEMMs).  Each variant is timed as
the median of ``triton.testing.do_bench`` (CUDA events) on the same inputs; speedups are
against bf16 Inductor measured in the same run.

Memory: ``saved`` is what autograd keeps for backward after the forward, measured with
``torch.autograd.graph.saved_tensors_hooks`` (``fp8compile.training.saved_tensor_bytes``,
parameters and the input excluded, deduplicated by storage), split into FP8 and other bytes;
``fwd peak`` is ``torch.cuda.max_memory_allocated`` during the forward, above what was
allocated before it.  Errors: ‖y − y32‖/‖y32‖ and ‖dx − dx32‖/‖dx32‖ against the same block
in fp32.  torchao (``convert_to_float8_training`` then ``torch.compile``) is used when
importable.

The ``cached`` variants (``cache_training_weights``) keep the FP8 weights until a parameter
changes.  Without an update between steps they time what a micro-batch after the first
costs in gradient accumulation.  ``--accumulate N`` makes every variant's step N micro-batches
and an in-place parameter update, so the cache is refilled once per step, as in training
with gradient accumulation; then all rows compare like for like.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

from e2e import (  # noqa: E402
    Block,
    device_gaps,
    format_categories,
    format_gaps,
    import_inductor,
    kernel_categories,
    median_ms,
)

import fp8compile  # noqa: E402
from fp8compile.training import saved_tensor_bytes  # noqa: E402

D, HEADS, FFN, B, T = 4096, 32, 14336, 2, 2048


def log(*a):
    print(*a, flush=True)


def rel_err(y, ref) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm())


def variants(names: list[str], mode: str | None = None):
    """name -> factory(base block) returning the callable to train; every compiled variant
    gets the same ``torch.compile`` ``mode``."""
    out = {
        "bf16 eager": lambda m: m,
        "bf16 Inductor": lambda m: torch.compile(m, mode=mode),
    }

    def fp8hpf(options):
        # The backend object, not the string "fp8hpf": the entry point needs a pip install.
        def make(m):
            return torch.compile(m, backend=fp8compile.backend(options, mode=mode))

        make.options, make.mode = options, mode  # for with_combo_kernels
        return make

    for recipe in ("blockwise", "rowwise", "tensorwise"):
        out[f"fp8hpf {recipe}"] = fp8hpf({"recipe": recipe})
    # Fast accumulation in the forward GEMM only, precise backward (grad_accumulation's
    # default): the split torchao's float8 training and TransformerEngine use by default.
    out["fp8hpf tensorwise fast"] = fp8hpf({"recipe": "tensorwise", "accumulation": "fast"})
    out["fp8hpf rowwise fast"] = fp8hpf({"recipe": "rowwise", "accumulation": "fast"})
    # Micro-batches after the first of a gradient-accumulation step: the weights' FP8 copies
    # (W and Wᵀ) come from the cache, since the parameters do not change between calls here.
    out["fp8hpf tensorwise fast cached"] = fp8hpf(
        {"recipe": "tensorwise", "accumulation": "fast", "cache_training_weights": True})
    out["fp8hpf blockwise cached"] = fp8hpf(
        {"recipe": "blockwise", "cache_training_weights": True})
    out["fp8hpf tensorwise delayed"] = fp8hpf({"recipe": "tensorwise", "scaling": "delayed"})
    out["fp8hpf tensorwise delayed fast"] = fp8hpf({"recipe": "tensorwise", "scaling": "delayed",
                                                   "accumulation": "fast"})
    out["fp8hpf blockwise e5m2"] = fp8hpf({"gradient_format": "e5m2"})
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        def ao(recipe):
            def make(m):
                convert_to_float8_training(m, config=Float8LinearConfig.from_recipe_name(recipe))
                return torch.compile(m, mode=mode)
            return make

        out["torchao tensorwise"] = ao("tensorwise")
        out["torchao rowwise"] = ao("rowwise")
    except Exception as e:  # torchao absent or its API changed
        log(f"torchao not used: {type(e).__name__}: {e}")
    for name in names:
        base = name[:-len(COMBO)] if name.endswith(COMBO) else None
        if base in out and base != "bf16 eager":
            out[name] = with_combo_kernels(out[base])
    return {n: out[n] for n in names if n in out}


COMBO = " combo"  # suffix: the variant compiled with Inductor's combo kernels


class _InductorPatched(torch.nn.Module):
    """A compiled model whose compilation (on the first call) runs under Inductor config
    patches; ``_orig_mod`` stays the eager module."""

    def __init__(self, compiled, patches):
        super().__init__()
        self.compiled, self.patches = compiled, patches
        self._orig_mod = getattr(compiled, "_orig_mod", compiled)

    def forward(self, *args):
        with torch._inductor.config.patch(self.patches):
            return self.compiled(*args)


def with_combo_kernels(make):
    """``make`` with Inductor's combo kernels (independent kernels launched together): an
    fp8hpf variant through its ``inductor`` option, any other compiled one by patching
    Inductor's config while it compiles."""
    options = getattr(make, "options", None)
    if options is not None:
        patched = {**options, "inductor": {**options.get("inductor", {}), "combo_kernels": True}}
        return lambda m: torch.compile(m, backend=fp8compile.backend(patched,
                                                                     mode=make.mode))
    return lambda m: _InductorPatched(make(m), {"combo_kernels": True})


def profile_step(step, path: str, top: int = 30) -> None:
    """Device time per step of the busiest ops and kernels; the full tables go to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=True) as p:
        for _ in range(5):
            step()
        sync()
    avg = p.key_averages()
    log("    " + format_categories(kernel_categories(avg, 5)))
    log("    " + format_gaps(device_gaps(p.events()), 5))
    rows = sorted(avg, key=lambda e: -e.device_time_total)[:top]
    for e in rows:
        log(f"    {e.device_time_total / 5 / 1e3:8.3f} ms/step  x{e.count // 5:<4d} {e.key[:100]}")
    with open(path, "w") as f:
        f.write(avg.table(sort_by="device_time_total", row_limit=80, max_name_column_width=100))
        f.write("\n\n")
        f.write(p.key_averages(group_by_input_shape=True).table(
            sort_by="device_time_total", row_limit=80, max_name_column_width=60))


def cprofile_step(step, top: int = 25, steps: int = 10) -> None:
    """Where the host's time goes (Python functions, by own time), for CPU-bound steps."""
    import cProfile
    import pstats

    for _ in range(3):
        step()
    sync()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(steps):
        step()
    sync()
    pr.disable()
    log(f"    host profile: {(time.perf_counter() - t0) / steps * 1e3:.2f} ms/step under cProfile")
    st = pstats.Stats(pr)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    for (file, line, fn), (_cc, calls, own, cum, _) in rows:
        where = f"{os.path.basename(file)}:{line}({fn})"
        log(f"    {own / steps * 1e3:7.3f} ms own {cum / steps * 1e3:8.3f} ms cum "
            f"x{calls // steps:<5d} {where[:90]}")


def run_variant(name, make, base, x, dy, ref, profile_path=None, host_profile=False,
                accumulate=1):
    torch._dynamo.reset()
    model = make(copy.deepcopy(base))
    mod = getattr(model, "_orig_mod", model)
    params = list(mod.parameters())
    xg = x.detach().clone().requires_grad_()

    def step():
        for p in params:
            p.grad = None
        xg.grad = None
        for _ in range(accumulate):
            torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph trees
            model(xg).backward(dy)
        if accumulate > 1:
            # The optimizer's in-place update (negligible in size): it moves every parameter's
            # version, so cached FP8 weights are made again, once per step.
            with torch.no_grad():
                torch._foreach_add_(params, [p.grad for p in params], alpha=-1e-12)

    t0 = time.perf_counter()
    step()
    sync()
    compile_s = time.perf_counter() - t0
    step()
    y = model(xg)
    err_y = rel_err(y.detach(), ref["y"])
    for p in params:
        p.grad = None
    xg.grad = None
    y.backward(dy)
    err_dx = rel_err(xg.grad, ref["dx"])
    err_dw = rel_err(mod.down_proj.weight.grad, ref["dw"]) if hasattr(mod, "down_proj") else None
    del y
    ms = median_ms(step)
    if profile_path:
        log(f"{name}: profile (5 steps)")
        profile_step(step, profile_path)
    if host_profile:
        log(f"{name}: host profile (10 steps)")
        cprofile_step(step)
    # memory: what the forward keeps for backward
    for p in params:
        p.grad = None
    sync()
    before = mem()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    holder = {}
    saved = saved_tensor_bytes(lambda: holder.setdefault("y", model(xg)),
                               exclude=params + [xg])
    sync()
    fwd_peak = (torch.cuda.max_memory_allocated() - before) if torch.cuda.is_available() else 0
    holder["y"].backward(dy)
    holder.clear()
    return {"name": name, "ms": ms, "compile_s": compile_s, "err_y": err_y, "err_dx": err_dx,
            "err_dw": err_dw, "saved_mib": saved.total / 2**20, "saved_fp8_mib": saved.fp8 / 2**20,
            "saved_by_dtype": saved.by_dtype, "fwd_peak_mib": fwd_peak / 2**20}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def mem() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


DEFAULT = ["bf16 Inductor", "fp8hpf blockwise", "fp8hpf rowwise", "fp8hpf tensorwise",
           "fp8hpf tensorwise fast", "torchao tensorwise", "torchao rowwise"]
ALL = ["bf16 eager", *DEFAULT, "fp8hpf rowwise fast", "fp8hpf tensorwise delayed",
       "fp8hpf tensorwise delayed fast", "fp8hpf blockwise e5m2",
       "fp8hpf tensorwise fast cached", "fp8hpf blockwise cached"]
# Any compiled variant + COMBO (e.g. "bf16 Inductor combo") is also known.


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny dims (CPU smoke run)")
    ap.add_argument("--variants", default=",".join(DEFAULT),
                    help=f"comma list or 'all'; known: {', '.join(ALL)}; a compiled "
                         f"variant's name + '{COMBO}' compiles it with Inductor's combo kernels")
    ap.add_argument("--out", default=None, help="folder for train.json")
    ap.add_argument("--mode", default=None,
                    help="torch.compile mode for every compiled variant (e.g. reduce-overhead)")
    ap.add_argument("--host-profile", default="",
                    help="comma list of variants whose host (Python) time to profile")
    ap.add_argument("--profile", default="",
                    help="comma list of variants to profile (tables written to --out)")
    ap.add_argument("--accumulate", type=int, default=1, metavar="N",
                    help="time N micro-batches (forward + backward) and a parameter update "
                         "per step, as gradient accumulation does (default 1: no update)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    import_inductor()
    d, heads, ffn, b, t = (256, 4, 512, 2, 64) if args.small else (D, HEADS, FFN, B, T)
    names = ALL if args.variants == "all" else [s.strip() for s in args.variants.split(",")]

    torch.manual_seed(0)
    base32 = Block(d, heads, ffn).to(dev)
    for p in base32.parameters():  # LLaMA-like init scale: keep activations O(1)
        torch.nn.init.normal_(p, std=d**-0.5) if p.dim() == 2 else None
    x32 = torch.randn(b, t, d, device=dev, requires_grad=True)
    dy32 = torch.randn(b, t, d, device=dev) * t**-0.5
    y32 = base32(x32)
    y32.backward(dy32)
    ref = {"y": y32.detach(), "dx": x32.grad.detach(), "dw": base32.down_proj.weight.grad}
    base = copy.deepcopy(base32).to(torch.bfloat16)
    for p in base.parameters():
        p.grad = None
    x, dy = x32.detach().bfloat16(), dy32.bfloat16()
    del y32

    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "torch": torch.__version__, "shape": [b, t, d, heads, ffn], "mode": args.mode,
            "accumulate": args.accumulate}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        pass
    log(json.dumps(info))
    rows = []
    for name, make in variants(names, args.mode).items():
        try:
            prof = None
            if name in args.profile.split(",") and args.out:
                os.makedirs(args.out, exist_ok=True)
                prof = os.path.join(args.out, f"profile_{name.replace(' ', '_')}.txt")
            r = run_variant(name, make, base, x, dy, ref, prof,
                            name in args.host_profile.split(","), args.accumulate)
        except Exception as e:  # keep the other variants' figures
            log(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        rows.append(r)
        log(f"{name}: {r['ms']:.3f} ms  compile {r['compile_s']:.1f} s  err y {r['err_y']:.2e} "
            f"dx {r['err_dx']:.2e}  saved {r['saved_mib']:.1f} MiB (fp8 "
            f"{r['saved_fp8_mib']:.1f})  fwd peak {r['fwd_peak_mib']:.1f} MiB")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "train.json"), "w") as f:
                json.dump({"info": info, "rows": rows}, f, indent=1)

    if torch.cuda.is_available():
        from fp8compile.kernels.select import backend_choices

        for key, choice in backend_choices().items():
            log(f"  gemm backend {choice:6s} for {key}")
    base_ms = next((r["ms"] for r in rows if r["name"] == "bf16 Inductor"), None)
    base_saved = next((r["saved_mib"] for r in rows if r["name"] == "bf16 Inductor"), None)
    log("")
    what = ("fwd+bwd, no optimizer" if args.accumulate == 1 else
            f"{args.accumulate} x fwd+bwd and a parameter update")
    log(f"training step ({what}), {b}x{t} tokens, d={d}, ffn={ffn}, "
        f"{info['device']}, torch {info['torch']}")
    log(f"{'variant':28s} {'median ms':>9s} {'vs bf16 Ind':>11s} {'saved MiB':>9s} "
        f"{'(fp8)':>7s} {'vs bf16':>7s} {'fwd peak':>8s} {'err y':>8s} {'err dx':>8s}")
    for r in rows:
        sp = f"{base_ms / r['ms']:.2f}x" if base_ms else "-"
        sv = f"{r['saved_mib'] / base_saved:.2f}x" if base_saved else "-"
        log(f"{r['name']:28s} {r['ms']:9.3f} {sp:>11s} {r['saved_mib']:9.1f} "
            f"{r['saved_fp8_mib']:7.1f} {sv:>7s} {r['fwd_peak_mib']:8.1f} {r['err_y']:8.1e} "
            f"{r['err_dx']:8.1e}")


if __name__ == "__main__":
    main()
