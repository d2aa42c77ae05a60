import pytest
import torch

from fp8compile import Fp8Config
from fp8compile.passes import (
    CompileContext,
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


def _ctx():
    return CompileContext(Fp8Config(), [], True)


def test_order_follows_constraints_not_list_order():
    ctx = _ctx()
    pm = PassManager([ScalesPass(ctx), RewritePass(ctx), PrecisionPass(ctx), SensitivityPass(ctx)])
    assert [p.name for p in pm.passes] == [
        "SensitivityPass", "PrecisionPass", "RewritePass", "ScalesPass"
    ]
    assert [type(p) for p in PassManager(default_passes(ctx)).passes] == [
        SensitivityPass, PrecisionPass, RewritePass, ScalesPass, FusePass
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
