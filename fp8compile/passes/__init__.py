"""FX passes of the fp8hpf backend, in the order the pipeline runs them.

``analysis_passes`` take PyTorch's fused transformer calls apart (decompose) and decide
(sensitivity → precision); ``default_passes`` also rewrite (rewrite → scales → fuse →
epilogue).  See README.md for the
``node.meta["fp8compile"]`` keys each reads and writes.
"""

from .decompose import DecomposePass
from .epilogue import EpiloguePass
from .fuse import FusePass
from .manager import META, CompileContext, Fp8Pass, PassManager, PassResult
from .precision import PrecisionPass
from .rewrite import RewritePass
from .scales import ScalesPass, WeightCache
from .sensitivity import SensitivityPass

__all__ = [
    "META",
    "CompileContext",
    "DecomposePass",
    "EpiloguePass",
    "Fp8Pass",
    "FusePass",
    "PassManager",
    "PassResult",
    "PrecisionPass",
    "RewritePass",
    "ScalesPass",
    "SensitivityPass",
    "WeightCache",
    "analysis_passes",
    "default_passes",
]


def analysis_passes(ctx: CompileContext) -> list[Fp8Pass]:
    return [DecomposePass(ctx), SensitivityPass(ctx), PrecisionPass(ctx)]


def default_passes(ctx: CompileContext) -> list[Fp8Pass]:
    return analysis_passes(ctx) + [RewritePass(ctx), ScalesPass(ctx), FusePass(ctx),
                                   EpiloguePass(ctx)]
