"""EpiloguePass: run an FP8 GEMM's activation and residual add in the GEMM's epilogue.

Reads ``role="fp8_gemm"`` (inference ``fp8compile::scaled_mm`` nodes, RewritePass).  Writes
``epilogue`` (``["gelu", "residual"]``...) on the GEMM node that replaces them.

Only where the GEMM's output (and the activation's) has no other reader, the residual has the
output's dtype and broadcasts into it, and the add has no ``alpha``::

    y = fp8compile.scaled_mm(xq, xs, ..., "none", None)
    a = gelu(y)                                    ⇒    z = fp8compile.scaled_mm(xq, xs, ...,
    z = a + r                                                                "gelu", r)

The Triton GEMM then adds the residual to its fp32 accumulator and rounds once, and the
product is never written in the model dtype and read back: for 4096 tokens × 4096 features
in bf16, 64 MiB of traffic per residual add.  Where cuBLAS times faster for the shape
(``kernels.select``, the choice made *with* the epilogue), the op runs cuBLAS and the
epilogue as pointwise ops, and the compiled graph is the unfused one: the residual is not
pinned (``ops/gemm.py``), so Inductor still computes a residual stream ``x + o`` in fp32
where the next add reads it, instead of reading it back rounded to bf16.

Off by default (``Fp8Config.fuse_epilogues``): on an H100, cuBLAS plus a separate add still
times faster than the Triton GEMM with the residual fused for the LLaMA block's o/down
projections (docs/performance.md), so there the fold only adds compile-time tuning.

Activations taken: exact GELU (``approximate="none"``), SiLU and ReLU; ``F.silu(gate) * up``
was already fused into the next quantization by FusePass, which runs first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fuse import FusePass, is_add
from .manager import Fp8Pass, PassResult, add_note, dtype_of, info, plan_entries_of, value_of

OPS = torch.ops.fp8compile
_ACTIVATION = {F.gelu: "gelu", F.silu: "silu", F.relu: "relu", torch.relu: "relu"}
# Positions in fp8compile::scaled_mm's arguments.
_OUT_DTYPE, _ACT, _RES = 7, 9, 10


class EpiloguePass(Fp8Pass):
    """Fold activations and residual adds into FP8 GEMMs; see the module docstring."""

    after = (FusePass,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        if self.ctx.config.fuse_epilogues:
            for node in list(graph.nodes):
                if node.target is OPS.scaled_mm.default and info(node).get("role") == "fp8_gemm":
                    modified |= self._fold(graph, node)
        if modified:
            graph.lint()
            gm.recompile()
        self.ctx.stats["fused_epilogues"] = sum(
            1 for n in graph.nodes if info(n).get("epilogue"))
        return PassResult(gm, modified)

    def _fold(self, graph: torch.fx.Graph, mm: torch.fx.Node) -> bool:
        if mm.args[_ACT] != "none" or mm.args[_RES] is not None:
            return False
        out_dtype = mm.args[_OUT_DTYPE]
        last, activation, residual, absorbed = mm, "none", None, []
        act = _sole_user(mm)
        name = _activation(act)
        if name is not None:
            last, activation = act, name
            absorbed.append(act)
        add = _sole_user(last)
        r = _residual(add, last, out_dtype)
        if r is not None:
            last, residual = add, r
            absorbed.append(add)
        if last is mm:
            return False
        with graph.inserting_before(last):
            new = graph.call_function(
                OPS.scaled_mm.default, (*mm.args[:_ACT], activation, residual))
        new.meta.update({k: v for k, v in last.meta.items() if k != "fp8compile"})
        parts = [activation] * (activation != "none") + ["residual"] * (residual is not None)
        info(new).update(info(mm), epilogue=parts)
        last.replace_all_uses_with(new)
        for n in reversed([mm, *absorbed]):
            graph.erase_node(n)
        self._note(new, parts, absorbed)
        return True

    @staticmethod
    def _note(mm: torch.fx.Node, parts: list[str], absorbed: list[torch.fx.Node]) -> None:
        text = " and ".join(_WORDS[p] for p in parts)
        modules = ", ".join(e.module or e.name for e in plan_entries_of(mm)) or mm.name
        for e in plan_entries_of(mm):
            add_note(e, f"{text} in the GEMM epilogue (fp32, one rounding)")
        for n in absorbed:
            entry = info(n).get("entry")
            if entry is not None:
                add_note(entry, f"computed in the epilogue of the FP8 GEMM of {modules} "
                                "(fp32, one rounding)")


_WORDS = {"gelu": "GELU", "silu": "SiLU", "relu": "ReLU", "residual": "residual add"}


def _sole_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].op != "output" else None


def _activation(node: torch.fx.Node | None) -> str | None:
    """The epilogue name of ``node`` when it is a supported activation of its first input
    alone: not in place, and GELU exact (the kernel computes the erf form)."""
    if node is None or not node.args:
        return None
    if node.op == "call_method":
        return "relu" if node.target == "relu" and len(node.args) == 1 and not node.kwargs \
            else None
    if node.op != "call_function" or node.target not in _ACTIVATION:
        return None
    name = _ACTIVATION[node.target]
    option = "approximate" if name == "gelu" else "inplace"
    if len(node.args) > 2 or set(node.kwargs) - {option}:
        return None
    value = node.kwargs.get(option, node.args[1] if len(node.args) == 2 else None)
    if value not in ((None, "none") if name == "gelu" else (None, False)):
        return None
    return name


def _residual(add: torch.fx.Node | None, y: torch.fx.Node, out_dtype) -> torch.fx.Node | None:
    """The other operand of ``add = y + r`` when the GEMM can add it instead: a tensor of a
    floating dtype that broadcasts into ``y`` without changing its shape or dtype."""
    if add is None or not is_add(add) or add.kwargs:
        return None
    a, b = add.args
    r = b if a is y else a if b is y else None
    if not isinstance(r, torch.fx.Node) or r is y:
        return None
    ry, rr, ra = (value_of(n) for n in (y, r, add))
    if not all(isinstance(v, torch.Tensor) for v in (ry, rr, ra)):
        return None
    if not rr.dtype.is_floating_point or ra.dtype != out_dtype or dtype_of(y) != out_dtype:
        return None
    if _dims(ra.shape) != _dims(ry.shape) or rr.dim() > ry.dim():
        return None
    return r


def _dims(shape) -> list[str]:
    """Sizes as text, so symbolic sizes compare by expression without adding guards."""
    return [str(s) for s in shape]
