"""fp8compile.onnx.session: the two ways of loading FP8 QDQ, and the ONNX reference runtime on
a whole exported LLaMA block (RMSNorm, softmax attention, SwiGLU, blocked FP8 QDQ)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fp8compile.onnx import export_onnx, reference_outputs, session, session_options
from tests.models import LlamaBlock


@pytest.fixture(scope="module")
def block_file(tmp_path_factory):
    torch.manual_seed(0)
    model, x = LlamaBlock(sdpa=False).eval(), torch.randn(2, 8, 256)
    path = tmp_path_factory.mktemp("blk") / "block.onnx"
    export_onnx(model, (x,), path, {"recipe": "blockwise"}, validate=False)
    return str(path), x


def _optimized(path, tmp_path, keep):
    so = session_options(keep)
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    disabled = ["QDQSelectorActionTransformer"] if keep else None
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=disabled)
    return onnx.load(str(tmp_path / "opt.onnx"))


@pytest.mark.parametrize("keep", [False, True])
def test_weights_in_memory(block_file, tmp_path, keep):
    path, x = block_file
    fp8 = [t for t in _optimized(path, tmp_path, keep).graph.initializer
           if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    # default: constant folding turns weight DequantizeLinear into fp32 initializers
    assert len(fp8) == (7 if keep else 0)


def test_keep_fp8_weights_same_outputs(block_file):
    path, x = block_file
    feed = {"x": x.numpy()}
    a = session(path).run(None, feed)[0]
    b = session(path, keep_fp8_weights=True).run(None, feed)[0]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep_fp8_weights='yes'"):
        session(path, keep_fp8_weights="yes")


def test_reference_evaluator_runs_whole_block(block_file):
    """Blocked FP8 QuantizeLinear/DequantizeLinear, Softmax, Trilu...: onnx 1.23's evaluator
    runs all of it and agrees with onnxruntime to fp32 rounding."""
    path, x = block_file
    got = reference_outputs(path, (x,))[0]
    want = session(path).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
