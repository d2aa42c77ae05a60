import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp8compile import Fp8Config
from fp8compile.passes import (
    CompileContext,
    DecomposePass,
    EpiloguePass,
    Fp8Pass,
    FusePass,
    PassManager,
    PassResult,
    PrecisionPass,
    RewritePass,
    ScalesPass,
    SensitivityPass,
    default_passes,
)
from fp8compile.passes.manager import module_of
from tests.passes.conftest import capture


def _ctx():
    return CompileContext(Fp8Config(), [], True)


def test_order_follows_constraints_not_list_order():
    ctx = _ctx()
    pm = PassManager([ScalesPass(ctx), RewritePass(ctx), PrecisionPass(ctx), SensitivityPass(ctx)])
    assert [p.name for p in pm.passes] == [
        "SensitivityPass", "PrecisionPass", "RewritePass", "ScalesPass"
    ]
    assert [type(p) for p in PassManager(default_passes(ctx)).passes] == [
        DecomposePass, SensitivityPass, PrecisionPass, RewritePass, ScalesPass, FusePass,
        EpiloguePass
    ]


def test_missing_prerequisite_and_cycles_are_errors():
    ctx = _ctx()
    with pytest.raises(ValueError, match="PrecisionPass must run after"):
        PassManager([PrecisionPass(ctx)])

    class A(Fp8Pass):
        def call(self, gm):
            return PassResult(gm, False)

    class B(A):
        after = (A,)

    A.after = (B,)
    try:
        with pytest.raises(ValueError, match="cycle"):
            PassManager([A(ctx), B(ctx)])
    finally:
        A.after = ()


def test_failure_names_the_pass_and_keeps_its_type():
    ctx = _ctx()

    class Boom(Fp8Pass):
        after = (SensitivityPass,)

        def call(self, gm):
            raise ValueError("bad node")

    gm = torch.fx.symbolic_trace(torch.nn.Identity())
    with pytest.raises(ValueError, match="bad node") as info:
        PassManager([SensitivityPass(ctx), Boom(ctx)])(gm)
    assert "pass Boom failed after ['SensitivityPass']" in "\n".join(info.value.__notes__)


def _passes_args_on(forward):
    """Hands ``self`` on inside ``*args``, as transformers 5's ``forward`` decorators do."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class _DecoratedModel(_Model):
    forward = _passes_args_on(_Model.forward)


@pytest.mark.parametrize("model", [_Model, _DecoratedModel], ids=["plain", "decorated"])
def test_module_paths_are_relative_to_the_compiled_model(model):
    gm, _ = capture(model(), torch.randn(2, 16))
    linears = [n for n in gm.graph.nodes if n.target is F.linear]
    assert [module_of(n) for n in linears] == [
        ("layers.0.proj", nn.Linear), ("layers.1.proj", nn.Linear), ("head", nn.Linear)
    ]


def test_dead_code_elimination_keeps_in_place_calls():
    import operator

    from fp8compile.passes.manager import eliminate_dead_code

    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.neg, (x,))
    g.call_method("mul_", (y, 2))  # result unused, y changed
    g.call_function(operator.setitem, (y, 0, 1.0))
    g.call_method("add", (y, 1))  # unused and pure: goes
    g.output(y)
    eliminate_dead_code(g)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    assert [n.target for n in g.nodes if n.op == "call_method"] == ["mul_"]
    assert torch.equal(gm(torch.ones(3)), torch.tensor([1.0, -2.0, -2.0]))
