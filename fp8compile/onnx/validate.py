"""Checks on a written file: ONNX checker, IR/opset limits, FP8 bytes, numeric agreement.

onnxruntime 1.30/1.31 load IR <= 13 and opset <= 26 (SPEC §4); this exporter writes opset
19..23 with the lowest IR version that opset needs (10 for 19..22, 11 for 23), so files also
load in older runtimes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "MAX_ORT_IR",
    "check_file",
    "fp8_initializer_bytes",
    "first_tensor",
    "ir_version_for",
    "reference_outputs",
    "rel_err",
]

MAX_ORT_IR = 13
"""Highest IR version onnxruntime 1.30 reads."""


def ir_version_for(opset: int) -> int:
    """The lowest IR version that ``opset`` of ``ai.onnx`` needs (onnx's version table)."""
    import onnx

    irs = [ir for _, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE if ai_onnx >= opset]
    if not irs:
        raise ValueError(f"opset={opset} is newer than this onnx package knows")
    return min(irs)


def check_file(path: str | os.PathLike, opset: int) -> Any:
    """Set the IR version for ``opset``, run ``onnx.checker`` (full check), return the proto.

    Raises ValueError when the file's IR or opset is outside what onnxruntime 1.30+ reads.
    """
    import onnx

    path = os.fspath(path)
    proto = onnx.load(path)
    ir = ir_version_for(opset)
    if proto.ir_version != ir:
        proto.ir_version = ir
        onnx.save(proto, path)
    onnx.checker.check_model(path, full_check=True)
    real = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    if proto.ir_version > MAX_ORT_IR or real.get("ai.onnx", 0) > 26:
        raise ValueError(
            f"{path}: IR {proto.ir_version} / opset {real.get('ai.onnx')} exceed what "
            f"onnxruntime 1.30 reads (IR <= {MAX_ORT_IR}, opset <= 26)"
        )
    return proto


def fp8_initializer_bytes(proto) -> tuple[int, int]:
    """``(bytes of FP8 initializers, bytes of all initializers)``."""
    import onnx

    fp8_types = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
    fp8 = total = 0
    for t in proto.graph.initializer:
        n = math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += n
        if t.data_type in fp8_types:
            fp8 += n
    return fp8, total


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model output (tensor, tuple, dict or transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    elif isinstance(out, dict):
        out = list(out.values())
    if not out:
        raise ValueError("the model returned no tensor to compare")
    return first_tensor(out[0])


def rel_err(got: Any, ref: Any) -> float:
    """``‖got − ref‖ / ‖ref‖`` in float64 (NaN where either has a NaN)."""
    got = torch.as_tensor(np.asarray(got)).double()
    ref = torch.as_tensor(np.asarray(ref)).double()
    if got.shape != ref.shape:
        raise ValueError(f"output shapes differ: {tuple(got.shape)} vs {tuple(ref.shape)}")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def reference_outputs(path: str | os.PathLike, inputs: Sequence) -> list[np.ndarray]:
    """Run the file in ``onnx.reference.ReferenceEvaluator`` (onnx's Python semantics).

    Slow (numpy, op by op): meant for small models in tests.  onnx 1.23's evaluator implements
    FP8 QuantizeLinear/DequantizeLinear including ``block_size``.
    """
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(os.fspath(path))
    feeds = {name: _numpy(a) for name, a in zip(ev.input_names, inputs)}
    return ev.run(None, feeds)


def _numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)
