"""onnxruntime sessions for FP8 QDQ files.

Before 1.32, onnxruntime's CPU graph optimizer, at its default level (ALL), fuses
``QuantizeLinear → DequantizeLinear → MatMul`` into ``MatMulIntegerToFloat``/``QGemm``, which
take only int8/uint8, and the session then fails to load (``Type 'tensor(float8e4m3fn)' of
input parameter ... of operator (MatMulIntegerToFloat) is invalid``, onnxruntime 1.31, SPEC §4).
From 1.32 the default session leaves FP8 QDQ alone and runs the file, dequantizing every weight
on every call (2.1 ms against 1.0 ms on the LLaMA block with the options below).
:func:`session` loads it on every version, in one of two ways:

* default: ``session.disable_quant_qdq=1`` at level BASIC.  With the QDQ rules off, constant
  folding also folds each weight's ``DequantizeLinear`` into an fp32 initializer at load time:
  the same numbers (FP8 value × scale is exact in fp32), 4 bytes per weight in memory, and the
  fastest CPU run (the CPU EP has no FP8 GEMM; it would dequantize per call anyway).
* ``keep_fp8_weights=True``: level BASIC with only ``QDQSelectorActionTransformer`` disabled;
  constant folding then leaves ``DequantizeLinear`` alone, weights stay 1 byte in memory and are
  dequantized per call (about 2x slower on the LLaMA block, same outputs to 6e-7).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

__all__ = ["run", "session", "session_options"]


def session_options(keep_fp8_weights: bool = False):
    """``SessionOptions`` under which onnxruntime runs FP8 QDQ (see the module docstring)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not keep_fp8_weights:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return so


def session(
    path: str | os.PathLike,
    providers: Sequence[str] | None = None,
    *,
    keep_fp8_weights: bool = False,
):
    """An ``onnxruntime.InferenceSession`` for an FP8 QDQ file written by ``export_onnx``.

    Example::

        >>> sess = session("model.onnx")  # doctest: +SKIP
        >>> y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]  # doctest: +SKIP
    """
    import onnxruntime as ort

    if not isinstance(keep_fp8_weights, bool):
        raise ValueError(f"keep_fp8_weights={keep_fp8_weights!r} must be True or False")
    disabled = ["QDQSelectorActionTransformer"] if keep_fp8_weights else None
    return ort.InferenceSession(
        os.fspath(path), session_options(keep_fp8_weights),
        providers=list(providers or ["CPUExecutionProvider"]), disabled_optimizers=disabled,
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
