import operator

import pytest
import torch
from torch import nn

from fp8compile.passes.manager import info
from tests.models import LlamaBlock, rel_err

OPS = torch.ops.fp8compile


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


def test_inference_rewrite_shares_activation_quant_and_hoists_weights(passes):
    x = torch.randn(2, 8, 256)
    model = LlamaBlock()
    gm, inputs, ctx = passes(model, x, config={"fuse_projections": False})
    assert _count(gm, torch._C._nn.linear) == 0
    assert _count(gm, OPS.scaled_mm.default) == 7
    # q/k/v share the normed input, gate/up the second one: 4 quantizations, not 7
    # (3 of them then fused into their producers).
    quants = [OPS.quantize.default, OPS.rmsnorm_quantize.default, OPS.silu_mul_quantize.default]
    assert sum(_count(gm, t) for t in quants) == 4
    assert len(ctx.weight_caches) == 7 and len(ctx.extra_inputs) == 14
    assert ctx.stats["fp8_weight_bytes"] < ctx.stats["weight_bytes"] / 3.9
    extra = [p(inputs) for p in ctx.extra_inputs]
    with torch.no_grad():
        (y,) = gm(*inputs, *extra)
        assert rel_err(y, model(x)) < 0.03


def test_training_rewrite_keeps_weights_in_the_graph_and_shares_inputs(passes):
    gm, inputs, ctx = passes(LlamaBlock(), torch.randn(2, 8, 256), inference=False)
    assert not ctx.extra_inputs  # weights stay parameters, quantized in the graph
    # q/k/v share one quantization of the normed input, gate/up one of the second, and both
    # are fused into their RMSNorm; down_proj's, alone, into its SiLU·mul; o_proj (one
    # reader, attention output) keeps the self-quantizing op.
    assert _count(gm, OPS.quantize.default) == 0
    assert _count(gm, OPS.rmsnorm_quantize.default) == 2
    assert _count(gm, OPS.silu_mul_quantize.default) == 1
    assert _count(gm, OPS.linear_q.default) == 6 and _count(gm, OPS.linear.default) == 1
    fused = (OPS.rmsnorm_quantize.default, OPS.silu_mul_quantize.default)
    for n in gm.graph.nodes:
        if n.target in fused:
            # Detached: the gradient flows through linear_q's x (the producer's output).
            tensors = [a for a in n.args if isinstance(a, torch.fx.Node)]
            assert len(tensors) == 2 and all(a.target == "detach" for a in tensors)
            assert {u.target for u in n.users} == {operator.getitem}
        if n.target is OPS.linear_q.default:
            # x is the producer's high-precision output, which linear_q only carries.
            assert n.args[0].target not in fused and n.args[1].args[0].target in fused


def test_delayed_training_shares_and_fuses_each_input_quantization(passes):
    # Delayed scaling: q/k/v cast their normed input once and gate/up theirs, both fused
    # into the RMSNorm (gate/up's with the residual add before it); down_proj (alone) has its
    # cast fused into the SiLU·mul; o_proj
    # (attention output) keeps linear_delayed.  Each linear still pushes into its own
    # history, the shared x amax included.
    cfg = {"recipe": "tensorwise", "scaling": "delayed"}
    gm, _, ctx = passes(LlamaBlock(), torch.randn(2, 8, 256), config=cfg, inference=False)
    why = {e.module: e.reason for e in ctx.plan_entries if e.is_fp8}
    assert "input quantized once, shared with q_proj, k_proj" in why["v_proj"]
    assert "input quantization fused into its silu*mul" in why["down_proj"]
    assert "shared" not in why["o_proj"]
    casts = [n for n in gm.graph.nodes if n.target is OPS.quantize_history.default]
    assert sorted(n.args[4] for n in casts) == ["add_rmsnorm", "rmsnorm", "silu_mul"]
    for n in casts:  # detached inputs: the gradient flows through linear_delayed_q's x
        assert all(a.target == "detach" for a in n.args[:3] if isinstance(a, torch.fx.Node))
    assert _count(gm, OPS.linear_delayed_q.default) == 6
    assert _count(gm, OPS.linear_delayed.default) == 1
    assert _count(gm, OPS.push_amax.default) == 7
    for n in gm.graph.nodes:
        if n.target is OPS.linear_delayed_q.default:
            pushes = [p for u in n.users for s in u.users if s.target is torch.stack
                      for p in s.users]
            assert [p.target for p in pushes] == [OPS.push_amax.default]
            assert pushes[0].args[0] is n.args[5]  # its own history
            assert n.args[1].args[0].target is OPS.quantize_history.default


def _delayed_block_run(monkeypatch, share=True, fuse=True):
    """Outputs, gradients and amax histories of a compiled LLaMA block over three steps of
    growing inputs, delayed scaling, with the sharing and the fusion on or off."""
    import fp8compile
    from fp8compile.passes.fuse import FusePass
    from fp8compile.passes.scales import ScalesPass
    from fp8compile.training import amax_histories

    if not share:
        monkeypatch.setattr(ScalesPass, "_share_delayed_quant", lambda self, g: False)
    if not fuse:
        monkeypatch.setattr(FusePass, "_fuse_history", lambda self, g, n: None)
    torch.manual_seed(0)
    model = LlamaBlock()
    be = fp8compile.backend({"recipe": "tensorwise", "scaling": "delayed",
                             "amax_history_len": 3})
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=be)
    x = torch.randn(2, 8, 256)
    out = []
    for step in range(3):
        y = compiled(x * (1 + step))
        y.float().pow(2).sum().backward()
        out += [y.detach()] + [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    hist = amax_histories(be)
    out += [hist[name][k] for name in sorted(hist) for k in sorted(hist[name])]
    monkeypatch.undo()
    return out


def test_delayed_shared_training_equals_unshared(monkeypatch):
    # Sharing the q/k/v and gate/up casts changes no output, gradient or history.
    want = _delayed_block_run(monkeypatch, share=False, fuse=False)
    got = _delayed_block_run(monkeypatch, share=True, fuse=False)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_delayed_fused_training_close_to_unfused(monkeypatch):
    # Fused into the producers, the cast takes the norm and SiLU·mul computed in fp32 by
    # the fused reference instead of torch's own ops: rounding differences only.
    want = _delayed_block_run(monkeypatch, share=True, fuse=False)
    got = _delayed_block_run(monkeypatch, share=True, fuse=True)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 2e-2, rel_err(a, b)


def test_training_fusion_needs_the_producer_read_by_linears_only(passes):
    """A normed input that something else also reads (here a residual add) keeps its bf16
    value and an unfused quantization."""

    class NormTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(256)
            self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256)

        def forward(self, x):
            h = self.norm(x)
            return self.a(h) + self.b(h) + h

    gm, _, _ = passes(NormTwice(), torch.randn(2, 8, 256), inference=False,
                      config={"rules": []})
    assert _count(gm, OPS.rmsnorm_quantize.default) == 0
    assert _count(gm, OPS.quantize.default) == 1 and _count(gm, OPS.linear_q.default) == 2


def test_training_rewrite_passes_both_accumulations(passes):
    gm, _, _ = passes(LlamaBlock(), torch.randn(2, 8, 256), inference=False,
                      config={"accumulation": "fast"})
    linears = [n for n in gm.graph.nodes
               if n.target in (OPS.linear.default, OPS.linear_q.default)]
    assert len(linears) == 7
    assert {n.args[-2:] for n in linears} == {("fast", "precise")}


class WeightAsMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(256, 384) * 0.05)  # (K, N)

    def forward(self, x, y):
        return x @ self.w, torch.bmm(x, y)


def test_matmul_with_weight_and_batched_matmul(passes):
    x, y = torch.randn(3, 16, 256), torch.randn(3, 256, 128)
    model = WeightAsMatmul()
    gm, inputs, ctx = passes(model, x, y)
    assert _count(gm, OPS.scaled_mm.default) == 1 and _count(gm, OPS.matmul.default) == 1
    assert any(n.target is torch.t for n in gm.graph.nodes) is False, "t(w) moved to the cache"
    assert ctx.weight_caches[0].transposed
    with torch.no_grad():
        a, b = gm(*inputs, *[p(inputs) for p in ctx.extra_inputs])
        ra, rb = model(x, y)
    assert rel_err(a, ra) < 0.06 and rel_err(b, rb) < 0.06


# Every way a model writes the transpose of a weight stored as nn.Linear's (N, K).
TRANSPOSED = {
    "p.t()": lambda w: w.t(), "torch.t": torch.t, "p.T": lambda w: w.T,
    "p.mT": lambda w: w.mT, "p.transpose(0, 1)": lambda w: w.transpose(0, 1),
    "p.transpose(-1, -2)": lambda w: w.transpose(-1, -2),
    "torch.transpose": lambda w: torch.transpose(w, 1, 0),
    "p.permute(1, 0)": lambda w: w.permute(1, 0),
    "torch.permute": lambda w: torch.permute(w, (1, 0)),
    "p.swapaxes(0, 1)": lambda w: w.swapaxes(0, 1),
}


class TransposedWeight(nn.Module):
    """``x @ view(w)`` (or ``mm``/``addmm``) with ``w`` stored (N, K); ``view=None``:
    ``F.linear``, the same product."""

    def __init__(self, view=None, op="matmul", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.w = nn.Parameter(torch.randn(384, 256) * 0.05)
        self.b = nn.Parameter(torch.randn(384) * 0.1)
        self.view, self.op = view, op

    def forward(self, x):
        if self.view is None:
            return nn.functional.linear(x, self.w, self.b if self.op == "addmm" else None)
        wt = self.view(self.w)
        if self.op == "matmul":
            return x @ wt
        if self.op == "mm":
            return torch.mm(x, wt)
        return torch.addmm(self.b, x, wt)


@pytest.mark.parametrize("view", list(TRANSPOSED))
def test_a_transposed_parameter_is_quantized_as_a_linear_weight(passes, view):
    """``x @ p.t()`` quantized the weight as an activation at every call, in 1x128 groups
    along the wrong axis for a weight.  A transposed view of a 2-D parameter is now the
    linear's weight: one cached FP8 copy in 128x128 blocks, and the graph computes what
    ``F.linear`` does, bit for bit."""
    x = torch.randn(2, 16, 256)
    gm, inputs, ctx = passes(TransposedWeight(TRANSPOSED[view]), x,
                             config={"rules": []})
    assert _count(gm, OPS.scaled_mm.default) == 1 and _count(gm, OPS.matmul.default) == 0
    assert len(ctx.weight_caches) == 1 and ctx.weight_caches[0].transposed == (False,)
    (entry,) = [e for e in ctx.plan_entries if e.is_fp8]
    assert "weight quantized once per parameter version" in entry.reason
    ref_gm, ref_inputs, ref_ctx = passes(TransposedWeight(), x, config={"rules": []})
    with torch.no_grad():
        (y,) = gm(*inputs, *[p(inputs) for p in ctx.extra_inputs])
        (ref,) = ref_gm(*ref_inputs, *[p(ref_inputs) for p in ref_ctx.extra_inputs])
    assert torch.equal(y, ref)


@pytest.mark.parametrize("op", ["mm", "addmm"])
def test_mm_and_addmm_by_a_transposed_parameter(passes, op):
    x = torch.randn(32, 256)
    gm, inputs, ctx = passes(TransposedWeight(torch.t, op), x, config={"rules": []})
    ref_gm, ref_inputs, ref_ctx = passes(TransposedWeight(None, op), x, config={"rules": []})
    assert _count(gm, OPS.scaled_mm.default) == 1 and len(ctx.weight_caches) == 1
    with torch.no_grad():
        (y,) = gm(*inputs, *[p(inputs) for p in ctx.extra_inputs])
        (ref,) = ref_gm(*ref_inputs, *[p(ref_inputs) for p in ref_ctx.extra_inputs])
    assert torch.equal(y, ref)


def test_a_transposed_parameter_trains_and_releases_as_a_linear_weight():
    """Through the backend: training gives ``x @ p.t()``'s weight the gradients that
    ``F.linear`` gives it, bit for bit, with FP8 backward GEMMs; inference with
    ``release_weights`` frees it (the transposed view is gone from the graph)."""
    import fp8compile
    from fp8compile.passes import weights

    x, target = torch.randn(2, 16, 256), torch.randn(2, 16, 384)
    grads = []
    for model in (TransposedWeight(), TransposedWeight(lambda w: w.T)):
        be = fp8compile.backend({"rules": []})
        loss = nn.functional.mse_loss(torch.compile(model, backend=be)(x), target)
        loss.backward()
        (entry,) = be.plan.fp8
        assert "backward dX, dW in FP8" in entry.reason
        grads.append(model.w.grad)
    assert torch.equal(*grads)
    model = TransposedWeight(torch.t)
    be = fp8compile.backend({"rules": [], "release_weights": True})
    with torch.no_grad():
        torch.compile(model, backend=be)(x)
    assert weights.released(model.w) and be.plan.stats["released_weights"] == 1


class NotAWeightView(nn.Module):
    """Transposes that are not a 2-D parameter's: an activation's, a slice of a parameter's,
    a 3-D parameter's last two dims."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(512, 256) * 0.05)
        self.w3 = nn.Parameter(torch.randn(2, 384, 256) * 0.05)

    def forward(self, x, y):
        return x @ y.t(), x @ self.w[:384].t(), torch.bmm(x, self.w3.transpose(1, 2))


def test_other_transposes_stay_activations(passes):
    x, y = torch.randn(2, 16, 256), torch.randn(384, 256)
    model = NotAWeightView()
    gm, inputs, ctx = passes(model, x, y, config={"rules": []})
    assert _count(gm, OPS.scaled_mm.default) == 0 and _count(gm, OPS.matmul.default) == 3
    assert not ctx.weight_caches
    assert all("both operands are activations" in e.reason
               for e in ctx.plan_entries if e.is_fp8)
    with torch.no_grad():
        for got, want in zip(gm(*inputs), model(x, y)):
            assert rel_err(got, want) < 0.06


def test_high_precision_override_casts(passes):
    gm, inputs, _ = passes(LlamaBlock(), torch.randn(1, 4, 256),
                           config={"overrides": {"down_proj": "bf16"}})
    linears = [n for n in gm.graph.nodes if n.target is torch._C._nn.linear]
    assert len(linears) == 1
    (down,) = linears
    assert all(a.target == "to" and a.args[1] is torch.bfloat16 for a in down.args[:2])
    (back,) = down.users
    assert back.target == "to" and back.args[1] is torch.float32


def test_norm_and_swiglu_quantization_fused_into_producers(passes):
    x = torch.randn(2, 8, 256)
    model = LlamaBlock()
    gm, inputs, ctx = passes(model, x)
    assert _count(gm, OPS.rmsnorm_quantize.default) == 2
    assert _count(gm, OPS.silu_mul_quantize.default) == 1
    assert _count(gm, OPS.quantize.default) == 1  # o_proj's input comes from SDPA
    assert ctx.stats["fused_quantizations"] == 3
    with torch.no_grad():
        (y,) = gm(*inputs, *[p(inputs) for p in ctx.extra_inputs])
        assert rel_err(y, model(x)) < 0.03


class NormUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(256)
        self.proj = nn.Linear(256, 256)

    def forward(self, x):
        h = self.norm(x)
        return self.proj(h) + h  # h is also needed in high precision: no fusion


def test_no_fusion_when_the_activation_is_needed_elsewhere(passes):
    gm, _, ctx = passes(NormUsedTwice(), torch.randn(4, 256),
                        config={"rules": ["norm", "residual"]})
    assert _count(gm, OPS.rmsnorm_quantize.default) == 0
    assert _count(gm, OPS.quantize.default) == 1


class AddNorm(nn.Module):
    """``h = x + y`` normed into a linear and read again by the output's residual add."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.norm = nn.RMSNorm(256)
        self.proj = nn.Linear(256, 256, bias=False)

    def forward(self, x, y):
        if self.how == "alpha":
            h = torch.add(x, y, alpha=2.0)
        elif self.how == "promoted":
            h = x.to(torch.bfloat16) + y  # bf16 + fp32: the sum is fp32, x is not
        else:
            h = x + y
        return self.proj(self.norm(h)) + h


@pytest.mark.parametrize("how, y_shape, taken", [
    ("plain", (4, 256), True),
    ("broadcast", (256,), False),  # y is not x's shape
    ("alpha", (4, 256), False),
    ("promoted", (4, 256), False),
])
def test_residual_add_moves_into_the_fused_norm(passes, monkeypatch, how, y_shape, taken):
    from fp8compile.passes import fuse

    model, x, y = AddNorm(how), torch.randn(4, 256), torch.randn(y_shape)
    gm, inputs, ctx = passes(model, x, y)
    (norm,) = [n for n in gm.graph.nodes if n.target is OPS.rmsnorm_quantize.default]
    assert ("residual" in norm.kwargs) == taken
    adds = [n for n in gm.graph.nodes if n.target in (operator.add, torch.add)]
    assert len(adds) == 2  # h stays for the output's residual add
    if taken:
        assert {norm.args[0], norm.kwargs["residual"]} == set(adds[0].args)
        why = {e.module: e.reason for e in ctx.plan_entries if e.is_fp8}
        assert "input quantization fused into its residual add + rms_norm" in why["proj"]
    # The reference adds in fp32 either way (the model is fp32): the same output unfused.
    monkeypatch.setattr(fuse, "_residual_add", lambda x: None)
    gm0, inputs0, ctx0 = passes(model, x, y)
    assert torch.equal(_run(gm, inputs, ctx)[0], _run(gm0, inputs0, ctx0)[0])
    assert rel_err(_run(gm, inputs, ctx)[0], model(x, y)) < 0.03


def test_transformers_written_out_rmsnorm_is_fused(passes):
    from tests.models import tiny_hf_llama

    model, ids = tiny_hf_llama(), torch.randint(0, 512, (2, 8))
    gm, inputs, ctx = passes(model, ids)
    assert _count(gm, OPS.rmsnorm_quantize.default) == 4  # 2 norms x 2 layers
    assert _count(gm, OPS.silu_mul_quantize.default) == 2
    (eps,) = {n.args[2] for n in gm.graph.nodes if n.target is OPS.rmsnorm_quantize.default}
    assert eps == model.config.rms_norm_eps
    with torch.no_grad():
        out = gm(*inputs, *[p(inputs) for p in ctx.extra_inputs])
        logits = [o for o in out if isinstance(o, torch.Tensor) and o.shape[-1] == 512][0]
        assert rel_err(logits, model(ids).logits) < 0.12


def _run(gm, inputs, ctx):
    with torch.no_grad():
        return gm(*inputs, *[p(inputs) for p in ctx.extra_inputs])


@pytest.mark.parametrize("recipe", ["blockwise", "rowwise", "tensorwise"])
def test_projections_reading_one_input_become_one_gemm(passes, recipe):
    x = torch.randn(2, 8, 256)
    model = LlamaBlock()
    gm, inputs, ctx = passes(model, x, config={"recipe": recipe})
    # q/k/v and gate/up: two fused GEMMs; o_proj and down_proj stay alone.
    assert _count(gm, OPS.scaled_mm.default) == 4
    assert _count(gm, torch.narrow) == 5
    assert len(ctx.weight_caches) == 4 and len(ctx.extra_inputs) == 8
    assert [len(c.indices) for c in ctx.weight_caches].count(3) == 1
    fused = [n for n in gm.graph.nodes if n.target is OPS.scaled_mm.default
             and info(n).get("fused_from")]
    assert sorted(info(n)["fused_from"] for n in fused) == [
        ["gate_proj", "up_proj"], ["q_proj", "k_proj", "v_proj"]]
    groups = ctx.stats["fused_gemms"]
    assert len(groups) == 2 and "q_proj (256) + k_proj (256) + v_proj (256) = N 768" in groups[0]
    assert ("largest member" in groups[0]) == (recipe == "tensorwise")
    # Same weight memory as one cache per weight (scales included; tensorwise keeps one
    # scale per group: 3 fewer fp32 scales).
    ref_gm, ref_inputs, ref_ctx = passes(model, x, config={"recipe": recipe,
                                                            "fuse_projections": False})
    for key in ("weight_bytes", "quantized_weights"):
        assert ctx.stats[key] == ref_ctx.stats[key], key
    fewer = 3 * 4 if recipe == "tensorwise" else 0
    assert ctx.stats["fp8_weight_bytes"] == ref_ctx.stats["fp8_weight_bytes"] - fewer
    (y,), (y_ref,) = _run(gm, inputs, ctx), _run(ref_gm, ref_inputs, ref_ctx)
    if recipe == "tensorwise":
        # One weight scale for q/k/v (the largest): close, not equal.
        assert 0 < rel_err(y, y_ref) < 5e-3
    else:
        assert torch.equal(y, y_ref)  # row scales and 128x128 blocks stack exactly


class Projections(nn.Module):
    """Two projections of one input, then whatever ``use`` does with them."""

    def __init__(self, n=(256, 256), bias=False, use="sum"):
        super().__init__()
        self.a = nn.Linear(256, n[0], bias=bias)
        self.b = nn.Linear(256, n[1], bias=bias)
        self.use = use

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.use == "out":
            return a, b
        if self.use == "inplace":
            a.mul_(2)
        if self.use == "flatten":
            return torch.cat([a.view(-1), b.view(-1)])
        n = x.shape[0]
        return torch.cat([(a.view(n, -1, 64) * 2).reshape(n, -1), b + 1], -1)


@pytest.mark.parametrize("case, config, fused", [
    ("view", {}, True),
    ("bias", {}, False),
    ("blocks not multiple of 128", {}, False),
    ("rows not multiple of 128", {"recipe": "rowwise"}, True),
    ("output", {}, False),
    ("in place", {}, False),
    ("flattening view", {}, False),
    ("switched off", {"fuse_projections": False}, False),
])
def test_projections_left_alone_where_columns_do_not_fit(passes, case, config, fused):
    model = {
        "view": Projections(),
        "bias": Projections(bias=True),
        "blocks not multiple of 128": Projections(n=(256, 192)),
        "rows not multiple of 128": Projections(n=(256, 192)),
        "output": Projections(use="out"),
        "in place": Projections(use="inplace"),
        "flattening view": Projections(use="flatten"),
        "switched off": Projections(),
    }[case]
    x = torch.randn(4, 256)
    gm, inputs, ctx = passes(model, x, config={"rules": [], **config})
    assert _count(gm, OPS.scaled_mm.default) == (1 if fused else 2)
    assert bool(ctx.stats.get("fused_gemms")) == fused
    out = _run(gm, inputs, ctx)
    with torch.no_grad():
        want = model(x)
    for got, ref in zip(out, want if isinstance(want, tuple) else (want,)):
        assert rel_err(got, ref) < 0.06


def test_fused_weights_follow_each_members_version():
    # The stacked FP8 weight is requantized when any member's parameter changes.
    import fp8compile

    torch.manual_seed(0)
    model = LlamaBlock().eval()
    x = torch.randn(1, 4, 256)
    be = fp8compile.backend({"recipe": "rowwise"})
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        compiled(x)
        model.k_proj.weight.mul_(-1.5)  # in place: the version counter moves
        y = compiled(x)
        assert rel_err(y, model(x)) < 0.03
    assert "k_proj" in " ".join(be.plan.stats["fused_gemms"])


class ViewsOfProjections(nn.Module):
    """q/k projections of one input, viewed per head (fine for columns of a wider result) or
    with the last two dims merged (``merge=True``: not possible on those strides)."""

    def __init__(self, merge=False):
        super().__init__()
        self.q = nn.Linear(256, 256, bias=False)
        self.k = nn.Linear(256, 256, bias=False)
        self.merge = merge

    def forward(self, x):
        b, t, _ = x.shape
        q, k = self.q(x), self.k(x)
        if self.merge:
            return q.view(b, t * 256) + k.reshape(b, t * 256)
        return (q.view(b, t, 4, 64) * k.view(b, t, 4, 64)).sum(-1)


@pytest.mark.parametrize("merge", [False, True])
def test_projections_fused_with_dynamic_shapes(merge):
    # Symbolic batch and sequence sizes: views are checked for every size >= 2, so merging
    # t with the feature dim (possible only when t == 1) keeps the GEMMs apart.
    import fp8compile

    torch.manual_seed(0)
    model = ViewsOfProjections(merge).eval()
    be = fp8compile.backend({"recipe": "rowwise", "rules": []})
    compiled = torch.compile(model, backend=be, dynamic=True)
    with torch.no_grad():
        for shape in [(2, 8, 256), (3, 5, 256)]:
            x = torch.randn(shape)
            assert rel_err(compiled(x), model(x)) < 0.06
    assert len(be.plans) == 1  # one compile serves both shapes
    assert bool(be.plan.stats.get("fused_gemms")) is not merge


@pytest.mark.parametrize("inference", [False, True])
def test_plan_says_which_inputs_are_shared_fused_and_stacked(passes, inference):
    # The plan's reason for each FP8 linear says what ScalesPass and FusePass did to it.
    gm, _, ctx = passes(LlamaBlock(), torch.randn(2, 8, 256), inference=inference)
    why = {e.module: e.reason for e in ctx.plan_entries if e.is_fp8}
    assert "input quantized once, shared with k_proj, v_proj" in why["q_proj"]
    assert "input quantized once, shared with gate_proj" in why["up_proj"]
    for m in ("q_proj", "k_proj", "v_proj"):
        assert "input quantization fused into its rms_norm" in why[m], why[m]
    for m in ("gate_proj", "up_proj"):  # the MLP norm reads the residual stream's add
        assert "input quantization fused into its residual add + rms_norm" in why[m], why[m]
    assert "input quantization fused into its silu*mul" in why["down_proj"]
    assert "shared" not in why["o_proj"] and "fused" not in why["o_proj"]
    stacked = "one GEMM with q_proj, k_proj (stacked weights)" in why["v_proj"]
    assert stacked == inference  # projections are stacked in inference only


@pytest.mark.parametrize("inference", [False, True])
def test_producer_fusion_can_be_turned_off(passes, inference):
    # fuse_producers=False: every quantization reads the producer's output as the model
    # wrote it, in inference and in training (where lone linears then keep their own cast).
    model, x = LlamaBlock(), torch.randn(2, 8, 256)
    gm, inputs, ctx = passes(model, x, config={"fuse_producers": False}, inference=inference)
    fused = (OPS.rmsnorm_quantize.default, OPS.silu_mul_quantize.default)
    assert not any(n.target in fused for n in gm.graph.nodes)
    assert ctx.stats["fused_quantizations"] == 0
    assert not any("fused into" in e.reason for e in ctx.plan_entries if e.is_fp8)
    if inference:
        assert rel_err(_run(gm, inputs, ctx)[0], model(x)) < 0.03
    else:  # down_proj alone keeps the self-quantizing linear
        assert _count(gm, OPS.linear.default) == 2 and _count(gm, OPS.linear_q.default) == 5


def test_plan_says_which_producers_run_inside_the_fused_ops(passes):
    # Inference: the norms and the SiLU·mul whose output a fused op quantizes no longer run
    # on their own, and their rows say where they run.  The residual add the MLP norm reads
    # runs inside its fused op and stays in the graph for the block's last add; that add
    # does not.
    _, _, ctx = passes(LlamaBlock(), torch.randn(2, 8, 256))
    why = {e.name: e.reason for e in ctx.plan_entries}
    op = {e.name: e.op for e in ctx.plan_entries}
    norms = [n for n in why if op[n] == "rms_norm"]  # in graph order
    adds = [n for n in why if op[n] == "add"]
    assert len(norms) == 2 and len(adds) == 2
    assert why[norms[0]].endswith("; runs inside the fused rms_norm -> FP8 op"), why
    assert why[norms[1]].endswith("; runs inside the fused residual add + rms_norm -> FP8 op")
    assert why[adds[0]].endswith("; also computed inside the fused residual add + rms_norm"
                                 " -> FP8 op")
    assert "inside" not in why[adds[1]]
    silu_mul = [n for n in why if op[n] in ("silu", "mul")]
    assert len(silu_mul) == 2
    for name in silu_mul:
        assert why[name] == "no GEMM: runs inside the fused silu*mul -> FP8 op (fp32 inside)"


@pytest.mark.parametrize("config", [{}, {"recipe": "tensorwise", "scaling": "delayed"}])
def test_plan_says_runs_inside_only_of_nodes_the_graph_dropped(passes, config):
    # Training: the producers stay in the graph (linear_q carries their output for the
    # gradient), so their rows keep their reasons; the residual add is still noted.
    gm, _, ctx = passes(LlamaBlock(), torch.randn(2, 8, 256), config=config, inference=False)
    names = {n.name for n in gm.graph.nodes}
    inside = [e for e in ctx.plan_entries if "runs inside the fused" in e.reason]
    assert all(e.name not in names for e in inside)
    assert any("also computed inside the fused residual add + rms_norm" in e.reason
               for e in ctx.plan_entries if e.op == "add")


def test_plan_keeps_producers_as_they_are_without_fusion(passes):
    _, _, ctx = passes(LlamaBlock(), torch.randn(2, 8, 256), config={"fuse_producers": False})
    assert not any("inside the fused" in e.reason for e in ctx.plan_entries)


@pytest.mark.parametrize("gran", ["block", "row", "tensor"])
def test_weight_cache_quantizes_with_the_reference_numerics(gran, monkeypatch,
                                                            quantize_rows_seen):
    """An inference weight is quantized by numerics (no Triton kernel JIT-compiled for it
    while compiling), with the bits the quantization op gives, in row slices."""
    from fp8compile import numerics as nx
    from fp8compile.kernels import quant
    from fp8compile.passes.scales import WeightCache

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randn(400, 384, device=device, dtype=torch.bfloat16)
    slices = quantize_rows_seen
    monkeypatch.setattr(nx.quantize_by_rows, "__defaults__", (nx.Fp8Format.E4M3, False, 128))
    monkeypatch.setattr(quant, "quantize", lambda *a, **k: pytest.fail("Triton kernel used"))
    got = WeightCache([0], [False], gran, "e4m3", False).get([w])
    if gran != "tensor":
        assert slices == [128, 128, 128, 16]
    monkeypatch.undo()
    want = OPS.quantize(w, gran, "e4m3", False)  # the Triton kernel on a GPU
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(got[1], want[1]) and got[1].stride() == want[1].stride()
    with pytest.raises(ValueError, match="weight has dtype torch.int32"):
        WeightCache([0], [False], gran, "e4m3", False).get([w.int()])
