"""Registers and spills of a Triton kernel for Hopper, compiled offline (no GPU needed).

Triton compiles for ``sm_90`` with its bundled ``ptxas`` on any machine, and ``cuobjdump``
reports the registers per thread and the stack (spill) bytes of the result.  A spill in a
memory-bound kernel costs bandwidth, so the launch settings of the quantization kernels are
checked this way (``benchmarks/kernel_resources.py``, ``tests/kernels/test_resources.py``).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass

import triton

__all__ = ["Resources", "sm90_resources", "tools_available"]


@dataclass(frozen=True)
class Resources:
    registers: int
    stack: int  # bytes per thread; > 0 means spills
    shared: int

    def __str__(self) -> str:
        return f"{self.registers} registers, {self.stack} B stack, {self.shared} B shared"


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def ptxas_sm90() -> str:
    """The ptxas Triton itself runs for sm_90: from Triton 3.7 on the newer bundled one
    (``ptxas-blackwell``), whose PTX version the older ``ptxas`` does not read."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:  # Triton <= 3.6: one bundled ptxas
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "ptxas")
    return get_ptxas(90).path


def tools_available() -> bool:
    """True when Triton's NVIDIA backend tools (ptxas, cuobjdump) are installed."""
    return os.access(_cuobjdump(), os.X_OK)


def sm90_resources(fn, signature: dict, constexprs: dict, num_warps: int,
                   divisible: bool = True) -> Resources:
    """Compile ``fn`` (a ``triton.jit`` function) for sm_90 and read its resource usage.

    ``signature`` maps runtime arguments to Triton types (``"*bf16"``, ``"i32"``...);
    ``constexprs`` gives the compile-time values, unit strides included (Triton specialises
    a stride of 1 at run time, which changes the memory layouts it picks).  ``divisible``:
    every pointer and integer argument is marked divisible by 16, as Triton specialises them
    at run time for aligned tensors and sizes such as 4096; without it the loads cannot be
    vectorised and the register counts are those of a misaligned launch (2-3x higher).
    """
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    attrs = {}
    if divisible:
        names = list(inspect.signature(fn.fn).parameters)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
                 if t.startswith("*") or t.startswith("i")}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    fields = dict(tok.split(":", 1) for tok in next(x for x in out.splitlines() if "REG:" in x)
                  .split() if ":" in tok)
    return Resources(int(fields["REG"]), int(fields["STACK"]), int(fields["SHARED"]))
