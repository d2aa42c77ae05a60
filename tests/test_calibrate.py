"""Calibration: per-layer FP8 error on sample batches, and the plan it steers; JSON policy."""

import math

import pytest
import torch

import fp8compile
from fp8compile import Fp8Config, Precision
from fp8compile.calibration import Calibration
from tests.models import LlamaBlock, tiny_hf_llama


def _outlier_block() -> LlamaBlock:
    """up_proj with 4 input columns ×1e5 (and those channels ÷1e5 in mlp_norm, so the layer
    computes the same function): one tensorwise weight scale then sends the other weights to
    FP8 subnormals or zero."""
    m = LlamaBlock()
    with torch.no_grad():
        m.up_proj.weight[:, :4] *= 1e5
        m.mlp_norm.weight[:4] /= 1e5
    return m


@pytest.fixture
def batches():
    return [(torch.randn(2, 16, 256),) for _ in range(3)]


def test_calibrate_measures_every_fp8_linear(batches, capsys):
    cal = fp8compile.calibrate(LlamaBlock(), batches, progress=True)
    assert isinstance(cal, Calibration) and cal.batches == 3
    assert sorted(cal.layers) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    for name, s in cal.layers.items():
        assert s.sqnr_db >= 25.0, f"{name}: {s.sqnr_db=}"
        assert s.amax > 0 and 0 <= s.saturation < 0.05 and 0 <= s.underflow_rate < 0.01
        assert s.calls == 3  # dynamic 1x128 scales put each group amax at ±448: ~1/128
    assert "q_proj" in cal.table() and cal.stats["layers"] == 7
    assert "calibrate" in capsys.readouterr().err  # progress bar or counter on stderr


def test_calibrate_accepts_bare_tensors_and_rejects_empty():
    cal = fp8compile.calibrate(LlamaBlock(), [torch.randn(2, 8, 256)], progress=False)
    assert cal.batches == 1
    with pytest.raises(ValueError, match="empty"):
        fp8compile.calibrate(LlamaBlock(), [], progress=False)


def test_outlier_layer_is_demoted_with_its_sqnr(batches):
    torch.manual_seed(0)
    model = _outlier_block()
    cal = fp8compile.calibrate(
        model, batches, {"recipe": "tensorwise"}, min_sqnr_db=20, progress=False
    )
    low = cal.layers["up_proj"].sqnr_db
    assert low < 20 and cal.failing == ["up_proj"], cal.table()
    assert cal.layers["up_proj"].weight_underflow > 0.1 > cal.layers["gate_proj"].weight_underflow
    assert all(s.sqnr_db >= 25 for m, s in cal.layers.items() if m != "up_proj"), cal.table()
    cfg = cal.config
    assert cfg.min_sqnr_db == 20 and cfg.measured("up_proj")[0] == pytest.approx(low)

    torch._dynamo.reset()
    plan = fp8compile.plan(model, batches[0][0], config=cfg)
    by_module = {e.module: e for e in plan.gemms}
    up = by_module["up_proj"]
    assert up.precision is not Precision.FP8 and up.rule == "calibration"
    assert f"{low:.1f} dB" in up.reason and up.sqnr_db == pytest.approx(low)
    assert all(e.is_fp8 for m, e in by_module.items() if m != "up_proj")


def test_calibrate_tiny_hf_llama():
    model = tiny_hf_llama()
    ids = [(torch.randint(0, 512, (2, 16)),) for _ in range(2)]
    cal = fp8compile.calibrate(model, ids, {"min_weight_numel": 0}, progress=False)
    assert len(cal.layers) == 14  # 7 linears x 2 layers; lm_head is the output head
    assert all(math.isfinite(s.sqnr_db) and s.sqnr_db > 20 for s in cal.layers.values())


def test_json_policy_round_trips_and_steers_the_plan(tmp_path):
    policy = Fp8Config(
        recipe="rowwise",
        overrides={"down_proj": "bf16", "q_proj": "fp32"},
        min_weight_numel=0,
        min_sqnr_db=18.5,
        calibration=(("k_proj", 30.0, 4.0),),
    )
    path = tmp_path / "policy.json"
    policy.to_json(path)
    back = Fp8Config.from_json(path)
    assert back == policy and back.to_json() == policy.to_json()

    plan = fp8compile.plan(LlamaBlock(), torch.randn(2, 16, 256), config=back)
    by_module = {e.module: e for e in plan.gemms}
    assert by_module["down_proj"].precision is Precision.BF16
    assert by_module["down_proj"].rule.startswith("override")
    assert by_module["q_proj"].precision is Precision.FP32
    assert by_module["up_proj"].is_fp8 and by_module["up_proj"].recipe == "rowwise"
    assert by_module["k_proj"].sqnr_db == 30.0 and by_module["k_proj"].is_fp8


def test_calibrate_stays_callable_after_the_module_is_imported():
    import fp8compile.calibration  # noqa: F401

    assert callable(fp8compile.calibrate)
    cal = fp8compile.calibrate(LlamaBlock(), [torch.randn(1, 4, 256)], progress=False)
    assert isinstance(cal, Calibration)


def test_calibration_plan_takes_no_epilogue_decisions(batches, monkeypatch):
    # The plan only names the candidates: its compile-time epilogue folds (whose SwiGLU
    # timing compiles and runs GPU kernels) are off for it, and the returned config keeps
    # the caller's settings.
    import sys

    plan_mod = sys.modules["fp8compile.plan"]  # (fp8compile.plan is also the function)
    seen = []
    real = plan_mod.plan
    monkeypatch.setattr(plan_mod, "plan", lambda *a, config=None, **k: seen.append(config)
                        or real(*a, config=config, **k))
    cal = fp8compile.calibrate(LlamaBlock(), batches, {"fuse_swiglu": True,
                                                       "fuse_epilogues": True}, progress=False)
    assert [(c.fuse_swiglu, c.fuse_epilogues) for c in seen] == [(False, False)]
    assert cal.config.fuse_swiglu is True and cal.config.fuse_epilogues is True
