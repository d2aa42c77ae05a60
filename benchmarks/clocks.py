"""How the prefill step's time depends on the GPU's clock: each timing method, and the clock.

Run on a CUDA machine with ``nvidia-smi``::

    PYTHONUNBUFFERED=1 python benchmarks/clocks.py --out out/

Under sustained FP8 GEMM load an H100/H200 reaches its power limit and lowers its SM clock;
short profiles of a few steps from a cool GPU then sum the kernels to less than
``triton.testing.do_bench`` measures for the same step.  For each variant (``e2e.py``'s
prefill block, 2x2048 tokens, CUDA graphs) this script times the step:

* ``do_bench``: the L2 flush (a 256 MB ``zero_``), then CUDA events around one call;
* the same with a 200 us sleep kernel between the flush and the call, which lets the GPU
  rest and gives the host a head start;
* calls back to back, events around each, with and without a 200 us sleep before each;
* ``steady``: 20 calls back to back; ``GPU``: 20 calls queued behind one sleep kernel;

and the time the host takes to issue one call.  Then it samples the SM clock (``nvidia-smi``,
every 20 ms) while it profiles 10 steps after 1 s idle ("cool"), runs ``do_bench`` and 300
calls back to back, and profiles 10 steps right after them ("hot"): the kernels' sum per
step at each end, and the mean and minimum clock, the top power draw and whether the
software power cap was active in each phase.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import e2e  # noqa: E402

SLEEP_CYCLES_PER_US = 1980  # torch.cuda._sleep counts cycles; ~1 us at the H100/H200 boost


def event_ms(fn, flush=None, sleep_us: float = 0.0, reps: int = 100) -> float:
    """Median ms of ``fn`` between CUDA events, each call after ``flush`` and a sleep."""
    pairs = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        if sleep_us:
            torch.cuda._sleep(int(sleep_us * SLEEP_CYCLES_PER_US))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def kernels_ms(fn, steps: int = 10) -> float:
    """The device kernels' time per step in a profile of ``steps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return sum(ms for ms, _ in e2e.kernel_categories(p.key_averages(), steps).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--variants", default="bf16 Inductor,fp8hpf tensorwise static fast")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    import triton.testing

    os.makedirs(args.out, exist_ok=True)
    torch._inductor.config.force_disable_caches = True
    torch.manual_seed(0)
    base = e2e.Block().cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, 2048, e2e.D, device="cuda", dtype=torch.bfloat16)
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int, device="cuda")
    clocks = e2e.ClockSampler(os.path.join(args.out, "clocks.csv"), period_ms=20)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; prefill 2x2048, CUDA graphs; ms per step")
    phases = []
    with torch.no_grad():
        made = e2e.variants(base, "reduce-overhead")
        for name in args.variants.split(","):
            torch._dynamo.reset()
            fn, _, _ = e2e.build(made[name][0], x, "reduce-overhead")

            def step():
                return fn(x)

            for _ in range(20):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                step()
            host = (time.perf_counter() - t0) / 50 * 1e3
            torch.cuda.synchronize()
            got = {
                "do_bench": triton.testing.do_bench(step, warmup=50, rep=300,
                                                    return_mode="median"),
                "flush, sleep 200 us": event_ms(step, flush, 200),
                "back to back": event_ms(step),
                "sleep 200 us before each": event_ms(step, None, 200),
                "steady (20 back to back)": e2e.steady_ms(step),
                "GPU (20 behind a sleep)": e2e.gpu_and_host_ms(step)[0],
            }
            print(f"== {name}: host {host:.3f} ms to issue a step; " +
                  "; ".join(f"{k} {v:.3f}" for k, v in got.items()), flush=True)
            time.sleep(1.0)
            marks = [(time.time(), "cool profile")]
            cool = kernels_ms(step)
            marks.append((time.time(), "do_bench"))
            db = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")
            marks.append((time.time(), "300 back to back"))
            b2b = event_ms(step, reps=300)
            marks.append((time.time(), "hot profile"))
            hot = kernels_ms(step)
            marks.append((time.time(), "end"))
            print(f"   kernels cool {cool:.3f}, hot {hot:.3f}; do_bench {db:.3f}; "
                  f"back to back {b2b:.3f}", flush=True)
            phases += [(name, label, t0, t1) for (t0, label), (t1, _) in zip(marks, marks[1:])]
            fn = None
    time.sleep(0.1)
    for name, label, t0, t1 in phases:
        got = clocks.samples(t0, t1)
        if not got:
            print(f"{name:32s} {label:18s} no clock samples")
            continue
        mhz = [m for m, _, _ in got]
        print(f"{name:32s} {label:18s} SM {statistics.mean(mhz):6.0f} MHz (min {min(mhz):.0f}),"
              f" up to {max(w for _, w, _ in got):.0f} W, power-capped "
              f"{sum(c for _, _, c in got) / len(got):.0%} of {len(got)} samples")
    clocks.close()


if __name__ == "__main__":
    main()
