"""Quantization kernels vs fp8compile.numerics.quantize: scales and payloads bit-exact."""

import math

import pytest
import torch

from fp8compile import numerics as nx
from fp8compile.kernels import available
from fp8compile.kernels.quant import quantize
from fp8compile.numerics import Fp8Format, Granularity
from tests.kernels.test_fused_kernel import assert_close_quant

ACT_GRANS = [Granularity.TENSOR, Granularity.ROW, Granularity.GROUP]


def ref_quantize(x, *args):
    """numerics.quantize evaluated on the CPU, the definition (IEEE ``amax / fmax``).

    On CUDA, PyTorch divides by a Python scalar as a multiply by its fp32 reciprocal, so
    numerics run on GPU tensors can be 1 ulp off the definition in ~half of the scales.
    """
    return tuple(t.to(x.device) for t in nx.quantize(x.cpu(), *args))


def _strides(t):
    return [st for st, n in zip(t.stride(), t.shape) if n > 1]  # size-1 dims: any stride


def assert_same_quant(got, want):
    q, s = got
    qr, sr = want
    assert s.shape == sr.shape and _strides(s) == _strides(sr), (s.shape, s.stride(), sr.stride())
    assert torch.equal(s, sr), (s - sr).abs().max()
    assert q.dtype == qr.dtype and q.shape == qr.shape
    nan, nan_r = q.float().isnan(), qr.float().isnan()
    assert torch.equal(nan, nan_r)
    bits, bits_r = q.view(torch.uint8), qr.view(torch.uint8)
    # Bits, not values: catches -0 vs +0 and ±Inf (E5M2) too.
    assert torch.equal(bits[~nan], bits_r[~nan]), (q.float()[~nan] - qr.float()[~nan]).abs().max()


def _with_specials(x):
    x = x.clone()
    x[0, 3] = float("nan")  # this group/row only
    x[1, 5] = float("inf")
    x[1, 7] = float("-inf")
    x[2] = 0.0  # all-zero row: finite scale, zero payload
    return x


@pytest.mark.parametrize("granularity", ACT_GRANS)
@pytest.mark.parametrize("fmt", list(Fp8Format))
@pytest.mark.parametrize("power_of_2", [False, True])
def test_activation_matches_numerics(device, granularity, fmt, power_of_2):
    x = _with_specials(torch.randn(5, 200) * 4).to(device).reshape(5, 1, 200)
    got = quantize(x, granularity, fmt, power_of_2)
    assert_same_quant(got, ref_quantize(x, granularity, fmt, power_of_2))


@pytest.mark.parametrize("shape", [(1, 200), (2, 3, 130), (7, 384), (33, 16), (3, 16500)])
@pytest.mark.parametrize("granularity", ACT_GRANS)
def test_odd_shapes(device, shape, granularity):
    x = (torch.randn(shape) * torch.rand(shape[-1]) * 100).to(device)
    assert_same_quant(quantize(x, granularity, Fp8Format.E4M3, False),
                      ref_quantize(x, granularity, Fp8Format.E4M3, False))


@pytest.mark.parametrize("fmt", list(Fp8Format))
@pytest.mark.parametrize("shape", [(130, 200), (256, 384), (1, 16)])
def test_weight_blocks(device, fmt, shape):
    w = (torch.randn(shape) * 0.02).to(device)
    w[0, 0] = float("nan")
    assert_same_quant(quantize(w, Granularity.BLOCK, fmt, False),
                      ref_quantize(w, Granularity.BLOCK, fmt, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(device, dtype):
    x = (torch.randn(9, 300) * 3).to(device, dtype)
    for g in ACT_GRANS:
        want = ref_quantize(x, g, Fp8Format.E4M3, True)
        assert_same_quant(quantize(x, g, Fp8Format.E4M3, True), want)


def test_non_contiguous(device):
    x = torch.randn(200, 9).to(device).t()  # (9, 200) with strides (1, 9)
    for g in ACT_GRANS:
        assert_same_quant(quantize(x, g, Fp8Format.E4M3, False), ref_quantize(x, g))
    w = torch.randn(300, 260).to(device)[::2, 3:]
    assert_same_quant(quantize(w, Granularity.BLOCK, Fp8Format.E4M3, False),
                      ref_quantize(w, Granularity.BLOCK))


@pytest.mark.parametrize("granularity", [*ACT_GRANS, Granularity.BLOCK])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_views(device, granularity, dtype):
    # What the backward GEMMs quantize: dy.t() and weight.t().  Row-contiguous inputs take
    # their own launch shapes (tall tiles, two passes over K); several programs along both
    # dims, K not a multiple of the tile, and NaN / Inf / an all-zero row.
    x = _with_specials(torch.randn(70, 1100) * 3).t().contiguous().t().to(device, dtype)
    assert x.stride() == (1, 70)
    got = quantize(x, granularity, Fp8Format.E4M3, False)
    assert got[0].is_contiguous()
    assert_same_quant(got, ref_quantize(x, granularity, Fp8Format.E4M3, False))


def test_fp8_grid_edges(device):
    """Values at and around every E4M3 / E5M2 binade edge, subnormals and the saturation point."""
    for fmt in Fp8Format:
        finite = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).float()
        finite = finite[finite.isfinite()].unique()
        mids = (finite[1:] + finite[:-1]) / 2  # exact ties: round to even
        vals = torch.cat([finite, mids, mids.nextafter(finite[1:]), mids.nextafter(finite[:-1])])
        x = torch.cat([vals, torch.tensor([fmt.max, fmt.max * 0.999])])
        # Row 0 has amax = fmax so its scale is exactly 1 and x/s == x.
        x = torch.stack([x, -x]).to(device)
        want = ref_quantize(x, Granularity.ROW, fmt)
        assert_same_quant(quantize(x, Granularity.ROW, fmt, False), want)


def _quotients_near_midpoints(fmt, n_rows=128, n_cols=256):
    """fp32 x whose every 1x128 group, row, column group and 128x128 block has amax 3.0, so
    each scale is the same inexact s = 3 / fmax, and whose other values are fp32 roundings of
    s * (an FP8 rounding midpoint), nudged by -1, 0 or +1 ulp: the FP8 payload then depends
    on the last bit of x / s, i.e. on the division being IEEE-exact.  Signed zeros and tiny
    values that flush to -0.0 are in too."""
    finite = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).float()
    finite = finite[finite.isfinite()].unique()
    mids = ((finite[1:] + finite[:-1]) / 2).double()
    s = torch.tensor(3.0) / torch.tensor(fmt.max)
    x = (mids * s.double()).float()
    x = torch.cat([x, x.nextafter(torch.tensor(float("inf"))),
                   x.nextafter(torch.tensor(float("-inf"))),
                   torch.tensor([0.0, -0.0, -1e-30, 1e-30])])
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    x = x.repeat(n_rows * n_cols // x.numel() + 1)[: n_rows * n_cols].reshape(n_rows, n_cols)
    x[:, ::128] = 3.0  # amax of every group along rows...
    x[0] = 3.0  # ...and of every column group and block
    return x


@pytest.mark.parametrize("fmt", list(Fp8Format))
def test_quotients_at_fp8_midpoints(device, fmt):
    # On the GPU the kernels divide by multiplying with the scale's reciprocal and correcting
    # twice with fma; a one-ulp error in x / s would flip the FP8 rounding of these inputs.
    from fp8compile.kernels.quant import quantize_dual

    x = _quotients_near_midpoints(fmt)
    xd = x.to(device)
    for g in (Granularity.GROUP, Granularity.ROW, Granularity.TENSOR):
        assert_same_quant(quantize(xd, g, fmt, False), ref_quantize(xd, g, fmt, False))
    for w in (xd, x.t().contiguous().to(device).t()):  # row-major and transposed weights
        assert_same_quant(quantize(w, Granularity.BLOCK, fmt, False),
                          ref_quantize(w, Granularity.BLOCK, fmt, False))
    got = quantize_dual(xd, fmt, False)
    want = nx.quantize_dual(x, fmt, False)
    assert_same_quant(got[:2], tuple(t.to(device) for t in want[:2]))
    assert_same_quant(got[2:], tuple(t.to(device) for t in want[2:]))
    assert (got[0].view(torch.uint8) == 0x80).any()  # -0.0 survived


def test_all_zero_and_all_nan(device):
    x = torch.zeros(3, 256, device=device)
    x[1] = float("nan")
    for g in ACT_GRANS:
        got = quantize(x, g, Fp8Format.E4M3, False)
        assert_same_quant(got, ref_quantize(x, g))
        assert torch.isfinite(got[1]).all()


def test_rejects_bad_inputs(device):
    with pytest.raises(ValueError, match="dtype"):
        quantize(torch.ones(4, 8, dtype=torch.int32, device=device), Granularity.ROW,
                 Fp8Format.E4M3, False)
    with pytest.raises(ValueError, match="dtype"):
        quantize(torch.ones(4, 8, device=device).to(torch.float8_e4m3fn), Granularity.ROW,
                 Fp8Format.E4M3, False)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.ones(2, 4, 8, device=device), Granularity.BLOCK, Fp8Format.E4M3, False)
    with pytest.raises(ValueError):
        quantize(torch.ones(4, 8, device=device), "blocky", Fp8Format.E4M3, False)


def test_dispatcher_names_stay_functions(device):
    """Importing the kernel submodules must not shadow the package-level functions."""
    import fp8compile.kernels as K
    from fp8compile.kernels import fused, gemm, quant  # noqa: F401

    x = torch.randn(4, 128, device=device)
    assert callable(K.quantize) and callable(K.scaled_mm) and callable(K.rmsnorm_quantize)
    assert_same_quant(K.quantize(x, Granularity.ROW, Fp8Format.E4M3, False),
                      ref_quantize(x, Granularity.ROW, Fp8Format.E4M3, False))


def test_available_is_false_off_gpu(monkeypatch):
    assert not available(torch.ones(1))
    if torch.cuda.is_available():
        assert available(torch.ones(1, device="cuda"))
        monkeypatch.setenv("FP8COMPILE_DISABLE_TRITON", "1")
        assert not available(torch.ones(1, device="cuda"))


@pytest.mark.parametrize("fmt", list(Fp8Format))
@pytest.mark.parametrize("shape", [(1, 200), (70, 200), (130, 256), (3, 11, 300)])
def test_requantize_t_groups_to_blocks(device, fmt, shape):
    # The blockwise weight gradient's X: the forward's 1x128-group FP8 copy, requantized as
    # 128x128 blocks of its transpose in one pass.  Partial blocks on both sides, a NaN and
    # an all-zero row.
    from fp8compile.kernels.quant import requantize_t

    x = torch.randn(shape) * 3
    x.reshape(-1, shape[-1])[0, 5] = float("nan")
    x.reshape(-1, shape[-1])[-1] = 0.0
    x.reshape(-1, shape[-1])[0, 7] = -1e-30  # flushes to -0.0, which must stay -0.0
    q, s = nx.quantize(x, Granularity.GROUP, fmt)
    assert (q.view(torch.uint8) == 0x80).any()
    q, s = q.to(device), s.to(device)
    got = requantize_t(q, s, Granularity.GROUP, Granularity.BLOCK, fmt, False)
    want = nx.requantize_t(q.cpu(), s.cpu(), Granularity.GROUP, Granularity.BLOCK, fmt, False)
    assert got[0].is_contiguous()
    assert_same_quant(got, tuple(t.to(device) for t in want))


@pytest.mark.parametrize("fmt", list(Fp8Format))
def test_requantize_t_decodes_every_fp8_pattern(device, fmt):
    # All 256 bit patterns with unit scales: each 128x128 block's amax is the format's max,
    # so the block scale is 1 and every finite value (subnormals, -0.0, Inf in E5M2) must come
    # back with its own bits, transposed.
    from fp8compile.kernels.quant import requantize_t

    q = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).reshape(2, 128).to(device)
    s = nx.m_contiguous(torch.ones(2, 1)).to(device)
    qt, st = requantize_t(q, s, Granularity.GROUP, Granularity.BLOCK, fmt, False)
    assert st.cpu().tolist() == [[1.0]]
    want = q.t().contiguous().view(torch.uint8).cpu()
    got = qt.view(torch.uint8).cpu()
    nan = qt.float().isnan().cpu()
    assert torch.equal(nan, q.t().float().isnan().cpu())
    assert torch.equal(got[~nan], want[~nan])


@pytest.mark.parametrize("fmt", list(Fp8Format))
@pytest.mark.parametrize("shape", [(1, 200), (70, 200), (130, 256), (200, 1)])
def test_quantize_dual_matches_both_groupings(device, fmt, shape):
    # The blockwise output gradient, read once: groups along N for dX, along M for dW.
    # Partial tiles on both sides, a NaN, an Inf, an all-zero row; a strided input too.
    from fp8compile.kernels.quant import quantize_dual

    x = torch.randn(shape) * 3
    x[0, 0] = float("nan")
    x[-1, -1] = float("inf")
    if shape[0] > 2:
        x[1] = 0.0
    for inp in (x.to(device), x.t().contiguous().t().to(device)):
        got = quantize_dual(inp, fmt, False)
        want = nx.quantize_dual(x, fmt, False)
        assert_same_quant(got[:2], tuple(t.to(device) for t in want[:2]))
        assert_same_quant(got[2:], tuple(t.to(device) for t in want[2:]))


@pytest.mark.parametrize("fmt", list(Fp8Format))
@pytest.mark.parametrize("shape", [(1, 200), (7, 384), (3, 16500), (2, 3, 130)])
def test_given_scale_and_amax_match_numerics(device, fmt, shape):
    # Static and delayed scaling: amax in one launch, quantization with a given scale in one.
    # The scale is deliberately too small for some values (saturation) and NaN/Inf are kept.
    from fp8compile.kernels.quant import amax_tensor, quantize_with_scale

    x = torch.randn(shape) * 5
    x.reshape(-1, shape[-1])[0, 3] = float("nan")
    x.reshape(-1, shape[-1])[-1, -1] = float("-inf")
    xd = x.to(device)
    a = amax_tensor(xd)
    assert a.shape == () and a.dtype == torch.float32
    assert torch.equal(a.cpu(), nx.amax(x, Granularity.TENSOR).float())
    scale = torch.tensor(float(a) / fmt.max * 0.5)  # half the range: the top values saturate
    rows = x.reshape(-1, shape[-1])
    for src, ref in ((xd, x), (rows.to(device).t(), rows.t())):  # row-major, transposed view
        got = quantize_with_scale(src, scale.to(device), fmt)
        want = nx.quantize_with_scale(ref, scale, Granularity.TENSOR, fmt)
        assert got.shape == ref.shape and got.dtype == fmt.dtype and got.is_contiguous()
        nan = got.float().isnan().cpu()
        # E4M3FN has no Inf: -inf becomes NaN there; E5M2 keeps it.
        assert torch.equal(nan, want.float().isnan())
        assert nan.sum() == (2 if fmt is Fp8Format.E4M3 else 1)
        assert torch.equal(got.view(torch.uint8).cpu()[~nan], want.view(torch.uint8)[~nan])


@pytest.mark.parametrize("fmt", list(Fp8Format))
@pytest.mark.parametrize("power_of_2", [False, True])
@pytest.mark.parametrize("shape", [(1, 200), (7, 384), (3, 16500), (2, 3, 130)])
def test_quantize_from_amax_is_both_in_one_pass(device, fmt, power_of_2, shape):
    # Delayed scaling's cast: the scale of the given amax (numerics.compute_scale, bit-exact),
    # the payload of quantize_with_scale and the amax of amax_tensor (finite values only),
    # from one launch; row-major and a transposed view, one-tile rows and rows longer than a
    # tile (16500), NaN/Inf and an all-zero tensor, a zero amax (the floor applies).  The
    # transposed view takes at most 1024 of the columns: its rows are the columns (short
    # rows either way), and 16500 of them took the interpreter 12 s a launch.
    from fp8compile.kernels.quant import quantize_from_amax

    x = torch.randn(shape) * 5
    x.reshape(-1, shape[-1])[0, 3] = float("nan")
    x.reshape(-1, shape[-1])[-1, -1] = float("-inf")
    rows = x.reshape(-1, shape[-1])
    cols = rows[:, :1024]
    for given in (float(nx.amax(x, Granularity.TENSOR)) * 0.5, 3.3, 0.0):
        amax = torch.tensor(given)
        scale = nx.compute_scale(amax, fmt, power_of_2)
        for src, ref in ((x.to(device), x), (cols.to(device).t(), cols.t()),
                         (torch.zeros(shape, device=device), torch.zeros(shape))):
            q, s, own = quantize_from_amax(src, amax.to(device), fmt, power_of_2)
            assert s.shape == () and own.shape == () and own.dtype == torch.float32
            assert torch.equal(s.cpu(), scale), (s, scale)
            assert torch.equal(own.cpu(), nx.amax(ref, Granularity.TENSOR).float())
            want = nx.quantize_with_scale(ref, scale, Granularity.TENSOR, fmt)
            nan = q.float().isnan().cpu()
            assert torch.equal(nan, want.float().isnan())
            assert torch.equal(q.view(torch.uint8).cpu()[~nan], want.view(torch.uint8)[~nan])
    with pytest.raises(ValueError, match="one amax"):
        quantize_from_amax(x.to(device), torch.ones(2, device=device), fmt)


@pytest.mark.parametrize("shape", [(1, 200), (3, 16500), (40, 3000)])
def test_amax_unless_history_skips_on_the_device(device, shape):
    # Delayed scaling's first-step amax: taken while the history is all zero, else the launch
    # returns 0 at once (the amax of this x is not 0, so a launch that read x would show).
    from fp8compile.kernels.quant import amax_tensor

    x = (torch.randn(shape) * 3).to(device)
    want = nx.amax(x.cpu(), Granularity.TENSOR).float()
    empty = torch.zeros(16, device=device)
    assert torch.equal(amax_tensor(x, unless=empty).cpu(), want)
    seen = empty.clone()
    seen[11] = 0.5
    assert float(amax_tensor(x, unless=seen)) == 0.0
    assert torch.equal(amax_tensor(x).cpu(), want)


# Tensorwise amax routes: one launch of one program holding all of x (as far as it fits in
# the elements limit); two launches with one amax slot per program; two launches folding into
# one zeroed cell (large grids).  (elements limit, slots limit).
TENSOR_ROUTES = {"one launch": (1 << 16, 1024), "slots": (0, 1024), "cell": (0, 0)}


@pytest.mark.parametrize("route", list(TENSOR_ROUTES))
@pytest.mark.parametrize("shape", [(1, 200), (9, 3000), (3, 16500), (2, 7, 130)])
@pytest.mark.parametrize("producer", ["none", "rmsnorm", "silu_mul"])
def test_tensor_amax_routes(device, monkeypatch, route, shape, producer):
    from fp8compile.kernels import fused, quant

    max_elems, max_slots = TENSOR_ROUTES[route]
    rows = math.prod(shape[:-1])
    tile = 2 ** math.ceil(math.log2(rows)) * 2 ** math.ceil(math.log2(shape[-1]))
    launches = 1 if tile <= max_elems else 2  # (3, 16500) does not fit one program
    monkeypatch.setattr(quant, "_WHOLE_AMAX_MAX_ELEMS", max_elems)
    monkeypatch.setattr(quant, "_AMAX_SLOTS_MAX", max_slots)
    calls = []
    real_launch = quant.launch
    monkeypatch.setattr(quant, "launch", lambda k: calls.append(k) or real_launch(k))

    x = torch.randn(shape) * 3
    rows = x.view(-1, shape[-1])
    if producer != "rmsnorm":  # (a NaN or Inf makes its whole row NaN after RMSNorm)
        rows[0, 3] = float("nan")
        rows[-1, 5] = float("-inf")
    rows[-1, 7] = 0.0
    rows[-1, -1] = 1000.0  # the amax sits in the last program's tile
    fmt = Fp8Format.E4M3
    if producer == "none":
        got = quantize(x.to(device), Granularity.TENSOR, fmt, False)
        assert_same_quant(got, ref_quantize(x.to(device), Granularity.TENSOR, fmt, False))
    else:
        if producer == "rmsnorm":
            w = torch.rand(shape[-1]) + 0.5
            got = fused.rmsnorm_quantize(x.to(device), w.to(device), 1e-6, Granularity.TENSOR)
            want = nx.rmsnorm_quantize(x, w, 1e-6, Granularity.TENSOR)
        else:
            up = torch.randn(shape)
            got = fused.silu_mul_quantize(x.to(device), up.to(device), Granularity.TENSOR)
            want = nx.silu_mul_quantize(x, up, Granularity.TENSOR)
        assert_close_quant(got, want, fmt)
    assert len(calls) == launches, (route, len(calls))


@pytest.mark.parametrize("shape, launches", [((1, 4096), 1), ((4, 4096), 1), ((1, 16384), 1),
                                             ((16, 4096), 2), ((1, 16385), 2),
                                             ((4096, 64), 2)])
def test_tensor_amax_default_route(device, monkeypatch, shape, launches):
    # A single tile (the tokens of a decode step) is quantized in one launch; larger x in two.
    from fp8compile.kernels import quant

    calls = []
    real_launch = quant.launch
    monkeypatch.setattr(quant, "launch", lambda k: calls.append(k) or real_launch(k))
    x = torch.randn(shape)
    got = quantize(x.to(device), Granularity.TENSOR, Fp8Format.E4M3, False)
    assert_same_quant(got, ref_quantize(x.to(device), Granularity.TENSOR))
    assert len(calls) == launches
