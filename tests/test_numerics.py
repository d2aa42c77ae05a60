"""The reference numerics against first principles (SPEC §1)."""

import math

import pytest
import torch

from fp8compile import numerics as nx
from fp8compile.numerics import Fp8Format, Granularity

FORMATS = [Fp8Format.E4M3, Fp8Format.E5M2]


def _grid(fmt: Fp8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """All finite values of ``fmt`` (float64, sorted) and their bit codes."""
    codes = torch.arange(256, dtype=torch.uint8)
    vals = codes.view(fmt.dtype).to(torch.float64)
    keep = torch.isfinite(vals)
    vals, codes = vals[keep], codes[keep]
    order = torch.argsort(vals, stable=True)
    return vals[order], codes[order]


def _rne_by_search(x: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Round-to-nearest-even by brute force over the format's grid, with saturation."""
    grid, codes = _grid(fmt)
    x = x.double().clamp(-fmt.max, fmt.max)
    dist = (x[:, None] - grid[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    ties = dist == best
    # Among equally near grid points prefer the even code (mantissa LSB 0); +0 over -0.
    even = (codes.to(torch.int64) % 2 == 0)[None, :].expand_as(ties)
    pick = torch.where(ties & even, 2, torch.where(ties, 1, 0))
    return grid[pick.argmax(dim=1)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_constants(fmt):
    grid, _ = _grid(fmt)
    assert fmt.max == grid.max() == {"e4m3": 448.0, "e5m2": 57344.0}[fmt.value]
    tiny = grid[grid > 0].min()
    assert tiny == {"e4m3": 2.0**-9, "e5m2": 2.0**-16}[fmt.value]


@pytest.mark.parametrize("fmt", FORMATS)
def test_cast_is_saturating_round_to_nearest_even(fmt):
    grid, _ = _grid(fmt)
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    rand = torch.randn(4000, dtype=torch.float64) * torch.exp2(torch.randint(-12, 12, (4000,)))
    x = torch.cat([grid, mids, rand, torch.tensor([1e30, -1e30, fmt.max * 1.07, 127.06])])
    x = x.float().double()  # values the fp32 path actually sees
    got = nx.cast_to_fp8(x.float(), fmt).double()
    want = _rne_by_search(x, fmt)
    bad = got != want
    assert not bad.any(), f"{x[bad][:5]} -> {got[bad][:5]}, expected {want[bad][:5]}"


def test_non_finite_handling():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    e4 = nx.cast_to_fp8(x, Fp8Format.E4M3).float()
    assert e4[:3].isnan().all() and e4[3] == 1
    e5 = nx.cast_to_fp8(x, Fp8Format.E5M2).float()
    assert e5[0].isnan() and e5[1] == math.inf and e5[2] == -math.inf


SHAPES = [(1, 128), (5, 200), (3, 4, 256), (130, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("g", [Granularity.TENSOR, Granularity.ROW, Granularity.GROUP])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_round_trip(shape, g, fmt):
    x = torch.randn(shape) * 3
    q, s = nx.quantize(x, g, fmt)
    assert q.dtype == fmt.dtype and q.shape == x.shape
    assert s.dtype == torch.float32
    rows = math.prod(shape[:-1])
    kb = math.ceil(shape[-1] / nx.BLOCK)
    want = {Granularity.TENSOR: (), Granularity.ROW: (rows, 1), Granularity.GROUP: (rows, kb)}[g]
    assert tuple(s.shape) == want
    if g is Granularity.GROUP:
        assert s.stride() == (1, rows), "group scales are stored M-contiguous"
    floor = {Fp8Format.E4M3: 26.0, Fp8Format.E5M2: 20.0}[fmt]
    sqnr = nx.sqnr(x, nx.dequantize(q, s, g))
    assert sqnr >= floor, f"{sqnr=}"
    # The largest magnitude of each group maps to ±fmax exactly (scale = amax / fmax).
    assert q.float().abs().max() == fmt.max


def test_scales_are_amax_over_fmax_per_group():
    x = torch.randn(3, 300)
    x[1, 130] = 1000.0
    q, s = nx.quantize(x, Granularity.GROUP)
    assert s.shape == (3, 3)
    for r in range(3):
        for kb in range(3):
            amax = x[r, kb * 128 : (kb + 1) * 128].abs().max()
            assert s[r, kb] == amax / 448.0
    assert s[1, 1] == 1000.0 / 448.0 and s[1, 0] < 1


def test_weight_blocks():
    w = torch.randn(200, 300)
    q, s = nx.quantize(w, Granularity.BLOCK)
    assert s.shape == (2, 3)
    assert s[1, 2] == w[128:, 256:].abs().max() / 448.0
    assert nx.sqnr(w, nx.dequantize(q, s, Granularity.BLOCK)) >= 26.0
    with pytest.raises(ValueError, match="2-D weight"):
        nx.quantize(torch.randn(2, 3, 4), Granularity.BLOCK)


def test_power_of_two_scales_round_up():
    x = torch.randn(8, 256) * 7
    q, s = nx.quantize(x, Granularity.GROUP, power_of_2=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    plain = nx.compute_scale(nx.amax(x, Granularity.GROUP))
    assert (s.contiguous() >= plain).all() and (s.contiguous() < 2 * plain).all()
    assert q.float().abs().max() <= 448.0


def test_power_of_two_rounding_is_exact_at_the_edges():
    p = torch.tensor([2.0**-20, 0.25, 1.0, 4.0])
    up = torch.nextafter(p, torch.full_like(p, 10.0))  # just above a power of two
    s = nx.compute_scale(torch.cat([p, up]) * 448.0, power_of_2=True)
    assert s.tolist() == [2.0**-20, 0.25, 1.0, 4.0, 2.0**-19, 0.5, 2.0, 8.0]


def test_zero_groups_give_finite_scale_and_zero_output():
    x = torch.zeros(4, 256)
    x[2, :3] = torch.tensor([1.0, -2.0, 3.0])
    for g in (Granularity.TENSOR, Granularity.ROW, Granularity.GROUP):
        q, s = nx.quantize(x, g)
        assert torch.isfinite(s).all() and (s > 0).all()
        dq = nx.dequantize(q, s, g)
        assert (dq[[0, 1, 3]] == 0).all()
        assert torch.allclose(dq[2, :3], x[2, :3], rtol=0.07)


@pytest.mark.parametrize("g", [Granularity.TENSOR, Granularity.ROW, Granularity.GROUP])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_values_stay_in_their_element(g, bad):
    x = torch.randn(4, 256)
    x[1, 5] = bad
    q, s = nx.quantize(x, g)
    assert torch.isfinite(s).all(), "amax ignores non-finite values"
    dq = nx.dequantize(q, s, g)
    assert dq[1, 5].isnan()
    dq[1, 5] = x[1, 5] = 0
    assert torch.isfinite(dq).all()
    assert nx.sqnr(x, dq) >= 26.0, "other elements keep their precision"


def test_saturation_with_a_given_scale():
    x = torch.tensor([[1.0, 10.0, -1000.0]])
    q = nx.quantize_with_scale(x, torch.tensor(1.0), Granularity.TENSOR)
    assert q.float().tolist() == [[1.0, 10.0, -448.0]]


def test_reference_linear_matches_dequantized_matmul():
    x, w, b = torch.randn(7, 3, 200), torch.randn(130, 200), torch.randn(130)
    xq, xs = nx.quantize(x, Granularity.GROUP)
    wq, ws = nx.quantize(w, Granularity.BLOCK)
    y = nx.fp8_linear_reference(xq, xs, Granularity.GROUP, wq, ws, Granularity.BLOCK, b,
                                torch.float32)
    assert y.shape == (7, 3, 130)
    want = nx.dequantize(xq, xs, Granularity.GROUP) @ nx.dequantize(
        wq, ws, Granularity.BLOCK).t() + b
    torch.testing.assert_close(y, want)
    sqnr = nx.sqnr(x @ w.t() + b, y)
    assert sqnr >= 25.0, f"{sqnr=}"


def test_sqnr():
    x = torch.randn(1000)
    assert nx.sqnr(x, x) == math.inf
    assert abs(nx.sqnr(x, x * 1.01) - 40.0) < 1e-3
    with pytest.raises(ValueError, match="not an FP8 format"):
        Fp8Format.from_dtype(torch.float16)


def test_swiglu_pairs_each_gate_column_with_its_up_column():
    f, k = 384, 8
    gate, up = torch.randn(f, k), torch.randn(f, k)
    x = torch.randn(2, 3, k)
    want = torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())
    got = nx.swiglu(x @ torch.cat([gate, up]).t())
    assert got.shape == (2, 3, f)
    torch.testing.assert_close(got, want)
    # swapped halves pair the other way: not the same function
    assert not torch.allclose(nx.swiglu(x @ torch.cat([up, gate]).t()), want)


def test_swiglu_rejects_an_odd_width_and_the_gemm_unaligned_halves():
    with pytest.raises(ValueError, match="must be even"):
        nx.swiglu(torch.randn(2, 385))
    with pytest.raises(ValueError, match=r"N % 256 == 0 \(gate rows then up rows.*N=384"):
        nx.check_swiglu_rows(384)
    nx.check_swiglu_rows(512)


@pytest.mark.parametrize("g", list(Granularity))
@pytest.mark.parametrize("p2", [False, True])
def test_quantize_by_rows_gives_quantize_bits(g, p2):
    """Slices of 128 rows (and a ragged last one) give quantize's payload and scales, scale
    layout included; a NaN, an Inf and an all-zero slice stay where they are."""
    x = torch.randn(300, 200) * torch.rand(300, 1) * 10
    x[5, 3], x[140, 7] = float("nan"), float("inf")
    x[256:] = 0
    for x in (x, x.t().contiguous().t()):  # row-major, and a column-major view
        want = nx.quantize(x, g, Fp8Format.E4M3, p2)
        got = nx.quantize_by_rows(x, g, Fp8Format.E4M3, p2, rows=128)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                               b.view(torch.uint8) if b.dtype != torch.float32 else b)


def test_quantize_by_rows_slices_wide_weights_by_elements(quantize_rows_seen):
    """By default a slice holds ~2**25 elements, in whole 128-row blocks."""
    sliced = quantize_rows_seen
    x = torch.randn(2 * 1024 + 5, 1 << 15, dtype=torch.bfloat16)  # 2**25 elements: 1024 rows
    nx.quantize_by_rows(x, Granularity.ROW)
    assert sliced == [1024, 1024, 5]
    sliced.clear()
    nx.quantize_by_rows(x[:, :128], Granularity.ROW)  # narrow: one slice
    assert sliced == [2 * 1024 + 5]


def test_quantize_by_rows_rejects_slices_that_split_blocks():
    with pytest.raises(ValueError, match="rows=100 must be a positive multiple of 128"):
        nx.quantize_by_rows(torch.randn(300, 128), Granularity.BLOCK, rows=100)
