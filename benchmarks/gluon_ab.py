"""A/B of the promoted Gluon GEMM (``fp8compile/kernels/blockwise_ws.py``) against another
version of that file, in one process, next to cuBLAS.

Schedule changes to the warp-specialized kernel move its speed by a few percent, about as
much as two timings in different processes differ.  Here each version is imported as a
module of its own (its own JIT cache), and all of them take turns on the same operands:

* each file given by ``--baseline``, named by its stem, e.g. the committed one::

      git show HEAD:fp8compile/kernels/blockwise_ws.py > /tmp/base.py

* ``runN``: this tree's file with ``PROMOTED_RUN`` (K blocks per promoted run) set to N,
  for each N of ``--runs``.

Blockwise (1x128 x 128x128) and precise row and tensor scales, E4M3, bf16 output.  Each
timing is the median of CUDA-graph replays over input sets that exceed the L2, one per
variant in turn, repeated ``--repeat`` times; the table gives the median TFLOP/s and the
ratio to cuBLAS (``F.scaled_mm`` blockwise; ``torch._scaled_mm`` with
``use_fast_accum=False`` for row and tensor).  Every variant's output is compared bit for
bit with the first variant's.  Needs a Hopper GPU::

    python benchmarks/gluon_ab.py --baseline /tmp/base.py --runs 8 16
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

SHAPES = [(4096, 4096, 4096), (4096, 14336, 4096), (4096, 4096, 14336), (8192, 4096, 4096),
          (4096, 12288, 4096), (4096, 28672, 4096), (2048, 4096, 4096)]


def _load(name: str, path: str):
    """``path`` imported as ``fp8compile.kernels.<name>``, so that its relative imports
    resolve as the packaged module's do."""
    spec = importlib.util.spec_from_file_location(f"fp8compile.kernels.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def variants(baselines: list[str], runs: list[int], tmp: str) -> dict:
    src_path = os.path.join(HERE, "..", "fp8compile", "kernels", "blockwise_ws.py")
    src = open(src_path).read()
    mods = {}
    for path in baselines:
        stem = os.path.splitext(os.path.basename(path))[0]
        mods[stem] = _load(f"_ab_{stem}", path)
    for r in runs:
        text, count = re.subn(r"^PROMOTED_RUN = gl\.constexpr\(\d+\)",
                              f"PROMOTED_RUN = gl.constexpr({r})", src, flags=re.M)
        if count != 1:
            raise SystemExit("blockwise_ws.py has no `PROMOTED_RUN = gl.constexpr(N)` line")
        path = os.path.join(tmp, f"run{r}.py")
        with open(path, "w") as f:
            f.write(text)
        mods[f"run{r}"] = _load(f"_ab_run{r}", path)
    return mods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", nargs="*", default=[],
                    help="other versions of blockwise_ws.py to time")
    ap.add_argument("--runs", type=int, nargs="*", default=[8],
                    help="PROMOTED_RUN values of this tree's kernel to time")
    ap.add_argument("--shapes", default=None, help="M,N,K;M,N,K;... (default: LLaMA shapes)")
    ap.add_argument("--repeat", type=int, default=3, help="timings per variant, in turns")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        print("no Hopper GPU: nothing to measure")
        return
    import gemm  # benchmarks/gemm.py: the timing and cuBLAS's blockwise entry point
    import triton

    from fp8compile import kernels as K
    from fp8compile.numerics import Fp8Format
    from fp8compile.numerics import Granularity as G

    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split(",")))
                                             for s in args.shapes.split(";")]
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; TFLOP/s (x cuBLAS), median of {args.repeat}")
    blockwise_cublas, _ = gemm._probe_cublas_blockwise()
    cublas = {"block": blockwise_cublas, "row": gemm.cublas_row(False),
              "tensor": gemm.cublas_tensor(False)}
    recipes = [("block", G.GROUP, G.BLOCK), ("row", G.ROW, G.ROW),
               ("tensor", G.TENSOR, G.TENSOR)]
    with tempfile.TemporaryDirectory() as tmp:
        mods = variants(args.baseline, args.runs, tmp)
        for m, n, k in shapes:
            torch.manual_seed(0)
            nsets = max(1, min(8, -(-3 * gemm.L2_BYTES // (m * k + n * k))))
            x_hp = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    for _ in range(nsets)]
            w_hp = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                    for _ in range(nsets)]
            for name, xg, wg in recipes:
                sets = [(*K.quantize(x, xg, Fp8Format.E4M3, False),
                         *K.quantize(w, wg, Fp8Format.E4M3, False),
                         torch.empty(m, n, device="cuda", dtype=torch.bfloat16))
                        for x, w in zip(x_hp, w_hp)]
                fns = {"cuBLAS": lambda xq, xs, wq, ws, out, f=cublas[name]: f(xq, xs, wq, ws)}
                for label, mod in mods.items():
                    fns[label] = (lambda mod, xg=xg, wg=wg: lambda xq, xs, wq, ws, out:
                                  mod.blockwise_mm(xq, xs, wq, ws, None, out, xg, wg,
                                                   "precise"))(mod)
                outs = {label: f(*sets[0]).clone() for label, f in fns.items() if label in mods}
                first = next(iter(outs.values()))
                equal = all(torch.equal(o, first) for o in outs.values())
                times = {label: [] for label in fns}
                for _ in range(args.repeat):
                    for label, f in fns.items():
                        times[label].append(gemm.bench(f, sets))
                med = {label: statistics.median(t) for label, t in times.items()}
                cells = "  ".join(f"{label} {gemm.tflops(m, n, k, ms):5.0f} "
                                  f"({med['cuBLAS'] / ms:.3f})" for label, ms in med.items())
                print(f"{name:6s} {m}x{n}x{k}: {cells}  outputs bit-equal: {equal}",
                      flush=True)
                del sets


if __name__ == "__main__":
    main()
