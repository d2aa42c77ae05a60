"""The export copy of a model: the plan's FP8 linears swapped for :class:`Fp8ExportLinear`.

:class:`Fp8ExportLinear` computes what the fp8hpf backend's inference rewrite computes for an
FP8 linear (``passes/rewrite.py``): ``fp8compile::quantize`` (dynamic) or
``fp8compile::quantize_scaled`` (static) on the activation, then ``fp8compile::scaled_mm`` with
the weight quantized once.  The weight is held as an FP8 buffer, so ``torch.onnx.export`` writes
it as a FLOAT8E4M3FN initializer (1 byte per weight); run eagerly on CPU, the module is the
PyTorch FP8 path the exported file is checked against.

:func:`swap_fp8_linears` decides per module from the plan (the same analysis as
``torch.compile(backend="fp8hpf")``) and records what it could not export as FP8, with why.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import numerics as nx
from ..config import Fp8Config, Recipe, Scaling

__all__ = ["Fp8ExportLinear", "SwapResult", "swap_fp8_linears"]


class Fp8ExportLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` pre-quantized to FP8 and ``x`` quantized per call.

    Args:
        weight: ``(N, K)`` high-precision weight (``nn.Linear.weight`` layout).
        bias: ``(N,)`` or None.
        recipe: scale granularities (activation / weight).
        cfg: formats, power-of-two scales, accumulation.
        static_amax: calibrated activation amax (``scaling="static"``), else None (dynamic).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
                 cfg: Fp8Config, static_amax: float | None = None) -> None:
        super().__init__()
        self.xg = recipe.activation_granularity.value
        self.wg = recipe.weight_granularity.value
        self.act_fmt = cfg.activation_format.value
        self.power_of_2 = cfg.power_of_2_scales
        self.accumulation = cfg.accumulation.value
        self.out_features, self.in_features = weight.shape
        wq, ws = nx.quantize(weight.detach().float(), recipe.weight_granularity,
                             cfg.weight_format, cfg.power_of_2_scales)
        self.register_buffer("wq", wq.contiguous())
        self.register_buffer("ws", ws.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        x_scale = None
        if static_amax is not None:
            x_scale = nx.compute_scale(torch.tensor(float(static_amax)), cfg.activation_format,
                                       cfg.power_of_2_scales)
        self.register_buffer("x_scale", x_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.fp8compile
        if self.x_scale is not None:
            xs = self.x_scale
            xq = ops.quantize_scaled(x, xs, self.xg, self.act_fmt)
        else:
            xq, xs = ops.quantize(x, self.xg, self.act_fmt, self.power_of_2)
        return ops.scaled_mm(xq, xs, self.xg, self.wq, self.ws, self.wg, self.bias, x.dtype,
                             self.accumulation, "none", None)

    def extra_repr(self) -> str:
        how = "static" if self.x_scale is not None else "dynamic"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"act={self.xg} ({how}), weight={self.wg}")


@dataclasses.dataclass
class SwapResult:
    """What :func:`swap_fp8_linears` did: FP8 module paths, and ``(where, why)`` for every
    GEMM that stays high precision."""

    fp8: list[str]
    kept: list[tuple[str, str]]


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers absent or reorganised: no Conv1D support
        return None
    return Conv1D


def _weight_nk(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight (N, K), bias)`` of an ``nn.Linear`` or a transformers ``Conv1D``, else None."""
    if isinstance(mod, nn.Linear):
        return mod.weight, mod.bias
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(mod, conv1d):
        return mod.weight.t(), mod.bias  # Conv1D stores (K, N) and computes x @ W + b
    return None


def _why_not(mod: nn.Module | None, cfg: Fp8Config, target: str, name: str) -> str | None:
    """Why module ``name`` cannot be exported as FP8 QDQ, or None.

    Raises ValueError for ``target="tensorrt"`` where TensorRT's pattern cannot express it.
    """
    if target == "tensorrt":
        if cfg.recipe is not Recipe.TENSORWISE:
            what = {Recipe.BLOCKWISE: "1x128 activation groups and 128x128 weight blocks",
                    Recipe.ROWWISE: "per-token activation scales computed at run time"}
            raise ValueError(
                f"target='tensorrt' cannot express layer {name!r}: recipe "
                f"{cfg.recipe.value!r} needs {what[cfg.recipe]}; TensorRT's FP8 QDQ takes static "
                "per-tensor activation scales (use recipe='tensorwise', scaling='static' with "
                "calibrated scales, or target='ort')"
            )
        if cfg.scaling is not Scaling.STATIC:
            raise ValueError(
                f"target='tensorrt' cannot express layer {name!r}: scaling "
                f"{cfg.scaling.value!r} computes activation scales at run time; TensorRT needs "
                "static per-tensor scales (run fp8compile.calibrate, then scaling='static')"
            )
        if cfg.static_amax(name) is None:
            raise ValueError(
                f"target='tensorrt' cannot express layer {name!r}: no calibrated activation "
                "amax for it in config.static_scales or config.calibration"
            )
    if mod is None:
        return "no module at this path: the GEMM is a function call, not a layer with a weight"
    if _weight_nk(mod) is None:
        return (f"{type(mod).__name__} is neither nn.Linear nor transformers Conv1D; only "
                "their weights export as FP8 initializers")
    if cfg.scaling is Scaling.DELAYED:
        return ("scaling='delayed' keeps an amax history across calls, which a stateless ONNX "
                "graph cannot; calibrate and use scaling='static'")
    if cfg.scaling is Scaling.STATIC and cfg.static_amax(name) is None:
        return "scaling='static' but no calibrated activation amax for this layer"
    return None


def swap_fp8_linears(model: nn.Module, plan, cfg: Fp8Config, target: str) -> SwapResult:
    """Replace, in ``model`` (an export copy), every module the plan runs in FP8 and ONNX can
    express by an :class:`Fp8ExportLinear`; annotate each plan GEMM with
    ``extra["onnx"]`` (what the export did) and return the lists."""
    fp8: list[str] = []
    kept: list[tuple[str, str]] = []
    by_module: dict[str, list] = {}
    for e in plan.gemms:
        if e.is_fp8 and e.gemm == "grouped_mm":
            why = ("grouped GEMM (mixture-of-experts experts): ONNX has no grouped GEMM to carry "
                   "FP8 QDQ, this one stays in the model's precision")
            kept.append((e.module or e.name, why))
            e.extra["onnx"] = f"high precision: {why}"
        elif e.is_fp8 and e.extra.get("decomposed_from"):
            why = (f"its weight is read inside a {e.extra['decomposed_from']} call, which the "
                   "compiled graph takes apart but the exported model runs as it is: the layer "
                   "is not called, so it cannot be swapped; it stays in the model's precision")
            kept.append((e.module or e.name, why))
            e.extra["onnx"] = f"high precision: {why}"
        elif e.is_fp8 and (e.gemm == "matmul" or not e.weight):
            why = ("activation x activation matmul: only layers with a weight export as FP8 "
                   "QDQ, this one stays in the model's precision")
            if e.weight:
                why = ("matmul by a parameter outside an nn.Linear: only nn.Linear (and "
                       "transformers Conv1D) layers export as FP8 QDQ, this one stays in the "
                       "model's precision")
            kept.append((e.module or e.name, why))
            e.extra["onnx"] = f"high precision: {why}"
        else:
            by_module.setdefault(e.module, []).append(e)
    for module, entries in by_module.items():
        if not any(e.is_fp8 for e in entries):
            for e in entries:
                e.extra["onnx"] = f"{e.precision.value}: {e.reason}"
            continue
        why = None
        if not all(e.is_fp8 for e in entries):
            why = "called more than once with different precisions; exported high precision"
        elif not module:
            why = "the model itself is the layer; wrap it in a parent module to export it in FP8"
        sub = None
        if why is None:
            try:
                sub = model.get_submodule(module) if module else None
            except AttributeError:
                sub = None
            why = _why_not(sub, cfg, target, module or entries[0].name)
        if why is not None:
            where = module or entries[0].name
            kept.append((where, why))
            for e in entries:
                e.extra["onnx"] = f"high precision: {why}"
            continue
        weight, bias = _weight_nk(sub)
        static = cfg.static_amax(module) if cfg.scaling is Scaling.STATIC else None
        new = Fp8ExportLinear(weight, bias, cfg.recipe, cfg, static)
        parent, _, leaf = module.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        fp8.append(module)
        for e in entries:
            e.extra["onnx"] = (f"fp8 QDQ: {new.xg} activations "
                               f"({'static' if static is not None else 'dynamic'}), "
                               f"{new.wg} weights")
    return SwapResult(fp8, kept)
