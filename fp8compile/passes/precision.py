"""PrecisionPass: give every compute node a precision, the rule that decided it and a reason.

Reads (from SensitivityPass): ``module``, ``module_type``, ``gemm``, ``sensitive``,
``sensitive_reason``.  Writes ``node.meta["fp8compile"]``:

* ``precision``: :class:`~fp8compile.config.Precision` the node runs in;
* ``rule``: ``override:GLOB`` | ``rule:<Rule>`` | ``shape`` | ``small`` | ``dtype`` |
  ``unsupported`` | ``fp8`` | ``as-is``;
* ``reason``: the decision in words, with the numbers that led to it;
* ``operands`` (GEMMs): ``{"x", "w", "bias", "w_transposed", "w_is_param"}`` for the rewrite;
  a grouped GEMM's also ``offs``, ``groups``, ``w_param`` and ``w_param_transposed``
  (:func:`grouped_weight_param`);
* ``entry``: the :class:`~fp8compile.plan.PlanEntry` (also appended to ``ctx.plan_entries``).

Order of decision for a GEMM: override → sensitivity rule → operand checks (dtype, shape,
size, scaling) → FP8.  An ``fp8`` override beats a sensitivity rule but never a shape the FP8
path cannot run; such a node stays in high precision and the reason says so.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import Precision, Recipe, Rule, Scaling
from ..ops._common import FLOAT_DTYPES
from ..plan import PlanEntry
from . import patterns as pt
from .manager import CompileContext, Fp8Pass, PassResult, dtype_of, info, shape_of
from .sensitivity import SensitivityPass

_FP32_RULES = {Rule.NORM, Rule.SOFTMAX, Rule.LOSS}

# Promoted grouped GEMMs (blockwise scales, or ``precise`` accumulation) at or above this many
# rows per group on average stay in high precision (Rule.GROUPED_SIZE).  H200,
# benchmarks/grouped.py: blockwise 0.83-0.99x bf16 at 256 and 1024 rows per group, 1.42-1.51x
# at 128 and 1.8-2.8x below; with fast row/tensor scales 1.32-1.83x at every size.
GROUPED_PROMOTED_ROWS = 256

_RECIPE_TEXT = {
    Recipe.BLOCKWISE: "1x128 activation groups, 128x128 weight blocks",
    Recipe.ROWWISE: "per-token activations, per-channel weights",
    Recipe.TENSORWISE: "one scale per tensor",
}


def gemm_operands(node: torch.fx.Node, ctx: CompileContext) -> dict | str:
    """The operands of a GEMM node, or a string saying why it cannot be an FP8 GEMM."""
    kind = pt.gemm_kind(node)

    def arg(i, name):
        return node.args[i] if len(node.args) > i else node.kwargs.get(name)

    if kind == pt.Gemm.GROUPED:
        return _grouped_operands(node, ctx)
    if kind == pt.Gemm.LINEAR:
        x, w, bias = arg(0, "input"), arg(1, "weight"), arg(2, "bias")
        w_t = False
    elif kind == pt.Gemm.ADDMM:
        bias, x, w = arg(0, "input"), arg(1, "mat1"), arg(2, "mat2")
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "addmm with beta/alpha != 1"
        w, w_t = _weight_of(w, ctx)
        if not ctx.is_parameter(w):
            return "addmm whose second operand is not a weight"
        if shape_of(bias) is None or len(shape_of(bias)) != 1:
            return "addmm with a non-vector bias"
    else:
        x, w = arg(0, "input"), arg(1, "other")
        bias = None
        w, w_t = _weight_of(w, ctx)
    sx, sw = shape_of(x), shape_of(w)
    if sx is None or sw is None:
        return "operand shapes unknown"
    if len(sx) < 2 or len(sw) < 2:
        return "matrix-vector product (1-D operand)"
    w_is_param = ctx.is_parameter(w) and len(sw) == 2
    if kind == pt.Gemm.LINEAR and len(sw) != 2:
        return "linear weight is not 2-D"
    return {"x": x, "w": w, "bias": bias, "w_transposed": w_t, "w_is_param": w_is_param}


def _weight_of(w: Any, ctx: CompileContext) -> tuple[Any, bool]:
    """A matmul's second operand as ``(w, w_transposed)``: a transposed view of a 2-D
    parameter (``x @ p.t()``, ``p.T``, ``p.transpose(0, 1)``...) is that parameter in
    nn.Linear's (N, K) layout, so it is quantized once per version as a linear's weight is,
    not as an activation at every call; anything else is a (K, N) operand as given."""
    src = pt.transpose_source(w)
    if src is not None and ctx.is_parameter(src) and len(shape_of(src) or ()) == 2:
        return src, False
    return w, True


_GROUPED = "grouped GEMM (mixture-of-experts experts: each group of rows times its own weight)"


def grouped_weight_param(w: Any, ctx: CompileContext) -> tuple[torch.fx.Node, bool] | None:
    """``(parameter, transposed)`` behind a grouped GEMM's ``(G, K, N)`` weight operand: the
    parameter itself, stored ``(G, K, N)`` (``transposed``: its groups' matrices need a
    transpose to be ``(N, K)``), or the transpose of the last two dims of a ``(G, N, K)``
    parameter (the nn.Linear layout, as transformers' experts store theirs)."""
    if not isinstance(w, torch.fx.Node):
        return None
    if ctx.is_parameter(w) and len(shape_of(w) or ()) == 3:
        return w, True
    if pt.is_transpose(w):
        src, *dims = (list(w.args) + [w.kwargs.get("dim0"), w.kwargs.get("dim1")])[:3]
        if (isinstance(src, torch.fx.Node) and ctx.is_parameter(src)
                and len(shape_of(src) or ()) == 3 and {d % 3 for d in dims if d is not None}
                == {1, 2}):
            return src, False
    return None


def _grouped_operands(node: torch.fx.Node, ctx: CompileContext) -> dict | str:
    """:func:`gemm_operands` of a grouped GEMM (``F.grouped_mm(x, w, offs=offs)`` and its
    kin): ``x (S, K)``, ``w (G, K, N)`` from a weight parameter, ``offs`` each group's end."""
    def arg(i, *keys):  # positional, or by any of the names torch's and transformers' use
        if len(node.args) > i:
            return node.args[i]
        return next((node.kwargs[k] for k in keys if k in node.kwargs), None)

    x, w = arg(0, "mat_a", "self", "input"), arg(1, "mat_b", "mat2", "weight")
    offs = arg(2, "offs")
    if arg(3, "bias") is not None:
        return f"{_GROUPED} with a bias: no FP8 grouped kernel for it"
    if arg(4, "out_dtype") not in (None, dtype_of(x)):
        return f"{_GROUPED} with an out_dtype of its own"
    if offs is None:
        return f"{_GROUPED} without offs (3-D x 3-D): no FP8 kernel for it"
    sx, sw = shape_of(x), shape_of(w)
    if sx is None or sw is None or len(sx) != 2 or len(sw) != 3:
        return f"{_GROUPED} of {sx} rows with {sw} weights: FP8 takes (S, K) and (G, K, N)"
    found = grouped_weight_param(w, ctx)
    if found is None:
        return f"{_GROUPED} whose weight is not a parameter: no FP8 kernel for it"
    if not ctx.inference:
        return f"{_GROUPED} in training: FP8 grouped GEMMs are inference only so far"
    if ctx.config.scaling is not Scaling.DYNAMIC:
        return (f"{_GROUPED} with {ctx.config.scaling.value} scaling: FP8 grouped GEMMs take "
                "dynamic activation scales only")
    return {"x": x, "w": w, "bias": None, "w_transposed": True, "w_is_param": True,
            "offs": offs, "w_param": found[0], "w_param_transposed": found[1],
            "groups": sw[0]}


class PrecisionPass(Fp8Pass):
    """Assign fp8 / bf16 / fp32 to every node; see the module docstring."""

    after = (SensitivityPass,)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            meta = info(node)
            if "gemm" in meta:
                self._gemm(node, meta)
            else:
                self._other(node, meta)
            entry = self._entry(node, meta)
            meta["entry"] = entry
            self.ctx.plan_entries.append(entry)
        return PassResult(gm, False)

    # -- GEMMs ----------------------------------------------------------------------------

    def _gemm(self, node: torch.fx.Node, meta: dict) -> None:
        cfg = self.ctx.config
        out_dtype = dtype_of(node)
        own = Precision.of_dtype(out_dtype)
        ops = gemm_operands(node, self.ctx)
        if isinstance(ops, dict):
            meta["operands"] = ops
            w_shape = shape_of(ops["w"])
            k, n = (w_shape[-2], w_shape[-1]) if ops["w_transposed"] else w_shape[::-1][:2]
            meta["kn"] = (k, n)
        override = cfg.precision_override(meta["module"])
        if override and override[1] is not Precision.AUTO:
            glob, prec = override
            rule = f"override:{glob}"
            if prec is not Precision.FP8:
                return self._set(meta, prec, rule, f"override {glob!r} -> {prec.value}")
            blocker = ops if isinstance(ops, str) else self._fp8_blocker(node, meta, ops, True)
            if blocker:
                why = f"override {glob!r} asked fp8, refused: {blocker}"
                return self._set(meta, own, rule, why)
            return self._set_fp8(meta, rule, f"override {glob!r} -> fp8")
        if "sensitive" in meta:
            return self._set(meta, own, f"rule:{meta['sensitive'].value}", meta["sensitive_reason"])
        if isinstance(ops, str):
            return self._set(meta, own, "unsupported", f"kept high precision: {ops}")
        blocker = self._fp8_blocker(node, meta, ops, False)
        if blocker:
            rule, why = blocker
            return self._set(meta, own, rule, why)
        k, n = meta["kn"]
        return self._set_fp8(meta, "fp8", f"K={k} N={n}: FP8 GEMM")

    def _fp8_blocker(self, node, meta, ops, forced: bool):
        """None if the GEMM can run in FP8, else ``(rule, reason)`` (or a reason if forced)."""
        cfg = self.ctx.config
        k, n = meta["kn"]
        out = None
        dts = {dtype_of(ops["x"]), dtype_of(ops["w"])}
        if not dts <= set(FLOAT_DTYPES):
            out = ("dtype", f"operand dtypes {sorted(map(str, dts))} are not floating point")
        elif Rule.SHAPE in cfg.rules and (k % 16 or n % 16):
            out = ("shape", f"K={k} N={n}: FP8 tensor cores need K and N multiples of 16")
        elif not forced and Rule.SMALL in cfg.rules and k * n < cfg.min_weight_numel:
            out = (
                "small",
                f"K*N={k * n} < min_weight_numel={cfg.min_weight_numel}: too small to profit",
            )
        elif not forced and (why := self._grouped_too_tall(ops)):
            out = ("grouped_size", why)
        elif not forced and self._below_sqnr(meta["module"]):
            sqnr_db, _ = cfg.measured(meta["module"])
            out = (
                "calibration",
                f"calibration: FP8 SQNR {sqnr_db:.1f} dB < min_sqnr_db={cfg.min_sqnr_db:g}",
            )
        elif not ops["w_is_param"] and not cfg.matmul:
            out = ("config", "activation x activation matmul and config.matmul=False")
        elif (
            cfg.scaling is Scaling.STATIC
            and self.ctx.inference
            and ops["w_is_param"]
            and cfg.static_amax(meta["module"]) is None
        ):
            out = (
                "calibration",
                f"scaling='static' but no calibrated amax for {meta['module']!r}: "
                "run fp8compile.calibrate",
            )
        if out is None:
            return None
        return out[1] if forced else out

    def _grouped_too_tall(self, ops: dict) -> str | None:
        """Why a promoted grouped GEMM's groups are too tall to profit (Rule.GROUPED_SIZE)."""
        cfg = self.ctx.config
        if "offs" not in ops or Rule.GROUPED_SIZE not in cfg.rules:
            return None
        promoted = cfg.recipe is Recipe.BLOCKWISE or cfg.accumulation.value == "precise"
        rows = (shape_of(ops["x"]) or (None,))[0]
        if not promoted or not isinstance(rows, int):
            return None
        per_group = rows / ops["groups"]
        if per_group < GROUPED_PROMOTED_ROWS:
            return None
        what = "blockwise scales" if cfg.recipe is Recipe.BLOCKWISE else "precise accumulation"
        return (f"grouped GEMM of {per_group:.0f} rows per group on average with {what}: the "
                f"FP8 grouped kernel ran 0.83-0.99x bf16 from {GROUPED_PROMOTED_ROWS} rows per "
                "group (H200); recipe='rowwise' with fast accumulation runs it 1.3-1.8x, and "
                "an fp8 override forces it")

    def _below_sqnr(self, module: str) -> bool:
        cfg = self.ctx.config
        m = cfg.measured(module)
        return cfg.min_sqnr_db is not None and m is not None and m[0] < cfg.min_sqnr_db

    def _set_fp8(self, meta: dict, rule: str, why: str) -> None:
        cfg = self.ctx.config
        k, n = meta["kn"]
        ops = meta["operands"]
        acc = cfg.accumulation.value
        if not self.ctx.inference and cfg.grad_accumulation is not cfg.accumulation:
            acc = f"{acc} forward, {cfg.grad_accumulation.value} backward"
        notes = [_RECIPE_TEXT[cfg.recipe], f"fp32 accumulation ({acc})"]
        if "offs" in ops:
            notes.insert(0, f"grouped: {ops['groups']} groups of rows, each with its own weight")
        if cfg.recipe is Recipe.BLOCKWISE and k % 128:
            notes.append(f"K={k} not a multiple of 128: last scale group partial (masked)")
        if not ops["w_is_param"]:
            notes.append("both operands are activations, quantized per call")
        elif self.ctx.inference:
            notes.append("weight quantized once per parameter version")
        elif cfg.cache_training_weights:
            notes.append("W and Wᵀ quantized once per parameter version (cached)")
        if cfg.scaling is not Scaling.DYNAMIC:
            if self.ctx.inference and ops["w_is_param"]:
                notes.append(f"{cfg.scaling.value} activation scale")
            elif cfg.scaling is Scaling.DELAYED and ops["w_is_param"]:
                notes.append(
                    f"delayed scaling: activation, weight and gradient scales from amax "
                    f"histories of {cfg.amax_history_len} steps"
                )
            else:
                notes.append("dynamic activation scale (static applies to inference linears)")
        if not self.ctx.inference and ops["w_is_param"]:
            notes.append(
                f"backward dX, dW in FP8 ({cfg.gradient_format.value} gradients), "
                "FP8 activation saved"
            )
        meta["recipe"] = cfg.recipe
        self._set(meta, Precision.FP8, rule, f"{why}; " + "; ".join(notes))

    @staticmethod
    def _set(meta: dict, prec: Precision, rule: str, why: str) -> None:
        meta["precision"], meta["rule"], meta["reason"] = prec, rule, why

    # -- everything else -------------------------------------------------------------------

    def _other(self, node: torch.fx.Node, meta: dict) -> None:
        own = Precision.of_dtype(dtype_of(node))
        tag = meta.get("sensitive")
        if tag in _FP32_RULES:
            reason = meta["sensitive_reason"]
            return self._set(meta, Precision.FP32, f"rule:{tag.value}", reason)
        if tag is not None:
            return self._set(meta, own, f"rule:{tag.value}", meta["sensitive_reason"])
        return self._set(meta, own, "as-is", "no GEMM: runs in its input dtype, fused by Inductor")

    def _entry(self, node: torch.fx.Node, meta: dict) -> PlanEntry:
        ins = [a for a in node.all_input_nodes]
        entry = PlanEntry(
            name=node.name,
            op=_op_name(node),
            module=meta.get("module", ""),
            module_type=meta.get("module_type", ""),
            precision=meta["precision"],
            reason=meta["reason"],
            rule=meta["rule"],
            recipe=meta["recipe"].value if meta.get("recipe") else None,
            graph=self.ctx.graph_index,
            inputs=[a.name for a in ins],
            in_shapes=[shape_of(a) for a in ins if shape_of(a) is not None],
            out_shape=shape_of(node),
            dtype=str(dtype_of(node)).replace("torch.", "") if dtype_of(node) else None,
            gemm=meta.get("gemm"),
        )
        if meta.get("decomposed_from"):
            entry.extra["decomposed_from"] = meta["decomposed_from"]
        measured = self.ctx.config.measured(entry.module) if entry.gemm else None
        if measured:
            entry.sqnr_db, entry.amax = measured
        ops = meta.get("operands")
        out = entry.out_shape
        # 2 flops per multiply-add; every output element takes K of them (a grouped GEMM's
        # too: each row of x meets one group's weight, however the rows are grouped)
        k = meta["kn"][0] if ops else None
        if not ops and entry.gemm == pt.Gemm.GROUPED and entry.in_shapes:
            k = entry.in_shapes[0][-1]
        if k is not None and out and None not in out:
            entry.flops = 2 * math.prod(out) * k
        if ops:
            k, n = meta["kn"]
            if ops["w_is_param"]:
                entry.weight = ops.get("w_param", ops["w"]).name
                entry.weight_numel = k * n * ops.get("groups", 1)
            if entry.is_fp8:
                r = self.ctx.config.recipe
                entry.granularity = (
                    f"act {r.activation_granularity.value}, weight {r.weight_granularity.value}"
                )
        return entry


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    t = node.target
    name = getattr(t, "__name__", None) or str(t)
    return {"_scaled_dot_product_attention": "scaled_dot_product_attention"}.get(name, name)
