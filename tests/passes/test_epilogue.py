"""EpiloguePass: activations and residual adds folded into the FP8 GEMMs that produce them."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp8compile.passes.manager import info
from tests.models import LlamaBlock, rel_err

OPS = torch.ops.fp8compile


def _gemms(gm):
    return [n for n in gm.graph.nodes if n.target is OPS.scaled_mm.default]


def _epilogues(gm):
    return sorted((n.args[9], n.args[10] is not None) for n in _gemms(gm))


ON = {"fuse_epilogues": True}


def _run(gm, inputs, ctx):
    with torch.no_grad():
        return gm(*inputs, *[p(inputs) for p in ctx.extra_inputs])


def test_llama_block_adds_its_last_residual_in_the_down_gemm(passes):
    # The first residual add (x + o_proj) is also read by the MLP norm, whose fused
    # quantization takes it in (FusePass): o_proj's output then has two readers and keeps
    # its plain epilogue.  The second (h + down_proj) moves into the down GEMM, which takes
    # the residual stream h = x + o_proj as its two terms: h is never written in bf16.
    x = torch.randn(2, 8, 256)
    model = LlamaBlock()
    gm, inputs, ctx = passes(model, x, config=ON)
    fused = [n for n in _gemms(gm) if n.args[10] is not None]
    assert [info(n)["module"] for n in fused] == ["down_proj"]
    assert info(fused[0])["epilogue"] == ["residual"]
    assert not [n for n in gm.graph.nodes if n.target in (operator.add, torch.add)]
    x_in, o = fused[0].args[10:12]
    assert x_in.op == "placeholder" and info(o)["module"] == "o_proj"
    assert ctx.stats["fused_epilogues"] == 1
    # The reference computes the product and the add in fp32 either way: the same values.
    gm0, inputs0, ctx0 = passes(model, x)  # off by default
    assert _epilogues(gm0) == [("none", False)] * 4 and ctx0.stats["fused_epilogues"] == 0
    assert torch.equal(_run(gm, inputs, ctx)[0], _run(gm0, inputs0, ctx0)[0])
    assert rel_err(_run(gm, inputs, ctx)[0], model(x)) < 0.03
    entries = {e.module: e for e in ctx.plan_entries if e.gemm}
    assert "residual add in the GEMM epilogue" in entries["down_proj"].reason
    assert "residual add in the GEMM epilogue" not in entries["o_proj"].reason
    adds = [e for e in ctx.plan_entries if e.op == "add"]
    assert len(adds) == 2 and all("epilogue of the FP8 GEMM of" in e.reason for e in adds)


class Mlp(nn.Module):
    def __init__(self, act: nn.Module, residual: bool = True):
        super().__init__()
        self.fc, self.proj, self.act, self.residual = (
            nn.Linear(256, 512), nn.Linear(512, 256), act, residual)

    def forward(self, x):
        y = self.proj(self.act(self.fc(x)))
        return x + y if self.residual else y


@pytest.mark.parametrize("act, want", [
    (nn.GELU(), "gelu"), (nn.SiLU(), "silu"), (nn.ReLU(), "relu"),
    (nn.GELU(approximate="tanh"), "none"),  # the kernel computes the erf form only
    (nn.ReLU(inplace=True), "none"), (nn.Tanh(), "none"),
])
def test_activation_folded_where_the_kernel_computes_it(passes, act, want):
    x = torch.randn(3, 5, 256)
    model = Mlp(act)
    gm, inputs, ctx = passes(model, x, config=ON)
    assert _epilogues(gm) == sorted([(want, False), ("none", True)])
    assert rel_err(_run(gm, inputs, ctx)[0], model(x)) < 0.03


def test_bf16_model_matches_the_unfused_graph_within_one_rounding(passes):
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    model = Mlp(nn.GELU()).to(torch.bfloat16)
    gm, inputs, ctx = passes(model, x, config=ON)
    gm0, inputs0, ctx0 = passes(model, x)
    (y,), (y0,) = _run(gm, inputs, ctx), _run(gm0, inputs0, ctx0)
    assert y.dtype == torch.bfloat16 and _epilogues(gm) == [("gelu", False), ("none", True)]
    # Unfused rounds the product, the GELU and the sum to bf16; fused rounds once.
    assert rel_err(y, y0) < 1e-2
    assert rel_err(y, model(x)) < 0.03


class Unfusable(nn.Module):
    """Every way a GEMM's output or its add can rule the fold out."""

    def __init__(self, case: str):
        super().__init__()
        self.case, self.fc = case, nn.Linear(256, 256)

    def forward(self, x, r):
        y = self.fc(x)
        if self.case == "read_twice":
            return x + y, y
        if self.case == "alpha":
            return torch.add(x, y, alpha=2.0)
        if self.case == "promotes":  # fp32 residual + bf16 product: an fp32 result
            return y + r
        if self.case == "broadcasts_y":  # y (1, 256) grows to r's (4, 256)
            return self.fc(x[:1]) + x
        if self.case == "self":
            return y + y
        if self.case == "activation_read_twice":
            a = F.relu(y)
            return a + x, a
        raise AssertionError(self.case)


@pytest.mark.parametrize("case", ["read_twice", "alpha", "promotes", "broadcasts_y", "self",
                                  "activation_read_twice"])
def test_no_fold_where_the_values_would_change(passes, case):
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    r = torch.randn(4, 256)
    model = Unfusable(case).to(torch.bfloat16)
    gm, inputs, ctx = passes(model, x, r, config={"rules": [], **ON})
    assert all(n.args[10] is None for n in _gemms(gm))
    if case != "activation_read_twice":
        assert _epilogues(gm) == [("none", False)] * len(_gemms(gm))
    out = _run(gm, inputs, ctx)
    ref = model(x, r)
    for got, want in zip(out, ref if isinstance(ref, tuple) else (ref,)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel_err(got.float(), want.float()) < 0.06  # FP8 GEMM alone: ~3.7%


def test_residual_that_broadcasts_into_the_product_is_folded(passes):
    class Bias2(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(256, 256)
            self.shift = nn.Parameter(torch.randn(256))

        def forward(self, x):
            return self.fc(x) + self.shift

    x = torch.randn(3, 7, 256)
    model = Bias2()
    gm, inputs, ctx = passes(model, x, config={"rules": [], **ON})
    assert _epilogues(gm) == [("none", True)]
    assert rel_err(_run(gm, inputs, ctx)[0], model(x)) < 0.03


def test_broadcast_residual_not_folded_by_the_rule(passes, monkeypatch):
    # The Hopper kernel reads residuals as full output tiles: by rule, a residual that
    # broadcasts stays a separate add (fuse_epilogues=True still folds it, timed).
    _kernel_serves_everywhere(monkeypatch)

    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(256, 256, bias=False)
            self.shift = nn.Parameter(torch.randn(256))

        def forward(self, x):
            return self.fc(x) + self.shift

    x = torch.randn(2, 160, 256, dtype=torch.bfloat16)
    gm, _, ctx = passes(Shift().to(torch.bfloat16), x,
                        config={**FAST_ROWS, "rules": [], "min_weight_numel": 0})
    assert _epilogues(gm) == [("none", False)]
    reason = [e for e in ctx.plan_entries if e.gemm][0].reason
    assert "the residual broadcasts into the product" in reason, reason


# --------------------------------------------------------------------------------------
# SwiGLU: silu(gate) * up in the stacked gate/up GEMM's epilogue


SWIGLU = {"recipe": "rowwise", "accumulation": "fast", "fuse_swiglu": True}


def _swiglu_gemms(gm):
    return [n for n in _gemms(gm) if n.args[9] == "swiglu"]


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise", "blockwise"])
def test_swiglu_folded_into_the_gate_up_gemm(passes, recipe):
    x = torch.randn(2, 40, 256)
    model = LlamaBlock(ffn=384)  # gate and up 3 blocks of 128 rows each
    cfg = {**SWIGLU, "recipe": recipe}
    gm, inputs, ctx = passes(model, x, config=cfg)
    groups = [n for n in gm.graph.nodes if n.target is OPS.scaled_mm_swiglu_quantize.default]
    if recipe == "blockwise":
        # the GEMM quantizes h itself, in the 1x128 groups down_proj reads
        (mm,) = groups
        assert not _swiglu_gemms(gm) and info(mm)["fused_quant"] == "group"
        assert {u.target for u in mm.users} == {operator.getitem}
        assert not any(n.target is OPS.quantize.default for n in gm.graph.nodes
                       if n.args and n.args[0] is mm)
    else:
        (mm,) = _swiglu_gemms(gm)
        assert not groups
        # the GEMM's output goes through one plain quantization, read by down_proj alone
        (quant,) = mm.users
        assert quant.target is OPS.quantize.default
    assert info(mm)["epilogue"] == ["swiglu"] and ctx.stats["swiglu_epilogues"] == 1
    assert not any(n.target is OPS.silu_mul_quantize.default for n in gm.graph.nodes)
    assert not any(n.target is torch.narrow and n.args[0] is mm for n in gm.graph.nodes)
    # the weight cache serves the stacked copy as it is: gate was stacked first
    cache = info(mm.args[3])["weight_cache"]
    assert cache.order is None and len(cache.indices) == 2
    assert tuple(mm.args[3].meta["example_value"].shape) == (768, 256)  # 384 + 384 rows
    wq = _run_provider(ctx, inputs, mm.args[3])
    w = torch.cat([model.gate_proj.weight, model.up_proj.weight]).detach()
    want = OPS.quantize(w, *cache.args)[0]
    assert torch.equal(wq.view(torch.uint8), want.view(torch.uint8))
    # same function as the unfused graph, up to the bf16 rounding of silu(gate) * up
    gm0, inputs0, ctx0 = passes(model, x, config={**cfg, "fuse_swiglu": False})
    assert not _swiglu_gemms(gm0) and ctx0.stats["swiglu_epilogues"] == 0
    y, y0 = _run(gm, inputs, ctx)[0], _run(gm0, inputs0, ctx0)[0]
    assert rel_err(y, y0) < 5e-3
    assert rel_err(y, model(x)) < 0.03
    entries = {e.module: e for e in ctx.plan_entries if e.gemm}
    for name in ("gate_proj", "up_proj"):
        assert "SiLU(gate)·up in the GEMM epilogue" in entries[name].reason


def _run_provider(ctx, inputs, placeholder):
    """The value the compiled graph's added input ``placeholder`` gets for ``inputs``."""
    phs = list(placeholder.graph.find_nodes(op="placeholder"))
    with torch.no_grad():
        return ctx.extra_inputs[phs.index(placeholder) - len(inputs)](inputs)


@pytest.mark.parametrize("cfg, ffn, why", [
    # default: only where the warp-specialized Hopper kernel serves the GEMM
    ({"fuse_swiglu": None}, 384, "needs a Hopper GPU"),
    ({"fuse_swiglu": None, "env": "cublas"}, 384, "FP8COMPILE_GEMM_BACKEND=cublas"),
    ({"fuse_swiglu": None, "accumulation": "precise"}, 384, "needs fast accumulation"),
    ({"fuse_swiglu": None, "recipe": "blockwise"}, 384, "needs a Hopper GPU"),
    ({"fuse_swiglu": None, "recipe": "blockwise", "power_of_2_scales": True}, 384,
     "plain (not power-of-2) scales"),
    ({}, 320, "a multiple of 128"),
])
def test_swiglu_not_folded_says_why(passes, monkeypatch, cfg, ffn, why):
    cfg = dict(cfg)
    if "env" in cfg:  # a forced GEMM backend overrides the timing that picks the kernel
        monkeypatch.setenv("FP8COMPILE_GEMM_BACKEND", cfg.pop("env"))
    x = torch.randn(2, 160, 256)  # M = 320: above the kernel's smallest M
    gm, _, ctx = passes(LlamaBlock(ffn=ffn), x, config={**SWIGLU, **cfg})
    assert not _swiglu_gemms(gm) and ctx.stats["swiglu_epilogues"] == 0
    assert any(n.target is OPS.silu_mul_quantize.default for n in gm.graph.nodes)
    entries = {e.module: e for e in ctx.plan_entries if e.gemm}
    for name in ("gate_proj", "up_proj"):
        assert "SiLU·mul not in the GEMM epilogue" in entries[name].reason
        assert why in entries[name].reason, entries[name].reason


def test_swiglu_needs_the_stacked_projection(passes):
    x = torch.randn(2, 40, 256)
    gm, _, ctx = passes(LlamaBlock(ffn=384), x, config={**SWIGLU, "fuse_projections": False})
    assert not _swiglu_gemms(gm) and ctx.stats["swiglu_epilogues"] == 0
    gm, _, ctx = passes(LlamaBlock(ffn=384), x, config=SWIGLU, inference=False)
    assert not _swiglu_gemms(gm)


def test_swiglu_weights_requantized_stacked_when_a_parameter_changes(passes):
    x = torch.randn(2, 40, 256)
    model = LlamaBlock(ffn=384)
    gm, inputs, ctx = passes(model, x, config=SWIGLU)
    (mm,) = _swiglu_gemms(gm)
    y0 = _run(gm, inputs, ctx)[0]
    with torch.no_grad():
        model.up_proj.weight[:128] *= -1  # up's first rows: rows 384-511 of the stack
    wq = _run_provider(ctx, inputs, mm.args[3])
    want = OPS.quantize(torch.cat([model.gate_proj.weight, model.up_proj.weight]).detach(),
                        *info(mm.args[3])["weight_cache"].args)[0]
    assert torch.equal(wq.view(torch.uint8), want.view(torch.uint8))
    assert rel_err(_run(gm, inputs, ctx)[0], model(x)) < 0.03
    assert rel_err(_run(gm, inputs, ctx)[0], y0) > 0.01


@pytest.mark.parametrize("fused_ms, folded", [(0.80, True), (0.99, False)])
def test_swiglu_by_default_where_the_kernel_serves_it_and_times_faster(
        passes, monkeypatch, fused_ms, folded):
    """Default (``fuse_swiglu=None``): where the kernel serves the GEMM, the fused step (GEMM
    with the epilogue + plain quantization) is timed against the GEMM and the SiLU·mul
    quantization apart, and folded only where it is faster by the backend choice's margin;
    the plan gives both times."""
    from fp8compile.kernels import blockwise_ws as bw
    from fp8compile.kernels import select

    real = bw.unsupported
    monkeypatch.setattr(bw, "unsupported", lambda *a, **k: (
        None if (why := real(*a, **k)) and ("Hopper GPU" in why or "Gluon" in why) else why))
    asked = []

    def timed(m, n, k, xg, wg, x_dtype, out_dtype, quant, device, accumulation):
        asked.append((m, n, k, str(xg), str(wg), x_dtype, out_dtype, tuple(quant),
                      accumulation))
        return fused_ms, 1.0
    monkeypatch.setattr(select, "swiglu_epilogue_ms", timed)
    x = torch.randn(2, 160, 256)
    gm, _, ctx = passes(LlamaBlock(ffn=384), x, config={**SWIGLU, "fuse_swiglu": None})
    assert asked == [(320, 768, 256, "row", "row", torch.float8_e4m3fn, torch.float32,
                      ("row", "e4m3", False), "fast")]
    assert bool(_swiglu_gemms(gm)) is folded
    reason = {e.module: e for e in ctx.plan_entries if e.gemm}["gate_proj"].reason
    us = f"{fused_ms * 1e3:.0f} us against 1000 us apart"
    if folded:
        assert "SiLU(gate)·up in the GEMM epilogue" in reason and us in reason
    else:
        assert "SiLU·mul not in the GEMM epilogue: the GEMM with it and a plain " \
               f"quantization took {us}" in reason


@pytest.mark.parametrize("recipe, folded", [("tensorwise", True), ("rowwise", False),
                                            ("blockwise", True)])
def test_swiglu_by_rule_from_2048_tokens_and_timed_under_max_autotune(
        passes, monkeypatch, recipe, folded):
    """From 2048 tokens (the sizes measured) the default fold is a rule, not a timing: made
    with tensor scales and with blockwise scales (whose GEMM then quantizes h in 1x128
    groups), not with row scales, and the plan says so; under max-autotune the two steps
    are timed as below 2048 tokens, with the recipe's accumulation."""
    from fp8compile.kernels import blockwise_ws as bw
    from fp8compile.kernels import select

    real = bw.unsupported
    monkeypatch.setattr(bw, "unsupported", lambda *a, **k: (
        None if (why := real(*a, **k)) and ("Hopper GPU" in why or "Gluon" in why) else why))
    asked = []
    monkeypatch.setattr(select, "swiglu_epilogue_ms", lambda *a: asked.append(a) or (0.5, 1.0))
    x = torch.randn(2, 1024, 256)
    config = {**SWIGLU, "recipe": recipe, "fuse_swiglu": None}
    if recipe == "blockwise":
        config["accumulation"] = "precise"  # the recipe's default
    gm, _, ctx = passes(LlamaBlock(ffn=384), x, config=config)
    assert asked == [] and bool(_folds(gm)) is folded
    reason = {e.module: e for e in ctx.plan_entries if e.gemm}["gate_proj"].reason
    if folded:
        assert "SiLU(gate)·up in the GEMM epilogue" in reason and "by rule" in reason
        if recipe == "blockwise":
            assert "never written in high precision" in reason
    else:
        assert "SiLU·mul not in the GEMM epilogue: by rule" in reason and "row scales" in reason
    with torch._inductor.config.patch(max_autotune=True):
        gm, _, ctx = passes(LlamaBlock(ffn=384), x, config=config)
    assert len(asked) == 1 and _folds(gm)  # timed 0.5 against 1.0 ms: folded
    assert asked[0][-1] == ("precise" if recipe == "blockwise" else "fast")
    reason = {e.module: e for e in ctx.plan_entries if e.gemm}["gate_proj"].reason
    assert "500 us against 1000 us apart" in reason
    if recipe == "blockwise":
        assert "quantized there in 1x128 groups" in reason


def _folds(gm):
    """The gate/up GEMMs that took in the SwiGLU: with its output quantized by a plain pass,
    or (blockwise) quantized in the GEMM itself."""
    return _swiglu_gemms(gm) + [n for n in gm.graph.nodes
                                if n.target is OPS.scaled_mm_swiglu_quantize.default]


class UpFirst(nn.Module):
    """A SwiGLU MLP that calls up before gate (the stack is (up, gate)), then a head (the
    last linear stays in high precision, so down_proj is not the last)."""

    def __init__(self, d=256, f=256):
        super().__init__()
        self.gate, self.up, self.down = (nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False),
                                         nn.Linear(f, d, bias=False))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        return self.head(x + self.down(self.up(x) * F.silu(self.gate(x))))


def test_swiglu_folded_when_up_is_stacked_first(passes):
    x = torch.randn(3, 50, 256)
    model = UpFirst()
    gm, inputs, ctx = passes(model, x, config=SWIGLU)
    (mm,) = _swiglu_gemms(gm)
    cache = info(mm.args[3])["weight_cache"]
    assert cache.order == 1  # the gate is the second member: its rows first
    wq = _run_provider(ctx, inputs, mm.args[3])
    want = OPS.quantize(torch.cat([model.gate.weight, model.up.weight]).detach(), *cache.args)[0]
    assert torch.equal(wq.view(torch.uint8), want.view(torch.uint8))
    gm0, inputs0, ctx0 = passes(model, x, config={**SWIGLU, "fuse_swiglu": False})
    assert rel_err(_run(gm, inputs, ctx)[0], _run(gm0, inputs0, ctx0)[0]) < 5e-3
    assert rel_err(_run(gm, inputs, ctx)[0], model(x)) < 0.03


STATIC = {"recipe": "tensorwise", "scaling": "static", "accumulation": "fast",
          "static_scales": {"q_proj": 4.0, "k_proj": 4.0, "v_proj": 4.0, "o_proj": 1.0,
                            "gate_proj": 3.0, "up_proj": 3.0, "down_proj": 0.5}}


def _static_casts(gm):
    return [n for n in gm.graph.nodes
            if n.target in (OPS.quantize_static.default, OPS.quantize_scaled.default)]


def test_static_scaling_shares_fuses_and_stacks_like_dynamic(passes):
    # One scale input per calibrated amax, so q/k/v and gate/up share one cast and run as one
    # stacked GEMM each; the casts sit in the norms (one with the residual add) and SiLU·mul.
    x = torch.randn(2, 40, 256)
    model = LlamaBlock(ffn=384)
    gm, inputs, ctx = passes(model, x, config={**STATIC, "fuse_swiglu": False})
    casts = _static_casts(gm)
    producers = sorted(n.args[4] for n in casts if n.target is OPS.quantize_static.default)
    assert producers == ["add_rmsnorm", "rmsnorm", "silu_mul"]
    assert [n.target for n in casts].count(OPS.quantize_scaled.default) == 1  # o_proj's input
    assert len(_gemms(gm)) == 4 and len(ctx.stats["fused_gemms"]) == 2
    assert ctx.stats["fused_quantizations"] == 3
    scales = [n for n in gm.graph.find_nodes(op="placeholder") if "static_scale" in n.name]
    assert len(scales) == 4  # 4.0, 1.0, 3.0, 0.5
    y = _run(gm, inputs, ctx)[0]
    assert rel_err(y, model(x).detach()) < 0.05
    # the same function as the graph without producer fusion, which casts the rounded h
    gm0, inputs0, ctx0 = passes(model, x, config={**STATIC, "fuse_swiglu": False,
                                                  "fuse_producers": False})
    assert not any(n.target is OPS.quantize_static.default for n in gm0.graph.nodes)
    assert rel_err(y, _run(gm0, inputs0, ctx0)[0]) < 1e-2
    entries = {e.module: e for e in ctx.plan_entries if e.gemm}
    assert "input quantization fused into its rms_norm" in entries["q_proj"].reason
    assert "shared with" in entries["k_proj"].reason


def test_static_scales_that_differ_are_not_shared(passes):
    x = torch.randn(2, 40, 256)
    cfg = {**STATIC, "static_scales": {**STATIC["static_scales"], "k_proj": 5.0}}
    gm, _, ctx = passes(LlamaBlock(ffn=384), x, config={**cfg, "fuse_swiglu": False})
    # q and v share one cast (4.0), k has its own (5.0): q/v stack, k stays apart
    assert len(_gemms(gm)) == 5
    assert any("q_proj" in g and "v_proj" in g and "k_proj" not in g
               for g in ctx.stats["fused_gemms"])


def test_static_swiglu_casts_in_the_gate_up_epilogue(passes):
    # With a static scale the SiLU·mul cast moves into the gate/up GEMM's epilogue too: the
    # GEMM writes the down projection's FP8 input, and no quantization pass is left for it.
    x = torch.randn(2, 40, 256)
    model = LlamaBlock(ffn=384)
    gm, inputs, ctx = passes(model, x, config={**STATIC, "fuse_swiglu": True})
    (mm,) = [n for n in gm.graph.nodes if n.target is OPS.scaled_mm_quantized.default]
    assert mm.args[8] == "swiglu" and info(mm)["epilogue"] == ["swiglu"]
    assert ctx.stats["swiglu_epilogues"] == 1
    assert not any(n.target is OPS.quantize_static.default and n.args[4] == "silu_mul"
                   for n in gm.graph.nodes)
    (down,) = mm.users
    assert down.target is OPS.scaled_mm.default and down.args[0] is mm
    assert down.args[1] is mm.args[9]  # down reads it with the scale it was cast with
    gm0, inputs0, ctx0 = passes(model, x, config={**STATIC, "fuse_swiglu": False})
    y, y0 = _run(gm, inputs, ctx)[0], _run(gm0, inputs0, ctx0)[0]
    assert rel_err(y, y0) < 1e-2 and rel_err(y, model(x).detach()) < 0.05
    reason = {e.module: e for e in ctx.plan_entries if e.gemm}["gate_proj"].reason
    assert "cast to FP8 there with the static scale" in reason


def test_static_swiglu_by_rule_where_the_kernel_serves_it(passes, monkeypatch):
    from fp8compile.kernels import blockwise_ws as bw
    from fp8compile.kernels import select

    real = bw.unsupported
    seen = []

    def unsupported(*a, **k):
        seen.append(a[6:8])
        why = real(*a, **k)
        return None if why and ("Hopper GPU" in why or "Gluon" in why) else why
    monkeypatch.setattr(bw, "unsupported", unsupported)
    monkeypatch.setattr(select, "swiglu_epilogue_ms", lambda *a: pytest.fail("timed"))
    x = torch.randn(2, 160, 256)  # M = 320: the kernel serves it
    gm, _, ctx = passes(LlamaBlock(ffn=384), x, config={**STATIC, "fuse_swiglu": None})
    # asked about an E4M3 output of the SwiGLU epilogue
    assert [out for out, act in seen if act == "swiglu"] == [torch.float8_e4m3fn]
    assert ctx.stats["swiglu_epilogues"] == 1
    assert "by rule: a static scale" in \
        {e.module: e for e in ctx.plan_entries if e.gemm}["gate_proj"].reason
    e5m2 = {**STATIC, "fuse_swiglu": None, "activation_format": "e5m2"}
    gm, _, ctx = passes(LlamaBlock(ffn=384), x, config=e5m2)
    assert ctx.stats["swiglu_epilogues"] == 0
    assert "E4M3 only" in {e.module: e for e in ctx.plan_entries if e.gemm}["gate_proj"].reason


def _kernel_serves_everywhere(monkeypatch):
    """The Hopper kernel's rules with the GPU rule lifted (the fold's rule asks them)."""
    from fp8compile.kernels import blockwise_ws as bw

    real = bw.unsupported

    def unsupported(*a, **k):
        why = real(*a, **k)
        return None if why and ("Hopper GPU" in why or "Gluon" in why) else why
    monkeypatch.setattr(bw, "unsupported", unsupported)


FAST_ROWS = {"recipe": "rowwise", "accumulation": "fast", "fuse_swiglu": False}


def _residual_gemms(gm):
    return [n for n in _gemms(gm) if n.args[10] is not None]


@pytest.mark.parametrize("cfg", [FAST_ROWS, {**STATIC, "fuse_swiglu": False}],
                         ids=["rowwise-fast", "static"])
def test_last_residual_add_by_rule_where_the_kernel_serves_it(passes, monkeypatch, cfg):
    # Default (fuse_residual=None): the block's last add h + down_proj moves into the down
    # GEMM where the Hopper kernel serves it, with h = x + o_proj as its two terms.
    _kernel_serves_everywhere(monkeypatch)
    # bf16: an fp32 output tile of the kernel's tile shape does not fit in shared memory
    x = torch.randn(2, 160, 256, dtype=torch.bfloat16)  # M = 320: the kernel serves it
    model = LlamaBlock(ffn=384).to(torch.bfloat16)
    gm, inputs, ctx = passes(model, x, config=cfg)
    (down,) = _residual_gemms(gm)
    assert info(down)["module"] == "down_proj" and info(down)["epilogue"] == ["residual"]
    assert down.args[10].op == "placeholder" and info(down.args[11])["module"] == "o_proj"
    assert not [n for n in gm.graph.nodes if n.target in (operator.add, torch.add)]
    reason = {e.module: e for e in ctx.plan_entries if e.gemm}["down_proj"].reason
    assert "residual add in the GEMM epilogue" in reason and "by rule" in reason
    assert "two terms" in reason
    gm0, inputs0, ctx0 = passes(model, x, config={**cfg, "fuse_residual": False})
    assert not _residual_gemms(gm0)
    y, y0 = _run(gm, inputs, ctx)[0], _run(gm0, inputs0, ctx0)[0]
    # the unfolded graph, run as captured, rounds h = x + o to bf16 first
    assert rel_err(y.float(), y0.float()) < 1e-2


@pytest.mark.parametrize("cfg, tokens, why", [
    (FAST_ROWS, 160, "needs a Hopper GPU"),  # the kernel's rules, unstubbed
    ({**FAST_ROWS, "dtype": torch.float32}, 160, "more shared memory"),
    # promoted: the kernel takes residuals, the rule leaves them to fuse_residual=True
    ({**FAST_ROWS, "accumulation": "precise"}, 160, "promoted, the fused add measured"),
    ({"recipe": "blockwise", "fuse_swiglu": False}, 160, "promoted, the fused add measured"),
    (FAST_ROWS, 8, "M=16 < 257"),  # decode sizes: the split-K kernel serves them
])
def test_last_residual_add_not_folded_says_why(passes, monkeypatch, cfg, tokens, why):
    if why != "needs a Hopper GPU":
        _kernel_serves_everywhere(monkeypatch)
    cfg = dict(cfg)
    dtype = cfg.pop("dtype", torch.bfloat16)
    gm, _, ctx = passes(LlamaBlock(ffn=384).to(dtype), torch.randn(2, tokens, 256, dtype=dtype),
                        config=cfg)
    assert not _residual_gemms(gm)
    reason = {e.module: e for e in ctx.plan_entries if e.gemm}["down_proj"].reason
    assert "residual add not in the GEMM epilogue" in reason and why in reason, reason


@pytest.mark.parametrize("cfg", [FAST_ROWS, {"recipe": "blockwise", "fuse_swiglu": False}],
                         ids=["rowwise-fast", "blockwise"])
def test_fuse_residual_true_folds_without_the_kernel(passes, cfg):
    # True: wherever the pattern is, promoted recipes too; on the CPU the op's reference then
    # adds the two terms and the product in fp32.
    x = torch.randn(2, 8, 256)
    gm, inputs, ctx = passes(LlamaBlock(ffn=384), x, config={**cfg, "fuse_residual": True})
    (down,) = _residual_gemms(gm)
    assert len(down.args) == 12 and down.args[11] is not None
    gm0, inputs0, ctx0 = passes(LlamaBlock(ffn=384), x, config={**cfg, "fuse_residual": False})
    assert "by rule" not in {e.module: e for e in ctx.plan_entries if e.gemm}["down_proj"].reason
    assert ctx0.stats["fused_epilogues"] == 0 and ctx.stats["fused_epilogues"] == 1

