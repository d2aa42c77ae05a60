"""A/B of three small changes to the promoted Gluon GEMM, none adopted (docs/performance.md,
"Release barriers, FFMA yields and a sixth stage"):

* ``nobar``: the PTX without the warpgroup ``bar.sync`` that Gluon puts between each
  ``wgmma.wait_group`` and the thread-0 ``mbarrier.arrive`` releasing the stage.  The wait
  already covers the warpgroup's wgmma, so only one thread needs to arrive.
* ``yield``: the cubin with a yield allowed after every FFMA (the promotion's
  multiply-adds) where ptxas held the warp, so that the other math warpgroup can issue its
  wgmma sooner; the operand-reuse flags of those FFMAs are cleared with it, as a warp that
  yields loses its reuse cache.  ``yield2``: every second one of them only.
* ``stages6``: six 32 KB stages instead of five (229.7 KB of shared memory with the bf16
  output tiles, under the 227 KB limit once the reserve is 2 KB).

Each variant is this tree's ``blockwise_ws.py`` with the kernel renamed, so that a Triton
stage hook (``knobs.runtime.add_stages_inspection_hook``) can tell its compiles apart; it is
then timed by ``benchmarks/gluon_ab.py`` beside cuBLAS and the unchanged kernel, bit-equality
checked.  Needs a Hopper GPU::

    python benchmarks/variants/release_yield_ab.py --variants base,nobar,yield,yield2
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

_ARRIVE = re.compile(r"@%p\d+ mbarrier\.arrive\.shared::cta\.b64 _, \[%r\d+\];")
_WARPGROUP_SYNC = re.compile(r"bar\.sync \t\d+, 128;")


def _code_line(lines: list[str], i: int, step: int) -> tuple[int, str]:
    """The next line from ``i`` in direction ``step`` that is an instruction."""
    while 0 <= i < len(lines):
        s = lines[i].strip()
        if s and not s.startswith(("//", ".loc")):
            return i, s
        i += step
    return i, ""


def strip_release_syncs(ptx: str) -> tuple[str, int]:
    """``ptx`` without each warpgroup barrier that stands between a wgmma wait and the
    stage's release (with only address arithmetic between them), and how many."""
    lines = ptx.split("\n")
    drop = set()
    for i, line in enumerate(lines):
        if not _WARPGROUP_SYNC.fullmatch(line.strip()):
            continue
        if not _ARRIVE.match(_code_line(lines, i + 1, 1)[1]):
            continue
        j, prev = _code_line(lines, i - 1, -1)
        while prev.startswith(("add.s32", "mov.b32", "mov.u32")):
            j, prev = _code_line(lines, j - 1, -1)
        if prev.startswith("wgmma.wait_group.sync.aligned"):
            drop.add(i)
    return "\n".join(x for i, x in enumerate(lines) if i not in drop), len(drop)


def _text_section(cubin: bytes, kernel: str) -> int:
    """File offset of ``kernel``'s code in the ELF ``cubin``."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names_at = struct.unpack_from("<HHH", cubin, 0x3A)

    def header(i):  # name, type, flags, addr, offset, size, ...
        return struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize)
    names = header(names_at)
    table = cubin[names[4]:names[4] + names[5]]
    for i in range(count):
        h = header(i)
        if table[h[0]:table.index(b"\0", h[0])] == f".text.{kernel}".encode():
            return h[4]
    raise KeyError(f"no .text.{kernel} section")


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*/\* (0x[0-9a-f]{16}) \*/\s*\n"
                          r"\s*/\* (0x[0-9a-f]{16}) \*/")
HOLD = 1 << 45  # control bits of sm_90 SASS: set, the warp does not yield after it
REUSE = 0xF << 58  # the operand reuse-cache flags


def yield_ffma(cubin: bytes, kernel: str, every: int = 1) -> tuple[bytes, int]:
    """``cubin`` with a yield allowed after every ``every``-th FFMA that holds the warp,
    its reuse flags cleared; and how many were changed."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-hex", "-c", f.name], capture_output=True,
                              text=True, check=True).stdout
    base = _text_section(cubin, kernel)
    out = bytearray(cubin)
    held = changed = 0
    for m in _INSTRUCTION.finditer(sass):
        pc, text, lo, hi = int(m[1], 16), m[2], int(m[3], 16), int(m[4], 16)
        if not text.startswith("FFMA") or not hi & HOLD:
            continue
        held += 1
        if (held - 1) % every:
            continue
        if struct.unpack_from("<QQ", out, base + pc) != (lo, hi):
            raise RuntimeError(f"disassembly and cubin disagree at {pc:#x}")
        struct.pack_into("<Q", out, base + pc + 8, hi & ~(HOLD | REUSE))
        changed += 1
    return bytes(out), changed


def _hook(*args):
    """Triton's stage hook: the PTX and cubin of the renamed kernels, patched by name."""
    if not args:  # Triton >= 3.7 asks for a cache key first
        return "release-yield-ab", "release-yield-ab"
    _backend, stages, _options, _language, _capability = args
    make_ptx, make_cubin = stages["ptx"], stages["cubin"]

    def ptx(src, metadata):
        out = make_ptx(src, metadata)
        if "_nobar" in metadata["name"]:
            out, n = strip_release_syncs(out)
            print(f"{metadata['name']}: {n} release barriers dropped", flush=True)
        return out

    def cubin(src, metadata):
        out = make_cubin(src, metadata)
        name = metadata["name"]
        if "_yield" in name:
            out, n = yield_ffma(out, name, 2 if name.endswith("yield2") else 1)
            print(f"{name}: {n} FFMAs yield", flush=True)
        return out
    stages["ptx"], stages["cubin"] = ptx, cubin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="base,nobar,yield,yield2,nobar_yield,stages6")
    ap.add_argument("--shapes", default="4096,4096,4096;4096,14336,4096;4096,4096,14336;"
                                        "8192,4096,4096")
    ap.add_argument("--repeat", default="3")
    args = ap.parse_args()
    from triton import knobs

    knobs.runtime.add_stages_inspection_hook = _hook
    src = open(os.path.join(ROOT, "fp8compile", "kernels", "blockwise_ws.py")).read()
    tmp = tempfile.mkdtemp()
    files = []
    for v in args.variants.split(","):
        text = re.sub(r"\b_blockwise_ws_kernel\b", f"_blockwise_ws_kernel_{v}", src)
        if v == "stages6":
            text, a = re.subn(r"^PROMOTED_STAGES = \(5, 4\)", "PROMOTED_STAGES = (6, 5, 4)",
                              text, flags=re.M)
            text, b = re.subn(r"^SHARED_MEMORY = 232448 - 4096",
                              "SHARED_MEMORY = 232448 - 2048", text, flags=re.M)
            if a != 1 or b != 1:
                raise SystemExit("blockwise_ws.py's stage lines changed: update this script")
        files.append(os.path.join(tmp, f"{v}.py"))
        with open(files[-1], "w") as f:
            f.write(text)
    import gluon_ab

    sys.argv = ["gluon_ab.py", "--baseline", *files, "--runs", "--shapes", args.shapes,
                "--repeat", args.repeat]
    gluon_ab.main()


if __name__ == "__main__":
    main()
