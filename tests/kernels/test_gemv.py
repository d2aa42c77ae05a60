"""The one-row FP8 GEMM (CUDA cores) vs ops.scaled_mm_reference: every recipe, epilogue,
launch, odd shape and bad input."""

import pytest
import torch

from fp8compile import numerics as nx
from fp8compile.kernels.gemv import default_launch, scaled_gemv
from fp8compile.numerics import Fp8Format, Granularity
from fp8compile.ops import scaled_mm_reference

G = Granularity
RECIPES = [(G.GROUP, G.BLOCK), (G.ROW, G.ROW), (G.TENSOR, G.TENSOR), (G.GROUP, G.GROUP),
           (G.ROW, G.BLOCK), (G.BLOCK, G.BLOCK)]


def _operands(device, x_shape, n, recipe, fmt=Fp8Format.E4M3):
    xg, wg = recipe
    x = torch.randn(x_shape) * torch.rand(x_shape[-1]) * 3
    w = torch.randn(n, x_shape[-1]) * 0.05 * torch.rand(n, 1) * 2
    xq, xs = nx.quantize(x.to(device), xg, fmt)
    wq, ws = nx.quantize(w.to(device), wg, fmt)
    return xq, xs, wq, ws


def _reference(xq, xs, wq, ws, recipe, bias=None, out_dtype=torch.float32, activation="none",
               residual=None):
    return scaled_mm_reference(xq, xs, recipe[0], wq, ws, recipe[1], bias, out_dtype,
                               activation, residual)


def _assert_fp32_rounding(y, xq, xs, wq, ws, recipe):
    """``y`` is the reference up to fp32 summation order: within 1e-5 of the sum of the
    products' magnitudes (the bound on reordering error grows with it, not with the
    possibly cancelling sum), where a wrong scale or a lost K step is off by whole terms."""
    ref = _reference(xq, xs, wq, ws, recipe).cpu()
    size = _reference(*(t.float().abs().to(t.dtype) for t in (xq, xs, wq, ws)), recipe).cpu()
    err = (y.cpu() - ref).abs()
    assert bool((err <= 1e-5 * size + 1e-6).all()), (err.max().item(), (err / size).max().item())


def _gemv(xq, xs, wq, ws, recipe, **kw):
    return scaled_gemv(xq, xs, recipe[0], wq, ws, recipe[1], **kw)


def _count_launches(monkeypatch) -> list:
    """A list that grows by one at each launch of the kernel (``kernels.gemv.gemv_2d``,
    which :func:`scaled_gemv` and ``kernels.scaled_mm`` call)."""
    from fp8compile.kernels import gemv as gemv_mod

    calls, real = [], gemv_mod.gemv_2d
    monkeypatch.setattr(gemv_mod, "gemv_2d", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r[0]}x{r[1]}")
@pytest.mark.parametrize("x_shape, n", [((1, 256), 384), ((1, 200), 130), ((1, 1, 1000), 77),
                                        ((1, 128), 1), ((1, 4096), 256)])
def test_matches_reference_in_fp32(device, recipe, x_shape, n):
    """fp32 products and sums, scales along K applied per 128: the reference to fp32
    summation order, with N and K not multiples of the tile (edge columns wrap, the last
    step of K masks its weights and its scales), a 3-D x and N = 1."""
    if recipe[0] is G.BLOCK and len(x_shape) != 2:
        pytest.skip("128x128 activation scales are of a 2-D x")
    xq, xs, wq, ws = _operands(device, x_shape, n, recipe)
    y = _gemv(xq, xs, wq, ws, recipe, out_dtype=torch.float32)
    assert y.shape == (*x_shape[:-1], n) and y.dtype == torch.float32
    _assert_fp32_rounding(y, xq, xs, wq, ws, recipe)


@pytest.mark.parametrize("recipe", RECIPES[:3], ids=lambda r: f"{r[0]}x{r[1]}")
@pytest.mark.parametrize("block_n, block_k, warps",
                         [(8, 128, 1), (16, 256, 2), (4, 512, 4), (64, 128, 4), (8, 1024, 8),
                          (8, 2048, 4)])
def test_launches_agree_and_each_is_deterministic(device, recipe, block_n, block_k, warps):
    """Every launch gives the reference to fp32 rounding (each 128's sum follows the thread
    layout, so launches may differ in the last bits) with K ending mid-step or within the
    first step; one launch run twice gives the same bits."""
    xq, xs, wq, ws = _operands(device, (1, 1000), 70, recipe)

    def run():
        return _gemv(xq, xs, wq, ws, recipe, out_dtype=torch.float32, block_n=block_n,
                     block_k=block_k, num_warps=warps)

    y = run()
    assert torch.equal(y, run())
    _assert_fp32_rounding(y, xq, xs, wq, ws, recipe)


@pytest.mark.parametrize("activation", ["none", "gelu", "silu", "relu"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_epilogue_bias_activation_residual(device, activation, out_dtype):
    """The tensor-core kernel's epilogue: bias, activation, residual in fp32, one rounding;
    a residual of shape (N,) broadcasts over the row."""
    recipe = (G.GROUP, G.BLOCK)
    xq, xs, wq, ws = _operands(device, (1, 384), 200, recipe)
    bias = torch.randn(200, device=device).to(out_dtype)
    residual = torch.randn(200, device=device).to(out_dtype)
    y = _gemv(xq, xs, wq, ws, recipe, bias=bias, out_dtype=out_dtype, activation=activation,
              residual=residual)
    ref = _reference(xq, xs, wq, ws, recipe, bias, torch.float32, activation,
                     residual.float()).to(out_dtype)
    assert y.dtype == out_dtype
    torch.testing.assert_close(y.float().cpu(), ref.float().cpu(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("fmt", list(Fp8Format))
def test_nan_inf_and_zero_rows(device, fmt):
    """A NaN in x makes every output NaN; an all-zero x gives zeros (its scale is the 1e-12
    floor's); E5M2 infinities give Inf or NaN as the reference's.  NaN and Inf are checked
    on the GPU: under the interpreter the FP8 -> fp32 cast loses both (SPEC §4)."""
    recipe = (G.GROUP, G.BLOCK)
    wq, ws = nx.quantize((torch.randn(130, 256) * 0.05).to(device), recipe[1], fmt)
    zero = nx.quantize(torch.zeros(1, 256, device=device), recipe[0], fmt)
    y = _gemv(*zero, wq, ws, recipe, out_dtype=torch.float32).cpu()
    assert torch.equal(y, torch.zeros(1, 130))
    if device != "cuda":
        return
    x = torch.randn(1, 256)
    x[0, 3] = float("nan")
    xq, xs = nx.quantize(x.to(device), recipe[0], fmt)
    assert _gemv(xq, xs, wq, ws, recipe, out_dtype=torch.float32).isnan().all()

    e5 = Fp8Format.E5M2
    xq = torch.randn(1, 128).to(e5.dtype)
    xq[0, 0] = float("inf")
    one = torch.ones(1)
    wq = (torch.randn(64, 128) * 0.05).to(e5.dtype)
    y = scaled_gemv(xq.to(device), one.to(device), G.TENSOR, wq.to(device), one.to(device),
                    G.TENSOR, out_dtype=torch.float32).cpu()
    ref = _reference(xq, one, wq, one, (G.TENSOR, G.TENSOR))
    assert y.isinf().any() and torch.equal(y.isinf(), ref.isinf())
    assert torch.equal(y.isnan(), ref.isnan())


def test_non_contiguous_operands_are_copied_k_major(device):
    recipe = (G.ROW, G.ROW)
    xq, xs, wq, ws = _operands(device, (1, 256), 192, recipe)
    wq_t = wq.t().contiguous().t()  # (N, K) with K strided
    xq_s = torch.stack([xq, xq], -1)[..., 0]  # (1, K) with K strided
    assert xq_s.stride(-1) != 1 and wq_t.stride(-1) != 1
    y = _gemv(xq_s, xs, wq_t, ws, recipe, out_dtype=torch.float32)
    _assert_fp32_rounding(y, xq, xs, wq, ws, recipe)


def test_empty_n(device):
    recipe = (G.ROW, G.ROW)
    xq, xs, wq, ws = _operands(device, (1, 256), 0, recipe)
    assert _gemv(xq, xs, wq, ws, recipe).shape == (1, 0)


def test_default_launch_takes_shorter_steps_when_programs_are_many():
    """Steps of 1024 while the 8-column programs number at most four per SM, 512 past that
    (H200 sweep: 4096 columns took 1024, 14336 took 512)."""
    cpu = torch.device("cpu")  # four stand-in SMs (kernels.tuning.num_sms)
    assert default_launch(128, cpu) == {"block_n": 8, "block_k": 1024, "num_warps": 4}
    assert default_launch(136, cpu)["block_k"] == 512
    if torch.cuda.is_available() and torch.cuda.get_device_properties(0).multi_processor_count \
            == 132:
        assert default_launch(4096, torch.device("cuda"))["block_k"] == 1024
        assert default_launch(14336, torch.device("cuda"))["block_k"] == 512


def test_bad_input_is_refused(device):
    recipe = (G.GROUP, G.BLOCK)
    xq, xs, wq, ws = _operands(device, (2, 256), 128, recipe)
    with pytest.raises(ValueError, match="M=2 rows"):
        _gemv(xq, xs, wq, ws, recipe)
    xq, xs, wq, ws = _operands(device, (1, 256), 128, recipe)
    with pytest.raises(ValueError, match="one FP8 dtype"):
        _gemv(xq.float(), xs, wq, ws, recipe)
    with pytest.raises(ValueError, match="one FP8 dtype"):
        _gemv(xq, xs, wq.to(torch.float8_e5m2), ws, recipe)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        _gemv(xq, xs, wq[:, :128], ws, recipe)
    with pytest.raises(ValueError, match="swiglu"):
        _gemv(xq, xs, wq, ws, recipe, activation="swiglu")
    with pytest.raises(ValueError, match="out_dtype"):
        _gemv(xq, xs, wq, ws, recipe, out_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="block_n=24"):
        _gemv(xq, xs, wq, ws, recipe, block_n=24)
    for block_k in (64, 384):
        with pytest.raises(ValueError, match=f"block_k={block_k}"):
            _gemv(xq, xs, wq, ws, recipe, block_k=block_k)
    with pytest.raises(ValueError, match="scale has shape"):
        _gemv(xq, xs[:, :1], wq, ws, recipe)


@pytest.mark.parametrize("recipe", RECIPES[:3], ids=lambda r: f"{r[0]}x{r[1]}")
def test_scaled_mm_sends_one_row_here(device, recipe):
    """kernels.scaled_mm runs an M = 1 GEMM on this kernel (the same bits as calling it,
    with or without bias, activation and a broadcast residual),
    the tensor-core kernel with gemv=False or a forced tile config, and M = 2 on the tensor
    cores.  This kernel matches the reference to fp32 rounding; the tensor cores add a K
    block's FP8 products with Hopper's reduced-precision accumulator (~1e-3 here)."""
    from fp8compile.kernels.gemm import scaled_mm

    xq, xs, wq, ws = _operands(device, (1, 1, 384), 200, recipe)
    ref = _reference(xq, xs, wq, ws, recipe)
    y = scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], out_dtype=torch.float32)
    assert torch.equal(y, _gemv(xq, xs, wq, ws, recipe, out_dtype=torch.float32))
    tc = 2e-2 if device == "cuda" else 1e-5  # as test_gemm_kernel's fp32 outputs
    for kw in ({"gemv": False}, {"config": {"SPLIT_K": 1}}):
        t = scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], out_dtype=torch.float32, **kw)
        torch.testing.assert_close(t.cpu(), ref.cpu(), atol=tc, rtol=tc)
    bias = torch.randn(200, device=device)
    residual = torch.randn(200, device=device)  # broadcast over the row
    y = scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], bias, torch.float32, "precise",
                  "silu", residual)
    assert torch.equal(y, _gemv(xq, xs, wq, ws, recipe, bias=bias, out_dtype=torch.float32,
                                activation="silu", residual=residual))
    torch.testing.assert_close(
        y.cpu(), _reference(xq, xs, wq, ws, recipe, bias, torch.float32, "silu",
                            residual).cpu(), atol=1e-5, rtol=1e-5)
    xq2, xs2, _, _ = _operands(device, (2, 384), 200, recipe)
    torch.testing.assert_close(
        scaled_mm(xq2, xs2, recipe[0], wq, ws, recipe[1], out_dtype=torch.float32).cpu(),
        _reference(xq2, xs2, wq, ws, recipe).cpu(), atol=tc, rtol=tc)


def test_scaled_mm_one_row_swiglu_and_fp8_output(device):
    """The epilogues this kernel lacks still serve one row: SwiGLU (from the fp32 product)
    and an FP8 output with its static scale."""
    from fp8compile.kernels.gemm import scaled_mm

    recipe = (G.GROUP, G.BLOCK)
    xq, xs, wq, ws = _operands(device, (1, 256), 256, recipe)
    ref = _reference(xq, xs, wq, ws, recipe)
    h = scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], out_dtype=torch.float32,
                  activation="swiglu")
    torch.testing.assert_close(h.cpu(), nx.swiglu(ref).cpu(), atol=1e-5, rtol=1e-5)
    scale = ref.abs().amax().reshape(1) / 448 * 1.25
    q = scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], out_dtype=torch.float8_e4m3fn,
                  out_scale=scale)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (1, 256)
    # within one E4M3 step (2^-3 relative) of the product, or of the smallest normal
    torch.testing.assert_close((q.float() * scale).cpu(), ref.cpu(),
                               atol=float(scale) * 2**-6, rtol=2**-3)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Inductor launches the traced kernel on a GPU only")
def test_traced_one_row_gemm_launches_this_kernel():
    """In a compiled graph (static M = 1) kernels.scaled_mm traces this kernel's launch:
    the same bits as the eager call, no graph break."""
    from fp8compile.kernels.gemm import scaled_mm

    recipe = (G.GROUP, G.BLOCK)
    xq, xs, wq, ws = _operands("cuda", (1, 512), 256, recipe)

    def f(xq, xs, wq, ws):
        return scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], out_dtype=torch.float32)

    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True)(xq, xs, wq, ws)
    assert torch.equal(y, _gemv(xq, xs, wq, ws, recipe, out_dtype=torch.float32))


def test_fp8compile_gemv_0_keeps_the_tensor_cores(device, monkeypatch):
    from fp8compile.kernels import gemm as gemm_mod

    calls = _count_launches(monkeypatch)
    recipe = (G.GROUP, G.BLOCK)
    xq, xs, wq, ws = _operands(device, (1, 256), 64, recipe)
    monkeypatch.setenv("FP8COMPILE_GEMV", "0")
    gemm_mod.scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1])
    assert not calls
    monkeypatch.setenv("FP8COMPILE_GEMV", "1")
    gemm_mod.scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1])
    assert calls


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the compiled block launches the Triton kernels on a GPU only")
@pytest.mark.parametrize("recipe", ["blockwise", "rowwise"])
def test_compiled_block_at_one_token_runs_its_linears_here(monkeypatch, recipe):
    """A LLaMA block compiled with the fp8hpf backend and fed one token: every FP8 linear
    is a one-row GEMM, traced as this kernel; the output stays as close to the fp32 block
    as the same block's on the tensor cores (FP8COMPILE_GEMV=0)."""
    import fp8compile
    from tests.models import LlamaBlock, rel_err

    calls = _count_launches(monkeypatch)
    torch.manual_seed(0)
    block32 = LlamaBlock(512, heads=4, ffn=1024).cuda()
    block = LlamaBlock(512, heads=4, ffn=1024).cuda().to(torch.bfloat16)
    block.load_state_dict(block32.state_dict())
    x = torch.randn(1, 1, 512, device="cuda", dtype=torch.bfloat16)
    ref = block32(x.float())
    errs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FP8COMPILE_GEMV", flag)
        torch._dynamo.reset()
        model = torch.compile(block, backend=fp8compile.backend({"recipe": recipe}))
        with torch.no_grad():
            errs[flag] = rel_err(model(x), ref)
        if flag == "1":
            assert calls, "no one-row GEMM reached kernels.gemv"
    assert errs["1"] < 0.05 and errs["1"] <= errs["0"] * 1.2, errs
