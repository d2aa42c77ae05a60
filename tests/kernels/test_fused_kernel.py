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


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("shape", [(1, 300), (2, 3, 128), (3, 4100), (2, 16500)])
def test_rmsnorm_of_a_residual_add(device, granularity, shape):
    # RMSNorm(x + residual), the sum in fp32: one row (M=1), K within a power of two, past
    # one, and past one tile (the looping path); the residual non-contiguous, in bf16 where
    # x is fp32, with a NaN that poisons its own row only.
    x = (torch.randn(shape) * 2).to(device)
    r = (torch.randn(tuple(reversed(shape))) * 2).to(device, torch.bfloat16).permute(
        *reversed(range(len(shape))))
    if len(shape) > 2 or shape[0] > 1:
        r[(-1,) * (r.dim() - 1) + (7,)] = float("nan")
    w = (torch.rand(shape[-1]) + 0.5).to(device)
    got = rmsnorm_quantize(x, w, 1e-6, granularity, Fp8Format.E4M3, False, residual=r)
    want = nx.rmsnorm_quantize(x, w, 1e-6, granularity, Fp8Format.E4M3, False, residual=r)
    assert_close_quant(got, want, Fp8Format.E4M3)
    # Not the norm of x alone, nor of a sum rounded to bf16 first (payloads differ).
    alone = nx.rmsnorm_quantize(x, w, 1e-6, granularity)
    assert not torch.equal(got[0].cpu().view(torch.uint8), alone[0].cpu().view(torch.uint8))


def test_fused_rejects_bad_inputs(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="weight shape"):
        rmsnorm_quantize(x, torch.ones(32, device=device), 1e-6, Granularity.ROW,
                         Fp8Format.E4M3, False)
    with pytest.raises(ValueError, match="residual .* must have x's shape"):
        rmsnorm_quantize(x, torch.ones(64, device=device), 1e-6, Granularity.ROW,
                         Fp8Format.E4M3, False, residual=x[0])
    with pytest.raises(ValueError, match="residual has dtype"):
        rmsnorm_quantize(x, torch.ones(64, device=device), 1e-6, Granularity.ROW,
                         Fp8Format.E4M3, False, residual=x.int())
    with pytest.raises(ValueError, match="same shape"):
        silu_mul_quantize(x, x[:, :32], Granularity.ROW, Fp8Format.E4M3, False)
    with pytest.raises(ValueError, match="weights"):
        silu_mul_quantize(x, x, Granularity.BLOCK, Fp8Format.E4M3, False)
    with pytest.raises(ValueError, match="dtype"):
        silu_mul_quantize(x.int(), x, Granularity.ROW, Fp8Format.E4M3, False)


@pytest.mark.parametrize("producer", ["none", "rmsnorm", "add_rmsnorm", "silu_mul"])
@pytest.mark.parametrize("shape", [(1, 200), (3, 5, 300), (2, 16500)])
@pytest.mark.parametrize("seen", [False, True])
def test_quantize_history_matches_reference(device, producer, shape, seen):
    # Delayed scaling's cast, alone or fused into its producer: the scale of the history's
    # max (or, while it is all zero, of this call's amax), the amax of what was cast, and
    # the payload; against the op's reference (the producer in fp32, then numerics).
    from fp8compile.kernels.fused import quantize_history
    from fp8compile.ops.training_state import _quantize_history_ref

    x = torch.randn(shape) * 3
    if "rmsnorm" not in producer:  # (a NaN poisons a whole row after RMSNorm)
        x.view(-1, shape[-1])[0, 3] = float("nan")
    x2 = torch.randn(shape) if producer in ("silu_mul", "add_rmsnorm") else None
    w = 1 + 0.1 * torch.randn(shape[-1]) if "rmsnorm" in producer else None
    hist = torch.tensor([0.0, 2.5, 1.0, 0.0]) if seen else torch.zeros(4)
    fmt = Fp8Format.E4M3
    on = [t.to(device) if t is not None else None for t in (x, x2, w, hist)]
    q, s, amax = quantize_history(on[0], on[1], on[2], 1e-6, producer, on[3], fmt)
    qr, sr, ar = _quantize_history_ref(x, x2, w, 1e-6, producer, hist, fmt, False)
    if seen:  # the history decides: 2.5 / 448, exactly
        assert torch.equal(s.cpu(), nx.compute_scale(torch.tensor(2.5)))
    torch.testing.assert_close(amax.cpu(), ar, rtol=1e-6, atol=0)
    if producer == "none":
        assert torch.equal(s.cpu(), sr) and torch.equal(amax.cpu(), ar)
        nan = q.float().isnan().cpu()
        assert torch.equal(q.view(torch.uint8).cpu()[~nan], qr.view(torch.uint8)[~nan])
    else:
        assert_close_quant((q, s), (qr, sr), fmt)


@pytest.mark.parametrize("producer", ["none", "rmsnorm", "add_rmsnorm", "silu_mul"])
# (3, 4000): rows of 4096 columns once rounded up, one row per program (cast_only)
@pytest.mark.parametrize("shape", [(1, 200), (3, 5, 300), (3, 4000), (2, 16500)])
@pytest.mark.parametrize("fmt", list(Fp8Format))
def test_quantize_static_matches_reference(device, producer, shape, fmt):
    # Static scaling's cast, alone or fused into its producer: one launch with the given
    # scale, against the op's reference (the producer in fp32, then numerics).  The scale is
    # below the data's amax, so values saturate; a NaN stays NaN.
    from fp8compile.kernels.fused import quantize_static
    from fp8compile.ops.fused import _quantize_static_ref

    x = torch.randn(shape) * 3
    if "rmsnorm" not in producer:  # (a NaN or Inf poisons a whole row after RMSNorm)
        x.view(-1, shape[-1])[-1, 1] = float("nan")
        x.view(-1, shape[-1])[0, 2] = float("inf")
    x2 = torch.randn(shape) if producer in ("silu_mul", "add_rmsnorm") else None
    w = 1 + 0.1 * torch.randn(shape[-1]) if "rmsnorm" in producer else None
    scale = nx.compute_scale(torch.tensor(1.5), fmt).reshape(1)
    on = [t.to(device) if t is not None else None for t in (x, x2, w, scale)]
    q = quantize_static(on[0], on[1], on[2], 1e-6, producer, on[3], fmt)
    qr = _quantize_static_ref(x, x2, w, 1e-6, producer, scale, fmt)
    assert q.shape == qr.shape and q.dtype == qr.dtype == fmt.dtype
    nan = qr.float().isnan()
    assert torch.equal(q.float().isnan().cpu(), nan)
    fmax = torch.finfo(fmt.dtype).max
    assert (qr.float()[~nan].abs() == fmax).any()  # the test saturates some values
    if producer == "none":
        assert torch.equal(q.view(torch.uint8).cpu()[~nan], qr.view(torch.uint8)[~nan])
    else:  # E5M2 keeps an Inf input (E4M3 saturates it): the same places, then the rest
        inf = qr.float().isinf()
        assert torch.equal(q.float().isinf().cpu(), inf)
        keep = ~inf.reshape(-1)
        assert_close_quant((q.reshape(-1)[keep.to(q.device)], scale),
                           (qr.reshape(-1)[keep], scale), fmt)


def test_quantize_static_rejects_bad_input(device):
    x = torch.randn(4, 256, device=device)
    op = torch.ops.fp8compile.quantize_static
    with pytest.raises(ValueError, match="one fp32 element"):
        op(x, None, None, 0.0, "none", torch.ones(2, device=device), "e4m3")
    with pytest.raises(ValueError, match="one fp32 element"):
        op(x, None, None, 0.0, "none", torch.ones(1, device=device, dtype=torch.float64), "e4m3")
    with pytest.raises(ValueError, match="needs x2"):
        op(x, None, None, 0.0, "silu_mul", torch.ones(1, device=device), "e4m3")
    with pytest.raises(ValueError, match="producer 'gelu'"):
        op(x, None, None, 0.0, "gelu", torch.ones(1, device=device), "e4m3")
    with pytest.raises(ValueError, match="dtype"):
        op(x.int(), None, None, 0.0, "none", torch.ones(1, device=device), "e4m3")


@pytest.mark.parametrize("seen", [False, True])
@pytest.mark.parametrize("shape", [(5, 300), (2, 20000), (1100, 8192)])
def test_history_cast_zeroes_its_amax_cell_itself(device, seen, shape):
    # The history form of the cast takes any cell for x's amax (no fill kernel): the first
    # launch zeroes it, also when it returns at once because the history holds a value.
    # (1100, 8192) runs 1100 programs, one amax slot each: the first step's cast reads them
    # 1024 at a time.
    from fp8compile.kernels.quant import quantize_rows
    from fp8compile.ops.training_state import _quantize_history_ref

    x = torch.randn(shape) * 2
    x[-1, -1] = 30.0  # x's amax in the last program's slot
    hist = torch.tensor([0.0, 9.0, 1.0]) if seen else torch.zeros(3)
    cell = torch.full((1,), 1e30, device=device)
    q, s = quantize_rows(x.to(device), Granularity.TENSOR, Fp8Format.E4M3, False,
                         history=hist.to(device), amax_out=cell)
    qr, sr, ar = _quantize_history_ref(x, None, None, 0.0, "none", hist, Fp8Format.E4M3,
                                       False)
    assert torch.equal(cell.reshape(()).cpu(), ar)
    assert torch.equal(s.cpu(), sr)
    assert torch.equal(q.view(torch.uint8).cpu(), qr.view(torch.uint8))


def test_history_cast_rejects_other_modes(device):
    from fp8compile.kernels.quant import quantize_rows

    x, hist = torch.randn(4, 64, device=device), torch.zeros(3, device=device)
    with pytest.raises(ValueError, match="history takes a tensorwise cast with amax_out"):
        quantize_rows(x, Granularity.ROW, Fp8Format.E4M3, False, history=hist,
                      amax_out=torch.empty(1, device=device))
    with pytest.raises(ValueError, match="history takes"):
        quantize_rows(x, Granularity.TENSOR, Fp8Format.E4M3, False, history=hist)


@pytest.mark.parametrize("seen", [False, True])
@pytest.mark.parametrize("shape, transposed", [((1, 5), False), ((70, 130), False),
                                               ((130, 70), True), ((65920, 1), False)])
def test_history_cast_t_matches_reference(device, seen, shape, transposed):
    # dY's delayed cast with its transpose from the same read, by 64x64 tiles: both payloads,
    # the scale and the amax against the op's reference; NaN, Inf and an all-zero tile in x.
    # (65920, 1) runs 1030 tiles: the first step's cast reads their slots 1024 at a time.
    from fp8compile.kernels.quant import quantize_history_t
    from fp8compile.ops.training_state import _quantize_history_ref

    x = torch.randn(shape) * 3
    x.view(-1)[0] = float("nan")
    x.view(-1)[1 % x.numel()] = float("-inf")
    x[-1, -1] = 40.0  # x's amax in the last tile
    if transposed:  # a non-contiguous view
        x = x.t().contiguous().t()
    hist = torch.tensor([0.0, 2.5, 1.0]) if seen else torch.zeros(3)
    q, qt, s, amax = quantize_history_t(x.to(device), hist.to(device), Fp8Format.E4M3)
    qr, sr, ar = _quantize_history_ref(x, None, None, 0.0, "none", hist, Fp8Format.E4M3, False)
    assert torch.equal(s.cpu(), sr) and torch.equal(amax.cpu(), ar)
    assert torch.equal(q.view(torch.uint8).cpu(), qr.view(torch.uint8))
    assert torch.equal(qt.view(torch.uint8).cpu(), qr.view(torch.uint8).t().contiguous())


def test_history_cast_t_rejects_bad_input(device):
    from fp8compile.kernels.quant import quantize_history_t

    with pytest.raises(ValueError, match="must be 2-D"):
        quantize_history_t(torch.randn(2, 3, 4, device=device), torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="dtype"):
        quantize_history_t(torch.ones(4, 4, dtype=torch.int32, device=device),
                           torch.zeros(3, device=device))


@pytest.mark.parametrize("shape", [(1, 5), (70, 130), (130, 1)])
def test_dynamic_cast_t_matches_quantize(device, shape):
    # Dynamic tensorwise dY and its transpose from one read: as quantize(x, TENSOR) and
    # its transpose, amax returned; NaN and -Inf in x.
    from fp8compile.kernels.quant import quantize_history_t

    x = torch.randn(shape) * 3
    x.view(-1)[0] = float("nan")
    x.view(-1)[-1] = float("-inf")
    q, qt, s, amax = quantize_history_t(x.to(device), None, Fp8Format.E5M2)
    qr, sr = nx.quantize(x, Granularity.TENSOR, Fp8Format.E5M2)
    assert torch.equal(s.cpu(), sr)
    assert torch.equal(amax.cpu(), nx.amax(x, Granularity.TENSOR).float())
    assert torch.equal(q.view(torch.uint8).cpu(), qr.view(torch.uint8))
    assert torch.equal(qt.view(torch.uint8).cpu(), qr.view(torch.uint8).t().contiguous())
