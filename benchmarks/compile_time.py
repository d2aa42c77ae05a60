"""Compile time of the LLaMA block of ``e2e.py``, each variant in a fresh process.

``e2e.py`` compiles its variants one after another in one process, so each one after the
first finds the Triton kernels, the C launchers and the CUDA libraries the variants before it
loaded.  Here every variant's compile runs in a process of its own, timed from the
``torch.compile`` call to the first output (compile + run, CUDA graphs, 2x2048 tokens), twice:

* ``cold``: an empty Triton cache (``TRITON_CACHE_DIR``), what a first compile on a machine
  costs;
* ``warm``: the same cache again, what every later compile of the same model costs (the
  compile-time GEMM decisions are not cached across processes: they run again).

The clock starts at ``torch.compile``, not at the first call: ``torch.compile(m)`` with
Inductor imports Inductor's modules there (2.7 s of a warm bf16 run on an H200), while a
backend object imports them at the first call, so timing the first call alone charged
fp8hpf for imports that Inductor had paid before the clock started.

Inductor's own caches (FX graphs, AOT autograd, autotuning) start empty in every process:
each gets a fresh ``TORCHINDUCTOR_CACHE_DIR``, so Inductor compiles the whole graph every
time, and its Triton kernels are found in the Triton cache when warm, as fp8hpf's are.
(``force_disable_caches``, used before, also points Triton at a throwaway directory while
Inductor compiles: the kernels compiled then, Inductor's and fp8hpf's Gluon GEMMs, were
never found warm.)  The ratio is to bf16 Inductor's time in the same column.  For the
fp8hpf variants the time spent in the compile-time GEMM decisions (``kernels.select``:
timing backends, tuning tiles, the SwiGLU step), in quantizing the weights, and in Triton's
compiler and launcher builds inside the process is given too (Inductor compiles its own
kernels in worker processes), and so are Dynamo's phase timers.

Run on a CUDA (Hopper) machine::

    python benchmarks/compile_time.py
    python benchmarks/compile_time.py --variants "bf16 Inductor,fp8hpf rowwise fast" \\
        --mode max-autotune-no-cudagraphs
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
DEFAULT = "bf16 Inductor,fp8hpf blockwise,fp8hpf rowwise fast,fp8hpf tensorwise fast"


def _timers() -> dict[str, list]:
    """Wall-clock totals of the compile-time work named here (patched in place)."""
    import triton
    import triton.runtime.build as build

    from fp8compile.kernels import select
    from fp8compile.passes import scales

    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])

    def wrap(owner, name, label):
        f = getattr(owner, name, None)
        if f is None:  # another Triton: that timer is left out
            return

        @functools.wraps(f)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                totals[label][0] += time.perf_counter() - t0
                totals[label][1] += 1
        setattr(owner, name, timed)

    wrap(select, "_choose_traced", "GEMM backend choices")
    wrap(select, "swiglu_epilogue_ms", "SwiGLU step timing")
    wrap(scales.WeightCache, "_quantize", "weight quantization")
    from torch._higher_order_ops import triton_kernel_wrap

    for name in ("identify_mutated_tensors", "identify_accessed_tensors"):  # torch 2.11, 2.13
        wrap(triton_kernel_wrap, name, "inlined kernels' mutation analysis")
    wrap(triton.compiler, "compile", "Triton compiles in this process")
    wrap(build, "_build", "Triton C launcher builds")
    return totals


def _block():
    """The timed block and input of ``e2e.py``'s prefill, the same in every process."""
    import torch

    sys.path.insert(0, HERE)
    import e2e

    torch.manual_seed(0)
    base = e2e.Block(e2e.D, e2e.HEADS, e2e.FFN).cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, 2048, e2e.D, device="cuda", dtype=torch.bfloat16)
    return e2e, base, x


def calibrate(path: str) -> None:
    """Static scaling's calibration (``e2e.calibrate_static``), in a process of its own, its
    figures written to ``path`` for the variants' processes to read."""
    import torch

    os.environ["FP8COMPILE_E2E_CALIBRATION"] = path
    e2e, base, _ = _block()
    with torch.no_grad():
        e2e.calibrate_static(base)


class MainThreadSampler:
    """Wall-clock samples of the main thread's Python stack, taken from a daemon thread.

    cProfile in Python 3.12 records every thread, so work done on background threads (the
    Gluon GEMMs' compiles) shows up beside the compile that does not wait for it, and its
    per-call overhead inflates Python-heavy phases.  Sampling only the thread that runs the
    first call attributes the time that call actually takes.  Each sample is weighted by the
    wall time since the previous one (a sleep overshoots while the sampler waits for the
    GIL, which a thread inside a C call without releasing it holds).
    """

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval = interval
        self.stacks: collections.Counter = collections.Counter()
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _label(frame) -> str:
        path = frame.f_code.co_filename
        for root in ("site-packages/", "fp8compile/", "benchmarks/"):
            if root in path:
                path = path[path.rindex(root) + (len(root) if root == "site-packages/" else 0):]
                break
        else:
            path = os.path.basename(path)
        return f"{path}:{frame.f_code.co_name}"

    def _loop(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._main)
            now = time.perf_counter()
            stack = []
            while frame is not None:
                stack.append(self._label(frame))
                frame = frame.f_back
            self.stacks[";".join(reversed(stack))] += now - last
            last = now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def dump(self, path: str) -> None:
        """Collapsed stacks (``frame;frame;frame milliseconds``), the input of flame-graph
        tools and of ``summarize``."""
        with open(path, "w") as f:
            for stack, seconds in self.stacks.most_common():
                f.write(f"{stack} {seconds * 1e3:.1f}\n")


def _inclusive(path: str) -> tuple[dict[str, float], float, float]:
    """Seconds of the sampled run spent in (or below) each frame label, imports left out
    (where an import happens depends on the backend, not on its work), then the run's total
    seconds and its seconds importing modules."""
    totals: dict[str, float] = collections.defaultdict(float)
    total = imports = 0.0
    with open(path) as f:
        for line in f:
            stack, ms = line.rsplit(" ", 1)
            frames, seconds = stack.split(";"), float(ms) / 1e3
            total += seconds
            if any(frame.endswith(":exec_module") for frame in frames):
                imports += seconds
                continue
            for label in set(frames):
                totals[label] += seconds
    return totals, total, imports


def summarize(paths: dict[str, str], top: int = 40) -> None:
    """Each variant's sampled time with and without imports, and the frames whose inclusive
    time (imports left out) differs most from the first variant's (bf16 Inductor): where the
    extra compile time goes."""
    names = list(paths)
    runs = {name: _inclusive(path) for name, path in paths.items()}
    print("\nsampled main thread (torch.compile call and first call, s): total, imports, rest")
    for name, (_, total, imports) in runs.items():
        print(f"  {name:32s} {total:6.2f} {imports:6.2f} {total - imports:6.2f}")
    base = runs[names[0]][0]
    for name in names[1:]:
        mine = runs[name][0]
        diff = sorted(set(mine) | set(base), key=lambda k: -(mine.get(k, 0) - base.get(k, 0)))
        print(f"\n{name} against {names[0]} (inclusive s without imports, largest increase "
              f"first)")
        for label in diff[:top]:
            print(f"  {mine.get(label, 0):6.2f} {base.get(label, 0):6.2f} "
                  f"{mine.get(label, 0) - base.get(label, 0):+6.2f}  {label}")


def child(variant: str, mode: str, profile: str | None, sample: str | None) -> None:
    import contextlib
    import cProfile

    import torch

    totals = _timers()
    e2e, base, x = _block()
    make = e2e.variants(base, mode)[variant][0]
    prof = cProfile.Profile() if profile else None
    sampler = MainThreadSampler() if sample else None
    with torch.no_grad(), sampler or contextlib.nullcontext():
        if prof:
            prof.enable()
        _, _, first = e2e.build(make, x, mode)
        if prof:
            prof.disable()
            prof.dump_stats(profile)
    if sampler:
        sampler.dump(sample)
    # Dynamo's own phase timers: tracing, the backend (fp8hpf's passes, AOT tracing with the
    # compile-time decisions, Inductor), Inductor's codegen and compile; the first call's
    # remainder is running it (weight quantization, CUDA-graph recording, launcher builds).
    phases = getattr(torch._dynamo.utils, "compilation_time_metrics", {})
    for key, label in (("bytecode_tracing", "Dynamo tracing"),
                       ("OutputGraph.call_user_compiler", "backend"),
                       ("create_aot_dispatcher_function", "  AOT tracing (decisions)"),
                       ("compile_fx_inner", "  Inductor codegen + compile")):
        if phases.get(key):
            totals[label] = [float(sum(phases[key])), len(phases[key])]
    print("RESULT " + json.dumps({"first": first, "parts": dict(totals)}))


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def _split(name: str) -> tuple[str, dict[str, str]]:
    """``"variant|KEY=VALUE|..."`` -> the e2e variant and the environment its process gets on
    top of this one's (an A/B of a switch in one call: ``"fp8hpf blockwise,fp8hpf
    blockwise|FP8COMPILE_TTIR_MEMO=0"``)."""
    variant, *settings = name.split("|")
    env = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise ValueError(f"variant {name!r}: {setting!r} is not KEY=VALUE; write "
                             "'variant|KEY=VALUE'")
        env[key] = value
    return variant, env


def run(name: str, mode: str, cache: str, profile: str | None = None,
        sample: str | None = None) -> dict:
    variant, settings = _split(name)
    inductor = tempfile.mkdtemp(dir=os.path.dirname(cache))  # empty: nothing to find there
    env = {**os.environ, **settings, "TRITON_CACHE_DIR": cache,
           "TORCHINDUCTOR_CACHE_DIR": inductor, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--child", variant, "--mode", mode]
    cmd += ["--profile", profile] if profile else []
    cmd += ["--sample", sample] if sample else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{name}: no result\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=DEFAULT,
                    help="comma-separated e2e.py variants; 'variant|KEY=VALUE' runs one with "
                         "that environment variable set (an A/B of a switch)")
    ap.add_argument("--mode", default="reduce-overhead", help="torch.compile mode")
    ap.add_argument("--profile-dir", default=None,
                    help="after the timed runs, one more warm run of each variant under "
                         "cProfile (slower; not in the table), its stats written here as "
                         "<variant>.prof; read them with python -m pstats")
    ap.add_argument("--sample-dir", default=None,
                    help="after the timed runs, one more warm run of each variant with its "
                         "main thread's stack sampled every 2 ms (not in the table), written "
                         "to DIR/<variant>.stacks as collapsed stacks; prints the frames whose "
                         "time grew most against bf16 Inductor")
    ap.add_argument("--repeat", type=int, default=1,
                    help="warm runs per variant, the variants taking turns; the table gives "
                         "the median (one process compiles bf16 Inductor in 3.4-5.0 s)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--calibrate", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sample", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.mode, args.profile, args.sample)
        return
    if args.calibrate:
        calibrate(args.calibrate)
        return
    for name in args.variants.split(","):
        _split(name)  # a malformed setting fails here, before any process runs
    import torch
    import triton

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, mode={args.mode}, 2x2048 tokens, one process each")
    names = args.variants.split(",")
    if "bf16 Inductor" not in names:
        names.insert(0, "bf16 Inductor")  # the baseline of the ratios
    with tempfile.TemporaryDirectory() as root:
        # Each variant's Triton cache: empty for its cold run, then found by every later run.
        caches = {name: os.path.join(root, _file_name(name)) for name in names}
        if any("static" in name for name in names):
            # Calibrated once, apart: the variant's process only reads the figures.
            path = os.path.join(root, "calibration.json")
            subprocess.run([sys.executable, __file__, "--calibrate", path], check=True,
                           capture_output=True, timeout=600)
            os.environ["FP8COMPILE_E2E_CALIBRATION"] = path
        times = collections.defaultdict(list)
        for temp in ["cold"] + ["warm"] * max(1, args.repeat):
            for name in names:
                r = run(name, args.mode, caches[name])
                times[temp, name].append(r["first"])
                parts = "; ".join(f"{k} {v[0]:.2f} s ({v[1]}x)" for k, v in r["parts"].items()
                                  if v[1])
                print(f"  {temp:4s} {name:24s} {r['first']:6.2f} s  {parts}", flush=True)
        res = {key: statistics.median(v) for key, v in times.items()}
        if args.profile_dir:
            os.makedirs(args.profile_dir, exist_ok=True)
            for name in names:
                path = os.path.join(args.profile_dir, _file_name(name) + ".prof")
                r = run(name, args.mode, caches[name], path)
                print(f"  warm under cProfile {name:24s} {r['first']:6.2f} s -> {path}",
                      flush=True)
        if args.sample_dir:
            os.makedirs(args.sample_dir, exist_ok=True)
            stacks = {}
            for name in names:
                stacks[name] = os.path.join(args.sample_dir, _file_name(name) + ".stacks")
                r = run(name, args.mode, caches[name], sample=stacks[name])
                print(f"  warm, main thread sampled {name:24s} {r['first']:6.2f} s -> "
                      f"{stacks[name]}", flush=True)
            summarize(stacks)
    warm = "warm s (x bf16)" + (f", median of {args.repeat} [range]" if args.repeat > 1 else "")
    print(f"\nvariant                    cold s (x bf16)    {warm}")
    for name in names:
        cells = []
        for temp in ("cold", "warm"):
            t, ref = res[temp, name], res[temp, "bf16 Inductor"]
            cells.append(f"{t:6.2f} ({t / ref:.2f}x)")
        spread = times["warm", name]
        extra = f" [{min(spread):.2f}-{max(spread):.2f}]" if len(spread) > 1 else ""
        print(f"{name:24s} {cells[0]:>18s} {cells[1]:>18s}{extra}")


if __name__ == "__main__":
    main()
