"""Inlining an op's Triton kernels into compiled graphs (``fp8compile.ops._inline``).

On the CPU the mechanism is checked with a test op whose body is plain torch code and with
the kernels' availability patched in; the real ops stay opaque there (their reference path
is not traced).  On a GPU the real ops are compiled and compared with eager mode.
"""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_module_simplified

import fp8compile  # noqa: F401
from fp8compile import numerics as nx
from fp8compile.ops import _common, _inline

OPS = torch.ops.fp8compile
CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_gpu = pytest.mark.skipif(not CUDA, reason="the Triton kernels need a CUDA GPU with FP8")


@torch.library.custom_op("fp8compile_test::triple", mutates_args=())
def triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@triple.register_fake
def _(x):
    return torch.empty_like(x)


triple.register_autograd(lambda ctx, g: torch.ops.fp8compile_test.triple(g),
                         setup_context=lambda ctx, inputs, output: None)
BODY_CALLS = []


def _body(x):
    BODY_CALLS.append(tuple(x.shape))
    return x + x + x


_inline.inline_on_gpu(triple, _body, when=lambda x: x.shape[-1] != 5)


def _graphs(fn, *args, **compile_kwargs):
    """Run ``fn`` compiled and return the forward and backward ATen graphs as code."""
    codes = []

    def backend(gm, example_inputs):
        def keep(g, _):
            codes.append(g.code)
            return make_boxed_func(g.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, **compile_kwargs)(*args)
    return out, codes


@torch.library.custom_op("fp8compile_test::scaled_add", mutates_args=())
def scaled_add(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return 2 * x + r


@scaled_add.register_fake
def _(x, r):
    return torch.empty_like(x)


_inline.inline_on_gpu(scaled_add, lambda x, r: 2 * x + r, unpinned=("r",))


def test_unpinned_argument_is_handed_over_as_it_is(gpu_everywhere):
    """Every argument but ``r`` is pinned to its strides (one force_stride_order each);
    ``r`` reaches the body's pointwise add as its producer's value. A name that is not an
    argument is refused when the op is registered."""
    x, r = torch.randn(4, 8), torch.randn(4, 8)
    out, codes = _graphs(lambda a, b: OPS_T.scaled_add(a.sin(), b.cos()), x, r)
    torch.testing.assert_close(out, 2 * x.sin() + r.cos())
    assert codes[0].count("prims.inductor_force_stride_order.default(") == 1, codes[0]
    with pytest.raises(ValueError, match=r"unpinned=\['res'\] are not arguments"):
        _inline.inline_on_gpu(scaled_add, lambda x, r: x, unpinned=("res",))


@pytest.fixture
def gpu_everywhere(monkeypatch):
    """Pretend the kernels serve CPU tensors (only the test op's body runs)."""
    monkeypatch.setattr(_common, "triton_available", lambda t: True)
    BODY_CALLS.clear()


def test_body_replaces_op_in_forward_and_backward(gpu_everywhere):
    x = torch.randn(4, 8, requires_grad=True)
    out, codes = _graphs(lambda t: OPS_T.triple(t).sin(), x)
    out.sum().backward()
    assert len(codes) == 2 and all("triple" not in c for c in codes), codes
    # The forward (traced more than once by AOTAutograd) and the backward formula's call.
    assert len(BODY_CALLS) >= 2 and set(BODY_CALLS) == {(4, 8)}
    torch.testing.assert_close(x.grad, 3 * torch.cos(3 * x.detach()))


@pytest.mark.parametrize("why", ["when", "cpu", "env", "dynamic"])
def test_op_stays_opaque(gpu_everywhere, monkeypatch, why):
    x = torch.randn(4, 5 if why == "when" else 8)
    kwargs = {}
    if why == "cpu":
        monkeypatch.setattr(_common, "triton_available", lambda t: False)
    elif why == "env":
        monkeypatch.setenv("FP8COMPILE_INLINE_KERNELS", "0")
    elif why == "dynamic":
        kwargs["dynamic"] = True
    out, codes = _graphs(lambda t: OPS_T.triple(t), x, **kwargs)
    assert BODY_CALLS == []
    assert "fp8compile_test.triple" in codes[0]
    torch.testing.assert_close(out, 3 * x)


def test_launch_is_the_kernel_outside_tracing():
    kernel = object()
    assert _inline.launch(kernel) is kernel and not _inline.tracing()


def test_real_ops_stay_opaque_on_cpu():
    x = torch.randn(16, 256)
    w = torch.randn(128, 256, requires_grad=True)
    out, codes = _graphs(
        lambda a, b: OPS.linear(a, b, None, "blockwise", "e4m3", "e4m3", "e5m2", False,
                                "precise")[0], x, w)
    out.sum().backward()
    assert "fp8compile.linear" in codes[0]


def test_push_amax_inlined_keeps_its_mutation(gpu_everywhere):
    """push_amax traced as tensor code (no opaque call): the history is still updated in
    place, call after call, as the op does in eager mode."""
    hist, want = torch.zeros(2, 3), torch.zeros(2, 3)

    def f(h, a):
        OPS.push_amax(h, a * 2)
        return h.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager")
    for step in range(4):
        a = torch.tensor([1.0 + step, -3.0 * step])
        torch.testing.assert_close(compiled(hist, a), f(want, a))
        assert torch.equal(hist, want), (step, hist, want)
    assert torch.equal(want[:, 0], torch.tensor([8.0, -18.0]))
    _, codes = _graphs(f, torch.zeros(2, 3), torch.ones(2))
    assert "push_amax" not in codes[0] and "aten.copy" in codes[0], codes[0]


def test_quantize_delayed_inlined_matches_eager(gpu_everywhere):
    """Inference's delayed cast traced as graph code (the shared cast op and the history
    update): the payload, scale and history equal eager mode's over calls."""
    hist, want = torch.zeros(4), torch.zeros(4)

    def f(h, x):
        return OPS.quantize_delayed(x * 1, h, "e4m3", False)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager")
    for scale in (1.0, 3.0, 0.5):
        x = torch.randn(6, 40) * scale
        (q, s), (qw, sw) = compiled(hist, x), f(want, x)
        assert torch.equal(q.view(torch.uint8), qw.view(torch.uint8)) and torch.equal(s, sw)
        assert torch.equal(hist, want), (hist, want)
    _, codes = _graphs(f, torch.zeros(4), torch.randn(6, 40))
    assert "quantize_delayed" not in codes[0] and "aten.copy" in codes[0], codes[0]


OPS_T = torch.ops.fp8compile_test


# ----------------------------------------------------------------------------------------
# GPU: the real ops, compiled with Inductor, against eager mode


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="inductor")


@needs_gpu
@pytest.mark.parametrize("gran", ["tensor", "row", "group", "block"])
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_quantize_inlined_equals_eager(gran, transposed):
    x = torch.randn(384, 4096, device="cuda", dtype=torch.bfloat16) * 3
    x[5, 7] = float("nan")
    if transposed:
        x = x.t()

    def f(t):
        return OPS.quantize(t * 1, gran, "e4m3", False)

    q, s = _compiled(f)(x)
    q0, s0 = f(x)
    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8))
    assert torch.equal(s, s0) and s.stride() == s0.stride()


@needs_gpu
def test_gpu_dual_and_requantize_inlined_equal_eager():
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)

    def f(t):
        q, s, qt, st = OPS.quantize_dual(t * 2, "e4m3", False)
        return (q, s, qt, st, *OPS.requantize_t(q, s, "group", "block", "e4m3", False))

    for a, b in zip(_compiled(f)(x), f(x)):
        a, b = (t.view(torch.uint8) if t.element_size() == 1 else t for t in (a, b))
        assert torch.equal(a, b)


@needs_gpu
def test_gpu_linear_delayed_inlined_matches_eager_over_steps():
    """linear_delayed compiles to kernels (forward and backward), and over three steps its
    outputs, gradients and both amax histories equal eager mode's: the first step takes the
    amaxes ahead of the casts, the later ones from them."""
    def run(fn):
        torch.manual_seed(0)
        x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(768, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        h, gh = torch.zeros(2, 4, device="cuda"), torch.zeros(1, 4, device="cuda")
        out = []
        for step in range(3):
            y = fn(x * (1 + step), w, h, gh)
            y.float().pow(2).sum().backward()
            out += [y.detach(), x.grad.clone(), w.grad.clone(), h.clone(), gh.clone()]
            x.grad = w.grad = None
        return out

    def f(a, b, h, gh):
        y, _, _, _, amax = OPS.linear_delayed(a, b, None, h, gh, "e4m3", "e4m3", "e5m2", False,
                                              "precise")
        OPS.push_amax(h, amax)
        return y

    for got, want in zip(run(_compiled(f)), run(f)):
        assert torch.equal(got, want)
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(768, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, codes = _graphs(f, x, w, torch.zeros(2, 4, device="cuda"),
                         torch.zeros(1, 4, device="cuda"))
    out.float().sum().backward()
    for code in codes:
        for op in ("linear_delayed", "quantize_from_amax", "amax_unless", "quantize_scaled",
                   "push_amax"):
            assert f"fp8compile.{op}." not in code, code


@needs_gpu
def test_gpu_linear_delayed_q_inlined_matches_eager_over_steps():
    """The shared-input form (q/k/v): x quantized once with its delayed scale, two
    linear_delayed_q, compiled to kernels and equal to eager mode over three steps."""
    def run(fn):
        torch.manual_seed(0)
        x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ws = [torch.randn(n, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for n in (768, 512)]
        hs = [torch.zeros(2, 4, device="cuda") for _ in ws]
        ghs = [torch.zeros(1, 4, device="cuda") for _ in ws]
        out = []
        for step in range(3):
            ys = fn(x * (1 + step), *ws, *hs, *ghs)
            sum(y.float().pow(2).sum() for y in ys).backward()
            out += [*(y.detach() for y in ys), x.grad.clone(), *(w.grad.clone() for w in ws),
                    *(h.clone() for h in (*hs, *ghs))]
            x.grad = None
            for w in ws:
                w.grad = None
        return out

    def f(a, w1, w2, h1, h2, g1, g2):
        ad = a.detach()
        row = h1[0]
        use = torch.where(row.amax(-1) > 0, row.amax(-1), OPS.amax_unless(ad, row))
        xq, xs, xa = OPS.quantize_from_amax(ad, use, "e4m3", False)
        ys = []
        for w, h, g in ((w1, h1, g1), (w2, h2, g2)):
            y, _, wa = OPS.linear_delayed_q(a, xq, xs, w, None, h, g, "e4m3", "e4m3", "e5m2",
                                            False, "precise")
            OPS.push_amax(h, torch.stack([xa, wa]))
            ys.append(y)
        return tuple(ys)

    # x's gradient sums the two linears' bf16 dX: eager mode rounds each, Inductor fuses the
    # sum and rounds once unless told to emulate eager's casts (a third of dX's elements
    # differ by one bf16 ulp otherwise; the kernels themselves agree bit for bit).
    with torch._inductor.config.patch(emulate_precision_casts=True):
        got = run(_compiled(f))
    for got, want in zip(got, run(f)):
        assert torch.equal(got, want)
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ws = [torch.randn(n, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
          for n in (768, 512)]
    out, codes = _graphs(f, x, *ws, *(torch.zeros(2, 4, device="cuda") for _ in ws),
                         *(torch.zeros(1, 4, device="cuda") for _ in ws))
    sum(y.float().sum() for y in out).backward()
    for code in codes:
        for op in ("linear_delayed_q", "quantize_from_amax", "amax_unless", "push_amax"):
            assert f"fp8compile.{op}." not in code, code


@needs_gpu
@pytest.mark.parametrize("producer", ["none", "rmsnorm", "silu_mul"])
@pytest.mark.parametrize("seen", [False, True])
def test_gpu_quantize_history_inlined_equals_eager(producer, seen):
    """Delayed scaling's shared cast, plain or fused into its producer, compiled to its
    kernels (no opaque op left) and equal to eager mode, scale and amax included."""
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16) * 3
    up = torch.randn_like(x)
    w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    hist = torch.tensor([0.0, 7.5, 1.0], device="cuda") if seen else torch.zeros(3,
                                                                                 device="cuda")

    def f(t):
        args = {"none": (t * 2, None, None), "rmsnorm": (t * 2, None, w),
                "silu_mul": (t * 2, up, None)}[producer]
        return OPS.quantize_history(*args, 1e-6, producer, hist, "e4m3", False)

    got, want = _compiled(f)(x), f(x)
    for a, b in zip(got, want):
        a, b = (t.view(torch.uint8) if t.element_size() == 1 else t for t in (a, b))
        assert torch.equal(a, b)
    _, codes = _graphs(f, x)
    assert "fp8compile.quantize_history." not in codes[0], codes[0]


@needs_gpu
def test_gpu_quantize_delayed_inlined_matches_eager_over_calls():
    """Inference's delayed cast compiled to its two launches and a fused history update:
    payload, scale and history equal eager mode's over calls; no opaque op left."""
    hist, want = torch.zeros(8, device="cuda"), torch.zeros(8, device="cuda")

    def f(h, x):
        return OPS.quantize_delayed(x * 2, h, "e4m3", False)

    compiled = _compiled(f)
    for scale in (1.0, 3.0, 0.5):
        x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16) * scale
        (q, s), (qw, sw) = compiled(hist, x), f(want, x)
        assert torch.equal(q.view(torch.uint8), qw.view(torch.uint8)) and torch.equal(s, sw)
        assert torch.equal(hist, want)
    _, codes = _graphs(f, torch.zeros(8, device="cuda"),
                       torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16))
    for op in ("quantize_delayed", "quantize_history"):
        assert f"fp8compile.{op}." not in codes[0], codes[0]


@needs_gpu
@pytest.mark.parametrize("seen", [False, True])
def test_gpu_quantize_history_t_inlined_equals_eager(seen):
    """dY's delayed cast with its transpose, compiled to its two launches and equal to eager
    mode (both payloads, scale, amax), and to the reference."""
    x = torch.randn(4096, 1000, device="cuda", dtype=torch.bfloat16) * 3
    hist = torch.tensor([0.0, 7.5, 1.0], device="cuda") if seen else torch.zeros(3,
                                                                                 device="cuda")

    def f(t):
        return OPS.quantize_history_t(t * 2, hist, "e5m2", False)

    got, want = _compiled(f)(x), f(x)
    for a, b in zip(got, want):
        a, b = (t.view(torch.uint8) if t.element_size() == 1 else t for t in (a, b))
        assert torch.equal(a, b)
    assert torch.equal(want[1], want[0].t().contiguous())
    ref = nx.quantize_with_scale((x * 2).cpu(), want[2].cpu(), nx.Granularity.TENSOR,
                                 nx.Fp8Format.E5M2)
    assert torch.equal(want[0].view(torch.uint8).cpu(), ref.view(torch.uint8))
    _, codes = _graphs(f, x)
    assert "fp8compile.quantize_history_t." not in codes[0], codes[0]


@needs_gpu
def test_gpu_quantize_tensor_t_inlined_equals_eager():
    """Dynamic tensorwise dY and its transpose, compiled to its launches, equal to eager
    mode and to quantize(x, "tensor")."""
    x = torch.randn(4096, 1000, device="cuda", dtype=torch.bfloat16) * 3

    def f(t):
        return OPS.quantize_tensor_t(t * 2, "e5m2", False)

    got, want = _compiled(f)(x), f(x)
    for a, b in zip(got, want):
        a, b = (t.view(torch.uint8) if t.element_size() == 1 else t for t in (a, b))
        assert torch.equal(a, b)
    q, s = OPS.quantize(x * 2, "tensor", "e5m2", False)
    assert torch.equal(want[2], s) and torch.equal(want[0].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(want[1], want[0].t().contiguous())
    _, codes = _graphs(f, x)
    assert "fp8compile.quantize_tensor_t." not in codes[0], codes[0]


@needs_gpu
def test_gpu_delayed_scaling_ops_inlined_equal_eager():
    """Delayed scaling's one-pass cast (payload and amax) and its first-step amax, which
    returns 0 on the device once the history holds a value, compiled as in eager mode."""
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16) * 3
    # An amax whose scale amax / 448 is not exact in fp32: compiled code must still give
    # the IEEE quotient (Inductor's own division is approximate).
    amax = torch.tensor(3.3, device="cuda")
    empty, seen = torch.zeros(8, device="cuda"), torch.full((8,), 2.0, device="cuda")

    def f(t):
        return (*OPS.quantize_from_amax(t * 2, amax, "e5m2", False),
                OPS.amax_unless(t * 2, empty), OPS.amax_unless(t * 2, seen))

    got, want = _compiled(f)(x), f(x)
    assert float(want[3]) > 0 and float(want[4]) == 0.0
    assert torch.equal(want[2], want[3])
    assert torch.equal(want[1].cpu(), nx.compute_scale(amax.cpu(), nx.Fp8Format.E5M2))
    for a, b in zip(got, want):
        a, b = (t.view(torch.uint8) if t.element_size() == 1 else t for t in (a, b))
        assert torch.equal(a, b)
    _, codes = _graphs(f, x)
    assert "fp8compile.quantize_from_amax." not in codes[0], codes[0]
    assert "fp8compile.amax_unless." not in codes[0], codes[0]


@needs_gpu
@pytest.mark.parametrize("recipe", ["blockwise", "rowwise", "tensorwise"])
def test_gpu_linear_inlined_matches_eager_with_grads(recipe, monkeypatch):
    monkeypatch.setenv("FP8COMPILE_GEMM_BACKEND", "cublas")
    x = torch.randn(2, 256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(a, b):
        return OPS.linear(a, b, None, recipe, "e4m3", "e4m3", "e4m3", False, "precise")[0]

    grads = []
    for fn in (f, _compiled(f)):
        y = fn(x, w)
        y.float().square().sum().backward()
        grads.append((y.detach(), x.grad, w.grad))
        x.grad = w.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("recipe", ["blockwise", "tensorwise"])
def test_gpu_training_graph_has_no_opaque_fp8_ops(recipe):
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, codes = _graphs(
        lambda a, b: OPS.linear(a, b, None, recipe, "e4m3", "e4m3", "e4m3", False,
                                "precise")[0], x, w)
    out.float().sum().backward()
    assert len(codes) == 2
    for code in codes:
        assert "triton_kernel_wrapper_functional" in code
        for op in ("linear", "quantize", "quantize_dual", "requantize_t", "scaled_mm",
                   "quantize_scaled"):
            assert f"fp8compile.{op}." not in code, code


@needs_gpu
@pytest.mark.parametrize("recipe", ["blockwise", "tensorwise"])
def test_gpu_linear_w_inlined_with_grads(recipe):
    """linear_w (cached FP8 weights) compiles to kernels only, forward and backward, and
    gives eager mode's output and gradients."""
    from fp8compile.ops.linear import weight_quants

    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(768, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gran = "group" if recipe == "blockwise" else "tensor"
    wqs = weight_quants(w.detach(), recipe, "e4m3", False)

    def f(a, b):
        aq, as_ = OPS.quantize(a.detach(), gran, "e4m3", False)
        return OPS.linear_w(a, aq, as_, b, *wqs, None, recipe, "e4m3", "e4m3", "e4m3", False,
                            "precise")

    out, codes = _graphs(f, x, w)
    out.float().sum().backward()
    assert len(codes) == 2
    for code in codes:
        assert "fp8compile.linear_w." not in code and "fp8compile.quantize." not in code, code
    got = (out.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    y = f(x, w)
    y.float().sum().backward()
    for a, b in zip(got, (y.detach(), x.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("recipe", [("group", "block"), ("row", "row"), ("tensor", "tensor")])
def test_gpu_triton_gemm_inlined_equals_eager(m, recipe, monkeypatch):
    """The Triton GEMM (split-K at small M) with the autotuner's config fixed at compile time,
    bias and fused SiLU included, gives eager mode's bits; no opaque GEMM call is left."""
    monkeypatch.setenv("FP8COMPILE_GEMM_BACKEND", "triton")
    xg, wg = recipe
    xq, xs = OPS.quantize(torch.randn(m, 1024, device="cuda"), xg, "e4m3", False)
    wq, ws = OPS.quantize(torch.randn(768, 1024, device="cuda"), wg, "e4m3", False)
    bias = torch.randn(768, device="cuda", dtype=torch.bfloat16)

    def f(a, sa):
        return OPS.scaled_mm(a, sa, xg, wq, ws, wg, bias, torch.bfloat16, "precise", "silu",
                             None)

    out, codes = _graphs(f, xq, xs)
    assert "fp8compile.scaled_mm" not in codes[0]
    assert "triton_kernel_wrapper_functional" in codes[0]
    assert torch.equal(_compiled(f)(xq, xs), f(xq, xs))


@needs_gpu
@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("recipe", [("row", "row"), ("tensor", "tensor")])
def test_gpu_gemm_epilogue_inlined_matches_eager(backend, recipe, monkeypatch):
    """An activation and residual add (EpiloguePass) inlined: in the Triton GEMM's epilogue
    (eager's bits), or after cuBLAS's GEMM as pointwise ops Inductor fuses (one rounding
    fewer than eager's ops: within bf16 rounding of the fp32 reference, as eager)."""
    from fp8compile.ops import scaled_mm_reference
    from tests.models import rel_err

    monkeypatch.setenv("FP8COMPILE_GEMM_BACKEND", backend)
    xg, wg = recipe
    xq, xs = OPS.quantize(torch.randn(300, 1024, device="cuda"), xg, "e4m3", False)
    wq, ws = OPS.quantize(torch.randn(768, 1024, device="cuda"), wg, "e4m3", False)
    res = torch.randn(300, 768, device="cuda", dtype=torch.bfloat16) * 8

    def f(a, sa, r):
        return OPS.scaled_mm(a, sa, xg, wq, ws, wg, None, torch.bfloat16, "fast", "gelu", r)

    _, codes = _graphs(f, xq, xs, res)
    assert "fp8compile.scaled_mm" not in codes[0]
    assert ("_scaled_mm" in codes[0]) == (backend == "cublas")
    got, eager = _compiled(f)(xq, xs, res), f(xq, xs, res)
    ref = scaled_mm_reference(xq, xs, xg, wq, ws, wg, None, torch.float32, "gelu", res)
    if backend == "triton":
        assert torch.equal(got, eager)
    assert rel_err(got, ref) < 4e-3 and rel_err(eager, ref) < 4e-3
    assert rel_err(got, res) > 0.05, "the GEMM's share is in the result"


@needs_gpu
@pytest.mark.parametrize("gran", ["tensor", "row", "group"])
def test_gpu_fused_producers_inlined_equal_eager(gran):
    """RMSNorm→FP8 (alone and of a residual add) and SiLU·mul→FP8 inlined (RMSNorm's eps
    reaches an inlined kernel as fp64; the kernel rounds it to fp32 as the eager launch
    does)."""
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)

    def f(t):
        return (*OPS.rmsnorm_quantize(t * 1, w, 1e-5, gran, "e4m3", False),
                *OPS.rmsnorm_quantize(t * 1, w, 1e-5, gran, "e4m3", False, residual=t * 3),
                *OPS.silu_mul_quantize(t * 1, t * 2, gran, "e4m3", False))

    for a, b in zip(_compiled(f)(x), f(x)):
        a, b = (t.view(torch.uint8) if t.element_size() == 1 else t for t in (a, b))
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_gpu_gemm_left_opaque_where_the_gluon_kernel_wins(mode, monkeypatch):
    """A blockwise GEMM that cuBLAS cannot compute (K=640, not a multiple of 512), where
    the Gluon kernel wins the compile-time timing against the Triton kernel (made to win
    here): not inlined (Gluon kernels cannot be traced) but left an opaque call of the op,
    whose body runs it, in default mode and under CUDA graphs, where its warm-up call must
    allocate nothing that outlives the graph's memory pool."""
    from fp8compile.kernels import blockwise_ws as bw
    from fp8compile.kernels import select

    if not (bw.HAVE_GLUON and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("the Gluon kernel runs on a Hopper GPU (sm_90) only")
    monkeypatch.setattr(select, "_gluon_faster", lambda gluon_fn, best_fn: True)
    monkeypatch.setattr(select, "_CHOICES", {})
    calls = []
    real = bw.blockwise_mm
    monkeypatch.setattr(bw, "blockwise_mm", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    xq, xs = OPS.quantize(torch.randn(512, 640, device="cuda"), "group", "e4m3", False)
    wq, ws = OPS.quantize(torch.randn(768, 640, device="cuda"), "block", "e4m3", False)

    def f(a, sa):
        return OPS.scaled_mm(a, sa, "group", wq, ws, "block", None, torch.bfloat16, "precise",
                             "none", None) * 2

    _, codes = _graphs(f, xq, xs)
    assert "fp8compile.scaled_mm" in codes[0]
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", mode=mode)
    calls.clear()
    got = [compiled(xq, xs).clone() for _ in range(3)]  # warm-up, record, replay
    assert calls and set(calls) == {"precise"}
    eager = f(xq, xs)
    for y in got:
        assert torch.equal(y, eager)


def _fake_frontend(monkeypatch):
    """Torch's ``generate_ttir`` replaced by a recorder (the real one needs a GPU target),
    then the memo installed over it; returns the recorder's calls."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    calls = []

    def frontend(kernel, kwargs, tma_descriptor_metadata):
        calls.append(dict(kwargs))
        return f"module {len(calls)}", sorted(kwargs)

    monkeypatch.setattr(wrap, "generate_ttir", frontend)
    monkeypatch.delenv("FP8COMPILE_TTIR_MEMO", raising=False)
    assert _inline.memoize_mutation_analysis()
    assert _inline.memoize_mutation_analysis()  # a second install keeps the first
    assert wrap.generate_ttir.__wrapped__ is frontend
    return wrap, calls


def test_mutation_analysis_runs_the_frontend_once_per_signature(monkeypatch):
    from fp8compile.kernels import quant

    wrap, calls = _fake_frontend(monkeypatch)
    kernel = quant._quantize_kernel
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    args = dict(x_ptr=x, q_ptr=torch.zeros(4, 8, dtype=torch.uint8), M=4, K=8, eps=1e-5,
                GRAN=0, POW2=False)
    first = wrap.generate_ttir(kernel, args, {})
    names = first[1]
    names.append("edited by the caller")
    # Another launch with other tensors of the same dtypes: the same module.
    again = wrap.generate_ttir(kernel, {**args, "x_ptr": torch.ones(9, 3, dtype=torch.bfloat16)},
                               {})
    assert len(calls) == 1 and again[0] == first[0] and "edited by the caller" not in again[1]
    # A dtype, a constant, an integer's value, bool against int: each its own module.
    for change in (dict(x_ptr=x.float()), dict(GRAN=1), dict(M=16), dict(POW2=0),
                   dict(num_warps=8)):
        wrap.generate_ttir(kernel, {**args, **change}, {})
    assert len(calls) == 6
    assert [c["GRAN"] for c in calls] == [0, 0, 1, 0, 0, 0]


def test_mutation_analysis_memo_sees_through_the_launch_autotuner(monkeypatch):
    """torch wraps a launch's ``num_warps`` into a new one-config autotuner per launch.  The
    analysis compiles with default options and the first config's constants added to the
    arguments: the constants make another module, the launch options do not."""
    import triton

    from fp8compile.kernels import quant

    wrap, calls = _fake_frontend(monkeypatch)
    args = dict(x_ptr=torch.zeros(4, dtype=torch.bfloat16), M=4)
    for warps in (8, 8, 4):
        tuner = triton.autotune(configs=[triton.Config({}, num_warps=warps)], key=[])
        wrap.generate_ttir(tuner(quant._quantize_kernel), args, {})
    wrap.generate_ttir(quant._quantize_kernel, args, {})  # launched without an autotuner
    assert len(calls) == 1
    tuner = triton.autotune(configs=[triton.Config({"GRAN": 1}, num_warps=8)], key=[])
    wrap.generate_ttir(tuner(quant._quantize_kernel), args, {})
    wrap.generate_ttir(quant._quantize_kernel, {**args, "GRAN": 1}, {})  # the same constants
    assert len(calls) == 2
    tuner = triton.autotune(configs=[triton.Config({"GRAN": 2}), triton.Config({"GRAN": 1})],
                            key=[])
    wrap.generate_ttir(tuner(quant._quantize_kernel), args, {})  # the first config counts
    assert len(calls) == 3


def test_mutation_analysis_memo_leaves_other_launches_alone(monkeypatch):
    import triton
    import triton.language as tl

    @triton.jit
    def foreign(x_ptr, N: tl.constexpr):
        tl.store(x_ptr, N)

    from fp8compile.kernels import quant

    wrap, calls = _fake_frontend(monkeypatch)
    x = torch.zeros(4)
    for _ in range(2):
        wrap.generate_ttir(foreign, dict(x_ptr=x, N=1), {})  # not this package's kernel
        wrap.generate_ttir(quant._quantize_kernel, dict(x_ptr=x), {"x_ptr": ("stable", [4])})
        wrap.generate_ttir(quant._quantize_kernel, dict(x_ptr=x, K=[1, 2]), {})  # unhashable
    assert len(calls) == 6


def test_mutation_analysis_memo_can_be_turned_off(monkeypatch):
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    def frontend(kernel, kwargs, tma_descriptor_metadata):
        return None

    monkeypatch.setattr(wrap, "generate_ttir", frontend)
    monkeypatch.setenv("FP8COMPILE_TTIR_MEMO", "0")
    assert not _inline.memoize_mutation_analysis()
    assert wrap.generate_ttir is frontend


@needs_gpu
def test_gpu_mutation_analysis_memo_keeps_what_is_written(monkeypatch):
    """Launches analysed once and reused find the same written tensors: the compiled graph
    equals eager mode, and the frontend ran fewer times than the analysis asked for it."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    real = getattr(wrap.generate_ttir, "__wrapped__", wrap.generate_ttir)
    calls = []

    def counting(kernel, *args, **kwargs):
        calls.append(kernel)
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(wrap, "generate_ttir", counting)
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)

    def f(t):
        return (*OPS.rmsnorm_quantize(t * 1, w, 1e-5, "row", "e4m3", False),
                *OPS.rmsnorm_quantize(t * 2, w, 1e-5, "row", "e4m3", False))

    for a, b in zip(_compiled(f)(x), f(x)):
        a, b = (t.view(torch.uint8) if t.element_size() == 1 else t for t in (a, b))
        assert torch.equal(a, b)
    memo, counts = wrap.generate_ttir.memo, wrap.generate_ttir.counts
    assert wrap.generate_ttir.__wrapped__ is counting and memo
    # Two launches of one signature, each analysed at functionalization and at lowering
    # (inside the autotuner torch wraps around the launch's num_warps, or not): one frontend
    # run per signature, the other analyses served from the memo.
    assert len(calls) == len(memo) == counts["ran"]
    assert counts["asked"] > counts["ran"]
