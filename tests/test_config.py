import json

import pytest

from fp8compile import Accumulation, Fp8Config, Precision, Recipe, Rule, Scaling
from fp8compile.numerics import Fp8Format


def test_defaults_are_deepseek_blockwise():
    c = Fp8Config()
    assert c.recipe is Recipe.BLOCKWISE and c.scaling is Scaling.DYNAMIC
    assert c.activation_format is Fp8Format.E4M3 and c.weight_format is Fp8Format.E4M3
    assert c.accumulation is c.grad_accumulation is Accumulation.PRECISE
    assert c.rules == frozenset(Rule)


def test_strings_become_enums():
    c = Fp8Config(recipe="rowwise", accumulation="FAST", overrides={"lm_head": "fp8"})
    assert c.recipe is Recipe.ROWWISE and c.accumulation is Accumulation.FAST
    assert c.overrides == (("lm_head", Precision.FP8),)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"recipe": "blocky"}, "recipe"),
        ({"scaling": 3}, "scaling"),
        ({"activation_format": "e3m4"}, "activation_format"),
        ({"overrides": {"lm_head": "int4"}}, "overrides"),
        ({"overrides": {"": "bf16"}}, "overrides"),
        ({"min_weight_numel": -1}, "min_weight_numel"),
        ({"min_weight_numel": 1.5}, "min_weight_numel"),
        ({"amax_history_len": 0}, "amax_history_len"),
        ({"power_of_2_scales": "yes"}, "power_of_2_scales"),
        ({"fuse_projections": 1}, "fuse_projections"),
        ({"fuse_producers": "no"}, "fuse_producers"),
        ({"grad_accumulation": "fastest"}, "grad_accumulation"),
        ({"static_scales": {"a": -1.0}}, "static_scales"),
        ({"rules": ["norm", "nope"]}, "rules"),
        ({"scaling": "delayed"}, "scaling"),  # needs tensorwise
        ({"calibration": [("a", 1.0)]}, "calibration"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Fp8Config(**kwargs)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="recipie"):
        Fp8Config.from_dict({"recipie": "rowwise"})


def test_delayed_and_static_need_tensorwise():
    assert Fp8Config(recipe="tensorwise", scaling="delayed").scaling is Scaling.DELAYED
    with pytest.raises(ValueError, match="recipe='tensorwise'"):
        Fp8Config(recipe="rowwise", scaling="static")


def test_json_round_trip(tmp_path):
    c = Fp8Config(
        recipe="tensorwise", scaling="static", overrides={"layers.0.*": "bf16", "lm_head": "fp8"},
        static_scales={"layers.1.mlp.up": 3.5}, rules=["norm", "softmax"], min_sqnr_db=20,
        calibration={"layers.1.mlp.up": {"sqnr_db": 28.0, "amax": 3.5}},
    )
    path = tmp_path / "policy.json"
    c.to_json(path)
    data = json.loads(path.read_text())
    assert data["overrides"] == {"layers.0.*": "bf16", "lm_head": "fp8"}
    assert Fp8Config.from_json(path) == c


def test_bad_json_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{recipe: rowwise}")
    with pytest.raises(ValueError, match="not valid JSON"):
        Fp8Config.from_json(p)


def test_override_globs_first_match_wins():
    c = Fp8Config(overrides={"layers.0.*": "bf16", "layers.*.mlp.up": "fp32", "lm_head": "fp8"})
    assert c.precision_override("layers.0.mlp.up") == ("layers.0.*", Precision.BF16)
    assert c.precision_override("layers.3.mlp.up") == ("layers.*.mlp.up", Precision.FP32)
    assert c.precision_override("lm_head") == ("lm_head", Precision.FP8)
    assert c.precision_override("layers.3.mlp.down") is None


def test_glob_covers_submodules():
    c = Fp8Config(overrides={"layers.0": "bf16"})
    assert c.precision_override("layers.0.attn.q")[1] is Precision.BF16
    assert c.precision_override("layers.01.attn.q") is None


def test_frozen():
    with pytest.raises(Exception):
        Fp8Config().recipe = Recipe.ROWWISE
