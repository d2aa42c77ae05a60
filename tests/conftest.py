import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with fresh Dynamo caches and a fixed seed.

    Dynamo keeps compiled code per code object; tests that compile many models of one class
    would otherwise hit its recompile limit and silently fall back to eager.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
