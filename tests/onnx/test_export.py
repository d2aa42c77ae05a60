"""export_onnx: standard FLOAT8 QDQ that onnxruntime and the ONNX reference runtime run.

The FP8 bound used here: both GEMM operands rounded to E4M3 (relative rounding error at most
1/16 each) — random data cancels most of it; the block's output, with its residual stream in
FP32, stays within 5e-2 of FP32 (measured: about 1.1e-2 for every recipe).
"""

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import fp8compile
from fp8compile.onnx import export_onnx, fp8_model, run, session
from tests.models import LlamaBlock, rel_err

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8_TYPES = {onnx.TensorProto.FLOAT8E4M3FN}


def _static_amax(model, x):
    amax = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda mod, inp, out, n=n: amax.__setitem__(n, float(inp[0].detach().abs().max()))
        )
        for n in LINEARS
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return amax


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return LlamaBlock(d=256, heads=4, ffn=512).eval(), torch.randn(2, 16, 256)


def _config(name, model, x):
    if name == "tensorwise-static":
        amax = _static_amax(model, x)
        return {"recipe": "tensorwise", "scaling": "static", "static_scales": amax}
    return {"recipe": name}


@pytest.fixture(scope="module")
def fp32_file_bytes(block, tmp_path_factory):
    model, x = block
    path = tmp_path_factory.mktemp("fp32") / "fp32.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False)
    return path.stat().st_size


@pytest.mark.parametrize("recipe", ["blockwise", "rowwise", "tensorwise", "tensorwise-static"])
def test_block_exports_and_matches(block, recipe, tmp_path, fp32_file_bytes):
    model, x = block
    report = export_onnx(model, (x,), tmp_path / "m.onnx", _config(recipe, model, x))
    assert sorted(report.fp8_layers) == sorted(LINEARS)
    assert report.kept_layers == []
    assert report.ir_version <= 10 and report.opset == 21

    proto = onnx.load(report.path)
    onnx.checker.check_model(proto, full_check=True)
    fp8 = [t for t in proto.graph.initializer if t.data_type in FP8_TYPES]
    linear_numel = sum(model.get_submodule(n).weight.numel() for n in LINEARS)
    # one byte per linear weight, i.e. a quarter of their FP32 bytes
    assert sum(int(np.prod(t.dims)) for t in fp8 if len(t.dims) == 2) == linear_numel
    assert report.fp8_initializer_bytes * 4 >= 4 * linear_numel
    ops = {n.op_type for n in proto.graph.node}
    assert {"DequantizeLinear", "QuantizeLinear", "MatMul"} <= ops
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    # linear weights dominate this block: the file is about a quarter of the FP32 export
    assert report.file_bytes < 0.35 * fp32_file_bytes

    assert report.err_vs_torch_fp8 <= 1e-3
    assert report.err_vs_fp32 <= 5e-2


def test_dynamic_batch_and_sequence(block, tmp_path):
    model, x = block
    report = export_onnx(model, (x,), tmp_path / "m.onnx", {"recipe": "blockwise"})
    sess = session(report.path)
    fp8 = fp8_model(model, (x,), {"recipe": "blockwise"})
    for shape in [(1, 7, 256), (3, 33, 256)]:
        xi = torch.randn(*shape)
        got = torch.from_numpy(run(sess, (xi,))[0])
        assert got.shape == shape
        with torch.no_grad():
            assert rel_err(got, fp8(xi)) <= 1e-3
            assert rel_err(got, model(xi)) <= 5e-2


def test_reference_evaluator_agrees_with_ort(tmp_path):
    from onnx.reference import ReferenceEvaluator

    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 128)).eval()
    x = torch.randn(4, 256)
    cfg = {"recipe": "blockwise", "min_weight_numel": 1, "rules": []}
    for recipe in ("blockwise", "rowwise"):  # both: blocked and per-axis FP8 QDQ
        cfg["recipe"] = recipe
        report = export_onnx(model, (x,), tmp_path / f"{recipe}.onnx", cfg)
        assert len(report.fp8_layers) == 2
        ort_out = run(report.path, (x,))[0]
        ref = ReferenceEvaluator(report.path)
        ref_out = ref.run(None, {ref.input_names[0]: x.numpy()})[0]
        assert rel_err(torch.from_numpy(ref_out), torch.from_numpy(ort_out)) <= 1e-5


def test_session_options_for_static_qdq(block, tmp_path):
    """onnxruntime before 1.32, at its default level, fuses Q→DQ→MatMul into the int8-only
    MatMulIntegerToFloat and fails to load the file; 1.32 leaves FP8 QDQ alone (measured:
    1.31.0 raises, 1.32.0 runs it). The options of :func:`session` run it on either."""
    import onnxruntime as ort

    model, x = block
    cfg = _config("tensorwise-static", model, x)
    report = export_onnx(model, (x,), tmp_path / "m.onnx", cfg, validate=False)
    got = torch.from_numpy(run(report.path, (x,))[0])
    with torch.no_grad():
        assert rel_err(got, model(x)) <= 5e-2
    if tuple(int(v) for v in ort.__version__.split(".")[:2]) < (1, 32):
        with pytest.raises(Exception, match="MatMulIntegerToFloat|float8"):
            ort.InferenceSession(report.path).run(None, {"x": x.numpy()})
    else:  # same numbers; only where the weights are dequantized differs (6e-7 measured)
        plain = ort.InferenceSession(report.path).run(None, {"x": x.numpy()})[0]
        assert rel_err(torch.from_numpy(plain), got) <= 1e-5


class _Unsupported(nn.Module):
    """A linear with K=320 (no whole 1x128 groups), a bmm between activations, a plain one
    and an output head (which the plan keeps high precision)."""

    def __init__(self):
        super().__init__()
        self.odd = nn.Linear(320, 256)
        self.proj = nn.Linear(256, 256)
        self.head = nn.Linear(256, 256)

    def forward(self, x):
        h = self.odd(x)
        a = torch.bmm(h, h.transpose(1, 2)) / 16.0
        return self.head(torch.relu(self.proj(torch.bmm(a, h))))


class _WeightMatmul(nn.Module):
    """``h @ self.w.t()``: an FP8 GEMM by a cached weight when compiled, but no layer the
    export can swap."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(256, 256)
        self.w = nn.Parameter(torch.randn(256, 256) * 0.05)
        self.head = nn.Linear(256, 256)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x) @ self.w.t()))


def test_matmul_by_a_parameter_stays_high_precision_and_says_why(tmp_path):
    model = _WeightMatmul().eval()
    report = export_onnx(model, (torch.randn(2, 32, 256),), tmp_path / "m.onnx")
    assert report.fp8_layers == ["proj"]
    kept = dict(report.kept_layers)
    assert kept["matmul"].startswith("matmul by a parameter outside an nn.Linear")
    assert report.err_vs_torch_fp8 <= 1e-3


class _WithEncoder(nn.Module):
    """A projection, then PyTorch's fused encoder layer, then a head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(256, 256)
        layer = nn.TransformerEncoderLayer(256, 4, 512, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(256, 256)

    def forward(self, x):
        return self.head(self.enc(self.proj(x)))


def test_layers_inside_a_fused_encoder_call_stay_high_precision_and_say_why(tmp_path):
    """The plan runs the encoder layer's projections in FP8 (its fused call taken apart); the
    export swaps layers, and these are read by the fused call, not called: swapping them made
    the export fail ('Fp8ExportLinear' object has no attribute 'weight')."""
    model = _WithEncoder().eval()
    x = torch.randn(2, 16, 256)
    report = export_onnx(model, (x,), tmp_path / "m.onnx")
    assert report.fp8_layers == ["proj"]
    kept = dict(report.kept_layers)
    for name in ("self_attn", "self_attn.out_proj", "linear1", "linear2"):
        assert "inside a torch._transformer_encoder_layer_fwd call" in kept[
            f"enc.layers.0.{name}"]
    assert report.err_vs_torch_fp8 <= 1e-3
    with torch.no_grad():  # and the PyTorch FP8 model runs the fused call as it is
        assert rel_err(fp8_model(model, x)(x), model(x)) < 0.05


def test_unsupported_pieces_stay_high_precision(tmp_path):
    model = _Unsupported().eval()
    x = torch.randn(2, 32, 320)
    cfg = {"recipe": "blockwise", "min_weight_numel": 1024}  # the plan makes both bmms FP8
    report = export_onnx(model, (x,), tmp_path / "m.onnx", cfg)
    kept = dict(report.kept_layers)
    plan = fp8compile.plan(model, x, config=fp8compile.Fp8Config.from_dict(cfg))
    bmm_fp8 = [e for e in plan if e.gemm and e.gemm != "linear" and e.is_fp8]
    assert len(bmm_fp8) == 2
    for e in bmm_fp8:  # FP8 in the plan, high precision in the file, and said so
        assert (e.module or e.name) in kept
    assert "proj" in report.fp8_layers and "head" not in report.fp8_layers
    # K=320 has a partial last 1x128 group: exported FP8 (partial groups) or kept, with why
    assert ("odd" in report.fp8_layers) != ("odd" in kept)
    if "odd" in kept:
        assert "K=320" in kept["odd"]
    assert report.err_vs_torch_fp8 <= 1e-3
    # the FP8 error is the model's own (two chained FP8 layers here), not the export's
    assert report.err_vs_fp32 <= 1.05 * report.torch_fp8_vs_fp32 + 1e-3 <= 0.1


def test_tensorrt_target_refuses_blockwise_naming_the_layer(block, tmp_path):
    model, x = block
    with pytest.raises(ValueError, match="q_proj.*blockwise"):
        export_onnx(model, (x,), tmp_path / "m.onnx", {"recipe": "blockwise"}, target="tensorrt")
    with pytest.raises(ValueError, match="q_proj.*dynamic"):
        export_onnx(model, (x,), tmp_path / "m.onnx", {"recipe": "tensorwise"}, target="tensorrt")


def test_tensorrt_target_static_tensorwise(block, tmp_path):
    model, x = block
    cfg = _config("tensorwise-static", model, x)
    report = export_onnx(model, (x,), tmp_path / "m.onnx", cfg, target="tensorrt")
    proto = onnx.load(report.path)
    producers = {o: n for n in proto.graph.node for o in n.output}
    # every FP8 MatMul reads DequantizeLinear on both inputs
    qdq_matmuls = [
        n for n in proto.graph.node
        if n.op_type == "MatMul"
        and all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                for i in n.input)
    ]
    assert len(qdq_matmuls) == len(LINEARS)
    assert report.err_vs_torch_fp8 <= 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"opset": 18}, "opset=18"),
        ({"opset": 20}, "opset=20"),  # blockwise needs block_size
        ({"target": "tflite"}, "target='tflite'"),
    ],
)
def test_bad_arguments(block, tmp_path, kwargs, match):
    model, x = block
    with pytest.raises(ValueError, match=match):
        export_onnx(model, (x,), tmp_path / "m.onnx", {"recipe": "blockwise"}, **kwargs)


def test_opset19_tensorwise(block, tmp_path):
    """FP8 QDQ exists from opset 19; per-tensor scales need nothing newer."""
    model, x = block
    report = export_onnx(model, (x,), tmp_path / "m.onnx", {"recipe": "tensorwise"}, opset=19)
    assert report.opset == 19 and len(report.fp8_layers) == len(LINEARS)
    assert report.err_vs_torch_fp8 <= 1e-3


def test_tiny_hf_llama(tmp_path):
    """A transformers LlamaForCausalLM: every decoder linear FP8, embedding and lm_head FP32.

    ORT and PyTorch compute the same FP8 model but round the FP32 parts differently (about
    5e-7). An activation on an FP8 rounding boundary then rounds one FP8 step apart; causal
    attention carries that to every later token, and if it moves a tensor's amax, the
    tensorwise scale moves for the whole batch. ORT vs PyTorch FP8 is therefore chaotic in the
    draw: 4e-7 .. 3.8e-2 over 36 draws of weights and inputs, at most about half the FP8 error
    itself (about 7e-2) and asserted below it. What holds tightly for every draw is that
    ORT carries the FP8 error, no more and no less: its error vs FP32 is PyTorch FP8's to
    within 0.3% (asserted 5%). A file whose positions stop at the export's length (16) misses
    that 15-fold on 40 tokens, and a path left unquantized falls short of it.
    """
    from tests.models import tiny_hf_llama

    model = tiny_hf_llama()
    model.config.use_cache = False
    ids = torch.randint(0, 512, (2, 16))
    report = export_onnx(model, (ids,), tmp_path / "llama.onnx", {"recipe": "tensorwise"})
    assert len(report.fp8_layers) == 14 and report.kept_layers == []
    weights = sum(
        m.weight.numel() for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n in report.fp8_layers
    )
    # one byte per FP8 weight (plus FP8 zero-point constants of a few bytes)
    assert weights <= report.fp8_initializer_bytes <= weights + 64

    def same_fp8_error(vs_torch_fp8, vs_fp32, torch_fp8_vs_fp32):
        assert vs_torch_fp8 < torch_fp8_vs_fp32, f"{vs_torch_fp8=} {torch_fp8_vs_fp32=}"
        assert abs(vs_fp32 / torch_fp8_vs_fp32 - 1) <= 0.05, f"{vs_fp32=} {torch_fp8_vs_fp32=}"

    same_fp8_error(report.err_vs_torch_fp8, report.err_vs_fp32, report.torch_fp8_vs_fp32)
    # another batch size and length than the export's: the file's shapes are dynamic
    fp8 = fp8_model(model, (ids,), {"recipe": "tensorwise"})
    ids2 = torch.randint(0, 512, (3, 40))
    with torch.no_grad():
        ort = torch.from_numpy(run(report.path, (ids2,))[0])
        torch_fp8, ref = fp8(ids2).logits, model(ids2).logits
    same_fp8_error(rel_err(ort, torch_fp8), rel_err(ort, ref), rel_err(torch_fp8, ref))


class _GroupedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(256, 256)
        self.experts = _Grouped()

    def forward(self, x, offs):
        return self.experts(self.proj(x), offs)


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 256, 256) * 0.05)

    def forward(self, x, offs):
        return torch.nn.functional.grouped_mm(x, self.w.transpose(-2, -1), offs=offs)


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"),
                    reason="this torch has no torch.nn.functional.grouped_mm")
def test_grouped_gemm_stays_high_precision_in_the_file_and_says_why():
    from fp8compile.onnx.modules import swap_fp8_linears

    model = _GroupedExperts().bfloat16().eval()  # torch's grouped GEMM takes bf16
    x = torch.randn(12, 256, dtype=torch.bfloat16)
    offs = torch.tensor([4, 8, 12], dtype=torch.int32)
    cfg = fp8compile.Fp8Config()
    plan = fp8compile.plan(model, x, offs, config=cfg)
    assert {e.module for e in plan.fp8} == {"proj", "experts"}  # FP8 when compiled
    done = swap_fp8_linears(copy.deepcopy(model), plan, cfg, "ort")
    kept = dict(done.kept)
    assert done.fp8 == ["proj"] and "ONNX has no grouped GEMM" in kept["experts"]
