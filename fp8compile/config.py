"""``Fp8Config``: the one frozen, validated description of what fp8compile does to a model.

Example::

    >>> from fp8compile import Fp8Config
    >>> cfg = Fp8Config.from_dict({"recipe": "rowwise", "overrides": {"lm_head": "bf16"}})
    >>> cfg.recipe
    <Recipe.ROWWISE: 'rowwise'>
    >>> cfg.precision_override("lm_head")
    ('lm_head', <Precision.BF16: 'bf16'>)

Strings from JSON, the CLI or ``torch.compile(..., options={...})`` become enums at once;
every error names the field, the value, the rule and how to fix it.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
import os
from collections.abc import Mapping
from typing import Any

from .numerics import Fp8Format, Granularity

__all__ = [
    "Accumulation",
    "Fp8Config",
    "Precision",
    "Recipe",
    "Rule",
    "Scaling",
]


class Recipe(enum.StrEnum):
    """Scale granularity of an FP8 GEMM (SPEC §1)."""

    BLOCKWISE = "blockwise"  # activations 1x128, weights 128x128 (DeepSeek-V3)
    ROWWISE = "rowwise"  # activations per token, weights per output channel
    TENSORWISE = "tensorwise"  # one scale per tensor

    @property
    def activation_granularity(self) -> Granularity:
        return {
            Recipe.BLOCKWISE: Granularity.GROUP,
            Recipe.ROWWISE: Granularity.ROW,
            Recipe.TENSORWISE: Granularity.TENSOR,
        }[self]

    @property
    def weight_granularity(self) -> Granularity:
        return {
            Recipe.BLOCKWISE: Granularity.BLOCK,
            Recipe.ROWWISE: Granularity.ROW,
            Recipe.TENSORWISE: Granularity.TENSOR,
        }[self]


class Scaling(enum.StrEnum):
    """Where activation scales come from."""

    DYNAMIC = "dynamic"  # this call's amax
    DELAYED = "delayed"  # max over the amax history of the last N calls (tensorwise only)
    STATIC = "static"  # calibrated once (tensorwise only)


class Accumulation(enum.StrEnum):
    """FP8 tensor-core accumulation."""

    PRECISE = "precise"  # promote to an fp32 accumulator every 128 elements of K
    FAST = "fast"  # keep the tensor core's accumulator for the whole K loop


class Precision(enum.StrEnum):
    """What a node runs in.  ``AUTO`` (overrides only) means "let the rules decide"."""

    FP8 = "fp8"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    AUTO = "auto"

    @property
    def dtype(self):
        import torch

        return {
            Precision.BF16: torch.bfloat16,
            Precision.FP16: torch.float16,
            Precision.FP32: torch.float32,
        }.get(self)

    @classmethod
    def of_dtype(cls, dtype) -> "Precision":
        import torch

        return {torch.bfloat16: cls.BF16, torch.float16: cls.FP16}.get(dtype, cls.FP32)


class Rule(enum.StrEnum):
    """Sensitivity rules (SPEC §3); each can be switched off in ``Fp8Config.rules``."""

    NORM = "norm"  # layer/rms/group/batch norm: fp32
    SOFTMAX = "softmax"  # softmax / log_softmax / attention kernels: not fp8
    RESIDUAL = "residual"  # adds whose operand skips over a block: high precision
    EMBEDDING = "embedding"  # embedding lookups: high precision
    OUTPUT_HEAD = "output_head"  # last linear before logits / loss: high precision
    LOSS = "loss"  # cross entropy, nll, mse...: fp32
    SOFTMAX_INPUT = "softmax_input"  # linear/matmul feeding a softmax (router, gate, q·kᵀ)
    SOFTMAX_OUTPUT = "softmax_output"  # matmul consuming softmax probabilities (p·v)
    SMALL = "small"  # linears below min_weight_numel
    SHAPE = "shape"  # dims the FP8 tensor cores cannot take (K or N not a multiple of 16)
    # promoted (blockwise / precise) grouped GEMMs with groups too tall to run faster than bf16
    GROUPED_SIZE = "grouped_size"


def _enum(cls: type[enum.Enum], field: str, value: Any) -> enum.Enum:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value.lower())
        except ValueError:
            pass
    choices = ", ".join(repr(m.value) for m in cls)
    raise ValueError(f"Fp8Config.{field}={value!r} is not valid; choose one of {choices}")


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """Everything fp8compile decides, in one validated, hashable object.

    Attributes:
        recipe: scale granularity of FP8 GEMMs (default DeepSeek-V3 ``blockwise``).
        scaling: activation scales ``dynamic`` (default), ``delayed`` or ``static``; the last
            two need ``recipe="tensorwise"``.
        activation_format / weight_format: FP8 format of forward operands (``e4m3``).
        gradient_format: format of output gradients in training (``e5m2`` is the "hybrid"
            recipe; ``e4m3`` with 1x128 scales is DeepSeek's).
        accumulation: ``precise`` (fp32 promotion every 128 of K) or ``fast``, for the forward
            GEMMs (inference and training).
        grad_accumulation: the same for the two backward GEMMs of training (dX, dW).  dW sums
            over every token, so it stays ``precise`` by default, also when the forward is
            ``fast`` (the split TransformerEngine and torchao use by default).
        power_of_2_scales: round scales up to powers of two.
        overrides: ``{glob on module path: precision}``, first match wins, e.g.
            ``{"lm_head": "fp8", "layers.0.*": "bf16"}``.  ``auto`` lets the rules decide.
        rules: sensitivity rules in force (all by default).
        min_weight_numel: FP8 only for linears with ``K*N`` at least this (smaller ones do not
            profit: the quantization pass costs more than the GEMM saves).
        amax_history_len: length of the delayed-scaling amax history.
        static_scales: ``{module path: activation amax}`` for ``scaling="static"``
            (written by :func:`fp8compile.calibrate`).
        matmul: also quantize activation×activation matmuls (bmm) that no rule protects.
        min_sqnr_db: demote a layer whose measured FP8 SQNR (``calibration``) is below this.
        calibration: measured figures per module, ``((module, sqnr_db, amax), ...)`` (written
            by :func:`fp8compile.calibrate`); shown in the plan and used by ``min_sqnr_db`` and,
            where ``static_scales`` has no entry, as the static activation amax.
        inference: ``True`` caches quantized weights (per parameter version); ``False`` keeps
            autograd; ``None`` decides from ``torch.is_grad_enabled()`` at compile time.
        fuse_projections: inference: FP8 linears that read one input (q/k/v, gate/up) with no
            bias run as one GEMM over their stacked weights.  Exact for ``rowwise`` and for
            ``blockwise`` (where each N is a multiple of 128); ``tensorwise`` then quantizes
            the stack with one scale, the largest member's.  The plan lists the groups.
        fuse_producers: an FP8 linear's input quantization runs inside the RMSNorm (with
            the residual add before it, where the norm reads one), or the SiLU·mul, that
            produces the input, where nothing else reads the high-precision activation: it is
            then written once, in FP8, and the producer computes in fp32.  ``False`` keeps the
            producer as the model wrote it (its output rounded to the model dtype, then
            quantized), at the cost of that round trip through memory.
        fuse_epilogues: inference: an FP8 linear's activation (exact GELU, SiLU, ReLU) and
            the residual add of its output run in the Triton GEMM's epilogue, in fp32 with
            one rounding, where nothing else reads the intermediate values.  The GEMM
            backend is then timed with the epilogue; where cuBLAS wins, the epilogue runs
            after it as pointwise ops and the compiled graph is the unfused one.  Off by
            default: on an H100 the LLaMA block's GEMMs keep cuBLAS with it on, so it only
            adds compile time there (docs/performance.md).
        fuse_swiglu: inference: the gate/up GEMM of a SwiGLU MLP (``silu(gate(x)) * up(x)``
            as one fused projection, ``fuse_projections``) computes ``silu(gate) * up`` in
            its epilogue, from the fp32 product, and writes that one half-width tensor
            instead of gate and up; its quantization for the down projection is then a
            plain pass over it.  Each output tile reads 128 rows of gate and the matching
            128 of up from the stacked weight.  ``None`` (default): where the
            warp-specialized Hopper kernel serves the GEMM (fast accumulation with
            row/tensor scales, M > 256, static shapes) and the fused step is faster: at
            M >= 2048, by rule, with tensor scales and not with row scales (measured);
            below, or under ``mode="max-autotune"``, where it times faster at compile time
            than the unfused one (3% margin); ``True``: wherever
            the pattern is found (elsewhere the GEMM's fp32 product then goes through the
            SwiGLU as pointwise ops); ``False``: never.  With blockwise scales the fold
            makes the GEMM quantize h in the 1x128 groups the down projection reads
            (``fp8compile::scaled_mm_swiglu_quantize``; on Hopper in the kernel's epilogue,
            E4M3 with plain scales), so h is never written in high precision; auto by the
            same rules (from 2048 tokens: made, 0.94-0.98x the step on an H200).  The
            plan says where it was used, with both times or the rule, and why not elsewhere.
        fuse_residual: inference: the residual add that reads an FP8 linear's output (a
            transformer block's last ``h + down_proj(...)``) runs in that GEMM's epilogue, in
            fp32 with one rounding; a residual stream ``h = x + o`` is passed as its two
            terms, so it is never rounded to the model dtype either.  ``None`` (default):
            by rule where the warp-specialized Hopper kernel serves the GEMM (fast
            accumulation with row/tensor scales, M > 256, static shapes): it loads the
            residual tiles under its K loop, and beat cuBLAS followed by the add
            (docs/performance.md); ``True``: wherever the pattern is found (the GEMM backend
            is then chosen with the epilogue; on Hopper the promoted path of that kernel,
            blockwise or precise, adds the residuals too, measured no faster than cuBLAS
            and the add, hence not by rule); ``False``: never.  ``fuse_epilogues=True``
            folds residual adds too, with activations, timed.
        cache_training_weights: training: keep each weight's FP8 copies (``W`` for the
            forward GEMM, ``Wᵀ`` for dX) across calls until the parameter changes (its
            version counter: an optimizer step, an in-place update under ``no_grad``), as
            for gradient accumulation over micro-batches.  Holds two FP8 copies of every FP8
            weight; needs dynamic scaling.  Updating a weight through ``p.data`` in place
            bypasses the version counter, and the cache then serves the old weight.
        release_weights: inference: free the storage of every parameter a graph reads only
            as FP8, as the graph compiles, once its FP8 copy is made
            (``untyped_storage().resize_(0)``; the tensor keeps its shape, so nothing
            recompiles), leaving the FP8 copy as the only one:
            the weights then take about half the memory of bf16 ones instead of one and a
            half times.  Graphs compiled later take the stored copies.  The model then runs
            only through graphs compiled by fp8hpf with the same recipe: a graph that needs
            a released parameter in high precision (eager code, a training graph, another
            recipe) raises a ValueError naming it instead of reading freed memory.  New data
            (``p.data = ...``, or ``load_state_dict``) brings a parameter back; it is
            quantized and released again.  ``state_dict()``, ``copy.deepcopy``, pickling
            (``torch.save(model)``) and converting the model (``model.half()``, ``.to()``,
            ``.cuda()``; nothing is converted) raise a ValueError for a released parameter.
            Any other write into one (``copy_``, an optimizer step)
            goes through a null pointer and crashes: assign or load instead.
            Parameters read in high precision too, or sharing their storage with other
            tensors, are kept; the plan lists them and the bytes freed.
    """

    recipe: Recipe = Recipe.BLOCKWISE
    scaling: Scaling = Scaling.DYNAMIC
    activation_format: Fp8Format = Fp8Format.E4M3
    weight_format: Fp8Format = Fp8Format.E4M3
    gradient_format: Fp8Format = Fp8Format.E4M3
    accumulation: Accumulation = Accumulation.PRECISE
    grad_accumulation: Accumulation = Accumulation.PRECISE
    power_of_2_scales: bool = False
    overrides: tuple[tuple[str, Precision], ...] = ()
    rules: frozenset[Rule] = frozenset(Rule)
    min_weight_numel: int = 128 * 128
    amax_history_len: int = 16
    static_scales: tuple[tuple[str, float], ...] = ()
    matmul: bool = True
    min_sqnr_db: float | None = None
    calibration: tuple[tuple[str, float, float], ...] = ()
    inference: bool | None = None
    fuse_projections: bool = True
    fuse_producers: bool = True
    fuse_epilogues: bool = False
    fuse_swiglu: bool | None = None
    fuse_residual: bool | None = None
    cache_training_weights: bool = False
    release_weights: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "recipe", _enum(Recipe, "recipe", self.recipe))
        set_(self, "scaling", _enum(Scaling, "scaling", self.scaling))
        for name in ("activation_format", "weight_format", "gradient_format"):
            set_(self, name, _enum(Fp8Format, name, getattr(self, name)))
        for name in ("accumulation", "grad_accumulation"):
            set_(self, name, _enum(Accumulation, name, getattr(self, name)))
        set_(self, "overrides", self._check_overrides(self.overrides))
        set_(self, "rules", frozenset(_enum(Rule, "rules", r) for r in self.rules))
        set_(self, "static_scales", self._check_static(self.static_scales))
        set_(self, "calibration", self._check_calibration(self.calibration))
        for name in ("power_of_2_scales", "matmul", "fuse_projections", "fuse_producers",
                     "fuse_epilogues", "cache_training_weights", "release_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Fp8Config.{name}={getattr(self, name)!r} must be True/False")
        for name in ("inference", "fuse_swiglu", "fuse_residual"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"Fp8Config.{name}={v!r} must be True, False or None")
        for name, low in (("min_weight_numel", 0), ("amax_history_len", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"Fp8Config.{name}={v!r} must be an integer >= {low}")
        if self.min_sqnr_db is not None and not isinstance(self.min_sqnr_db, (int, float)):
            raise ValueError(f"Fp8Config.min_sqnr_db={self.min_sqnr_db!r} must be a number (dB)")
        if self.cache_training_weights and self.scaling is not Scaling.DYNAMIC:
            raise ValueError(
                f"Fp8Config.cache_training_weights=True caches dynamically scaled weights, but "
                f"scaling={self.scaling.value!r}; use scaling='dynamic' or leave the cache off"
            )
        if self.release_weights and self.inference is False:
            raise ValueError(
                "Fp8Config.release_weights=True frees the high-precision weights of inference "
                "graphs, but inference=False (training reads them); leave inference as None or "
                "True, or release_weights=False"
            )
        if self.scaling is not Scaling.DYNAMIC and self.recipe is not Recipe.TENSORWISE:
            raise ValueError(
                f"Fp8Config.scaling={self.scaling.value!r} needs one scale per tensor, but "
                f"recipe={self.recipe.value!r}; use recipe='tensorwise' or scaling='dynamic'"
            )

    @staticmethod
    def _check_overrides(value: Any) -> tuple[tuple[str, Precision], ...]:
        items = value.items() if isinstance(value, Mapping) else value
        out = []
        for item in items:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(
                    f"Fp8Config.overrides entry {item!r} must be a (glob, precision) pair; "
                    "pass a dict such as {'lm_head': 'bf16'}"
                )
            glob, prec = item
            if not isinstance(glob, str) or not glob:
                raise ValueError(f"Fp8Config.overrides key {glob!r} must be a non-empty glob")
            out.append((glob, _enum(Precision, f"overrides[{glob!r}]", prec)))
        return tuple(out)

    @staticmethod
    def _check_static(value: Any) -> tuple[tuple[str, float], ...]:
        items = value.items() if isinstance(value, Mapping) else value
        out = []
        for name, amax in items:
            if not isinstance(amax, (int, float)) or not amax >= 0 or amax == float("inf"):
                raise ValueError(
                    f"Fp8Config.static_scales[{name!r}]={amax!r} must be a finite amax >= 0"
                )
            out.append((str(name), float(amax)))
        return tuple(out)

    @staticmethod
    def _check_calibration(value: Any) -> tuple[tuple[str, float, float], ...]:
        if isinstance(value, Mapping):
            value = [(k, *v) if isinstance(v, (list, tuple)) else (k, v["sqnr_db"], v["amax"])
                     for k, v in value.items()]
        out = []
        for item in value:
            try:
                module, sqnr_db, amax = item
                out.append((str(module), float(sqnr_db), float(amax)))
            except (TypeError, ValueError, KeyError):
                raise ValueError(
                    f"Fp8Config.calibration entry {item!r} must be (module, sqnr_db, amax); "
                    "produce it with fp8compile.calibrate"
                ) from None
        return tuple(out)

    # -- lookups -------------------------------------------------------------------------

    def precision_override(self, module_path: str) -> tuple[str, Precision] | None:
        """The first ``(glob, precision)`` whose glob matches ``module_path``, or None.

        A glob matches the module itself or anything inside it: ``"layers.0"`` also covers
        ``layers.0.mlp.up``.
        """
        for glob, prec in self.overrides:
            if fnmatch.fnmatchcase(module_path, glob) or fnmatch.fnmatchcase(
                module_path, glob + ".*"
            ):
                return glob, prec
        return None

    def static_amax(self, module_path: str) -> float | None:
        """Calibrated activation amax for static scaling (``static_scales``, then
        ``calibration``), or None."""
        amax = dict(self.static_scales).get(module_path)
        if amax is None and (m := self.measured(module_path)):
            amax = m[1]
        return amax

    def measured(self, module_path: str) -> tuple[float, float] | None:
        """``(sqnr_db, amax)`` measured by calibration for ``module_path``, or None."""
        for module, sqnr_db, amax in self.calibration:
            if module == module_path:
                return sqnr_db, amax
        return None

    # -- (de)serialisation ---------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Fp8Config":
        """Build from plain data (JSON, CLI, ``torch.compile`` options); unknown keys raise."""
        if isinstance(d, Fp8Config):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"Fp8Config needs a dict of options, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown fp8compile option(s) {unknown}; valid options are {sorted(known)}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; ``Fp8Config.from_dict(cfg.to_dict()) == cfg``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            elif f.name == "overrides":
                v = {glob: p.value for glob, p in v}
            elif f.name == "static_scales":
                v = dict(v)
            elif f.name == "calibration":
                v = {m: {"sqnr_db": q, "amax": a} for m, q, a in v}
            elif f.name == "rules":
                v = sorted(r.value for r in v)
            out[f.name] = v
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Fp8Config":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e}); fix the policy file") from e
        return cls.from_dict(data)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    def replace(self, **changes: Any) -> "Fp8Config":
        return dataclasses.replace(self, **changes)
