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
   once (a lone linear keeps the single op: one custom op call instead of two, unless its
   input is an RMSNorm or SiLU·mul output nothing else reads, whose quantization FusePass
   then fuses into the producer)::

       linear(h, Wq) ─┐           quantize(h) → (hq, hs) ─┬→ linear_q(h, hq, hs, Wq)
       linear(h, Wk)  ├─  ⇒                               ├→ linear_q(h, hq, hs, Wk)
       linear(h, Wv) ─┘                                   └→ linear_q(h, hq, hs, Wv)

   Delayed scaling shares too: ``quantize_history`` of ``x`` with the scale of the first
   linear's activation history (every member's holds the same values), and
   ``fp8compile::linear_delayed_q`` per member, each still pushing into its own histories.

2. Projections fused (inference, ``fuse_projections``).  FP8 GEMMs that read one quantized
   input with the same recipe and output dtype, have no bias and take parameters as weights
   run as one GEMM over their concatenated FP8 weights, and each takes its columns of the
   result (a view)::

       scaled_mm(hq, Wq) ─┐          Wqkv = cat(Wq, Wk, Wv)   (weight cache, once per version)
       scaled_mm(hq, Wk)  ├─  ⇒      y = scaled_mm(hq, Wqkv);  q, k, v = narrow(y, -1, ...)
       scaled_mm(hq, Wv) ─┘

   One launch and one weight stream instead of three: at a few tokens a GEMM reads its
   weight and little else, and short GEMMs leave bandwidth unused at their start and end.
   Rowwise scales concatenate exactly, and 128x128 blocks do when every member's N is a
   multiple of 128 (else the group is left alone).  Tensorwise quantizes the concatenation
   with one scale, the largest member's; the plan lists each group and says so.  A group is
   also left alone when a member's output leaves the graph, is changed in place, or is
   viewed in a way its columns-of-a-wider-tensor strides do not allow.

3. Weight hoisting (inference).  ``quantize(w)`` of a parameter (or of ``t(w)``) leaves the
   graph and becomes two graph inputs fed by a :class:`WeightCache`, which requantizes only
   when the parameter's storage, shape, dtype or ``_version`` changed (an optimizer step or an
   in-place ``copy_`` under ``no_grad`` bump ``_version``; assigning ``p.data`` swaps storage)::

       quantize(w) → (wq, ws)  ⇒  placeholder wq, placeholder ws   (cache: once per version)

4. Cached weights in training (``cache_training_weights``).  Every training linear of a
   parameter becomes ``quantize(x.detach())`` and ``fp8compile::linear_w``, whose FP8 ``W``
   (forward) and ``Wᵀ`` (dX) come from a :class:`TrainingWeightCache` as graph inputs: they
   are made once per parameter version, not twice per call, which pays off over the
   micro-batches of gradient accumulation (the optimizer step bumps the version).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import sympy
import torch

from .. import numerics as nx
from ..config import Recipe
from ..ops import scale_shape
from ..ops._common import check_fp8_input
from ..ops.linear import weight_quants
from . import weights
from .manager import (
    Fp8Pass,
    PassResult,
    add_note,
    eliminate_dead_code,
    info,
    mutates,
    plan_entries_of,
    target_name,
    value_of,
)
from .rewrite import RewritePass

OPS = torch.ops.fp8compile


class WeightCache:
    """FP8 copy of one weight, or of several stacked along N (fused projections), per the
    parameters' versions, for one recipe.

    ``indices`` are the parameters' positions among the graph's inputs; ``transposed`` says
    which are given as ``(K, N)``.  ``key`` identifies the parameters' versions: storage
    pointer, shape, dtype, device and the autograd version counter of each.  The quantized
    copy lives as long as the compiled graph.
    """

    def __init__(self, indices: Sequence[int], transposed: Sequence[bool], granularity: str,
                 fmt: str, p2: bool):
        self.indices, self.transposed = tuple(indices), tuple(transposed)
        self.args = (granularity, fmt, p2)
        # The row order of two stacked weights (weights.ORDERS): None, as the graph stacks
        # them; 1, the second one's first (EpiloguePass sets it where a SwiGLU epilogue
        # reads them and the graph stacked up before gate).
        self.order: int | None = None
        self.key: tuple | None = None
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None
        self.quantizations = 0

    @property
    def form(self) -> tuple:
        """What, besides the parameters, the copy depends on (its row order aside)."""
        return (type(self).__name__, self.args, self.transposed)

    def get(self, args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        ws = [args[i] for i in self.indices]
        key = weights.version_key(ws)
        if key != self.key:
            # another graph's copy of these versions, else a new one
            value = weights.lookup(ws, self.form, self.order)
            if value is None and any(weights.released(w) for w in ws):
                value = weights.derive(ws, self.form, self.order)
                if value is None:
                    raise ValueError(self._released_error(ws))
            if value is None:
                with torch.no_grad():
                    srcs = [w.detach().transpose(-2, -1) if t else w.detach()
                            for w, t in zip(ws, self.transposed)]
                    if self.order is not None:
                        srcs = srcs[::-1]
                    src = torch.cat(srcs) if len(srcs) > 1 else srcs[0].contiguous()
                    value = tuple(self._quantize(src))
                self.quantizations += 1
            old = self.value
            if old is not None and any(a is not b for a, b in zip(old, value)) and all(
                    (a.shape, a.stride(), a.dtype, a.device)
                    == (b.shape, b.stride(), b.dtype, b.device) for a, b in zip(old, value)):
                # In place: CUDA-graph trees take the cache's outputs as static inputs,
                # and a new address makes them record the graph again (in training that
                # would be at every optimizer step).
                with torch.no_grad():
                    for a, b in zip(old, value):
                        a.copy_(b)
            else:
                self.value = value
            weights.put(ws, self.form, self.order, self.value)
            self.key = key
        return self.value

    def _released_error(self, ws: Sequence[torch.Tensor]) -> str:
        shapes = ", ".join(str(tuple(w.shape)) for w in ws)
        order = "" if self.order is None else ", the second weight's rows first"
        return (
            f"fp8hpf: a graph needs the FP8 copy of weight(s) {shapes} as {self.args[0]} "
            f"{self.args[1]}{order}, but their storage was released "
            "(Fp8Config.release_weights=True) and no copy in that form is left. Compile every "
            "graph of the model with the recipe and projection fusion of the graph that "
            "released them, compile with release_weights=False, or give the parameters new "
            "data (p.data = ...)."
        )

    def _quantize(self, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The reference numerics, not the Triton kernel (the same bits, tested): an inference
        # weight is quantized when the graph is compiled and again only if it changes, and
        # the kernel's first launches in a process (JIT cache lookup, launcher build) took
        # 0.5 s of a warm compile and 1.4-1.6 s of a cold one on an H200, for nothing else
        # the compile needs (docs/performance.md).
        check_fp8_input(src, "weight")
        g, fmt, p2 = self.args
        return nx.quantize_by_rows(src, nx.Granularity(g), nx.Fp8Format(fmt), p2)

    def set_gate_first(self, gate: int, args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """Serve the two stacked weights with the ``gate``-th (0 or 1) one's rows first (what
        a SwiGLU epilogue reads, ``torch.cat([gate, up])``); returns the copy for the example
        inputs ``args``.  Gate first already: the same copy.  Else the copy is reordered,
        which is exact (:func:`.weights.reorder`)."""
        value = self.get(args)
        want = None if gate == 0 else 1
        if want == self.order:
            return value
        ws = [args[i] for i in self.indices]
        self.value = weights.reorder(value, *weights.stacked_rows(ws, self.transposed),
                                     self.order, want)
        self.order = want
        weights.put(ws, self.form, want, self.value)
        return self.value


class GroupedWeightCache(WeightCache):
    """The FP8 copy of a grouped GEMM's ``(G, N, K)`` weight, one group's matrix at a time
    (:func:`fp8compile.numerics.quantize_grouped_weight`), per the parameter's version."""

    def _quantize(self, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check_fp8_input(src, "weight")
        g, fmt, p2 = self.args
        return nx.quantize_grouped_weight(src, nx.Granularity(g), nx.Fp8Format(fmt), p2)


class CachedWeight:
    """The provider of one graph input that a weight cache feeds: its ``i``-th tensor.

    Providers run in order, so ``i > 0`` comes right after ``i == 0`` has checked the
    versions for this call and takes the value without a second check.  The compiled
    graph's caller (``backend._with_extra_inputs``) checks the versions of every cached
    weight of a graph at once and skips these providers while none changed."""

    __slots__ = ("cache", "i")

    def __init__(self, cache: WeightCache, i: int):
        self.cache, self.i = cache, i

    def __call__(self, args: Sequence[Any]) -> torch.Tensor:
        return self.cache.get(args)[0] if self.i == 0 else self.cache.value[self.i]


class TrainingWeightCache(WeightCache):
    """Both FP8 copies of one weight that a training linear (``fp8compile::linear_w``) reads,
    per parameter version: ``W`` for the forward GEMM and ``Wᵀ`` for dX
    (:func:`fp8compile.ops.linear.weight_quants`; ``args`` is ``(recipe, fmt, p2)``)."""

    def __init__(self, index: int, recipe: str, fmt: str, p2: bool):
        super().__init__([index], [False], recipe, fmt, p2)

    def _quantize(self, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return weight_quants(src, *self.args)


class ScalesPass(Fp8Pass):
    """Deduplicate activation quantization; hoist weight quantization out (inference)."""

    after = (RewritePass,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        self._releasable: set[torch.fx.Node] = set()
        modified = self._share_activation_quant(graph)
        if self.ctx.inference:
            if self.ctx.release:
                eliminate_dead_code(graph)  # the rewrite leaves the old GEMMs' weight views
                self._releasable = self._cache_only_params(graph)
            if self.ctx.config.fuse_projections:
                modified |= self._fuse_projections(graph)
            modified |= self._hoist_weights(graph)
        else:
            modified |= self._share_training_quant(graph)
            modified |= self._share_delayed_quant(graph)
            if self.ctx.config.cache_training_weights:
                modified |= self._cache_training_weights(graph)
        if modified:
            eliminate_dead_code(graph)
            graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    def _fusable_lone_input(self, x: Any, linear: torch.fx.Node) -> bool:
        """A lone linear's input that FusePass will fuse into its producer: read by that
        linear alone, the output of a fusable producer, and producer fusion on."""
        from .fuse import fusable_producer

        return (self.ctx.config.fuse_producers and isinstance(x, torch.fx.Node)
                and set(x.users) == {linear} and fusable_producer(x) is not None)

    def _share_activation_quant(self, graph: torch.fx.Graph) -> bool:
        # Weights too: a module called twice quantizes its weight twice (and would cache it
        # twice in inference).
        seen: dict[tuple, torch.fx.Node] = {}
        modified = False
        for node in list(graph.nodes):
            if node.target not in (OPS.quantize.default, OPS.quantize_scaled.default) or \
                    info(node).get("role") not in ("act_quant", "weight_quant"):
                continue
            key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
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
                x, _w, _b, recipe, act_fmt, _wf, _gf, p2, *_acc = node.args
                groups.setdefault((x, recipe, act_fmt, p2), []).append(node)
        modified = False
        for (x, recipe, act_fmt, p2), nodes in groups.items():
            # A lone linear keeps the single op, unless its input comes from an RMSNorm or a
            # SiLU·mul that reads nothing else: FusePass then fuses the quantization there.
            # With cached weights every linear takes this form (linear_w follows from it).
            alone_ok = len(nodes) == 1 and (self._fusable_lone_input(x, nodes[0])
                                            or self.ctx.config.cache_training_weights)
            if (len(nodes) < 2 and not alone_ok) or \
                    not all(_only_output_used(n) for n in nodes):
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
                _, w, b, _, _, wf, gf, _, *accs = node.args
                with graph.inserting_before(node):
                    new = graph.call_function(
                        OPS.linear_q.default, (x, xq, xs, w, b, recipe, act_fmt, wf, gf, p2, *accs)
                    )
                    y = graph.call_function(operator.getitem, (new, 0))
                info(new).update(info(node))
                _replace_output(graph, node, y)
            modified = True
        return modified

    def _share_delayed_quant(self, graph: torch.fx.Graph) -> bool:
        """Delayed scaling: linears that read one tensor (q/k/v, gate/up) quantize it once.

        Each ``linear_delayed`` keeps its own histories.  Their activation rows hold the same
        values (every call pushes the same ``amax(x)`` into each), so the first member's row
        gives the shared scale, and every member still gets ``x``'s amax pushed::

            linear_delayed(x, W_i, h_i, g_i)       xq, xs, ax = quantize_history(x, h_1[0])
            push_amax(h_i, [ax_i, aw_i])     ⇒     linear_delayed_q(x, xq, xs, W_i, h_i, g_i)
                                                   push_amax(h_i, [ax, aw_i])

        A lone linear whose input is an RMSNorm or SiLU·mul output takes this form too, so
        that FusePass fuses the cast into the producer.
        """
        groups: dict[tuple, list[torch.fx.Node]] = {}
        for node in graph.nodes:
            if node.target is OPS.linear_delayed.default and _delayed_users_known(node):
                x, _w, _b, _h, _g, act_fmt, _wf, _gf, p2, *_acc = node.args
                groups.setdefault((x, act_fmt, p2), []).append(node)
        modified = False
        for (x, act_fmt, p2), nodes in groups.items():
            # A lone linear too where FusePass can then fuse the cast into x's producer.
            if len(nodes) < 2 and not self._fusable_lone_input(x, nodes[0]):
                continue
            with graph.inserting_before(nodes[0]):
                xd = graph.call_method("detach", (x,))
                row = graph.call_function(operator.getitem, (nodes[0].args[3], 0))
                q = graph.call_function(OPS.quantize_history.default,
                                        (xd, None, None, 0.0, "none", row, act_fmt, p2))
                xq, xs, x_amax = (graph.call_function(operator.getitem, (q, i))
                                  for i in range(3))
            info(q)["role"] = "act_quant_delayed"
            for node in nodes:
                _, w, b, hist, ghist, _, wf, gf, _, *accs = node.args
                with graph.inserting_before(node):
                    new = graph.call_function(
                        OPS.linear_delayed_q.default,
                        (x, xq, xs, w, b, hist, ghist, act_fmt, wf, gf, p2, *accs))
                    y = graph.call_function(operator.getitem, (new, 0))
                    w_amax = graph.call_function(operator.getitem, (new, 2))
                    amax = graph.call_function(torch.stack, ([x_amax, w_amax],))
                info(new).update(info(node), shared_input=True)
                for user in list(node.users):
                    if user.args[1] == 4:
                        user.replace_all_uses_with(amax)
                        graph.erase_node(user)
                _replace_output(graph, node, y)
            modified = True
        return modified

    def _cache_training_weights(self, graph: torch.fx.Graph) -> bool:
        """``linear_q`` of a parameter → ``linear_w`` fed by a :class:`TrainingWeightCache`
        (``cache_training_weights``): W and Wᵀ are quantized once per parameter version."""
        modified = False
        for node in list(graph.nodes):
            if node.target is not OPS.linear_q.default or not _only_output_used(node):
                continue
            x, xq, xs, w, b, recipe, act_fmt, wf, gf, p2, *accs = node.args
            index = self.ctx.placeholder_index(w)
            if index is None:
                continue
            cache = TrainingWeightCache(index, recipe, wf, p2)
            wg = Recipe(recipe).weight_granularity.value
            shape = tuple(self.ctx.example_inputs[index].shape)
            inputs = self._cache_inputs(graph, w.name, cache, shape, wg,
                                        ("fp8", "scale", "fp8_t", "scale_t"))
            with graph.inserting_before(node):
                new = graph.call_function(OPS.linear_w.default,
                                          (x, xq, xs, w, *inputs, b, recipe, act_fmt, wf, gf,
                                           p2, *accs))
            info(new).update(info(node), weights_cached=True)
            _replace_output(graph, node, new)
            modified = True
        return modified

    def _fuse_projections(self, graph: torch.fx.Graph) -> bool:
        groups: dict[tuple, list[tuple[torch.fx.Node, torch.fx.Node]]] = {}
        for node in graph.nodes:
            if node.target is not OPS.scaled_mm.default:
                continue
            xq, xs, xg, wq, ws, wg, bias, out_dtype, acc, epilogue, residual = node.args
            wqs = _weight_quant_of(wq, ws)
            if (bias is not None or epilogue != "none" or residual is not None or wqs is None
                    or self._weight_param(wqs) is None):
                continue
            # The shared quantization's outputs: getitem nodes, one pair per consumer.
            key = (_item(xq), _item(xs), xg, wg, out_dtype, acc, tuple(wqs.args[1:]))
            groups.setdefault(key, []).append((node, wqs))
        modified = False
        for (_, _, _, wg, _, _, qargs), members in groups.items():
            if len(members) < 2:
                continue
            shapes = [self._weight_shape(wqs) for _, wqs in members]
            if wg == nx.Granularity.BLOCK.value and any(n % nx.BLOCK for n, _ in shapes):
                continue
            offsets = [0]
            for n, _ in shapes:
                offsets.append(offsets[-1] + n)
            if not all(_columns_usable(mm, offsets[-1], off)
                       for (mm, _), off in zip(members, offsets)):
                continue
            self._fuse_group(graph, members, offsets, qargs)
            modified = True
        return modified

    def _cache_only_params(self, graph: torch.fx.Graph) -> set[torch.fx.Node]:
        """Parameter placeholders whose one reader is a weight quantization (of the parameter
        or of its transpose), which becomes a weight cache: once that cache holds the FP8
        copy, nothing reads the parameter.  Only parameters that are all of their storage."""
        readers: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for node in graph.nodes:
            if node.target in (OPS.quantize.default, OPS.quantize_grouped_weight.default) and \
                    info(node).get("role") == "weight_quant" and \
                    (found := self._weight_param(node)) is not None:
                readers.setdefault(found[0], []).append(node)
        out = set()
        for param, quants in readers.items():
            w = self.ctx.example_inputs[self.ctx.placeholder_index(param)]
            (src,) = quants[0].args[:1]  # the parameter, or its transpose
            if (len(quants) == 1 and isinstance(w, torch.nn.Parameter)
                    and (weights.owns_storage(w) or weights.released(w))
                    and set(param.users) == {src if src is not param else quants[0]}
                    and set(src.users) == {quants[0]}):
                out.add(param)
        return out

    def _weight_param(self, wqs: torch.fx.Node) -> tuple[torch.fx.Node, bool] | None:
        """(parameter placeholder, transposed) behind a weight ``quantize``, if hoistable."""
        src = wqs.args[0]
        transposed = src.op == "call_function" and src.target in (torch.t, torch.transpose)
        param = src.args[0] if transposed else src
        return (param, transposed) if self.ctx.placeholder_index(param) is not None else None

    def _weight_shape(self, wqs: torch.fx.Node) -> tuple[int, int]:
        """(N, K) of the FP8 weight; a grouped weight's groups stacked along N."""
        param, transposed = self._weight_param(wqs)
        w = self.ctx.example_inputs[self.ctx.placeholder_index(param)]
        n, k = (w.shape[-1], w.shape[-2]) if transposed else (w.shape[-2], w.shape[-1])
        return (math.prod(w.shape[:-2]) * n, k)

    def _fuse_group(self, graph, members, offsets, qargs) -> None:
        first = members[0][0]
        k_dim = self._weight_shape(members[0][1])[1]
        sources = [self._weight_param(wqs) for _, wqs in members]
        names = [str(info(mm).get("module") or mm.name) for mm, _ in members]
        cache = WeightCache([self.ctx.placeholder_index(p) for p, _ in sources],
                            [t for _, t in sources], *qargs)
        wq, ws = self._cache_inputs(graph, "_".join(p.name for p, _ in sources), cache,
                                    (offsets[-1], k_dim), qargs[0])
        xq, xs, xg, _, _, wg, *rest = first.args
        with graph.inserting_before(first):
            fused = graph.call_function(OPS.scaled_mm.default, (xq, xs, xg, wq, ws, wg, *rest))
        entries = [e for mm, _ in members for e in plan_entries_of(mm)]
        info(fused).update(role="fp8_gemm", fused_from=names, entries=entries)
        for e in entries:
            add_note(e, "one GEMM with " + ", ".join(
                o.module or o.name for o in entries if o is not e) + " (stacked weights)")
        fused.meta.update({k: v for k, v in first.meta.items() if k not in ("fp8compile", "val",
                                                                          "example_value")})
        for (mm, wqs), lo, hi in zip(members, offsets, offsets[1:]):
            with graph.inserting_before(mm):
                cols = graph.call_function(torch.narrow, (fused, -1, lo, hi - lo))
            cols.meta.update({k: v for k, v in mm.meta.items() if k != "fp8compile"})
            info(cols).update(role="fp8_gemm_columns", fused_into=names)
            mm.replace_all_uses_with(cols)
            graph.erase_node(mm)
            for user in list(wqs.users):
                if not user.users:
                    graph.erase_node(user)
            if not wqs.users:
                graph.erase_node(wqs)
        group = " + ".join(f"{name} ({n})" for name, n in zip(
            names, (b - a for a, b in zip(offsets, offsets[1:]))))
        shared = qargs[0] == nx.Granularity.TENSOR.value
        self.ctx.stats.setdefault("fused_gemms", []).append(
            f"{group} = N {offsets[-1]}: one {qargs[0]}-scaled FP8 GEMM"
            + (" (one weight scale for the group: the largest member's)" if shared else ""))

    def _hoist_weights(self, graph: torch.fx.Graph) -> bool:
        modified = False
        for node in list(graph.nodes):
            grouped = node.target is OPS.quantize_grouped_weight.default
            if (node.target is not OPS.quantize.default and not grouped) or \
                    info(node).get("role") != "weight_quant":
                continue
            found = self._weight_param(node)
            if found is None:
                continue
            param, transposed = found
            shape = self._weight_shape(node)
            kind = GroupedWeightCache if grouped else WeightCache
            cache = kind([self.ctx.placeholder_index(param)], [transposed], *node.args[1:])
            wq, ws = self._cache_inputs(graph, param.name, cache, shape, node.args[1])
            for user in list(node.users):
                if user.target is operator.getitem:
                    user.replace_all_uses_with(wq if user.args[1] == 0 else ws)
                    graph.erase_node(user)
            graph.erase_node(node)
            modified = True
        return modified

    def _cache_inputs(self, graph, stem: str, cache: "WeightCache", shape: tuple[int, int],
                      granularity: str, names: Sequence[str] = ("fp8", "scale")):
        """The graph inputs a weight cache feeds, one per name (each pair: an FP8 weight and
        its scales); its weights are counted in the plan's weight memory figures (``shape``:
        the FP8 copy's, stored ``len(names) // 2`` times, scaled by ``granularity``)."""
        nodes = [self.ctx.add_input(graph, f"{stem}_{name}", CachedWeight(cache, i))
                 for i, name in enumerate(names)]
        for node in nodes:
            info(node).update(role="weight_input", weight_cache=cache)
        self._count_weights(cache, shape, granularity, len(names) // 2)
        self.ctx.weight_caches.append(cache)
        self._release_early(graph, cache)
        return nodes

    def _release_early(self, graph: torch.fx.Graph, cache: "WeightCache") -> None:
        """Free the storage of the cache's parameters that nothing else reads, now that it
        holds their FP8 copy (``release_weights``): the compile then never holds both
        copies of every weight at once.  The backend releases the rest at the end."""
        placeholders = list(graph.find_nodes(op="placeholder"))
        free = [i for i in cache.indices if placeholders[i] in self._releasable]
        if not free:
            return
        weights.Releaser(free, [cache])(self.ctx.example_inputs, self.ctx.stats)

    def _count_weights(self, cache: "WeightCache", shape: tuple[int, int], granularity: str,
                       copies: int = 1) -> None:
        """Add a cache's weights to the plan's weight memory figures (``shape``: its FP8
        copy's, held ``copies`` times)."""
        stats = self.ctx.stats
        weights = [self.ctx.example_inputs[i] for i in cache.indices]
        n_scales = max(1, math.prod(scale_shape(shape, nx.Granularity(granularity))))
        stats["weight_bytes"] = stats.get("weight_bytes", 0) + sum(
            w.numel() * w.element_size() for w in weights)
        stats["fp8_weight_bytes"] = (
            stats.get("fp8_weight_bytes", 0) + copies * (math.prod(shape) + 4 * n_scales)
        )
        stats["quantized_weights"] = stats.get("quantized_weights", 0) + len(weights)


__all__ = ["CachedWeight", "GroupedWeightCache", "ScalesPass", "TrainingWeightCache",
           "WeightCache"]


def _item(node: Any) -> Any:
    """``(source, index)`` for ``getitem(source, index)``, else the node itself."""
    if isinstance(node, torch.fx.Node) and node.target is operator.getitem:
        return node.args[0], node.args[1]
    return node


def _weight_quant_of(wq: Any, ws: Any) -> torch.fx.Node | None:
    """The weight ``quantize`` node whose two outputs ``wq`` and ``ws`` are, if they are."""
    if not all(isinstance(n, torch.fx.Node) and n.target is operator.getitem for n in (wq, ws)):
        return None
    node = wq.args[0]
    if (ws.args[0] is not node or (wq.args[1], ws.args[1]) != (0, 1)
            or node.target is not OPS.quantize.default
            or info(node).get("role") != "weight_quant"):
        return None
    return node


def _columns_usable(mm: torch.fx.Node, n_total: int, offset: int) -> bool:
    """Every user of ``mm`` works on the member's columns of an ``(..., n_total)`` result as
    well as on a contiguous output: no graph output, no in-place op, and each ``view``
    possible on those strides (tried on a meta tensor).

    Symbolic sizes (a dynamic batch or sequence) are tried with a distinct prime for each
    symbol: Dynamo specializes sizes 0 and 1, so a symbol stands for sizes >= 2, and a view
    of narrowed columns that works for those works for every such size."""
    val = value_of(mm)
    if not isinstance(val, torch.Tensor) or val.dim() < 1:
        return False
    sizes = _GenericSizes()
    shape = [sizes(d) for d in val.shape]
    if None in shape:
        return False
    base = torch.empty((*shape[:-1], n_total), device="meta", dtype=val.dtype)
    cols = base.narrow(-1, offset, shape[-1])
    for user in mm.users:
        if user.op == "output" or mutates(user):
            return False
        if target_name(user) == "view" and user.args and user.args[0] is mm:
            dims = user.args[1:]
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
            dims = [sizes(d) for d in dims]
            if None in dims:
                return False
            try:
                cols.view(*dims)
            except RuntimeError:
                return False
    return True


class _GenericSizes:
    """An int for a size given as an int, a SymInt, or a graph node holding one: symbols
    replaced by distinct primes (3, 5, 7, ...); None for anything else."""

    PRIMES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47)

    def __init__(self) -> None:
        self.subs: dict = {}

    def __call__(self, d: Any) -> int | None:
        if isinstance(d, torch.fx.Node):
            d = value_of(d)
        if isinstance(d, int):
            return d
        if not isinstance(d, torch.SymInt):
            return None
        expr = d.node.expr
        for sym in sorted(expr.free_symbols, key=str):
            if sym not in self.subs:
                if len(self.subs) == len(self.PRIMES):
                    return None
                self.subs[sym] = sympy.Integer(self.PRIMES[len(self.subs)])
        value = sympy.sympify(expr.xreplace(self.subs))
        return int(value) if value.is_Integer else None


def _replace_output(graph: torch.fx.Graph, node: torch.fx.Node, y: torch.fx.Node) -> None:
    """Point the users of ``node``'s output (its ``getitem(node, 0)`` nodes) at ``y``, which
    takes their value metadata where it has none, and erase ``node`` and those getitems."""
    for user in list(node.users):
        if "val" not in y.meta and "example_value" not in y.meta:
            y.meta.update({k: v for k, v in user.meta.items() if k != "fp8compile"})
        user.replace_all_uses_with(y)
        graph.erase_node(user)
    graph.erase_node(node)


def _delayed_users_known(node: torch.fx.Node) -> bool:
    """A ``linear_delayed`` whose users take its output (index 0) or pass its amax (index 4)
    to ``push_amax`` of its own history, as RewritePass wrote it."""
    for u in node.users:
        if u.target is not operator.getitem or u.args[1] not in (0, 4):
            return False
        if u.args[1] == 4 and not all(p.target is OPS.push_amax.default
                                      and p.args[0] is node.args[3] for p in u.users):
            return False
    return True


def _only_output_used(node: torch.fx.Node) -> bool:
    """Every user of the ``linear`` node takes its output (index 0), not its FP8 copy."""
    return all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)
