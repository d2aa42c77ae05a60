"""Export to standard ONNX with FP8 QuantizeLinear/DequantizeLinear (see docs/onnx.md).

Example::

    >>> import fp8compile
    >>> report = fp8compile.export_onnx(model, (x,), "model.onnx")  # doctest: +SKIP
    >>> sess = fp8compile.onnx.session("model.onnx")                 # doctest: +SKIP
    >>> y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})   # doctest: +SKIP
"""

from .export import ExportReport, export_onnx, fp8_model
from .modules import Fp8ExportLinear
from .session import run, session, session_options
from .validate import reference_outputs

__all__ = [
    "ExportReport",
    "Fp8ExportLinear",
    "export_onnx",
    "fp8_model",
    "reference_outputs",
    "run",
    "session",
    "session_options",
]
