"""fp8compile: an FP8 quantizing compiler for PyTorch.

    model = torch.compile(model, backend="fp8hpf")            # entry point, no import needed
    print(fp8compile.plan(model, x).summary())                # who runs in FP8, and why
"""

from . import ops  # noqa: F401  (registers torch.ops.fp8compile.*)
from .backend import Fp8Backend, backend, last_plan
from .config import Accumulation, Fp8Config, Precision, Recipe, Rule, Scaling
from .plan import Plan, PlanEntry, plan

__version__ = "0.1.0"
__all__ = [
    "Accumulation",
    "Fp8Backend",
    "Fp8Config",
    "Plan",
    "PlanEntry",
    "Precision",
    "Recipe",
    "Rule",
    "Scaling",
    "backend",
    "last_plan",
    "plan",
    "calibrate",
    "export_onnx",
]


def __getattr__(name: str):
    # Heavier entry points load on first use: onnx/onnxscript only when exporting.
    if name == "export_onnx":
        from .onnx import export_onnx

        return export_onnx
    if name == "calibrate":
        from .calibration import calibrate

        return calibrate
    raise AttributeError(f"module 'fp8compile' has no attribute {name!r}")
