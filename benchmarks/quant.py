"""Quantization kernels at the shapes of a LLaMA block's training step, against a copy.

Run on a CUDA machine::

    PYTHONUNBUFFERED=1 python benchmarks/quant.py --out out/

Each kernel runs on a bf16 (or, for ``requantize_t``, FP8) tensor of 4096x4096, 4096x14336
and 14336x4096, as the training step of ``benchmarks/train.py`` quantizes them: activations
in 1x128 groups, per row and per tensor (dynamic, and delayed: a given scale, recording the
amax in the same pass); weights and transposed weights in 128x128 blocks;
the output gradient along both axes at once (``quantize_dual``); and the saved FP8
activation requantized as blocks of its transpose (``requantize_t``).  Each line gives the
median time per call, the bytes the kernel must move per element, the bandwidth that makes,
and the time of ``torch.clone`` moving the same bytes in the same run (``vs copy``: 1.0
would be as fast as a copy).  Times are CUDA-graph replays (``do_bench_cudagraph``), as the
kernels run inside a compiled training step: timed one Python call at a time, a 4096x4096
quantization measures the launcher's host time (~60 us), not the GPU's.  Each replay runs
the kernel over enough copies of the input to exceed the L2 cache three times, so inputs
come from HBM.

``--decode`` times tensorwise quantization at decoding sizes instead (M = 1 and 16 tokens,
K = 4096 and 14336, plain and fused with RMSNorm or SiLU·mul, inputs resident in L2 as a
decode step leaves them) by each route the kernel has for the amax: one launch of one
program holding all of x (up to 65536 elements: 16x14336 takes the next route), two launches
with one amax slot per program, and two launches around a zeroed amax cell (a fill kernel
more).  The routes are forced through the module's
thresholds, so their figures come from one run.

``--prefill`` times the activation quantizations of an inference prefill step instead (4096
tokens of the LLaMA block: per row and in 1x128 groups; plain, fused with RMSNorm, with the
residual add and RMSNorm, and with SiLU·mul reading gate and up as the two halves of one
fused gate_up output), and delayed and static scaling's tensorwise casts of the same
inputs, each at the launcher's launch shape and, with ``--sweep``, at every candidate of
:data:`SWEEP`: the rows per program, columns per tile, columns per program and warps the
launcher would otherwise pick.  ``--grans static,tensor`` keeps those two.

``--tile-warps 4 8 16`` times only the two 128x128-tile kernels (``quantize_dual``,
``requantize_t``) at each of those warp counts (``quant._TILE_WARPS``), in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8compile.numerics import Fp8Format, Granularity  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
G = Granularity


def cases():
    """(name, bytes per element, FP8 input?, callable(one input)) for every kernel; the input
    is a bf16 (M, N) tensor, or for ``requantize_t`` its 1x128-group FP8 ``(q, scale)``."""
    from fp8compile.kernels import quant

    e4, e5 = Fp8Format.E4M3, Fp8Format.E5M2
    amax = torch.tensor(4.48, device="cuda")  # delayed scaling: the amax comes from history
    return [
        ("group 1x128", 3, False, lambda t: quant.quantize(t, G.GROUP, e4, False)),
        ("row", 3, False, lambda t: quant.quantize(t, G.ROW, e4, False)),
        ("row, transposed view", 3, False, lambda t: quant.quantize(t.t(), G.ROW, e4, False)),
        ("tensor (amax + cast)", 5, False, lambda t: quant.quantize(t, G.TENSOR, e4, False)),
        ("tensor, transposed view", 5, False,
         lambda t: quant.quantize(t.t(), G.TENSOR, e4, False)),
        ("tensor, amax given + amax", 3, False,
         lambda t: quant.quantize_from_amax(t, amax, e4)),
        ("block 128x128", 3, False, lambda t: quant.quantize(t, G.BLOCK, e4, False)),
        ("block, transposed view", 3, False,
         lambda t: quant.quantize(t.t(), G.BLOCK, e4, False)),
        ("dual (e5m2, both axes)", 4, False, lambda t: quant.quantize_dual(t, e5, False)),
        ("requantize_t (fp8 in)", 2, True,
         lambda t: quant.requantize_t(*t, G.GROUP, G.BLOCK, e4, False)),
    ]


DECODE_SHAPES = [(1, 4096), (16, 4096), (16, 14336)]
# route -> (quant._WHOLE_AMAX_MAX_ELEMS, quant._AMAX_SLOTS_MAX)
ROUTES = {"one launch": (1 << 16, 1 << 30), "slots": (0, 1 << 30), "zeroed cell": (0, 0)}


def decode(median_us, out: list) -> None:
    """Tensorwise quantization at decode sizes by each amax route (see the module doc)."""
    from fp8compile.kernels import fused, quant

    t = Granularity.TENSOR
    producers = {
        "plain": lambda x, w, u: quant.quantize(x, t, Fp8Format.E4M3, False),
        "rmsnorm": lambda x, w, u: fused.rmsnorm_quantize(x, w, 1e-5, t),
        "silu_mul": lambda x, w, u: fused.silu_mul_quantize(x, u, t),
    }
    saved = quant._WHOLE_AMAX_MAX_ELEMS, quant._AMAX_SLOTS_MAX
    for m, k in DECODE_SHAPES:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(16)]
        ups = [torch.randn_like(x) for x in xs]
        w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        copy_us = median_us(torch.clone, xs)
        for pname, fn in producers.items():
            line = [f"{m:3d}x{k:<6d} {pname:9s}"]
            for route, limits in ROUTES.items():
                quant._WHOLE_AMAX_MAX_ELEMS, quant._AMAX_SLOTS_MAX = limits
                pairs = list(zip(xs, ups))
                us = median_us(lambda p: fn(p[0], w, p[1]), pairs)
                out.append({"shape": [m, k], "producer": pname, "route": route, "us": us,
                            "copy_us": copy_us})
                line.append(f"{route} {us:6.2f} us")
            quant._WHOLE_AMAX_MAX_ELEMS, quant._AMAX_SLOTS_MAX = saved
            print("  ".join(line) + f"  (clone {copy_us:.2f} us)")


PREFILL_TOKENS = 4096
# (granularity, producer) -> candidate launch shapes (BLOCK_M, BLOCK_K, k_per_prog, warps);
# K is the one of the case (None: all of K in one tile, BLOCK_K = next_pow2(K)).
SWEEP = {
    ("row", "none"): [(1, None, None, 4), (1, None, None, 8), (2, None, None, 4),
                      (2, None, None, 8), (4, None, None, 8), (4, None, None, 16),
                      (1, 1024, None, 4), (2, 1024, None, 4), (4, 1024, None, 8)],
    ("row", "rmsnorm"): [(1, None, None, 4), (1, None, None, 8), (2, None, None, 4),
                         (2, None, None, 8), (4, None, None, 8), (4, None, None, 16)],
    ("row", "silu_mul"): [(1, None, None, 4), (1, None, None, 8), (1, None, None, 16),
                          (2, None, None, 16), (1, 2048, None, 4), (1, 4096, None, 8),
                          (2, 2048, None, 8)],
    ("group", "none"): [(16, 128, 128, 4), (32, 128, 128, 4), (64, 128, 128, 4),
                        (32, 128, 512, 4), (16, 128, 1024, 4), (64, 128, 128, 8)],
    ("group", "rmsnorm"): [(1, 128, None, 4), (2, 128, None, 4), (4, 128, None, 4),
                           (8, 128, None, 4), (4, 128, None, 8), (8, 128, None, 8)],
    ("group", "silu_mul"): [(16, 128, 128, 4), (32, 128, 128, 4), (64, 128, 128, 4),
                            (32, 128, 512, 4), (16, 128, 1024, 4), (64, 128, 128, 8)],
    # Delayed and static scaling's tensorwise casts: one tile holds whole rows (16384 wide:
    # 1 row only).
    **{(g, p): [(1, None, None, 4), (1, None, None, 8), (1, None, None, 16),
                (2, None, None, 4), (2, None, None, 8), (2, None, None, 16),
                (4, None, None, 8), (4, None, None, 16)]
       for g in ("tensor", "static") for p in ("none", "rmsnorm", "silu_mul")},
}


def _producer_fn(gran: str, producer: str, k: int):
    """The quantization of one input tensor: ``(m, k)``, or ``(m, 2k)`` holding two inputs
    side by side (SiLU·mul's gate and up, as one gate_up output; RMSNorm's x and residual).
    ``"tensor"`` is delayed scaling's cast (``quantize_history``, its history set),
    ``"static"`` static scaling's (``quantize_static``, one launch with a given scale)."""
    from fp8compile.kernels import fused, quant

    e4 = Fp8Format.E4M3
    w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    if gran == "static":
        scale = torch.tensor([3.0 / 448], device="cuda")

        def fn(t):
            a, b = (t[:, :k], t[:, k:]) if t.shape[1] == 2 * k else (t, None)
            return fused.quantize_static(a, b, w if "rmsnorm" in producer else None, 1e-5,
                                         producer, scale, e4)
        return fn
    if gran == "tensor":
        hist = torch.tensor([3.0, 2.0, 0.0, 0.0], device="cuda")

        def fn(t):
            a, b = (t[:, :k], t[:, k:]) if t.shape[1] == 2 * k else (t, None)
            return fused.quantize_history(a, b, w if "rmsnorm" in producer else None, 1e-5,
                                          producer, hist, e4)
        return fn
    g = Granularity(gran)
    return {
        "none": lambda t: quant.quantize(t, g, e4, False),
        "rmsnorm": lambda t: fused.rmsnorm_quantize(t, w, 1e-5, g, e4),
        "add_rmsnorm": lambda t: fused.rmsnorm_quantize(t[:, :k], w, 1e-5, g, e4,
                                                       residual=t[:, k:]),
        "silu_mul": lambda t: fused.silu_mul_quantize(t[:, :k], t[:, k:], g, e4),
    }[producer]


def prefill(median_us, out: list, sweep: bool,
            grans: tuple[str, ...] = ("row", "group", "tensor", "static")) -> None:
    """The prefill step's activation quantizations (and delayed scaling's tensorwise casts
    of the same inputs), at the launcher's launch shape and (with ``sweep``) at each
    candidate of :data:`SWEEP`."""
    from fp8compile.kernels import quant
    from fp8compile.kernels.tuning import next_pow2

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    m, d, ffn = PREFILL_TOKENS, 4096, 14336
    # (producer, K, bytes moved per element: 2 per bf16 input, 1 per FP8 output)
    cases = [("none", d, 3), ("rmsnorm", d, 3), ("add_rmsnorm", d, 5), ("silu_mul", ffn, 5)]
    for gran in grans:
        for producer, k, bpe in cases:
            sets = -(-3 * l2 // (bpe * m * k))
            width = k if bpe == 3 else 2 * k
            inputs = [torch.randn(m, width, device="cuda", dtype=torch.bfloat16)
                      for _ in range(sets)]
            fn = _producer_fn(gran, producer, k)
            copy_us = median_us(torch.clone, [torch.empty(m, k * bpe // 4, device="cuda",
                                                          dtype=torch.bfloat16)
                                              for _ in range(sets)])
            shapes = [None] + (SWEEP[(gran, producer.replace("add_", ""))] if sweep else [])
            saved = quant._launch_shape
            for shape in shapes:
                if shape is not None:
                    bm, bk, kpp, warps = shape
                    bk = bk or next_pow2(k)
                    forced = (bm, bk, kpp or k, warps)
                    quant._launch_shape = lambda *a, forced=forced, **kw: forced
                try:
                    us = median_us(fn, inputs)
                finally:
                    quant._launch_shape = saved
                label = "launcher" if shape is None else "x".join(
                    "K" if v is None else str(v) for v in shape[:3]) + f" w{shape[3]}"
                out.append({"granularity": gran, "producer": producer, "shape": [m, k],
                            "launch": label, "us": us, "copy_us_same_bytes": copy_us})
                print(f"{gran:6s} {producer:11s} {m}x{k:<6d} {label:18s} {us:7.1f} us  "
                      f"vs copy {copy_us / us:.2f}  ({bpe * m * k / us / 1e6:.2f} TB/s)")


def _with_warps(kernels, warp_counts):
    """The cases as (name, bytes, FP8 input?, fn, warps): all of them at the launchers'
    settings (warps None), or only the 128x128-tile kernels once per warp count."""
    if not warp_counts:
        return [(*k, None) for k in kernels]
    tiled = [k for k in kernels if k[0].startswith(("dual", "requantize_t"))]
    return [(f"{name}, {w} warps", bpe, fp8_in, fn, w)
            for w in warp_counts for name, bpe, fp8_in, fn in tiled]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for quant_bench.json")
    ap.add_argument("--decode", action="store_true",
                    help="tensorwise quantization at decode sizes, by amax route")
    ap.add_argument("--prefill", action="store_true",
                    help="the activation quantizations of an inference prefill step")
    ap.add_argument("--sweep", action="store_true",
                    help="with --prefill: also every candidate launch shape of SWEEP")
    ap.add_argument("--grans", default="row,group,tensor,static",
                    help="with --prefill: the scales to time, comma-separated (tensor: "
                         "delayed scaling's cast; static: static scaling's)")
    ap.add_argument("--tile-warps", type=int, nargs="+", default=None, metavar="W",
                    help="time the 128x128-tile kernels at each of these warp counts")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time (the kernels' CPU tests: pytest tests/kernels)")
        return
    from triton.testing import do_bench_cudagraph

    from fp8compile.kernels import quant

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    tile_warps = dict(quant._TILE_WARPS)

    def median_us(fn, inputs) -> float:
        def run():
            for t in inputs:
                fn(t)

        run()  # compile outside the graph
        return do_bench_cudagraph(run, rep=100, return_mode="median") * 1e3 / len(inputs)

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(json.dumps(info))
    rows = []
    torch.manual_seed(0)
    if args.decode:
        decode(median_us, rows)
    if args.prefill:
        prefill(median_us, rows, args.sweep, tuple(args.grans.split(",")))
    for m, n in [] if args.decode or args.prefill else SHAPES:
        sets = -(-3 * l2 // (2 * m * n))
        xs = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        fp8 = [quant.quantize(x, G.GROUP, Fp8Format.E4M3, False) for x in xs]
        copy_us = median_us(torch.clone, xs)  # reads 2 and writes 2 bytes per element
        for name, bpe, fp8_in, fn, warps in _with_warps(cases(), args.tile_warps):
            if warps:
                quant._TILE_WARPS = {**tile_warps, "quantize_dual": warps,
                                     "requantize_t": warps}
            us = median_us(fn, fp8 if fp8_in else xs)
            quant._TILE_WARPS = tile_warps
            ideal = copy_us * bpe / 4
            row = {"shape": [m, n], "kernel": name, "us": us, "bytes_per_elt": bpe,
                   "tb_s": bpe * m * n / us / 1e6, "copy_us_same_bytes": ideal,
                   "vs_copy": ideal / us}
            rows.append(row)
            print(f"{m:6d}x{n:<6d} {name:26s} {us:8.1f} us  {bpe} B/elt {row['tb_s']:5.2f} TB/s"
                  f"  copy {ideal:6.1f} us  vs copy {row['vs_copy']:.2f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = ("quant_decode.json" if args.decode else
                "quant_prefill.json" if args.prefill else "quant_bench.json")
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
