import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter.  TRITON_INTERPRET must be set
# before ``triton.jit`` decorates them (at the first import of fp8compile.kernels), and any
# test module may import them first, so it is set here rather than in tests/kernels.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_report_header(config):
    """Say so at the top of the run when the package's ``fp8hpf`` backend is not registered
    (a checkout on the path but not installed): every ``backend="fp8hpf"`` test then fails
    with Dynamo's "Invalid backend"."""
    from importlib.metadata import entry_points

    if not any(e.name == "fp8hpf" for e in entry_points(group="torch_dynamo_backends")):
        return ("fp8compile is not installed, so torch.compile(backend='fp8hpf') is unknown "
                "and the tests that use it fail: pip install -e '.[test]'")
    return None


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


@pytest.fixture
def quantize_rows_seen(monkeypatch) -> list[int]:
    """The row count of each ``numerics.quantize`` call while the test runs (the calls
    still go through): how a caller sliced its input."""
    from fp8compile import numerics as nx

    seen, real = [], nx.quantize

    def spy(x, *args, **kwargs):
        seen.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(nx, "quantize", spy)
    return seen
