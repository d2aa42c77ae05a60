"""onnxruntime sessions for FP8 QDQ files.

onnxruntime's CPU graph optimizer, at its default level, fuses ``QuantizeLinear →
DequantizeLinear → MatMul`` into ``MatMulIntegerToFloat``/``QGemm``, which only take int8/uint8,
and then rejects or mis-runs FP8 QDQ (SPEC §4).  :func:`session` turns that QDQ fusion off
(``session.disable_quant_qdq=1``) and keeps the remaining optimizations at BASIC level.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

__all__ = ["run", "session", "session_options"]


def session_options():
    """``SessionOptions`` that keep FP8 QDQ nodes as they are (see the module docstring)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return so


def session(path: str | os.PathLike, providers: Sequence[str] | None = None):
    """An ``onnxruntime.InferenceSession`` for an FP8 QDQ file written by ``export_onnx``."""
    import onnxruntime as ort

    return ort.InferenceSession(
        os.fspath(path), session_options(), providers=list(providers or ["CPUExecutionProvider"])
    )


def _numpy(a) -> np.ndarray:
    import torch

    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def run(path_or_session, args: Sequence) -> list[np.ndarray]:
    """Run a file (or session) on positional inputs given as tensors or arrays."""
    sess = path_or_session
    if isinstance(sess, (str, os.PathLike)):
        sess = session(sess)
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, (_numpy(a) for a in args))))
