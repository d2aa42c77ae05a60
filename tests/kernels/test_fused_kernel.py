"""Fused producer -> quantization kernels vs numerics.quantize of the fp32 producer."""

import pytest
import torch

from fp8compile import numerics as nx
from fp8compile.kernels.fused import (
    rmsnorm_quantize,
    silu_mul_quantize,
)
from fp8compile.numerics import Fp8Format, Granularity

GRANS = [Granularity.TENSOR, Granularity.ROW, Granularity.GROUP]


def assert_close_quant(got, want, fmt):
    """Scales to fp32 rounding of the producer (rsqrt, exp, summation order); payloads equal
    except where that rounding moves a value across a rounding boundary: one FP8 step."""
    q, s = got
    qr, sr = want
    assert s.shape == sr.shape and q.shape == qr.shape and q.dtype == qr.dtype
    torch.testing.assert_close(s.cpu(), sr.cpu(), rtol=1e-5, atol=0)
    a, b = q.float().cpu(), qr.float().cpu()
    assert torch.equal(a.isnan(), b.isnan())
    ok = ~a.isnan()
    step = 2.0 ** -3 if fmt is Fp8Format.E4M3 else 2.0 ** -2
    tiny = 2.0 ** -9 if fmt is Fp8Format.E4M3 else 2.0 ** -16
    diff = (a[ok] - b[ok]).abs()
    assert (diff <= b[ok].abs() * step + tiny).all(), diff.max()
    assert (diff == 0).float().mean() > 0.99


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("fmt", list(Fp8Format))
def test_rmsnorm_quantize(device, granularity, fmt):
    x = (torch.randn(2, 3, 300) * 5).to(device, torch.bfloat16)
    x[0, 1, 4] = float("nan")  # poisons its own row only
    w = (1 + 0.1 * torch.randn(300)).to(device, torch.bfloat16)
    got = rmsnorm_quantize(x, w, 1e-6, granularity, fmt, False)
    want = nx.rmsnorm_quantize(x, w, 1e-6, granularity, fmt, False)
    assert_close_quant(got, want, fmt)
    assert got[0][0, 1].float().isnan().all() if granularity is not Granularity.TENSOR else True


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("k", [96, 128, 4100])
def test_rmsnorm_row_lengths(device, granularity, k):
    # Rows held whole in one tile take rstd from that tile (tensor, row); 1x128 groups and
    # longer rows take it from a pass of their own.  K within one group, K = one group, and
    # K past a power of two.
    x = (torch.randn(3, k) * 2).to(device)
    w = (torch.rand(k) + 0.5).to(device)
    assert_close_quant(rmsnorm_quantize(x, w, 1e-6, granularity, Fp8Format.E4M3, False),
                       nx.rmsnorm_quantize(x, w, 1e-6, granularity), Fp8Format.E4M3)


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("power_of_2", [False, True])
def test_silu_mul_quantize(device, granularity, power_of_2):
    gate = (torch.randn(5, 200) * 3).to(device)
    up = torch.randn(200, 5).to(device).t()  # non-contiguous
    gate[3] = 0.0  # zero row
    got = silu_mul_quantize(gate, up, granularity, Fp8Format.E4M3, power_of_2)
    want = nx.silu_mul_quantize(gate, up, granularity, Fp8Format.E4M3, power_of_2)
    assert_close_quant(got, want, Fp8Format.E4M3)


def test_long_rows(device):
    """Rows longer than one register tile take the looping path."""
    x = torch.randn(2, 16500, device=device)
    w = torch.rand(16500, device=device) + 0.5
    for g in GRANS:
        assert_close_quant(rmsnorm_quantize(x, w, 1e-5, g, Fp8Format.E4M3, False),
                           nx.rmsnorm_quantize(x, w, 1e-5, g), Fp8Format.E4M3)
        assert_close_quant(silu_mul_quantize(x, x.flip(-1), g, Fp8Format.E4M3, False),
                           nx.silu_mul_quantize(x, x.flip(-1), g), Fp8Format.E4M3)


def test_fused_rejects_bad_inputs(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="weight shape"):
        rmsnorm_quantize(x, torch.ones(32, device=device), 1e-6, Granularity.ROW,
                         Fp8Format.E4M3, False)
    with pytest.raises(ValueError, match="same shape"):
        silu_mul_quantize(x, x[:, :32], Granularity.ROW, Fp8Format.E4M3, False)
    with pytest.raises(ValueError, match="weights"):
        silu_mul_quantize(x, x, Granularity.BLOCK, Fp8Format.E4M3, False)
    with pytest.raises(ValueError, match="dtype"):
        silu_mul_quantize(x.int(), x, Granularity.ROW, Fp8Format.E4M3, False)
