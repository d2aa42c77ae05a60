import json

import pytest
import torch

import fp8compile
from fp8compile import Plan, Precision
from tests.models import LlamaBlock


def test_plan_is_an_iterable_of_entries_with_the_promised_fields():
    plan = fp8compile.plan(LlamaBlock(), torch.randn(2, 8, 256))
    assert isinstance(plan, Plan) and len(plan) == len(list(plan))
    e = plan[0]
    for field in ("name", "op", "module", "precision", "recipe", "reason", "rule"):
        assert hasattr(e, field), field
    up = [x for x in plan if x.module == "up_proj"][0]
    assert plan[up.name] is up and up.precision == Precision.FP8 == "fp8"
    assert up.in_shapes == [(2, 8, 256), (512, 256)] and up.out_shape == (2, 8, 512)
    assert up.weight_numel == 512 * 256 and up.granularity == "act group, weight block"
    with pytest.raises(KeyError, match="nope"):
        plan["nope"]


def test_plan_kwargs_and_json():
    class KW(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(256, 256)
            self.b = torch.nn.Linear(256, 256)

        def forward(self, x, *, scale=1.0):
            return self.b(self.a(x)) * scale

    plan = fp8compile.plan(KW(), torch.randn(3, 256), scale=2.0)
    data = json.loads(plan.to_json())
    assert data["config"]["recipe"] == "blockwise"
    assert [e["precision"] for e in data["entries"] if e["gemm"]] == ["fp8", "fp32"]


def test_plan_matches_what_the_backend_compiles():
    model, x = LlamaBlock(), torch.randn(2, 8, 256)
    cfg = {"overrides": {"up_proj": "bf16"}}
    planned = [(e.module, e.precision, e.reason) for e in fp8compile.plan(model, x, config=cfg)]
    torch._dynamo.reset()
    be = fp8compile.backend(cfg)
    with torch.no_grad():
        torch.compile(model, backend=be)(x)
    assert planned == [(e.module, e.precision, e.reason) for e in be.plan]


def test_plan_merges_graphs_across_a_graph_break():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(256, 256)
            self.b = torch.nn.Linear(256, 256)

        def forward(self, x):
            h = self.a(x)
            torch._dynamo.graph_break()
            return self.b(h) + h

    plan = fp8compile.plan(Broken(), torch.randn(2, 256))
    assert {e.graph for e in plan} == {0, 1}
    assert {e.module for e in plan.gemms} == {"a", "b"}
