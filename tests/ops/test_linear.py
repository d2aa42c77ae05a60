"""fp8compile::linear / linear_delayed gradients against FP32 autograd (CPU reference path).

The FP8 bound: a GEMM of two operands rounded to FP8 (relative rounding error at most
``u = 2**-(mantissa bits + 1)``: 1/16 for E4M3, 1/8 for E5M2) has a relative error of at
most ``u_a + u_b + u_a*u_b`` per product.  Random data cancels some of it; the tests require
the normwise relative error to stay under half of that worst case (measured: 0.037 for
E4M3 x E4M3 against a bound of 0.129; ``dW`` of the blockwise and rowwise recipes rounds X
twice, its saved FP8 copy being requantized along M, and gets that extra rounding's share).
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fp8compile  # noqa: F401
from fp8compile import numerics as nx

OPS = torch.ops.fp8compile
U = {"e4m3": 2.0**-4, "e5m2": 2.0**-3}
RECIPES = ["blockwise", "rowwise", "tensorwise"]
SHAPES = [(1, 128, 128), (7, 130, 200), (64, 256, 384), ((2, 3), 128, 256)]


def _bound(*us: float) -> float:
    """Half the worst-case relative error of a product of values rounded with ``us``."""
    out = 0.0
    for u in us:
        out = out + u + out * u
    return 0.5 * out


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _fp32_grads(x, w, b, gy):
    xr = x.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    br = b.detach().clone().requires_grad_() if b is not None else None
    F.linear(xr, wr, br).backward(gy)
    return xr.grad, wr.grad, br.grad if br is not None else None


def _inputs(m, n, k, bias):
    lead = m if isinstance(m, tuple) else (m,)
    x = torch.randn(*lead, k, requires_grad=True)
    w = (torch.randn(n, k) * k**-0.5).requires_grad_()
    b = torch.randn(n, requires_grad=True) if bias else None
    gy = torch.randn(*lead, n)
    return x, w, b, gy


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("m, n, k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("grad_fmt", ["e4m3", "e5m2"])
def test_linear_grads_within_fp8_bound(recipe, m, n, k, bias, grad_fmt):
    x, w, b, gy = _inputs(m, n, k, bias)
    y, xq, xs, _ = OPS.linear(x, w, b, recipe, "e4m3", "e4m3", grad_fmt, False, "precise")
    y.backward(gy)
    dx, dw, db = _fp32_grads(x, w, b, gy)
    assert xq.dtype == torch.float8_e4m3fn and y.shape == (*gy.shape,)
    assert x.grad.dtype == w.grad.dtype == torch.float32
    assert _rel(y, F.linear(x, w, b)) < _bound(U["e4m3"], U["e4m3"])
    e4, g = U["e4m3"], U[grad_fmt]
    assert _rel(x.grad, dx) < _bound(g, e4), f"dX {recipe} {_rel(x.grad, dx)=}"
    twice = () if recipe == "tensorwise" else (e4,)
    assert _rel(w.grad, dw) < _bound(g, e4, *twice), f"dW {recipe} {_rel(w.grad, dw)=}"
    if bias:
        torch.testing.assert_close(b.grad, db)


@pytest.mark.parametrize("recipe", RECIPES)
def test_e4m3_gradients_beat_e5m2(recipe):
    """gradient_format is honoured: E4M3 (one more mantissa bit) gives smaller errors."""
    x, w, _, gy = _inputs(64, 256, 256, False)
    errs = {}
    for fmt in ("e4m3", "e5m2"):
        xi, wi = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        OPS.linear(xi, wi, None, recipe, "e4m3", "e4m3", fmt, False, "precise")[0].backward(gy)
        errs[fmt] = _rel(xi.grad, _fp32_grads(x, w, None, gy)[0])
    assert errs["e4m3"] < errs["e5m2"], errs


def test_tensorwise_dw_reuses_saved_fp8_activation():
    """dW = dequant(dYq)ᵀ @ dequant(xq) exactly: the saved FP8 copy is not rounded again."""
    x, w, _, gy = _inputs(32, 128, 256, False)
    _, xq, xs, _ = OPS.linear(x, w, None, "tensorwise", "e4m3", "e4m3", "e5m2", False, "precise")
    OPS.linear(x, w, None, "tensorwise", "e4m3", "e4m3", "e5m2", False, "precise")[0].backward(gy)
    gq, gs = nx.quantize(gy, nx.Granularity.TENSOR, nx.Fp8Format.E5M2)
    want = nx.dequantize(gq, gs, nx.Granularity.TENSOR).t() @ nx.dequantize(
        xq, xs, nx.Granularity.TENSOR
    )
    torch.testing.assert_close(w.grad, want, rtol=1e-5, atol=1e-5)


class _OpLog(TorchDispatchMode):
    """The fp8compile ops a piece of code calls, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fp8compile":
            self.calls.append((func.__name__.split(".")[0], args))
        return func(*args, **(kwargs or {}))

    def names(self):
        return Counter(name for name, _ in self.calls)


def test_blockwise_backward_reads_dy_once_and_requantizes_saved_x():
    """The blockwise backward's op structure (what the GPU timings rest on) and its values:
    one dual quantization of dY, one requantization of the saved FP8 X, no 16-bit X."""
    x, w, _, gy = _inputs(70, 130, 200, False)
    y, xq, xs, _ = OPS.linear(x, w, None, "blockwise", "e4m3", "e4m3", "e4m3", False, "precise")
    with _OpLog() as log:
        y.backward(gy)
    assert log.names() == {"quantize_dual": 1, "requantize_t": 1, "quantize": 1, "scaled_mm": 2}
    G = nx.Granularity
    gq, gsc = nx.quantize(gy, G.GROUP)
    gqt, gst = nx.quantize(gy.t(), G.GROUP)
    wq, wsc = nx.quantize(w.detach().t(), G.BLOCK)
    xqt, xst = nx.quantize(nx.dequantize(xq, xs, G.GROUP).t(), G.BLOCK)
    torch.testing.assert_close(x.grad, nx.fp8_linear_reference(gq, gsc, G.GROUP, wq, wsc, G.BLOCK,
                                                               out_dtype=torch.float32))
    torch.testing.assert_close(w.grad, nx.fp8_linear_reference(gqt, gst, G.GROUP, xqt, xst,
                                                               G.BLOCK, out_dtype=torch.float32))


@pytest.mark.parametrize("scaling", ["dynamic", "delayed"])
def test_tensorwise_backward_quantizes_wt_with_the_forward_scale(scaling):
    """Wᵀ is quantized with the weight scale the forward computed (no amax pass over W in
    backward), which gives the bits a fresh quantization of Wᵀ gives."""
    x, w, _, gy = _inputs(33, 130, 200, False)
    if scaling == "dynamic":
        y, _, _, ws = OPS.linear(x, w, None, "tensorwise", "e4m3", "e4m3", "e4m3", False,
                                 "precise")
    else:
        y, _, ws = _delayed(x, w, torch.zeros(2, 4), torch.zeros(1, 4))
    with _OpLog() as log:
        y.backward(gy)
    names = log.names()
    assert names["quantize_scaled"] == 1, names  # Wᵀ
    # dY, dynamic: quantized with its transpose (for dW) from one read.
    assert names["quantize_tensor_t"] == (scaling == "dynamic"), names
    # dY, delayed: quantized with its history's scale (and transposed, for dW), its amax
    # recorded in the same pass.
    assert names["quantize_history_t"] == (scaling == "delayed"), names
    (s,) = [a[1] for n, a in log.calls if n == "quantize_scaled" and a[0].shape == (200, 130)]
    assert torch.equal(s, ws)
    G = nx.Granularity
    wq_fresh, ws_fresh = nx.quantize(w.detach().t(), G.TENSOR)
    torch.testing.assert_close(ws_fresh, ws.reshape(()), rtol=0, atol=0)
    gq, gsc = nx.quantize(gy, G.TENSOR) if scaling == "dynamic" else (None, None)
    if gq is not None:
        want = nx.fp8_linear_reference(gq, gsc, G.TENSOR, wq_fresh, ws_fresh, G.TENSOR,
                                       out_dtype=torch.float32)
        torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


@pytest.mark.parametrize("grad_acc", ["precise", "fast"])
def test_backward_gemms_use_grad_accumulation(grad_acc):
    """Both backward GEMMs accumulate as ``grad_accumulation`` says (default precise), not as
    the forward's ``accumulation``."""
    for recipe in RECIPES:
        x, w, _, gy = _inputs(16, 128, 256, False)
        with _OpLog() as log:
            extra = () if grad_acc == "precise" else (grad_acc,)
            y = OPS.linear(x, w, None, recipe, "e4m3", "e4m3", "e4m3", False, "fast", *extra)[0]
            n_fwd = len(log.calls)
            y.backward(gy)
        # (The forward's body calls the GEMM without the dispatcher; only backward is seen.)
        bwd = [a[8] for n, a in log.calls[n_fwd:] if n == "scaled_mm"]
        assert bwd == [grad_acc] * 2, (recipe, bwd)


def test_power_of_2_scales_in_backward():
    x, w, _, gy = _inputs(16, 128, 256, False)
    y, _, xs, _ = OPS.linear(x, w, None, "blockwise", "e4m3", "e4m3", "e4m3", True, "precise")
    y.backward(gy)
    assert torch.equal(torch.exp2(torch.log2(xs).round()), xs)
    dx = _fp32_grads(x, w, None, gy)[0]
    assert _rel(x.grad, dx) < _bound(U["e4m3"], U["e4m3"])


def test_bf16_input_fp32_master_weight():
    x = torch.randn(8, 256, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    y, *_ = OPS.linear(x, w, None, "rowwise", "e4m3", "e4m3", "e4m3", False, "precise")
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_linear_opcheck():
    x = torch.randn(2, 3, 200, requires_grad=True)
    w = torch.randn(130, 200, requires_grad=True)
    b = torch.randn(130, requires_grad=True)
    args = (x, w, b, "blockwise", "e4m3", "e4m3", "e5m2", False, "precise")
    torch.library.opcheck(OPS.linear.default, args,
                          test_utils=("test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_q_equals_linear(recipe):
    """linear_q with the quantization done outside gives linear's output and gradients."""
    x, w, b, gy = _inputs((2, 7), 130, 200, True)
    y, *_ = OPS.linear(x, w, b, recipe, "e4m3", "e4m3", "e4m3", False, "precise")
    y.backward(gy)
    want = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    gran = fp8compile.Recipe(recipe).activation_granularity.value
    xq, xs = OPS.quantize(x.detach(), gran, "e4m3", False)
    args = (x, xq, xs, w, b, recipe, "e4m3", "e4m3", "e4m3", False, "precise")
    y2, _ = OPS.linear_q(*args)
    torch.testing.assert_close(y2, y)
    y2.backward(gy)
    for got, ref in zip((x.grad, w.grad, b.grad), want):
        torch.testing.assert_close(got, ref)
    torch.library.opcheck(OPS.linear_q.default, args,
                          test_utils=("test_faketensor", "test_autograd_registration"))


def test_linear_q_rejects_a_mismatched_quantization():
    x, w, _, _ = _inputs(4, 128, 256, False)
    xq, xs = OPS.quantize(torch.randn(4, 128), "group", "e4m3", False)
    with pytest.raises(ValueError, match="xq must be the FP8 quantization of x"):
        OPS.linear_q(x, xq, xs, w, None, "blockwise", "e4m3", "e4m3", "e4m3", False, "precise")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("only", [None, "x", "w"])
def test_linear_w_equals_linear(recipe, only):
    """linear_w with the weight's FP8 copies given (``weight_quants``) gives linear's output
    and gradients bit for bit, also when only dX or only dW is needed."""
    from fp8compile.ops.linear import weight_quants

    x, w, b, gy = _inputs((2, 7), 130, 200, True)
    if only:
        (w if only == "x" else x).requires_grad_(False)
    y, *_ = OPS.linear(x, w, b, recipe, "e4m3", "e4m3", "e5m2", False, "precise")
    y.backward(gy)
    want = [t.grad.clone() if t.grad is not None else None for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    gran = fp8compile.Recipe(recipe).activation_granularity.value
    xq, xs = OPS.quantize(x.detach(), gran, "e4m3", False)
    wqs = weight_quants(w.detach(), recipe, "e4m3", False)
    args = (x, xq, xs, w, *wqs, b, recipe, "e4m3", "e4m3", "e5m2", False, "precise")
    y2 = OPS.linear_w(*args)
    assert torch.equal(y2, y)
    y2.backward(gy)
    for got, ref in zip((x.grad, w.grad, b.grad), want):
        assert (got is None) == (ref is None)
        assert ref is None or torch.equal(got, ref)
    torch.library.opcheck(OPS.linear_w.default, args,
                          test_utils=("test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_w_takes_dx_from_the_given_transposed_weight(recipe):
    """dX comes from ``wq_t`` (a cache's copy), not from a requantized ``weight``: given the
    copies of -W, dX flips sign exactly (FP8 rounding is symmetric) while dW does not."""
    from fp8compile.ops.linear import weight_quants

    x, w, _, gy = _inputs(6, 128, 256, False)
    gran = fp8compile.Recipe(recipe).activation_granularity.value
    xq, xs = OPS.quantize(x.detach(), gran, "e4m3", False)
    grads = []
    for sign in (1, -1):
        *_, wq_t, ws_t = weight_quants(sign * w.detach(), recipe, "e4m3", False)
        wq, ws, *_ = weight_quants(w.detach(), recipe, "e4m3", False)
        OPS.linear_w(x, xq, xs, w, wq, ws, wq_t, ws_t, None, recipe, "e4m3", "e4m3", "e4m3",
                     False, "precise").backward(gy)
        grads.append((x.grad.clone(), w.grad.clone()))
        x.grad = w.grad = None
    assert torch.equal(grads[1][0], -grads[0][0]) and grads[0][0].abs().sum() > 0
    assert torch.equal(grads[1][1], grads[0][1])


def test_linear_w_rejects_a_transposed_weight_copy():
    from fp8compile.ops.linear import weight_quants

    x, w, _, _ = _inputs(4, 128, 256, False)
    xq, xs = OPS.quantize(x.detach(), "row", "e4m3", False)
    wq, ws, wq_t, ws_t = weight_quants(w.detach(), "rowwise", "e4m3", False)
    with pytest.raises(ValueError, match="wq_t must be an FP8 tensor of shape"):
        OPS.linear_w(x, xq, xs, w, wq, ws, wq, ws_t, None, "rowwise", "e4m3", "e4m3", "e4m3",
                     False, "precise")


def test_linear_shape_error_is_named():
    with pytest.raises(ValueError, match="weight must be"):
        OPS.linear(torch.randn(4, 64), torch.randn(32, 128), None, "rowwise", "e4m3", "e4m3",
                   "e4m3", False, "precise")


# -- delayed scaling ------------------------------------------------------------------------


def _delayed(x, w, h, gh, grad_fmt="e4m3"):
    y, xq, xs, ws, amax = OPS.linear_delayed(x, w, None, h, gh, "e4m3", "e4m3", grad_fmt, False,
                                             "precise")
    OPS.push_amax(h, amax)
    return y, xs, ws


def test_delayed_first_step_equals_dynamic_tensorwise():
    x, w, _, gy = _inputs(16, 128, 256, False)
    h, gh = torch.zeros(2, 4), torch.zeros(1, 4)
    y, _, _ = _delayed(x, w, h, gh)
    y.backward(gy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = OPS.linear(x2, w2, None, "tensorwise", "e4m3", "e4m3", "e4m3", False, "precise")[0]
    y2.backward(gy)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert h[0, 0] == x.detach().abs().max() and h[1, 0] == w.detach().abs().max()
    assert gh[0, 0] == gy.abs().max() and torch.all(h[:, 1:] == 0)


def test_delayed_history_scale_and_saturation():
    x, w, _, gy = _inputs(16, 128, 256, False)
    h, gh = torch.zeros(2, 3), torch.zeros(1, 3)
    for scale in (1.0, 0.5, 0.25):  # amax shrinks: the history max (step 1) gives the scale
        xi = (x.detach() * scale).requires_grad_()
        y, xs, _ = _delayed(xi, w, h, gh)
        y.backward(gy * scale)
    torch.testing.assert_close(xs, x.detach().abs().max() / 448)
    assert torch.allclose(h[0], x.detach().abs().max() * torch.tensor([0.25, 0.5, 1.0]))
    assert torch.allclose(gh[0], gy.abs().max() * torch.tensor([0.25, 0.5, 1.0]))
    # A 10x jump saturates against the stale scale (clamped to ±448 * scale, never inf).
    big = x.detach() * 10
    y, xs, ws = _delayed(big, w, h, gh)
    assert torch.isfinite(y).all()
    assert _rel(y, F.linear(big, w)) > 0.3
    assert h[0, 0] == big.abs().max()


def test_delayed_grads_within_fp8_bound():
    x, w, _, gy = _inputs((2, 5), 130, 200, False)
    h, gh = torch.zeros(2, 8), torch.zeros(1, 8)
    y, _, _ = _delayed(x, w, h, gh, "e5m2")
    y.backward(gy)
    dx, dw, _ = _fp32_grads(x, w, None, gy)
    assert _rel(x.grad, dx) < _bound(U["e5m2"], U["e4m3"])
    assert _rel(w.grad, dw) < _bound(U["e5m2"], U["e4m3"])


@pytest.mark.parametrize("bias", [False, True])
def test_delayed_q_equals_delayed_over_steps(bias):
    # linear_delayed_q with x quantized outside (as the shared q/k/v input is) gives
    # linear_delayed's outputs, gradients and histories, bit for bit, over three steps: the
    # first with empty histories, the next two from them (growing inputs saturate).
    x0, w0, b0, gy = _inputs((2, 5), 130, 200, bias)
    runs = []
    for shared in (False, True):
        x, w = x0.detach().clone().requires_grad_(), w0.detach().clone().requires_grad_()
        b = b0.detach().clone().requires_grad_() if bias else None
        h, gh = torch.zeros(2, 4), torch.zeros(1, 4)
        out = []
        for step in range(3):
            xi = x * (1 + step)
            if shared:
                row = h[0]
                first = OPS.amax_unless(xi.detach(), row)
                use = torch.where(row.amax(-1) > 0, row.amax(-1), first)
                xq, xs, xa = OPS.quantize_from_amax(xi.detach(), use, "e4m3", False)
                y, ws, wa = OPS.linear_delayed_q(xi, xq, xs, w, b, h, gh, "e4m3", "e4m3",
                                                 "e5m2", False, "precise")
                OPS.push_amax(h, torch.stack([xa, wa]))
            else:
                y, _, _, _, amax = OPS.linear_delayed(xi, w, b, h, gh, "e4m3", "e4m3", "e5m2",
                                                      False, "precise")
                OPS.push_amax(h, amax)
            y.backward(gy * (1 + step))
            out += [y.detach(), x.grad.clone(), w.grad.clone(), h.clone(), gh.clone()]
            if bias:
                out.append(b.grad.clone())
            x.grad = w.grad = None
            if bias:
                b.grad = None
        runs.append(out)
    for got, want in zip(*runs):
        assert torch.equal(got, want)


def test_delayed_q_rejects_a_mismatched_fp8_input():
    x, w, _, _ = _inputs(4, 64, 128, False)
    with pytest.raises(ValueError, match="xq must be the FP8 quantization of x"):
        OPS.linear_delayed_q(x, torch.zeros(4, 127, dtype=torch.float8_e4m3fn),
                             torch.ones(()), w, None, torch.zeros(2, 4), torch.zeros(1, 4),
                             "e4m3", "e4m3", "e4m3", False, "precise")


def test_push_amax_checks_shapes():
    with pytest.raises(ValueError, match="must be"):
        OPS.push_amax(torch.zeros(2, 4), torch.zeros(3))


@pytest.mark.parametrize("args, match", [
    ({"producer": "gelu"}, "producer 'gelu'"),
    ({"producer": "silu_mul"}, "silu_mul needs x2"),
    ({"producer": "add_rmsnorm", "x2": torch.randn(4, 32)}, "add_rmsnorm needs x2"),
    ({"producer": "rmsnorm", "norm_weight": torch.ones(5)}, "norm_weight"),
    ({"history": torch.zeros(2, 4)}, "1-D amax history"),
])
def test_quantize_history_rejects_bad_arguments(args, match):
    a = {"x": torch.randn(4, 64), "x2": None, "norm_weight": None, "eps": 1e-6,
         "producer": "none", "history": torch.zeros(4), "fmt": "e4m3", "power_of_2": False}
    a.update(args)
    with pytest.raises(ValueError, match=match):
        OPS.quantize_history(*a.values())


def test_quantize_history_t_is_quantize_history_and_its_transpose():
    x = torch.randn(33, 70) * 4
    for hist in (torch.zeros(4), torch.tensor([0.0, 3.0, 1.0, 0.0])):
        q, qt, s, a = OPS.quantize_history_t(x, hist, "e5m2", False)
        qr, sr, ar = OPS.quantize_history(x, None, None, 0.0, "none", hist, "e5m2", False)
        assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
        assert torch.equal(qt.view(torch.uint8), qr.view(torch.uint8).t().contiguous())
        assert torch.equal(s, sr) and torch.equal(a, ar)
    torch.library.opcheck(OPS.quantize_history_t.default, (x, torch.zeros(4), "e4m3", False))
    with pytest.raises(ValueError, match="must be 2-D"):
        OPS.quantize_history_t(torch.randn(2, 3, 4), torch.zeros(4), "e4m3", False)
    with pytest.raises(ValueError, match="1-D amax history"):
        OPS.quantize_history_t(x, torch.zeros(2, 4), "e4m3", False)


@pytest.mark.parametrize("shape", [(33, 70), (1, 128), (128, 1)])
def test_quantize_tensor_t_is_quantize_and_its_transpose(shape):
    x = torch.randn(shape) * 4
    q, qt, s = OPS.quantize_tensor_t(x, "e4m3", False)
    qr, sr = OPS.quantize(x, "tensor", "e4m3", False)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    assert torch.equal(qt.view(torch.uint8), qr.view(torch.uint8).t().contiguous())
    assert qt.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
    torch.library.opcheck(OPS.quantize_tensor_t.default, (x, "e4m3", False))
    with pytest.raises(ValueError, match="2-D"):
        OPS.quantize_tensor_t(torch.randn(2, 3, 4), "e4m3", False)
