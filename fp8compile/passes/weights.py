"""FP8 weight copies shared by a process's graphs; high-precision weights released.

Each inference graph reads its FP8 weights from :class:`~.scales.WeightCache` objects.  Graphs
of one model (a prefill and a decode graph, a graph recompiled for dynamic shapes) quantize
the same parameters the same way, so their caches take the copies from one store: a copy is
made once per parameter version and held once, however many graphs read it.  The store holds
a copy weakly while its parameters keep their own storage (the graphs' caches own it).

``Fp8Config.release_weights`` goes further.  The storage of every parameter a graph reads only
through FP8 copies is freed with ``untyped_storage().resize_(0)``: the tensor keeps its shape,
strides, dtype and device, so Dynamo's guards still hold and nothing recompiles.  A parameter
whose one reader is a weight quantization is freed while the graph compiles, as soon as its
cache holds the copy (the scales pass); the backend frees the rest once the graph is
compiled.  The FP8 copy is then the only one, and the
store holds it for as long as the parameter lives.  A later graph that quantizes the
parameter the same way takes that copy; one that reads two stacked weights in the other
order (a SwiGLU epilogue takes gate first, whichever the graph stacked first) gets the rows
permuted, which is exact for every recipe; one that needs the parameter in any other form gets
a ``ValueError`` naming it.

A released parameter is read by nothing but FP8 copies: the model then runs only through
graphs compiled by fp8hpf.  Assigning new data (``p.data = new``) brings the parameter back;
the caches quantize it again at their next call.  The modules that own released parameters
get two hooks (:func:`hook_owners`): ``load_state_dict`` gives a released parameter its
storage back before copying into it (otherwise the copy writes through a null pointer), and
``state_dict`` refuses to return one (it would hold no data: a checkpoint saved from it
fails to load).  They and the modules above them refuse, before anything is converted, a
``model.half()``/``.to()``/``.cuda()`` that would read one (:class:`_CheckedApply`).  The
released parameters themselves refuse ``copy.deepcopy``, pickling, and the conversions
``nn.Module.to``/``half``/``cuda``/... apply to them (:class:`_Refuse`), which would read the
freed storage.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .. import numerics as nx

__all__ = [
    "check_model",
    "check_readable",
    "derive",
    "hook_owners",
    "lookup",
    "memory_parts",
    "owns_storage",
    "param_name",
    "Releaser",
    "put",
    "readable_params",
    "release",
    "reorder",
    "stacked_rows",
    "release_graph",
    "released",
    "version_key",
]

# The row orders of two stacked weights' copy: None, as stacked; 1, the second one's rows
# first (a SwiGLU epilogue reads gate's rows first, whichever member gate is).
ORDERS = (None, 1)
# (ids of the parameters, form, order) → _Entry
_ENTRIES: dict[tuple, "_Entry"] = {}
_WATCHED: set[int] = set()  # ids of parameters with a finalizer that drops their entries
# Bumped at every release: graphs that read parameters in high precision check them again.
EPOCH = [0]


class _Entry:
    __slots__ = ("key", "members", "refs", "strong")

    def __init__(self, ws: Sequence[torch.Tensor], value: tuple[torch.Tensor, ...],
                 strong: bool):
        self.key = version_key(ws)
        self.members = tuple(weakref.ref(w) for w in ws)
        self.strong = value if strong else None
        self.refs = tuple(weakref.ref(t) for t in value)

    def value(self) -> tuple[torch.Tensor, ...] | None:
        if self.strong is not None:
            return self.strong
        out = tuple(r() for r in self.refs)
        return None if any(t is None for t in out) else out


def released(t: Any) -> bool:
    """True for a tensor whose storage was released (elements, no bytes)."""
    return (isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor)
            and t.device.type != "meta" and t.numel() > 0
            and t.untyped_storage().nbytes() == 0)


def owns_storage(t: torch.Tensor) -> bool:
    """True when ``t`` is all of its storage: releasing it frees no other tensor's data."""
    return (t.storage_offset() == 0 and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def version_key(ws: Sequence[torch.Tensor]) -> tuple:
    """What identifies the parameters' values: storage address, shape, dtype, device and the
    autograd version counter of each (an optimizer step or an in-place ``copy_`` under
    ``no_grad`` bumps it; assigning ``p.data`` swaps the storage)."""
    return tuple((w.data_ptr(), tuple(w.shape), w.dtype, w.device, w._version) for w in ws)


def _watch(ws: Sequence[torch.Tensor]) -> None:
    for w in ws:
        if id(w) not in _WATCHED:
            _WATCHED.add(id(w))
            weakref.finalize(w, _forget, id(w))


def _forget(pid: int) -> None:
    _WATCHED.discard(pid)
    for k in [k for k in _ENTRIES if pid in k[0]]:
        del _ENTRIES[k]


def lookup(ws: Sequence[torch.Tensor], form: tuple, order: int | None
           ) -> tuple[torch.Tensor, ...] | None:
    """The stored copy of ``ws`` (their current versions) in ``form`` and row order."""
    entry = _ENTRIES.get((tuple(map(id, ws)), form, order))
    if entry is None or entry.key != version_key(ws):
        return None
    return entry.value()


def put(ws: Sequence[torch.Tensor], form: tuple, order: int | None,
        value: tuple[torch.Tensor, ...]) -> None:
    """Store ``value`` as the copy of ``ws``'s current versions.

    Held weakly while the parameters have their data (the graphs' caches own it).  Where one
    was released, this copy is held strongly and the same weights' copies in the other row
    orders weakly: one order always stays, from which :func:`derive` makes the others."""
    _watch(ws)
    ids = tuple(map(id, ws))
    strong = any(released(w) for w in ws)
    if strong:
        for other in ORDERS:
            entry = _ENTRIES.get((ids, form, other))
            if other != order and entry is not None and entry.strong is not None:
                entry.strong = None
    _ENTRIES[(ids, form, order)] = _Entry(ws, value, strong)


def derive(ws: Sequence[torch.Tensor], form: tuple, order: int | None
           ) -> tuple[torch.Tensor, ...] | None:
    """The copy of two stacked weights in the row order ``order`` from a stored copy in
    another order (:func:`reorder`); ``form`` is ``WeightCache.form``, ``(kind, args,
    transposed)``."""
    if len(ws) != 2:
        return None
    for other in ORDERS:
        if other == order:
            continue
        have = lookup(ws, form, other)
        if have is not None:
            return reorder(have, *stacked_rows(ws, form[2]), other, order)
    return None


def stacked_rows(ws: Sequence[torch.Tensor], transposed: Sequence[bool]) -> list[int]:
    """The rows each of ``ws`` gives their stacked copy (a transposed one, its columns)."""
    return [w.shape[-1] if t else w.shape[-2] for w, t in zip(ws, transposed)]


def reorder(value: tuple[torch.Tensor, ...], n0: int, n1: int, have: int | None,
            want: int | None) -> tuple[torch.Tensor, ...]:
    """The FP8 copy (weight, scales) of two stacked weights of ``n0`` and ``n1`` rows, in row
    order ``have``, put in row order ``want`` (:data:`ORDERS`: None, as stacked; 1, the
    second weight's rows first).

    The orders are permutations of the same rows, and quantization treats rows alike: per
    tensor, one scale over the same elements; per row, each row's own; 128x128 blocks move
    whole, ``n0`` and ``n1`` being multiples of 128 (a SwiGLU GEMM's rule).  So the result is
    what quantizing the weights in order ``want`` makes, bit for bit."""
    perm = _order(n0, n1, have).argsort()[_order(n0, n1, want)].to(value[0].device)
    wq, *scales = value
    out = [wq.index_select(0, perm)]
    for s in scales:
        if s.dim() == 0 or s.numel() == 1:
            out.append(s.clone())
        elif s.shape[0] == wq.shape[0]:  # one scale per row
            out.append(s.index_select(0, perm))
        else:  # 128x128 blocks: the halves move whole blocks
            out.append(s.index_select(0, perm[:: nx.BLOCK] // nx.BLOCK))
    return tuple(out)


def _order(n0: int, n1: int, order: int | None) -> torch.Tensor:
    """Stacked row index at each position of the row order ``order``."""
    rows = (torch.arange(n0), torch.arange(n0, n0 + n1))
    return torch.cat(rows if order is None else rows[::-1])


class _Refuse:
    """A method of a released parameter that would read its freed storage, set on the tensor
    itself, where attribute lookups (``copy``, ``pickle``, ``p.half()``) look before its
    type: ``__deepcopy__``, ``__reduce_ex__`` and the methods of :data:`_READS`.  Left alone,
    they crash the process (``copy.deepcopy``, ``model.half()``, ``p.clone()``) or write a
    checkpoint that fails to load (``torch.save(model)``).  While the storage is released the
    call raises a ``ValueError``, except a conversion that has nothing to convert
    (``model.to(its own device)``), which returns the tensor as its type's method does.  Once
    new data brought the storage back, the first call takes every such method off the tensor
    and lets the type's method run."""

    __slots__ = ("ref", "method")

    def __init__(self, p: torch.Tensor, method: str):
        self.ref, self.method = weakref.ref(p), method

    def __call__(self, *args, **kwargs):
        p = self.ref()
        if released(p):
            if self.method in _CONVERSIONS:
                # anything but a tensor back is a query (p.type()), which reads no data
                out, probe = _probe(
                    p, lambda t: getattr(torch.Tensor, self.method)(t, *args, **kwargs))
                if out is probe:
                    return p
                if not isinstance(out, torch.Tensor):
                    return getattr(torch.Tensor, self.method)(p, *args, **kwargs)
            raise ValueError(self._refusal(p))
        _allow_reads(p)
        return getattr(type(p), self.method)(p, *args, **kwargs)

    def _refusal(self, p: torch.Tensor) -> str:
        what = {"__deepcopy__": "copy.deepcopy",
                "__reduce_ex__": "pickling (torch.save of the model, copy.copy)"}.get(
                    self.method, f"Tensor.{self.method}()")
        head = (f"{what} of a parameter {tuple(p.shape)} {p.dtype} whose storage was released "
                "by a graph compiled with Fp8Config.release_weights=True: only its FP8 copy is "
                "left")
        if self.method in _COPY_METHODS:
            return (f"{head}, and the copy would hold no data. Copy or save the model before "
                    "compiling, compile with release_weights=False, or load its weights back "
                    "first (load_state_dict).")
        module = (" nn.Module.to/half/float/cuda/cpu convert each parameter this way; the "
                  "parameters converted before this one keep the conversion."
                  if self.method in _CONVERSIONS else "")
        return (f"{head}, and {what} would read the freed memory.{module} Convert or read the "
                "model before compiling, compile with release_weights=False, or load its "
                "weights back first (load_state_dict).")


def _probe(p: torch.Tensor, convert: Any) -> tuple[Any, torch.Tensor]:
    """``(convert(e), e)`` for an empty tensor ``e`` of ``p``'s dtype and device: what a
    conversion would do to ``p``, without reading it.  ``e`` itself back means there is
    nothing to convert (the conversion would return ``p``)."""
    probe = torch.empty(0, dtype=p.dtype, device=p.device)
    with torch.no_grad():
        return convert(probe), probe


_COPY_METHODS = ("__deepcopy__", "__reduce_ex__")
# Conversions nn.Module.to/half/float/double/bfloat16/cuda/cpu/type apply to each parameter:
# refused where they would make a new tensor from the data.
_CONVERSIONS = ("to", "type", "half", "float", "double", "bfloat16", "cuda", "cpu")
# Every method a released parameter refuses.  Arithmetic, torch.* functions and printing go
# through the type, and are not caught.
_READS = _COPY_METHODS + _CONVERSIONS + ("clone", "numpy", "tolist", "item")


def _refuse_reads(p: torch.Tensor) -> None:
    for method in _READS:
        if not isinstance(p.__dict__.get(method), _Refuse):
            setattr(p, method, _Refuse(p, method))


def _allow_reads(p: torch.Tensor) -> None:
    for method in _READS:
        if isinstance(p.__dict__.get(method), _Refuse):
            del p.__dict__[method]


def release(ws: Sequence[torch.Tensor]) -> int:
    """Free the storage of each of ``ws`` (each must own its storage).  The stored copies of
    their current versions are kept (weakly: the caller then stores the copy it holds with
    :func:`put`), copies of older versions dropped.  Returns the bytes freed."""
    before = {id(w): version_key([w])[0] for w in ws}
    freed = 0
    for w in ws:
        if not released(w):
            freed += w.untyped_storage().nbytes()
            w.untyped_storage().resize_(0)
        _refuse_reads(w)
    for k, entry in list(_ENTRIES.items()):
        if not before.keys() & set(k[0]):
            continue
        members = [r() for r in entry.members]
        value = entry.value()
        current = value is not None and all(m is not None for m in members) and entry.key == \
            tuple(before.get(id(m)) or version_key([m])[0] for m in members)
        if current:  # the released versions' keys: address 0
            _ENTRIES[k] = _Entry(members, value, entry.strong is not None)
        else:
            del _ENTRIES[k]
    EPOCH[0] += 1
    return freed


def _source_name(node: torch.fx.Node) -> str | None:
    """Dynamo's source of a placeholder, ``L['self']._modules['layers']...``, if it has one
    (``name`` is a method in older torch, a property in newer)."""
    name = getattr(getattr(node, "_dynamo_source", None), "name", None)
    name = name() if callable(name) else name
    return name if isinstance(name, str) else None


def param_name(node: torch.fx.Node) -> str:
    """A parameter placeholder's path in the model, ``layers.0.q_proj.weight`` (Dynamo's
    source ``L['self']._modules['layers']...``), else its name in the graph."""
    name = _source_name(node)
    if name is not None:
        parts = re.findall(r"\['([^']*)'\]", name)
        if parts and parts[0] == "self":
            parts = parts[1:]
        if parts:
            return ".".join(parts)
    return str(node.target)


def check_readable(tensors: Sequence[Any], names: Sequence[str], what: str) -> None:
    """A ``ValueError`` naming the first of ``tensors`` whose storage was released."""
    for t, name in zip(tensors, names):
        if released(t):
            raise ValueError(
                f"{what} reads parameter {name!r} {tuple(t.shape)} in high precision, but its "
                "storage was released (Fp8Config.release_weights=True): only its FP8 copy is "
                "left. Compile this graph with the same recipe as the graph that released it, "
                "compile with release_weights=False, or give the parameter new data "
                "(p.data = ...)."
            )


# Modules given the hooks of :func:`hook_owners`, weakly (a module is hooked once).
_HOOKED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
# A parameter's source in the frame Dynamo traced: L['fn']._modules['0']._parameters['weight']
_PARAM_SOURCE = re.compile(
    r"^(?P<scope>[LG])\['(?P<root>[^']+)'\](?P<path>(?:\._modules\['[^']+'\])*)"
    r"\._parameters\['(?P<name>[^']+)'\]$")


def _frame_scope() -> dict[str, dict] | None:
    """The locals and globals of the frame Dynamo is compiling (the scope its sources name
    ``L`` and ``G``); None outside a Dynamo compile, or where this torch has no such call."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return None if tx is None else {"L": tx.f_locals, "G": tx.f_globals}
    except Exception:  # noqa: BLE001 - Dynamo internals: without them nothing is hooked
        return None


def _owners(node: torch.fx.Node, param: torch.Tensor, scope: dict[str, dict]
            ) -> list[torch.nn.Module]:
    """The modules from the traced frame's root to the one whose ``_parameters`` hold
    ``param``, the placeholder ``node``'s input, found from Dynamo's source of the placeholder
    in the frame's ``scope``; empty where the source does not lead to ``param``."""
    name = _source_name(node)
    match = _PARAM_SOURCE.match(name) if name is not None else None
    if match is None:
        return []
    path = [scope[match["scope"]].get(match["root"])]
    for key in re.findall(r"\['([^']+)'\]", match["path"]):
        path.append(getattr(path[-1], "_modules", {}).get(key))
    if not all(isinstance(m, torch.nn.Module) for m in path):
        return []
    return path if path[-1]._parameters.get(match["name"]) is param else []


def _converts(fn: Any, p: torch.Tensor) -> bool:
    """Whether ``nn.Module._apply``'s ``fn`` makes a new tensor from ``p`` (reads its data),
    as it does from an empty tensor like ``p``."""
    out, probe = _probe(p, fn)
    return out is not probe


class _CheckedApply:
    """A module's ``_apply``, set on the module (where ``model.half()``, ``.to()``,
    ``.cuda()``... look before its type): a ``ValueError``, before anything is converted,
    where the conversion would read a released parameter of the module; otherwise the type's
    ``_apply``.  Without it the conversion would stop at the first released parameter, with the
    parameters before it converted (:class:`_Refuse`).  A deep copy or pickle of the module
    carries one for the copy."""

    __slots__ = ("ref",)

    def __init__(self, module: torch.nn.Module):
        self.ref = weakref.ref(module)

    def __call__(self, fn, *args, **kwargs):
        module = self.ref()
        for name, p in module.named_parameters():
            if released(p) and _converts(fn, p):
                raise ValueError(
                    f"converting the model (nn.Module.to/half/float/cuda/cpu...) would read "
                    f"parameter {name!r} {tuple(p.shape)} {p.dtype}, whose storage was released "
                    "by a graph compiled with Fp8Config.release_weights=True: only its FP8 copy "
                    "is left. Nothing was converted. Convert the model before compiling, "
                    "compile with release_weights=False, or load its weights back first "
                    "(load_state_dict).")
        return type(module)._apply(module, fn, *args, **kwargs)

    def __deepcopy__(self, memo):
        # copy.deepcopy holds the module's copy in memo before it copies the module's state
        return _CheckedApply(memo.get(id(self.ref()), self.ref()))

    def __reduce__(self):
        return _CheckedApply, (self.ref(),)


def _restore_before_load(module, state_dict, prefix, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook: a released parameter that the state dict holds a value
    of its shape for gets its storage back, which the load then fills (with ``assign=True``
    the load replaces the parameter instead).  The new data has a new address and version:
    the graphs quantize it at their next call and release it again."""
    if local_metadata.get("assign_to_params_buffers"):
        return
    for name, p in module._parameters.items():
        value = state_dict.get(prefix + name)
        if released(p) and isinstance(value, torch.Tensor) and value.shape == p.shape:
            p.untyped_storage().resize_(p.numel() * p.element_size())
            _allow_reads(p)


def _refuse_released_state(module, state_dict, prefix, local_metadata) -> None:
    """``state_dict`` post-hook: a ``ValueError`` for a released parameter, which the state
    dict would hold without data."""
    for name, p in module._parameters.items():
        if released(p) and prefix + name in state_dict:
            raise ValueError(
                f"state_dict(): parameter {prefix + name!r} {tuple(p.shape)} was released by a "
                "graph compiled with Fp8Config.release_weights=True: only its FP8 copy is "
                "left, and the state dict would hold no data for it. Save the state dict "
                "before compiling, or compile with release_weights=False; load_state_dict "
                "into the compiled model works, and brings the parameters back until the "
                "next call."
            )


def hook_owners(graph: torch.fx.Graph, indices: Sequence[int], args: Sequence[Any]) -> None:
    """Give the modules owning the parameters ``args[i]`` (``i`` in ``indices``, inputs of
    the compiled ``graph``) the ``load_state_dict`` and ``state_dict`` hooks of released
    parameters, once per module, and every module from the frame's root to them a
    :class:`_CheckedApply`.  Called while Dynamo compiles: the modules are found from the
    placeholders' sources in the traced frame (outside a Dynamo compile, none is)."""
    scope = _frame_scope()
    if scope is None:
        return
    placeholders = list(graph.find_nodes(op="placeholder"))
    for i in indices:
        path = _owners(placeholders[i], args[i], scope)
        for module in path:
            if not isinstance(module.__dict__.get("_apply"), _CheckedApply):
                module.__dict__["_apply"] = _CheckedApply(module)
        if not path or path[-1] in _HOOKED:
            continue
        path[-1].register_load_state_dict_pre_hook(_restore_before_load)
        path[-1].register_state_dict_post_hook(_refuse_released_state)
        _HOOKED.add(path[-1])


def release_graph(graph: torch.fx.Graph, caches: Sequence[Any], args: Sequence[Any],
                  stats: dict[str, Any], freezing: bool = False) -> "Releaser | None":
    """Release the parameters a compiled graph reads only through its weight ``caches``
    (``args``: the graph's real inputs); those released while it compiled are among them.
    Adds the plan's figures to ``stats`` (the weights and bytes freed, each weight kept
    with why); returns the :class:`Releaser` that releases them again after new data
    brought them back (None if none was released)."""
    placeholders = list(graph.find_nodes(op="placeholder"))
    kept: list[str] = []
    free: list[int] = []
    for i in sorted({i for c in caches for i in c.indices}):
        node, w = placeholders[i], args[i]
        why = None
        if node.users:
            why = "also read in high precision (" + ", ".join(u.name for u in node.users) + ")"
        elif not isinstance(w, torch.nn.Parameter):
            why = "not a parameter"
        elif not owns_storage(w) and not released(w):
            why = "its storage holds other tensors too"
        elif freezing:
            why = "Inductor's freezing holds the parameters as constants"
        if why is None:
            free.append(i)
        else:
            kept.append(f"{param_name(node)}: {why}")
    releaser = Releaser(free, caches) if free else None
    if releaser:
        releaser(args, stats)
        hook_owners(graph, free, args)
    stats["weights_kept"] = kept
    return releaser


class Releaser:
    """Releases a graph's parameters (``indices`` among its inputs) once its ``caches`` hold
    their FP8 copies; again whenever new data brought one back."""

    def __init__(self, indices: Sequence[int], caches: Sequence[Any]):
        self.indices = tuple(indices)
        self.caches = [c for c in caches if set(c.indices) & set(indices)]

    def __call__(self, args: Sequence[Any], stats: dict[str, Any] | None = None) -> int:
        """Release the parameters that hold data; returns the bytes freed, also added to a
        plan's ``stats`` (``released_weight_bytes``, with ``released_weights``) if given."""
        ws = [args[i] for i in self.indices]
        for cache in self.caches:  # each holds the copy of the current versions
            cache.get(args)
        newly = sum(not released(w) for w in ws)
        freed = release(ws)
        if stats is not None:
            stats["released_weights"] = stats.get("released_weights", 0) + newly
            stats["released_weight_bytes"] = stats.get("released_weight_bytes", 0) + freed
        for cache in self.caches:
            members = [args[i] for i in cache.indices]
            cache.key = version_key(members)
            put(members, cache.form, cache.order, cache.value)
        return freed


def memory_parts(graph: torch.fx.Graph, caches: Sequence[Any], args: Sequence[Any]
                 ) -> dict[str, int]:
    """Bytes of each weight a graph quantizes (``"high:<name>"``) and of each FP8 copy it
    reads (``"fp8:<names>|<form>|<order>"``), keyed so that the plans of several graphs of one
    model merge without counting a weight or a shared copy twice."""
    placeholders = list(graph.find_nodes(op="placeholder"))
    out: dict[str, int] = {}
    for cache in caches:
        names = [param_name(placeholders[i]) for i in cache.indices]
        for i, name in zip(cache.indices, names):
            out["high:" + name] = args[i].numel() * args[i].element_size()
        if cache.value is not None:
            out[f"fp8:{'+'.join(names)}|{cache.form}|{cache.order}"] = sum(
                t.untyped_storage().nbytes() for t in cache.value)
    return out


def readable_params(graph: torch.fx.Graph, args: Sequence[Any]) -> list[tuple[int, str]]:
    """``(index, name)`` of each parameter the graph reads in high precision."""
    return [(i, param_name(node)) for i, node in enumerate(graph.find_nodes(op="placeholder"))
            if node.users and i < len(args) and isinstance(args[i], torch.nn.Parameter)]


def check_model(model: Any, what: str) -> None:
    """A ``ValueError`` if ``model`` (an ``nn.Module``) has a released parameter: ``what``
    runs it eagerly, which would read freed memory."""
    if not isinstance(model, torch.nn.Module):
        return
    for name, p in model.named_parameters():
        if released(p):
            raise ValueError(
                f"{what} runs the model eagerly, but the storage of its parameter {name!r} "
                "was released by a graph compiled with Fp8Config.release_weights=True: only "
                "its FP8 copy is left. Run it on a model whose weights are loaded, before "
                "compiling with release_weights=True."
            )
