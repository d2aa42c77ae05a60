"""The decode-sized Gluon GEMM (Hopper): when it runs, how it is launched, what ptxas makes
of it, and its results against ops.scaled_mm_reference on the GPU."""

import os
import subprocess
import tempfile

import pytest
import torch

from fp8compile import numerics as nx
from fp8compile.kernels import decode_ws as dw
from fp8compile.kernels import gemm, gemv  # imported here: under the interpreter on a CPU
from fp8compile.numerics import Fp8Format, Granularity
from fp8compile.ops import scaled_mm_reference
from tests.kernels.test_blockwise_ws import _on_hopper, ptxas_in_fresh_process

G = Granularity
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not (HOPPER and dw.HAVE_GLUON),
                                  reason="the Gluon kernel runs on a Hopper GPU (sm_90) only")
needs_gluon = pytest.mark.skipif(not dw.HAVE_GLUON, reason="this Triton has no Gluon Hopper API")
RECIPES = {"blockwise": (G.GROUP, G.BLOCK, "precise"), "row fast": (G.ROW, G.ROW, "fast"),
           "row precise": (G.ROW, G.ROW, "precise"), "tensor fast": (G.TENSOR, G.TENSOR, "fast"),
           "tensor x row precise": (G.TENSOR, G.ROW, "precise")}


@pytest.fixture(autouse=True)
def _decode_kernel_on(monkeypatch):
    """The kernel is on by default; a switch left in the environment must not turn it off."""
    for name in ("FP8COMPILE_DECODE_GLUON", "FP8COMPILE_GLUON"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("switch", ["FP8COMPILE_DECODE_GLUON", "FP8COMPILE_GLUON"])
def test_switches_turn_it_off(monkeypatch, switch):
    monkeypatch.setenv(switch, "1")
    assert f"{switch}=0" not in str(_why())
    monkeypatch.setenv(switch, "0")
    assert _why() == f"disabled by {switch}=0"
    from fp8compile import _cache_key

    assert "FP8COMPILE_DECODE_GLUON" in _cache_key.TRACE_SWITCHES


def _fp8(*shape, device="cpu"):
    return torch.zeros(*shape, device=device).to(torch.float8_e4m3fn)


def _scales(xg, wg, m, n, k):
    kb = -(-k // 128)
    sx = {G.GROUP: torch.ones(m, kb), G.ROW: torch.ones(m, 1), G.TENSOR: torch.ones(())}[xg]
    sw = {G.BLOCK: torch.ones(-(-n // 128), kb), G.ROW: torch.ones(n, 1),
          G.TENSOR: torch.ones(())}[wg]
    return sx, sw


def _why(m=4, n=256, k=512, xg=G.GROUP, wg=G.BLOCK, out=torch.bfloat16, act="none", res=0,
         xq=None, wq=None, xs=None):
    xq = _fp8(m, k) if xq is None else xq
    wq = _fp8(n, k) if wq is None else wq
    sx, sw = _scales(xg, wg, m, n, k)
    return dw.unsupported(xq, sx if xs is None else xs, xg, wq, sw, wg, out, act, res)


@pytest.mark.parametrize("case, reason", [
    (dict(xg=G.GROUP, wg=G.ROW), "only 1x128 activation groups"),
    (dict(xg=G.ROW, wg=G.BLOCK), "only 1x128 activation groups"),
    (dict(act="silu"), "no silu epilogue"),
    (dict(act="swiglu"), "no swiglu epilogue"),
    (dict(res=3), "3 residuals: the epilogue adds two at most"),
    (dict(wq=_fp8(256, 512).to(torch.float8_e5m2)), "one FP8 format"),
    (dict(xs=torch.ones(4, 4, dtype=torch.float64)), "fp32 scales"),
    (dict(out=torch.float8_e4m3fn), "bf16, fp16 or fp32 only"),
    (dict(m=dw.MAX_M + 1), f"the decode kernel takes 1 to {dw.MAX_M} rows"),
    (dict(m=0), "the decode kernel takes 1 to"),
    (dict(k=520), "K % 16 == 0"),
    (dict(xq=_fp8(4, 1024)[:, :512]), "contiguous and K-major"),
    (dict(), "Hopper GPU" if dw.HAVE_GLUON else "no Gluon"),
], ids=lambda v: str(v)[:40])
def test_unsupported_names_the_rule(case, reason):
    if HOPPER and not case:
        pytest.skip("on a Hopper GPU the plain case is supported")
    assert reason in _why(**case)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("res", [0, 1, 2])
@pytest.mark.parametrize("out", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m, n, k", [(1, 14336, 4096), (dw.MAX_M, 200, 1040)])
def test_unsupported_takes_every_recipe_output_and_residual_count(recipe, res, out, m, n, k):
    xg, wg, _ = RECIPES[recipe]
    why = _why(m=m, n=n, k=k, xg=xg, wg=wg, out=out, res=res)
    assert why is None or "Hopper" in why or "Gluon" in why, why


def test_narrow_weights_split_k_until_the_sms_fill(monkeypatch):
    """A program owns all of K where the 64-row column tiles fill the SMs; a narrower weight
    splits K into up to two programs per SM, each split keeping four K tiles at least, and
    one that cannot fill the SMs even so stays on the Triton kernel."""
    sms = 132
    monkeypatch.setattr(dw.tuning, "num_sms", lambda device: sms)
    assert dw.launch_split(132 * 64, 4096, sms) == 1
    assert dw.launch_split(14336, 14336, sms) == 1
    assert dw.launch_split(4096, 4096, sms) == 4  # 64 tiles: 264 // 64, 32 K tiles
    assert dw.launch_split(4096, 14336, sms) == 4
    assert dw.launch_split(131 * 64, 4096, sms) == 2  # 264 // 131
    assert dw.launch_split(67 * 64, 4096, sms) == 3
    assert dw.launch_split(4096, 1024, sms) == 2  # 8 K tiles: splits of four
    assert dw.launch_split(256, 512, sms) == 1
    assert _why(n=132 * 64) is None or "column tiles" not in _why(n=132 * 64)
    assert _why(n=4096, k=4096) is None or "column tiles" not in _why(n=4096, k=4096)
    assert ("N=4096, K=1024: 64 column tiles of 64 in 2 split(s) of K leave some of the 132 "
            "SMs idle") in _why(n=4096, k=1024)
    assert "4 column tiles of 64 in 1 split(s)" in _why(n=256, k=512)


class _Launch:
    """Stands in for the Gluon kernel: records the launch instead of running it."""

    def __init__(self):
        self.grid = self.args = self.meta = None

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.grid, self.args, self.meta = grid, args, meta
        return launch


@needs_gluon
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_scales_and_mode_reach_the_kernel_by_recipe(monkeypatch, recipe):
    """No GPU needed: which tensor each scale argument points at, with which strides, and the
    kernel's mode: blockwise promotes whatever the accumulation; row/tensor scales (stride
    0 for one element) add each K block unscaled (precise) or chain them (fast)."""
    xg, wg, acc = RECIPES[recipe]
    m, n, k = 5, 14336, 4096
    sx, sw = _scales(xg, wg, m, n, k)
    launch = _Launch()
    monkeypatch.setattr(dw, "_decode_kernel", launch)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    dw.decode_mm(_fp8(m, k), sx, _fp8(n, k), sw, None, out, xg, wg, acc)
    (w_d, x_d, as_ptr, ws_ptr, bias_ptr, r1, r2, out_ptr, part, cnt, mm, nn, kk, sa0, sa1,
     sw0, sw1, stride_om) = launch.args
    assert (w_d.block_shape, x_d.block_shape) == ([64, 128], [16, 128])
    assert (mm, nn, kk) == (m, n, k) and as_ptr is sx and ws_ptr is sw and out_ptr is out
    assert launch.grid == (n // 64, 1) and stride_om == n and launch.meta["SPLIT"] == 1
    assert bias_ptr is out and r1 is out and r2 is out  # unread
    assert part is out and cnt is out  # no split: unread
    assert launch.meta["HAS_BIAS"] is False and launch.meta["RES"] == 0
    mode = {"blockwise": 0, "fast": 2, "precise": 1}["blockwise" if xg is G.GROUP else acc]
    assert launch.meta["MODE"] == mode
    if xg is G.GROUP:
        assert (sa0, sa1, sw0, sw1) == (*sx.stride(), *sw.stride())
    else:
        assert (sa0, sa1) == ((1 if xg is G.ROW else 0), 0)
        assert (sw0, sw1) == ((1 if wg is G.ROW else 0), 0)


@needs_gluon
def test_bias_and_residuals_are_read_in_order(monkeypatch):
    m, n, k = 1, 8500, 4096
    launch = _Launch()
    monkeypatch.setattr(dw, "_decode_kernel", launch)
    out = torch.empty(m, n, dtype=torch.float32)
    r1, r2 = torch.zeros(m, n), torch.ones(m, n)
    bias = torch.zeros(n, dtype=torch.bfloat16)
    dw.decode_mm(_fp8(m, k), torch.ones(m, 32), _fp8(n, k), torch.ones(67, 32), bias, out,
                 residuals=(r1, r2))
    args = launch.args
    assert launch.grid == (133, 1) and args[4] is bias and args[5] is r1 and args[6] is r2
    assert args[17] == n  # the residuals' row stride
    assert launch.meta["HAS_BIAS"] is True and launch.meta["RES"] == 2


@needs_gluon
@pytest.mark.parametrize("split, want", [(None, 4), (3, 3), (1, 1), (64, 32)])
def test_split_launch_takes_partials_and_counters(monkeypatch, split, want):
    """A split launch: a grid of (column tiles, splits), fp32 partials of split x M x N and
    the launcher's per-tile counters; a split past the K tiles is cut to one per tile."""
    monkeypatch.setattr(dw.tuning, "num_sms", lambda device: 132)
    gemm._COUNTERS.clear()
    m, n, k = 3, 4096, 4096
    launch = _Launch()
    monkeypatch.setattr(dw, "_decode_kernel", launch)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    dw.decode_mm(_fp8(m, k), torch.ones(m, 32), _fp8(n, k), torch.ones(32, 32), None, out,
                 split=split)
    part, cnt = launch.args[8:10]
    assert launch.grid == (64, want) and launch.meta["SPLIT"] == want
    if want == 1:
        assert part is out and cnt is out
    else:
        assert part.dtype == torch.float32 and part.numel() == want * m * n
        # the launcher's per-stream counters, shared with the Triton kernel's folds
        assert cnt is gemm._tile_counters(torch.device("cpu"), 64) and cnt.numel() >= 64


@needs_gluon
@pytest.mark.parametrize("case, match", [
    (dict(residuals=(torch.zeros(2, 64, dtype=torch.float32),)), "laid out as the output"),
    (dict(residuals=(torch.zeros(2, 64, dtype=torch.bfloat16),) * 3), "at most two residuals"),
])
def test_decode_mm_rejects_bad_residuals(case, match):
    out = torch.empty(2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        dw.decode_mm(_fp8(2, 256), torch.ones(2, 2), _fp8(64, 256), torch.ones(1, 2), None, out,
                     **case)


def test_gluon_serves_static_decode_sizes_without_activation(monkeypatch):
    from fp8compile.ops._inline import _tracing

    _on_hopper(monkeypatch, dw)
    k, n = 512, 256
    args = (torch.bfloat16, "none", None)
    for m in (1, dw.MAX_M):
        sx, sw = _scales(G.GROUP, G.BLOCK, m, n, k)
        assert gemm.gluon_serves(_fp8(m, k), sx, G.GROUP, _fp8(n, k), sw, G.BLOCK, *args)
        assert not gemm.gluon_serves(_fp8(m, k), sx, G.GROUP, _fp8(n, k), sw, G.BLOCK,
                                     torch.bfloat16, "gelu", None)
        with _tracing():  # a graph being traced launches the Triton kernel
            assert not gemm.gluon_serves(_fp8(m, k), sx, G.GROUP, _fp8(n, k), sw, G.BLOCK,
                                         *args)
    m = dw.MAX_M + 1  # neither Gluon kernel: below blockwise_ws's sizes
    sx, sw = _scales(G.GROUP, G.BLOCK, m, n, k)
    assert not gemm.gluon_serves(_fp8(m, k), sx, G.GROUP, _fp8(n, k), sw, G.BLOCK, *args)


@pytest.mark.parametrize("m", [1, 3, dw.MAX_M])
def test_scaled_mm_launches_the_decode_kernel(monkeypatch, m):
    """An eager decode-sized GEMM (here (1, M, K), with a residual) goes here, the residual
    as a contiguous (M, N) tensor; ``gluon=False`` keeps the one-row CUDA-core kernel (the
    Triton kernel above one row), as the compile-time decisions need."""
    _on_hopper(monkeypatch, dw)
    n, k = 256, 512
    calls = []
    monkeypatch.setattr(dw, "decode_mm", lambda *a, **kw: calls.append(a) or a[5])
    xq, wq = _fp8(1, m, k), _fp8(n, k)
    sx, sw = torch.ones(1, m, 1), torch.ones(n, 1)
    res = torch.zeros(1, m, n, dtype=torch.bfloat16)
    y = gemm.scaled_mm(xq, sx, G.ROW, wq, sw, G.ROW, None, torch.bfloat16, "fast", "none", res)
    (a, xs2, w, ws2, bias, out, xg, wg, acc, residuals), = calls
    assert a.shape == (m, k) and out.shape == (m, n) and y.shape == (1, m, n)
    assert (xg, wg, acc) == (G.ROW, G.ROW, "fast") and bias is None
    assert len(residuals) == 1 and residuals[0].shape == (m, n)
    assert residuals[0].is_contiguous()
    if m == 1:  # gluon=False: the one-row CUDA-core kernel, stubbed here
        monkeypatch.setattr(gemv, "gemv_2d", lambda *a, **kw: calls.append("gemv"))
        gemm.scaled_mm(xq, sx, G.ROW, wq, sw, G.ROW, None, torch.bfloat16, "fast", "none", res,
                       gluon=False)
        assert calls[1:] == ["gemv"]


@needs_gluon
def test_precompile_leaves_the_decode_kernel_to_its_first_launch(monkeypatch):
    _on_hopper(monkeypatch, dw)
    started = []
    monkeypatch.setattr(gemm.blockwise_ws, "precompile", lambda *a, **k: started.append(1))
    sx, sw = _scales(G.GROUP, G.BLOCK, 1, 256, 512)
    assert gemm.precompile_gluon(_fp8(1, 512), sx, G.GROUP, _fp8(256, 512), sw, G.BLOCK, None,
                                 torch.bfloat16, "precise", "none") is False
    assert started == []


def _ptxas_report(mode: int, res: int, split: int) -> str:
    """ptxas -v on the kernel compiled for sm_90a, in a fresh process (see
    tests/kernels/test_blockwise_ws.py: the interpreter's patches break Gluon compiles)."""
    return ptxas_in_fresh_process("tests.kernels.test_decode_ws", f"{mode}, {res}, {split}")


def _ptxas_in_process(mode: int, res: int, split: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from fp8compile.kernels.resources import ptxas_sm90

    w_l = gl.NVMMASharedLayout.get_default_for([dw.BLOCK_N, dw.BLOCK_K], gl.float8e4nv)
    x_l = gl.NVMMASharedLayout.get_default_for([dw.BLOCK_T, dw.BLOCK_K], gl.float8e4nv)
    sig = {"w_desc": f"tensordesc<fp8e4nv[{dw.BLOCK_N}, {dw.BLOCK_K}],{w_l!r}>",
           "x_desc": f"tensordesc<fp8e4nv[{dw.BLOCK_T}, {dw.BLOCK_K}],{x_l!r}>",
           "as_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*bf16", "r1_ptr": "*bf16",
           "r2_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32", "cnt_ptr": "*i32"}
    sig.update({name: "i32" for name in ("M", "N", "K", "stride_as0", "stride_as1",
                                         "stride_ws0", "stride_ws1", "stride_om")})
    consts = dict(STAGES=dw.STAGES, MODE=mode, SPLIT=split, HAS_BIAS=True, RES=res)
    sig.update({name: "constexpr" for name in consts})
    kernel = triton.compile(GluonASTSource(fn=dw._decode_kernel, signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        done = subprocess.run([ptxas_sm90(), "-arch=sm_90a", "-v", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    assert done.returncode == 0, f"ptxas exit {done.returncode}: {done.stderr[-2000:]}"
    return done.stderr


@needs_gluon
@pytest.mark.parametrize("mode, res, split", [(0, 0, 1), (1, 0, 1), (2, 0, 1), (0, 2, 1),
                                              (2, 1, 1), (0, 2, 4), (1, 1, 5), (2, 0, 2)],
                         ids=["promoted", "precise", "fast", "promoted-two-residuals",
                              "fast-residual", "promoted-split", "precise-split",
                              "fast-split"])
def test_compiles_for_sm90a_without_spills(mode, res, split):
    from fp8compile.kernels.resources import tools_available

    if not tools_available():
        pytest.skip("Triton's NVIDIA tools (ptxas) are not installed")
    report = _ptxas_report(mode, res, split)
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report


# ------------------------------------------------------------------------------------------
# On the GPU


def _operands(m, n, k, xg, wg, fmt=Fp8Format.E4M3):
    x = (torch.randn(m, k) * torch.rand(k) * 3).cuda()
    w = (torch.randn(n, k) * 0.05).cuda()
    return (*nx.quantize(x, xg, fmt), *nx.quantize(w, wg, fmt))


def _check(xq, xs, wq, ws, xg, wg, acc, out_dtype, bias=True, res=0, split=None):
    m, n = xq.shape[0], wq.shape[0]
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    residuals = tuple(torch.randn(m, n, device="cuda").to(out_dtype) for _ in range(res))
    if split is None:  # a forced split may run where the launcher's rule would not
        assert dw.unsupported(xq, xs, xg, wq, ws, wg, out_dtype, "none", res) is None
    out = torch.empty(m, n, device="cuda", dtype=out_dtype)
    y = dw.decode_mm(xq, xs, wq, ws, b, out, xg, wg, acc, residuals, split=split)
    r1, r2 = (residuals + (None, None))[:2]
    ref = scaled_mm_reference(xq, xs, xg, wq, ws, wg, b, torch.float32, "none", r1, r2)
    if acc == "fast" and xg is not G.GROUP:
        # One tensor-core accumulator over K, as the Triton kernel's fast path, which loses
        # up to ~2% on single outputs at K=4096 (the order of K blocks differs here): held
        # to the Triton kernel by the error over the whole output, both rounded to out_dtype
        # (a bf16 rounding alone is ~1e-3 of the norm, several times the accumulation's).
        triton = gemm.scaled_mm(xq, xs, xg, wq, ws, wg, b, out_dtype, "fast",
                                residual=r1, residual2=r2, gluon=False, gemv=False)

        def err(t):
            return ((t.float() - ref).norm() / ref.norm()).item()
        assert err(y) <= 1.25 * err(triton) + 1e-4, (err(y), err(triton))
    else:
        # Promoted to fp32 every 128 of K like the reference, in another order; inside a
        # block the tensor core adds FP8 products with its reduced-precision accumulator
        # (SPEC §4), as cuBLAS's and the warp-specialized kernel's blockwise GEMMs do
        atol, rtol = (2e-2, 1.6e-2) if out_dtype != torch.float32 else (1e-2, 1e-2)
        torch.testing.assert_close(y.float(), ref, atol=atol, rtol=rtol)
    return y


@needs_hopper
@pytest.mark.parametrize("recipe", list(RECIPES))
# N not a multiple of the tile, K not of 128; fewer K tiles than stages, and many more
@pytest.mark.parametrize("m, n, k", [(1, 8448, 384), (3, 8500, 1040), (dw.MAX_M, 14336, 4096),
                                     (5, 9000, 14336)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_matches_reference(recipe, m, n, k, out_dtype):
    xg, wg, acc = RECIPES[recipe]
    _check(*_operands(m, n, k, xg, wg), xg, wg, acc, out_dtype)


@needs_hopper
@pytest.mark.parametrize("recipe", ["blockwise", "row fast"])
@pytest.mark.parametrize("res", [1, 2])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_residuals_and_no_bias(recipe, res, out_dtype):
    xg, wg, acc = RECIPES[recipe]
    _check(*_operands(4, 8500, 4096, xg, wg), xg, wg, acc, out_dtype, bias=False, res=res)


@needs_hopper
@pytest.mark.parametrize("n, k, fmt, split", [(8448, 1024, Fp8Format.E5M2, None),
                                              (4096, 4096, Fp8Format.E4M3, 4)],
                         ids=["e5m2-whole-k", "e4m3-split"])
def test_nan_row_and_zero_rows(n, k, fmt, split):
    """A NaN in one row's last split of K reaches that row alone, through the partials' sum
    where K is split; an all-zero row gives zeros."""
    m = 4
    x = torch.randn(m, k, device="cuda")
    x[1, k - 7] = float("nan")
    x[2] = 0.0
    xq, xs = nx.quantize(x, G.GROUP, fmt)
    wq, ws = nx.quantize(torch.randn(n, k, device="cuda") * 0.05, G.BLOCK, fmt)
    out = torch.empty(m, n, device="cuda", dtype=torch.float32)
    y = dw.decode_mm(xq, xs, wq, ws, None, out, split=split)
    assert y[1].isnan().all() and not y[[0, 2, 3]].isnan().any()
    assert (y[2] == 0).all()
    ref = scaled_mm_reference(xq, xs, G.GROUP, wq, ws, G.BLOCK, None, torch.float32, "none",
                              None)
    torch.testing.assert_close(y[[0, 3]], ref[[0, 3]], atol=1e-2, rtol=1e-2)


@needs_hopper
def test_graph_replays_give_the_eager_bits():
    xq, xs, wq, ws = _operands(2, 8448, 4096, G.GROUP, G.BLOCK)
    out = torch.empty(2, 8448, device="cuda", dtype=torch.bfloat16)
    want = dw.decode_mm(xq, xs, wq, ws, None, out).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dw.decode_mm(xq, xs, wq, ws, None, out)
    out.zero_()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@needs_hopper
@pytest.mark.parametrize("recipe", ["blockwise", "row precise"])
def test_scaled_mm_runs_it_on_3d_and_transposed_inputs(recipe):
    """Through the launcher: a (B, T, K) input of decode size and a transposed one (copied
    K-major first) give the reference's product."""
    xg, wg, acc = RECIPES[recipe]
    xq, xs, wq, ws = _operands(6, 8448, 768, xg, wg)
    ref = scaled_mm_reference(xq, xs, xg, wq, ws, wg, None, torch.float32, "none", None)
    y = gemm.scaled_mm(xq.reshape(2, 3, 768), xs.reshape(2, 3, -1), xg, wq, ws, wg, None,
                       torch.float32, acc)
    torch.testing.assert_close(y.reshape(6, 8448), ref, atol=1e-2, rtol=1e-2)
    xt = xq.t().contiguous().t()
    torch.testing.assert_close(gemm.scaled_mm(xt, xs, xg, wq, ws, wg, None, torch.float32,
                                              acc), ref, atol=1e-2, rtol=1e-2)


@needs_hopper
@pytest.mark.parametrize("recipe", list(RECIPES))
# the launcher's split of a 4096-row weight; K tiles not a multiple of the split (9 in 3,
# 33 in 7); a column tile past N; one K tile per split
@pytest.mark.parametrize("m, n, k, split", [(1, 4096, 4096, None), (dw.MAX_M, 4100, 1040, 3),
                                            (5, 300, 4160, 7), (2, 192, 512, 4)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_split_matches_reference(recipe, m, n, k, split, out_dtype):
    xg, wg, acc = RECIPES[recipe]
    _check(*_operands(m, n, k, xg, wg), xg, wg, acc, out_dtype, res=1 if split else 0,
           split=split)


@needs_hopper
def test_split_sums_in_one_order_and_leaves_the_counters_zero():
    """The last program adds the partials in split order, whichever arrives last: the same
    bits launch after launch and under graph replays, and the counters are zero after each
    launch (else the next launch's programs would miscount)."""
    xq, xs, wq, ws = _operands(3, 4096, 4096, G.GROUP, G.BLOCK)
    out = torch.empty(3, 4096, device="cuda", dtype=torch.bfloat16)
    want = dw.decode_mm(xq, xs, wq, ws, None, out, split=5).clone()
    counters = gemm._tile_counters(xq.device, 64)  # the eager launches' buffer
    for _ in range(10):
        out.fill_(float("nan"))  # a launch whose last program missed its count writes nothing
        assert torch.equal(dw.decode_mm(xq, xs, wq, ws, None, out, split=5), want)
    torch.cuda.synchronize()
    assert not counters.any()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dw.decode_mm(xq, xs, wq, ws, None, out, split=5)
    out.zero_()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    # the graph counted in a slice of the arena, and left it zero too
    assert torch.equal(out, want) and not counters.any()
    assert not gemm._ARENAS[xq.device][0].any()
    # and eager launches after the replays still find zeros
    out.fill_(float("nan"))
    assert torch.equal(dw.decode_mm(xq, xs, wq, ws, None, out, split=5), want)
