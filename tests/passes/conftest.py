import pytest
import torch

from fp8compile import Fp8Config
from fp8compile.passes import CompileContext, PassManager, analysis_passes, default_passes


def capture(model, *args):
    """The (graph module, example inputs) Dynamo hands a backend for ``model(*args)``."""
    got = []

    def grab(gm, example_inputs):
        got.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=grab, dynamic=False)(*args)
    assert len(got) == 1, "expected one graph"
    return got[0]


def run_passes(model, *args, config=None, inference=True, rewrite=True):
    gm, inputs = capture(model, *args)
    ctx = CompileContext(Fp8Config.from_dict(config or {}), inputs, inference)
    passes = default_passes(ctx) if rewrite else analysis_passes(ctx)
    PassManager(passes)(gm)
    return gm, inputs, ctx


@pytest.fixture
def passes():
    return run_passes
