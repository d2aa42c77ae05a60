"""FP8 grouped GEMM kernel vs numerics.fp8_grouped_linear_reference: every recipe, odd shapes,
empty groups, rows no group claims, bad offsets and bad inputs."""

import pytest
import torch

from fp8compile import numerics as nx
from fp8compile.kernels.grouped import scaled_grouped_mm
from fp8compile.numerics import Fp8Format, Granularity

G = Granularity
RECIPES = [(G.GROUP, G.BLOCK, "precise"), (G.ROW, G.ROW, "fast"), (G.ROW, G.ROW, "precise"),
           (G.TENSOR, G.TENSOR, "fast")]


def _operands(device, rows, k, n, groups, recipe, fmt=Fp8Format.E4M3):
    xg, wg, _ = recipe
    x = torch.randn(rows, k) * torch.rand(k) * 3
    w = torch.randn(groups, n, k) * 0.05 * torch.rand(groups, 1, 1)  # scales differ by group
    xq, xs = nx.quantize(x.to(device), xg, fmt)
    wq, ws = nx.quantize_grouped_weight(w.to(device), wg, fmt)
    return xq, xs, wq, ws


def _check(y, ref):
    # fp32: summation order only (tensor-core accumulation on a GPU); bf16: one rounding more
    tol = 2e-2 if (y.is_cuda or y.dtype != torch.float32) else 2e-5
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y.float().cpu(), ref.float().cpu(), atol=tol, rtol=tol)


def _offs(ends, device):
    return torch.tensor(ends, dtype=torch.int32, device=device)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r[0]}x{r[1]}-{r[2]}")
@pytest.mark.parametrize("rows, k, n, ends", [
    (80, 256, 200, [3, 3, 70, 75]),   # an empty group, tiles cut by group ends, a tail of 5
    (1, 128, 128, [1]),               # one row, one group
    (5, 200, 136, [0, 5]),            # K and N not multiples of 128, an empty first group
    (130, 384, 256, [64, 64, 64, 130, 130, 130, 130, 130, 130]),  # 9 groups, 6 empty
], ids=["empty-and-tail", "one-row", "odd-k-n", "nine-groups"])
def test_recipes_match_reference(device, recipe, rows, k, n, ends):
    xq, xs, wq, ws = _operands(device, rows, k, n, len(ends), recipe)
    offs = _offs(ends, device)
    y = scaled_grouped_mm(xq, xs, recipe[0], wq, ws, recipe[1], offs, torch.float32, recipe[2])
    ref = nx.fp8_grouped_linear_reference(xq, xs, recipe[0], wq, ws, recipe[1], offs,
                                          torch.float32)
    _check(y, ref)
    assert torch.all(y[ends[-1]:] == 0)  # rows no group claims


def test_hundreds_of_experts(device):
    """300 experts (a 512-wide lookup per program), most of them empty, a few rows each."""
    recipe = RECIPES[1]
    ends = sorted(torch.randint(0, 41, (300,)).tolist())
    ends[-1] = 37  # 3 rows no expert claims
    ends = [min(e, 37) for e in ends]
    xq, xs, wq, ws = _operands(device, 40, 128, 128, 300, recipe)
    offs = _offs(ends, device)
    y = scaled_grouped_mm(xq, xs, recipe[0], wq, ws, recipe[1], offs, torch.float32, recipe[2])
    _check(y, nx.fp8_grouped_linear_reference(xq, xs, recipe[0], wq, ws, recipe[1], offs,
                                              torch.float32))


@pytest.mark.parametrize("recipe", RECIPES[:2], ids=lambda r: f"{r[0]}x{r[1]}-{r[2]}")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_output_dtypes_and_many_rows_per_group(device, recipe, out_dtype):
    """150 rows per group: fast accumulation takes 128x256 tiles, N = 320 ends inside one."""
    xq, xs, wq, ws = _operands(device, 300, 256, 320, 2, recipe)
    offs = _offs([170, 300], device)
    y = scaled_grouped_mm(xq, xs, recipe[0], wq, ws, recipe[1], offs, out_dtype, recipe[2])
    ref = nx.fp8_grouped_linear_reference(xq, xs, recipe[0], wq, ws, recipe[1], offs,
                                          torch.float32).to(out_dtype)
    _check(y, ref)


def test_non_contiguous_and_e5m2_inputs(device):
    recipe = RECIPES[1]
    xg, wg, acc = recipe
    x = torch.randn(256, 40).t()  # (40, 256), K not contiguous
    xq, xs = nx.quantize(x.to(device), xg, Fp8Format.E5M2)
    w = torch.randn(3, 128, 256) * 0.05
    wq, ws = nx.quantize_grouped_weight(w.to(device), wg, Fp8Format.E5M2)
    offs = _offs([10, 30, 40], device)
    y = scaled_grouped_mm(xq.t().contiguous().t(), xs, xg, wq, ws, wg, offs, torch.float32, acc)
    _check(y, nx.fp8_grouped_linear_reference(xq, xs, xg, wq, ws, wg, offs, torch.float32))


def test_nan_and_zero_rows_stay_in_their_rows(device):
    """E5M2: the interpreter loses E4M3's NaN (SPEC §4)."""
    recipe = RECIPES[0]
    xg, wg, acc = recipe
    x = torch.randn(12, 256)
    x[2] = 0.0
    x[7, 5] = float("nan")
    xq, xs = nx.quantize(x.to(device), xg, Fp8Format.E5M2)
    wq, ws = nx.quantize_grouped_weight((torch.randn(2, 128, 256) * 0.05).to(device), wg,
                                        Fp8Format.E5M2)
    offs = _offs([6, 12], device)
    y = scaled_grouped_mm(xq, xs, xg, wq, ws, wg, offs, torch.float32, acc).cpu()
    assert torch.all(y[2] == 0)
    assert torch.isnan(y[7]).all() and not torch.isnan(y[torch.arange(12) != 7]).any()


def test_offsets_past_the_rows_or_decreasing_stay_in_bounds(device):
    """offs is never read on the host: bad values clip groups, they do not read or write
    outside x and y (the reference rejects them: see test_reference_rejects_bad_offsets)."""
    recipe = RECIPES[1]
    xq, xs, wq, ws = _operands(device, 20, 128, 128, 3, recipe)
    for ends in ([5, 2, 20], [8, 40, 50], [-3, 10, 20]):
        y = scaled_grouped_mm(xq, xs, recipe[0], wq, ws, recipe[1], _offs(ends, device),
                              torch.float32, recipe[2])
        assert y.shape == (20, 128) and torch.isfinite(y[:2]).all()


def test_reference_rejects_bad_offsets():
    recipe = RECIPES[1]
    xq, xs, wq, ws = _operands("cpu", 20, 128, 128, 3, recipe)
    for offs, why in ((_offs([5, 2, 20], "cpu"), "non-decreasing"),
                      (_offs([5, 10, 21], "cpu"), "at most"),
                      (torch.tensor([5, 10, 20]), "int32"),
                      (_offs([5, 20], "cpu"), "int32")):
        with pytest.raises(ValueError, match=why):
            nx.fp8_grouped_linear_reference(xq, xs, recipe[0], wq, ws, recipe[1], offs)


@pytest.mark.parametrize("bad, why", [
    ("bf16 x", "one FP8 format"),
    ("2-D w", r"\(groups, N, K\)"),
    ("offs int64", "int32"),
    ("row x with block w", "1x128 activation groups go with 128x128 weight blocks"),
    ("block x", "activations take tensor, row or 1x128 group scales"),
    ("int8 out", "out_dtype"),
])
def test_bad_inputs_say_what_and_how(device, bad, why):
    xq, xs, wq, ws = _operands(device, 8, 128, 128, 2, RECIPES[0])
    xg, wg, offs, out = G.GROUP, G.BLOCK, _offs([4, 8], device), torch.float32
    if bad == "bf16 x":
        xq = xq.to(torch.bfloat16)
    elif bad == "2-D w":
        wq = wq[0]
    elif bad == "offs int64":
        offs = offs.long()
    elif bad == "row x with block w":
        xg = G.ROW
    elif bad == "block x":
        xg = G.BLOCK
    else:
        out = torch.int8
    with pytest.raises(ValueError, match=why):
        scaled_grouped_mm(xq, xs, xg, wq, ws, wg, offs, out)


def test_grouped_weight_quantization_is_per_group():
    w = torch.randn(3, 200, 256)
    w[1] *= 100  # a group far larger than the others: its own scales
    for gran in (G.TENSOR, G.ROW, G.BLOCK):
        wq, ws = nx.quantize_grouped_weight(w, gran)
        assert wq.shape == w.shape and wq.dtype == torch.float8_e4m3fn
        for g in range(3):
            q, s = nx.quantize(w[g], gran)
            assert torch.equal(wq[g].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(ws[g], s)
    with pytest.raises(ValueError, match="1x128 groups are for activations"):
        nx.quantize_grouped_weight(w, G.GROUP)
    with pytest.raises(ValueError, match=r"\(groups, N, K\)"):
        nx.quantize_grouped_weight(w[0], G.ROW)
