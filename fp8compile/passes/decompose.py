"""DecomposePass: calls that hide GEMMs, taken apart so that the later passes see them.

``nn.MultiheadAttention`` reaches Dynamo's graph as one ``F.multi_head_attention_forward``
call, and ``nn.TransformerEncoderLayer`` in inference as one
``torch._transformer_encoder_layer_fwd`` (its "fast path").  Their projections are inside
that one node: no pass sees a linear, and the plan did not list them.  This pass writes each
such call as what the modules' Python code computes -- linears, scaled dot-product attention,
layer norms, the activation, residual adds -- so that the later passes find the linears
(named after their modules: ``layers.0.linear1``, ``layers.0.self_attn`` for the packed
q/k/v projection) and the norm and attention rules apply to the rest.

An einsum that multiplies an activation by a 2-D parameter over the activation's last dim
(``"...d,hd->...h"``) becomes ``F.linear`` (or a matmul by a (K, N) weight); other einsums
are left as they are.

An attention call is kept whole, with the reason in the plan's statistics (``kept_whole``), where
scaled dot-product attention does not compute it: attention weights that are read
(``need_weights=True``), ``bias_k``/``bias_v``, ``add_zero_attn``, static keys or values,
unbatched or nested inputs.

Reads ``example_value`` and ``nn_module_stack``; writes both on the nodes it adds, with
``decomposed_from`` (the call they replace: the ONNX export, which swaps called layers, keeps
their linears in high precision), and ``stats["decomposed"]`` / ``stats["kept_whole"]``.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .manager import (
    Fp8Pass,
    PassResult,
    _clean_path,
    eliminate_dead_code,
    info,
    module_of,
    shape_of,
    value_of,
)
from .weights import _source_name

_PARAMETER = re.compile(r"\._parameters\['[^']*'\]$")  # a parameter's last step in its source
_MODULE_STEP = re.compile(r"\._modules\['([^']*)'\]")
_MHA = F.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(_MHA)
_ENCODER = getattr(torch, "_transformer_encoder_layer_fwd", None)
_ENCODER_ARGS = (
    "src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
    "use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2",
    "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask",
    "mask_type",
)


class _Emit:
    """Adds call nodes before ``at``, each with its example value (the call run on its
    inputs' fake tensors) and ``at``'s module stack, ending in ``module`` where given."""

    def __init__(self, graph: torch.fx.Graph, at: torch.fx.Node, call: str):
        self.graph, self.at, self.call = graph, at, call
        self.stack = dict(at.meta.get("nn_module_stack") or {})
        self.path = module_of(at)[0]
        # the fake mode of the graph's own example values (the tracing context's may differ)
        modes = (getattr(value_of(n), "fake_mode", None) for n in at.all_input_nodes)
        self.mode = next((m for m in modes if m is not None), contextlib.nullcontext())

    def __call__(self, target, *args, module: tuple[str, type] | None = None, **kwargs):
        op = "call_method" if isinstance(target, str) else "call_function"
        with self.graph.inserting_before(self.at):
            node = self.graph.create_node(op, target, args, kwargs)
        a, k = torch.fx.node.map_arg((args, kwargs), value_of)
        with self.mode:
            fn = getattr(a[0], target) if op == "call_method" else target
            node.meta["example_value"] = fn(*(a[1:] if op == "call_method" else a), **k)
        stack = dict(self.stack)
        if module is not None:
            stack[module[0]] = module
        node.meta["nn_module_stack"] = stack
        info(node)["decomposed_from"] = self.call
        return node

    def module_of_param(self, p: Any, cls: type, fallback: str) -> tuple[str, type]:
        """``(path, cls)`` of the module holding parameter ``p`` (its Dynamo source), else
        ``fallback`` under the call's own module."""
        source = _source_name(p) if isinstance(p, torch.fx.Node) else None
        if source is not None and _PARAMETER.search(source):
            path = _clean_path(_MODULE_STEP.sub(r".\1", _PARAMETER.sub("", source)))
        else:
            path = ".".join(s for s in (self.path, fallback) if s)
        return path, cls

    def additive(self, mask: Any, dtype: torch.dtype) -> Any:
        """A boolean mask (True: masked out) as the float mask that adds -inf there, as
        ``F._canonical_mask`` makes it; a float mask as it is."""
        if not isinstance(mask, torch.fx.Node) or value_of(mask).dtype != torch.bool:
            return mask
        zeros = self(torch.zeros_like, mask, dtype=dtype)
        return self("masked_fill", zeros, mask, float("-inf"))


def _attention(emit: _Emit, q_in, k_in, v_in, heads: int, w, bias, out_w, out_b, mask,
               dropout_p: float, causal: bool, batch_first: bool, separate=None):
    """The projections, scaled dot-product attention and output projection of
    ``F.multi_head_attention_forward`` (``batch_first``: inputs (B, L, E), else (L, B, E)).
    ``separate``: the q, k and v weights of ``use_separate_proj_weight``."""
    in_proj = emit.module_of_param(w if separate is None else separate[0],
                                   nn.MultiheadAttention, "self_attn")
    if separate is None and q_in is k_in is v_in:
        qkv = emit(F.linear, q_in, w, bias, module=in_proj)
        chunks = emit("chunk", qkv, 3, -1)
        q, k, v = (emit(operator.getitem, chunks, i) for i in range(3))
    else:
        if separate is None:
            ws = emit("chunk", w, 3)
            separate = [emit(operator.getitem, ws, i) for i in range(3)]
        bs = [None] * 3
        if bias is not None:
            b3 = emit("chunk", bias, 3)
            bs = [emit(operator.getitem, b3, i) for i in range(3)]
        q, k, v = (emit(F.linear, x, wi, bi, module=in_proj)
                   for x, wi, bi in zip((q_in, k_in, v_in), separate, bs))
    to_heads = (0, 2, 1, 3) if batch_first else (1, 2, 0, 3)  # -> (B, H, L, E/H)
    q, k, v = (emit("permute", emit("unflatten", t, -1, (heads, -1)), *to_heads)
               for t in (q, k, v))
    o = emit(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, dropout_p=dropout_p,
             is_causal=causal)
    o = emit("flatten", emit("permute", o, *((0, 2, 1, 3) if batch_first else (2, 0, 1, 3))), -2)
    return emit(F.linear, o, out_w, out_b,
                module=emit.module_of_param(out_w, nn.Linear, "self_attn.out_proj"))


class DecomposePass(Fp8Pass):
    """Take ``F.multi_head_attention_forward``, ``torch._transformer_encoder_layer_fwd`` and
    einsum-by-a-weight calls apart; see the module docstring."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        done: list[str] = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is _MHA:
                what, why = "F.multi_head_attention_forward (nn.MultiheadAttention)", \
                    self._mha(gm.graph, node)
            elif node.target is torch.einsum:
                if not self._einsum(gm.graph, node):
                    continue
                what, why = f"torch.einsum({node.args[0]!r}) (a product by a weight)", None
            elif _ENCODER is not None and node.target is _ENCODER:
                what, why = ("torch._transformer_encoder_layer_fwd (nn.TransformerEncoderLayer's "
                             "inference fast path)"), self._encoder(gm.graph, node)
            else:
                continue
            where = module_of(node)[0] or "-"
            if why is None:
                done.append(f"{where}: {what}")
                gm.graph.erase_node(node)
            else:
                self.ctx.stats.setdefault("kept_whole", []).append(f"{where}: {what}: {why}")
        if not done:
            return PassResult(gm, False)
        self.ctx.stats.setdefault("decomposed", []).extend(done)
        eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _mha(self, graph: torch.fx.Graph, node: torch.fx.Node) -> str | None:
        """Rewrite one ``F.multi_head_attention_forward`` call (its users take item 0, and
        item 1 where it is read); None if done, else why not."""
        try:
            a = _MHA_SIGNATURE.bind(*node.args, **node.kwargs)
        except TypeError as e:
            return f"arguments not understood ({e})"
        a.apply_defaults()
        a = a.arguments
        query = value_of(a["query"])
        if not isinstance(query, torch.Tensor) or query.dim() != 3:
            return "unbatched input: only (L, N, E) inputs are taken apart"
        for name in ("bias_k", "bias_v", "static_k", "static_v"):
            if a[name] is not None:
                return f"{name} is set: scaled dot-product attention has no place for it"
        if a["add_zero_attn"]:
            return "add_zero_attn=True: scaled dot-product attention has no place for it"
        # dropout_p may be a node (a float Dynamo made symbolic); the rest must be constants
        if not all(isinstance(a[k], (bool, int)) for k in
                   ("training", "need_weights", "is_causal", "num_heads")):
            return "a flag or the head count is a tensor"
        items = {}
        for user in node.users:
            if user.target is not operator.getitem or user.args[1] not in (0, 1):
                return f"its output is read by {user.name}, not taken as a pair"
            items.setdefault(user.args[1], []).append(user)
        if any(u.users for u in items.get(1, [])):
            return ("its attention weights are read (need_weights=True): they need the "
                    "softmax written out, not scaled dot-product attention")
        if a["is_causal"] and a["attn_mask"] is None:
            return "is_causal=True without attn_mask, which the call itself refuses"
        emit = _Emit(graph, node, "F.multi_head_attention_forward")
        kpm = emit.additive(a["key_padding_mask"], query.dtype)
        causal = bool(a["is_causal"]) and kpm is None and not a["need_weights"]
        mask = None
        if not causal:
            mask = emit.additive(a["attn_mask"], query.dtype)
            if mask is not None and value_of(mask).dim() == 3:  # (N * H, L, S)
                mask = emit("unflatten", mask, 0, (-1, a["num_heads"]))
            if kpm is not None:  # (N, S) -> (N, 1, 1, S)
                kpm = emit("unflatten", kpm, -1, (1, 1, -1))
                mask = kpm if mask is None else emit(operator.add, mask, kpm)
        separate = None
        if a["use_separate_proj_weight"]:
            separate = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
        out = _attention(emit, a["query"], a["key"], a["value"], a["num_heads"],
                         a["in_proj_weight"], a["in_proj_bias"], a["out_proj_weight"],
                         a["out_proj_bias"], mask, a["dropout_p"] if a["training"] else 0.0,
                         causal, batch_first=False, separate=separate)
        for user in items.get(0, []):
            user.replace_all_uses_with(out)
        for user in [u for us in items.values() for u in us]:
            graph.erase_node(user)
        return None

    def _einsum(self, graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
        """Rewrite ``torch.einsum`` of an activation and a 2-D parameter that contracts the
        activation's last dim and keeps the rest in order (``"...d,hd->...h"``,
        ``"bld,dh->blh"``, either operand first) as ``F.linear`` or a matmul; True if done.
        Any other einsum is left as it is."""
        if len(node.args) != 3 or node.kwargs or not isinstance(node.args[0], str):
            return False
        eq, *ops = node.args
        terms = eq.replace(" ", "").replace("...", "*").split("->")
        if len(terms) != 2 or terms[0].count(",") != 1:
            return False
        (t0, t1), out = terms[0].split(","), terms[1]
        is_param = [isinstance(o, torch.fx.Node) and self.ctx.is_parameter(o)
                    and len(shape_of(o) or ()) == 2 for o in ops]
        if is_param[0] == is_param[1]:
            return False
        w, x, (tw, tx) = (ops[0], ops[1], (t0, t1)) if is_param[0] else (ops[1], ops[0], (t1, t0))
        if len(tw) != 2 or tw[0] == tw[1] or not tx or "*" in tw:
            return False
        k, keep = tx[-1], tx[:-1]
        n = tw.replace(k, "", 1)
        if len(n) != 1 or k not in tw or k in keep or n in tx or out != keep + n \
                or len(set(keep.replace("*", ""))) != len(keep.replace("*", "")):
            return False
        emit = _Emit(graph, node, "torch.einsum")
        y = emit(F.linear, x, w) if tw == n + k else emit(torch.matmul, x, w)
        node.replace_all_uses_with(y)
        return True

    def _encoder(self, graph: torch.fx.Graph, node: torch.fx.Node) -> str | None:
        """Rewrite one ``torch._transformer_encoder_layer_fwd`` call as
        ``nn.TransformerEncoderLayer.forward``'s Python path computes it."""
        a = dict(zip(_ENCODER_ARGS, node.args))
        a.update(node.kwargs)
        src = value_of(a["src"])
        if not isinstance(src, torch.Tensor) or src.is_nested or src.dim() != 3:
            return "nested or unbatched input: only (B, L, E) tensors are taken apart"
        # eps may be a node (a float Dynamo made symbolic); the rest must be constants
        if not all(isinstance(a.get(k), (bool, int)) for k in
                   ("embed_dim", "num_heads", "use_gelu", "norm_first")):
            return "a flag or a size is a tensor"
        emit = _Emit(graph, node, "torch._transformer_encoder_layer_fwd")
        norm_first, e = a["norm_first"], a["embed_dim"]

        def norm(x, i):
            w, b = a[f"norm_weight_{i}"], a[f"norm_bias_{i}"]
            return emit(F.layer_norm, x, (e,), w, b, a["eps"],
                        module=emit.module_of_param(w, nn.LayerNorm, f"norm{i}"))

        mask = emit.additive(a.get("mask"), src.dtype)
        if mask is not None and a.get("mask_type") == 1:  # (B, S) -> (B, 1, 1, S)
            mask = emit("unflatten", mask, -1, (1, 1, -1))
        x = a["src"]
        h = norm(x, 1) if norm_first else x
        attn = _attention(emit, h, h, h, a["num_heads"], a["qkv_weight"], a["qkv_bias"],
                          a["proj_weight"], a["proj_bias"], mask, 0.0, False, batch_first=True)
        x = emit(operator.add, attn, x)
        if not norm_first:
            x = norm(x, 1)
        h = norm(x, 2) if norm_first else x
        for i, act in ((1, F.gelu if a["use_gelu"] else F.relu), (2, None)):
            w = a[f"ffn_weight_{i}"]
            h = emit(F.linear, h, w, a[f"ffn_bias_{i}"],
                     module=emit.module_of_param(w, nn.Linear, f"linear{i}"))
            if act is not None:
                h = emit(act, h)
        x = emit(operator.add, h, x)
        if not norm_first:
            x = norm(x, 2)
        node.replace_all_uses_with(x)
        return None
