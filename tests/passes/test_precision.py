import pytest
import torch
from torch import nn

import fp8compile
from fp8compile import Precision, Rule
from tests.models import LlamaBlock, TinyLM


def _by_module(plan):
    return {e.module: e for e in plan.gemms}


def test_every_node_gets_a_precision_and_a_reason():
    plan = fp8compile.plan(TinyLM(), torch.randint(0, 512, (2, 8)))
    assert len(plan) > 30
    for e in plan:
        assert e.precision in set(Precision) - {Precision.AUTO}
        assert e.reason and e.rule
    g = _by_module(plan)
    assert g["lm_head"].precision == "fp32" and g["lm_head"].rule == "rule:output_head"
    fp8 = {m for m, e in g.items() if e.is_fp8}
    assert fp8 == {f"layers.{i}.{p}" for i in range(2) for p in (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert all(e.recipe == "blockwise" and "128x128" in e.reason for e in plan.fp8)
    norms = [e for e in plan if e.rule == "rule:norm"]
    assert norms and all(e.precision == "fp32" for e in norms)


def test_reason_names_each_accumulation(passes):
    """Training plans say which accumulation the forward and the backward GEMMs use."""
    cfg = {"accumulation": "fast"}
    for inference, want in ((True, "fp32 accumulation (fast)"),
                            (False, "fp32 accumulation (fast forward, precise backward)")):
        _, _, ctx = passes(LlamaBlock(), torch.randn(2, 8, 256), config=cfg,
                           inference=inference)
        fp8 = [e for e in ctx.plan_entries if e.is_fp8]
        assert len(fp8) == 7 and all(want in e.reason for e in fp8), fp8[0].reason


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Linear(64, 64)
        self.k100 = nn.Linear(100, 256)
        self.k208 = nn.Linear(208, 256)
        self.n130 = nn.Linear(256, 130)

    def forward(self, x, y, z):
        return self.small(x), self.k100(y), self.k208(z) + 1, self.n130(self.k208(z)) * 2


# Every linear of Odd feeds an output directly, so the output-head rule is off here.
NO_HEAD = [r.value for r in Rule if r is not Rule.OUTPUT_HEAD]


def test_shape_and_size_rules_say_why():
    args = (torch.randn(3, 64), torch.randn(3, 100), torch.randn(3, 208))
    g = _by_module(fp8compile.plan(Odd(), *args, config={"rules": NO_HEAD}))
    assert g["small"].rule == "small" and "min_weight_numel=16384" in g["small"].reason
    assert g["k100"].rule == "shape" and "K=100" in g["k100"].reason
    assert g["n130"].rule == "shape" and "N=130" in g["n130"].reason
    assert g["k208"].is_fp8 and "partial" in g["k208"].reason
    g = _by_module(fp8compile.plan(Odd(), *args, config={"min_weight_numel": 0,
                                                          "rules": NO_HEAD}))
    assert g["small"].is_fp8


def test_overrides_change_the_plan():
    ids = torch.randint(0, 512, (2, 8))
    cfg = {"overrides": {"lm_head": "fp8", "layers.0.*": "bf16"}}
    g = _by_module(fp8compile.plan(TinyLM(), ids, config=cfg))
    assert g["lm_head"].is_fp8 and g["lm_head"].rule == "override:lm_head"
    for m, e in g.items():
        if m.startswith("layers.0."):
            assert e.precision == "bf16" and e.rule == "override:layers.0.*", m
        elif m.startswith("layers.1."):
            assert e.is_fp8, m


def test_fp8_override_cannot_force_an_impossible_shape():
    g = _by_module(fp8compile.plan(Odd(), torch.randn(3, 64), torch.randn(3, 100),
                                   torch.randn(3, 208), config={"overrides": {"k100": "fp8"}}))
    assert not g["k100"].is_fp8 and "refused" in g["k100"].reason and "K=100" in g["k100"].reason


def test_calibration_figures_demote_and_show():
    cfg = {"min_sqnr_db": 20.0, "calibration": {"up_proj": {"sqnr_db": 12.5, "amax": 30.0},
                                                "down_proj": {"sqnr_db": 29.0, "amax": 4.0}}}
    g = _by_module(fp8compile.plan(LlamaBlock(), torch.randn(1, 4, 256), config=cfg))
    assert g["up_proj"].rule == "calibration" and "12.5 dB" in g["up_proj"].reason
    assert not g["up_proj"].is_fp8 and g["up_proj"].sqnr_db == 12.5
    assert g["down_proj"].is_fp8 and g["down_proj"].amax == 4.0


def test_static_scaling_without_calibration_keeps_high_precision():
    cfg = {"recipe": "tensorwise", "scaling": "static", "static_scales": {"q_proj": 5.0}}
    g = _by_module(fp8compile.plan(LlamaBlock(), torch.randn(1, 4, 256), config=cfg))
    assert g["q_proj"].is_fp8 and "static" in g["q_proj"].reason
    assert g["k_proj"].rule == "calibration" and "fp8compile.calibrate" in g["k_proj"].reason


def test_flops_and_summary():
    plan = fp8compile.plan(LlamaBlock(), torch.randn(2, 8, 256))
    g = _by_module(plan)
    assert g["gate_proj"].flops == 2 * 16 * 512 * 256
    assert plan.fp8_flop_share() == 1.0
    text = plan.summary()
    assert "gate_proj" in text and "7 GEMMs: 7 fp8" in text


class Experts(nn.Module):
    """A linear, then a mixture of experts' expert projection: rows grouped by ``offs``, each
    group times its own weight (``F.grouped_mm``)."""

    def __init__(self, experts=3, k=128, n=256):
        super().__init__()
        self.proj = nn.Linear(k, k, bias=False)
        self.w = nn.Parameter(torch.randn(experts, n, k) * 0.05)

    def forward(self, x, offs):
        return torch.nn.functional.grouped_mm(self.proj(x), self.w.transpose(-2, -1), offs=offs)


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"),
                    reason="this torch has no torch.nn.functional.grouped_mm")
def test_grouped_gemm_is_fp8_in_inference_with_its_flops():
    model = Experts().to(torch.bfloat16)
    x = torch.randn(48, 128, dtype=torch.bfloat16)
    offs = torch.tensor([16, 40, 48], dtype=torch.int32)
    plan = fp8compile.plan(model, x, offs)  # inference: plan() runs under no_grad
    (grouped,) = [e for e in plan.gemms if e.gemm == "grouped_mm"]
    assert grouped.is_fp8 and grouped.recipe == "blockwise"
    assert "grouped: 3 groups of rows, each with its own weight" in grouped.reason
    assert grouped.flops == 2 * 48 * 256 * 128  # every row meets one group's weight
    assert grouped.weight.endswith("w_")  # the parameter behind the transposed view
    assert grouped.weight_numel == 3 * 256 * 128
    assert plan.fp8_flop_share() == 1.0
    # training: the grouped GEMM keeps its dtype and says why
    plan = fp8compile.plan(model, x, offs, config={"inference": False})
    (grouped,) = [e for e in plan.gemms if e.gemm == "grouped_mm"]
    assert grouped.precision == "bf16" and "inference only" in grouped.reason
    assert grouped.flops == 2 * 48 * 256 * 128
    assert "2 GEMMs: 1 fp8, 1 high precision" in plan.summary()


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"),
                    reason="this torch has no torch.nn.functional.grouped_mm")
@pytest.mark.parametrize("config, why", [
    ({"recipe": "tensorwise", "scaling": "delayed"}, "dynamic activation scales only"),
    ({"overrides": {"*": "bf16"}}, "override"),
])
def test_grouped_gemm_reasons_for_high_precision(config, why):
    model = Experts().to(torch.bfloat16)
    x = torch.randn(48, 128, dtype=torch.bfloat16)
    plan = fp8compile.plan(model, x, torch.tensor([16, 40, 48], dtype=torch.int32),
                           config=config)
    (grouped,) = [e for e in plan.gemms if e.gemm == "grouped_mm"]
    assert not grouped.is_fp8 and why in grouped.reason


def test_library_grouped_gemm_of_transformers_experts():
    """transformers' MoE experts call its own grouped GEMM op where torch's does not serve
    (here: fp32 on the CPU); both expert projections become FP8 grouped GEMMs."""
    transformers = pytest.importorskip("transformers")
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                        num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg).eval()  # registers transformers' grouped GEMM op
    if not hasattr(torch.ops.transformers, "grouped_mm_fallback"):
        pytest.skip(f"transformers {transformers.__version__} has no grouped experts")
    plan = fp8compile.plan(model, torch.randint(0, 512, (2, 16)))
    grouped = [e for e in plan.gemms if e.gemm == "grouped_mm"]
    assert len(grouped) == 2 and all(e.module.endswith("mlp.experts") for e in grouped)
    assert all(e.is_fp8 and "grouped: 4 groups" in e.reason for e in grouped)
    # 32 tokens x 2 experts each: 64 rows through gate/up (256 -> 1024) and down (512 -> 256)
    assert sorted(e.flops for e in grouped) == [2 * 64 * 256 * 512, 2 * 64 * 1024 * 256]


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"),
                    reason="this torch has no torch.nn.functional.grouped_mm")
@pytest.mark.parametrize("rows, config, fp8", [
    (768, {}, False),                                  # 256 rows per group, blockwise
    (765, {}, True),                                   # 255 rows per group
    (768, {"recipe": "rowwise", "accumulation": "fast"}, True),
    (768, {"recipe": "rowwise"}, False),               # precise: promoted too
    (768, {"overrides": {"*": "fp8"}}, True),          # forced
    (768, {"rules": ["norm"]}, True),                  # the rule switched off
])
def test_tall_promoted_groups_stay_in_high_precision(rows, config, fp8):
    model = Experts().to(torch.bfloat16)
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    offs = torch.tensor([rows // 3, 2 * rows // 3, rows], dtype=torch.int32)
    plan = fp8compile.plan(model, x, offs, config=config)
    (grouped,) = [e for e in plan.gemms if e.gemm == "grouped_mm"]
    assert grouped.is_fp8 == fp8, grouped.reason
    if not fp8:
        assert grouped.rule == "grouped_size" and "rows per group on average" in grouped.reason
        assert "recipe='rowwise' with fast accumulation" in grouped.reason
