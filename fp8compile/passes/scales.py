"""ScalesPass: quantize each tensor once, and each weight once per parameter version.

Reads ``role`` (RewritePass).  Writes ``role="weight_input"`` on the placeholders it adds and
``ctx.stats["weight_bytes" | "fp8_weight_bytes" | "quantized_weights"]``.

1. Shared activation quantization.  Consumers of one tensor with the same recipe (q/k/v of one
   normed input, gate/up of one MLP input) quantize it once::

       quantize(h) → q_proj      quantize(h) ─┬→ q_proj
       quantize(h) → k_proj  ⇒               ├→ k_proj
       quantize(h) → v_proj                  └→ v_proj

   In training graphs each FP8 linear is one ``fp8compile::linear`` that quantizes its own
   input and saves that FP8 copy for backward.  Where several read one tensor, they become a
   shared ``quantize`` and ``fp8compile::linear_q`` each, so the FP8 copy is made and saved
   once (a lone linear keeps the single op: one custom op call instead of two)::

       linear(h, Wq) ─┐           quantize(h) → (hq, hs) ─┬→ linear_q(h, hq, hs, Wq)
       linear(h, Wk)  ├─  ⇒                               ├→ linear_q(h, hq, hs, Wk)
       linear(h, Wv) ─┘                                   └→ linear_q(h, hq, hs, Wv)

2. Weight hoisting (inference).  ``quantize(w)`` of a parameter (or of ``t(w)``) leaves the
   graph and becomes two graph inputs fed by a :class:`WeightCache`, which requantizes only
   when the parameter's storage, shape, dtype or ``_version`` changed (an optimizer step or an
   in-place ``copy_`` under ``no_grad`` bump ``_version``; assigning ``p.data`` swaps storage)::

       quantize(w) → (wq, ws)  ⇒  placeholder wq, placeholder ws   (cache: once per version)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch

from .. import numerics as nx
from ..config import Recipe
from ..ops import scale_shape
from .manager import Fp8Pass, PassResult, eliminate_dead_code, info
from .rewrite import RewritePass

OPS = torch.ops.fp8compile


class WeightCache:
    """FP8 copy of one weight (per its version) for one recipe.

    ``key`` identifies the parameter version: storage pointer, shape, dtype, device and the
    autograd version counter.  The quantized copy lives as long as the compiled graph.
    """

    def __init__(self, index: int, transposed: bool, granularity: str, fmt: str, p2: bool):
        self.index, self.transposed = index, transposed
        self.args = (granularity, fmt, p2)
        self.key: tuple | None = None
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None
        self.quantizations = 0

    def get(self, args: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        w = args[self.index]
        key = (w.data_ptr(), tuple(w.shape), w.dtype, w.device, w._version)
        if key != self.key:
            with torch.no_grad():
                src = w.detach().t() if self.transposed else w.detach()
                self.value = OPS.quantize(src.contiguous(), *self.args)
            self.key = key
            self.quantizations += 1
        return self.value


class ScalesPass(Fp8Pass):
    """Deduplicate activation quantization; hoist weight quantization out (inference)."""

    after = (RewritePass,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = self._share_activation_quant(graph)
        if self.ctx.inference:
            modified |= self._hoist_weights(graph)
        else:
            modified |= self._share_training_quant(graph)
        if modified:
            eliminate_dead_code(graph)
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def _share_activation_quant(self, graph: torch.fx.Graph) -> bool:
        seen: dict[tuple, torch.fx.Node] = {}
        modified = False
        for node in list(graph.nodes):
            if node.target is not OPS.quantize.default or info(node).get("role") != "act_quant":
                continue
            key = (node.args, tuple(sorted(node.kwargs.items())))
            first = seen.setdefault(key, node)
            if first is not node:
                node.replace_all_uses_with(first)
                graph.erase_node(node)
                modified = True
        # getitem(first, i) duplicates are harmless; Inductor CSEs them.
        return modified

    def _share_training_quant(self, graph: torch.fx.Graph) -> bool:
        groups: dict[tuple, list[torch.fx.Node]] = {}
        for node in graph.nodes:
            if node.target is OPS.linear.default:
                x, _w, _b, recipe, act_fmt, _wf, _gf, p2, _acc = node.args
                groups.setdefault((x, recipe, act_fmt, p2), []).append(node)
        modified = False
        for (x, recipe, act_fmt, p2), nodes in groups.items():
            if len(nodes) < 2 or not all(_only_output_used(n) for n in nodes):
                continue
            gran = Recipe(recipe).activation_granularity.value
            with graph.inserting_before(nodes[0]):
                # Detached: the gradient reaches x through linear_q's own x argument.
                xd = graph.call_method("detach", (x,))
                q = graph.call_function(OPS.quantize.default, (xd, gran, act_fmt, p2))
                xq = graph.call_function(operator.getitem, (q, 0))
                xs = graph.call_function(operator.getitem, (q, 1))
            info(q)["role"] = "act_quant"
            for node in nodes:
                _, w, b, _, _, wf, gf, _, acc = node.args
                with graph.inserting_before(node):
                    new = graph.call_function(
                        OPS.linear_q.default, (x, xq, xs, w, b, recipe, act_fmt, wf, gf, p2, acc)
                    )
                info(new).update(info(node))
                for user in list(node.users):
                    user.replace_all_uses_with(new)
                    graph.erase_node(user)
                graph.erase_node(node)
            modified = True
        return modified

    def _hoist_weights(self, graph: torch.fx.Graph) -> bool:
        stats = self.ctx.stats
        modified = False
        for node in list(graph.nodes):
            if node.target is not OPS.quantize.default or info(node).get("role") != "weight_quant":
                continue
            src, *qargs = node.args
            transposed = src.op == "call_function" and src.target is torch.t
            param = src.args[0] if transposed else src
            index = self.ctx.placeholder_index(param)
            if index is None:
                continue
            cache = WeightCache(index, transposed, *qargs)
            wq = self.ctx.add_input(graph, f"{param.name}_fp8", lambda a, c=cache: c.get(a)[0])
            ws = self.ctx.add_input(graph, f"{param.name}_scale", lambda a, c=cache: c.get(a)[1])
            info(wq)["role"] = info(ws)["role"] = "weight_input"
            for user in list(node.users):
                if user.target is operator.getitem:
                    user.replace_all_uses_with(wq if user.args[1] == 0 else ws)
                    graph.erase_node(user)
            graph.erase_node(node)
            w = self.ctx.example_inputs[index]
            shape = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
            n_scales = max(1, math.prod(scale_shape(shape, nx.Granularity(qargs[0]))))
            stats["weight_bytes"] = stats.get("weight_bytes", 0) + w.numel() * w.element_size()
            stats["fp8_weight_bytes"] = (
                stats.get("fp8_weight_bytes", 0) + w.numel() + 4 * n_scales
            )
            stats["quantized_weights"] = stats.get("quantized_weights", 0) + 1
            self.ctx.weight_caches.append(cache)
            modified = True
        return modified


__all__ = ["ScalesPass", "WeightCache"]


def _only_output_used(node: torch.fx.Node) -> bool:
    """Every user of the ``linear`` node takes its output (index 0), not its FP8 copy."""
    return all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)
