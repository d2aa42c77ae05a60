"""``export_onnx``: the plan's FP8 linears as standard ONNX QDQ, everything else as usual.

The model is copied; every linear the plan marks FP8 (and that ONNX can express, see
:func:`_why_not`) is replaced by :class:`QDQLinear`, which holds the weight pre-quantized with
:mod:`fp8compile.numerics` and calls the export ops of :mod:`.translate`.  The copy is exported
with ``torch.onnx.export(..., dynamo=True)`` and the translations of those ops, checked with
``onnx.checker``, and run in onnxruntime against the copy run eagerly (the PyTorch FP8 path) and
against the original FP32 model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Any

import torch
from torch import nn

from .. import numerics as nx
from ..config import Fp8Config, Recipe, Scaling
from . import translate

__all__ = ["ExportReport", "QDQLinear", "export_onnx", "fp8_model"]

TARGETS = ("ort", "tensorrt")
MIN_OPSET_FP8 = 19
MIN_OPSET_BLOCK = 21
MAX_OPSET = 23
IR_VERSION = 10


@dataclasses.dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how close onnxruntime's output is."""

    path: str
    opset: int
    ir_version: int
    target: str
    recipe: str
    scaling: str
    fp8_layers: list[str]
    kept_layers: list[tuple[str, str]]  # (module or op, why it stays high precision)
    fp8_initializer_bytes: int
    initializer_bytes: int
    file_bytes: int
    err_vs_torch_fp8: float | None = None
    err_vs_fp32: float | None = None
    torch_fp8_vs_fp32: float | None = None

    def summary(self) -> str:
        lines = [
            f"{self.path}: opset {self.opset}, IR {self.ir_version}, target {self.target}, "
            f"recipe {self.recipe} ({self.scaling})",
            f"  FP8 linears ({len(self.fp8_layers)}): {', '.join(self.fp8_layers) or '-'}",
            f"  initializers: {self.fp8_initializer_bytes} B FP8 of {self.initializer_bytes} B",
        ]
        lines += [f"  kept: {m} ({why})" for m, why in self.kept_layers]
        if self.err_vs_torch_fp8 is not None:
            lines.append(
                f"  rel err ORT vs PyTorch FP8 {self.err_vs_torch_fp8:.2e}, "
                f"vs FP32 {self.err_vs_fp32:.2e}"
            )
        return "\n".join(lines)


class QDQLinear(nn.Module):
    """An ``nn.Linear`` with its weight stored in FP8 (transposed, ONNX layout) for export."""

    def __init__(
        self, linear: nn.Linear, act_granularity: nx.Granularity,
        weight_granularity: nx.Granularity,
        act_fmt: nx.Fp8Format, weight_fmt: nx.Fp8Format, static_amax: float | None,
        power_of_2: bool = False,
    ):
        super().__init__()
        wq, ws = translate.weight_tensors(linear.weight, weight_granularity, weight_fmt, power_of_2)
        self.register_buffer("wq", wq)
        self.register_buffer("ws", ws)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.act_granularity = act_granularity.value
        self.weight_granularity = weight_granularity.value
        self.act_fmt = act_fmt.value
        self.static_amax = -1.0 if static_amax is None else float(static_amax)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.ops.fp8compile_onnx.qdq_act(
            x, self.act_granularity, self.act_fmt, self.static_amax
        )
        return torch.ops.fp8compile_onnx.dq_linear(
            x, self.wq, self.ws, self.bias, self.weight_granularity
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, act={self.act_granularity}, "
            f"weight={self.weight_granularity}, static_amax={self.static_amax}"
        )


def _why_not(linear: nn.Module, cfg: Fp8Config, target: str, name: str) -> str | None:
    """Why ``linear`` cannot be exported as FP8 QDQ (None if it can).

    Raises for ``target="tensorrt"`` where the recipe itself cannot be expressed.
    """
    if not isinstance(linear, nn.Linear):
        return f"{type(linear).__name__} is not an nn.Linear; only nn.Linear exports as QDQ"
    k = linear.in_features
    if target == "tensorrt":
        if cfg.recipe is Recipe.BLOCKWISE:
            raise ValueError(
                f"target='tensorrt' cannot express layer {name!r}: recipe 'blockwise' needs "
                "128x128 weight blocks and 1x128 dynamic activation groups; TensorRT's FP8 QDQ "
                "takes static per-tensor activation scales and per-tensor or per-channel weights"
            )
        if cfg.scaling is not Scaling.STATIC:
            raise ValueError(
                f"target='tensorrt' cannot express layer {name!r}: scaling "
                f"{cfg.scaling.value!r} computes activation scales at run time; TensorRT needs "
                "static per-tensor activation scales (calibrate, then scaling='static')"
            )
    if cfg.recipe is Recipe.BLOCKWISE and k % nx.BLOCK:
        return f"K={k} is not a multiple of {nx.BLOCK}: 1x128 activation groups need whole groups"
    if cfg.scaling is Scaling.STATIC and cfg.static_amax(name) is None:
        if target == "tensorrt":
            raise ValueError(
                f"target='tensorrt' cannot express layer {name!r}: no calibrated activation "
                "amax in config.static_scales for it"
            )
        return "scaling='static' but no calibrated activation amax for it"
    if cfg.scaling is Scaling.DELAYED:
        return "delayed scaling keeps an amax history, which a stateless graph cannot"
    return None


def _export_copy(
    model: nn.Module, args: tuple, cfg: Fp8Config, target: str
) -> tuple[nn.Module, list[str], list[tuple[str, str]]]:
    """A copy of ``model`` with the plan's exportable FP8 linears as :class:`QDQLinear`."""
    from ..plan import plan as make_plan

    with torch.no_grad():
        p = make_plan(model, *args, config=cfg)
    export_model = copy.deepcopy(model).eval()
    fp8_layers: list[str] = []
    kept: list[tuple[str, str]] = []
    for e in p:
        if not (e.gemm and e.is_fp8):
            continue
        if e.gemm != "linear":
            where = e.module or e.name
            kept.append((where, f"{e.gemm} ({e.op}) between activations: exported high "
                                "precision, only nn.Linear weights export as FP8 QDQ"))
            continue
        if e.module in fp8_layers or any(m == e.module for m, _ in kept):
            continue
        try:
            sub = export_model.get_submodule(e.module) if e.module else None
        except AttributeError:
            sub = None
        why = _why_not(sub, cfg, target, e.module or e.name)
        if why:
            kept.append((e.module or e.name, why))
            continue
        static = cfg.static_amax(e.module) if cfg.scaling is Scaling.STATIC else None
        qdq = QDQLinear(
            sub, cfg.recipe.activation_granularity, cfg.recipe.weight_granularity,
            cfg.activation_format, cfg.weight_format, static, cfg.power_of_2_scales,
        )
        parent, _, leaf = e.module.rpartition(".")
        setattr(export_model.get_submodule(parent) if parent else export_model, leaf, qdq)
        fp8_layers.append(e.module)

    return export_model, fp8_layers, kept


def _dynamic_shapes(args: tuple) -> tuple:
    """Every dim but a float tensor's last (features) dynamic; integer inputs fully dynamic."""
    out = []
    for a in args:
        if not isinstance(a, torch.Tensor):
            out.append(None)
            continue
        last = a.dim() - (1 if a.is_floating_point() else 0)
        out.append({i: torch.export.Dim.AUTO for i in range(last)} or None)
    return tuple(out)


def _rel_err(a, b) -> float:
    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _first(out: Any) -> torch.Tensor:
    """The first tensor of a model output (tensor, tuple, dict or HF ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return _first(out[0])


def _initializer_bytes(model) -> tuple[int, int]:
    import onnx

    fp8_types = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
    fp8 = total = 0
    for t in model.graph.initializer:
        n = math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += n
        if t.data_type in fp8_types:
            fp8 += n
    return fp8, total


def fp8_model(
    model: nn.Module, args: tuple, config: Fp8Config | dict | None = None, target: str = "ort"
) -> nn.Module:
    """The model :func:`export_onnx` exports, runnable in PyTorch (the FP8 reference path)."""
    cfg = Fp8Config() if config is None else Fp8Config.from_dict(config)
    was_training = model.training
    model.eval()
    try:
        return _export_copy(model, args if isinstance(args, tuple) else (args,), cfg, target)[0]
    finally:
        model.train(was_training)


def export_onnx(
    model: nn.Module,
    args: tuple,
    path: str | os.PathLike,
    config: Fp8Config | dict | None = None,
    *,
    opset: int = 21,
    target: str = "ort",
    dynamic: bool = True,
    validate: bool = True,
) -> ExportReport:
    """Export ``model`` to ONNX with the plan's FP8 linears as FLOAT8 QDQ in ``ai.onnx``.

    Args:
        model: the FP32/BF16 model (not modified).
        args: tuple of example positional inputs.
        path: ``.onnx`` file to write (weights inside the file).
        config: :class:`Fp8Config` or its dict form; default blockwise, dynamic.
        opset: ONNX opset, 19..23 (blockwise needs >= 21).
        target: ``"ort"`` (any recipe) or ``"tensorrt"`` (static per-tensor activations and
            per-tensor/per-channel weights only; raises ValueError naming the layer otherwise).
        dynamic: all dims but the feature dim of float inputs are dynamic.
        validate: run onnxruntime on ``args`` and report its error against the PyTorch FP8
            path and the FP32 model.
    """
    import onnx

    cfg = Fp8Config() if config is None else Fp8Config.from_dict(config)
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not supported; choose one of {TARGETS}")
    if not isinstance(opset, int) or opset < MIN_OPSET_FP8 or opset > MAX_OPSET:
        raise ValueError(
            f"opset={opset!r}: FP8 QuantizeLinear/DequantizeLinear need opset >= {MIN_OPSET_FP8} "
            f"(and this exporter writes at most {MAX_OPSET})"
        )
    if cfg.recipe is Recipe.BLOCKWISE and opset < MIN_OPSET_BLOCK:
        raise ValueError(
            f"opset={opset}: recipe 'blockwise' needs DequantizeLinear block_size, opset >= "
            f"{MIN_OPSET_BLOCK}"
        )
    if not isinstance(args, tuple):
        args = (args,)
    path = os.fspath(path)

    was_training = model.training
    model.eval()
    try:
        export_model, fp8_layers, kept = _export_copy(model, args, cfg, target)
        torch.onnx.export(
            export_model, args, path, dynamo=True, opset_version=opset,
            custom_translation_table=translate.translation_table(opset),
            dynamic_shapes=_dynamic_shapes(args) if dynamic else None,
            external_data=False, optimize=True, verbose=False,
        )
        proto = onnx.load(path)
        proto.ir_version = min(proto.ir_version, IR_VERSION)
        onnx.save(proto, path)
        onnx.checker.check_model(path, full_check=True)
        fp8_bytes, init_bytes = _initializer_bytes(proto)
        real_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        report = ExportReport(
            path=path, opset=real_opset, ir_version=proto.ir_version, target=target,
            recipe=cfg.recipe.value, scaling=cfg.scaling.value, fp8_layers=fp8_layers,
            kept_layers=kept, fp8_initializer_bytes=fp8_bytes, initializer_bytes=init_bytes,
            file_bytes=os.path.getsize(path),
        )
        if validate:
            from .session import run

            with torch.no_grad():
                ref_fp8 = _first(export_model(*args))
                ref_fp32 = _first(model(*args))
            got = torch.from_numpy(run(path, args)[0])
            report.err_vs_torch_fp8 = _rel_err(got, ref_fp8)
            report.err_vs_fp32 = _rel_err(got, ref_fp32)
            report.torch_fp8_vs_fp32 = _rel_err(ref_fp8, ref_fp32)
        return report
    finally:
        model.train(was_training)
