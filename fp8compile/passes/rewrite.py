"""RewritePass: turn GEMMs into fp8compile ops (FP8) or cast them (BF16/FP32 overrides).

Reads: ``precision``, ``operands``, ``gemm`` (PrecisionPass).  Writes ``rewritten`` (the node
that now produces the value) on the original GEMM's meta, and ``role`` on the nodes it adds
(``act_quant``, ``weight_quant``, ``fp8_gemm``).

Inference, a linear with a weight parameter ``w (N, K)``::

    y = linear(x, w, b)
        ↓
    xq, xs = fp8compile.quantize(x, "group", "e4m3", p2)       # or quantize_scaled/_delayed
    wq, ws = fp8compile.quantize(w, "block", "e4m3", p2)       # hoisted by ScalesPass
    y = fp8compile.scaled_mm(xq, xs, "group", wq, ws, "block", b, x.dtype, acc, "none", None)

Training (autograd through the weight)::

    y = fp8compile.linear(x, w, b, recipe, ...)[0]             # FP8 forward and backward

A grouped GEMM (a mixture of experts' experts, inference): ``x`` quantized as a linear's
input, the ``(G, N, K)`` expert weight one group at a time (hoisted by ScalesPass)::

    y = grouped_mm(x, w.transpose(-2, -1), offs=offs)
        ↓
    y = fp8compile.scaled_grouped_mm(xq, xs, "group", wq, ws, "block", offs, x.dtype, acc)

Two activations (``q @ kᵀ`` style, unprotected by any rule)::

    y = matmul(a, b)  →  y = fp8compile.matmul(a, b, recipe, fmt, acc)

A weight given as ``(K, N)`` (``x @ W``, ``addmm``) is transposed first (``t(W)``), which the
weight cache quantizes once like any other.  A GEMM whose precision is a float dtype other than
its own (``"lm_head": "fp32"`` on a bf16 model) gets its operands cast and its result cast back.
"""

from __future__ import annotations

import operator

import torch

from ..config import Precision, Scaling
from ..ops._common import FLOAT_DTYPES, device_of
from .manager import Fp8Pass, PassResult, dtype_of, info
from .precision import PrecisionPass

OPS = torch.ops.fp8compile


class RewritePass(Fp8Pass):
    """Rewrite GEMMs per their precision; see the module docstring."""

    after = (PrecisionPass,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        # Static scaling: one scale input per calibrated amax, so linears that read one
        # tensor (q/k/v, gate/up: calibrated on the same input, so the same amax) quantize
        # it with one scale node, which ScalesPass then shares.
        self._static_scales: dict[float, torch.fx.Node] = {}
        for node in list(gm.graph.nodes):
            meta = node.meta.get("fp8compile", {})
            if "gemm" not in meta or "precision" not in meta:
                continue
            prec = meta["precision"]
            if prec is Precision.FP8:
                self._fp8(gm.graph, node, meta)
                modified = True
            elif prec.dtype is not None and prec.dtype != dtype_of(node):
                self._cast(gm.graph, node, prec.dtype)
                modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    # -- FP8 ------------------------------------------------------------------------------

    def _fp8(self, graph: torch.fx.Graph, node: torch.fx.Node, meta: dict) -> None:
        cfg = self.ctx.config
        ops = meta["operands"]
        x, w, bias = (_live(ops[k]) for k in ("x", "w", "bias"))
        xg = cfg.recipe.activation_granularity.value
        wg = cfg.recipe.weight_granularity.value
        act, wfmt = cfg.activation_format.value, cfg.weight_format.value
        acc, p2 = cfg.accumulation.value, cfg.power_of_2_scales
        with graph.inserting_before(node):
            if "offs" in ops:
                new = self._grouped(graph, node, ops, (xg, wg), (act, wfmt, p2, acc))
            elif not ops["w_is_param"]:
                new = graph.call_function(
                    OPS.matmul.default,
                    (x, w, cfg.recipe.value, act, acc, cfg.grad_accumulation.value),
                )
                info(new)["role"] = "fp8_gemm"
            else:
                if ops["w_transposed"]:
                    w = graph.call_function(torch.t, (w,))
                    info(w)["role"] = "weight_view"
                fmts = (act, wfmt, cfg.gradient_format.value, p2, acc)
                if self.ctx.inference:
                    new = self._inference_linear(graph, node, meta, (x, w, bias), (xg, wg), fmts)
                else:
                    new = self._training_linear(graph, node, meta, (x, w, bias), fmts)
        new.meta.update({k: v for k, v in node.meta.items() if k != "fp8compile"})
        # The plan entry travels with the op (a training op's output is a getitem of it), so
        # later passes can say what they did to it (add_note).
        op = new.args[0] if new.target is operator.getitem else new
        info(op)["entry"] = info(new)["entry"] = meta.get("entry")
        info(new).setdefault("role", "fp8_gemm")
        if meta.get("module"):
            info(new).setdefault("module", meta["module"])
        node.replace_all_uses_with(new)
        meta["rewritten"] = new
        graph.erase_node(node)

    def _grouped(self, graph, node, ops, grans, fmts):
        """A grouped GEMM (inference, dynamic scales): ``x`` quantized as a linear's input,
        the ``(G, N, K)`` weight per group (hoisted into a cache by ScalesPass)."""
        (xg, wg), (act, wfmt, p2, acc) = grans, fmts
        w = ops["w_param"]
        if ops["w_param_transposed"]:  # stored (G, K, N): each group's matrix to (N, K)
            w = graph.call_function(torch.transpose, (w, -2, -1))
            info(w)["role"] = "weight_view"
        wqs = graph.call_function(OPS.quantize_grouped_weight.default, (w, wg, wfmt, p2))
        info(wqs)["role"] = "weight_quant"
        xqs = graph.call_function(OPS.quantize.default, (_live(ops["x"]), xg, act, p2))
        info(xqs)["role"] = "act_quant"
        xq, xs, wq, ws = (graph.call_function(operator.getitem, (src, i))
                          for src in (xqs, wqs) for i in (0, 1))
        return graph.call_function(
            OPS.scaled_grouped_mm.default,
            (xq, xs, xg, wq, ws, wg, _live(ops["offs"]), dtype_of(node), acc))

    def _inference_linear(self, graph, node, meta, operands, grans, fmts):
        from ..ops.training_state import AmaxHistory

        cfg = self.ctx.config
        (x, w, bias), (xg, wg) = operands, grans
        act, wfmt, _, p2, acc = fmts
        if cfg.scaling is Scaling.DYNAMIC:
            xqs = graph.call_function(OPS.quantize.default, (x, xg, act, p2))
            xq = graph.call_function(operator.getitem, (xqs, 0))
            xs = graph.call_function(operator.getitem, (xqs, 1))
            info(xqs)["role"] = "act_quant"
        elif cfg.scaling is Scaling.STATIC:
            amax = cfg.static_amax(meta["module"])
            xs = self._static_scales.get(amax)
            if xs is None:
                xs = self._static_scales[amax] = self.ctx.add_input(
                    graph, f"{node.name}_static_scale", _StaticScale(amax, cfg))
            xq = graph.call_function(OPS.quantize_scaled.default, (x, xs, xg, act))
            info(xq)["role"] = "act_quant"
        else:
            hist = self.ctx.add_input(graph, f"{node.name}_amax_history",
                                      AmaxHistory(cfg.amax_history_len, None, meta["module"]))
            xqs = graph.call_function(OPS.quantize_delayed.default, (x, hist, act, p2))
            xq = graph.call_function(operator.getitem, (xqs, 0))
            xs = graph.call_function(operator.getitem, (xqs, 1))
            info(xqs)["role"] = "act_quant"
        wqs = graph.call_function(OPS.quantize.default, (w, wg, wfmt, p2))
        info(wqs)["role"] = "weight_quant"
        wq = graph.call_function(operator.getitem, (wqs, 0))
        ws = graph.call_function(operator.getitem, (wqs, 1))
        out_dtype = dtype_of(node)
        mm = graph.call_function(
            OPS.scaled_mm.default,
            (xq, xs, xg, wq, ws, wg, bias, out_dtype, acc, "none", None),
        )
        info(mm)["role"] = "fp8_gemm"
        return mm

    def _training_linear(self, graph, node, meta, operands, fmts):
        """``fp8compile.linear`` (dynamic), or ``linear_delayed`` with its amax histories as
        graph inputs and ``push_amax`` updating them (see ops/training_state.py)."""
        from ..ops.training_state import AmaxHistory

        cfg = self.ctx.config
        # Under autocast the linear ran in the autocast dtype (its output's); the op does not
        # know autocast, so cast its operands as autocast would.  The casts are differentiable:
        # FP32 master weights still get FP32 gradients.
        low = dtype_of(node)
        x, w, bias = (
            graph.call_method("to", (a, low))
            if low in (torch.float16, torch.bfloat16) and dtype_of(a) not in (None, low) else a
            for a in operands
        )
        grad_acc = cfg.grad_accumulation.value
        if cfg.scaling is Scaling.DELAYED:
            n, mod = cfg.amax_history_len, meta["module"]
            hist = self.ctx.add_input(graph, f"{node.name}_amax_history",
                                      AmaxHistory(n, 2, mod, "forward"))
            ghist = self.ctx.add_input(graph, f"{node.name}_grad_amax_history",
                                       AmaxHistory(n, 1, mod, "grad"))
            full = graph.call_function(OPS.linear_delayed.default,
                                       (x, w, bias, hist, ghist, *fmts, grad_acc))
            amax = graph.call_function(operator.getitem, (full, 4))
            graph.call_function(OPS.push_amax.default, (hist, amax))
        else:
            full = graph.call_function(OPS.linear.default,
                                       (x, w, bias, cfg.recipe.value, *fmts, grad_acc))
        info(full)["role"] = "fp8_gemm"
        return graph.call_function(operator.getitem, (full, 0))

    # -- high-precision overrides -----------------------------------------------------------

    def _cast(self, graph: torch.fx.Graph, node: torch.fx.Node, dtype: torch.dtype) -> None:
        orig = dtype_of(node)
        with graph.inserting_before(node):
            new_args = [
                graph.call_method("to", (a, dtype)) if _is_float_node(a) else a
                for a in node.args
            ]
            new_kwargs = {
                k: graph.call_method("to", (a, dtype)) if _is_float_node(a) else a
                for k, a in node.kwargs.items()
            }
        node.args, node.kwargs = tuple(new_args), new_kwargs
        with graph.inserting_after(node):
            back = graph.call_method("to", (node, orig))
        node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        info(node)["rewritten"] = back


def _live(a):
    """``a``, or what replaced it: an operand recorded by PrecisionPass may be a GEMM that
    this pass rewrote (and erased) before reaching its consumer, as in a linear fed by a
    linear, or a high-precision node whose users now read its cast back."""
    while isinstance(a, torch.fx.Node) and info(a).get("rewritten") is not None:
        a = info(a)["rewritten"]
    return a


def _is_float_node(a) -> bool:
    return isinstance(a, torch.fx.Node) and dtype_of(a) in FLOAT_DTYPES


class _StaticScale:
    """Provides a calibrated activation scale on the device of the first tensor argument."""

    def __init__(self, amax: float, cfg) -> None:
        from .. import numerics as nx

        self.scale = nx.compute_scale(torch.tensor(amax), cfg.activation_format,
                                      cfg.power_of_2_scales)
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, args) -> torch.Tensor:
        dev = device_of(args)
        if dev not in self._on:
            self._on[dev] = self.scale.to(dev)
        return self._on[dev]


__all__ = ["RewritePass"]
