"""End-to-end inference: a LLaMA-like block, fp8hpf vs bf16 eager/Inductor vs torchao float8.

Run on a CUDA (Hopper) machine::

    PYTHONUNBUFFERED=1 python benchmarks/e2e.py --out out/

The block: d=4096, 32 heads, SwiGLU 14336, RMSNorm, causal SDPA, bf16, forward only, at
2x2048 tokens and 1x16 tokens (decode-like); ``--shapes token`` times 1x1 (decode at batch
1, every linear a one-row GEMM) instead.  Each fp8hpf variant also runs as
``... unfused``: without ``fuse_projections`` (q/k/v and gate/up as separate GEMMs); the
fast ones and blockwise also as ``... no-swiglu``: without ``fuse_swiglu`` (SiLU·mul outside
the gate/up GEMM's epilogue); blockwise also as ``... no-residual``: without
``fuse_residual`` (the last residual add outside the down GEMM's epilogue).

Each variant is timed as the median of ``triton.testing.do_bench`` (CUDA events) on the same
inputs; speedups are against bf16 Inductor measured in the same run.  ``do_bench`` flushes
the L2 cache before each call and times it alone, so where the host takes longer to issue a
step than the GPU to run it, the figure holds host time too.  Decode rows therefore also give
``steady``: the time per step over 20 steps issued back to back (the median of 15 such runs),
what a decoding loop sees; ``GPU``: the same 20 steps queued behind a sleep kernel, so the
GPU runs them back to back whatever the host's pace (the GPU's own time per step); and
``host``: the time the host takes to issue one step.  Where the host time nears the GPU
time, ``steady`` measures the host.  Decode variants are all compiled first, then timed in
three rounds, each timing every variant once (the median over the rounds is kept): timed one
after another, right after each compile, the same variant's decode step moved by up to 2x
between runs.

Under sustained FP8 GEMM load an H100/H200 reaches its power limit and lowers its SM clock
(1980 MHz idle, ~1400-1700 MHz while timing; docs/performance.md, "Where the profile's
kernels and do_bench differ").  Where ``nvidia-smi`` is found, each prefill row also gives
the mean SM clock over its timing and the share of those samples with the software power cap
active, so that figures from different runs can be compared.

The error is ‖y − y_fp32‖ / ‖y_fp32‖ with y_fp32 the same block and inputs in fp32.  Compile
time is the wall time from the ``torch.compile`` call to the first output (compile + run),
with Dynamo's caches reset and Inductor's modules imported beforehand, so that no variant
pays the imports for the ones after it (``compile_time.py`` times each variant in a fresh
process, imports included).  With
``--profile`` one fp8hpf variant (``--profile-variant``) is profiled at each shape and its top
kernels are printed with their share of the step.  On a GPU the GEMM backend chosen for each
shape (cuBLAS or Triton) is listed at the end.  torchao is used when importable (float8
training conversion, rowwise and tensorwise, then torch.compile; forward only).
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import itertools
import json
import os
import sys
import time
import types

import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fp8compile  # noqa: E402

D, HEADS, FFN = 4096, 32, 14336
SHAPES = {"prefill 2x2048": (2, 2048), "decode 1x16": (1, 16)}
SMALL_SHAPES = {"prefill 2x64": (2, 64), "decode 1x16": (1, 16)}
# Timed only when --shapes names them: decode at batch 1, one token a step (every linear
# a one-row GEMM: kernels.gemv).
EXTRA_SHAPES = {"token 1x1": (1, 1)}


class AttentionHalf(nn.Module):
    """A LLaMA-like block's attention half and both norms; subclasses add the MLP half."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(d, eps=1e-5)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=1e-5)

    def attend(self, x):
        """``x + o_proj(causal attention of the normed x)``."""
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))


class Block(AttentionHalf):
    def __init__(self, d=D, heads=HEADS, ffn=FFN):
        super().__init__(d, heads)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        x = self.attend(x)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def gemm_flops(tokens: int) -> float:
    return 2.0 * tokens * (4 * D * D + 3 * D * FFN)


def rel_err(y, ref) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm())


def median_ms(fn) -> float:
    if not torch.cuda.is_available():  # CPU smoke run (--small): wall-clock median
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[2]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def steady_ms(fn, steps: int = 20, runs: int = 15) -> float:
    """Time per call over ``steps`` calls issued back to back: the median of ``runs`` runs
    (after one run to warm up)."""
    from fp8compile.kernels.select import _time_ms  # CUDA events around ``steps`` calls

    _time_ms(fn, steps)
    return sorted(_time_ms(fn, steps) for _ in range(runs))[runs // 2]


class ClockSampler:
    """``nvidia-smi`` sampling the GPU's SM clock, power draw and power-cap state every
    ``period_ms`` in the background, for :meth:`window`; inert without ``nvidia-smi``."""

    SW_POWER_CAP = 0x4  # the bit of ``clocks_event_reasons.active``

    def __init__(self, path: str, period_ms: int = 50):
        import shutil
        import subprocess

        self.path, self.proc = path, None
        exe = shutil.which("nvidia-smi")
        if exe is None or not torch.cuda.is_available():
            return
        index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        with open(path, "w") as out:
            self.proc = subprocess.Popen(
                [exe, "-i", index, "--query-gpu=timestamp,clocks.sm,power.draw,"
                 "clocks_event_reasons.active", "--format=csv,noheader,nounits",
                 "-lms", str(period_ms)], stdout=out, stderr=subprocess.DEVNULL)

    def samples(self, t0: float, t1: float) -> list[tuple[float, float, bool]]:
        """(SM MHz, watts, power-capped) of each sample between host times t0 and t1."""
        import datetime

        got = []
        if self.proc is None:
            return got
        with open(self.path) as f:
            for line in f:
                try:
                    stamp, mhz, watts, reasons = (v.strip() for v in line.split(","))
                    t = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                    row = (float(mhz), float(watts), bool(int(reasons, 16) & self.SW_POWER_CAP))
                except ValueError:
                    continue
                if t0 <= t <= t1:
                    got.append(row)
        return got

    def window(self, t0: float, t1: float) -> tuple[float, float]:
        """(mean SM MHz, share of samples power-capped) between host times t0 and t1 (NaN
        without samples)."""
        got = self.samples(t0, t1)
        if not got:
            return float("nan"), float("nan")
        return (sum(m for m, _, _ in got) / len(got), sum(c for _, _, c in got) / len(got))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def gpu_and_host_ms(fn, steps: int = 20) -> tuple[float, float]:
    """(GPU ms per call with the host's time hidden, host ms to issue one call): ``steps``
    calls are queued behind a sleep kernel, so the GPU runs them back to back (the timing
    the GEMM backend choice uses, ``select._gpu_ms``), then timed on the host alone."""
    from fp8compile.kernels import select

    gpu = select._gpu_ms(fn, steps)
    torch.cuda.synchronize()
    torch.cuda._sleep(select._HOLD_CYCLES * 64)  # ~60 ms: longer than the host's queueing
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    host = (time.perf_counter() - t0) / steps * 1e3
    torch.cuda.synchronize()
    return gpu, host


ROUNDS = 3


def import_inductor() -> None:
    """Import the modules that the first ``torch.compile`` call (Inductor) or the first
    compiled call (other backends) would: a script that compiles several variants in one
    process calls this first, so that no variant's compile time includes imports that the
    variants after it find done."""
    importlib.import_module("torch._inductor.compile_fx")
    importlib.import_module("torch._inductor.cudagraph_trees")


def build(make, x, mode):
    """Compile one variant; returns (step function, first output, compile seconds).

    The seconds run from the ``torch.compile`` call to the first output.  Inductor's modules
    load at that call with ``torch.compile(m)`` but at the first call with another backend,
    so timing the first call alone charged other backends for imports that Inductor had paid
    before the clock started.  ``make.prepare`` (static scaling's calibration) runs first,
    untimed: it is done once, offline, not per compile.
    """
    prepare = getattr(make, "prepare", None)
    if prepare is not None:
        prepare()
    t0 = time.perf_counter()
    compiled = make()
    graphs = mode is not None and "reduce-overhead" in mode

    def fn(inp):
        # CUDA graphs reuse their output buffers: mark each call a new step.
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(inp)

    y = fn(x).clone()
    if x.is_cuda:
        torch.cuda.synchronize()
    return fn, y, time.perf_counter() - t0


def report(results, args, shape_name, name, tokens, ms, steady, first, err,
           gpu=float("nan"), host=float("nan"), clock=(float("nan"), float("nan"))) -> None:
    results.append(dict(shape=shape_name, variant=name, ms=ms, steady_ms=steady,
                        gpu_ms=gpu, host_ms=host, first_call_s=first, err=err,
                        tflops=gemm_flops(tokens) / ms / 1e9, sm_mhz=clock[0],
                        power_capped=clock[1]))
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump(results, f, indent=1)
    steady_txt = "" if steady != steady else f" (steady {steady:.3f} ms)"
    if gpu == gpu:
        steady_txt += f" (GPU {gpu:.3f} ms, host {host:.3f} ms per step)"
    if clock[0] == clock[0]:
        steady_txt += f" (SM {clock[0]:.0f} MHz, power-capped {clock[1]:.0%})"
    print(f"{shape_name:15s} {name:20s} {ms:8.3f} ms{steady_txt}  first call "
          f"{first:6.1f} s  err {err:.2e}", flush=True)


def show_profile(fn, out, shape_name) -> None:
    path = os.path.join(out, f"e2e_profile_{shape_name.split()[0]}.txt")
    for k, ms_k, share in profile(fn, path):
        print(f"    {ms_k:7.3f} ms {share:6.1%}  {k}")


_COPIES = itertools.count()


def own_copy(base: nn.Module) -> nn.Module:
    """A deep copy of ``base`` whose ``forward`` has a code object of its own.

    Dynamo keeps its compiled code per code object: variants compiled side by side would all
    hang off ``Block.forward``, and each call of a variant would first test the guards of
    the variants compiled before it (host time that a decode step's timing then includes).
    """
    model = copy.deepcopy(base)
    f = type(model).forward
    code = f.__code__.replace(co_name=f"forward_{next(_COPIES)}")
    forward = types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__,
                                 f.__closure__)
    model.__class__ = type(type(model).__name__, (type(model),), {"forward": forward})
    return model


def variants(base: Block, mode: str | None, options: dict | None = None):
    """name -> (factory returning a callable, note); ``options`` go into every fp8hpf
    variant's config."""
    def inductor():
        return torch.compile(own_copy(base), mode=mode)

    def fp8(recipe, accumulation="precise", fuse=True, **extra):
        def make():
            # The backend object (not backend="fp8hpf") so the script runs from a checkout too,
            # where the entry point is not installed.
            be = fp8compile.backend({"recipe": recipe, "accumulation": accumulation,
                                     "fuse_projections": fuse, **extra, **(options or {})},
                                    mode=mode)
            return torch.compile(own_copy(base), backend=be)
        return make

    out = {
        "bf16 eager": (lambda: own_copy(base), ""),
        "bf16 Inductor": (inductor, ""),
    }
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        def ao(recipe):
            def make():
                m = own_copy(base)
                convert_to_float8_training(m, config=Float8LinearConfig.from_recipe_name(recipe))
                return torch.compile(m, mode=mode)
            return make

        out["torchao rowwise"] = (ao("rowwise"), "")
        out["torchao tensorwise"] = (ao("tensorwise"), "")
    except Exception as e:  # torchao absent or API changed
        print(f"torchao not used: {type(e).__name__}: {e}")
    for recipe in ("blockwise", "rowwise", "tensorwise"):
        out[f"fp8hpf {recipe}"] = (fp8(recipe), "")
    for recipe in ("rowwise", "tensorwise"):
        out[f"fp8hpf {recipe} fast"] = (fp8(recipe, "fast"), "")
    # Each fp8hpf variant without fused projections (q/k/v and gate/up as separate GEMMs).
    for name in [n for n in out if n.startswith("fp8hpf")]:
        recipe, *fast = name.split()[1:]
        out[f"{name} unfused"] = (fp8(recipe, "fast" if fast else "precise", fuse=False), "")
    # The fast variants without the SwiGLU epilogue: the gate/up GEMM writes gate and up,
    # and SiLU·mul runs in the down projection's input quantization.
    for recipe in ("rowwise", "tensorwise"):
        out[f"fp8hpf {recipe} fast no-swiglu"] = (fp8(recipe, "fast", fuse_swiglu=False), "")
    # Blockwise without the SwiGLU fold that auto makes from 2048 tokens on Hopper (the
    # gate/up GEMM quantizing h in 1x128 groups in its epilogue): what it gains.
    out["fp8hpf blockwise no-swiglu"] = (fp8("blockwise", fuse_swiglu=False), "")
    # Blockwise without the block's last residual add in the down GEMM's epilogue (made by
    # rule where the Hopper kernel serves the down GEMM): cuBLAS, then Inductor's add.
    out["fp8hpf blockwise no-residual"] = (fp8("blockwise", fuse_residual=False), "")
    # Static scaling: tensorwise activation scales calibrated once (fp8compile.calibrate),
    # on inputs of their own, then fixed; every cast is then one pass, and the SiLU·mul
    # cast runs in the gate/up GEMM's epilogue where the Hopper kernel serves it.
    calibrated = functools.cache(lambda: calibrate_static(base))

    def static():
        return fp8("tensorwise", "fast", **calibrated())()
    static.prepare = calibrated
    out["fp8hpf tensorwise static fast"] = (static, "")
    return out


def calibrate_static(base: Block) -> dict:
    """Config entries for static scaling of ``base``: the activation amaxes that
    :func:`fp8compile.calibrate` measures on two batches of 2x256 tokens, drawn from the
    timed inputs' distribution with a seed of their own (not the timed inputs).

    With ``FP8COMPILE_E2E_CALIBRATION`` naming a JSON file, the figures are read from it
    when it exists and written to it otherwise: ``compile_time.py`` calibrates in a process
    of its own, so that a variant's compile does not follow a calibration's GPU work."""
    path = os.environ.get("FP8COMPILE_E2E_CALIBRATION")
    if path and os.path.exists(path):
        with open(path) as f:
            figures = tuple(tuple(row) for row in json.load(f))
        return {"scaling": "static", "calibration": figures}
    w = base.attn_norm.weight
    gen = torch.Generator(device=w.device).manual_seed(1234)
    batches = [(torch.randn(2, 256, w.shape[0], generator=gen, device=w.device,
                            dtype=w.dtype),) for _ in range(2)]
    cal = fp8compile.calibrate(own_copy(base), batches,
                               {"recipe": "tensorwise", "accumulation": "fast"},
                               progress=False)
    if path:
        with open(path, "w") as f:
            json.dump(cal.config.calibration, f)
    return {"scaling": "static", "calibration": cal.config.calibration}


def check_gemms() -> None:
    """The dispatched GEMM (Triton or cuBLAS, whichever won) vs the fp32 reference."""
    from fp8compile import kernels
    from fp8compile.kernels.select import backend_choices
    from fp8compile.numerics import Fp8Format, Granularity
    from fp8compile.ops import scaled_mm_reference

    for xg, wg in [("group", "block"), ("row", "row"), ("tensor", "tensor")]:
        for acc in ("precise", "fast"):
            for m, n, k in [(16, 4096, 4096), (4096, 14336, 4096)]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                G = Granularity
                xq, xs = kernels.quantize(x, G(xg), Fp8Format.E4M3, False)
                wq, ws = kernels.quantize(w, G(wg), Fp8Format.E4M3, False)
                y = kernels.scaled_mm(xq, xs, xg, wq, ws, wg, None, torch.bfloat16, acc,
                                      "none", None)
                ref = scaled_mm_reference(xq, xs, xg, wq, ws, wg, None, torch.float32, "none",
                                          None)
                print(f"check {xg:6s} {acc:7s} {m}x{n}x{k}: rel err vs exact fp32 "
                      f"{rel_err(y, ref):.1e}")
    for key, choice in backend_choices().items():
        print(f"  backend {choice:6s} for {key}")


# Device kernels by name, first match wins, for the profiles' per-category lines.
# Inductor's kernels (triton_*) come first: their names list the ops fused into them.
KERNEL_CATEGORIES = [
    ("Inductor, FP8 cast/amax", r"^triton_.*(abs_max|reciprocal)"),  # torchao's casts
    ("Inductor, other", r"^triton_"),
    ("GEMM", r"nvjet|gemm|cutlass|xmma|_scaled_mm|splitk"),
    ("attention", r"sdpa|flash|fmha|cudnn|attention"),
    ("fp8hpf quantization", r"quantize|_amax"),
    ("FP8 transpose", r"_copy_2d"),
    ("memset/memcpy", r"memset|memcpy"),
]


def kernel_categories(events, steps: int) -> dict[str, tuple[float, float]]:
    """``{category: (ms per step, launches per step)}`` of a profile's device kernels
    (``key_averages()``; user annotations such as compiled-graph ranges left out)."""
    import re

    out: dict[str, tuple[float, float]] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA or \
                getattr(e, "is_user_annotation", False) or e.key.startswith("## "):
            continue
        name = next((c for c, pat in KERNEL_CATEGORIES if re.search(pat, e.key, re.I)),
                    "other")
        ms, n = out.get(name, (0.0, 0.0))
        out[name] = (ms + e.self_device_time_total / 1e3 / steps, n + e.count / steps)
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


def format_categories(cats: dict[str, tuple[float, float]]) -> str:
    total = sum(ms for ms, _ in cats.values())
    return f"kernels {total:.3f} ms/step: " + ", ".join(
        f"{c} {ms:.3f} (x{n:g})" for c, (ms, n) in cats.items())


def device_gaps(events, min_us: float = 2.0) -> dict:
    """Where the GPU waits inside a profile: its kernels' intervals (``profile.events()``)
    merged, the idle time between the first and the last, and the gaps of at least
    ``min_us`` with the kernels on either side, longest first."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False)
                   and not e.name.startswith("## "))
    if not spans:
        return {"busy_us": 0.0, "span_us": 0.0, "gaps": []}
    busy, gaps = 0.0, []
    start, end, last = spans[0]
    for s, e, name in spans[1:]:
        if s > end:
            busy += end - start
            if s - end >= min_us:
                gaps.append((s - end, last, name))
            start, end = s, e
        elif e > end:
            end = e
        last = name if e >= end else last
    busy += end - start
    return {"busy_us": busy, "span_us": spans[-1][1] - spans[0][0],
            "gaps": sorted(gaps, reverse=True)}


def format_gaps(g: dict, steps: int, top: int = 6) -> str:
    idle = g["span_us"] - g["busy_us"]
    out = (f"GPU idle {idle / steps / 1e3:.3f} ms/step of {g['span_us'] / steps / 1e3:.3f} "
           f"({len(g['gaps'])} gaps >= 2 us in {steps} steps)")
    for us, before, after in g["gaps"][:top]:
        out += f"\n      {us:8.1f} us after {before[:50]} before {after[:50]}"
    return out


def profile(fn, path: str) -> list[tuple[str, float, float]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    print("    " + format_categories(kernel_categories(p.key_averages(), 10)))
    rows = []
    total = sum(e.device_time_total for e in p.key_averages()) or 1.0
    for e in sorted(p.key_averages(), key=lambda e: -e.device_time_total)[:15]:
        rows.append((e.key[:90], e.device_time_total / 10 / 1e3, e.device_time_total / total))
    with open(path, "w") as f:
        f.write(p.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="out")
    ap.add_argument("--mode", default=None, help="torch.compile mode for every compiled variant")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated, timed in this order: prefill,decode (the default), "
                    "token (1x1)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-variant", default="fp8hpf blockwise")
    ap.add_argument("--small", action="store_true", help="d=256 smoke run (runs on CPU)")
    ap.add_argument("--options", type=json.loads, default=None,
                    help='fp8hpf config entries for every fp8hpf variant, as JSON: '
                         '\'{"fuse_epilogues": true}\'')
    ap.add_argument("--check", action="store_true", help="check the dispatched GEMMs first")
    args = ap.parse_args()
    global D, HEADS, FFN
    if args.small:
        D, HEADS, FFN = 256, 4, 512
    os.makedirs(args.out, exist_ok=True)
    # Compile times are compared cold: no FX-graph / autotune cache hits between variants.
    torch._inductor.config.force_disable_caches = True
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    import_inductor()
    base32 = Block(D, HEADS, FFN).to(dev)
    # PyTorch's default nn.Linear init (uniform, std 1/sqrt(3*fan_in)): the residual stream
    # dominates the block output, as in the reference figures of the design brief.
    base = copy.deepcopy(base32).to(torch.bfloat16).eval()
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, mode={args.mode}")
    if args.check and dev == "cuda":
        check_gemms()
    results = []
    clocks = ClockSampler(os.path.join(args.out, "e2e_clocks.csv"))
    with torch.no_grad():
        shapes = SMALL_SHAPES if args.small else SHAPES
        if args.shapes:
            # in the order given: a shape compiled first leaves its GEMM choices to the next
            named = {**shapes, **EXTRA_SHAPES}
            shapes = {k: v for want in args.shapes.split(",") for k, v in named.items()
                      if k.split()[0] == want}
        for shape_name, (b, t) in shapes.items():
            x = torch.randn(b, t, D, device=dev, dtype=torch.bfloat16)
            ref = base32(x.float())
            # Decode steps take ~0.2 ms: timed one variant after another, the figures moved by
            # up to 2x between runs.  They are compiled first and timed in ROUNDS rounds, each
            # timing every variant once; the median over the rounds is kept.
            decode = dev == "cuda" and t <= 64
            timed = []
            for name, (make, _) in variants(base, args.mode, args.options).items():
                if args.only and name not in args.only.split(","):
                    continue
                if not decode:
                    torch._dynamo.reset()
                try:
                    fn, y, first = build(make, x, args.mode)
                    err = rel_err(y, ref)
                except Exception as e:
                    print(f"{shape_name:15s} {name:20s} FAILED {type(e).__name__}: {e}"[:400])
                    continue
                if decode:
                    timed.append((name, fn, first, err))
                    continue
                t0 = time.time()
                ms = median_ms(lambda: fn(x))
                clock = clocks.window(t0, time.time())
                report(results, args, shape_name, name, b * t, ms, float("nan"), first, err,
                       clock=clock)
                if args.profile and name == args.profile_variant and dev == "cuda":
                    show_profile(lambda: fn(x), args.out, shape_name)
                fn = None  # free the compiled model before the next variant
            rounds = {name: [] for name, *_ in timed}
            for _ in range(ROUNDS if timed else 0):
                for name, fn, *_ in timed:
                    rounds[name].append((median_ms(lambda: fn(x)), steady_ms(lambda: fn(x)),
                                         *gpu_and_host_ms(lambda: fn(x))))
            for name, fn, first, err in timed:
                ms, steady, gpu, host = (sorted(r[i] for r in rounds[name])[ROUNDS // 2]
                                         for i in range(4))
                report(results, args, shape_name, name, b * t, ms, steady, first, err, gpu,
                       host)
                if args.profile and name == args.profile_variant:
                    show_profile(lambda: fn(x), args.out, shape_name)
            timed = rounds = fn = None
            torch._dynamo.reset()
    clocks.close()
    if dev == "cuda":
        from fp8compile.kernels.select import backend_choices, describe_key

        print("\nGEMM backends chosen:")
        for key, got in sorted(backend_choices().items(), key=str):
            print(f"  {got:6s} {describe_key(key)}")
    print("\nshape            variant               ms      vs Inductor  err      compile vs Ind."
          "  steady ms (vs Ind.)  GPU ms (vs Ind.)  host ms")
    for shape_name in shapes:
        rows = [r for r in results if r["shape"] == shape_name]
        ind = next((r for r in rows if r["variant"] == "bf16 Inductor"), None)
        for r in rows:
            sp = ind["ms"] / r["ms"] if ind else float("nan")
            ct = r["first_call_s"] / ind["first_call_s"] if ind else float("nan")
            st = ""
            if r["steady_ms"] == r["steady_ms"]:
                st_sp = ind["steady_ms"] / r["steady_ms"] if ind else float("nan")
                st = f"  {r['steady_ms']:7.3f} ({st_sp:.2f}x)"
            if r["gpu_ms"] == r["gpu_ms"]:
                g_sp = ind["gpu_ms"] / r["gpu_ms"] if ind else float("nan")
                st += f"  {r['gpu_ms']:7.3f} ({g_sp:.2f}x)  {r['host_ms']:7.3f}"
            if r["sm_mhz"] == r["sm_mhz"]:
                st += f"  SM {r['sm_mhz']:.0f} MHz, capped {r['power_capped']:.0%}"
            print(f"{shape_name:16s} {r['variant']:20s} {r['ms']:7.3f}  {sp:6.2f}x      "
                  f"{r['err']:.2e}  {ct:5.2f}x{st}")


if __name__ == "__main__":
    main()
