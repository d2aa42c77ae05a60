"""FusePass: move activation quantization into the op that produces the activation.

Reads ``role="act_quant"`` (RewritePass, deduplicated by ScalesPass).  Writes ``role`` =
``"fused_quant"`` and ``fused_from`` (the producer's op name) on the node it introduces.

Only when *every* user of the producer's output is that one quantization (so the
high-precision activation is no longer needed anywhere)::

    h = rms_norm(x, (d,), w, eps)               q, s = fp8compile.rmsnorm_quantize(x, w, eps, ...)
    q, s = fp8compile.quantize(h, ...)     ⇒

    a = silu(gate); h = a * up                  q, s = fp8compile.silu_mul_quantize(gate, up, ...)
    q, s = fp8compile.quantize(h, ...)     ⇒

and the RMSNorm that ``transformers`` models write out by hand (LlamaRMSNorm and its copies
in Mistral, Qwen, ...)::

    hs = x.to(float32); r = rsqrt(hs.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * (hs * r).to(dtype)             q, s = fp8compile.rmsnorm_quantize(x, w, eps, ..)
    q, s = fp8compile.quantize(h, ...)     ⇒

The activation is then written once, in FP8, instead of in the model dtype and again in FP8
(for d=4096 and 4096 tokens in bf16: 32 MiB written and read back per norm saved).
``Fp8Config(fuse_producers=False)`` turns the pass off.

When the norm's input is a residual stream's add of two tensors of one shape and dtype, the
add moves into the fused op too (``residual=``), added in fp32 as Inductor adds it inside a
fused norm.  The add stays in the graph for its other readers (the next residual add), where
Inductor fuses it as before; the norm no longer needs its sum written out::

    x = a + b; h = rms_norm(x, ...)             x = a + b   (for x's other users)
    q, s = fp8compile.quantize(h, ...)     ⇒    q, s = rmsnorm_quantize(a, w, eps, ..., residual=b)

In training graphs the linears quantize ``h.detach()`` (ScalesPass) and take ``h`` itself only
to carry its gradient (``fp8compile::linear_q`` never reads its value).  The quantization is
then fused the same way, from detached producer inputs, and ``h`` stays in the graph for
autograd: nothing reads it in the forward, so the compiled forward does not write it::

    h = rms_norm(x, (d,), w, eps)               h = rms_norm(x, (d,), w, eps)
    q, s = quantize(h.detach(), ...)       ⇒    q, s = rmsnorm_quantize(x.detach(), w.detach(), ..)
    y = linear_q(h, q, s, W, ...)               y = linear_q(h, q, s, W, ...)

Delayed scaling's shared cast (``fp8compile::quantize_history``, ScalesPass) is fused the same
way, by naming its producer: ``quantize_history(h.detach(), ..., "none", row)`` becomes
``quantize_history(x.detach(), None, w.detach(), eps, "rmsnorm", row)`` or
``quantize_history(gate.detach(), up.detach(), None, 0.0, "silu_mul", row)``.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from .manager import (
    Fp8Pass,
    PassResult,
    add_note,
    dtype_of,
    eliminate_dead_code,
    info,
    plan_entries_of,
)
from .scales import ScalesPass

OPS = torch.ops.fp8compile
_RMS_NORM = {F.rms_norm, torch.rms_norm}
_SILU = {F.silu}
_MUL = {operator.mul, torch.mul}
_ADD = {operator.add, torch.add}


def _arg(node: torch.fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


class FusePass(Fp8Pass):
    """Fuse RMSNorm → quantize and SiLU·mul → quantize; see the module docstring."""

    after = (ScalesPass,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        # Fp8Config.fuse_producers=False: nothing is fused (the stats and notes still run).
        candidates = list(graph.nodes) if self.ctx.config.fuse_producers else []
        absorbed = []  # (producer nodes the fused op computes, the fused op) of each fusion
        for node in candidates:
            if node.target is OPS.quantize_history.default:
                fuse = self._fuse_history
            elif node.target is OPS.quantize_scaled.default and \
                    info(node).get("role") == "act_quant" and node.args[2] == "tensor":
                fuse = self._fuse_static
            elif node.target is OPS.quantize.default and info(node).get("role") == "act_quant":
                fuse = self._fuse
            else:
                continue
            src = node.args[0]
            new = fuse(graph, node)
            if new is not None:
                absorbed.append((_upstream(src), new))
        modified = bool(absorbed)
        if modified:
            eliminate_dead_code(graph)
            graph.lint()
            gm.recompile()
            _note_absorbed(graph, absorbed)
        self.ctx.stats["fused_quantizations"] = sum(
            1 for n in graph.nodes if info(n).get("role") == "fused_quant"
        )
        _note_shared_and_fused(graph)
        return PassResult(gm, modified)

    def _fuse(self, graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node | None:
        """The fused op put in place of the activation quantization ``node``, or None."""
        src, gran, fmt, p2 = node.args
        found = self._producer(src, node)
        if found is None:
            return None
        target, args, name, kwargs, carried = found
        return _replace(graph, node, target, args, (gran, fmt, p2), carried, name, kwargs)

    def _producer(self, src, node: torch.fx.Node):
        """``(fused op, its leading args, name, kwargs, carried)`` for the quantization ``node`` of
        ``src``, when ``src`` is read by ``node`` only and is (the detached copy of) a
        fusable producer's output; ``carried``: the producer's output only carries the
        gradient (training), so the fused op reads detached inputs."""
        if not isinstance(src, torch.fx.Node) or set(src.users) != {node}:
            return None
        carried = not self.ctx.inference and _is_method(src, "detach") and \
            only_carried(src.args[0], src)
        fused = fusable_producer(src.args[0] if carried else src)
        return None if fused is None else (*fused, carried)

    def _fuse_history(self, graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node | None:
        """Delayed scaling's shared cast (``quantize_history`` of ``h.detach()``, ScalesPass)
        takes the producer of ``h`` in: ``producer="rmsnorm"``, ``"add_rmsnorm"`` or
        ``"silu_mul"``.  Returns the new cast, or None."""
        src, _x2, _norm_weight, _eps, producer, row, fmt, p2 = node.args
        found = self._producer(src, node) if producer == "none" else None
        if found is None:
            return None
        target, args, name, kwargs, carried = found
        if not carried:
            return None
        return _replace(graph, node, OPS.quantize_history.default,
                        _named_producer(target, args, kwargs), (row, fmt, p2), carried, name)

    def _fuse_static(self, graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node | None:
        """Static scaling's cast (``quantize_scaled(h, scale, "tensor", fmt)``, inference)
        becomes ``quantize_static`` of h's producer, with the same scale.  Returns the new
        cast, or None."""
        src, scale, _gran, fmt = node.args
        found = self._producer(src, node)
        if found is None:
            return None
        target, args, name, kwargs, carried = found
        return _replace(graph, node, OPS.quantize_static.default,
                        _named_producer(target, args, kwargs), (scale, fmt), carried, name)

    @staticmethod
    def _rms_norm(src: torch.fx.Node):
        if src.op != "call_function" or src.target not in _RMS_NORM:
            return None
        x = _arg(src, 0, "input")
        shape = _arg(src, 1, "normalized_shape")
        weight, eps = _arg(src, 2, "weight"), _arg(src, 3, "eps")
        if not isinstance(shape, (list, tuple)) or len(shape) != 1:
            return None  # normalizes over more than the last dim
        if eps is None:
            dt = dtype_of(x)
            eps = torch.finfo(dt).eps if dt is not None else None
        if not isinstance(eps, float):
            return None
        return _norm_of(x, weight, eps)

    @staticmethod
    def _written_rms_norm(src: torch.fx.Node):
        """``weight * (hs * rsqrt(mean(hs**2, -1, keepdim) + eps)).to(dt)``, hs = x.to(f32)."""
        if not _is_mul(src):
            return None
        for weight, normed in (src.args, src.args[::-1]):
            if not (isinstance(weight, torch.fx.Node) and weight.op == "placeholder"):
                continue
            if len(_shape(weight) or ()) != 1:
                continue
            h1 = _skip_casts(normed)
            if not _is_mul(h1):
                continue
            for hs, r in (h1.args, h1.args[::-1]):
                eps = _rsqrt_mean_square_eps(r, hs)
                if eps is not None:
                    x = hs.args[0] if _is_method(hs, "to", "float") else hs
                    if _shape(x) and _shape(weight)[0] == _shape(x)[-1]:
                        return _norm_of(x, weight, eps)
        return None

    @staticmethod
    def _silu_mul(src: torch.fx.Node):
        if src.op != "call_function" or src.target not in _MUL or len(src.args) != 2:
            return None
        a, b = src.args
        for act, other in ((a, b), (b, a)):
            if (
                isinstance(act, torch.fx.Node) and isinstance(other, torch.fx.Node)
                and act.op == "call_function" and act.target in _SILU
                and set(act.users) == {src} and not act.kwargs.get("inplace", False)
                and dtype_of(act) == dtype_of(other)
            ):
                return OPS.silu_mul_quantize.default, (act.args[0], other), "silu*mul", {}
        return None


def _named_producer(target, args: tuple, kwargs: dict) -> tuple:
    """The fused op ``target(*args, **kwargs)`` that :func:`fusable_producer` found, as the
    leading arguments of the casts that name their producer (``quantize_history``,
    ``quantize_static``): ``(x, x2, norm_weight, eps, producer)``."""
    if target is OPS.rmsnorm_quantize.default:
        x, weight, eps = args
        residual = kwargs.get("residual")
        return x, residual, weight, eps, "rmsnorm" if residual is None else "add_rmsnorm"
    gate, up = args
    return gate, up, None, 0.0, "silu_mul"


def _norm_of(x, weight, eps):
    """The fused RMSNorm of ``x``, taking in ``x = a + b`` as ``residual=b`` where it can."""
    add = _residual_add(x)
    if add is None:
        return OPS.rmsnorm_quantize.default, (x, weight, eps), "rms_norm", {}
    a, b = add
    return (OPS.rmsnorm_quantize.default, (a, weight, eps), "residual add + rms_norm",
            {"residual": b})


def _residual_add(x):
    """``(a, b)`` when ``x = a + b`` adds two tensors of x's shape and floating dtype (no
    ``alpha``, no broadcast, no type promotion), else None."""
    if not is_add(x) or x.kwargs:
        return None
    a, b = x.args
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
        return None
    shape, dt = _shape(x), dtype_of(x)
    if shape is None or dt is None or not dt.is_floating_point:
        return None
    if any(_shape(t) != shape or dtype_of(t) != dt for t in (a, b)):
        return None
    return a, b


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, target, args: tuple, rest: tuple,
             carried: bool, name: str, kwargs: dict | None = None) -> torch.fx.Node:
    """Put ``target(*args, *rest, **kwargs)`` in place of the quantization ``node`` (tensor
    arguments detached where ``carried``), marked as a quantization fused into ``name``;
    returns the new node."""
    kwargs = kwargs or {}
    with graph.inserting_before(node):
        if carried:
            def detached(a):
                return graph.call_method("detach", (a,)) if isinstance(a, torch.fx.Node) else a

            args = tuple(detached(a) for a in args)
            kwargs = {k: detached(a) for k, a in kwargs.items()}
        new = graph.call_function(target, (*args, *rest), kwargs)
    info(new).update(role="fused_quant", fused_from=name)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


# How far above a fused quantization's input its producer's nodes can sit: a norm written
# out in torch ops is ~7 nodes deep (casts, pow, mean, add eps, rsqrt, two muls), and its
# residual add one more.
_PRODUCER_DEPTH = 10


def _upstream(src) -> list[torch.fx.Node]:
    """``src`` and the nodes above it, to :data:`_PRODUCER_DEPTH` levels: a superset of the
    producer nodes that a fused op computes in place of ``src``."""
    if not isinstance(src, torch.fx.Node):
        return []
    found, seen, level = [src], {src}, [src]
    for _ in range(_PRODUCER_DEPTH):
        above = []
        for n in level:
            for a in n.all_input_nodes:
                if a.op in ("call_function", "call_method") and a not in seen:
                    seen.add(a)
                    above.append(a)
        found += above
        level = above
    return found


def _residual_pair(fused: torch.fx.Node) -> set | None:
    """The two inputs of the residual add a fused norm computes (detaches looked through),
    or None when it reads no residual."""
    if fused.target in (OPS.quantize_history.default, OPS.quantize_static.default):
        pair = fused.args[:2] if fused.args[4] == "add_rmsnorm" else None
    else:
        residual = fused.kwargs.get("residual")
        pair = None if residual is None else (fused.args[0], residual)
    if pair is None:
        return None
    return {a.args[0] if _is_method(a, "detach") else a for a in pair}


def _note_absorbed(graph: torch.fx.Graph, absorbed) -> None:
    """Say in the plan which producer nodes now run inside a fused op: those the fusion left
    without users (gone from the graph), and the residual add a fused norm reads, which also
    stays in the graph where the residual stream goes on."""
    alive = set(graph.nodes)
    for nodes, fused in absorbed:
        what = f"the fused {info(fused)['fused_from']} -> FP8 op"
        pair = _residual_pair(fused)
        for n in nodes:
            entry = info(n).get("entry")
            if entry is None:
                continue
            if n not in alive and entry.rule == "as-is":
                # no longer "runs in its input dtype, fused by Inductor"
                entry.reason = f"no GEMM: runs inside {what} (fp32 inside)"
            elif n not in alive:
                add_note(entry, f"runs inside {what}")
            elif pair is not None and is_add(n) and set(n.args[:2]) == pair:
                add_note(entry, f"also computed inside {what}")


def _note_shared_and_fused(graph: torch.fx.Graph) -> None:
    """Say in the plan which FP8 linears share one quantization of their input (ScalesPass)
    and which quantizations sit in their producer (this pass)."""
    for n in graph.nodes:
        role = info(n).get("role")
        if role not in ("act_quant", "act_quant_delayed", "fused_quant"):
            continue
        # Consumers of the payload: through getitem where the op also returns scales, else
        # directly (static scaling's casts return the payload alone).
        readers = [c for g in n.users if g.target is operator.getitem for c in g.users] \
            or list(n.users)
        found = (e for c in readers for e in plan_entries_of(c))
        entries = list({id(e): e for e in found}.values())
        for e in entries:
            others = [_label(o, e) for o in entries if o is not e]
            if others:
                add_note(e, "input quantized once, shared with " + ", ".join(others))
            if role == "fused_quant":
                add_note(e, f"input quantization fused into its {info(n)['fused_from']}")


def _label(entry, seen_from) -> str:
    """A linear's name in another's plan reason: its module, and its node where both are
    calls of one module."""
    name = entry.module or entry.name
    return f"{name} ({entry.name})" if entry.module == seen_from.module else name


def fusable_producer(src: torch.fx.Node):
    """``(fused op, its leading args, name, its kwargs)`` when ``src`` is an RMSNorm or a
    SiLU·mul whose quantization :class:`FusePass` can fuse, else None."""
    return (FusePass._rms_norm(src) or FusePass._written_rms_norm(src)
            or FusePass._silu_mul(src))


def only_carried(h: torch.fx.Node, detached: torch.fx.Node) -> bool:
    """Every user of ``h`` is ``detached`` or a training linear that takes ``h`` only to carry
    its gradient (``linear_q``'s or ``linear_w``'s first argument, not read in the
    forward)."""
    return all(
        u is detached or (u.target in (OPS.linear_q.default, OPS.linear_w.default,
                                       OPS.linear_delayed_q.default)
                          and u.args[0] is h and h not in u.args[1:]
                          and h not in u.kwargs.values())
        for u in h.users
    )


def _is_method(n, *names) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_method" and n.target in names


def _is_call(n, funcs) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in funcs


def _is_mul(n) -> bool:
    return (_is_call(n, _MUL) or _is_method(n, "mul")) and len(n.args) == 2


def is_add(n) -> bool:
    """``n`` is a binary add: ``a + b``, ``torch.add(a, b)`` or ``a.add(b)`` (any kwargs, such
    as ``alpha``, are the caller's to check)."""
    return (_is_call(n, _ADD) or _is_method(n, "add")) and len(n.args) == 2


def _skip_casts(n):
    while _is_method(n, "to", "float", "bfloat16", "half", "type_as"):
        n = n.args[0]
    return n


def _shape(n):
    from .manager import shape_of

    return shape_of(n)


def _rsqrt_mean_square_eps(r, hs) -> float | None:
    """eps if ``r`` is ``rsqrt(mean(hs ** 2, -1, keepdim=True) + eps)``, else None."""
    if not (_is_call(r, {torch.rsqrt}) or _is_method(r, "rsqrt")):
        return None
    add = r.args[0]
    if not (is_add(add) and isinstance(add.args[1], float)):
        return None
    mean = add.args[0]
    if not _is_method(mean, "mean"):
        return None
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    if dims not in (-1, (-1,), [-1]) or not mean.kwargs.get("keepdim", False):
        return None
    sq = mean.args[0]
    is_square = (
        (_is_method(sq, "pow") or _is_call(sq, {torch.pow, operator.pow}))
        and sq.args[1] == 2
    ) or (_is_mul(sq) and sq.args[0] is sq.args[1])
    if not is_square or sq.args[0] is not hs:
        return None
    return add.args[1]


__all__ = ["FusePass", "fusable_producer", "is_add", "only_carried"]
