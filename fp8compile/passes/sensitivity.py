"""SensitivityPass: tag the nodes that must not run in FP8 (SPEC §3).

Reads: ``node.meta["nn_module_stack"]`` and ``node.meta["example_value"]`` (Dynamo's).
Writes ``node.meta["fp8compile"]``:

* ``module`` / ``module_type``: innermost module path (``layers.0.mlp.up``) and class name;
* ``gemm``: ``"linear" | "matmul" | "addmm"`` for matrix products, else absent;
* ``sensitive``: a :class:`~fp8compile.config.Rule` when a rule protects the node;
* ``sensitive_reason``: why, in words.

Only rules listed in ``config.rules`` are applied.  Matching (before → tag)::

    layer_norm / rms_norm / nodes inside a *Norm module      → NORM
    softmax / log_softmax / scaled_dot_product_attention    → SOFTMAX
    embedding                                               → EMBEDDING
    cross_entropy / nll_loss / mse_loss ...                  → LOSS
    add(a, f(a))  (one operand is an ancestor of the other) → RESIDUAL
    linear ─(views, casts, scalar ops)→ output / loss        → OUTPUT_HEAD
    gemm ─(views, scaling, masking)→ softmax                 → SOFTMAX_INPUT
    softmax ─(views, dropout)→ gemm                          → SOFTMAX_OUTPUT
"""

from __future__ import annotations

import torch

from ..config import Rule
from . import patterns as pt
from .manager import Fp8Pass, PassResult, info, module_of


def _reaches(start: torch.fx.Node, target: torch.fx.Node, order: dict) -> bool:
    """Is there a path start → … → target?  Bounded by topological position (``order``:
    node → index, computed once per pass)."""
    limit = order[target]
    stack, seen = [start], {start}
    while stack:
        n = stack.pop()
        if n is target:
            return True
        for u in n.users:
            if u not in seen and order[u] <= limit:
                seen.add(u)
                stack.append(u)
    return False


def _through_passthrough(node: torch.fx.Node, stop, forward: bool) -> bool:
    """Does ``node``'s value reach (``forward``) or come from a node satisfying ``stop``,
    through passthrough ops only?"""

    def step(n: torch.fx.Node):
        return list(n.users) if forward else list(n.all_input_nodes)

    stack, seen = step(node), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop(n):
            return True
        if pt.is_passthrough(n):
            stack.extend(step(n))
    return False


class SensitivityPass(Fp8Pass):
    """Tag numerically sensitive nodes; see the module docstring for the patterns."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        rules = self.ctx.config.rules
        graph = gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            meta = info(node)
            path, cls = module_of(node)
            meta["module"] = path
            meta["module_type"] = cls.__name__ if cls else ""
            kind = pt.gemm_kind(node)
            if kind:
                meta["gemm"] = kind
            tag = self._classify(node, cls, kind, rules, order)
            if tag:
                meta["sensitive"], meta["sensitive_reason"] = tag
        return PassResult(gm, False)

    def _classify(self, node, cls, kind, rules, order):
        if Rule.SOFTMAX in rules and pt.is_softmax(node):
            return Rule.SOFTMAX, "softmax/attention: exponentials amplify FP8 rounding"
        if Rule.NORM in rules and pt.is_norm(node, cls):
            return Rule.NORM, "normalization: computed in fp32 (reductions of squares)"
        if Rule.EMBEDDING in rules and pt.is_embedding(node):
            return Rule.EMBEDDING, "embedding lookup: no GEMM to speed up, keeps input precision"
        if Rule.LOSS in rules and pt.is_loss(node):
            return Rule.LOSS, "loss: computed in fp32"
        if Rule.RESIDUAL in rules and pt.is_add(node) and self._is_residual(node, order):
            return Rule.RESIDUAL, "residual add: the residual stream stays in high precision"
        if kind is None:
            return None
        if Rule.OUTPUT_HEAD in rules and kind == pt.Gemm.LINEAR and self._is_head(node):
            return Rule.OUTPUT_HEAD, "output head: last linear before the logits/loss"
        probs = pt.is_probabilities
        if Rule.SOFTMAX_INPUT in rules and _through_passthrough(node, probs, forward=True):
            return Rule.SOFTMAX_INPUT, "feeds a softmax (router/gate/attention scores)"
        if Rule.SOFTMAX_OUTPUT in rules and _through_passthrough(node, probs, forward=False):
            return Rule.SOFTMAX_OUTPUT, "consumes softmax probabilities (attention · V)"
        return None

    @staticmethod
    def _is_residual(node: torch.fx.Node, order: dict) -> bool:
        tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if len(tensors) != 2:
            return False
        a, b = tensors
        return _reaches(a, b, order) or _reaches(b, a, order)

    @staticmethod
    def _is_head(node: torch.fx.Node) -> bool:
        def stop(u: torch.fx.Node) -> bool:
            return u.op == "output" or pt.is_loss(u)

        return _through_passthrough(node, stop, forward=True)
