"""DecomposePass: nn.MultiheadAttention's and nn.TransformerEncoderLayer's fused calls taken
apart into linears, attention and norms, computing what the modules compute."""

import copy

import pytest
import torch
from torch import nn

import fp8compile
from fp8compile import Fp8Config
from fp8compile.passes import CompileContext, DecomposePass, PassManager
from fp8compile.passes.decompose import _ENCODER, _MHA
from fp8compile.passes.manager import module_of
from tests.models import rel_err
from tests.passes.conftest import capture


def _decomposed(model, *args, grad=False):
    """(graph module after DecomposePass, its inputs, the context) for ``model(*args)``."""
    if grad:
        got = []
        torch.compile(model, backend=lambda gm, ex: got.append((gm, ex)) or gm.forward,
                      dynamic=False)(*args)
        gm, inputs = got[0]
    else:
        gm, inputs = capture(model, *args)
    ctx = CompileContext(Fp8Config(), inputs, not grad)
    PassManager([DecomposePass(ctx)])(gm)
    torch._dynamo.reset()
    return gm, inputs, ctx


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _linears(gm):
    return [n for n in gm.graph.nodes if n.target is torch.nn.functional.linear]


def _encoder(norm_first=False, activation="relu", layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, activation=activation,
                                       batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    with torch.no_grad():  # norms that are not the identity on a normalized input
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "both"])
def test_encoder_fast_path_is_taken_apart(norm_first, activation, masks):
    """The inference fast path (one torch._transformer_encoder_layer_fwd per layer) becomes
    four linears per layer named after their modules, with the layer's output unchanged."""
    model = _encoder(norm_first, activation)
    x = torch.randn(3, 10, 128)
    kwargs = {}
    if masks in ("padding", "both"):
        pad = torch.zeros(3, 10, dtype=torch.bool)
        pad[1, 7:] = pad[2, 4:] = True
        # with a float causal mask, a float padding mask (mixed types are deprecated)
        kwargs["src_key_padding_mask"] = pad if masks == "padding" else \
            torch.zeros(3, 10).masked_fill(pad, float("-inf"))
    if masks in ("causal", "both"):
        kwargs["mask"] = nn.Transformer.generate_square_subsequent_mask(10)
        kwargs["is_causal"] = True  # else the encoder compares the mask: a graph break

    class Call(nn.Module):  # the masks as constants of the traced call
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x, **kwargs)

    gm, inputs, ctx = _decomposed(Call(), x)
    assert _ENCODER not in _targets(gm)
    assert len(ctx.stats["decomposed"]) == 2 and "kept_whole" not in ctx.stats
    names = sorted(module_of(n)[0] for n in _linears(gm))
    assert names == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn", "self_attn.out_proj", "linear1", "linear2"))
    with torch.no_grad():
        (got,) = gm(*inputs)
        want = model(x, **kwargs)
    assert rel_err(got, want) < 1e-5


class _Attention(nn.Module):
    def __init__(self, batch_first=True, kdim=None, bias=True, **mha):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(128, 4, batch_first=batch_first, kdim=kdim,
                                          vdim=kdim, bias=bias, **mha)
        self.call, self.read_weights = {}, False

    def forward(self, q, k, v):
        out, weights = self.attn(q, k, v, **self.call)
        return (out, weights) if self.read_weights else out


def _mask_cases():
    causal = nn.Transformer.generate_square_subsequent_mask(10)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 6:] = True
    return {
        "none": {},
        "padding": {"key_padding_mask": pad},
        "float padding": {"key_padding_mask": torch.zeros(3, 10).masked_fill(pad, -1e4)},
        "bool 2-D": {"attn_mask": causal == float("-inf")},
        "causal": {"attn_mask": causal, "is_causal": True},
        "3-D and padding": {"attn_mask": torch.randn(12, 10, 10),
                            "key_padding_mask": torch.zeros(3, 10).masked_fill(pad, -1e4)},
        "weights unread": {"need_weights": True},
        "causal, weights unread": {"attn_mask": causal, "is_causal": True,
                                   "need_weights": True},
        # the hint wins over the mask where the call uses scaled dot-product attention ...
        "is_causal hint, other mask": {"attn_mask": torch.randn(10, 10), "is_causal": True},
        # ... and the mask wins where it does not
        "is_causal hint, other mask, weights unread": {
            "attn_mask": torch.randn(10, 10), "is_causal": True, "need_weights": True},
    }


@pytest.mark.parametrize("case", list(_mask_cases()))
@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_is_taken_apart(case, batch_first):
    model = _Attention(batch_first).eval()
    model.call = {"need_weights": False, **_mask_cases()[case]}
    x = torch.randn(3, 10, 128) if batch_first else torch.randn(10, 3, 128)
    gm, inputs, ctx = _decomposed(model, x, x, x)
    assert _MHA not in _targets(gm) and len(ctx.stats["decomposed"]) == 1
    assert [module_of(n)[0] for n in _linears(gm)] == ["attn", "attn.out_proj"]
    with torch.no_grad():
        (got,) = gm(*inputs)
        want = model(x, x, x)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("kind", ["q != k = v", "q != k != v", "kdim != embed_dim",
                                  "no bias"])
def test_cross_attention_is_taken_apart(kind):
    model = _Attention(kdim=96 if kind == "kdim != embed_dim" else None,
                       bias=kind != "no bias").eval()
    model.call = {"need_weights": False}
    q = torch.randn(3, 10, 128)
    k = torch.randn(3, 7, 96 if kind == "kdim != embed_dim" else 128)
    v = k if kind != "q != k != v" else torch.randn(3, 7, 128)
    if kind == "no bias":
        k = v = q
    gm, inputs, _ = _decomposed(model, q, k, v)
    assert _MHA not in _targets(gm)
    assert len(_linears(gm)) == (2 if kind == "no bias" else 4)
    with torch.no_grad():
        (got,) = gm(*inputs)
        want = model(q, k, v)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("kind,why", [
    ("read weights", "its attention weights are read"),
    ("add_bias_kv", "bias_k is set"),
    ("add_zero_attn", "add_zero_attn=True"),
])
def test_calls_attention_cannot_express_are_kept_whole(kind, why):
    mha = {"add_bias_kv": kind == "add_bias_kv", "add_zero_attn": kind == "add_zero_attn"}
    model = _Attention(**mha).eval()
    model.call = {"need_weights": kind == "read weights"}
    model.read_weights = kind == "read weights"
    x = torch.randn(3, 10, 128)
    gm, inputs, ctx = _decomposed(model, x, x, x)
    assert _MHA in _targets(gm) and "decomposed" not in ctx.stats
    (line,) = ctx.stats["kept_whole"]
    assert line.startswith("attn: F.multi_head_attention_forward") and why in line


def test_training_attention_trains_through_the_parts():
    """In training (grad on, dropout 0) the gradients of the taken-apart graph are those of
    the module."""
    model = _Attention().train()
    model.call = {"need_weights": False}
    x = torch.randn(3, 10, 128, requires_grad=True)
    gm, inputs, _ = _decomposed(model, x, x, x, grad=True)
    assert _MHA not in _targets(gm)
    (got,) = gm(*inputs)
    got.square().sum().backward()
    g_got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x, x, x).square().sum().backward()
    for n, p in model.named_parameters():
        assert rel_err(g_got[n], p.grad) < 1e-5, n


def test_compiled_encoder_runs_its_gemms_in_fp8():
    """Through the backend: every projection of an nn.TransformerEncoder is an FP8 GEMM
    (there were none), the plan says what was taken apart, and the output stays close."""
    model = _encoder()
    x = torch.randn(2, 64, 128)
    be = fp8compile.backend({"min_weight_numel": 0})
    with torch.no_grad():
        got = torch.compile(model, backend=be)(x)
        want = model(x)
    plan = be.plan
    assert len(plan.fp8) == 8 and {e.module for e in plan.fp8} == {
        f"layers.{i}.{m}" for i in range(2)
        for m in ("self_attn", "self_attn.out_proj", "linear1", "linear2")}
    text = plan.summary()
    assert "fused PyTorch calls taken apart" in text and "layers.1: torch._transformer" in text
    assert rel_err(got, want) < 0.05


@pytest.mark.skipif(torch.__version__ < "2.13",
                    reason="torch 2.11's Dynamo hands no graph of nn.TransformerEncoder over "
                           "with dynamic=True: the encoder runs eagerly (H200 run)")
def test_dynamic_shapes_one_graph_and_dynamos_restart_passes_through():
    """``dynamic=True``: the layer norms' eps reaches the graph as a symbolic float, which
    Inductor asks Dynamo to specialize by restarting the trace.  The backend lets that
    request through once (it used to take it for a failed compile and compile again with
    opaque FP8 ops) and keeps no plan of the abandoned trace; then one graph serves every
    shape."""
    model = _encoder()
    be = fp8compile.backend({"min_weight_numel": 0})
    cm = torch.compile(model, backend=be, dynamic=True)
    with torch.no_grad():
        for batch, tokens in ((2, 16), (3, 40), (5, 24)):
            x = torch.randn(batch, tokens, 128)
            assert rel_err(cm(x), model(x)) < 0.05
    assert len(be.plans) == 1 and len(be.plan.fp8) == 8
    assert "inline_failed" not in be.plan.stats


class _Einsum(nn.Module):
    def __init__(self, equation, weight_first=False, stored="nk"):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(*((384, 256) if stored == "nk" else (256, 384))) * 0.05)
        self.equation, self.weight_first = equation, weight_first

    def forward(self, x):
        ops = (self.w, x) if self.weight_first else (x, self.w)
        return torch.einsum(self.equation, *ops) + 1


@pytest.mark.parametrize("equation,weight_first,stored", [
    ("bld,hd->blh", False, "nk"),
    ("...d,hd->...h", False, "nk"),
    ("bld,dh->blh", False, "kn"),
    ("hd, bld -> blh", True, "nk"),
    ("dh,...d->...h", True, "kn"),
])
def test_einsum_by_a_weight_is_a_linear(equation, weight_first, stored):
    """An einsum that multiplies an activation by a 2-D parameter over its last dim was one
    opaque call; it is now F.linear (or a matmul by the (K, N) weight), so its weight is
    quantized once as a linear's is."""
    model = _Einsum(equation, weight_first, stored)
    x = torch.randn(2, 16, 256)
    gm, inputs, ctx = _decomposed(model, x)
    assert torch.einsum not in _targets(gm)
    (line,) = ctx.stats["decomposed"]
    assert "torch.einsum" in line
    with torch.no_grad():
        (got,) = gm(*inputs)
        assert rel_err(got, model(x)) < 1e-5
    be = fp8compile.backend({"rules": []})
    with torch.no_grad():
        torch.compile(model, backend=be)(x)
    (entry,) = be.plan.fp8
    assert "weight quantized once per parameter version" in entry.reason


@pytest.mark.parametrize("equation", ["bld,hd->bhl", "bld,ld->bl", "bld,hd->blhd",
                                      "bld,dd->bld"])
def test_other_einsums_are_left_alone(equation):
    model = _Einsum(equation)
    if equation.startswith("bld,ld"):
        model.w = nn.Parameter(torch.randn(16, 256))
    if "dd" in equation:
        model.w = nn.Parameter(torch.randn(256, 256))
    x = torch.randn(2, 16, 256)
    gm, inputs, ctx = _decomposed(model, x)
    assert torch.einsum in _targets(gm) and "decomposed" not in ctx.stats


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: bf16 attention "
                    "kernels and PyTorch's fused encoder kernel")
@pytest.mark.parametrize("block", ["encoder", "mha"])
def test_gpu_taken_apart_in_bf16_matches_pytorchs_fused_call(block):
    """On the GPU, in bf16, with every GEMM kept bf16 by an override: the graph taken apart
    (flash/efficient attention with a padding mask, Inductor's fused norms) is as close to
    an fp32 run as PyTorch's own fused kernels are."""
    pad = torch.zeros(4, 64, dtype=torch.bool, device="cuda")
    pad[1, 40:] = pad[3, 10:] = True
    if block == "encoder":
        ref = _encoder().cuda()

        def run(m, t):
            return m(t, src_key_padding_mask=pad)
    else:
        ref = _Attention().cuda().eval()
        ref.call = {"need_weights": False, "key_padding_mask": pad}

        def run(m, t):
            return m(t, t, t)
    model = copy.deepcopy(ref).bfloat16()
    x = torch.randn(4, 64, 128, device="cuda")
    be = fp8compile.backend({"overrides": {"*": "bf16"}})
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        want = run(ref, x)
        eager = rel_err(run(model, x.bfloat16()).float(), want)
        got = rel_err(run(compiled, x.bfloat16()).float(), want)
    assert be.plan.stats["decomposed"] and not be.plan.fp8
    assert got <= 1.5 * eager + 1e-3, (got, eager)
