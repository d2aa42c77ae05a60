"""Kernel tests run compiled on a CUDA machine and under Triton's interpreter elsewhere.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels (at import of
``fp8compile.kernels.quant`` / ``gemm``), so it is set here, at collection time.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")


@pytest.fixture
def device() -> str:
    """Where the launchers run: "cuda" when a GPU is present, else CPU tensors interpreted."""
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
