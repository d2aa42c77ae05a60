"""``export_onnx``: the plan's FP8 linears as standard ONNX QDQ, everything else as usual.

Steps:

1. ``fp8compile.plan(model, *args, config=config)``: the analysis ``torch.compile(backend=
   "fp8hpf")`` runs, so the file has the precisions the compiled model has.
2. A copy of the model gets every FP8 linear that ONNX can express replaced by
   :class:`~fp8compile.onnx.modules.Fp8ExportLinear` (weights pre-quantized to FP8 buffers,
   activations through ``fp8compile::quantize``/``quantize_scaled``, the GEMM through
   ``fp8compile::scaled_mm``).  What stays high precision is listed with the reason, in the
   report and in each plan entry's ``extra["onnx"]``.
3. ``torch.onnx.export(copy, dynamo=True, custom_translation_table=...)`` with the
   translations in :mod:`.translate`; dynamic batch/sequence axes by default.
4. Validation: IR version set for the opset, ``onnx.checker`` full check, then onnxruntime
   (with the session options of :mod:`.session`) against the copy run eagerly (the PyTorch FP8
   path: the fp8compile ops' CPU reference) and against the original model.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..config import Fp8Config, Recipe
from . import validate as V
from .modules import swap_fp8_linears
from .translate import translation_table

__all__ = ["ExportReport", "export_onnx", "fp8_model"]

TARGETS = ("ort", "tensorrt")
MIN_OPSET = 19  # FP8 QuantizeLinear/DequantizeLinear
MIN_OPSET_BLOCK = 21  # block_size (1x128 / 128x128 scales), output_dtype
MAX_OPSET = 23  # newest ai.onnx opset onnxscript 0.7 writes


@dataclasses.dataclass
class ExportReport:
    """What :func:`export_onnx` wrote, what stayed high precision, and the measured error.

    Errors are relative Frobenius errors ``‖a − b‖ / ‖b‖`` of the first output on the example
    inputs: ``err_vs_torch_fp8`` (onnxruntime vs the PyTorch FP8 path: quantization and GEMM by
    the fp8compile ops on CPU), ``err_vs_fp32`` (onnxruntime vs the original model) and
    ``torch_fp8_vs_fp32`` (the FP8 error of the model itself, for scale).
    """

    path: str
    opset: int
    ir_version: int
    target: str
    recipe: str
    scaling: str
    fp8_layers: list[str]
    kept_layers: list[tuple[str, str]]
    fp8_initializer_bytes: int
    initializer_bytes: int
    file_bytes: int
    plan: Any = dataclasses.field(default=None, repr=False)
    err_vs_torch_fp8: float | None = None
    err_vs_fp32: float | None = None
    torch_fp8_vs_fp32: float | None = None

    def summary(self) -> str:
        lines = [
            f"{self.path}: opset {self.opset}, IR {self.ir_version}, target {self.target}, "
            f"recipe {self.recipe} ({self.scaling}), {self.file_bytes / 2**20:.2f} MiB",
            f"  FP8 layers ({len(self.fp8_layers)}): {', '.join(self.fp8_layers) or '-'}",
            f"  initializers: {self.fp8_initializer_bytes} B in FP8 of "
            f"{self.initializer_bytes} B",
        ]
        lines += [f"  high precision: {m}: {why}" for m, why in self.kept_layers]
        if self.err_vs_torch_fp8 is not None:
            lines.append(
                f"  relative error: onnxruntime vs PyTorch FP8 {self.err_vs_torch_fp8:.2e}, "
                f"vs FP32 {self.err_vs_fp32:.2e} (PyTorch FP8 vs FP32 "
                f"{self.torch_fp8_vs_fp32:.2e})"
            )
        return "\n".join(lines)

    __str__ = summary


def _check_args(model, args, kwargs, opset, target, dynamic, cfg) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__!r} must be a torch.nn.Module")
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not supported; choose one of {TARGETS}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not (
        MIN_OPSET <= opset <= MAX_OPSET
    ):
        raise ValueError(
            f"opset={opset!r}: FP8 QuantizeLinear/DequantizeLinear need an integer opset "
            f">= {MIN_OPSET}, and this exporter writes at most {MAX_OPSET}"
        )
    if cfg.recipe is Recipe.BLOCKWISE and opset < MIN_OPSET_BLOCK:
        raise ValueError(
            f"opset={opset}: recipe 'blockwise' needs DequantizeLinear block_size, opset >= "
            f"{MIN_OPSET_BLOCK}; use opset={MIN_OPSET_BLOCK} or another recipe"
        )
    if cfg.recipe is Recipe.ROWWISE and opset < MIN_OPSET_BLOCK:
        raise ValueError(
            f"opset={opset}: recipe 'rowwise' reshapes FP8 activations to (tokens, K) for "
            f"per-token scales, and onnxruntime runs FP8 Reshape from opset {MIN_OPSET_BLOCK}; "
            f"use opset={MIN_OPSET_BLOCK} (or recipe='tensorwise' at opset 19/20)"
        )
    if not isinstance(dynamic, bool):
        raise ValueError(f"dynamic={dynamic!r} must be True or False")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"kwargs={kwargs!r} must be a dict of keyword arguments or None")
    if not any(isinstance(a, torch.Tensor) for a in (*args, *(kwargs or {}).values())):
        raise ValueError(f"args={args!r} holds no tensor; pass the example inputs of forward")


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Every dim dynamic except the last (feature) dim of float tensors, keyed by the name
    of the forward argument.  ``Dim.AUTO`` lets torch.export keep a dim static where the
    model needs it (a size-1 example dim also stays static: use examples with batch >= 2)."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        param = inspect.signature(model.forward).parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: _dims(v) for k, v in value.items()}
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(_dims(v) for v in value)
        else:
            out[name] = _dims(value)
    return out


def _dims(a: Any) -> dict | None:
    if not isinstance(a, torch.Tensor):
        return None
    last = a.dim() - (1 if a.is_floating_point() else 0)
    return {i: torch.export.Dim.AUTO for i in range(last)} or None


def fp8_model(
    model: nn.Module,
    args: tuple | torch.Tensor,
    config: Fp8Config | Mapping[str, Any] | None = None,
    target: str = "ort",
    *,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The model :func:`export_onnx` exports, runnable in PyTorch: a copy with the plan's FP8
    layers as :class:`~fp8compile.onnx.modules.Fp8ExportLinear` (the PyTorch FP8 path the
    exported file reproduces).  ``model`` is not modified."""
    from ..passes.weights import check_model
    from ..plan import plan as make_plan

    model = getattr(model, "_orig_mod", model)
    check_model(model, "fp8compile.fp8_model")
    cfg = Fp8Config() if config is None else Fp8Config.from_dict(config)
    args = args if isinstance(args, tuple) else (args,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = make_plan(model, *args, config=cfg, **dict(kwargs or {}))
        out = copy.deepcopy(model).eval()
        swap_fp8_linears(out, p, cfg, target)
        return out
    finally:
        model.train(was_training)


def _name_fp8_weights(proto, layers: list[str]) -> bool:
    """Name the FP8 weight initializers (and their scales) after their layer.

    The exporter's optimizer folds the Transpose of each FP8 weight into a new initializer
    with a generated name (``val_44``); the layer path is in the ``DequantizeLinear`` node's
    ``pkg.torch.onnx.name_scopes`` metadata.  Returns whether anything was renamed.
    """
    import ast

    import onnx

    inits = {t.name: t for t in proto.graph.initializer}
    fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
    renames: dict[str, str] = {}
    taken = set(inits)
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        if inits[node.input[0]].data_type not in fp8 or node.input[0] in renames:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        except (ValueError, SyntaxError):
            continue
        # Scopes are module paths, full (``['', 'a', 'a.b', op]``) or relative (``['', 'b',
        # op]``) depending on the model; take whichever names an FP8 layer.
        cands = [scopes[-2] if len(scopes) > 1 else "", ".".join(s for s in scopes[:-1] if s)]
        layer = next((c for c in cands if c in layers), None)
        if layer is None:
            continue
        for old, suffix in zip(node.input[:2], ("weight_fp8", "weight_scale")):
            new = f"{layer}.{suffix}"
            if old in inits and old not in renames and new not in taken:
                renames[old] = new
                taken.add(new)
    if not renames:
        return False
    for t in proto.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for vi in proto.graph.value_info:
        vi.name = renames.get(vi.name, vi.name)
    return True


def export_onnx(
    model: nn.Module,
    args: tuple | torch.Tensor,
    path: str | os.PathLike,
    config: Fp8Config | Mapping[str, Any] | None = None,
    *,
    opset: int = 21,
    target: str = "ort",
    dynamic: bool = True,
    kwargs: Mapping[str, Any] | None = None,
    validate: bool = True,
) -> ExportReport:
    """Export ``model`` to ONNX with the plan's FP8 linears as FLOAT8 QDQ in ``ai.onnx``.

    Args:
        model: the model in FP32 (or BF16), not modified.  A ``torch.compile``-d model is
            accepted (its original module is exported).
        args: example positional inputs (a tuple, or one tensor).
        path: the ``.onnx`` file to write (weights inside it).
        config: :class:`~fp8compile.Fp8Config` or its dict form; default blockwise, dynamic.
        opset: ``ai.onnx`` opset, 19..23; blockwise needs >= 21.
        target: ``"ort"`` (every recipe) or ``"tensorrt"`` (only static per-tensor activation
            scales and per-tensor weights with QDQ on both MatMul inputs; any FP8 layer it
            cannot express raises ValueError naming the layer and what is missing).
        dynamic: every input dim but the feature dim of float inputs is dynamic.
        kwargs: example keyword inputs of ``forward`` (e.g. ``{"use_cache": False}``).
        validate: run onnxruntime on the example inputs and report its error against the
            PyTorch FP8 path and the original model.

    Returns:
        :class:`ExportReport` (``print`` it for a summary).

    Example::

        >>> import torch, fp8compile
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(),
        ...                             torch.nn.Linear(256, 256))
        >>> r = fp8compile.export_onnx(model, (torch.randn(4, 256),), "/tmp/m.onnx",
        ...                            {"recipe": "rowwise"})  # doctest: +SKIP
        >>> r.fp8_layers, r.err_vs_torch_fp8 < 1e-3  # doctest: +SKIP
        (['0'], True)
    """
    import onnx

    from ..passes.weights import check_model
    from ..plan import plan as make_plan

    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the module
    check_model(model, "fp8compile.export_onnx")
    if config is not None and not isinstance(config, (Fp8Config, Mapping)):
        raise ValueError(f"config={config!r} must be an Fp8Config, a dict of its fields or None")
    cfg = Fp8Config() if config is None else Fp8Config.from_dict(config)
    args = args if isinstance(args, tuple) else (args,)
    _check_args(model, args, kwargs, opset, target, dynamic, cfg)
    kwargs = dict(kwargs or {})
    path = os.fspath(path)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = make_plan(model, *args, config=cfg, **kwargs)
        export_model = copy.deepcopy(model).eval()
        swapped = swap_fp8_linears(export_model, p, cfg, target)

        torch.onnx.export(
            export_model, args, path, kwargs=kwargs or None, dynamo=True, opset_version=opset,
            custom_translation_table=translation_table(opset, target),
            dynamic_shapes=_dynamic_shapes(export_model, args, kwargs) if dynamic else None,
            external_data=False, optimize=True, verbose=False,
        )
        proto = onnx.load(path)
        if _name_fp8_weights(proto, swapped.fp8):
            onnx.save(proto, path)
        proto = V.check_file(path, opset)
        fp8_bytes, init_bytes = V.fp8_initializer_bytes(proto)
        report = ExportReport(
            path=path, opset=opset, ir_version=proto.ir_version, target=target,
            recipe=cfg.recipe.value, scaling=cfg.scaling.value, fp8_layers=swapped.fp8,
            kept_layers=swapped.kept, fp8_initializer_bytes=fp8_bytes,
            initializer_bytes=init_bytes, file_bytes=os.path.getsize(path), plan=p,
        )
        if validate:
            from .session import run

            with torch.no_grad():
                ref_fp8 = V.first_tensor(export_model(*args, **kwargs))
                ref_fp32 = V.first_tensor(model(*args, **kwargs))
            inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            got = run(path, inputs)[0]
            report.err_vs_torch_fp8 = V.rel_err(got, ref_fp8.float())
            report.err_vs_fp32 = V.rel_err(got, ref_fp32.float())
            report.torch_fp8_vs_fp32 = V.rel_err(ref_fp8.float(), ref_fp32.float())
        return report
    finally:
        model.train(was_training)
