"""FP8 GEMM benchmark on LLaMA shapes: fp8compile's Triton kernels vs cuBLAS and torchao.

``ours`` is what ``fp8compile.kernels.scaled_mm`` runs: the faster of cuBLAS and our kernel
for that shape (``kernels/select.py``).  For every recipe and accumulation, ``glu`` forces
our kernel (``FP8COMPILE_GEMM_BACKEND=triton``), which at M > 256 on Hopper is the
warp-specialized Gluon kernel (``kernels/blockwise_ws.py``), and ``trit`` the Triton kernel
it replaces (``FP8COMPILE_GLUON=0`` as well).

Run on a CUDA machine (Hopper for FP8)::

    PYTHONUNBUFFERED=1 python benchmarks/gemm.py --check --out out/

``--check`` first runs the kernel tests on the GPU (bit-exact quantization and casts vs
numerics, every recipe vs the reference, odd shapes) and a few large-shape checks.  Timings
are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``) so that Python
launch overhead does not hide the decode shapes; each graph runs the op over several input
sets that together exceed L2 (50 MB on H100), so repeated runs do not read from cache.
``--splits --m 1 16`` times only the Triton kernel's split-K choices at decode sizes,
``--tiles --m 16`` sweeps its whole tile configs there, ``--variants --m 16 32 64 128
256`` its small-M tiles with and without swapped operands, and ``--decode --m 1 2 4 8``
the decode Gluon kernel against the launcher without it (``--max-m 16`` to time it past
the sizes it takes).
Errors are ``‖y − ref‖ / ‖ref‖`` with ``ref`` the fp32 product of the dequantized operands
(``acc err``: accumulation + output rounding, the GEMM's own error) and, for the blockwise
recipe, of the original bf16 operands (``total``: quantization included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fp8compile import numerics as nx  # noqa: E402
from fp8compile.numerics import Fp8Format, Granularity  # noqa: E402

G = Granularity
NK = [(4096, 4096), (14336, 4096), (4096, 14336)]
MS = [1, 16, 128, 2048, 8192]
# the recipes the small-M sweeps time: name -> (x granularity, w granularity, accumulation)
RECIPES = {"blockwise": (G.GROUP, G.BLOCK, "precise"), "row fast": (G.ROW, G.ROW, "fast"),
           "row precise": (G.ROW, G.ROW, "precise"), "tensor fast": (G.TENSOR, G.TENSOR, "fast")}
L2_BYTES = 50 * 2**20


def log(*a):
    print(*a, flush=True)


def rel_err(y, ref):
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm())


# --------------------------------------------------------------------------------------
# baselines


def _probe_cublas_blockwise():
    """Return f(xq, xs, wq, ws) -> bf16 through cuBLAS 1x128 x 128x128, or (None, why)."""
    st = getattr(F, "ScalingType", None)
    if hasattr(F, "scaled_mm") and st is not None:
        def f(xq, xs, wq, ws):
            return F.scaled_mm(xq, wq.t(), xs, st.BlockWise1x128, ws.t(), st.BlockWise128x128,
                               output_dtype=torch.bfloat16)
        return f, "torch.nn.functional.scaled_mm(BlockWise1x128, BlockWise128x128)"

    def g(xq, xs, wq, ws):
        return torch._scaled_mm(xq, wq.t(), xs, ws.t(), out_dtype=torch.bfloat16)
    return g, "torch._scaled_mm with 1x128 / 128x128 scale shapes"


def cublas_tensor(fast: bool):
    """f(xq, xs, wq, ws) -> bf16 through cuBLAS with tensorwise scales (``use_fast_accum``)."""
    return lambda xq, xs, wq, ws: torch._scaled_mm(
        xq, wq.t(), xs, ws, out_dtype=torch.bfloat16, use_fast_accum=fast)


def cublas_row(fast: bool):
    """f(xq, xs, wq, ws) -> bf16 through cuBLAS with rowwise scales (``use_fast_accum``)."""
    return lambda xq, xs, wq, ws: torch._scaled_mm(
        xq, wq.t(), xs, ws.t(), out_dtype=torch.bfloat16, use_fast_accum=fast)


def _probe_torchao():
    try:
        import torchao
        from torchao.prototype.blockwise_fp8_training.kernels import (
            triton_fp8_blockwise_act_quant_lhs,
            triton_fp8_gemm_1x128_128x128,
        )
    except Exception as e:  # noqa: BLE001
        return None, f"torchao not importable: {type(e).__name__}: {e}"

    def gemm(xq, xs, wq, ws):
        return triton_fp8_gemm_1x128_128x128(xq, wq.t(), xs, ws.t(), out_dtype=torch.bfloat16)

    def quant_gemm(x, wq, ws):
        xq, xs = triton_fp8_blockwise_act_quant_lhs(x)
        return gemm(xq, xs, wq, ws)

    return (gemm, quant_gemm), f"torchao {torchao.__version__} blockwise_fp8_training Triton"


# --------------------------------------------------------------------------------------
# timing


def bench(fn, sets):
    """Median ms of one call, from CUDA-graph replays of fn over every input set."""
    import triton.testing

    def run_all():
        for s in sets:
            fn(*s)

    run_all()  # compile / autotune outside the graph
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(run_all, rep=40, return_mode="median")
    return ms / len(sets)


def tflops(m, n, k, ms):
    return 2 * m * n * k / ms / 1e9


# --------------------------------------------------------------------------------------
# correctness on the GPU


def run_checks(out_dir):
    from fp8compile import kernels as K
    from fp8compile.ops import scaled_mm_reference

    ok = True
    log("== kernel tests on the GPU (tests/kernels, compiled, exact casts included)")
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-x", "-p", "no:cacheprovider"]
    try:
        import xdist  # noqa: F401
        cmd += ["-n", "8"]
    except ImportError:
        pass
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    with open(os.path.join(out_dir, "pytest_gpu.log"), "w") as f:
        f.write(r.stdout + r.stderr)
    log(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-2000:],
        f"({time.time() - t:.0f} s)")
    ok &= r.returncode == 0

    log("== large-shape checks")
    torch.manual_seed(1)
    for m, n, k in [(2048, 4096, 4096), (1000, 1000, 1000), (3, 14336, 4096)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
        x[0, 1] = float("nan")
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for xg, wg in [(G.GROUP, G.BLOCK), (G.ROW, G.ROW), (G.TENSOR, G.TENSOR)]:
            for fmt in Fp8Format:
                got = K.quantize(x, xg, fmt, False)
                want = [t.cuda() for t in nx.quantize(x.cpu(), xg, fmt, False)]  # IEEE a/fmax
                same = torch.equal(got[1], want[1]) and torch.equal(
                    got[0].view(torch.uint8), want[0].view(torch.uint8))
                ok &= same
                if not same:
                    log(f"  quantize {m}x{k} {xg} {fmt}: NOT bit-exact")
            xq, xs = K.quantize(x.nan_to_num(), xg, Fp8Format.E4M3, False)
            wq, ws = K.quantize(w, wg, Fp8Format.E4M3, False)
            wb = [t.cuda() for t in nx.quantize(w.cpu(), wg)]
            ok &= torch.equal(wq.view(torch.uint8), wb[0].view(torch.uint8))
            ok &= torch.equal(ws, wb[1])
            bias = torch.randn(n, device="cuda")
            res = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            ref = scaled_mm_reference(xq, xs, xg, wq, ws, wg, bias, torch.float32, "gelu", res)
            for acc in ("precise", "fast"):
                y = K.scaled_mm(xq, xs, xg, wq, ws, wg, bias, torch.bfloat16, acc, "gelu", res)
                e = rel_err(y, ref)
                good = e < (6e-3 if acc == "precise" else 3e-2)
                ok &= good
                log(f"  {m}x{n}x{k} {xg}x{wg} {acc:7s} gelu+bias+res bf16: rel err {e:.2e}"
                    f" {'ok' if good else 'FAIL'}")
    log("CHECKS", "PASS" if ok else "FAIL")
    return ok


# --------------------------------------------------------------------------------------
# benchmark


def run_bench(out_dir, shapes):

    from fp8compile import kernels as K

    torch.backends.cuda.matmul.allow_tf32 = False
    blk_fn, blk_name = _probe_cublas_blockwise()
    ao, ao_name = _probe_torchao()
    log(f"cuBLAS blockwise via: {blk_name}")
    log(f"torchao: {ao_name}")
    rows = []
    for (n, k) in NK:
        for m in shapes:
            torch.manual_seed(0)
            per_set = m * k * 2 + n * k * 2
            nsets = max(1, min(8, math.ceil(3 * L2_BYTES / per_set)))
            xs_hp = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(nsets)]
            ws_hp = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                     for _ in range(nsets)]
            q = {}
            for name, xg, wg in [("block", G.GROUP, G.BLOCK), ("row", G.ROW, G.ROW),
                                 ("tensor", G.TENSOR, G.TENSOR)]:
                q[name] = _fp8_sets(xs_hp, ws_hp, xg, wg)
            r = {"M": m, "N": n, "K": k, "sets": nsets}
            t, err = {}, {}

            def ours(xg, wg, acc):
                return lambda xq, xs, wq, ws: K.scaled_mm(
                    xq, xs, xg, wq, ws, wg, None, torch.bfloat16, acc, "none", None)

            def ours_q(xg, wg, acc):
                def f(x, wq, ws):
                    xq, xs = K.quantize(x, xg, Fp8Format.E4M3, False)
                    return K.scaled_mm(xq, xs, xg, wq, ws, wg, None, torch.bfloat16, acc,
                                       "none", None)
                return f

            def with_env(fn, **env):  # a kernel forced by fp8compile's switches
                def f(*a):
                    old = {key: os.environ.get(key) for key in env}
                    os.environ.update(env)
                    try:
                        return fn(*a)
                    finally:
                        for key, v in old.items():
                            if v is None:
                                del os.environ[key]
                            else:
                                os.environ[key] = v
                return f

            def forced(xg, wg, acc, gluon):  # our kernel alone: the Gluon or the Triton one
                env = {"FP8COMPILE_GEMM_BACKEND": "triton"}
                if not gluon:
                    env["FP8COMPILE_GLUON"] = "0"
                return with_env(ours(xg, wg, acc), **env)

            plan = [
                ("bf16", lambda x, w: F.linear(x, w), "hp", None),
                ("cublas_block", blk_fn, "block", None),
                ("ours_block", ours(G.GROUP, G.BLOCK, "precise"), "block", None),
                ("gluon_block", forced(G.GROUP, G.BLOCK, "precise", True), "block", None),
                ("triton_block", forced(G.GROUP, G.BLOCK, "precise", False), "block", None),
                ("cublas_row_fast", cublas_row(True), "row", None),
                ("ours_row_fast", ours(G.ROW, G.ROW, "fast"), "row", None),
                ("gluon_row_fast", forced(G.ROW, G.ROW, "fast", True), "row", None),
                ("triton_row_fast", forced(G.ROW, G.ROW, "fast", False), "row", None),
                ("cublas_row_precise", cublas_row(False), "row", None),
                ("ours_row_precise", ours(G.ROW, G.ROW, "precise"), "row", None),
                ("gluon_row_precise", forced(G.ROW, G.ROW, "precise", True), "row", None),
                ("triton_row_precise", forced(G.ROW, G.ROW, "precise", False), "row", None),
                ("cublas_tensor_fast", cublas_tensor(True), "tensor", None),
                ("ours_tensor_fast", ours(G.TENSOR, G.TENSOR, "fast"), "tensor", None),
                ("gluon_tensor_fast", forced(G.TENSOR, G.TENSOR, "fast", True), "tensor", None),
                ("triton_tensor_fast", forced(G.TENSOR, G.TENSOR, "fast", False), "tensor", None),
                ("cublas_tensor_precise", cublas_tensor(False), "tensor", None),
                ("ours_tensor_precise", ours(G.TENSOR, G.TENSOR, "precise"), "tensor", None),
                ("gluon_tensor_precise", forced(G.TENSOR, G.TENSOR, "precise", True),
                 "tensor", None),
                ("triton_tensor_precise", forced(G.TENSOR, G.TENSOR, "precise", False),
                 "tensor", None),
                ("ours_q+block", ours_q(G.GROUP, G.BLOCK, "precise"), "hpq", "block"),
                ("ours_q+row_fast", ours_q(G.ROW, G.ROW, "fast"), "hpq", "row"),
                ("ours_q+tensor_fast", ours_q(G.TENSOR, G.TENSOR, "fast"), "hpq", "tensor"),
            ]
            if ao is not None:
                plan += [("torchao_block", ao[0], "block", None),
                         ("torchao_q+block", ao[1], "hpq", "block")]
            refs = {}
            for name, (xq, xs, wq, ws) in ((nm, v[0]) for nm, v in q.items()):
                xg = {"block": G.GROUP, "row": G.ROW, "tensor": G.TENSOR}[name]
                wg = {"block": G.BLOCK, "row": G.ROW, "tensor": G.TENSOR}[name]
                refs[name] = (nx.dequantize(xq, xs, xg) @ nx.dequantize(wq, ws, wg).t())
            ref_hp = xs_hp[0].float() @ ws_hp[0].float().t()
            for name, fn, kind, recipe in plan:
                if fn is None:
                    continue
                if kind == "hp":
                    sets = list(zip(xs_hp, ws_hp))
                elif kind == "hpq":
                    sets = [(x, qq[2], qq[3]) for x, qq in zip(xs_hp, q[recipe])]
                else:
                    sets = q[kind]
                try:
                    y = fn(*sets[0])
                    ms = bench(fn, sets)
                except Exception as e:  # noqa: BLE001
                    log(f"  {name} {m}x{n}x{k}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                t[name] = ms
                if kind in ("hp",):
                    err[name] = rel_err(y, ref_hp)
                else:
                    err[name] = rel_err(y, refs[recipe or kind])
                    if (recipe or kind) == "block":
                        err[name + "_total"] = rel_err(y, ref_hp)
            r["ms"], r["err"] = t, err
            r["tflops"] = {key: tflops(m, n, k, v) for key, v in t.items()}
            rows.append(r)
            _dump(out_dir, rows, blk_name, ao_name)  # after every shape: a timeout keeps them
            log(f"{m:>5} {n:>5} {k:>5} " + " ".join(
                f"{key}={r['tflops'][key]:.0f}" for key in t))
            del xs_hp, ws_hp, q, refs
            torch.cuda.empty_cache()
    return rows


def run_quant_bench(out_dir):
    """Bandwidth of the quantization kernels and the fused producers at 8192 x 4096 bf16."""
    from fp8compile import kernels as K

    m, k = 8192, 4096
    sets = [(torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
             torch.randn(m, k, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
    w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    e4 = Fp8Format.E4M3

    def rms(x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w).to(x.dtype)

    cases = [(f"quantize {g.value}", lambda x, u, g=g: K.quantize(x, g, e4, False), 3)
             for g in (G.TENSOR, G.ROW, G.GROUP)]
    cases += [
        ("rmsnorm+quant fused (group)",
         lambda x, u: K.rmsnorm_quantize(x, w, 1e-6, G.GROUP, e4, False), 3),
        ("rmsnorm eager bf16 + quantize (group)",
         lambda x, u: K.quantize(rms(x), G.GROUP, e4, False), 3),
        ("silu*mul+quant fused (group)",
         lambda x, u: K.silu_mul_quantize(x, u, G.GROUP, e4, False), 5),
        ("silu*mul eager bf16 + quantize (group)",
         lambda x, u: K.quantize(F.silu(x) * u, G.GROUP, e4, False), 5),
    ]
    out = {}
    log(f"\nquantization, {m}x{k} bf16 in (bytes counted: fused minimum, 2 B in + 1 B out "
        "per element, x2 inputs for silu*mul)")
    for name, fn, bpe in cases:
        ms = bench(fn, sets)
        out[name] = ms
        log(f"  {name:42s} {ms * 1e3:7.1f} us  {bpe * m * k / ms / 1e9:6.2f} TB/s")
    with open(os.path.join(out_dir, "quant_bench.json"), "w") as f:
        json.dump(out, f, indent=1)


def _dump(out_dir, rows, blk_name, ao_name):
    import triton

    with open(os.path.join(out_dir, "gemm_bench.json"), "w") as f:
        json.dump({"rows": rows, "cublas_block": blk_name, "torchao": ao_name,
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__,
                   "tuned": {str(key): str(cfg) for key, cfg in _tuned_cache().items()}},
                  f, indent=1)


def _tuned_cache():
    from fp8compile.kernels import gemm

    return getattr(gemm._tuned, "cache", {})


def _ratio(t, a, b):
    return t[b] / t[a] if a in t and b in t else float("nan")


def print_tables(rows):
    log("\nTFLOP/s (median, CUDA-graph replay, bf16 out); "
        "x = speedup of ours over the baseline (time ratio)")
    hdr = ("   M     N     K | bf16 | blk cuBL  ours   glu  trit  ao |  row fast cuBL ours"
           " | row prec cuBL ours | tens fast cuBL ours | q+blk q+row | xblk xrow xtns"
           " | q+blk/bf16 q+row/bf16 "
           "| err blk glu/cuBL")
    log(hdr)
    for r in rows:
        f, t, e = r["tflops"], r["ms"], r["err"]

        def g(key):
            return f"{f[key]:5.0f}" if key in f else "    -"
        eb = e.get("gluon_block", float("nan")) / e.get("cublas_block", float("nan"))
        log(f"{r['M']:>5} {r['N']:>5} {r['K']:>5} |{g('bf16')} | {g('cublas_block')} "
            f"{g('ours_block')} {g('gluon_block')} {g('triton_block')} {g('torchao_block')} |"
            "       "
            f"{g('cublas_row_fast')} "
            f"{g('ours_row_fast')} |      {g('cublas_row_precise')} {g('ours_row_precise')} |"
            f"       {g('cublas_tensor_fast')} {g('ours_tensor_fast')} | {g('ours_q+block')} "
            f"{g('ours_q+row_fast')} | {_ratio(t, 'gluon_block', 'cublas_block'):4.2f} "
            f"{_ratio(t, 'ours_row_fast', 'cublas_row_fast'):4.2f} "
            f"{_ratio(t, 'ours_tensor_fast', 'cublas_tensor_fast'):4.2f} | "
            f"{_ratio(t, 'ours_q+block', 'bf16'):10.2f} "
            f"{_ratio(t, 'ours_q+row_fast', 'bf16'):10.2f}"
            f" | {e.get('gluon_block', float('nan')):.1e}/{e.get('cublas_block', float('nan')):.1e}"
            f"={eb:.2f}")
    for acc, title in (("precise", "Precise (promoted) accumulation"),
                       ("fast", "Fast accumulation (one tensor-core accumulator)")):
        log(f"\n{title}, TFLOP/s: cuBLAS (use_fast_accum={acc == 'fast'}), the Gluon kernel "
            "(glu) and the Triton kernel (trit); x = glu over cuBLAS (time ratio)")
        log("   M     N     K |  row cuBL   glu  trit     x | tens cuBL   glu  trit     x")
        for r in rows:
            f, t = r["tflops"], r["ms"]

            def g(key):
                return f"{f[key]:5.0f}" if key in f else "    -"
            cells = []
            for recipe in ("row", "tensor"):
                names = [f"{who}_{recipe}_{acc}" for who in ("cublas", "gluon", "triton")]
                cells.append(" ".join(g(name) for name in names)
                             + f" {_ratio(t, names[1], names[0]):5.2f}")
            log(f"{r['M']:>5} {r['N']:>5} {r['K']:>5} |      {cells[0]} |      {cells[1]}")


def _decode_operands(m, n, k):
    """bf16 operand sets of one decode-sized GEMM that together exceed L2, and bf16's ms."""
    torch.manual_seed(0)
    nsets = max(1, min(8, math.ceil(3 * L2_BYTES / (n * k))))
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(nsets)]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(nsets)]
    return xs, ws, bench(lambda x, w: F.linear(x, w), list(zip(xs, ws)))


def _fp8_sets(xs, ws, xg, wg):
    """``(xq, xs, wq, ws)`` of each bf16 operand pair, E4M3, by fp8compile's quantization."""
    from fp8compile import kernels as K

    return [(*K.quantize(x, xg, Fp8Format.E4M3, False), *K.quantize(w, wg, Fp8Format.E4M3, False))
            for x, w in zip(xs, ws)]


def _launcher_split(m, n, k, xg, wg):
    """The split of K the Triton launcher picks for a decode-sized M x N x K GEMM."""
    from fp8compile.kernels import tuning
    from fp8compile.kernels.gemm import launch_split
    from fp8compile.kernels.quant import GRAN_CODE

    blockwise = tuning.blockwise_scales(GRAN_CODE[xg], GRAN_CODE[wg])
    device = torch.device("cuda")
    tile = tuning.small_tile(tuning.m_bucket(m), blockwise, n, k, tuning.num_sms(device))
    return launch_split(m, n, k, *tile, xg, wg, device)


def run_splits(shapes, splits=(1, 2, 4, 8, 16)):
    """Decode-sized GEMMs on the Triton kernel at each split of K (``config={"SPLIT_K": s}``,
    the tile autotuned per split) against the launcher's own split (``*``) and bf16."""
    from fp8compile.kernels import tuning
    from fp8compile.kernels.gemm import scaled_mm as triton_mm

    log("\nSplit-K on the Triton kernel, us per GEMM (CUDA-graph replays, L2-exceeding "
        "operand sets); * = the launcher's split")
    for (n, k) in NK:
        for m in shapes:
            if tuning.m_bucket(m) not in tuning.SMALL_TILES:
                continue
            xs, ws, t_bf = _decode_operands(m, n, k)
            for name in ("blockwise", "row fast", "row precise"):
                xg, wg, acc = RECIPES[name]
                sets = _fp8_sets(xs, ws, xg, wg)
                mine = _launcher_split(m, n, k, xg, wg)
                cells = []
                for split in splits:
                    if split > 1 and k // split < 256:
                        continue

                    def f(xq, xs_, wq, ws_, split=split):
                        return triton_mm(xq, xs_, xg, wq, ws_, wg, None, torch.bfloat16, acc,
                                         config={"SPLIT_K": split})
                    t = bench(f, sets)
                    cells.append(f"{split}{'*' if split == mine else ' '} {t * 1e3:6.1f}")
                log(f"  {m:>3}x{n}x{k} bf16 {t_bf * 1e3:6.1f} | {name:11s} | " + " | ".join(cells))


def run_fold(shapes):
    """Decode-sized GEMMs on the Triton kernel with the split-K sum folded into the GEMM (the
    last program of each tile adds the partials) against the two-kernel split (a second
    launch adds them), at the launcher's own split and tile; bf16 alongside."""
    from fp8compile.kernels import gemm, tuning
    from fp8compile.kernels.gemm import scaled_mm as triton_mm

    log("\nSplit-K summed in the GEMM (fold) or by a second kernel, us per GEMM (CUDA-graph "
        "replays, L2-exceeding operand sets)")
    for (n, k) in NK:
        for m in shapes:
            if tuning.m_bucket(m) not in tuning.SMALL_TILES:
                continue
            xs, ws, t_bf = _decode_operands(m, n, k)
            cells = []
            for name, (xg, wg, acc) in RECIPES.items():
                sets = _fp8_sets(xs, ws, xg, wg)
                split = _launcher_split(m, n, k, xg, wg)
                t = {}
                for fold in (False, True):
                    gemm.FOLD_SPLIT = fold
                    t[fold] = bench(lambda a, sa, b, sb: triton_mm(
                        a, sa, xg, b, sb, wg, None, torch.bfloat16, acc), sets)
                gemm.FOLD_SPLIT = True
                cells.append(f"{name} split {split}: {t[False] * 1e3:5.1f} -> "
                             f"{t[True] * 1e3:5.1f} ({t_bf / t[True]:.2f}x bf16)")
            log(f"  {m:>3}x{n}x{k} bf16 {t_bf * 1e3:5.1f} | " + " | ".join(cells))


def run_decode(shapes, max_m=None, splits=()):
    """Decode-sized GEMMs through the launcher with the TMA-streamed Gluon kernel
    (``kernels/decode_ws.py``) against the launcher without it (``gluon=False``: the Triton
    kernel, or at one row the CUDA-core kernel) and bf16; ``max_m`` raises the kernel's
    ``MAX_M`` for this run, to time it where the launcher does not take it.  The weights
    whose 64-row tiles leave SMs idle split K (``decode_ws.launch_split``); ``splits`` also
    times the kernel itself at each of these splits on them (``s<split>``)."""
    from fp8compile.kernels import decode_ws, tuning
    from fp8compile.kernels.gemm import scaled_mm as triton_mm

    os.environ["FP8COMPILE_DECODE_GLUON"] = "1"  # timed here even where the caller turned it off
    if max_m is not None:
        decode_ws.MAX_M = max_m
    sms = tuning.num_sms(torch.device("cuda"))
    log(f"\nDecode GEMMs, Gluon (TMA) kernel against the launcher without it, us per GEMM "
        f"(CUDA-graph replays, L2-exceeding operand sets); MAX_M={decode_ws.MAX_M}; "
        "L = launcher without the kernel, G = with it (its split in brackets)")
    # the weights whose 64-row tiles fill the SMs (no split): 14336x4096 and a LLaMA-8B
    # block's fused q/k/v and gate/up projections; then the narrow ones, which split K
    for (n, k) in [(14336, 4096), (12288, 4096), (28672, 4096), (4096, 4096), (4096, 14336)]:
        for m in shapes:
            if m > decode_ws.MAX_M:
                continue
            xs, ws, t_bf = _decode_operands(m, n, k)
            rule = decode_ws.launch_split(n, k, sms)
            cells = []
            for name, (xg, wg, acc) in RECIPES.items():
                sets = _fp8_sets(xs, ws, xg, wg)
                t = {}
                for gluon in (False, True):
                    t[gluon] = bench(lambda a, sa, b, sb, gluon=gluon: triton_mm(
                        a, sa, xg, b, sb, wg, None, torch.bfloat16, acc, gluon=gluon), sets)
                ref = triton_mm(*sets[0][:2], xg, *sets[0][2:], wg, None, torch.float32, acc,
                                gluon=False)
                err = rel_err(triton_mm(*sets[0][:2], xg, *sets[0][2:], wg, None,
                                        torch.float32, acc), ref)
                cell = (f"{name} L {t[False] * 1e3:5.1f} G[{rule}] {t[True] * 1e3:5.1f} "
                        f"({t_bf / t[False]:.2f}x -> {t_bf / t[True]:.2f}x bf16"
                        f"{', err vs Triton %.0e' % err if err > 1e-3 else ''})")
                if rule > 1:
                    for split in splits:
                        def direct(a, sa, b, sb, split=split):
                            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                            return decode_ws.decode_mm(a, sa, b, sb, None, out, xg, wg, acc,
                                                       split=split)
                        cell += f" s{split} {bench(direct, sets) * 1e3:5.1f}"
                cells.append(cell)
            log(f"  {m:>2}x{n}x{k} bf16 {t_bf * 1e3:5.1f} | " + " | ".join(cells))


def _decode_cases(shapes, largest=16, recipes=("blockwise", "row fast")):
    """For each LLaMA shape at the M of ``shapes`` whose bucket is at most ``largest``, and
    each of ``recipes`` (keys of :data:`RECIPES`): the FP8 operand sets, the launcher's time,
    an fp32 product to check configs against, and bf16's time (logged with the 1.5x line)."""
    from fp8compile.kernels import tuning
    from fp8compile.kernels.gemm import scaled_mm as triton_mm

    for (n, k) in NK:
        for m in shapes:
            if tuning.m_bucket(m) > largest:
                continue
            xs, ws, t_bf = _decode_operands(m, n, k)
            log(f"  {m}x{n}x{k}: bf16 {t_bf * 1e3:.1f} us (1.5x bf16: {t_bf * 1e3 / 1.5:.1f})")
            for name in recipes:
                xg, wg, acc = RECIPES[name]
                sets = _fp8_sets(xs, ws, xg, wg)
                t_now = bench(lambda a, sa, b, sb, xg=xg, wg=wg, acc=acc: triton_mm(
                    a, sa, xg, b, sb, wg, None, torch.bfloat16, acc), sets)
                ref = triton_mm(*sets[0][:2], xg, *sets[0][2:], wg, None, torch.float32, acc)
                yield (m, n, k), t_bf, (name, xg, wg, acc), sets, t_now, ref


def _time_config(cfg, sets, recipe, ref):
    """ms of the Triton kernel forced to ``cfg``, or None (said why) when the config does not
    run on this GPU or disagrees with the launcher's product."""
    from fp8compile.kernels.gemm import scaled_mm as triton_mm

    _, xg, wg, acc = recipe

    def f(a, sa, b, sb):
        return triton_mm(a, sa, xg, b, sb, wg, None, torch.bfloat16, acc, config=cfg)
    try:
        err = rel_err(f(*sets[0]), ref)
        t = bench(f, sets)
    except Exception as e:  # noqa: BLE001
        log(f"      {cfg}: {type(e).__name__}: {str(e)[:100]}")
        return None
    if err > 1e-2:
        log(f"      {cfg}: relative error {err:.1e} against the launcher")
        return None
    return t


def run_tiles(shapes):
    """Decode-sized GEMMs on the Triton kernel over a sweep of whole tile configs (BLOCK_N,
    BLOCK_K, stages, warps, split of K; BLOCK_M = 16) against the launcher's own choice and
    bf16; also the split-K reduction kernel alone at the launcher's split."""
    import itertools

    from fp8compile.kernels.gemm import _splitk_epilogue_kernel

    log("\nTile sweep of the Triton kernel at decode sizes, us per GEMM (CUDA-graph replays, "
        "L2-exceeding operand sets); the five fastest configs and the fastest without split")
    for (m, n, k), t_bf, recipe, sets, t_now, ref in _decode_cases(shapes):
        name, xg, wg, _ = recipe
        found = []
        bks = (128,) if name == "blockwise" else (128, 256)
        for bn, bk, stages, warps, split in itertools.product(
                (16, 32, 64), bks, (4, 6), (2, 4), (1, 2, 4, 8)):
            if k // split < 512 or (bn == 64 and warps == 2):
                continue
            cfg = {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                   "num_warps": warps, "num_stages": stages, "SPLIT_K": split}
            t = _time_config(cfg, sets, recipe, ref)
            if t is not None:
                found.append((t, f"BN {bn} BK {bk} stages {stages} warps {warps} split {split}"))
        found.sort()
        split = _launcher_split(m, n, k, xg, wg)
        log(f"    {name}: launcher {t_now * 1e3:.1f} us ({t_bf / t_now:.2f}x bf16, "
            f"split {split})")
        for t, what in found[:5]:
            log(f"      {t * 1e3:6.1f} us ({t_bf / t:.2f}x)  {what}")
        t1 = next(((t, w) for t, w in found if w.endswith("split 1")), None)
        if t1:
            log(f"      no split: {t1[0] * 1e3:.1f} us  {t1[1]}")
        if split > 1:
            part = torch.randn(split, m, n, device="cuda")
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

            def reduce(p, o, split=split, m=m, n=n):
                _splitk_epilogue_kernel[(math.ceil(m / 16), math.ceil(n / 128))](
                    p, o, o, o, m, n, m * n, 0, 0, n, 1, SPLIT_K=split,
                    HAS_BIAS=False, ACTIVATION=0, HAS_RES=False, BLOCK_M=16,
                    BLOCK_N=128, num_warps=4)
            log(f"      the split-K reduction alone: "
                f"{bench(reduce, [(part, out)]) * 1e3:.1f} us")


def _variant_tiles(bucket):
    """``(BLOCK_M, BLOCK_N, warps, swap)`` candidates of a small-M bucket: at most 32 rows
    the bucket's rows against 64 or 128 weight rows, swapped or not (fewer than 64 rows
    unswapped run Ampere-style MMAs); above, 64 or 128 rows (up to the bucket) against 64
    or 128 columns, and the bucket's tile swapped where it is at most 64x128."""
    from fp8compile.kernels import tuning

    bm0, bn0 = tuning.SMALL_TILES[bucket]
    if bm0 <= 32:
        return [(bm0, 64, 4, False), (bm0, 64, 4, True), (bm0, 128, 4, True)]
    tiles = [(bm, bn, 8 if bm * bn >= 128 * 128 else 4, False)
             for bm in (64, 128) if bm <= bucket for bn in (64, 128)]
    return tiles + ([(bm0, bn0, 4, True)] if bm0 * bn0 <= 64 * 128 else [])


def run_variants(shapes, recipes=("blockwise", "row fast"), stages=None, tiles=None):
    """Small-M GEMMs on the Triton kernel over tiles around the bucket's own
    (:func:`_variant_tiles`), with the weight tile as the MMA's left operand or not
    (``SWAP_AB``: 64 or 128 weight rows are Hopper's ``wgmma`` M, the tokens its N; swapped
    blockwise GEMMs load their promotion scales a step ahead, ``SCALES_AHEAD``), at stages
    3-5 (2-4 for blockwise scales above 32 rows; BLOCK_K 256 at 2-3 stages too at 256 rows
    without them) and at half, once and twice the split of K
    the launcher's rule gives for the tile; against the launcher's own choice and bf16.  The
    three fastest split configs of tiles taller than 16 rows are timed again with the
    split-K sum in the GEMM (``FOLD_SPLIT_ROWS`` raised).  ``stages`` replaces the stage
    set, ``tiles`` (``"64x128"`` strings) keeps only those tiles."""
    import itertools

    from fp8compile.kernels import gemm, tuning

    log("\nTiles, swapped operands and scales ahead: Triton kernel at small M, "
        "us per GEMM (CUDA-graph replays, L2-exceeding operand sets); the six fastest")
    sms = tuning.num_sms(torch.device("cuda"))
    for (m, n, k), t_bf, recipe, sets, t_now, ref in _decode_cases(shapes, 256, recipes):
        blockwise = recipe[0] == "blockwise"
        bucket = tuning.m_bucket(m)
        found = []
        stage_set = stages or ((3, 4, 5) if bucket <= 32 or not blockwise else (2, 3, 4))
        # BLOCK_K 256 where the bucket tunes it (256 rows, scales constant along K), with
        # the stages that fit
        deep = ([(256, s) for s in (2, 3)] if bucket >= 256 and not blockwise and not stages
                else [])
        mine = [t for t in _variant_tiles(bucket)
                if tiles is None or f"{t[0]}x{t[1]}" in tiles]
        for (bm, bn, warps, swap), (bk, stages_) in itertools.product(
                mine, [(128, s) for s in stage_set] + deep):
            rule = tuning.split_k(m, n, k, bm, bn, sms, blockwise=blockwise)
            for split in sorted({max(1, rule // 2), rule, min(16, 2 * rule)}):
                # at 16 rows, swapped without scales ahead was no faster for blockwise scales
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                       "SWAP_AB": swap, "SCALES_AHEAD": swap and blockwise,
                       "num_warps": warps, "num_stages": stages_, "SPLIT_K": split}
                t = _time_config(cfg, sets, recipe, ref)
                if t is not None:
                    found.append((t, cfg))
        found.sort(key=lambda tc: tc[0])

        def what(cfg, fold=False):
            return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} "
                    f"swap {int(cfg['SWAP_AB'])} stages {cfg['num_stages']} "
                    f"split {cfg['SPLIT_K']}" + (" fold" if fold else ""))
        log(f"    {recipe[0]}: launcher {t_now * 1e3:.1f} us ({t_bf / t_now:.2f}x bf16)")
        for t, cfg in found[:6]:
            log(f"      {t * 1e3:6.1f} us ({t_bf / t:.2f}x)  {what(cfg)}")
        best = {}
        for t, cfg in found:
            best.setdefault((cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["SWAP_AB"]), (t, cfg))
        for t, cfg in sorted(best.values(), key=lambda tc: tc[0]):
            log(f"      best of its tile: {t * 1e3:6.1f} us  {what(cfg)}")
        folds = [cfg for _, cfg in found if cfg["SPLIT_K"] > 1 and cfg["BLOCK_M"] > 16][:3]
        rows = gemm.FOLD_SPLIT_ROWS
        try:
            gemm.FOLD_SPLIT_ROWS = 128
            for cfg in folds:
                t = _time_config(cfg, sets, recipe, ref)
                if t is not None:
                    log(f"      {t * 1e3:6.1f} us ({t_bf / t:.2f}x)  {what(cfg, fold=True)}")
        finally:
            gemm.FOLD_SPLIT_ROWS = rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="GPU correctness checks first")
    ap.add_argument("--no-bench", action="store_true", help="checks only")
    ap.add_argument("--m", type=int, nargs="*", default=MS, help="M values (default: %(default)s)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"), help="where logs/JSON go")
    ap.add_argument("--splits", action="store_true",
                    help="only time the Triton kernel at each split of K, for the M <= 256 "
                         "of --m")
    ap.add_argument("--tiles", action="store_true",
                    help="only sweep the Triton kernel's tile configs at M <= 16 of --m")
    ap.add_argument("--variants", action="store_true",
                    help="only sweep the Triton kernel's small-M tiles, swapped or not, at "
                         "the M <= 256 of --m")
    ap.add_argument("--recipes", nargs="*", choices=sorted(RECIPES),
                    default=["blockwise", "row fast"], help="recipes --variants times "
                    "(default: %(default)s)")
    ap.add_argument("--stages", type=int, nargs="*", help="--variants: these stages only")
    ap.add_argument("--tile", nargs="*", help="--variants: these tiles only, e.g. 64x128")
    ap.add_argument("--fold", action="store_true",
                    help="only time the split-K sum in the GEMM kernel against a second "
                         "kernel, at the M <= 256 of --m")
    ap.add_argument("--decode", action="store_true",
                    help="only time the decode Gluon kernel against the launcher without it, "
                         "at the M of --m up to its MAX_M")
    ap.add_argument("--max-m", type=int, help="--decode: raise the kernel's MAX_M to this")
    ap.add_argument("--decode-splits", type=int, nargs="*", default=[],
                    help="--decode: also time the kernel at these splits of K on the weights "
                         "that split")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        log("no CUDA device: nothing to measure (the kernel tests run on CPU under "
            "TRITON_INTERPRET=1: python -m pytest tests/kernels)")
        return 0
    import triton
    log(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"triton {triton.__version__}  cuda {torch.version.cuda}")
    if args.splits:
        run_splits(args.m)
        return 0
    if args.tiles:
        run_tiles(args.m)
        return 0
    if args.fold:
        run_fold(args.m)
        return 0
    if args.decode:
        run_decode(args.m, args.max_m, args.decode_splits)
        return 0
    if args.variants:
        run_variants(args.m, args.recipes, args.stages, args.tile)
        return 0
    ok = True
    if args.check:
        ok = run_checks(args.out)
    if not args.no_bench:
        run_quant_bench(args.out)
        rows = run_bench(args.out, args.m)
        print_tables(rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
