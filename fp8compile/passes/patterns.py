"""Which torch-level FX targets mean what.  Matched by object, never by name.

Dynamo hands torch-level graphs: ``nn.Linear`` is ``call_function torch._C._nn.linear``,
``x @ w`` is ``operator.matmul``, methods such as ``x.softmax(-1)`` are ``call_method`` nodes
(whose target is the method name, the only string matching here).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Gemm",
    "gemm_kind",
    "is_add",
    "is_embedding",
    "is_loss",
    "is_norm",
    "is_passthrough",
    "is_probabilities",
    "is_softmax",
    "is_transpose",
    "transpose_source",
]

LINEAR = {torch._C._nn.linear, F.linear}
MATMUL = {torch.matmul, operator.matmul, torch.mm, torch.bmm}
ADDMM = {torch.addmm}
MATMUL_METHODS = {"matmul", "mm", "bmm", "__matmul__"}
# Grouped GEMMs (a mixture of experts' expert projections): rows of x in groups given by
# ``offs``, each group times its own weight.  torch's two names, where this torch has them.
GROUPED_MM = {f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None))
              if f is not None}

NORM_FUNCS = {
    F.layer_norm, torch.layer_norm, F.group_norm, torch.group_norm, F.batch_norm,
    torch.batch_norm, F.instance_norm, torch.instance_norm, F.rms_norm, torch.rms_norm,
    F.local_response_norm,
}
NORM_MODULES = (
    nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
)
SOFTMAX_FUNCS = {
    F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, F.softmin,
    F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
}
SOFTMAX_METHODS = {"softmax", "log_softmax"}
# Ops whose output is a probability distribution (not fused attention, whose q/k/v
# projections and output projection are ordinary FP8 linears).
PROB_FUNCS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, F.softmin}
EMBEDDING_FUNCS = {F.embedding, torch.embedding, F.embedding_bag}
LOSS_FUNCS = {
    F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
    F.binary_cross_entropy, F.binary_cross_entropy_with_logits, F.kl_div,
    F.cosine_embedding_loss, F.margin_ranking_loss,
}
ADD_FUNCS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}

# Ops that pass a tensor through without changing what it means for the head/softmax rules:
# views, dtype/layout changes, scalar scaling, masking, dropout.
PASSTHROUGH_FUNCS = {
    torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.squeeze,
    torch.unsqueeze, torch.t, operator.getitem, torch.contiguous_format, F.dropout,
    operator.mul, operator.truediv, torch.mul, torch.div, torch.tanh, torch.masked_fill,
    torch.where, operator.sub, torch.clamp, torch.narrow,
}
PASSTHROUGH_METHODS = {
    "view", "reshape", "transpose", "permute", "contiguous", "float", "to", "type_as",
    "flatten", "squeeze", "unsqueeze", "t", "mul", "div", "tanh", "masked_fill",
    "masked_fill_", "bfloat16", "half", "narrow", "expand", "clamp", "__getitem__",
    "view_as", "reshape_as", "sub",
}


class Gemm:
    LINEAR = "linear"
    MATMUL = "matmul"
    ADDMM = "addmm"
    GROUPED = "grouped_mm"


def _library_grouped_mm(target) -> bool:
    """Whether ``target`` is a grouped GEMM op a model library registered: transformers'
    ``grouped_mm_fallback``, what its MoE experts call where torch's grouped GEMM does not
    serve (CPU, dtypes other than bf16 under torch.compile)."""
    packet = getattr(target, "overloadpacket", target)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    try:
        return packet is torch.ops.transformers.grouped_mm_fallback
    except AttributeError:  # transformers' op not registered in this process
        return False


def _is(node: torch.fx.Node, funcs: set, methods: set = frozenset()) -> bool:
    if node.op == "call_function":
        return node.target in funcs
    if node.op == "call_method":
        return node.target in methods
    return False


def gemm_kind(node: torch.fx.Node) -> str | None:
    if _is(node, LINEAR):
        return Gemm.LINEAR
    if _is(node, MATMUL, MATMUL_METHODS):
        return Gemm.MATMUL
    if _is(node, ADDMM):
        return Gemm.ADDMM
    if _is(node, GROUPED_MM) or (node.op == "call_function"
                                 and _library_grouped_mm(node.target)):
        return Gemm.GROUPED
    return None


def is_norm(node: torch.fx.Node, module_cls: type | None) -> bool:
    if _is(node, NORM_FUNCS):
        return True
    if module_cls is None:
        return False
    # Norm modules that are not torch's own (LlamaRMSNorm, T5LayerNorm...) are written as
    # pow/mean/rsqrt: every node inside such a module belongs to the norm.
    return issubclass(module_cls, NORM_MODULES) or module_cls.__name__.endswith("Norm")


def is_softmax(node: torch.fx.Node) -> bool:
    return _is(node, SOFTMAX_FUNCS, SOFTMAX_METHODS)


def is_probabilities(node: torch.fx.Node) -> bool:
    return _is(node, PROB_FUNCS, SOFTMAX_METHODS)


def is_embedding(node: torch.fx.Node) -> bool:
    return _is(node, EMBEDDING_FUNCS)


def is_loss(node: torch.fx.Node) -> bool:
    return _is(node, LOSS_FUNCS)


def is_add(node: torch.fx.Node) -> bool:
    return _is(node, ADD_FUNCS, ADD_METHODS)


def is_transpose(node: torch.fx.Node) -> bool:
    return _is(node, {torch.transpose}, {"transpose"})


def transpose_source(node: Any) -> torch.fx.Node | None:
    """The tensor a 2-D ``node`` is the transpose of, for every way Dynamo writes one
    (``w.t()``, ``torch.t(w)``, ``w.T``, ``w.mT``, ``w.transpose(0, 1)``, ``w.permute(1, 0)``
    and their kin); None for anything else.  The caller checks that the source is 2-D."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    src, rest = node.args[0], list(node.args[1:])
    if not isinstance(src, torch.fx.Node):
        return None
    if _is(node, {torch.t}, {"t"}):
        return src
    if node.op == "call_function" and node.target is getattr:
        return src if rest in (["T"], ["mT"]) else None
    if _is(node, {torch.transpose, torch.swapaxes, torch.swapdims},
           {"transpose", "swapaxes", "swapdims"}):
        dims = rest + [node.kwargs.get(k) for k in ("dim0", "dim1", "axis0", "axis1")
                       if k in node.kwargs]
        ok = len(dims) == 2 and all(isinstance(d, int) for d in dims)
        return src if ok and {d % 2 for d in dims} == {0, 1} else None
    if _is(node, {torch.permute}, {"permute"}):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        dims = list(node.kwargs.get("dims", dims))
        ok = len(dims) == 2 and all(isinstance(d, int) for d in dims)
        return src if ok and [d % 2 for d in dims] == [1, 0] else None
    return None


def is_passthrough(node: torch.fx.Node) -> bool:
    return _is(node, PASSTHROUGH_FUNCS, PASSTHROUGH_METHODS)
