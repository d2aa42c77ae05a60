"""Export to standard ONNX with FP8 QuantizeLinear/DequantizeLinear (see docs/onnx.md)."""

from .export import ExportReport, QDQLinear, export_onnx, fp8_model
from .session import run, session, session_options

__all__ = [
    "ExportReport", "QDQLinear", "export_onnx", "fp8_model", "run", "session", "session_options",
]
