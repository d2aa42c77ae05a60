"""fp8compile: an FP8 quantizing compiler for PyTorch."""
from . import ops  # noqa: F401  (registers torch.ops.fp8compile.*)
from .config import Accumulation, Fp8Config, Precision, Recipe, Rule, Scaling

__version__ = "0.1.0"
__all__ = ["Accumulation", "Fp8Config", "Precision", "Recipe", "Rule", "Scaling"]
