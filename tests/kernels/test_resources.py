"""The quantization kernels, the FP8 transpose and the few-row GEMM stay spill-free on sm_90 at
their launch settings (a spill in a memory-bound kernel costs bandwidth; codegen is sensitive to
small source changes: reordering two statements of the group path once cost it 216 bytes).

The one exception is ``quantize_dual``'s first launch: a whole 128x128 tile per 4-warp
program spills a few dozen bytes a thread, and still ran 1.4x faster on an H200 than 8 warps
without a spill (``quant._TILE_WARPS``; its fix-up launch keeps 8 warps and no spill).  Its
allowance is a bound, so a change that spills more fails.

Compiled offline with Triton's bundled ptxas, so this runs without a GPU.  It runs in a
subprocess because this test folder decorates the kernels for Triton's interpreter.
"""

import json
import os
import subprocess
import sys

import pytest

from fp8compile.kernels.resources import tools_available

pytestmark = pytest.mark.skipif(not tools_available(),
                                reason="Triton's NVIDIA tools (ptxas, cuobjdump) not installed")

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
NAMES = ["quantize_groups", "quantize_rows", "rmsnorm_groups", "silu_mul_rows",
         "quantize_blocks", "quantize_blocks_transposed",
         "quantize_dual", "quantize_dual_fixup", "requantize_t", "transpose_copy",
         "delayed_rmsnorm_cast", "delayed_silu_mul_cast", "delayed_cast", "delayed_cast_t",
         "dynamic_cast_t", "gemv", "gemv_short_steps"]
# Bytes of stack a kernel may use (see the module docstring); 0 for every other kernel.
ALLOWED_STACK = {"quantize_dual": 64}
SNIPPET = f"""
import json, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, "benchmarks")
import kernel_resources as kr
print(json.dumps({{n: vars(getattr(kr, n)()) for n in {NAMES!r}}}))
"""


@pytest.fixture(scope="module")
def usage():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SNIPPET], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", NAMES)
def test_no_spills(usage, name):
    res = usage[name]
    assert res["stack"] <= ALLOWED_STACK.get(name, 0), f"{name} spills: {res}"
    assert 0 < res["registers"] <= 255
