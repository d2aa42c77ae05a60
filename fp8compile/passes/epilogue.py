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

**The residual add alone** (``Fp8Config.fuse_residual``; by default by rule where the
warp-specialized Hopper kernel serves the GEMM: fast accumulation with row/tensor scales,
M > 256, static shapes, residuals of the product's full shape).  That kernel loads the
residual tiles under its K loop, and with a block's last add, ``(x + o) + down``, it beat
cuBLAS followed by the add by 7% at 4096 tokens on an H200.  Its promoted path (blockwise
scales, precise row/tensor) adds residuals too, but there the fused down GEMM measured
1.006x cuBLAS followed by the add, and the blockwise block 2.104 against 2.102 ms without
the fold (H200), so only ``fuse_residual=True`` makes that fold.  A residual that is itself a
residual stream ``r = a + b`` is passed as its two terms (``residual``, ``residual2``),
which the GEMM adds in fp32: ``r`` is never written rounded to the model dtype::

    h = x + o                                        z = fp8compile.scaled_mm(xq, xs, ...,
    y = fp8compile.scaled_mm(xq, xs, ...)      ⇒                  "none", x, o)
    z = h + y

Activations taken: exact GELU (``approximate="none"``), SiLU and ReLU; ``F.silu(gate) * up``
was already fused into the next quantization by FusePass, which runs first.

**SwiGLU** (``Fp8Config.fuse_swiglu``; by default where the GPU kernel serves it and it
times faster).  A
gate/up pair fused into one GEMM (ScalesPass) whose two halves only feed FusePass's SiLU·mul
quantization becomes one GEMM with the SwiGLU in its epilogue, and a plain quantization of
its output::

    y = scaled_mm(xq, xs, Wgu)                       h = scaled_mm(xq, xs, Wgu', "swiglu")
    g = y[..., :F]; u = y[..., F:]             ⇒     q, s = quantize(h)
    q, s = silu_mul_quantize(g, u)

``Wgu'`` is ``Wgu`` with gate's rows first (the weight cache swaps the halves where the graph
stacked up first; scales follow exactly).  Each 256-wide output tile loads 128 rows of gate and
the matching 128 of up, and the epilogue computes ``silu(gate) * up`` from the fp32 product.  For
4096 tokens of a 14336-wide MLP in bf16, the GEMM writes 112 MiB instead of 224, and the
quantization reads 112 MiB instead of 224.  Only the warp-specialized kernel
(:mod:`fp8compile.kernels.blockwise_ws`, fast accumulation with row/tensor scales) has the
epilogue; elsewhere the GEMM's fp32 product would go through the SwiGLU as pointwise ops, which
moves more bytes than the unfused graph.
So by default the fold is made where that kernel serves the GEMM and the fused step (GEMM +
plain quantization) is faster: the epilogue's exp and reciprocal cost the GEMM ~4% on an
H200, which the smaller quantization repays with tensor scales (whose unfused quantization
reads gate and up twice) but not with row scales.  With blockwise operands and 1x128
groups the GEMM (``scaled_mm_swiglu_quantize``; on Hopper the 128x256 promoted tile) also
quantizes h in its epilogue, so no quantization pass is left: 0.94-0.98x the step's time on
an H200 at 2048-8192 tokens.  From :data:`SWIGLU_RULE_M` tokens, the sizes measured, that is
the rule; below, or where Inductor autotunes
(``mode="max-autotune"``), the two steps are timed at compile time
(:func:`fp8compile.kernels.select.swiglu_epilogue_ms`).  The plan gives both times, or the
rule that made or stopped the fold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import numerics as nx
from .fuse import FusePass, is_add
from .manager import Fp8Pass, PassResult, add_note, dtype_of, info, plan_entries_of, value_of

# From this M on the SwiGLU fold is decided by rule, not timed (outside max-autotune): the
# sizes benchmarks/swiglu.py measured (2048-8192 tokens).
SWIGLU_RULE_M = 2048

OPS = torch.ops.fp8compile
_ACTIVATION = {F.gelu: "gelu", F.silu: "silu", F.relu: "relu", torch.relu: "relu"}
# Positions in fp8compile::scaled_mm's arguments.
_OUT_DTYPE, _ACT, _RES, _RES2 = 7, 9, 10, 11


class EpiloguePass(Fp8Pass):
    """Fold activations and residual adds into FP8 GEMMs; see the module docstring."""

    after = (FusePass,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        graph = gm.graph
        modified = False
        if self.ctx.inference and self.ctx.config.fuse_swiglu is not False:
            for node in list(graph.nodes):
                if node.target is OPS.silu_mul_quantize.default or (
                        node.target is OPS.quantize_static.default and node.args[4] == "silu_mul"):
                    modified |= self._fold_swiglu(graph, node)
        self.ctx.stats["swiglu_epilogues"] = sum(
            1 for n in graph.nodes if info(n).get("epilogue") == ["swiglu"])
        cfg = self.ctx.config
        residual_only = not cfg.fuse_epilogues
        if cfg.fuse_epilogues or (self.ctx.inference and cfg.fuse_residual is not False):
            for node in list(graph.nodes):
                if node.target is OPS.scaled_mm.default and info(node).get("role") == "fp8_gemm":
                    modified |= self._fold(graph, node, residual_only)
        if modified:
            graph.lint()
            gm.recompile()
        self.ctx.stats["fused_epilogues"] = sum(
            1 for n in graph.nodes if info(n).get("epilogue"))
        return PassResult(gm, modified)

    def _fold(self, graph: torch.fx.Graph, mm: torch.fx.Node, residual_only: bool) -> bool:
        """Fold ``mm``'s activation and/or residual add (``residual_only``: the residual add
        alone, made by :attr:`Fp8Config.fuse_residual`'s rule or everywhere)."""
        if mm.args[_ACT] != "none" or mm.args[_RES] is not None:
            return False
        out_dtype = mm.args[_OUT_DTYPE]
        last, activation, residual, absorbed = mm, "none", None, []
        act = None if residual_only else _sole_user(mm)
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
        # A residual stream r = a + b (a block's x + o) is passed as its two terms: the GEMM
        # adds them in fp32, and r is never written rounded to the model dtype.
        terms = _stream_terms(residual, last) if residual is not None else None
        if residual_only and self.ctx.config.fuse_residual is None:
            why = self._residual_unsupported(mm, last, terms or (residual,))
            if why is not None:
                for e in plan_entries_of(mm):
                    add_note(e, f"residual add not in the GEMM epilogue: {why}")
                return False
        args = (residual, None) if terms is None else terms
        with graph.inserting_before(last):
            new = graph.call_function(OPS.scaled_mm.default, (*mm.args[:_ACT], activation, *args))
        new.meta.update({k: v for k, v in last.meta.items() if k != "fp8compile"})
        parts = [activation] * (activation != "none") + ["residual"] * (residual is not None)
        info(new).update(info(mm), epilogue=parts)
        last.replace_all_uses_with(new)
        for n in reversed([mm, *absorbed]):
            graph.erase_node(n)
        if terms is not None and not residual.users:
            absorbed.append(residual)
            graph.erase_node(residual)
        self._note(new, parts, absorbed, by_rule=residual_only and
                   self.ctx.config.fuse_residual is None)
        return True

    def _residual_unsupported(self, mm: torch.fx.Node, add: torch.fx.Node,
                              residuals: tuple) -> str | None:
        """Why the residual fold's rule does not hold for ``mm`` (None when it does): the
        warp-specialized kernel must serve the GEMM with these residuals, which it loads as
        output tiles (no broadcast), on its fast path.  Promoted accumulation (blockwise
        scales, precise row/tensor) takes residuals too, but measured no faster than cuBLAS
        followed by the add (module docstring), so the rule leaves it to ``True``."""
        from ..kernels.blockwise_ws import accumulates_fast

        _, _, xg, _, _, wg, _, _, accumulation = mm.args[:_ACT]
        if not accumulates_fast(xg, wg, accumulation):
            return ("the rule folds it where the kernel accumulates fast (row/tensor scales): "
                    "promoted, the fused add measured no faster than cuBLAS and the add")
        why = self._hopper_kernel_unsupported(mm, add, mm.args[_OUT_DTYPE], "none",
                                              len(residuals))
        if why is None and any(getattr(value_of(r), "shape", None) != value_of(add).shape
                               for r in residuals):
            return "the residual broadcasts into the product (the kernel reads full tiles)"
        return why

    def _hopper_kernel_unsupported(self, mm: torch.fx.Node, out: torch.fx.Node,
                                   out_dtype: torch.dtype, activation: str,
                                   residuals: int = 0) -> str | None:
        """Why the warp-specialized Hopper kernel would not serve the GEMM ``mm`` (whose
        result, after the epilogue, is ``out``) with this epilogue, asked at compile time;
        None when it would."""
        from ..kernels import select
        from ..kernels.blockwise_ws import unsupported

        xq, xs, xg, wq, ws, wg, bias, _out_dtype, accumulation = mm.args[:_ACT]
        forced = select.forced_backend()
        if forced != "auto":  # the fused kernel is chosen by rule or timing; this overrides
            return f"GEMM backend forced (FP8COMPILE_GEMM_BACKEND={forced})"
        w, w_scale, y = (value_of(a) for a in (wq, ws, out))
        if not all(isinstance(v, torch.Tensor) for v in (w, w_scale, y)):
            return "operand shapes unknown"
        if not all(isinstance(d, int) for d in y.shape):
            return "dynamic shapes (the kernel is chosen by M)"
        # Stand-ins with the activation's size, dtype and device (one element, expanded):
        # the kernel's rules read no values and, here, no strides.
        fmt = self.ctx.config.activation_format
        x = torch.empty(1, dtype=fmt.dtype, device=w.device).expand(
            math.prod(y.shape[:-1]), w.shape[1])
        x_scale = torch.empty(1, dtype=torch.float32, device=w.device)
        why = unsupported(x, x_scale, xg, w, w_scale, wg, out_dtype, activation, residuals,
                          layout=False, accumulation=accumulation)
        return None if why is None else f"no fused kernel here ({why})"

    def _fold_swiglu(self, graph: torch.fx.Graph, quant: torch.fx.Node) -> bool:
        """``silu_mul_quantize`` of the two halves of one stacked gate/up GEMM → that GEMM
        with the SwiGLU epilogue, then ``quantize``; False (with the reason in the plan where
        a gate/up GEMM was found) when it is not made."""
        found = _gate_up_gemm(quant)
        if found is None:
            return False
        mm, cache, gate_first, width = found
        static = quant.target is OPS.quantize_static.default
        if static:
            gate, up, _w, _eps, _producer, scale, fmt = quant.args
            why, timed = self._swiglu_unsupported(mm, width, None, nx.Fp8Format(fmt))
        else:
            gate, up, gran, fmt, p2 = quant.args
            why, timed = self._swiglu_unsupported(mm, width, quant.args[2:])
        if why is not None:
            for e in plan_entries_of(mm):
                add_note(e, f"SiLU·mul not in the GEMM epilogue: {why}")
            return False
        xq, xs, xg, wq, ws, wg, bias, _out_dtype, acc = mm.args[:_ACT]
        # Gate's rows first: where up came first, the example inputs then hold the swapped
        # copy, and the other one is freed.
        for node, value in zip((wq, ws), cache.set_gate_first(0 if gate_first else 1,
                                                              self.ctx.example_inputs)):
            self.ctx.set_example(node, value)
        groups = not static and nx.swiglu_in_groups(xg, wg, gran)
        with graph.inserting_before(quant):
            if static:  # the epilogue casts with the static scale: no quantization pass
                h = new = graph.call_function(OPS.scaled_mm_quantized.default,
                                              (xq, xs, xg, wq, ws, wg, bias, acc, "swiglu",
                                               scale, fmt))
            elif groups:  # the epilogue quantizes h in 1x128 groups: no quantization pass
                h = new = graph.call_function(OPS.scaled_mm_swiglu_quantize.default,
                                              (xq, xs, xg, wq, ws, wg, acc, fmt, p2))
            else:
                h = graph.call_function(OPS.scaled_mm.default,
                                        (*mm.args[:_ACT], "swiglu", None))
                new = graph.call_function(OPS.quantize.default, (h, gran, fmt, p2))
        val = value_of(gate)
        if not (static or groups):
            h.meta["val"] = val.new_empty(val.shape)  # the halves' shape, contiguous
        new.meta.update({k: v for k, v in quant.meta.items() if k != "fp8compile"})
        info(h).update(info(mm), epilogue=["swiglu"])
        if static:
            info(h).update(fused_quant="static")
        elif groups:
            info(h).update(fused_quant="group")
        else:
            info(new).update(role="act_quant")
        quant.replace_all_uses_with(new)
        for n in (quant, gate, up, mm):
            graph.erase_node(n)
        what = ("cast to FP8 there with the static scale of the down projection's input"
                if static else
                "quantized there in 1x128 groups for the down projection (h never written "
                "in high precision)" if groups else "its output quantized by a plain pass")
        for e in plan_entries_of(h):
            add_note(e, "SiLU(gate)·up in the GEMM epilogue (fp32; each output tile reads "
                        f"{nx.SWIGLU_RUN} gate rows and the matching up rows), {what}" + timed)
        return True

    def _swiglu_unsupported(self, mm: torch.fx.Node, width: int, quant: tuple | None,
                            static: nx.Fp8Format | None = None) -> tuple[str | None, str]:
        """``(why not, "")`` when the SwiGLU fold is not made for the gate/up GEMM ``mm``
        (gate and up each ``width`` wide), ``(None, how it timed)`` when it is; ``quant``:
        the SiLU·mul quantization's ``(granularity, format, power_of_2)``, or ``static``:
        the format of static scaling's cast, which then moves into the epilogue too."""
        xq, xs, xg, wq, ws, wg, bias, out_dtype, accumulation, act, residual = mm.args
        if width % nx.SWIGLU_RUN:
            return (f"gate and up are {width} wide, not a multiple of {nx.SWIGLU_RUN}", "")
        if bias is not None or act != "none" or residual is not None:
            return "the GEMM already has an epilogue", ""
        if self.ctx.config.fuse_swiglu:
            return None, ""
        groups = quant is not None and nx.swiglu_in_groups(xg, wg, quant[0])
        if groups and (nx.Fp8Format(quant[1]) is not nx.Fp8Format.E4M3 or quant[2]):
            return ("the epilogue that quantizes h in 1x128 groups writes E4M3 with plain "
                    "(not power-of-2) scales; fuse_swiglu=True makes the fold through "
                    "the fp32 product"), ""
        if static is not None and static is not nx.Fp8Format.E4M3:
            return f"the epilogue casts to E4M3 only, and this cast is {static.value}", ""
        from ..kernels import select

        y = next(iter(mm.users))
        written = (static.dtype if static is not None else
                   torch.float8_e4m3fn if groups else out_dtype)
        why = self._hopper_kernel_unsupported(mm, y, written, "swiglu")
        if why is not None:
            return why, ""
        w, y = value_of(wq), value_of(y)
        m = math.prod(y.shape[:-1])
        fmt = self.ctx.config.activation_format
        if static is not None:
            # Not timed: besides gate and up, the fold saves the whole cast of h.
            return None, (" (by rule: a static scale moves the cast into the epilogue, so "
                          "gate, up and h are never written in high precision)")
        if m >= SWIGLU_RULE_M and not select.autotuning():
            # Measured at 2048-8192 tokens: decided without timing, as Inductor decides
            # its GEMMs outside max-autotune (the timing compiles and runs both steps).
            if groups:
                return None, (" (by rule: h is never written in high precision and no "
                              "quantization pass is left, 0.94-0.98x the step's time on an "
                              "H200)")
            if nx.Granularity(quant[0]) is nx.Granularity.TENSOR:
                return None, (" (by rule: with tensor scales the SiLU·mul quantization reads "
                              "gate and up twice, 1.07-1.09x the step on an H200)")
            return ("by rule, the quantization it saves costs what the epilogue adds with "
                    f"{nx.Granularity(quant[0]).value} scales (0.99-1.01x the step on an "
                    "H200; mode='max-autotune' times it)"), ""
        # The fused kernel serves it: fold where it times faster than the GEMM and the
        # SiLU·mul quantization apart, by the margin the GEMM backend choice uses.
        fused, apart = select.swiglu_epilogue_ms(
            m, w.shape[0], w.shape[1], nx.Granularity(xg), nx.Granularity(wg), fmt.dtype,
            out_dtype, quant, w.device, accumulation)
        times = f"{fused * 1e3:.0f} us against {apart * 1e3:.0f} us apart, timed at compile time"
        if fused >= (1.0 - select._TRITON_MARGIN) * apart:
            return f"the GEMM with it and a plain quantization took {times}", ""
        return None, f" ({times})"

    @staticmethod
    def _note(mm: torch.fx.Node, parts: list[str], absorbed: list[torch.fx.Node],
              by_rule: bool = False) -> None:
        text = " and ".join(_WORDS[p] for p in parts)
        how = "fp32, one rounding"
        if len(mm.args) > _RES2 and mm.args[_RES2] is not None:
            how += "; the residual stream read as its two terms, never rounded"
        if by_rule:
            how += "; by rule: the Hopper kernel loads the residual tiles under its K loop"
        modules = ", ".join(e.module or e.name for e in plan_entries_of(mm)) or mm.name
        for e in plan_entries_of(mm):
            add_note(e, f"{text} in the GEMM epilogue ({how})")
        for n in absorbed:
            entry = info(n).get("entry")
            if entry is not None:
                add_note(entry, f"computed in the epilogue of the FP8 GEMM of {modules} "
                                "(fp32, one rounding)")


_WORDS = {"gelu": "GELU", "silu": "SiLU", "relu": "ReLU", "residual": "residual add"}


def _gate_up_gemm(quant: torch.fx.Node):
    """``(GEMM node, its weight cache, gate first, F)`` when the SiLU·mul quantization
    ``quant`` reads the two halves ``narrow(y, -1, 0, F)`` and ``narrow(y, -1, F, F)`` of one
    FP8 GEMM ``y`` over two stacked cached weights (so each is F wide), as gate and up in
    either order, and nothing else reads ``y`` or its halves; else None."""
    gate, up = quant.args[:2]
    if not all(isinstance(n, torch.fx.Node) and n.target is torch.narrow and len(n.args) == 4
               and set(n.users) == {quant} for n in (gate, up)):
        return None
    mm = gate.args[0]
    if up.args[0] is not mm or mm.target is not OPS.scaled_mm.default or \
            set(mm.users) != {gate, up} or info(mm).get("role") != "fp8_gemm":
        return None
    f = gate.args[3]
    halves = (gate.args[1:], up.args[1:])
    if halves not in (((-1, 0, f), (-1, f, f)), ((-1, f, f), (-1, 0, f))):
        return None
    cache = info(mm.args[3]).get("weight_cache") if isinstance(mm.args[3], torch.fx.Node) \
        else None
    if cache is None or len(cache.indices) != 2:
        return None
    return mm, cache, gate.args[2] == 0, f


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


def _stream_terms(r: torch.fx.Node, add: torch.fx.Node):
    """``(a, b)`` when the residual ``r = a + b`` adds two tensors of the residual add's
    shape and dtype (a residual stream), else None."""
    if not is_add(r) or r.kwargs:
        return None
    terms = r.args
    vals = [value_of(n) for n in (*terms, add)]
    if not all(isinstance(n, torch.fx.Node) for n in terms) or \
            not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    if any(v.dtype != vals[2].dtype or _dims(v.shape) != _dims(vals[2].shape) for v in vals):
        return None
    return tuple(terms)


def _dims(shape) -> list[str]:
    """Sizes as text, so symbolic sizes compare by expression without adding guards."""
    return [str(s) for s in shape]
