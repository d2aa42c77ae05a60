"""The ONNX translations of the fp8compile ops against the ops themselves (CPU reference).

Quantization is compared exactly: the translated scale arithmetic is that of
``numerics.compute_scale`` (an IEEE division, power-of-two rounding corrected to exact), so
onnxruntime must produce the same FP8 payloads and the same fp32 scales bit for bit, including
the NaN/Inf rules (amax over finite values, ±Inf → NaN in E4M3FN) and partial 1x128 groups.
The GEMM translation is compared with (atol, rtol) = (1e-5, 1e-5): same products, fp32 sums in
another order.
"""

import numpy as np
import pytest
import torch
from torch import nn

import fp8compile.ops  # noqa: F401  (registers the ops)
from fp8compile import numerics as nx
from fp8compile.onnx import reference_outputs, run
from fp8compile.onnx.translate import translation_table

OPS = torch.ops.fp8compile


class _Quantize(nn.Module):
    def __init__(self, granularity: str, power_of_2: bool):
        super().__init__()
        self.granularity, self.power_of_2 = granularity, power_of_2

    def forward(self, x):
        q, s = OPS.quantize(x, self.granularity, "e4m3", self.power_of_2)
        return q.float(), s


def _export(module, args, path, opset=21, target="ort"):
    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset,
                      custom_translation_table=translation_table(opset, target),
                      external_data=False, verbose=False)
    return str(path)


def _hard_input(k: int) -> torch.Tensor:
    """Rows: ordinary, all-zero, with NaN, with ±Inf, tiny, huge; K not always 128-aligned."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, k)
    x[0, 1] = 0.0
    x[0, 2, 5] = float("nan")
    x[1, 0, 3], x[1, 0, k - 1] = float("inf"), float("-inf")
    x[1, 1] *= 1e-30
    x[1, 2] *= 1e30
    return x


@pytest.mark.parametrize("granularity", ["tensor", "row", "group"])
@pytest.mark.parametrize("k, power_of_2", [(256, False), (200, True)])
def test_quantize_bit_exact(tmp_path, granularity, k, power_of_2):
    x = _hard_input(k)
    if granularity == "tensor":
        x = torch.nan_to_num(x, nan=1.0, posinf=3.0, neginf=-3.0)[:, :2]  # one tensor scale
    mod = _Quantize(granularity, power_of_2)
    path = _export(mod, (x,), tmp_path / "q.onnx")
    want_q, want_s = mod(x)
    got_q, got_s = (torch.from_numpy(a) for a in run(path, (x,)))
    assert got_s.shape == want_s.shape
    torch.testing.assert_close(got_s, want_s, rtol=0, atol=0)
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0, equal_nan=True)
    if granularity != "tensor":
        # a NaN or Inf damages only its own element; the all-zero row gives zeros
        assert torch.isnan(got_q).sum() == 3 and (got_q[0, 1] == 0).all()
    if power_of_2:
        assert torch.equal(torch.exp2(torch.log2(got_s).round()), got_s)


def test_quantize_reference_evaluator_agrees(tmp_path):
    x = _hard_input(200)
    path = _export(_Quantize("group", False), (x,), tmp_path / "q.onnx")
    ort_q, ort_s = run(path, (x,))
    ref_q, ref_s = reference_outputs(path, (x,))
    np.testing.assert_array_equal(ref_s, ort_s)
    np.testing.assert_array_equal(ref_q, ort_q)


class _ScaledMM(nn.Module):
    def __init__(self, recipe: str, activation: str, n: int = 192, k: int = 320):
        super().__init__()
        self.xg = {"blockwise": "group", "rowwise": "row", "tensorwise": "tensor"}[recipe]
        self.wg = {"blockwise": "block", "rowwise": "row", "tensorwise": "tensor"}[recipe]
        self.activation = activation
        wq, ws = nx.quantize(torch.randn(n, k) / k**0.5, nx.Granularity(self.wg))
        self.register_buffer("wq", wq)
        self.register_buffer("ws", ws)
        self.register_buffer("bias", torch.randn(n))

    def forward(self, x, residual):
        xq, xs = OPS.quantize(x, self.xg, "e4m3", False)
        return OPS.scaled_mm(xq, xs, self.xg, self.wq, self.ws, self.wg, self.bias, x.dtype,
                             "precise", self.activation, residual)


@pytest.mark.parametrize("recipe, activation", [
    ("blockwise", "gelu"), ("rowwise", "silu"), ("tensorwise", "relu"), ("blockwise", "none"),
])
def test_scaled_mm_with_epilogue(tmp_path, recipe, activation):
    """N=192, K=320: partial 128x128 weight blocks on both axes, partial activation groups."""
    torch.manual_seed(1)
    mod = _ScaledMM(recipe, activation)
    x, res = torch.randn(2, 5, 320), torch.randn(2, 5, 192)
    path = _export(mod, (x, res), tmp_path / "mm.onnx")
    got = torch.from_numpy(run(path, (x, res))[0])
    torch.testing.assert_close(got, mod(x, res), atol=1e-5, rtol=1e-5)


class _TwoResiduals(_ScaledMM):
    def forward(self, x, r1, r2):
        xq, xs = OPS.quantize(x, self.xg, "e4m3", False)
        return OPS.scaled_mm(xq, xs, self.xg, self.wq, self.ws, self.wg, None, x.dtype,
                             "fast", "none", r1, r2)


def test_scaled_mm_with_two_residuals(tmp_path):
    """A residual stream's two terms (EpiloguePass): Add(Add(r1, r2), product) in fp32."""
    torch.manual_seed(2)
    mod = _TwoResiduals("rowwise", "none")
    args = (torch.randn(2, 5, 320), torch.randn(2, 5, 192), torch.randn(2, 5, 192))
    path = _export(mod, args, tmp_path / "mm2.onnx")
    got = torch.from_numpy(run(path, args)[0])
    torch.testing.assert_close(got, mod(*args), atol=1e-5, rtol=1e-5)
    without_r2 = mod(args[0], args[1], torch.zeros_like(args[2]))
    assert not torch.allclose(got, without_r2)


def test_static_scale_tensorrt_form(tmp_path):
    """quantize_scaled for TensorRT: one QuantizeLinear with a constant scalar scale and an
    FP8 zero point, no guards in front of it."""
    import onnx

    class Static(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", nx.compute_scale(torch.tensor(3.0)))

        def forward(self, x):
            return OPS.quantize_scaled(x, self.s, "tensor", "e4m3").float()

    x = torch.randn(4, 64) * 2
    x[0, 0] = 100.0  # beyond amax 3.0: saturates to 448 * s, never NaN
    path = _export(Static(), (x,), tmp_path / "s.onnx", target="tensorrt")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("QuantizeLinear") == 1 and "Where" not in ops and "IsInf" not in ops
    q = [n for n in onnx.load(path).graph.node if n.op_type == "QuantizeLinear"][0]
    assert len(q.input) == 3  # explicit FP8 zero point
    got = torch.from_numpy(run(path, (x,))[0])
    torch.testing.assert_close(got, Static()(x), rtol=0, atol=0)
    assert got[0, 0] == 448.0
