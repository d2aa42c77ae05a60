"""fp8compile::scaled_mm against the numerics reference (CPU path)."""

import pytest
import torch
import torch.nn.functional as F

import fp8compile  # noqa: F401
from fp8compile import numerics as nx

OPS = torch.ops.fp8compile
RECIPES = [("group", "block"), ("row", "row"), ("tensor", "tensor")]


def _operands(x, w, xg, wg):
    xq, xs = OPS.quantize(x, xg, "e4m3", False)
    wq, ws = OPS.quantize(w, wg, "e4m3", False)
    return xq, xs, wq, ws


@pytest.mark.parametrize("xg, wg", RECIPES)
@pytest.mark.parametrize("m, n, k", [(1, 128, 128), (7, 130, 200), (64, 256, 384)])
@pytest.mark.parametrize("bias", [False, True])
def test_scaled_mm_vs_fp32(xg, wg, m, n, k, bias):
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.1
    b = torch.randn(n) if bias else None
    xq, xs, wq, ws = _operands(x, w, xg, wg)
    y = OPS.scaled_mm(xq, xs, xg, wq, ws, wg, b, torch.float32, "precise", "none", None)
    want = nx.fp8_linear_reference(xq, xs, nx.Granularity(xg), wq, ws, nx.Granularity(wg), b,
                                   torch.float32)
    torch.testing.assert_close(y, want)
    sqnr = nx.sqnr(F.linear(x, w, b), y)
    assert sqnr >= 24.0, f"{sqnr=}"


@pytest.mark.parametrize("act, fn", [("gelu", F.gelu), ("silu", F.silu), ("relu", F.relu)])
def test_epilogue(act, fn):
    x, w, r = torch.randn(3, 5, 256), torch.randn(128, 256), torch.randn(3, 5, 128)
    xq, xs, wq, ws = _operands(x, w, "group", "block")
    plain = OPS.scaled_mm(xq, xs, "group", wq, ws, "block", None, torch.float32, "precise",
                          "none", None)
    y = OPS.scaled_mm(xq, xs, "group", wq, ws, "block", None, torch.bfloat16, "fast", act, r)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 128)
    torch.testing.assert_close(y, (fn(plain) + r).bfloat16())


def test_opcheck():
    x, w = torch.randn(2, 3, 200), torch.randn(130, 200)
    xq, xs, wq, ws = _operands(x, w, "group", "block")
    args = (xq, xs, "group", wq, ws, "block", torch.randn(130), torch.bfloat16, "precise",
            "silu", torch.randn(2, 3, 130))
    # test_schema multiplies the inputs, which CPU FP8 tensors do not support.
    torch.library.opcheck(OPS.scaled_mm.default, args,
                          test_utils=("test_faketensor", "test_autograd_registration"))


def test_second_residual_is_added_in_fp32():
    # The op's residual2: the residual stream x + o as two terms, summed in fp32 with the
    # product and rounded once; fake and real agree; residual2 alone is refused.
    x, w = torch.randn(3, 5, 256), torch.randn(128, 256)
    r1, r2 = ((torch.randn(3, 5, 128) * 4).bfloat16() for _ in range(2))
    xq, xs, wq, ws = _operands(x, w, "row", "row")
    plain = OPS.scaled_mm(xq, xs, "row", wq, ws, "row", None, torch.float32, "fast", "none",
                          None)
    y = OPS.scaled_mm(xq, xs, "row", wq, ws, "row", None, torch.bfloat16, "fast", "none", r1,
                      r2)
    torch.testing.assert_close(y, (plain + (r1.float() + r2.float())).bfloat16())
    assert not torch.equal(y, (plain + (r1 + r2)).bfloat16())  # h rounded first differs
    args = (xq, xs, "row", wq, ws, "row", None, torch.bfloat16, "fast", "none", r1, r2)
    torch.library.opcheck(OPS.scaled_mm.default, args,
                          test_utils=("test_faketensor", "test_autograd_registration"))
    with pytest.raises(ValueError, match="residual2 is a second residual"):
        OPS.scaled_mm(xq, xs, "row", wq, ws, "row", None, torch.bfloat16, "fast", "none",
                      None, r2)


@pytest.mark.parametrize("xg, wg", RECIPES)
def test_swiglu_epilogue_is_silu_gate_times_up(xg, wg):
    x, r = torch.randn(3, 5, 256), torch.randn(3, 5, 384)
    gate, up = torch.randn(384, 256) * 0.1, torch.randn(384, 256) * 0.1
    w = torch.cat([gate, up])
    xq, xs, wq, ws = _operands(x, w, xg, wg)
    plain = OPS.scaled_mm(xq, xs, xg, wq, ws, wg, None, torch.float32, "precise", "none", None)
    y = OPS.scaled_mm(xq, xs, xg, wq, ws, wg, None, torch.bfloat16, "fast", "swiglu", r)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 384)
    torch.testing.assert_close(y, (nx.swiglu(plain) + r).bfloat16())
    sqnr = nx.sqnr(F.silu(x @ gate.t()) * (x @ up.t()), y.float() - r)
    assert sqnr >= 20.0, f"{sqnr=}"
    # the fake kernel gives the half-width shape too
    args = (xq, xs, xg, wq, ws, wg, None, torch.bfloat16, "fast", "swiglu", r)
    torch.library.opcheck(OPS.scaled_mm.default, args,
                          test_utils=("test_faketensor", "test_autograd_registration"))


def test_bad_inputs_are_named():
    x, w = torch.randn(4, 256), torch.randn(128, 256)
    xq, xs, wq, ws = _operands(x, w, "row", "row")
    with pytest.raises(ValueError, match="FP8 operands"):
        OPS.scaled_mm(x, xs, "row", wq, ws, "row", None, torch.float32, "precise", "none", None)
    with pytest.raises(ValueError, match="K=256"):
        OPS.scaled_mm(xq, xs, "row", wq[:, :128], ws, "row", None, torch.float32, "precise",
                      "none", None)
    with pytest.raises(ValueError, match="bias shape"):
        OPS.scaled_mm(xq, xs, "row", wq, ws, "row", torch.randn(3), torch.float32, "precise",
                      "none", None)
    with pytest.raises(ValueError, match="activation='tanh'"):
        OPS.scaled_mm(xq, xs, "row", wq, ws, "row", None, torch.float32, "precise", "tanh",
                      None)
    with pytest.raises(ValueError, match=r"N % 256 == 0 \(gate rows then up rows.*N=128"):
        OPS.scaled_mm(xq, xs, "row", wq, ws, "row", None, torch.float32, "fast", "swiglu",
                      None)


def test_nan_row_stays_in_its_row_and_zeros_give_zeros():
    x, w = torch.randn(6, 256), torch.randn(128, 256)
    x[2, 7] = float("nan")
    x[4] = 0
    for xg, wg in RECIPES:
        xq, xs, wq, ws = _operands(x, w, xg, wg)
        y = OPS.scaled_mm(xq, xs, xg, wq, ws, wg, None, torch.float32, "precise", "none", None)
        assert y[2].isnan().all()
        assert torch.isfinite(y[[0, 1, 3, 4, 5]]).all(), xg
        assert (y[4] == 0).all()


@pytest.mark.parametrize("xg, wg", RECIPES)
@pytest.mark.parametrize("activation", ["none", "swiglu"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_scaled_mm_quantized_is_the_static_cast_of_the_product(xg, wg, activation, fmt):
    # The fp32 product (and its epilogue) cast with the given scale: saturating, NaN kept.
    x = torch.randn(2, 7, 256)
    x[1, 3, 5] = float("nan")
    w = torch.randn(512, 256) * 0.1
    b = torch.randn(512)
    xq, xs, wq, ws = _operands(x, w, xg, wg)
    fmax = nx.Fp8Format(fmt).max
    scale = torch.tensor([0.25 / fmax])  # below the product's amax: some values saturate
    q = OPS.scaled_mm_quantized(xq, xs, xg, wq, ws, wg, b, "fast", activation, scale, fmt)
    y = OPS.scaled_mm(xq, xs, xg, wq, ws, wg, b, torch.float32, "precise", activation, None)
    want = nx.quantize_with_scale(y, scale.reshape(()), nx.Granularity.TENSOR, nx.Fp8Format(fmt))
    assert q.dtype == nx.Fp8Format(fmt).dtype and q.shape == y.shape
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    assert q.float().isnan()[1, 3].all() and not q.float().isnan()[0].any()
    assert (q.float().abs() == fmax).any()


def test_scaled_mm_quantized_rejects_bad_scales():
    xq, xs, wq, ws = _operands(torch.randn(4, 128), torch.randn(128, 128), "row", "row")
    with pytest.raises(ValueError, match="one fp32 element"):
        OPS.scaled_mm_quantized(xq, xs, "row", wq, ws, "row", None, "fast", "none",
                                torch.ones(2), "e4m3")
    with pytest.raises(ValueError, match="one fp32 element"):
        OPS.scaled_mm_quantized(xq, xs, "row", wq, ws, "row", None, "fast", "none",
                                torch.ones(1, dtype=torch.bfloat16), "e4m3")
    with pytest.raises(ValueError, match="format="):
        OPS.scaled_mm_quantized(xq, xs, "row", wq, ws, "row", None, "fast", "none",
                                torch.ones(1), "e3m4")


def test_scaled_mm_quantized_opcheck():
    x, w = torch.randn(2, 3, 256), torch.randn(512, 256) * 0.1
    xq, xs, wq, ws = _operands(x, w, "tensor", "tensor")
    args = (xq, xs, "tensor", wq, ws, "tensor", torch.randn(512), "fast", "swiglu",
            torch.tensor([0.01]), "e4m3")
    torch.library.opcheck(OPS.scaled_mm_quantized.default, args,
                          test_utils=("test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("lead", [(1,), (2, 3)])
def test_scaled_mm_swiglu_quantize(lead):
    """The blockwise gate/up GEMM quantizing its SwiGLU in 1x128 groups: numerics' group
    quantization of the fp32 SwiGLU of the stacked weight's product, with the layout
    ``fp8compile::quantize`` gives groups; the fake agrees (opcheck); operands other
    than 1x128 x 128x128, or gate and up that do not pair by 128, are refused."""
    x = torch.randn(*lead, 256)
    gate, up = torch.randn(256, 256) * 0.1, torch.randn(256, 256) * 0.1
    xq, xs, wq, ws = _operands(x, torch.cat([gate, up]), "group", "block")
    args = (xq, xs, "group", wq, ws, "block", "precise", "e4m3", False)
    q, s = OPS.scaled_mm_swiglu_quantize(*args)
    y = OPS.scaled_mm(xq, xs, "group", wq, ws, "block", None, torch.float32, "precise",
                      "swiglu", None)
    qr, sr = OPS.quantize(y, "group", "e4m3", False)
    assert torch.equal(s, sr) and s.stride() == sr.stride()
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    ref_h = F.silu(F.linear(x, gate)) * F.linear(x, up)
    assert nx.sqnr(ref_h, nx.dequantize(q, s, nx.Granularity.GROUP)) >= 20.0
    torch.library.opcheck(OPS.scaled_mm_swiglu_quantize.default, args,
                          test_utils=("test_faketensor",))
    with pytest.raises(ValueError, match="blockwise operands only"):
        OPS.scaled_mm_swiglu_quantize(xq, xs, "row", wq, ws, "block", "precise", "e4m3", False)
    with pytest.raises(ValueError, match="N % 256 == 0"):
        OPS.scaled_mm_swiglu_quantize(xq, xs, "group", wq[:384], ws[:3], "block", "precise",
                                      "e4m3", False)


@pytest.mark.parametrize("xg, wg", RECIPES)
def test_scaled_grouped_mm_vs_fp32_per_group(xg, wg):
    """Each group's rows against an fp32 linear with its own weight; rows past the last
    offset zero."""
    x, w = torch.randn(40, 256), torch.randn(3, 136, 256) * 0.1
    ends = [10, 10, 33]
    xq, xs = OPS.quantize(x, xg, "e4m3", False)
    wq, ws = OPS.quantize_grouped_weight(w, wg, "e4m3", False)
    offs = torch.tensor(ends, dtype=torch.int32)
    y = OPS.scaled_grouped_mm(xq, xs, xg, wq, ws, wg, offs, torch.float32, "precise")
    assert y.shape == (40, 136) and torch.all(y[33:] == 0)
    for g, (lo, hi) in enumerate(zip([0] + ends, ends)):
        if hi > lo:
            assert nx.sqnr(x[lo:hi] @ w[g].t(), y[lo:hi]) >= 24.0
    torch.library.opcheck(OPS.scaled_grouped_mm.default,
                          (xq, xs, xg, wq, ws, wg, offs, torch.bfloat16, "fast"),
                          test_utils=("test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(OPS.quantize_grouped_weight.default, (w, wg, "e4m3", False),
                          test_utils=("test_faketensor", "test_autograd_registration"))


def test_scaled_grouped_mm_bad_inputs():
    xq, xs = OPS.quantize(torch.randn(8, 128), "row", "e4m3", False)
    wq, ws = OPS.quantize_grouped_weight(torch.randn(2, 64, 128), "row", "e4m3", False)
    offs = torch.tensor([4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="takes FP8 operands"):
        OPS.scaled_grouped_mm(xq.float(), xs, "row", wq, ws, "row", offs, torch.float32, "fast")
    with pytest.raises(ValueError, match=r"\(S, K\) and \(groups, N, K\)"):
        OPS.scaled_grouped_mm(xq, xs, "row", wq[0], ws[0], "row", offs, torch.float32, "fast")
    with pytest.raises(ValueError, match="int32"):
        OPS.scaled_grouped_mm(xq, xs, "row", wq, ws, "row", offs.long(), torch.float32, "fast")
    with pytest.raises(ValueError, match="non-decreasing"):
        OPS.scaled_grouped_mm(xq, xs, "row", wq, ws, "row",
                              torch.tensor([5, 3], dtype=torch.int32), torch.float32, "fast")
