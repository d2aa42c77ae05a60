"""Kernel tests run compiled on a CUDA machine and under Triton's interpreter elsewhere.

TRITON_INTERPRET is set by tests/conftest.py, before any test module imports the kernels.
"""

import pytest
import torch

ON_GPU = torch.cuda.is_available()

pytest.importorskip("triton")


@pytest.fixture
def device() -> str:
    """Where the launchers run: "cuda" when a GPU is present, else CPU tensors interpreted."""
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
