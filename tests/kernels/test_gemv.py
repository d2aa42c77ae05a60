"""The one-to-four-row FP8 GEMM (CUDA cores) vs ops.scaled_mm_reference: every recipe,
epilogue, odd shape and bad input."""

import pytest
import torch

from fp8compile import numerics as nx
from fp8compile.kernels.gemv import GEMV_ROWS, scaled_gemv
from fp8compile.numerics import Fp8Format, Granularity
from fp8compile.ops import scaled_mm_reference

G = Granularity
RECIPES = [(G.GROUP, G.BLOCK), (G.ROW, G.ROW), (G.TENSOR, G.TENSOR), (G.GROUP, G.GROUP),
           (G.ROW, G.BLOCK)]


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


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r[0]}x{r[1]}")
@pytest.mark.parametrize("x_shape, n", [((1, 256), 384), ((3, 200), 130), ((4, 1000), 77),
                                        ((2, 1, 128), 1), ((1, 4096), 256)])
def test_matches_reference_in_fp32(device, recipe, x_shape, n):
    """fp32 products and sums, scales along K applied per 128: the reference to fp32
    summation order, at M = 1-4 and N, K not multiples of 128 (edge columns wrap, the
    last step of K masks)."""
    xq, xs, wq, ws = _operands(device, x_shape, n, recipe)
    y = scaled_gemv(xq, xs, recipe[0], wq, ws, recipe[1], out_dtype=torch.float32)
    ref = _reference(xq, xs, wq, ws, recipe)
    assert y.shape == (*x_shape[:-1], n) and y.dtype == torch.float32
    torch.testing.assert_close(y.cpu(), ref.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["none", "gelu", "silu", "relu"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_epilogue_bias_activation_residual(device, activation, out_dtype):
    """The tensor-core kernel's epilogue: bias, activation, residual in fp32, one rounding;
    a residual broadcast over the rows is read as such."""
    recipe = (G.GROUP, G.BLOCK)
    xq, xs, wq, ws = _operands(device, (3, 384), 200, recipe)
    bias = torch.randn(200, device=device).to(out_dtype)
    residual = torch.randn(1, 200, device=device).to(out_dtype)
    y = scaled_gemv(xq, xs, recipe[0], wq, ws, recipe[1], bias, out_dtype, activation,
                    residual)
    ref = _reference(xq, xs, wq, ws, recipe, bias, torch.float32, activation,
                     residual.float()).to(out_dtype)
    assert y.dtype == out_dtype
    torch.testing.assert_close(y.float().cpu(), ref.float().cpu(), atol=1e-2, rtol=1e-2)


def test_block_n_and_warps_do_not_change_the_result(device):
    """Every launch shape sums each column's K in the same order: the same bits."""
    recipe = (G.GROUP, G.BLOCK)
    xq, xs, wq, ws = _operands(device, (2, 640), 300, recipe)
    first = scaled_gemv(xq, xs, *recipe[:1], wq, ws, recipe[1], out_dtype=torch.float32)
    for block_n, warps in [(8, 1), (16, 2), (64, 4)]:
        y = scaled_gemv(xq, xs, recipe[0], wq, ws, recipe[1], out_dtype=torch.float32,
                        block_n=block_n, num_warps=warps)
        assert torch.equal(y, first), (block_n, warps)


@pytest.mark.parametrize("fmt", list(Fp8Format))
def test_nan_inf_and_zero_rows(device, fmt):
    """A NaN in x poisons its own row only; E5M2 infinities give Inf or NaN as the
    reference's; an all-zero row gives zeros (its scale is the 1e-12 floor's).  NaN and Inf
    are checked on the GPU: under the interpreter the FP8 -> fp32 cast loses both (SPEC
    §4), which leaves the finite rows to check there."""
    recipe = (G.GROUP, G.BLOCK)
    x = torch.randn(4, 256)
    x[1, 3] = float("nan")
    x[2] = 0.0
    xq, xs = nx.quantize(x.to(device), recipe[0], fmt)
    wq, ws = nx.quantize((torch.randn(130, 256) * 0.05).to(device), recipe[1], fmt)
    y = scaled_gemv(xq, xs, recipe[0], wq, ws, recipe[1], out_dtype=torch.float32).cpu()
    if device == "cuda":  # the interpreter's FP8 -> fp32 cast loses NaN (SPEC §4)
        assert y[1].isnan().all()
    assert not y[[0, 2, 3]].isnan().any()
    assert torch.equal(y[2], torch.zeros(130))
    ref = _reference(xq, xs, wq, ws, recipe).cpu()
    torch.testing.assert_close(y[[0, 2, 3]], ref[[0, 2, 3]], atol=1e-5, rtol=1e-5)

    if device != "cuda":
        return  # Inf: the interpreter's cast loses it too
    e5 = Fp8Format.E5M2
    x = torch.randn(2, 128)
    xq = x.to(e5.dtype)
    xq[0, 0] = float("inf")
    xs = torch.ones(1)
    wq = (torch.randn(64, 128) * 0.05).to(e5.dtype)
    y = scaled_gemv(xq.to(device), xs.to(device), G.TENSOR, wq.to(device), xs.to(device),
                    G.TENSOR, out_dtype=torch.float32).cpu()
    ref = _reference(xq, xs, wq, xs, (G.TENSOR, G.TENSOR)).cpu()
    assert torch.equal(y[0].isinf(), ref[0].isinf()) and torch.equal(y[0].isnan(),
                                                                      ref[0].isnan())
    torch.testing.assert_close(y[1], ref[1], atol=1e-5, rtol=1e-5)


def test_non_contiguous_operands_are_copied_k_major(device):
    recipe = (G.ROW, G.ROW)
    xq, xs, wq, ws = _operands(device, (2, 256), 192, recipe)
    wq_t = wq.t().contiguous().t()  # (N, K) with K strided
    xq_t = xq.t().contiguous().t()
    y = scaled_gemv(xq_t, xs, recipe[0], wq_t, ws, recipe[1], out_dtype=torch.float32)
    torch.testing.assert_close(y.cpu(), _reference(xq, xs, wq, ws, recipe).cpu(), atol=1e-5,
                               rtol=1e-5)


def test_empty_shapes(device):
    recipe = (G.ROW, G.ROW)
    xq, xs, wq, ws = _operands(device, (0, 256), 64, recipe)
    assert scaled_gemv(xq, xs, recipe[0], wq, ws, recipe[1]).shape == (0, 64)


def test_bad_input_is_refused(device):
    recipe = (G.GROUP, G.BLOCK)
    xq, xs, wq, ws = _operands(device, (GEMV_ROWS + 1, 256), 128, recipe)
    with pytest.raises(ValueError, match=f"M={GEMV_ROWS + 1} rows"):
        scaled_gemv(xq, xs, recipe[0], wq, ws, recipe[1])
    xq, xs, wq, ws = _operands(device, (2, 256), 128, recipe)
    with pytest.raises(ValueError, match="one FP8 dtype"):
        scaled_gemv(xq.float(), xs, recipe[0], wq, ws, recipe[1])
    with pytest.raises(ValueError, match="one FP8 dtype"):
        scaled_gemv(xq, xs, recipe[0], wq.to(torch.float8_e5m2), ws, recipe[1])
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        scaled_gemv(xq, xs, recipe[0], wq[:, :128], ws, recipe[1])
    with pytest.raises(ValueError, match="swiglu"):
        scaled_gemv(xq, xs, recipe[0], wq, ws, recipe[1], activation="swiglu")
    with pytest.raises(ValueError, match="out_dtype"):
        scaled_gemv(xq, xs, recipe[0], wq, ws, recipe[1], out_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="block_n=24"):
        scaled_gemv(xq, xs, recipe[0], wq, ws, recipe[1], block_n=24)
    with pytest.raises(ValueError, match="scale has shape"):
        scaled_gemv(xq, xs[:, :1], recipe[0], wq, ws, recipe[1])
