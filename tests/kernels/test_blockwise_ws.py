"""The warp-specialized blockwise GEMM (Gluon, Hopper): when it runs, what ptxas makes of
it, and its results against ops.scaled_mm_reference on the GPU."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

from fp8compile import numerics as nx
from fp8compile.kernels import blockwise_ws as bw
from fp8compile.kernels import gemm
from fp8compile.numerics import Fp8Format, Granularity
from fp8compile.ops import scaled_mm_reference
from tests.kernels.test_fused_kernel import assert_close_quant

G = Granularity
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not (HOPPER and bw.HAVE_GLUON),
                                  reason="the Gluon kernel runs on a Hopper GPU (sm_90) only")


def _fp8(*shape, device="cpu"):
    return torch.zeros(*shape, device=device).to(torch.float8_e4m3fn)


def _why(m=512, n=256, k=512, xg=G.GROUP, wg=G.BLOCK, out=torch.bfloat16, act="none",
         res=0, xq=None, wq=None, xs=None, acc="precise"):
    xq = _fp8(m, k) if xq is None else xq
    wq = _fp8(n, k) if wq is None else wq
    xs = torch.ones(m, -(-k // 128)) if xs is None else xs
    ws = torch.ones(-(-n // 128), -(-k // 128))
    return bw.unsupported(xq, xs, xg, wq, ws, wg, out, act, res, accumulation=acc)


@pytest.mark.parametrize("case, reason", [
    (dict(xg=G.GROUP, wg=G.ROW), "only 1x128 activation groups"),
    (dict(xg=G.ROW, wg=G.BLOCK), "only 1x128 activation groups"),
    (dict(xg=G.TENSOR, wg=G.GROUP), "or row/tensor scales on both operands"),
    (dict(act="silu"), "no activation epilogue other than SwiGLU"),
    (dict(res=3, xg=G.ROW, wg=G.ROW, acc="fast"), "3 residuals: the epilogue adds two at most"),
    (dict(res=1, act="swiglu", xg=G.ROW, wg=G.ROW, acc="fast"), "no residual after the SwiGLU"),
    (dict(res=1, act="swiglu", n=512, out=torch.float8_e4m3fn), "no residual after the SwiGLU"),
    (dict(res=2, out=torch.float8_e4m3fn), "no residual with an FP8 output"),
    (dict(res=1, xg=G.TENSOR, wg=G.TENSOR, acc="fast", out=torch.float8_e4m3fn),
     "no residual with an FP8 output"),
    (dict(act="swiglu"), "blockwise scales writes E4M3 with 1x128 group scales"),
    (dict(act="swiglu", n=384, out=torch.float8_e4m3fn), "N % 256 == 0"),
    (dict(act="swiglu", xg=G.ROW, wg=G.ROW), "needs fast accumulation"),
    (dict(act="swiglu", xg=G.ROW, wg=G.ROW, acc="fast", n=384), "N % 256 == 0"),
    (dict(wq=_fp8(256, 512).to(torch.float8_e5m2)), "one FP8 format"),
    (dict(xs=torch.ones(512, 4, dtype=torch.float64)), "fp32 scales"),
    (dict(m=256), "M=256 < 257"),
    (dict(k=0), "K == 0"),
    (dict(k=520), "K % 16 == 0"),
    (dict(n=260), "N * out bytes % 16"),
    (dict(xg=G.ROW, wg=G.ROW, acc="fast", out=torch.float32), "more shared memory"),
    (dict(xg=G.ROW, wg=G.ROW, acc="fast", out=torch.float8_e5m2), "E5M2 output"),
    (dict(xq=_fp8(512, 1024)[:, :512]), "contiguous and K-major"),
    (dict(xq=_fp8(512, 512).t()), "contiguous and K-major"),
    (dict(), "Hopper GPU" if bw.HAVE_GLUON else "no Gluon"),
], ids=lambda v: str(v)[:40])
def test_unsupported_names_the_rule(case, reason):
    if HOPPER and not case:
        pytest.skip("on a Hopper GPU the plain case is supported")
    assert reason in _why(**case)


@pytest.mark.parametrize("acc", ["precise", "fast"])
@pytest.mark.parametrize("xg, wg", [(G.ROW, G.ROW), (G.TENSOR, G.TENSOR), (G.ROW, G.TENSOR),
                                    (G.TENSOR, G.ROW)])
def test_unsupported_takes_row_and_tensor_scales_with_either_accumulation(xg, wg, acc):
    why = _why(xg=xg, wg=wg, acc=acc)
    assert why is None or "Hopper" in why or "Gluon" in why


@pytest.mark.parametrize("xg, wg", [(G.ROW, G.ROW), (G.TENSOR, G.TENSOR), (G.ROW, G.TENSOR)])
@pytest.mark.parametrize("out", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_unsupported_takes_swiglu_with_fast_row_and_tensor_scales(xg, wg, out):
    why = _why(n=512, xg=xg, wg=wg, act="swiglu", acc="fast", out=out)
    assert why is None or "Hopper" in why or "Gluon" in why


@pytest.mark.parametrize("xg, wg, acc", [(G.ROW, G.ROW, "fast"), (G.TENSOR, G.TENSOR, "fast"),
                                         (G.ROW, G.ROW, "precise"), (G.GROUP, G.BLOCK, "precise")])
@pytest.mark.parametrize("res", [1, 2])
@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16, torch.float32])
def test_unsupported_takes_residuals_with_every_recipe(xg, wg, acc, res, out):
    why = _why(xg=xg, wg=wg, acc=acc, res=res, out=out)
    if out == torch.float32 and acc == "fast":  # the fast tile's fp32 output tiles
        assert "more shared memory" in why
    else:
        assert why is None or "Hopper" in why or "Gluon" in why



@pytest.mark.parametrize("acc", ["precise", "fast"])
def test_unsupported_takes_blockwise_swiglu_with_e4m3_groups(acc):
    why = _why(n=512, act="swiglu", acc=acc, out=torch.float8_e4m3fn)
    assert why is None or "Hopper" in why or "Gluon" in why


def test_unsupported_accepts_n_with_fp32_rows_and_odd_k():
    # N=132 is fine for fp32 output (528-byte rows), and K=1040 is not a multiple of 128.
    why = _why(n=132, k=1040, out=torch.float32)
    assert why is None or "Hopper" in why or "Gluon" in why


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("FP8COMPILE_GLUON", "0")
    assert "FP8COMPILE_GLUON=0" in _why()


def _ptxas_report(fast: bool, swiglu: bool = False, fp8_out: bool = False,
                  res: int = 0) -> str:
    """ptxas -v on the kernel compiled for sm_90a, as the GPU would build it (``swiglu``:
    the half-width output tile of the SwiGLU epilogue; ``fp8_out``: an E4M3 output tile cast
    with a static scale; ``res``: residuals added), in a fresh process: once a kernel
    has run under the interpreter in this one (TRITON_INTERPRET=1, the CPU tests), Triton's
    language is patched for it and the Gluon compile fails ("'block_argument' object has
    no attribute 'dtype'"), whatever the order of the tests."""
    return ptxas_in_fresh_process("tests.kernels.test_blockwise_ws",
                                  f"{fast}, {swiglu}, {fp8_out}, {res}")


def ptxas_in_fresh_process(module: str, args: str) -> str:
    """``module._ptxas_in_process(args)``'s report, computed in a fresh Python process."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys; from {module} import _ptxas_in_process as r; "
            f"sys.stdout.write(r({args}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _ptxas_in_process(fast: bool, swiglu: bool, fp8_out: bool = False, res: int = 0) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    wide = swiglu and not fast  # blockwise SwiGLU: 1x128-group E4M3 output
    tile = bw.FAST_TILE if fast else bw.WIDE_TILE if wide else bw.PROMOTED_TILE
    bm, bn, bk, stages = tile
    cn = bn // 2 if swiglu else bn
    out_dtype, out_ty = (torch.float8_e4m3fn, "fp8e4nv") if fp8_out else (torch.bfloat16, "bf16")
    a_l, b_l, c_l = bw.layouts(torch.float8_e4m3fn, out_dtype, tile, cn)
    c_desc = f"tensordesc<{out_ty}[{bm // 2}, {cn}],{c_l!r}>"
    sig = {"a_desc": f"tensordesc<fp8e4nv[{bm}, {bk}],{a_l!r}>",
           # SwiGLU: gate's and up's halves of the tile come in a load each
           "b_desc": f"tensordesc<fp8e4nv[{bn // 2 if swiglu else bn}, {bk}],{b_l!r}>",
           "c_desc": c_desc, "r1_desc": c_desc, "r2_desc": c_desc,
           "as_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*bf16", "has_bias": "i32",
           "cs_ptr": "*fp32", "stride_cs": "i32", "has_cs": "i32", "os_ptr": "*fp32",
           "M": "i32", "N": "i32",
           "K": "i32", "stride_asm": "i32", "stride_ask": "i32", "stride_wsn": "i32",
           "stride_wsk": "i32"}
    consts = dict(STAGES=stages, MATH_REGS=bw.MATH_REGS, LOAD_REGS=bw.LOAD_REGS, FAST=fast,
                  RES=res, WIDE=wide, SWIGLU=swiglu)
    sig.update({name: "constexpr" for name in consts})
    kernel = triton.compile(
        GluonASTSource(fn=bw._blockwise_ws_kernel, signature=sig, constexprs=consts),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    from fp8compile.kernels.resources import ptxas_sm90

    ptxas = ptxas_sm90()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        done = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    assert done.returncode == 0, f"ptxas exit {done.returncode}: {done.stderr[-2000:]}"
    return done.stderr


@pytest.mark.skipif(not bw.HAVE_GLUON, reason="this Triton has no Gluon Hopper API")
@pytest.mark.parametrize("fast, swiglu, fp8_out, res",
                         [(False, False, False, 0), (True, False, False, 0),
                          (True, True, False, 0), (True, True, True, 0), (True, False, False, 1),
                          (True, False, False, 2), (False, True, True, 0),
                          (False, False, False, 1), (False, False, False, 2)],
                         ids=["promoted", "fast", "fast-swiglu", "fast-swiglu-fp8-out",
                              "fast-residual", "fast-two-residuals", "promoted-swiglu-groups",
                              "promoted-residual", "promoted-two-residuals"])
def test_wgmma_pipelined_without_spills(fast, swiglu, fp8_out, res):
    """The schedule's point: ptxas keeps the wgmma asynchronous (no C7510-C7517 notice that
    it serialized them or injected a wait) and nothing spills at 232 registers, with the
    promoted partial tiles or the fast path's 64x256 accumulator (and its SwiGLU, also with
    the static FP8 cast of its output, or one or two residual tiles added).  Without the
    opaque move before the residual loads (``_settled``) the residual kernels spill 0.5-1.5
    KB: the column scales and bias stay live beside the loaded tile."""
    from fp8compile.kernels.resources import tools_available

    if not tools_available():
        pytest.skip("Triton's NVIDIA tools (ptxas) are not installed")
    report = _ptxas_report(fast, swiglu, fp8_out, res)
    assert "serialized" not in report and "is injected" not in report, report
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report


def _operands(m, n, k, fmt=Fp8Format.E4M3, nan_row=None):
    x = torch.randn(m, k) * torch.rand(k) * 3
    if nan_row is not None:
        x[nan_row, 5] = float("nan")
    xq, xs = nx.quantize(x.cuda(), G.GROUP, fmt)
    wq, ws = nx.quantize((torch.randn(n, k) * 0.05).cuda(), G.BLOCK, fmt)
    return xq, xs, wq, ws


class _Launch:
    """Stands in for the Gluon kernel: records the launch instead of running it."""

    def __init__(self):
        self.args = self.meta = None

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.args, self.meta = args, meta
        return launch


@pytest.mark.skipif(not bw.HAVE_GLUON, reason="this Triton has no Gluon Hopper API")
@pytest.mark.parametrize("acc", ["precise", "fast"])
@pytest.mark.parametrize("xg, wg", [(G.GROUP, G.BLOCK), (G.ROW, G.ROW), (G.TENSOR, G.TENSOR),
                                    (G.ROW, G.TENSOR), (G.TENSOR, G.ROW)])
def test_scales_reach_the_kernel_by_recipe(monkeypatch, xg, wg, acc):
    """Which tensor each scale argument points at, with which strides (no GPU needed): the
    promotion factor reads the row scale (and the weight block's, blockwise only); the
    epilogue multiplies by the column scales of the row/tensor recipes only.  Fast
    accumulation takes the one-accumulator path and its tile for row/tensor scales only:
    blockwise scales are promoted whatever the accumulation."""
    m, n, k = 512, 384, 256
    xq, wq = _fp8(m, k), _fp8(n, k)
    scale_x = {G.GROUP: torch.ones(m, 2), G.ROW: torch.ones(m, 1), G.TENSOR: torch.ones(())}[xg]
    scale_w = {G.BLOCK: torch.ones(3, 2), G.ROW: torch.ones(n, 1), G.TENSOR: torch.ones(())}[wg]
    launch = _Launch()
    monkeypatch.setattr(bw, "_blockwise_ws_kernel", launch)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    bw.blockwise_mm(xq, scale_x, wq, scale_w, None, out, xg, wg, acc)
    fast = acc == "fast" and xg is not G.GROUP
    assert launch.meta["FAST"] is fast
    a_desc, b_desc, c_desc = launch.args[:3]
    bm, bn, bk, stages = bw.FAST_TILE if fast else bw.PROMOTED_TILE
    assert launch.meta["STAGES"] == stages == (3 if fast else 5)
    assert (a_desc.block_shape, b_desc.block_shape, c_desc.block_shape) == (
        [bm, bk], [bn, bk], [bm // 2, bn])
    (_, _, _, r1_desc, r2_desc, as_ptr, ws_ptr, _, has_bias, cs_ptr, stride_cs, has_cs, os_ptr,
     mm, nn, kk, stride_asm, stride_ask, stride_wsn, stride_wsk) = launch.args
    assert launch.meta["RES"] == 0 and r1_desc is c_desc and r2_desc is c_desc  # unread
    assert os_ptr is out  # no output scale: unread
    assert (mm, nn, kk, has_bias) == (m, n, k, 0)
    assert as_ptr is scale_x
    if xg is G.GROUP:
        assert (stride_asm, stride_ask) == scale_x.stride()
        assert ws_ptr is scale_w and (stride_wsn, stride_wsk) == scale_w.stride()
        assert has_cs == 0
        return
    assert (stride_asm, stride_ask) == ((1 if xg is G.ROW else 0), 0)
    # the promotion's weight factor is never read (has_cs masks it to one): any valid
    # pointer, stride 0, and no tensor allocated for it
    assert ws_ptr is scale_w and (stride_wsn, stride_wsk) == (0, 0)
    assert cs_ptr is scale_w and has_cs == 1
    assert stride_cs == (1 if wg is G.ROW else 0)


@pytest.mark.skipif(not bw.HAVE_GLUON, reason="this Triton has no Gluon Hopper API")
@pytest.mark.parametrize("out_dtype, stages", [(torch.bfloat16, 5), (torch.float16, 5),
                                               (torch.float32, 4)])
def test_promoted_stages_fit_beside_the_output_tiles(monkeypatch, out_dtype, stages):
    """The promoted tile takes five stages where its two output tiles leave room and four
    for fp32 output tiles, which five would push past an SM's shared memory; either way the
    launch fits, and a GEMM the kernel serves is not refused for shared memory."""
    m, n, k = 512, 384, 256
    launch = _Launch()
    monkeypatch.setattr(bw, "_blockwise_ws_kernel", launch)
    out = torch.empty(m, n, dtype=out_dtype)
    bw.blockwise_mm(_fp8(m, k), torch.ones(m, 2), _fp8(n, k), torch.ones(3, 2), None, out)
    assert launch.meta["STAGES"] == stages
    tile = (bw.BLOCK_M, bw.BLOCK_N, bw.BLOCK_K, stages)
    assert bw._shared_bytes(tile, False, out.element_size()) <= bw.SHARED_MEMORY
    bigger = (bw.BLOCK_M, bw.BLOCK_N, bw.BLOCK_K, stages + 1)
    assert stages == max(bw.PROMOTED_STAGES) or (
        bw._shared_bytes(bigger, False, out.element_size()) > bw.SHARED_MEMORY)


@needs_hopper
# K blocks: 1, 2 (the second partial), 3 (a pair and a lone block), 9 (a run of eight and a
# lone block), 32, 5, 6 (runs of four and two), 7 (four, two, one) and 15; each
# factor is loaded four blocks ahead, so each count checks which block's factor each
# promotion takes.
@pytest.mark.parametrize("m, n, k", [(300, 256, 96), (512, 256, 208), (384, 128, 384),
                                     (257, 136, 1040), (1000, 384, 4096), (4096, 4104, 528),
                                     (300, 256, 768), (260, 128, 880),
                                     (300, 128, 1920)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_matches_reference(m, n, k, out_dtype):
    _check_against_reference(*_operands(m, n, k), G.GROUP, G.BLOCK, out_dtype)


@needs_hopper
@pytest.mark.parametrize("xg, wg", [(G.ROW, G.ROW), (G.TENSOR, G.TENSOR), (G.ROW, G.TENSOR),
                                    (G.TENSOR, G.ROW)])
@pytest.mark.parametrize("m, n, k", [(300, 256, 96), (384, 136, 384), (1000, 384, 4096)])
@pytest.mark.parametrize("acc", ["precise", "fast"])
def test_row_and_tensor_scales_match_reference(xg, wg, m, n, k, acc):
    """Row/tensor GEMMs: precise ones with unit factors in the promotion, fast ones with
    one accumulator and the row scale after it; weight scales per column in the epilogue
    (a scale applied to the wrong row or column fails here: rows and columns are scaled
    apart).  N=136 leaves a partial 256-wide tile on the fast path."""
    x = torch.randn(m, k) * torch.rand(m, 1) * 3  # every row scale differs
    w = torch.randn(n, k) * 0.05 * torch.rand(n, 1) * 2  # and every column scale
    xq, xs = nx.quantize(x.cuda(), xg, Fp8Format.E4M3)
    wq, ws = nx.quantize(w.cuda(), wg, Fp8Format.E4M3)
    _check_against_reference(xq, xs, wq, ws, xg, wg, torch.bfloat16, acc)


def _check_against_reference(xq, xs, wq, ws, xg, wg, out_dtype, acc="precise"):
    m, n = xq.shape[0], wq.shape[0]
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    assert bw.unsupported(xq, xs, xg, wq, ws, wg, out_dtype, "none", False, True, acc) is None
    out = torch.empty(m, n, device="cuda", dtype=out_dtype)
    y = bw.blockwise_mm(xq, xs, wq, ws, bias, out, xg, wg, acc)
    ref = scaled_mm_reference(xq, xs, xg, wq, ws, wg, bias, out_dtype, "none", None)
    if acc == "fast":
        # One tensor-core accumulator over all of K loses up to ~2% on single outputs at
        # K=4096 (DeepSeek-V3 measured the same), so the kernel is held to the Triton
        # kernel's fast path, which accumulates the same way, elementwise, and to the
        # reference by the error over the whole output.
        triton = gemm.scaled_mm(xq, xs, xg, wq, ws, wg, bias, out_dtype, "fast", gluon=False)
        torch.testing.assert_close(y.float(), triton.float(), atol=2e-2, rtol=1.6e-2)

        def err(t):
            return ((t.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err(y) <= 1.25 * err(triton) + 1e-4, (err(y), err(triton))
        return
    # Promoted to fp32 every 128 of K like the reference, but inside a block the tensor core
    # adds FP8 products with its reduced-precision accumulator (SPEC §4): ~1e-3 relative
    # at these sizes (measured up to 4e-3 absolute on outputs of a few units).
    atol, rtol = (2e-2, 1.6e-2) if out_dtype == torch.bfloat16 else (1e-2, 1e-2)
    torch.testing.assert_close(y.float(), ref.float(), atol=atol, rtol=rtol)


def test_swiglu_launch_writes_half_width_tiles(monkeypatch):
    """No GPU needed: the SwiGLU launch keeps the fast tile for the weight, whose gate and
    up halves come in a load each (the weight descriptor's block is half the tile: rows
    of gate, then the matching rows of up), and gives the output descriptor half its
    width, over an (M, N/2) output."""
    m, n, k = 512, 512, 256
    xq, wq = _fp8(m, k), _fp8(n, k)
    launch = _Launch()
    monkeypatch.setattr(bw, "_blockwise_ws_kernel", launch)
    out = torch.empty(m, n // 2, dtype=torch.bfloat16)
    bw.blockwise_mm(xq, torch.ones(m, 1), wq, torch.ones(n, 1), None, out, G.ROW, G.ROW,
                    "fast", swiglu=True)
    a_desc, b_desc, c_desc = launch.args[:3]
    bm, bn, bk, _ = bw.FAST_TILE
    assert launch.meta["FAST"] is True and launch.meta["SWIGLU"] is True
    assert (b_desc.block_shape, c_desc.block_shape) == ([bn // 2, bk], [bm // 2, bn // 2])
    assert list(c_desc.shape) == [m, n // 2] and launch.args[14] == n  # N: the weight's rows
    with pytest.raises(ValueError, match="swiglu needs blockwise scales, or fast"):
        bw.blockwise_mm(xq, torch.ones(m, 1), wq, torch.ones(n, 1), None, out, G.ROW, G.ROW,
                        "precise", swiglu=True)


def test_blockwise_swiglu_launch_writes_groups(monkeypatch):
    """No GPU needed: a blockwise SwiGLU launch takes the wide tile (128 rows of gate and
    the matching 128 of up side by side, a load each), an E4M3 (M, N/2) output in 64x128
    tiles, and hands the
    kernel its (M, N/256) group scales, M-contiguous, where a static scale would go."""
    m, n, k = 512, 768, 256
    xq, wq = _fp8(m, k), _fp8(n, k)
    xs, ws = torch.ones(m, 2), torch.ones(n // 128, 2)
    launch = _Launch()
    monkeypatch.setattr(bw, "_blockwise_ws_kernel", launch)
    out = torch.empty(m, n // 2, dtype=torch.float8_e4m3fn)
    scales = torch.empty_strided((m, n // 256), (1, m))
    bw.blockwise_mm(xq, xs, wq, ws, None, out, G.GROUP, G.BLOCK, "precise", swiglu=True,
                    out_scale=scales)
    a_desc, b_desc, c_desc = launch.args[:3]
    bm, bn, bk, stages = bw.WIDE_TILE
    assert launch.meta["WIDE"] is True and launch.meta["FAST"] is False
    assert launch.meta["SWIGLU"] is True and launch.meta["STAGES"] == stages == 3
    assert (a_desc.block_shape, b_desc.block_shape, c_desc.block_shape) == (
        [bm, bk], [bn // 2, bk], [bm // 2, 128])
    assert list(c_desc.shape) == [m, n // 2] and launch.args[14] == n
    assert launch.args[12] is scales  # os_ptr: where the epilogue writes the group scales
    assert launch.args[6] is ws and launch.args[18:20] == (ws.stride(0), ws.stride(1))
    for bad, match in [(dict(out_scale=torch.empty(m, n // 256)), "strides"),
                       (dict(out_scale=None), "got None"),
                       (dict(out=torch.empty(m, n // 2, dtype=torch.bfloat16)), "E4M3 out")]:
        kw = dict(out=out, out_scale=scales) | bad
        with pytest.raises(ValueError, match=match):
            bw.blockwise_mm(xq, xs, wq, ws, None, kw["out"], G.GROUP, G.BLOCK, "precise",
                            swiglu=True, out_scale=kw["out_scale"])


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("recipe", ["row fast", "blockwise"])
def test_residual_launch_reads_residuals_as_output_tiles(monkeypatch, count, recipe):
    """No GPU needed: each residual gets a descriptor of the output's tile shape over its own
    tensor, and RES counts them; the unused descriptor slots point at the output.  The
    promoted (blockwise) path takes them as the fast one does."""
    m, n, k = 512, 512, 256
    xq, wq = _fp8(m, k), _fp8(n, k)
    launch = _Launch()
    monkeypatch.setattr(bw, "_blockwise_ws_kernel", launch)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    residuals = tuple(torch.empty(m, n, dtype=torch.bfloat16) for _ in range(count))
    if recipe == "blockwise":
        bw.blockwise_mm(xq, torch.ones(m, 2), wq, torch.ones(4, 2), None, out, G.GROUP,
                        G.BLOCK, "precise", residuals=residuals)
    else:
        bw.blockwise_mm(xq, torch.ones(m, 1), wq, torch.ones(n, 1), None, out, G.ROW, G.ROW,
                        "fast", residuals=residuals)
    c_desc, r1_desc, r2_desc = launch.args[2:5]
    assert launch.meta["RES"] == count and launch.meta["FAST"] is (recipe == "row fast")
    assert r1_desc.base is residuals[0] and r1_desc.block_shape == c_desc.block_shape
    assert (r2_desc.base is residuals[1]) if count == 2 else (r2_desc is c_desc)


@pytest.mark.parametrize("case, match", [
    (dict(swiglu=True, n_out=256), "no SwiGLU"),
    (dict(res_dtype=torch.float32), "laid out as the output"),
    (dict(res_shape=(512, 256)), "laid out as the output"),
    (dict(count=3), "one or two residuals"),
])
def test_residual_launch_rejects(case, match):
    m, n, k = 512, 512, 256
    n_out = case.get("n_out", n)
    out = torch.empty(m, n_out, dtype=torch.bfloat16)
    r = torch.empty(case.get("res_shape", (m, n_out)), dtype=case.get("res_dtype", torch.bfloat16))
    with pytest.raises(ValueError, match=match):
        bw.blockwise_mm(_fp8(m, k), torch.ones(m, 1), _fp8(n, k), torch.ones(n, 1), None, out,
                        G.ROW, G.ROW, case.get("acc", "fast"), swiglu=case.get("swiglu", False),
                        residuals=(r,) * case.get("count", 1))


def test_scaled_mm_needs_residual_before_residual2():
    xq, wq = _fp8(4, 32), _fp8(16, 32)
    with pytest.raises(ValueError, match="residual2 is a second residual"):
        gemm.scaled_mm(xq, torch.ones(4, 1), G.ROW, wq, torch.ones(16, 1), G.ROW,
                       residual2=torch.zeros(4, 16, dtype=torch.bfloat16))


@needs_hopper
@pytest.mark.parametrize("xg, wg, acc", [(G.ROW, G.ROW, "fast"), (G.TENSOR, G.TENSOR, "fast"),
                                         (G.ROW, G.TENSOR, "fast"), (G.GROUP, G.BLOCK, "precise"),
                                         (G.ROW, G.ROW, "precise")])
@pytest.mark.parametrize("m, n, k", [(300, 256, 96), (1000, 768, 4096), (4100, 1280, 528)])
@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_residual_epilogue_matches_reference(xg, wg, acc, m, n, k, count, out_dtype):
    """``product + r1 (+ r2)`` in the kernel's epilogue (fast or promoted), in fp32 with one
    rounding: the same output as the Triton kernel (same accumulation) adding the fp32 sum
    of the residuals, up to the order of the fp32 sums; a NaN and an Inf residual element
    pass through; rows past M (m = 300, 4100) are never written by a residual tile's load.
    Promoted partial tiles are zeroed per tile with residuals: a later tile of a program
    (m = 4100: more tiles than SMs) must not see an earlier one's."""
    if out_dtype == torch.float32 and acc == "fast":
        pytest.skip("fp32 output tiles do not fit beside the fast path's stages")
    x = torch.randn(m, k) * torch.rand(m, 1) * 3
    xq, xs = nx.quantize(x.cuda(), xg, Fp8Format.E4M3)
    wq, ws = nx.quantize((torch.randn(n, k) * 0.05).cuda(), wg, Fp8Format.E4M3)
    rs = [(torch.randn(m, n, device="cuda") * 4).to(out_dtype) for _ in range(count)]
    rs[0][1, 3], rs[-1][m - 1, n - 1] = float("nan"), float("inf")
    r2 = rs[1] if count == 2 else None
    got = gemm.scaled_mm(xq, xs, xg, wq, ws, wg, None, out_dtype, acc, "none", rs[0],
                         residual2=r2)
    assert blockwise_ws_served(xq, xs, xg, wq, ws, wg, out_dtype, rs[0], r2, acc)
    triton = gemm.scaled_mm(xq, xs, xg, wq, ws, wg, None, out_dtype, acc, "none", rs[0],
                            gluon=False, residual2=r2)
    ref = scaled_mm_reference(xq, xs, xg, wq, ws, wg, None, out_dtype, "none", rs[0], r2)
    assert torch.isnan(got[1, 3]) and torch.isinf(got[m - 1, n - 1])
    torch.testing.assert_close(got.float(), triton.float(), atol=2e-2, rtol=1.6e-2,
                               equal_nan=True)
    # against the fp32 reference: the accumulation's error only
    torch.testing.assert_close(got.float(), ref.float(), atol=6e-2, rtol=2e-2, equal_nan=True)
    if acc == "precise":  # promoted exactly as without residuals, then the fp32 sums
        plain = gemm.scaled_mm(xq, xs, xg, wq, ws, wg, None, torch.float32, acc)
        want = plain + rs[0].float()
        if r2 is not None:
            want = want + r2.float()
        torch.testing.assert_close(got.float(), want.to(out_dtype).float(), atol=0, rtol=0,
                                   equal_nan=True)


def blockwise_ws_served(xq, xs, xg, wq, ws, wg, out_dtype, r1, r2, acc="fast") -> bool:
    return gemm.gluon_serves(xq, xs, xg, wq, ws, wg, out_dtype, "none", r1, acc, r2)


@needs_hopper
@pytest.mark.parametrize("xg, wg", [(G.ROW, G.ROW), (G.TENSOR, G.TENSOR), (G.ROW, G.TENSOR)])
@pytest.mark.parametrize("m, n, k, bias", [(300, 256, 96, True), (1000, 768, 4096, False),
                                           (4100, 1024, 528, True)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_swiglu_epilogue_matches_reference(xg, wg, m, n, k, bias, out_dtype):
    """silu(gate) * up in the fast kernel's epilogue: each 256-wide tile loads a gate tile
    and the matching up tile, N/2 rows further, of the stacked weight (a gate tile paired
    with the wrong up tile, or gate and up swapped, fails here: every weight row's scale
    differs)."""
    x = torch.randn(m, k) * torch.rand(m, 1) * 3
    gate = torch.randn(n // 2, k) * 0.05 * torch.rand(n // 2, 1) * 2
    up = torch.randn(n // 2, k) * 0.05 * torch.rand(n // 2, 1) * 2
    xq, xs = nx.quantize(x.cuda(), xg, Fp8Format.E4M3)
    wq, ws = nx.quantize(torch.cat([gate, up]).cuda(), wg, Fp8Format.E4M3)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    assert bw.unsupported(xq, xs, xg, wq, ws, wg, out_dtype, "swiglu", False, True,
                          "fast") is None
    y = gemm.scaled_mm(xq, xs, xg, wq, ws, wg, b, out_dtype, "fast", "swiglu")
    assert y.shape == (m, n // 2)
    ref = scaled_mm_reference(xq, xs, xg, wq, ws, wg, b, out_dtype, "swiglu", None)
    # the Triton kernel's fast product accumulates as the Gluon kernel does
    triton = gemm.scaled_mm(xq, xs, xg, wq, ws, wg, b, out_dtype, "fast", "swiglu",
                            gluon=False)
    torch.testing.assert_close(y.float(), triton.float(), atol=2e-2, rtol=1.6e-2)

    def err(t):
        return ((t.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err(y) <= 1.25 * err(triton) + 1e-4, (err(y), err(triton))


@needs_hopper
@pytest.mark.parametrize("m, n, k", [(300, 768, 208), (777, 512, 1040), (1024, 2048, 4096)])
def test_blockwise_swiglu_groups_match_reference(m, n, k):
    """The promoted SwiGLU epilogue's E4M3 h and 1x128 group scales against numerics' group
    quantization of h computed from the kernel's own fp32 product (plain epilogue, the same
    summation over K): scales to the epilogue's approximate exp and division, payloads
    within one FP8 step and almost all equal.  Against the fp32 reference product the
    scales agree to the tensor cores' summation.  A NaN in x makes its row of h NaN, with
    the scales of the rest."""
    x = torch.randn(m, k) * torch.rand(m, 1) * 3
    x[5, 7] = float("nan")
    gate = torch.randn(n // 2, k) * 0.05 * torch.rand(n // 2, 1) * 2
    up = torch.randn(n // 2, k) * 0.05 * torch.rand(n // 2, 1) * 2
    xq, xs = nx.quantize(x.cuda(), G.GROUP, Fp8Format.E4M3)
    wq, ws = nx.quantize(torch.cat([gate, up]).cuda(), G.BLOCK, Fp8Format.E4M3)
    q = torch.empty(m, n // 2, device="cuda", dtype=torch.float8_e4m3fn)
    s = torch.empty_strided((m, n // 256), (1, m), device="cuda")
    bw.blockwise_mm(xq, xs, wq, ws, None, q, G.GROUP, G.BLOCK, "precise", swiglu=True,
                    out_scale=s)
    y = torch.empty(m, n, device="cuda")
    bw.blockwise_mm(xq, xs, wq, ws, None, y, G.GROUP, G.BLOCK, "precise")
    assert_close_quant((q, s), nx.quantize(nx.swiglu(y), G.GROUP, Fp8Format.E4M3),
                       Fp8Format.E4M3)
    assert q[5].float().isnan().all() and torch.isfinite(s[5]).all()
    h = scaled_mm_reference(xq, xs, G.GROUP, wq, ws, G.BLOCK, None, torch.float32, "swiglu",
                            None)
    sr = nx.quantize(h, G.GROUP, Fp8Format.E4M3)[1]
    torch.testing.assert_close(s, sr, rtol=4e-3, atol=0)


@needs_hopper
def test_e5m2_nan_rows_and_no_bias():
    xq, xs, wq, ws = _operands(384, 256, 640, Fp8Format.E5M2, nan_row=300)
    y = gemm.scaled_mm(xq, xs, G.GROUP, wq, ws, G.BLOCK, None, torch.float32)
    assert y[300].isnan().all() and not y[:300].isnan().any() and not y[301:].isnan().any()
    ref = scaled_mm_reference(xq, xs, G.GROUP, wq, ws, G.BLOCK, None, torch.float32, "none",
                              None)
    keep = torch.arange(384, device="cuda") != 300
    torch.testing.assert_close(y[keep], ref[keep], atol=1e-2, rtol=1e-2)


@needs_hopper
@pytest.mark.parametrize("xg, wg", [(G.GROUP, G.BLOCK), (G.ROW, G.ROW)])
def test_scaled_mm_dispatches_here_unless_disabled(monkeypatch, xg, wg):
    x, w = torch.randn(512, 512).cuda(), (torch.randn(256, 512) * 0.05).cuda()
    (xq, xs), (wq, ws) = nx.quantize(x, xg), nx.quantize(w, wg)
    calls = []
    real = bw.blockwise_mm
    monkeypatch.setattr(bw, "blockwise_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = gemm.scaled_mm(xq, xs, xg, wq, ws, wg)
    assert calls == [1]
    gemm.scaled_mm(xq, xs, xg, wq, ws, wg, accumulation="fast")
    assert calls == [1, 1]
    monkeypatch.setenv("FP8COMPILE_GLUON", "0")
    y_triton = gemm.scaled_mm(xq, xs, xg, wq, ws, wg)
    assert calls == [1, 1]
    torch.testing.assert_close(y.float(), y_triton.float(), atol=2e-2, rtol=1.6e-2)


def _on_hopper(monkeypatch, kernel=bw):
    """CPU stand-ins for a Hopper GPU: the Gluon ``kernel`` module (this one, or the decode
    kernel's) 'serves' every rule-abiding GEMM."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    real = kernel.unsupported

    def on_hopper(*args, **kwargs):
        why = real(*args, **kwargs)
        return None if why and ("Hopper GPU" in why or "Gluon" in why) else why
    monkeypatch.setattr(kernel, "unsupported", on_hopper)


def _blockwise_eager(monkeypatch):
    """Blockwise operands the Gluon kernel 'serves' on the CPU (:func:`_on_hopper`)."""
    _on_hopper(monkeypatch)
    xq, wq = _fp8(512, 256), _fp8(384, 256)
    return xq, torch.ones(512, 2), wq, torch.ones(3, 2)


def test_gluon_serves_eager_promoted_gemms_only(monkeypatch):
    from fp8compile.ops._inline import _tracing

    xq, xs, wq, ws = _blockwise_eager(monkeypatch)
    args = (torch.bfloat16, "none", None)
    assert gemm.gluon_serves(xq, xs, G.GROUP, wq, ws, G.BLOCK, *args)
    # a transposed x is copied K-major first, so the layout does not decide
    assert gemm.gluon_serves(xq.t().contiguous().t(), xs, G.GROUP, wq, ws, G.BLOCK, *args)
    rs, cs = torch.ones(512, 1), torch.ones(384, 1)
    assert gemm.gluon_serves(xq, rs, G.ROW, wq, cs, G.ROW, *args, "precise")
    assert gemm.gluon_serves(xq, torch.ones(()), G.TENSOR, wq, cs, G.ROW, *args, "precise")
    assert gemm.gluon_serves(xq, rs, G.ROW, wq, cs, G.ROW, *args, "fast")
    assert not gemm.gluon_serves(xq, xs, G.GROUP, wq, cs, G.ROW, *args)
    assert not gemm.gluon_serves(xq[:200], xs[:200], G.GROUP, wq, ws, G.BLOCK, *args)
    assert not gemm.gluon_serves(xq, xs, G.GROUP, wq, ws, G.BLOCK, torch.bfloat16, "silu", None)
    with _tracing():  # a graph being traced launches the Triton kernel
        assert not gemm.gluon_serves(xq, xs, G.GROUP, wq, ws, G.BLOCK, *args)


def test_choices_timed_on_the_gluon_kernel_have_their_own_key(monkeypatch):
    """An eager choice timed against the Gluon kernel must not decide a traced graph's GEMM
    of the same shape, which launches the Triton kernel."""
    from fp8compile import kernels
    from fp8compile.kernels import select

    xq, xs, wq, ws = _blockwise_eager(monkeypatch)
    keys = []
    monkeypatch.setattr(select, "choose", lambda key, t, c: keys.append(key) or "triton")
    monkeypatch.setattr(gemm, "scaled_mm", lambda *a, **k: None)
    kernels.scaled_mm(xq, xs, G.GROUP, wq, ws, G.BLOCK, None, torch.bfloat16, "precise",
                      "none", None)
    traced = select.gemm_key(xq, G.GROUP, wq, "precise", torch.bfloat16)
    assert keys == [traced[:7] + (True,) + traced[8:]] and traced[7] is False
    assert select.describe_key(keys[0]).endswith("(Gluon kernel)")
    assert not select.describe_key(traced).endswith("(Gluon kernel)")


def test_compile_time_decisions_time_and_tune_the_triton_kernel(monkeypatch):
    """The traced choice and the traced tile config come from runs of the kernel the graph
    will launch: gluon=False, wherever the Gluon kernel would take an eager call."""
    from fp8compile.kernels import select

    xq, xs, wq, ws = _blockwise_eager(monkeypatch)
    seen = []

    def fake_mm(*args, gluon=True, **kwargs):
        seen.append(gluon)
        return torch.zeros(())
    monkeypatch.setattr(gemm, "scaled_mm", fake_mm)
    monkeypatch.setattr(select, "choose", lambda key, t, c: t() is not None and "triton")
    monkeypatch.delenv("FP8COMPILE_GEMM_BACKEND", raising=False)
    select._CHOICES.clear()
    monkeypatch.setattr(select, "_RULED", set())
    with torch._inductor.config.patch(max_autotune=True):  # M > 256: else cuBLAS by rule
        select._choose_traced(("k",), xq, xs, G.GROUP, wq, ws, G.BLOCK, None, torch.bfloat16,
                              "precise", "none", None, None, None)  # as if cuBLAS served it

    class Tuned:
        best_config = type("C", (), {"kwargs": {"BLOCK_M": 128, "BLOCK_N": 128},
                                     "num_warps": 8, "num_stages": 3})()
    monkeypatch.setattr(gemm, "_tuned", Tuned)
    gemm._COMPILE_TIME_CONFIGS.clear()
    gemm._compile_time_config(xq, xs, G.GROUP, wq, ws, G.BLOCK, None, torch.bfloat16,
                              "precise", "none", None)
    assert seen == [False, False]


@pytest.mark.parametrize("gluon_ms, want", [(0.90, "gluon"), (0.99, "triton")])
def test_traced_gemm_stays_an_opaque_call_where_the_gluon_kernel_wins(monkeypatch, gluon_ms,
                                                                      want):
    """Compile time: where cuBLAS cannot compute a GEMM that the Gluon kernel would serve
    eagerly (blockwise, K=256 here), the Gluon kernel is timed against the Triton kernel by
    the same margin.  Where it wins, the op is left opaque (it cannot be inlined) and its
    eager body runs it; where cuBLAS serves, the Gluon kernel is not timed."""
    from fp8compile.kernels import select
    from fp8compile.ops import gemm as ops_gemm

    xq, xs, wq, ws = _blockwise_eager(monkeypatch)
    ran = []
    monkeypatch.setattr(gemm, "scaled_mm",
                        lambda *a, gluon=True, **k: ran.append("gluon" if gluon else "triton"))
    monkeypatch.setattr(select, "cublas_scaled_mm", lambda *a, **k: ran.append("cublas"))
    ms = {"triton": 1.0, "cublas": 0.5, "gluon": gluon_ms}

    def faster(first, second):  # times by what each candidate ran; the module's margin
        first(), second()
        return "triton" if ms[ran[-2]] < (1 - select._TRITON_MARGIN) * ms[ran[-1]] else "cublas"
    monkeypatch.setattr(select, "_faster", faster)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(select, "_CHOICES", {})
    monkeypatch.delenv("FP8COMPILE_GEMM_BACKEND", raising=False)
    select.take_traced_choices()

    inlined = ops_gemm._decide_backend(xq, xs, "group", wq, ws, "block", None, torch.bfloat16,
                                       "precise", "none", None)
    assert inlined is (want != "gluon")
    key = select.gemm_key(xq, G.GROUP, wq, "precise", torch.bfloat16)
    assert select._CHOICES[key] == want and ran == ["gluon", "triton"]
    (noted, how), = select.take_traced_choices()
    assert noted == key and how.startswith(f"{want} (cuBLAS: blockwise cuBLAS needs K % 512")
    # a second graph with the same GEMM takes the choice without timing
    assert ops_gemm._decide_backend(xq, xs, "group", wq, ws, "block", None, torch.bfloat16,
                                    "precise", "none", None) is inlined
    assert ran == ["gluon", "triton"]
    # rowwise: cuBLAS computes it, and the Gluon kernel (at cuBLAS's speed) is not timed;
    # at M > 256 outside max-autotune nothing is: cuBLAS by rule
    rs, cs = torch.ones(512, 1), torch.ones(384, 1)
    monkeypatch.setattr(select, "_RULED", set())
    select.take_traced_choices()
    assert ops_gemm._decide_backend(xq, rs, "row", wq, cs, "row", None, torch.bfloat16,
                                    "fast", "none", None)
    assert ran[2:] == []
    (noted, how), = select.take_traced_choices()
    assert how == "cublas (by rule)"
    # the traced body dispatches through select.choose: it finds the rule's choice, and
    # times nothing inside the trace
    assert select.choose(noted, lambda: pytest.fail("timed"),
                         lambda: pytest.fail("timed")) == "cublas"
    with torch._inductor.config.patch(max_autotune=True):
        assert ops_gemm._decide_backend(xq, rs, "row", wq, cs, "row", None, torch.bfloat16,
                                        "fast", "none", None)
    assert ran[2:] == ["triton", "cublas"]
    (noted, how), = select.take_traced_choices()
    assert how == "cublas"


@pytest.mark.parametrize("gluon_ms, want", [(0.40, "gluon"), (0.49, "cublas")])
def test_traced_swiglu_times_the_fused_kernel_against_cublas(monkeypatch, gluon_ms, want):
    """Compile time, SwiGLU epilogue: only the Gluon kernel fuses it, so it is timed against
    cuBLAS followed by the SwiGLU's pointwise ops (the Triton kernel would compute those the
    same way after its product); the op stays opaque where the Gluon kernel wins."""
    from fp8compile.kernels import select
    from fp8compile.ops import gemm as ops_gemm

    _on_hopper(monkeypatch)
    xq, wq = _fp8(512, 256), _fp8(512, 256)
    rs, cs = torch.ones(512, 1), torch.ones(512, 1)
    ran = []
    monkeypatch.setattr(gemm, "scaled_mm",
                        lambda *a, gluon=True, **k: ran.append("gluon" if gluon else "triton"))
    monkeypatch.setattr(select, "cublas_scaled_mm", lambda *a, **k: ran.append("cublas"))
    ms = {"triton": 1.0, "cublas": 0.5, "gluon": gluon_ms}

    def faster(first, second):
        first(), second()
        return "triton" if ms[ran[-2]] < (1 - select._TRITON_MARGIN) * ms[ran[-1]] else "cublas"
    monkeypatch.setattr(select, "_faster", faster)
    monkeypatch.setattr(select, "_CHOICES", {})
    monkeypatch.setattr(select, "_RULED", set())
    monkeypatch.delenv("FP8COMPILE_GEMM_BACKEND", raising=False)
    with torch._inductor.config.patch(max_autotune=True):  # M > 256: timed when autotuning
        inlined = ops_gemm._decide_backend(xq, rs, "row", wq, cs, "row", None, torch.bfloat16,
                                           "fast", "swiglu", None)
    assert inlined is (want != "gluon") and ran == ["gluon", "cublas"]
    key = select.gemm_key(xq, G.ROW, wq, "fast", torch.bfloat16, activation="swiglu")
    assert select._CHOICES[key] == want
    # where the Gluon kernel won, the op's eager body (which runs it) takes the same choice
    eager = select.gemm_key(xq, G.ROW, wq, "fast", torch.bfloat16, True, "swiglu")
    assert select._CHOICES.get(eager) == ("triton" if want == "gluon" else None)


def _untimed_decisions(monkeypatch):
    """Row-scaled (512, 256) x (512, 256) operands on a stand-in Hopper GPU, with no choice
    made yet and any timing a failure; returns (xq, x scales, wq, w scales)."""
    from fp8compile.kernels import select

    _on_hopper(monkeypatch)
    monkeypatch.setattr(select, "_faster", lambda *a: pytest.fail("timed"))
    monkeypatch.setattr(select, "_CHOICES", {})
    monkeypatch.setattr(select, "_RULED", set())
    monkeypatch.delenv("FP8COMPILE_GEMM_BACKEND", raising=False)
    select.take_traced_choices()
    return _fp8(512, 256), torch.ones(512, 1), _fp8(512, 256), torch.ones(512, 1)


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("acc", ["fast", "precise"])
def test_traced_residual_gemm_takes_the_fused_kernel_by_rule(monkeypatch, count, acc):
    """M > 256 outside max-autotune: a GEMM with one or two residuals, which the Gluon kernel
    serves (either accumulation), stays an opaque call to it, untimed; where it does not
    serve it (a residual of another dtype than the output) the choice is timed as before."""
    from fp8compile.kernels import select
    from fp8compile.ops import gemm as ops_gemm

    xq, rs, wq, cs = _untimed_decisions(monkeypatch)
    res = [torch.zeros(512, 512, dtype=torch.bfloat16)] * count + [None] * (2 - count)
    assert not ops_gemm._decide_backend(xq, rs, "row", wq, cs, "row", None, torch.bfloat16,
                                        acc, "none", *res)
    (key, how), = select.take_traced_choices()
    assert how == "gluon (by rule)"
    assert select.describe_key(key).endswith(" + residual" if count == 1 else " + 2 residuals")
    monkeypatch.setattr(select, "_faster", lambda t, c: "cublas")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(gemm, "scaled_mm", lambda *a, **k: None)
    monkeypatch.setattr(select, "cublas_scaled_mm", lambda *a, **k: None)
    other = [r if r is None else r.half() for r in res]
    assert ops_gemm._decide_backend(xq, rs, "row", wq, cs, "row", None, torch.bfloat16,
                                    acc, "none", *other)
    (_, how), = select.take_traced_choices()
    assert how == "cublas"


def test_traced_swiglu_takes_the_fused_kernel_by_rule_outside_max_autotune(monkeypatch):
    """M > 256 outside max-autotune: the SwiGLU GEMM the fold made runs the Gluon kernel,
    untimed; the plan says it was a rule; the eager body takes the Gluon kernel untimed."""
    from fp8compile.kernels import select
    from fp8compile.ops import gemm as ops_gemm

    xq, rs, wq, cs = _untimed_decisions(monkeypatch)
    assert not ops_gemm._decide_backend(xq, rs, "row", wq, cs, "row", None, torch.bfloat16,
                                        "fast", "swiglu", None)
    (_, how), = select.take_traced_choices()
    assert how == "gluon (by rule)"
    eager = select.gemm_key(xq, G.ROW, wq, "fast", torch.bfloat16, True, "swiglu")
    assert select.choose(eager, lambda: pytest.fail("timed"),
                         lambda: pytest.fail("timed")) == "triton"
    key = select.gemm_key(xq, G.ROW, wq, "fast", torch.bfloat16, activation="swiglu")
    assert select.backend_choices()[key] == "gluon"
    # at M <= 256 (the split-K sizes) the choice is timed: the Gluon kernel does not serve
    # there, so it is the Triton kernel against cuBLAS
    monkeypatch.setattr(select, "_faster", lambda t, c: "triton")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(gemm, "scaled_mm", lambda *a, **k: None)
    monkeypatch.setattr(select, "cublas_scaled_mm", lambda *a, **k: None)
    small = _fp8(64, 256)
    assert ops_gemm._decide_backend(small, torch.ones(64, 1), "row", wq, cs, "row", None,
                                    torch.bfloat16, "fast", "none", None)
    (_, how), = select.take_traced_choices()
    assert how == "triton"


@needs_hopper
@pytest.mark.parametrize("xg, wg", [(G.ROW, G.ROW), (G.TENSOR, G.TENSOR)])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("m, n, k", [(300, 256, 96), (4100, 1024, 528)])
def test_fp8_output_is_the_static_cast_of_the_fp32_tile(xg, wg, swiglu, m, n, k):
    """An E4M3 output tile cast with a static scale in the epilogue: bit for bit the cast
    (numerics.quantize_with_scale) of the kernel's own fp32 output, saturation and a NaN
    row included; the same through the op."""
    x = torch.randn(m, k) * torch.rand(m, 1) * 3
    x[7, 5] = float("nan")
    w = torch.randn(n, k) * 0.05
    xq, xs = nx.quantize(x.cuda(), xg, Fp8Format.E4M3)
    wq, ws = nx.quantize(w.cuda(), wg, Fp8Format.E4M3)
    act = "swiglu" if swiglu else "none"
    scale = torch.tensor([0.05 / 448], device="cuda")  # some outputs saturate
    assert bw.unsupported(xq, xs, xg, wq, ws, wg, torch.float8_e4m3fn, act, False, True,
                          "fast") is None
    # The fp32 product of the same kernel where it can write one (its half-width SwiGLU
    # tile; a full fp32 tile does not fit in shared memory), else of the Triton kernel.
    y32 = gemm.scaled_mm(xq, xs, xg, wq, ws, wg, None, torch.float32, "fast", act,
                         gluon=swiglu)
    q = gemm.scaled_mm(xq, xs, xg, wq, ws, wg, None, torch.float8_e4m3fn, "fast", act,
                       out_scale=scale)
    want = nx.quantize_with_scale(y32, scale.reshape(()), G.TENSOR, Fp8Format.E4M3)
    nan = want.float().isnan()
    assert nan[7].all() and nan.sum() == want.shape[1]
    assert torch.equal(q.float().isnan(), nan)
    same = q.view(torch.uint8)[~nan] == want.view(torch.uint8)[~nan]
    if swiglu:
        assert same.all()
    else:  # another summation order: at most one FP8 step apart, mostly equal
        a, b = q.float()[~nan], want.float()[~nan]
        assert ((a - b).abs() <= b.abs() / 8 + 2.0 ** -9).all() and same.float().mean() > 0.9
    assert (q.float().abs() == 448).any()
    op = torch.ops.fp8compile.scaled_mm_quantized(xq, xs, xg.value, wq, ws, wg.value, None,
                                                  "fast", act, scale, "e4m3")
    assert torch.equal(op.view(torch.uint8), q.view(torch.uint8))


@needs_hopper
@pytest.mark.parametrize("scale", [3.0, 0.1, 1e-31])
def test_fp8_output_rounds_midpoints_as_the_division(scale):
    """The epilogue's quotient on E4M3 rounding midpoints: each output is 1 x (weight column
    scale) = RN(scale x midpoint), whose division by the scale gives the midpoint back, and
    the cast rounds it to even.  With scale 0.1 a plain reciprocal multiply lands beside 27
    of the 240 midpoints and rounds them the other way; the epilogue's quotient must not
    (``gl.fdiv(..., ieee_rounding=True)`` did).  Scale 1e-31 takes ``div_rn`` per element
    (the products stay above fp32's subnormals, which the GPU's multiply flushes)."""
    m, k = 512, 128
    fp8 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.unique(fp8[fp8.isfinite() & (fp8 > 2.0 ** -9)])
    mids = (grid[:-1] + grid[1:]) / 2
    mids = torch.cat([mids, -mids])[:256]
    n = mids.numel() - mids.numel() % 16
    col = (mids[:n].double() * scale).float()  # the product each output column gets
    xq = torch.zeros(m, k).to(torch.float8_e4m3fn)
    xq[torch.arange(m), torch.arange(m) % k] = 1.0
    wq = torch.ones(n, k).to(torch.float8_e4m3fn)
    s = torch.tensor([scale], dtype=torch.float32)
    q = gemm.scaled_mm(xq.cuda(), torch.ones(m, 1, device="cuda"), G.ROW, wq.cuda(),
                       col.reshape(n, 1).cuda(), G.ROW, None, torch.float8_e4m3fn, "fast",
                       "none", out_scale=s.cuda())
    want = nx.quantize_with_scale(col.expand(m, n), s.reshape(()), G.TENSOR, Fp8Format.E4M3)
    assert torch.equal(q.cpu().view(torch.uint8), want.view(torch.uint8))
    if scale == 0.1:  # the test can fail: a reciprocal multiply gives other bits
        plain = (col * (1 / s)).expand(m, n).to(torch.float8_e4m3fn)
        assert not torch.equal(plain.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.skipif(not bw.HAVE_GLUON, reason="this Triton has no Gluon Hopper API")
@pytest.mark.parametrize("case", [
    dict(xg=G.ROW, wg=G.ROW),
    dict(xg=G.TENSOR, wg=G.TENSOR, bias=True),
    dict(xg=G.ROW, wg=G.ROW, act="swiglu"),
    dict(xg=G.TENSOR, wg=G.TENSOR, act="swiglu", out=torch.float8_e4m3fn),
    dict(xg=G.TENSOR, wg=G.TENSOR, res=2, out=torch.float16),
    dict(xg=G.ROW, wg=G.TENSOR, res=1),
    dict(xg=G.GROUP, wg=G.BLOCK, acc="precise"),
    dict(xg=G.GROUP, wg=G.BLOCK, acc="precise", res=2),
], ids=["row", "tensor-bias", "swiglu", "swiglu-fp8-out", "two-residuals", "residual",
        "blockwise", "blockwise-two-residuals"])
def test_precompile_asks_for_the_launch_the_eager_call_makes(monkeypatch, case):
    """No GPU needed: from a traced call's operands (3-D x, a transposed weight), the
    compile started ahead gets the arguments that the eager call's launch gets, in all that
    the JIT specializes on (dtypes, sizes, strides, integer arguments, the constexprs), so
    the launch finds the compiled kernel in the cache."""
    xg, wg, act = case["xg"], case["wg"], case.get("act", "none")
    acc, out, res = case.get("acc", "fast"), case.get("out", torch.bfloat16), case.get("res", 0)
    m, n, k = 512, 512, 256
    x = torch.randn(2, m // 2, k)
    xq, xs = nx.quantize(x, xg, Fp8Format.E4M3)
    wq, ws = nx.quantize(torch.randn(n, k), wg, Fp8Format.E4M3)
    wq = wq.t().contiguous().t()  # not K-major: both calls copy it
    bias = torch.randn(n, dtype=torch.bfloat16) if case.get("bias") else None
    out_n = n // 2 if act == "swiglu" else n
    res_args = [torch.randn(2, m // 2, out_n, dtype=out) for _ in range(res)]
    res_args += [None] * (2 - res)
    scale = torch.tensor([0.1]) if out == torch.float8_e4m3fn else None
    launch = _Launch()
    monkeypatch.setattr(bw, "_blockwise_ws_kernel", launch)
    monkeypatch.setattr(gemm, "_gluon_takes", lambda *a, **k: True)
    monkeypatch.setattr(gemm, "_interpreting", lambda: False)
    monkeypatch.setattr(gemm, "contiguous_2d", torch.Tensor.contiguous)
    gemm.scaled_mm(xq, xs, xg, wq, ws, wg, bias, out, acc, act, res_args[0],
                   out_scale=scale, residual2=res_args[1])
    asked = []
    monkeypatch.setattr(bw, "precompile", lambda *a: asked.append(a) or True)
    assert gemm.precompile_gluon(xq, xs, xg, wq, ws, wg, bias, out, acc, act, *res_args,
                                 out_scale=scale)
    (args,) = asked
    assert args[-1] == xq.device and all(
        t is None or t.device.type == "meta" for t in (*args[:6], args[10], *args[11]))
    _, pre, pre_meta = bw._launch_args(*args[:-1], device=args[-1])
    assert pre_meta == launch.meta
    assert list(map(bw._arg_key, pre)) == list(map(bw._arg_key, launch.args))


def test_precompile_needs_static_shapes_and_a_gpu(monkeypatch):
    """Symbolic sizes or a CPU device: no compile is started (and nothing fails)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    xq, wq = _fp8(512, 256), _fp8(512, 256)
    asked = []
    monkeypatch.setattr(bw, "_compile", lambda *a: asked.append(a))
    monkeypatch.setattr(gemm, "_interpreting", lambda: False)
    args = (torch.ones(512, 1), G.ROW, wq, torch.ones(512, 1), G.ROW, None, torch.bfloat16,
            "fast", "none")
    assert not gemm.precompile_gluon(xq, *args)  # a CPU tensor
    m = ShapeEnv().create_unbacked_symint()
    traced = type("Traced", (), dict(shape=(m, 256), stride=lambda self: (256, 1),
                                     device=torch.device("cuda"), dtype=xq.dtype))()
    assert not gemm.precompile_gluon(traced, *args)
    assert asked == []


@needs_hopper
def test_precompiled_kernel_is_the_one_launched(monkeypatch):
    """On the GPU: a compile started ahead for a traced call's operands files the kernel the
    eager call then launches (no second compile), and the call's result is right."""
    import triton

    index = torch.cuda.current_device()
    cache = bw._blockwise_ws_kernel.device_caches[index][0]
    saved = dict(cache)
    cache.clear()
    monkeypatch.setattr(bw, "_STARTED", set())
    try:
        xg = wg = G.TENSOR
        m, n, k = 1000, 768, 4096
        xq, xs = nx.quantize(torch.randn(2, m // 2, k, device="cuda"), xg, Fp8Format.E4M3)
        wq, ws = nx.quantize(torch.randn(n, k, device="cuda") * 0.05, wg, Fp8Format.E4M3)
        r = torch.randn(2, m // 2, n, device="cuda", dtype=torch.bfloat16)
        assert gemm.precompile_gluon(xq, xs, xg, wq, ws, wg, None, torch.bfloat16, "fast",
                                     "none", r)
        assert not gemm.precompile_gluon(xq, xs, xg, wq, ws, wg, None, torch.bfloat16, "fast",
                                         "none", r)  # asked for once
        bw._await_precompiles()
        assert len(cache) == 1
        compiles = []
        real = triton.compile
        monkeypatch.setattr(bw._blockwise_ws_kernel, "compile",
                            lambda *a, **kw: compiles.append(1) or real(*a, **kw))
        y = gemm.scaled_mm(xq, xs, xg, wq, ws, wg, None, torch.bfloat16, "fast", "none", r)
        assert compiles == [] and len(cache) == 1
        want = scaled_mm_reference(xq, xs, xg, wq, ws, wg, None, torch.float32, "none",
                                   r.float())
        assert float((y.float() - want).norm() / want.norm()) < 1e-2
    finally:
        cache.clear()
        cache.update(saved)
