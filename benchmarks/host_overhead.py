"""Host time per call spent on the FP8 weight caches' graph inputs, for a model of many blocks.

An inference graph compiled by fp8compile takes each cached FP8 weight (and its scales) as an
extra input; before every call the weights' storage and version are checked, so that a
changed parameter is requantized.  At decode sizes a step's GPU work is short and this host
work adds to it.  This times that work alone for ``--layers`` LLaMA-like blocks (e2e.py's
``Block``: fused q/k/v, o, fused gate/up, down: 7 weights and 4 caches a block):

* ``per cache``: every cache checks its own weights (storage pointer, shape, dtype, device
  and version), then hands over its tensors;
* ``one pass``: what a compiled graph runs (``backend._with_extra_inputs``): one
  ``(data_ptr, _version)`` pass over all cached weights, and the last call's tensors while
  none changed.

The graph is traced and planned by fp8compile as usual; Inductor is left out (the compiled
function is the planned FX graph, never called while timing), so this runs in a minute on a
CPU.  Small dimensions: the host work does not depend on them.

    python benchmarks/host_overhead.py --layers 32
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import timeit

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e import Block  # noqa: E402

import fp8compile  # noqa: E402

fb = importlib.import_module("fp8compile.backend")  # the module (the package's
# ``backend`` is the function)


def capture(layers: int, d: int, recipe: str):
    """(providers, runtime args) of the compiled ``layers``-block model's graph."""
    model = nn.Sequential(*[Block(d, 4, 2 * d) for _ in range(layers)])
    seen = {}
    real = fb._with_extra_inputs

    def record(compiled, providers):
        run = real(compiled, providers)

        def spy(*args):
            seen.setdefault("args", args)
            return run(*args)

        seen["providers"] = providers
        return spy

    fb._with_extra_inputs = record
    inductor = fb.Fp8Backend._inductor
    fb.Fp8Backend._inductor = lambda self, gm, inputs, plan: gm.forward
    try:
        be = fp8compile.backend({"recipe": recipe})
        with torch.no_grad():
            torch.compile(model, backend=be)(torch.randn(1, 1, d))
    finally:
        fb._with_extra_inputs, fb.Fp8Backend._inductor = real, inductor
    return seen["providers"], seen["args"], be


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--recipe", default="blockwise")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {args.recipe}, d={args.d}; us per call, best of 5 "
          "runs of 2000 calls")
    for layers in args.layers:
        providers, call_args, be = capture(layers, args.d, args.recipe)
        caches = be.contexts[-1].weight_caches
        weights = sum(len(c.indices) for c in caches)
        one_pass = fb._with_extra_inputs(lambda *a: None, providers)

        def per_cache():
            return [p(call_args) for p in providers]

        times = {}
        for name, fn in (("per cache", per_cache), ("one pass", lambda: one_pass(*call_args))):
            fn()
            times[name] = min(timeit.repeat(fn, number=2000, repeat=5)) / 2000 * 1e6
        print(f"{layers:>3} blocks, {len(caches):>3} caches, {weights:>3} weights: per cache "
              f"{times['per cache']:7.1f} us, one pass {times['one pass']:6.1f} us "
              f"({times['per cache'] / times['one pass']:.1f}x less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
