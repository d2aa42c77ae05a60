"""torch.compile(model, backend="fp8hpf") end to end on CPU.

Error bound used below: E4M3 rounds with a relative error of at most 2^-4; with both GEMM
operands quantized a single FP8 GEMM on Gaussian data lands near 29 dB SQNR (≈3.5% relative
error).  A LLaMA-style block's output is dominated by its residual stream, so its error vs FP32
is a few times smaller (measured 1.1e-2; asserted ≤ 3e-2).  Tiny randomly initialised
transformers models have no dominant residual: their logits carry the error of several
stacked FP8 GEMMs (measured 6-7e-2; asserted ≤ 0.12) and must still rank like FP32's.
"""

import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch import nn

import fp8compile
from tests.models import (
    LlamaBlock,
    TinyLM,
    rel_err,
    tiny_hf_gpt2,
    tiny_hf_llama,
    tiny_hf_mixtral,
)

OPS = torch.ops.fp8compile


def _compile(model, config=None, **kw):
    be = fp8compile.backend(config, **kw)
    return torch.compile(model, backend=be), be


def test_entry_point_works_without_import():
    code = (
        "import torch, sys\n"
        "assert 'fp8hpf' in torch._dynamo.list_backends()\n"
        "m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),"
        " torch.nn.Linear(256, 256))\n"
        "x = torch.randn(4, 256)\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(m, backend='fp8hpf')(x)\n"
        "    ref = m(x)\n"
        "err = float((y - ref).norm() / ref.norm())\n"
        "assert 0 < err < 0.06, err\n"
        "print('ok', 'fp8compile' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok True"


def test_llama_block_fp32():
    model, x = LlamaBlock(), torch.randn(2, 16, 256)
    cm, be = _compile(model)
    with torch.no_grad():
        y, ref = cm(x), model(x)
    assert rel_err(y, ref) < 3e-2
    plan = be.plan
    assert len(plan.fp8) == 7 and plan.stats["inference"]
    assert plan.stats["quantized_weights"] == 7 and plan.stats["compile_s"] > 0
    assert {e.rule for e in plan if e.op == "add"} == {"rule:residual"}


def test_llama_block_bf16():
    model = LlamaBlock()
    x = torch.randn(2, 16, 256)
    with torch.no_grad():
        ref = model(x)
        model16 = model.to(torch.bfloat16)
        cm, be = _compile(model16)
        y = cm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref) < 3e-2
    assert all(e.precision == "bf16" for e in be.plan if e.rule == "rule:residual")


@pytest.mark.parametrize("factory", [tiny_hf_llama, tiny_hf_gpt2], ids=["llama", "gpt2"])
def test_transformers_models(factory):
    model = factory()
    ids = torch.randint(0, 512, (2, 24))
    cm, be = _compile(model)
    with torch.no_grad():
        y, ref = cm(ids).logits, model(ids).logits
    assert rel_err(y, ref) < 0.12
    agree = (y.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.8, f"top-1 agreement {agree:.2f}"
    # Some transformers versions trace the rotary embedding's K=1 matmul (inv_freq x
    # positions): the shape rule keeps it. Every other GEMM but the head runs in FP8.
    gemms = [e for e in be.plan.gemms if e.rule != "shape"]
    assert all(e.module.endswith("rotary_emb") for e in be.plan.gemms if e.rule == "shape")
    assert sum(e.is_fp8 for e in gemms) == len(gemms) - 1 > 4
    (head,) = [e for e in gemms if not e.is_fp8]
    assert head.module == "lm_head" and head.rule == "rule:output_head"


class Mixed(nn.Module):
    """Odd shapes in one model: K=208 (partial group), N=144, K=100 (kept), bias, bmm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(208, 144)
        self.b = nn.Linear(100, 256, bias=False)
        self.c = nn.Linear(144, 256)

    def forward(self, x, y, p, q):
        h = self.c(torch.relu(self.a(x))) + self.b(y)
        return h, torch.matmul(p, q)


@pytest.mark.parametrize("m", [1, 5])
def test_odd_shapes_non_contiguous_and_bmm(m):
    model = Mixed()
    cm, be = _compile(model, {"min_weight_numel": 0, "rules": ["norm", "softmax", "shape"]})
    x = torch.randn(208, 3, m).permute(2, 1, 0)  # non-contiguous (m, 3, 208)
    y = torch.randn(m, 3, 100)
    p, q = torch.randn(2, m, 64), torch.randn(2, 64, 32)
    with torch.no_grad():
        (h, r), (rh, rr) = cm(x, y, p, q), model(x, y, p, q)
    assert rel_err(h, rh) < 0.06 and rel_err(r, rr) < 0.06
    rules = {e.module or e.name: e.rule for e in be.plan.gemms}
    assert rules["b"] == "shape" and rules["a"] == rules["c"] == "fp8"
    assert sum(e.is_fp8 for e in be.plan.gemms) == 3  # a, c and the bmm
    # Without the shape rule, K=100 runs in FP8 too (partial, masked scale group).
    torch._dynamo.reset()
    cm, be = _compile(model, {"min_weight_numel": 0, "rules": ["norm"]})
    with torch.no_grad():
        h2, _ = cm(x, y, p, q)
    assert {e.module: e.rule for e in be.plan.gemms if e.module}["b"] == "fp8"
    assert rel_err(h2, rh) < 0.06


@pytest.mark.parametrize("recipe", ["blockwise", "rowwise", "tensorwise"])
def test_nan_row_does_not_leak_and_zeros_give_zeros(recipe):
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.ReLU(),
                          nn.Linear(512, 256, bias=False), nn.ReLU())
    cm, _ = _compile(model, {"recipe": recipe, "rules": ["norm"]})
    x = torch.randn(6, 256)
    x[1, 3] = float("nan")
    x[2, 9] = float("inf")
    x[4] = 0
    with torch.no_grad():
        y = cm(x)
    assert y[1].isnan().any() and y[2].isnan().any()
    assert torch.isfinite(y[[0, 3, 4, 5]]).all()
    assert (y[4] == 0).all()
    with torch.no_grad():
        assert (cm(torch.zeros(3, 256)) == 0).all()


def test_overrides_through_options_change_the_compiled_graph():
    model, ids = TinyLM(), torch.randint(0, 512, (2, 8))
    opts = {"overrides": {"lm_head": "fp8", "layers.0.*": "bf16"}}
    cm = torch.compile(model, backend="fp8hpf", options=opts)
    with torch.no_grad():
        y, ref = cm(ids), model(ids)
    plan = fp8compile.last_plan()
    g = {e.module: e for e in plan.gemms}
    assert g["lm_head"].is_fp8
    assert all(e.precision == "bf16" for m, e in g.items() if m.startswith("layers.0."))
    assert y.dtype == torch.float32 and rel_err(y, ref) < 0.1


def test_dynamic_batch_recompiles_once():
    model = LlamaBlock()
    cm, be = _compile(model)
    with torch.no_grad():
        # (Dynamo specializes size-1 dims, for any backend: a batch of 1 would add one.)
        for b in (2, 3, 5, 8):
            x = torch.randn(b, 8, 256)
            assert rel_err(cm(x), model(x)) < 3e-2
        assert len(be.plans) == 2, "one static compile, then one with a dynamic batch"
        # Dynamo makes a dim dynamic when it first changes: sequence length costs one more.
        for b, t in [(3, 12), (4, 20), (2, 33), (6, 7)]:
            x = torch.randn(b, t, 256)
            assert rel_err(cm(x), model(x)) < 3e-2
    assert len(be.plans) == 3


def test_dynamic_true_compiles_once():
    model = LlamaBlock()
    be = fp8compile.backend()
    cm = torch.compile(model, backend=be, dynamic=True)
    with torch.no_grad():
        for b, t in [(2, 8), (3, 16), (5, 5)]:
            x = torch.randn(b, t, 256)
            assert rel_err(cm(x), model(x)) < 3e-2
    assert len(be.plans) == 1


def test_weights_requantized_only_when_they_change():
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    cm, be = _compile(model, {"rules": ["norm"]})
    x = torch.randn(4, 256)
    with torch.no_grad():
        for _ in range(3):
            cm(x)
        caches = be.contexts[-1].weight_caches
        assert [c.quantizations for c in caches] == [1, 1]
        # An in-place update bumps the version counter; x3 changes the scale too, which a
        # stale scale input would show as a 3x error.
        model[2].weight.mul_(-3)
        y = cm(x)
        assert [c.quantizations for c in caches] == [1, 2]
        assert rel_err(y, model(x)) < 0.06


def test_weights_checked_in_one_pass_and_swapped_storage_requantized(monkeypatch):
    from fp8compile.passes.scales import WeightCache

    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    cm, be = _compile(model, {"rules": ["norm"]})
    x = torch.randn(4, 256)
    checks = []
    real_get = WeightCache.get
    with torch.no_grad():
        cm(x)
        caches = be.contexts[-1].weight_caches
        monkeypatch.setattr(WeightCache, "get",
                            lambda self, a: checks.append(self) or real_get(self, a))
        for _ in range(3):
            cm(x)
        assert checks == []  # no weight changed: no cache was asked
        # ``p.data = ...`` keeps the version counter (0) and swaps the storage: x3 and a sign
        # flip, which the old FP8 copy would show as a 4x error
        model[0].weight.data = model[0].weight.detach() * -3
        y = cm(x)
        assert len(checks) == 2  # a weight changed: every cache checks its own
        assert [c.quantizations for c in caches] == [2, 1]
        assert rel_err(y, model(x)) < 0.06


def test_extra_inputs_other_than_weights_run_every_call():
    from fp8compile.backend import _with_extra_inputs
    from fp8compile.passes.scales import CachedWeight, WeightCache

    w = nn.Parameter(torch.randn(256, 128))
    cache = WeightCache([1], [False], "row", "e4m3", False)
    calls = []
    live = lambda a: calls.append(a) or torch.full((1,), float(len(calls)))  # noqa: E731
    run = _with_extra_inputs(lambda *a: a, [CachedWeight(cache, 0), live, CachedWeight(cache, 1)])
    x = torch.randn(3)
    for i in range(1, 4):
        _, _, wq, s, ws = run(x, w)
        assert len(calls) == i and s.item() == i
        assert wq is cache.value[0] and ws is cache.value[1]
    assert cache.quantizations == 1
    with torch.no_grad():
        w.mul_(2)  # a new version: requantized
    _, _, wq, _, ws = run(x, w)
    assert cache.quantizations == 2 and len(calls) == 4
    torch.testing.assert_close(ws, cache._quantize(w.detach())[1], rtol=0, atol=0)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(256, 256), nn.Linear(256, 64)

    def forward(self, x, z):
        return self.head(self.proj(x) + self.proj(z))


@pytest.mark.parametrize("inference", [True, False])
def test_module_called_twice_quantizes_its_weight_once(inference):
    # Two calls of one linear used to hoist its weight twice under one input name, and the
    # compiled graph's forward failed to build (duplicate argument).  Now the weight is
    # quantized (and in inference cached) once, and both calls are FP8.
    model = CalledTwice()
    cm, be = _compile(model, {"rules": ["norm"]})
    x, z = torch.randn(4, 256), torch.randn(4, 256)
    with torch.set_grad_enabled(not inference):
        y = cm(x, z)
        assert rel_err(y, model(x, z)) < 0.06
    assert [e.module for e in be.plan.fp8].count("proj") == 2
    if inference:
        assert [c.quantizations for c in be.contexts[-1].weight_caches] == [1, 1]
    else:
        y.sum().backward()
        assert model.proj.weight.grad is not None


@pytest.mark.parametrize("inference", [True, False])
def test_linear_fed_by_a_linear_and_bmm_of_a_linear(inference):
    # A GEMM whose operand is another rewritten GEMM's output: the rewrite used to read the
    # erased node and Dynamo's compile failed ("used before it has been defined").
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256)
            self.head = nn.Linear(256, 64)

        def forward(self, x):
            h = self.b(self.a(x))
            s = torch.bmm(h, h.transpose(1, 2)) / 16.0
            return self.head(torch.relu(torch.bmm(s, h)))

    model = Chain()
    cm, be = _compile(model, {"rules": ["norm"], "min_weight_numel": 1024})
    x = torch.randn(2, 32, 256)
    with torch.set_grad_enabled(not inference):
        y = cm(x)
        assert rel_err(y, model(x)) < 0.15
    assert {e.module or e.op for e in be.plan.fp8} >= {"a", "b"}
    assert len([e for e in be.plan.fp8 if e.gemm != "linear"]) == 2  # both bmms
    if not inference:
        y.sum().backward()
        assert model.a.weight.grad is not None


def test_add_input_names_stay_unique():
    from fp8compile.passes import CompileContext

    g = torch.fx.Graph()
    g.placeholder("x")
    ctx = CompileContext(fp8compile.Fp8Config(), [torch.zeros(1)], True)
    a = ctx.add_input(g, "w_fp8", lambda args: torch.zeros(1))
    b = ctx.add_input(g, "w_fp8", lambda args: torch.zeros(1))
    assert (a.target, b.target) == ("w_fp8", "w_fp8_1")


def test_training_graph_backward():
    model = LlamaBlock()
    cm, be = _compile(model)
    x = torch.randn(2, 8, 256, requires_grad=True)
    cm(x).square().mean().backward()
    assert not be.plan.stats["inference"]
    g = model.q_proj.weight.grad
    model.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    model(x2).square().mean().backward()
    assert rel_err(g, model.q_proj.weight.grad) < 0.1
    assert rel_err(x.grad, x2.grad) < 0.1


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="recipe='blocky'"):
        fp8compile.backend({"recipe": "blocky"})
    with pytest.raises(ValueError, match="unknown fp8compile option"):
        fp8compile.backend({"recipie": "rowwise"})
    cm = torch.compile(nn.Linear(256, 256), backend="fp8hpf", options={"recipe": "blocky"})
    # Dynamo wraps a backend's exception; the ValueError is its inner exception.
    with pytest.raises(Exception, match="recipe='blocky'") as info:
        cm(torch.randn(2, 256))
    assert isinstance(info.value.inner_exception, ValueError)


def test_config_object_json_and_inductor_options(tmp_path):
    cfg = fp8compile.Fp8Config(recipe="rowwise")
    path = tmp_path / "p.json"
    cfg.to_json(path)
    model, x = LlamaBlock(), torch.randn(1, 4, 256)
    for options in (cfg, str(path), {"config": str(path), "accumulation": "fast"},
                    {"inductor": {"max_autotune": False}}):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend="fp8hpf", options=options)(x)
        want = "blockwise" if isinstance(options, dict) and "inductor" in options else "rowwise"
        assert fp8compile.last_plan().config.recipe == want


def test_inference_delayed_scaling_keeps_an_amax_history():
    from fp8compile.ops.training_state import AmaxHistory

    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    cm, be = _compile(model, {"recipe": "tensorwise", "scaling": "delayed",
                              "amax_history_len": 4, "rules": ["norm"]})
    errs = []
    with torch.no_grad():
        for scale in (1.0, 2.0, 1.0):
            x = torch.randn(8, 256) * scale
            errs.append(rel_err(cm(x), model(x)))
    # The 2x batch is quantized with the previous call's scale and saturates (that is what
    # delayed scaling does); the calls whose history covers their range are accurate.
    assert errs[0] < 0.06 and errs[2] < 0.06 and errs[1] > 2 * errs[0], errs
    hists = [p for p in be.contexts[-1].extra_inputs if isinstance(p, AmaxHistory)]
    assert len(hists) == 2 and all(h.buf.shape == (4,) for h in hists)
    # Newest first: the three calls' input amaxes, the 2x batch in the middle.
    first = next(h for h in hists if h.module == "0").buf
    assert (first[:3] > 0).all() and first[3] == 0
    assert first[1] > first[0] and first[1] > first[2]


def _flaky_compile_fx(monkeypatch, fail_when_inlined: bool, seen: list):
    import torch._inductor.compile_fx as cfx

    from fp8compile.ops import _inline

    real = cfx.compile_fx

    def compile_fx(gm, inputs, **kwargs):
        seen.append(_inline.inline_enabled())
        if _inline.inline_enabled() or not fail_when_inlined:
            raise RuntimeError("kernel did not compile")
        return real(gm, inputs, **kwargs)

    monkeypatch.setattr(cfx, "compile_fx", compile_fx)


def test_failed_inlined_compile_is_retried_with_opaque_ops(monkeypatch):
    """A compile that fails with the kernels inlined is not a crash: the graph is compiled
    again with the FP8 ops opaque, with a warning and the reason in the plan."""
    torch.manual_seed(0)
    model = LlamaBlock(256, 4, 512).eval()
    x = torch.randn(2, 16, 256)
    torch._dynamo.reset()
    expected = torch.compile(model, backend=fp8compile.backend())(x)
    seen: list = []
    _flaky_compile_fx(monkeypatch, True, seen)
    be = fp8compile.backend()
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="inlined failed.*kernel did not compile"):
        out = torch.compile(model, backend=be)(x)
    # compile_fx calls itself to apply config patches: every call after the first is opaque.
    assert seen[0] is True and len(seen) >= 2 and not any(seen[1:])
    assert be.plan.stats["inline_failed"] == "RuntimeError: kernel did not compile"
    assert "opaque calls: inlining their kernels failed" in be.plan.summary()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_compile_error_of_opaque_ops_is_raised(monkeypatch):
    """The retry happens once: an error that is not about inlining still surfaces."""
    seen: list = []
    _flaky_compile_fx(monkeypatch, False, seen)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="kernel did not compile"):
        torch.compile(LlamaBlock(256, 4, 512), backend=fp8compile.backend())(
            torch.randn(2, 16, 256))
    assert seen == [True, False]


def test_plan_lists_the_gemm_backends_traced_into_the_graph(monkeypatch):
    """What the GEMMs traced during this compile chose (on a GPU: cuBLAS or Triton per shape)
    is in the plan; a stale entry from before the compile is not."""
    import torch._inductor.compile_fx as cfx

    from fp8compile.kernels import select

    real = cfx.compile_fx
    key = (4096, 512, 256, "group", "precise", torch.bfloat16, (True, True), False,
           ("none", False))

    def compile_fx(gm, inputs, **kwargs):
        select.note_traced(key, "cublas")
        return real(gm, inputs, **kwargs)

    select.note_traced(("stale",) * 9, "triton")
    monkeypatch.setattr(cfx, "compile_fx", compile_fx)
    be = fp8compile.backend()
    torch._dynamo.reset()
    torch.compile(LlamaBlock(256, 4, 512), backend=be)(torch.randn(2, 16, 256))
    assert be.plan.stats["gemm_backends"] == [
        "M~4096 N=512 K=256 group precise bfloat16: cublas"]
    assert "GEMM backends chosen at compile time:\n  M~4096 N=512" in be.plan.summary()
    merged = fp8compile.Plan.merge([be.plan, be.plan])  # two graphs: both lists kept
    assert len(merged.stats["gemm_backends"]) == 2


@pytest.mark.skipif(not (torch.cuda.is_available()
                         and torch.cuda.get_device_capability() == (9, 0)),
                    reason="the SwiGLU epilogue's kernel runs on a Hopper GPU (sm_90) only")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_gpu_swiglu_epilogue_compiled(mode, monkeypatch):
    """On a Hopper GPU a LLaMA block's gate/up GEMM runs the warp-specialized kernel with
    the SwiGLU epilogue (forced: ``fuse_swiglu=True``), from the compiled graph, with CUDA
    graphs too; the block's output is the unfused graph's up to one bf16 rounding of h.
    By default the fold is timed at compile time, and the plan says what was decided."""
    from fp8compile.kernels import blockwise_ws as bw
    from fp8compile.kernels import select

    # Our kernels win every backend choice (the fused kernel against cuBLAS + pointwise
    # SwiGLU at these small sizes would otherwise be a timing's toss-up); the fold's own
    # compile-time timing (fuse_swiglu=None) is left real.
    monkeypatch.setattr(select, "_faster", lambda *a, **k: "triton")
    monkeypatch.setattr(select, "_CHOICES", {})
    swiglu = []
    real = bw.blockwise_mm
    monkeypatch.setattr(bw, "blockwise_mm", lambda *a, **k: swiglu.append(
        k.get("swiglu", False)) or real(*a, **k))
    torch.manual_seed(0)
    model = LlamaBlock(d=256, heads=4, ffn=512).cuda().to(torch.bfloat16)
    x = torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16)
    cfg = {"recipe": "rowwise", "accumulation": "fast"}
    outs = {}
    for fs in (True, False, None):
        torch._dynamo.reset()
        compiled, be = _compile(model, {**cfg, "fuse_swiglu": fs}, mode=mode)
        with torch.no_grad():
            compiled(x)  # compiles (the fold's timing runs the fused kernel too)
            swiglu.clear()
            outs[fs] = [compiled(x).clone() for _ in range(2)][-1].float()  # record, replay
        reason = next(e.reason for e in be.plan.entries if e.module == "gate_proj")
        folded = be.plan.stats["swiglu_epilogues"] == 1
        if fs is True:
            assert folded and True in swiglu
        elif fs is False:
            assert not folded and True not in swiglu
        else:  # timed: either way the plan gives the times
            assert " us against " in reason and "apart" in reason, reason
            assert folded is (True in swiglu)
    with torch.no_grad():
        ref = model.float()(x.float())
    assert rel_err(outs[True], outs[False]) < 1e-2
    assert rel_err(outs[True], ref) < 3e-2


@pytest.mark.parametrize("mode, timed", [(None, False), ("max-autotune", True)])
def test_passes_time_their_choices_only_where_inductor_autotunes(monkeypatch, mode, timed):
    """The backend's mode reaches the passes: from 2048 tokens the SwiGLU fold is a rule
    unless the compile autotunes (``mode="max-autotune"``), where both steps are timed."""
    from fp8compile.kernels import blockwise_ws as bw
    from fp8compile.kernels import select

    real = bw.unsupported
    monkeypatch.setattr(bw, "unsupported", lambda *a, **k: (
        None if (why := real(*a, **k)) and ("Hopper GPU" in why or "Gluon" in why) else why))
    asked = []
    monkeypatch.setattr(select, "swiglu_epilogue_ms", lambda *a: asked.append(a) or (1.0, 1.0))
    torch._dynamo.reset()
    be = fp8compile.backend({"recipe": "tensorwise", "accumulation": "fast"}, mode=mode,
                            compile=False)
    with torch.no_grad():
        torch.compile(LlamaBlock(ffn=384), backend=be)(torch.randn(2, 1024, 256))
    assert bool(asked) is timed
    gate = {e.module: e for e in be.plan.entries if e.gemm}["gate_proj"].reason
    assert ("took 1000 us against 1000 us apart" in gate) if timed else ("by rule" in gate)


@pytest.mark.skipif(not (torch.cuda.is_available()
                         and torch.cuda.get_device_capability() == (9, 0)),
                    reason="the SwiGLU epilogue's kernel runs on a Hopper GPU (sm_90) only")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_gpu_static_scaling_compiled(mode, monkeypatch):
    """Static scaling on a Hopper GPU, compiled: the casts fused into the norms and SiLU·mul
    run inlined, and by default (M > 256) the gate/up GEMM's epilogue writes the down
    projection's FP8 input through the warp-specialized kernel, with CUDA graphs too; the
    block's output is the graph's without the fold up to one FP8 rounding of h."""
    from fp8compile.kernels import blockwise_ws as bw

    out_dtypes = []
    real = bw.blockwise_mm
    monkeypatch.setattr(bw, "blockwise_mm", lambda *a, **k: out_dtypes.append(
        a[5].dtype) or real(*a, **k))
    torch.manual_seed(0)
    model = LlamaBlock(d=256, heads=4, ffn=512).cuda().to(torch.bfloat16)
    x = torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16)
    amax = {"q_proj": 4.0, "k_proj": 4.0, "v_proj": 4.0, "o_proj": 2.0, "gate_proj": 4.0,
            "up_proj": 4.0, "down_proj": 0.5}
    cfg = {"recipe": "tensorwise", "accumulation": "fast", "scaling": "static",
           "static_scales": amax}
    outs = {}
    for fs in (None, False):
        torch._dynamo.reset()
        compiled, be = _compile(model, {**cfg, "fuse_swiglu": fs}, mode=mode)
        with torch.no_grad():
            compiled(x)
            out_dtypes.clear()
            outs[fs] = [compiled(x).clone() for _ in range(2)][-1].float()
        folded = be.plan.stats["swiglu_epilogues"] == 1
        assert be.plan.stats["fused_quantizations"] == 3
        assert folded is (fs is None)
        if mode is None:  # under CUDA graphs the replays launch no Python
            assert (torch.float8_e4m3fn in out_dtypes) is folded
    with torch.no_grad():
        ref = model.float()(x.float())
    assert rel_err(outs[None], outs[False]) < 2e-2
    assert rel_err(outs[None], ref) < 5e-2


@pytest.mark.skipif(not (torch.cuda.is_available()
                         and torch.cuda.get_device_capability() == (9, 0)),
                    reason="the residual epilogue's kernel runs on a Hopper GPU (sm_90) only")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_gpu_last_residual_in_the_down_gemm_compiled(mode, recipe, monkeypatch):
    """By default (M > 256, fast accumulation) the block's last add runs in the down GEMM's
    epilogue through the warp-specialized kernel, which reads x and o_proj's output as two
    residuals; the block's output is the unfolded graph's up to one bf16 rounding."""
    from fp8compile.kernels import blockwise_ws as bw

    counts = []
    real = bw.blockwise_mm
    monkeypatch.setattr(bw, "blockwise_mm", lambda *a, **k: counts.append(
        len(k.get("residuals", ()))) or real(*a, **k))
    torch.manual_seed(0)
    model = LlamaBlock(d=256, heads=4, ffn=512).cuda().to(torch.bfloat16)
    x = torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16)
    cfg = {"recipe": recipe, "accumulation": "fast"}
    outs = {}
    for fr in (None, False):
        torch._dynamo.reset()
        compiled, be = _compile(model, {**cfg, "fuse_residual": fr}, mode=mode)
        with torch.no_grad():
            compiled(x)
            counts.clear()
            outs[fr] = [compiled(x).clone() for _ in range(2)][-1].float()
        assert (be.plan.stats["fused_epilogues"] >= 1) is (fr is None)
        down = {e.module: e for e in be.plan.entries if e.gemm}["down_proj"].reason
        assert ("residual add in the GEMM epilogue" in down) is (fr is None)
        if mode is None:  # under CUDA graphs the replays launch no Python
            assert (2 in counts) is (fr is None)
    with torch.no_grad():
        ref = model.float()(x.float())
    assert rel_err(outs[None], outs[False]) < 1e-2
    assert abs(rel_err(outs[None], ref) - rel_err(outs[False], ref)) < 2e-3


def test_mixture_of_experts_runs_its_experts_in_fp8():
    """transformers' Mixtral: both expert projections are FP8 grouped GEMMs over cached
    per-expert FP8 weights, requantized when the experts' weights change."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_hf_mixtral()  # registers transformers' grouped GEMM op, where it has one
    if not hasattr(torch.ops.transformers, "grouped_mm_fallback"):
        pytest.skip(f"transformers {transformers.__version__} has no grouped experts")
    ids = torch.randint(0, 512, (2, 16))
    cm, be = _compile(model)
    with torch.no_grad():
        err = rel_err(cm(ids).logits, model(ids).logits)
        assert err < 0.12, err
        grouped = [e for e in be.plan.gemms if e.gemm == "grouped_mm"]
        assert len(grouped) == 4 and all(e.is_fp8 for e in grouped)
        caches = [c for c in be.contexts[-1].weight_caches if type(c).__name__ ==
                  "GroupedWeightCache"]
        assert len(caches) == 4 and all(c.quantizations == 1 for c in caches)
        experts = model.model.layers[1].mlp.experts
        experts.down_proj.neg_()  # a stale FP8 copy would add the experts' output with the
        err = rel_err(cm(ids).logits, model(ids).logits)  # wrong sign
        assert err < 0.12, err
        assert sorted(c.quantizations for c in caches) == [1, 1, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: transformers' "
                    "experts call torch's grouped GEMM (bf16) there, the Triton kernel runs them")
@pytest.mark.parametrize("config", [{}, {"recipe": "rowwise", "accumulation": "fast"}])
def test_mixture_of_experts_on_the_gpu(config):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_hf_mixtral().cuda().bfloat16()
    ids = torch.randint(0, 512, (2, 16), device="cuda")
    cm, be = _compile(model, config)
    with torch.no_grad():
        err = rel_err(cm(ids).logits, model(ids).logits)
    grouped = [e for e in be.plan.gemms if e.gemm == "grouped_mm"]
    assert len(grouped) == 4 and all(e.is_fp8 for e in grouped), be.plan.summary()
    assert err < 0.12, err


@pytest.mark.skipif(not (torch.cuda.is_available()
                         and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="the FP8 Triton kernels need a CUDA GPU with FP8 (sm_89+)")
@pytest.mark.parametrize("config", [{}, {"recipe": "rowwise", "accumulation": "fast"}])
def test_gpu_cuda_graphs_prefill_then_decode(config):
    """A model run at a prefill shape, then at a decode shape, under CUDA graphs: the second
    graph has dynamic shapes (Dynamo's automatic dynamic), so its GEMMs launch from the graph
    at run time.  At 16 rows those sum split-K in the GEMM with tile counters made at the
    first launch, in the CUDA-graph warm-up; they must not land in the graph's memory pool,
    which refuses tensors kept past the warm-up."""
    model = LlamaBlock(2048, 16, 5632).cuda().to(torch.bfloat16).eval()
    be = fp8compile.backend(config, mode="reduce-overhead")
    cm = torch.compile(model, backend=be)
    with torch.no_grad():
        for shape in ((2, 256), (1, 16)):
            x = torch.randn(*shape, 2048, device="cuda", dtype=torch.bfloat16)
            for _ in range(3):  # warm-up, record, replay
                torch.compiler.cudagraph_mark_step_begin()
                y = cm(x).clone()
            assert rel_err(y, model(x)) < 3e-2
