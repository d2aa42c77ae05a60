"""fp8compile::quantize* ops against the numerics reference (CPU path)."""

import pytest
import torch

import fp8compile  # noqa: F401
from fp8compile import numerics as nx

OPS = torch.ops.fp8compile


@pytest.mark.parametrize("shape", [(1, 128), (5, 200), (2, 3, 256), (17, 64)])
@pytest.mark.parametrize("gran", ["tensor", "row", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_reference(shape, gran, dtype):
    x = (torch.randn(shape) * 5).to(dtype)
    q, s = OPS.quantize(x, gran, "e4m3", False)
    rq, rs = nx.quantize(x, nx.Granularity(gran))
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(s, rs) and s.stride() == rs.stride()


def test_quantize_weight_blocks_and_e5m2():
    w = torch.randn(130, 200)
    q, s = OPS.quantize(w, "block", "e5m2", True)
    rq, rs = nx.quantize(w, nx.Granularity.BLOCK, nx.Fp8Format.E5M2, True)
    assert q.dtype == torch.float8_e5m2 and torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("gran", ["tensor", "row", "group"])
def test_opcheck_fake_matches_real(gran):
    torch.library.opcheck(OPS.quantize.default, (torch.randn(3, 5, 200), gran, "e4m3", False))
    torch.library.opcheck(OPS.quantize.default, (torch.randn(7, 64), gran, "e4m3", False))


def test_non_contiguous_input():
    x = torch.randn(300, 64).t()  # (64, 300) with strides (1, 64)
    q, s = OPS.quantize(x, "group", "e4m3", False)
    rq, rs = nx.quantize(x.contiguous(), nx.Granularity.GROUP)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    assert q.is_contiguous()
    # A permutation that reshapes to a strided view must still give a row-major payload.
    y = torch.randn(208, 3, 1).permute(2, 1, 0)
    assert OPS.quantize(y, "row", "e4m3", False)[0].is_contiguous()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="int64"):
        OPS.quantize(torch.arange(10).view(2, 5), "row", "e4m3", False)
    with pytest.raises(ValueError, match="granularity='rows'"):
        OPS.quantize(torch.randn(2, 5), "rows", "e4m3", False)
    with pytest.raises(ValueError, match="format='fp8'"):
        OPS.quantize(torch.randn(2, 5), "row", "fp8", False)


def test_quantize_scaled_static():
    x = torch.randn(4, 64) * 10
    q = OPS.quantize_scaled(x, torch.tensor(0.01), "tensor", "e4m3")
    assert q.float().abs().max() == 448.0  # saturates, never NaN
    torch.library.opcheck(OPS.quantize_scaled.default, (x, torch.tensor(0.5), "tensor", "e4m3"))


def test_quantize_delayed_uses_history_then_updates_it():
    hist = torch.zeros(4)
    x1 = torch.full((2, 8), 2.0)
    q1, s1 = OPS.quantize_delayed(x1, hist, "e4m3", False)
    assert s1 == 2.0 / 448 and hist.tolist() == [2.0, 0, 0, 0]  # first call: own amax
    x2 = torch.full((2, 8), 8.0)
    q2, s2 = OPS.quantize_delayed(x2, hist, "e4m3", False)
    assert s2 == 2.0 / 448, "scale comes from the history, not this call"
    assert q2.float().max() == 448.0, "and this call's larger values saturate"
    assert hist.tolist() == [8.0, 2.0, 0, 0]
    for _ in range(4):
        OPS.quantize_delayed(torch.ones(2, 8), hist, "e4m3", False)
    assert hist.tolist() == [1.0] * 4, "old amaxes fall out of the window"


@pytest.mark.parametrize("shape", [(1, 200), (3, 11, 200), (130, 256)])
@pytest.mark.parametrize("to", ["block", "row", "tensor"])
def test_requantize_t_matches_dequantize_then_quantize(shape, to):
    x = torch.randn(shape) * 3
    q, s = OPS.quantize(x, "group", "e4m3", False)
    qt, st = OPS.requantize_t(q, s, "group", to, "e4m3", False)
    plain = nx.dequantize(q, s, nx.Granularity.GROUP).reshape(-1, shape[-1])
    rq, rs = nx.quantize(plain.t(), nx.Granularity(to))
    assert qt.shape == (shape[-1], plain.shape[0]) and qt.is_contiguous()
    assert torch.equal(qt.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(st, rs)
    # test_schema multiplies the inputs, which CPU FP8 tensors do not support.
    torch.library.opcheck(OPS.requantize_t.default, (q, s, "group", to, "e4m3", False),
                          test_utils=("test_faketensor", "test_autograd_registration"))


def test_requantize_t_rejects_high_precision_input():
    with pytest.raises(ValueError, match="requantize_t takes an FP8 tensor"):
        OPS.requantize_t(torch.randn(4, 128), torch.ones(4, 1), "group", "block", "e4m3", False)


@pytest.mark.parametrize("shape", [(1, 200), (70, 200), (130, 256)])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_quantize_dual_is_both_groupings(shape, fmt):
    x = torch.randn(shape) * 3
    got = OPS.quantize_dual(x, fmt, False)
    f = nx.Fp8Format(fmt)
    want = (*nx.quantize(x, nx.Granularity.GROUP, f), *nx.quantize(x.t(), nx.Granularity.GROUP, f))
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                           b.view(torch.uint8) if b.element_size() == 1 else b)
    torch.library.opcheck(OPS.quantize_dual.default, (x, fmt, False))


def test_quantize_dual_needs_2d_float_input():
    with pytest.raises(ValueError, match="2-D tensor, got shape"):
        OPS.quantize_dual(torch.randn(2, 3, 4), "e4m3", False)
    with pytest.raises(ValueError, match="quantize_dual input has dtype"):
        OPS.quantize_dual(torch.zeros(4, 4, dtype=torch.int32), "e4m3", False)


@pytest.mark.parametrize("gran", ["tensor", "row", "group"])
def test_rmsnorm_quantize_with_residual_op(gran):
    # The op's residual argument: the norm of x + residual (in fp32), fake and real agree.
    x, r = torch.randn(3, 5, 200), torch.randn(3, 5, 200, dtype=torch.bfloat16)
    w = torch.rand(200) + 0.5
    q, s = OPS.rmsnorm_quantize(x, w, 1e-6, gran, "e4m3", False, residual=r)
    qr, sr = nx.rmsnorm_quantize(x + r.float(), w, 1e-6, nx.Granularity(gran))
    assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    torch.library.opcheck(OPS.rmsnorm_quantize.default, (x, w, 1e-6, gran, "e4m3", False),
                          {"residual": r})
    with pytest.raises(ValueError, match="residual .* must have x's shape"):
        OPS.rmsnorm_quantize(x, w, 1e-6, gran, "e4m3", False, residual=r[0])


def test_quantize_static_opcheck():
    x, up = torch.randn(3, 5, 256), torch.randn(3, 5, 256)
    for args in [(x, None, torch.rand(256), 1e-6, "rmsnorm", torch.tensor([0.01]), "e4m3"),
                 (x, up, None, 0.0, "silu_mul", torch.tensor([0.01]), "e5m2")]:
        torch.library.opcheck(OPS.quantize_static.default, args,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_autograd_registration"))
