"""GEMM backend selection: when cuBLAS may serve a GEMM, and the forced choices."""

import pytest
import torch

from fp8compile.kernels import select
from fp8compile.numerics import Granularity as G

E4 = torch.float8_e4m3fn


def _q(m, k, n, dtype=E4):
    return torch.zeros(m, k, dtype=dtype), torch.zeros(n, k, dtype=dtype)


@pytest.mark.parametrize(
    "m, k, n, xg, wg, out, act, why",
    [
        (64, 256, 256, G.TENSOR, G.TENSOR, torch.float32, "none", None),
        (64, 256, 256, G.ROW, G.ROW, torch.bfloat16, "none", None),
        (64, 256, 256, G.ROW, G.ROW, torch.float32, "none", "bf16 output"),
        (8, 256, 256, G.ROW, G.ROW, torch.bfloat16, "none", "M < 16"),
        (64, 208, 256, G.TENSOR, G.TENSOR, torch.bfloat16, "none", None),
        (64, 200, 256, G.TENSOR, G.TENSOR, torch.bfloat16, "none", "multiples of 16"),
        (64, 256, 256, G.ROW, G.ROW, torch.bfloat16, "silu", None),
        (64, 208, 256, G.GROUP, G.BLOCK, torch.bfloat16, "none", "K % 512"),
        (64, 1408, 512, G.GROUP, G.BLOCK, torch.bfloat16, "none", "K % 512"),
        (33, 4096, 512, G.GROUP, G.BLOCK, torch.bfloat16, "none", "M % 4"),
        (64, 256, 256, G.GROUP, G.ROW, torch.bfloat16, "none", "mixed"),
    ],
)
def test_cublas_only_where_it_computes_the_same_function(m, k, n, xg, wg, out, act, why):
    xq, wq = _q(m, k, n)
    got = select.cublas_unsupported(xq, xg, wq, wg, out, act, None)
    if why is None:
        assert got is None or "blockwise cuBLAS GEMM" in got
    else:
        assert why in got


def test_e5m2_stays_on_triton_and_an_epilogue_does_not():
    xq, wq = _q(64, 256, 256, torch.float8_e5m2)
    assert "e4m3" in select.cublas_unsupported(xq, G.ROW, wq, G.ROW, torch.bfloat16, "none",
                                               None)
    xq, wq = _q(64, 256, 256)
    assert select.cublas_unsupported(xq, G.ROW, wq, G.ROW, torch.bfloat16, "gelu",
                                     torch.zeros(64, 256)) is None


@pytest.mark.parametrize("gran", [G.TENSOR, G.ROW])
@pytest.mark.parametrize("activation", ["none", "gelu", "silu", "relu"])
@pytest.mark.parametrize("res_dtype", [None, torch.bfloat16, torch.float32])
def test_cublas_epilogue_matches_the_reference(gran, activation, res_dtype):
    """cuBLAS's product rounded to the output dtype, then act and residual: within one
    bf16 rounding of the reference (fp32 epilogue, one rounding). On a GPU through cuBLAS;
    elsewhere through torch._scaled_mm's CPU path, where the build has one for the recipe."""
    from fp8compile.numerics import Fp8Format, quantize
    from fp8compile.ops import scaled_mm_reference

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m, k, n = 33, 256, 144
    xq, xs = quantize(torch.randn(m, k, device=dev), gran, Fp8Format.E4M3, False)
    wq, ws = quantize(torch.randn(n, k, device=dev), gran, Fp8Format.E4M3, False)
    bias = torch.randn(n, device=dev)
    res = None if res_dtype is None else (torch.randn(m, n, device=dev) * 4).to(res_dtype)
    try:
        got = select.cublas_scaled_mm(xq, xs, gran, wq, ws, gran, bias, torch.bfloat16,
                                      "precise", activation, res)
    except RuntimeError as e:
        if dev == "cpu" and "only supports per-tensor" in str(e):
            pytest.skip("this torch build's CPU _scaled_mm takes per-tensor scales only")
        raise
    want = scaled_mm_reference(xq, xs, str(gran), wq, ws, str(gran), bias, torch.float32,
                               activation, res)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # Two bf16 roundings (product, then epilogue) against none: a few bf16 ulps of |want|.
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 2e-2, err
    unfused = select.cublas_scaled_mm(xq, xs, gran, wq, ws, gran, bias, torch.bfloat16,
                                      "precise")
    if activation != "none" or res is not None:
        assert not torch.equal(got, unfused), "the epilogue was dropped"


def test_forced_choices(monkeypatch):
    def boom():
        raise AssertionError("must not be timed")

    monkeypatch.setenv("FP8COMPILE_GEMM_BACKEND", "triton")
    assert select.choose(("k",), boom, boom) == "triton"
    monkeypatch.setenv("FP8COMPILE_GEMM_BACKEND", "cublas")
    assert select.choose(("k",), boom, boom) == "cublas"
    assert select.choose(("k",), boom, None) == "triton", "never cuBLAS where unsupported"
    monkeypatch.setenv("FP8COMPILE_GEMM_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FP8COMPILE_GEMM_BACKEND='fastest'"):
        select.choose(("k",), boom, boom)


def test_choice_key_tells_transposed_operands_apart():
    xq, wq = _q(64, 256, 256)
    row_major = select.gemm_key(xq, G.TENSOR, wq, "fast", torch.bfloat16)
    transposed = select.gemm_key(xq.t().contiguous().t(), G.TENSOR, wq, "fast", torch.bfloat16)
    assert row_major != transposed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS FP8 GEMMs need a CUDA GPU")
@pytest.mark.parametrize("gran", [G.TENSOR, G.ROW])
def test_cublas_takes_transposed_operands(gran):
    from fp8compile.kernels.quant import quantize
    from fp8compile.numerics import Fp8Format
    from fp8compile.ops import scaled_mm_reference

    a = torch.randn(256, 512, device="cuda")
    b = torch.randn(512, 384, device="cuda")  # w = b.t(): (N, K) with K strided
    xq, xs = quantize(a.t().contiguous().t(), gran, Fp8Format.E4M3, False)
    wq, ws = quantize(b.t(), gran, Fp8Format.E4M3, False)
    xq_t = xq.t().contiguous().t()  # same values, column-major
    wq_t = wq.t().contiguous().t()
    got = select.cublas_scaled_mm(xq_t, xs, gran, wq_t, ws, gran, None, torch.bfloat16, "precise")
    want = scaled_mm_reference(xq, xs, str(gran), wq, ws, str(gran), None, torch.float32, "none",
                               None)
    assert float((got.float() - want).norm() / want.norm()) < 5e-3


def test_choice_takes_medians_of_alternating_timings():
    calls = []

    def tri():
        calls.append("t")

    def cub():
        calls.append("c")

    # One slow outlier per candidate does not decide; the medians do.
    times = {"t": iter([1.0, 5.0, 1.0]), "c": iter([0.5, 2.0, 9.0])}

    def timer(fn):
        fn()
        return next(times[calls[-1]])

    assert select._faster(tri, cub, rounds=3, timer=timer) == "triton"  # 1.0 vs 2.0
    assert calls[:6] == ["t"] * 3 + ["c"] * 3  # warm-up of both first
    assert calls[6:] == ["t", "c"] * 3  # then alternating
    even = {"t": iter([1.0] * 3), "c": iter([1.0] * 3)}
    assert select._faster(tri, cub, timer=lambda fn: (fn(), next(even[calls[-1]]))[1]) == "cublas"


def test_choices_are_timed_on_the_gpu_by_default(monkeypatch):
    """Without a timer, _faster ranks by _gpu_ms (GPU time, host launch time left out)."""
    timed = []

    def gpu_ms(fn):
        timed.append(fn)
        return {tri: 1.0, cub: 2.0}[fn]

    def tri():
        pass

    def cub():
        pass

    monkeypatch.setattr(select, "_gpu_ms", gpu_ms)
    assert select._faster(tri, cub) == "triton"
    assert timed == [tri, cub] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times kernels on a CUDA GPU")
def test_gpu_time_leaves_the_host_launch_time_out():
    """A call with 1.5x a GEMM's GPU time of Python before a tiny kernel is host-bound back
    to back, yet ranks far below the GEMM by GPU time; its ten calls (at least 1.5 ms of
    Python) outlast the first ~1 ms hold, so the hold is lengthened."""
    import time

    small = torch.zeros(1024, device="cuda")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def gpu_bound():
        a @ a

    gpu_bound()
    gemm_ms = select._gpu_ms(gpu_bound)
    pause = max(1.5 * gemm_ms, 0.15) / 1e3

    def host_bound():
        time.sleep(pause)
        small.add_(1.0)

    host_bound()
    torch.cuda.synchronize()
    assert select._time_ms(host_bound) > select._time_ms(gpu_bound)
    assert select._gpu_ms(host_bound) < 0.2 * gemm_ms


@pytest.mark.parametrize("t_triton, want", [(0.98, "cublas"), (0.971, "cublas"),
                                            (0.969, "triton"), (0.5, "triton")])
def test_triton_must_beat_cublas_by_the_margin(t_triton, want):
    # Against cuBLAS at 1.0: within the margin (near-ties whose order is timing noise) cuBLAS
    # is kept, so the choice does not flip between compiles.
    times = {"t": t_triton, "c": 1.0}
    last = []
    assert select._TRITON_MARGIN == 0.03
    got = select._faster(lambda: last.append("t"), lambda: last.append("c"),
                         timer=lambda fn: (fn(), times[last[-1]])[1])
    assert got == want


def test_host_side_ceil_div_and_next_power_of_two_match_triton():
    import triton

    from fp8compile.kernels.tuning import cdiv, next_pow2

    assert [cdiv(a, b) for a in range(0, 260) for b in (1, 7, 128)] == [
        triton.cdiv(a, b) for a in range(0, 260) for b in (1, 7, 128)]
    assert [next_pow2(n) for n in range(1, 4100)] == [
        triton.next_power_of_2(n) for n in range(1, 4100)]


def test_traced_choices_are_logged_for_the_plan(monkeypatch):
    """Every GEMM traced into a graph leaves (key, backend) for the plan, forced or timed,
    and cuBLAS-unsupported ones say why; taking the log empties it."""
    select.take_traced_choices()
    monkeypatch.setenv("FP8COMPILE_GEMM_BACKEND", "cublas")
    xq, wq = _q(4096, 512, 1024)
    xs = torch.ones(())
    assert select.choose_traced(xq, xs, G.TENSOR, wq, xs, G.TENSOR, None, torch.bfloat16,
                                "fast") == "cublas"
    key = select.gemm_key(xq, G.TENSOR, wq, "fast", torch.bfloat16)
    select.note_traced(key, "triton (cuBLAS: not e4m3 x e4m3)")
    assert select.take_traced_choices() == [(key, "cublas"),
                                            (key, "triton (cuBLAS: not e4m3 x e4m3)")]
    assert select.take_traced_choices() == []
    assert select.describe_key(key) == "M~4096 N=1024 K=512 tensor fast bfloat16"
    res = torch.zeros(4096, 1024, dtype=torch.bfloat16)
    assert select.choose_traced(xq, xs, G.TENSOR, wq, xs, G.TENSOR, None, torch.bfloat16,
                                "fast", "gelu", res) == "cublas"
    ((e_key, _),) = select.take_traced_choices()
    assert e_key != key, "an epilogue is timed apart"
    assert select.describe_key(e_key) == "M~4096 N=1024 K=512 tensor fast bfloat16 + gelu" \
        " + residual"
    t_key = select.gemm_key(xq.t().contiguous().t(), G.TENSOR, wq, "fast", torch.bfloat16)
    assert select.describe_key(t_key).endswith("(transposed operand)")


def test_decode_sizes_are_a_bucket_of_their_own(monkeypatch):
    """1 to decode_ws.MAX_M rows share a key, which 9-16 rows do not: a compile-time
    "gluon" choice at one token (the decode kernel serves at most MAX_M rows) must not
    stand for a 16-row graph of the same weight."""
    from fp8compile.kernels import decode_ws

    def key(m):
        xq, wq = _q(m, 512, 1024)
        return select.gemm_key(xq, G.GROUP, wq, "precise", torch.bfloat16)

    top = decode_ws.MAX_M
    assert key(1) == key(top) != key(top + 1) == key(16)
    assert select.describe_key(key(1)).startswith(f"M<={top} N=1024 K=512")
    assert select.describe_key(key(16)).startswith("M~16 N=1024")
    monkeypatch.setattr(decode_ws, "MAX_M", 4)  # the bucket follows the kernel's limit
    assert key(4) != key(5) == key(16)


def test_swiglu_step_timing_runs_both_graphs_once_per_key(monkeypatch, device):
    """``swiglu_epilogue_ms`` times the GEMM with the SwiGLU epilogue + a plain quantization
    against the plain GEMM + the SiLU·mul quantization (both quantizing (M, N/2) for the down
    projection), once per key."""
    monkeypatch.setenv("FP8COMPILE_GEMM_BACKEND", "triton")  # no cuBLAS timing on a CPU
    monkeypatch.setattr(select, "_SWIGLU_TIMES", {})
    ran = []

    def medians(first, second, rounds=3, timer=None):
        ran.append((first(), second()))
        return 0.5, 0.75
    monkeypatch.setattr(select, "_medians", medians)
    args = (48, 512, 256, G.ROW, G.ROW, torch.float8_e4m3fn, torch.bfloat16,
            ("row", "e4m3", False), torch.device(device))
    assert select.swiglu_epilogue_ms(*args) == (0.5, 0.75)
    ((q1, s1), (q0, s0)), = ran
    for q, s in ((q1, s1), (q0, s0)):
        assert q.shape == (48, 256) and q.dtype == torch.float8_e4m3fn and s.shape == (48, 1)
    assert select.swiglu_epilogue_ms(*args) == (0.5, 0.75) and len(ran) == 1  # cached
    assert select.swiglu_epilogue_ms(*args[:6], torch.float16, *args[7:]) == (0.5, 0.75)
    assert len(ran) == 2  # another output dtype, another timing


def test_swiglu_step_timing_with_blockwise_groups(monkeypatch, device):
    """Blockwise operands quantized again in 1x128 groups: the fused step is the GEMM that
    quantizes h itself, against the plain GEMM + the SiLU·mul group quantization, both
    with the recipe's accumulation, timed apart from the fast-accumulation key."""
    from fp8compile.kernels import gemm

    monkeypatch.setenv("FP8COMPILE_GEMM_BACKEND", "triton")
    monkeypatch.setattr(select, "_SWIGLU_TIMES", {})
    calls, ran = [], []
    real = gemm.swiglu_group_quantize
    monkeypatch.setattr(gemm, "swiglu_group_quantize",
                        lambda *a: calls.append(a[5:]) or real(*a))
    monkeypatch.setattr(select, "_medians",
                        lambda first, second: ran.append((first(), second())) or (0.5, 0.75))
    args = (300, 512, 256, G.GROUP, G.BLOCK, torch.float8_e4m3fn, torch.bfloat16,
            ("group", "e4m3", False), torch.device(device))
    assert select.swiglu_epilogue_ms(*args, "precise") == (0.5, 0.75)
    assert calls == [("precise", False)]
    ((q1, s1), (q0, s0)), = ran
    for q, s in ((q1, s1), (q0, s0)):
        assert q.shape == (300, 256) and q.dtype == torch.float8_e4m3fn
        assert s.shape == (300, 2) and s.stride() == (1, 300)
    assert select.swiglu_epilogue_ms(*args, "fast") == (0.5, 0.75) and len(ran) == 2


def test_swiglu_step_timing_times_the_unfused_gemm_on_cublas(monkeypatch, device):
    """The unfused step's GEMM is timed on cuBLAS where it computes it (what the compiled
    graph keeps at these sizes), not through the eager dispatch, which would also build and
    time the Gluon kernel's plain variant."""
    from fp8compile.kernels import gemm

    monkeypatch.delenv("FP8COMPILE_GEMM_BACKEND", raising=False)
    monkeypatch.setattr(select, "_SWIGLU_TIMES", {})
    used = []

    def cublas(xq, xs, xg, wq, ws, wg, bias, out_dtype, accumulation):
        used.append("cublas")
        return gemm.scaled_mm(xq, xs, xg, wq, ws, wg, bias, out_dtype, accumulation)
    monkeypatch.setattr(select, "cublas_scaled_mm", cublas)
    monkeypatch.setattr(select, "choose", lambda *a: pytest.fail("eager dispatch timed"))
    monkeypatch.setattr(select, "_medians", lambda first, second: (first(), second(), 1, 2)[2:])
    args = (48, 512, 256, G.ROW, G.ROW, torch.float8_e4m3fn, torch.bfloat16,
            ("row", "e4m3", False), torch.device(device))
    assert select.swiglu_epilogue_ms(*args) == (1, 2) and used == ["cublas"]
    # an output dtype rowwise cuBLAS does not take: the Triton kernel
    assert select.swiglu_epilogue_ms(*args[:6], torch.float16, *args[7:]) == (1, 2)
    assert used == ["cublas"]
