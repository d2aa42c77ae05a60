"""The pass manager, the compile context the passes share, and FX node helpers.

A pass is a :class:`torch.fx.passes.infra.pass_base.PassBase` whose ``call(gm)`` returns a
``PassResult``.  It declares which passes must run before it in ``after``; the manager orders
the list by those constraints (a cycle or a missing prerequisite is an error at construction)
and, when a pass fails, re-raises the *same* exception with a note naming the failing pass and
the ones that ran before it.
"""

from __future__ import annotations

import dataclasses
import graphlib
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..config import Fp8Config

__all__ = [
    "META",
    "CompileContext",
    "Fp8Pass",
    "PassManager",
    "PassResult",
    "eliminate_dead_code",
    "info",
    "mutates",
    "target_name",
    "module_of",
    "shape_of",
    "dtype_of",
    "value_of",
]

META = "fp8compile"
"""Key of ``node.meta`` where passes leave their decisions (see passes/README.md)."""


@dataclasses.dataclass
class CompileContext:
    """What one compilation of one FX graph shares between passes.

    Attributes:
        config: the validated configuration.
        example_inputs: Dynamo's example inputs, aligned with the graph's placeholders.
        inference: cache quantized weights (no autograd through them) when True.
        graph_index: 0 for the first graph Dynamo hands over, 1 for the next...
        extra_inputs: providers appended to the graph's inputs by the scales pass; each takes
            the runtime argument list and returns the tensor for its placeholder.
        plan_entries: filled by the precision pass.
        stats: figures for the plan (weight memory, compile time...).
        release: free each parameter's storage as soon as its only reader, a weight cache,
            holds its FP8 copy (``Fp8Config.release_weights``, set by a compiling backend).
    """

    config: Fp8Config
    example_inputs: Sequence[Any]
    inference: bool
    graph_index: int = 0
    extra_inputs: list[Callable[[Sequence[Any]], torch.Tensor]] = dataclasses.field(
        default_factory=list
    )
    extra_examples: list[torch.Tensor] = dataclasses.field(default_factory=list)
    weight_caches: list[Any] = dataclasses.field(default_factory=list)
    plan_entries: list[Any] = dataclasses.field(default_factory=list)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    release: bool = False

    def add_input(
        self,
        graph: torch.fx.Graph,
        name: str,
        provider: Callable[[Sequence[Any]], torch.Tensor],
    ) -> torch.fx.Node:
        """Append a graph input whose value ``provider(runtime_args)`` computes per call.

        The new placeholder goes after every existing one, so the compiled graph takes
        ``(*dynamo_args, *extra_inputs)``.
        """
        placeholders = list(graph.find_nodes(op="placeholder"))
        # A placeholder's target is its argument name in the generated code: keep it unique
        # (two inputs named alike made the graph's forward a SyntaxError).
        taken = {p.target for p in placeholders}
        unique, i = name, 0
        while unique in taken:
            i += 1
            unique = f"{name}_{i}"
        with graph.inserting_after(placeholders[-1]):
            node = graph.placeholder(unique)
        example = provider(self.example_inputs)
        node.meta["example_value"] = example
        # AOTAutograd reads Dynamo's per-placeholder source; None marks an input that no user
        # code produced (as for DDP's split graphs).  The value is stable across calls, so
        # CUDA graphs may treat it as a static input.
        node._dynamo_source = None
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        self.extra_inputs.append(provider)
        self.extra_examples.append(example)
        return node

    def set_example(self, node: torch.fx.Node, value: torch.Tensor) -> None:
        """Replace the example value of an input :meth:`add_input` added."""
        i = self.placeholder_index(node)
        if i is None or i < len(self.example_inputs):
            raise ValueError(f"set_example: {node.name} is not an input add_input added")
        self.extra_examples[i - len(self.example_inputs)] = value
        node.meta["example_value"] = value

    def placeholder_index(self, node: torch.fx.Node) -> int | None:
        if node.op != "placeholder":
            return None
        for i, n in enumerate(node.graph.find_nodes(op="placeholder")):
            if n is node:
                return i
        return None

    def is_parameter(self, node: torch.fx.Node) -> bool:
        """True for placeholders that Dynamo filled from an ``nn.Parameter``."""
        i = self.placeholder_index(node)
        return i is not None and i < len(self.example_inputs) and isinstance(
            self.example_inputs[i], torch.nn.Parameter
        )


class Fp8Pass(PassBase):
    """Base of fp8compile's passes: holds the context and the ordering constraint."""

    after: ClassVar[tuple[type["Fp8Pass"], ...]] = ()

    def __init__(self, ctx: CompileContext) -> None:
        super().__init__()
        self.ctx = ctx

    @property
    def name(self) -> str:
        return type(self).__name__


class PassManager:
    """Runs passes once each, in an order satisfying every pass's ``after``."""

    def __init__(self, passes: Sequence[Fp8Pass]) -> None:
        by_type = {type(p): p for p in passes}
        if len(by_type) != len(passes):
            raise ValueError("each pass type may appear once in a pipeline")
        graph: dict[type, set[type]] = {}
        for p in passes:
            missing = [a.__name__ for a in p.after if a not in by_type]
            if missing:
                raise ValueError(
                    f"{p.name} must run after {missing}, which are not in the pipeline"
                )
            graph[type(p)] = set(p.after)
        try:
            order = list(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as e:
            raise ValueError(f"pass ordering constraints form a cycle: {e.args[1]}") from None
        # Keep the caller's order wherever the constraints allow it.
        rank = {t: i for i, t in enumerate(type(p) for p in passes)}
        order = _stable_topo(order, graph, rank)
        self.passes = [by_type[t] for t in order]

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for i, p in enumerate(self.passes):
            try:
                result = p(gm)
            except Exception as e:
                before = [q.name for q in self.passes[:i]]
                e.add_note(f"fp8compile: pass {p.name} failed after {before}")
                raise
            gm = result.graph_module
            modified |= result.modified
        return PassResult(gm, modified)


def _stable_topo(order: list[type], graph: dict[type, set[type]], rank: dict[type, int]):
    done: list[type] = []
    pending = sorted(order, key=rank.__getitem__)
    while pending:
        for t in pending:
            if graph[t] <= set(done):
                done.append(t)
                pending.remove(t)
                break
    return done


# --------------------------------------------------------------------------------------
# node helpers

# The module Dynamo traced from is a frame argument: a local (``L['self']``) or, when a
# decorator's ``wrapper(*args, **kwargs)`` hands it on (as transformers 5's ``forward``
# decorators do), an item of one (``L['args'][0]``, ``L['kwargs']['model']``). Dynamo spells
# submodule steps ``.name``/``.0``, so a subscript right after the local belongs to the root,
# not to the module's path.
_ROOT = re.compile(r"^L\['[^']*'\](?:\[(?:\d+|'[^']*')\])*\.?")


def _clean_path(path: str) -> str:
    path = _ROOT.sub("", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.lstrip(".")


def module_of(node: torch.fx.Node) -> tuple[str, type | None]:
    """``(module path, module class)`` of the innermost module a node was traced in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", None
    path, cls = list(stack.values())[-1]
    return _clean_path(path), cls if isinstance(cls, type) else None


def target_name(node: torch.fx.Node) -> str:
    """A call's name: the method's for ``call_method``, the function's ``__name__`` else."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def mutates(node: torch.fx.Node) -> bool:
    """True for a call that changes a tensor in place: a method or function named ``..._``
    (``x.mul_(2)``, ``torch.relu_``), ``operator.iadd`` and friends, ``operator.setitem``."""
    if node.op not in ("call_method", "call_function"):
        return False
    name = target_name(node)
    dunder = name.startswith("__") and name.endswith("__")
    return (name.endswith("_") and not dunder) or name.startswith("__i") or name == "setitem"


def eliminate_dead_code(graph: torch.fx.Graph) -> None:
    """``graph.eliminate_dead_code()`` that keeps in-place calls whose result is unused.

    FX counts every ``call_method`` as pure, so ``a.mul_(2)`` (result unused, ``a`` read
    later) would be dropped and the graph would compute ``a`` without it."""
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or mutates(n))


def info(node: torch.fx.Node) -> dict[str, Any]:
    """The node's ``meta["fp8compile"]`` dict, created on first use."""
    return node.meta.setdefault(META, {})


def plan_entries_of(node: torch.fx.Node) -> list:
    """The plan entries of the linears an FP8 op ``node`` computes: its ``entry`` (handed on
    from RewritePass), or ``entries`` for one GEMM that serves several."""
    i = info(node)
    return [e for e in i.get("entries", [i.get("entry")]) if e is not None]


def add_note(entry, text: str) -> None:
    """Append ``text`` to a plan entry's reason, once."""
    if text not in entry.reason:
        entry.reason = f"{entry.reason}; {text}"


def value_of(node: Any):
    """The example value Dynamo (``example_value``) or a trace (``val``) left on ``node``:
    a (fake) tensor, a SymInt, ...; None for anything that is not a node."""
    if not isinstance(node, torch.fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def shape_of(node: Any) -> tuple | None:
    v = value_of(node)
    if isinstance(v, torch.Tensor):
        return tuple(_hint(s) for s in v.shape)
    return None


def dtype_of(node: Any) -> torch.dtype | None:
    v = value_of(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _hint(s: Any) -> int | None:
    """A concrete size for a possibly symbolic dimension (its hint), or None."""
    if isinstance(s, int):
        return s
    try:
        return int(s.node.hint)
    except Exception:
        return None
