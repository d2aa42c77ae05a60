"""Keys Inductor's on-disk caches on fp8compile's own code.

AOTAutograd's cache is keyed on the graph Dynamo hands over, in which an FP8 linear is one
``fp8compile::linear`` node.  Its backward formula is Python that AOTAutograd traces *into*
the cached backward graph, and that formula is not part of the key: after fp8compile changes
(an upgrade, a local edit), a process could load a backward graph traced from the old code.
Inductor's documented hook for code it cannot see is a custom pass with a ``uuid()``; the pass
installed here changes nothing in the graph and contributes a hash of the package's source,
and the environment switches that change what the ops trace into (:data:`TRACE_SWITCHES`).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

_PACKAGE = Path(__file__).resolve().parent

TRACE_SWITCHES = ("FP8COMPILE_INLINE_KERNELS", "FP8COMPILE_DISABLE_TRITON",
                  "FP8COMPILE_GEMM_BACKEND", "FP8COMPILE_GLUON", "FP8COMPILE_GEMV",
                  "FP8COMPILE_DECODE_GLUON")
"""Environment variables read while a graph is traced: inlined kernels or opaque ops, Triton
or the reference, the GEMM backend baked into an inlined GEMM, whether a GEMM may stay an
opaque call of a Gluon kernel (the decode one among them), and whether a one-row GEMM traces
the CUDA-core kernel."""


@functools.cache
def source_hash() -> str:
    """SHA-256 over every ``.py`` file of the package (path and contents), computed once."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(_PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class SourceKeyPass(CustomGraphPass):
    """A joint-graph pass that only contributes to the cache key, then runs ``inner`` (a pass
    the user had configured) unchanged."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self) -> Any:
        inner = self.inner
        inner_id = inner.uuid() if isinstance(inner, CustomGraphPass) else None
        if inner is not None and inner_id is None:
            # The user's own pass has no identity: Inductor bypasses the cache for it, and so
            # do we (returning None keeps that behaviour).
            return None
        from .ops._inline import inline_enabled

        switches = tuple(os.environ.get(name) for name in TRACE_SWITCHES)
        return ("fp8compile", source_hash(), switches, inline_enabled(), inner_id)


def keyed_patches(patches: dict[str, Any]) -> dict[str, Any]:
    """``patches`` plus the source-keyed joint pass (wrapping whatever pass was configured)."""
    name = "joint_custom_pre_pass"
    inner = patches.get(name, getattr(torch._inductor.config, name))
    if isinstance(inner, SourceKeyPass):
        return patches
    return {**patches, name: SourceKeyPass(inner)}
