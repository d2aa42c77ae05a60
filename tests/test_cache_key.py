"""Inductor's caches are keyed on fp8compile's source: a changed backward formula is never
served from a cache entry traced with the old one."""

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_inductor_cache

import fp8compile
from fp8compile import _cache_key


def _train_step() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 128))
    be = fp8compile.backend({"overrides": {"2": "fp8"}})
    compiled = torch.compile(model, backend=be, fullgraph=True)
    compiled(torch.randn(8, 256)).sum().backward()
    assert len(be.plan.fp8) == 2


def _hits() -> int:
    return counters["aot_autograd"]["autograd_cache_hit"]


def test_unchanged_source_hits_the_autograd_cache_and_changed_source_misses(monkeypatch):
    with fresh_inductor_cache():
        counters.clear()
        _train_step()
        assert _hits() == 0 and counters["aot_autograd"]["autograd_cache_miss"] == 1
        _train_step()
        assert _hits() == 1, dict(counters["aot_autograd"])  # the key is stable
        monkeypatch.setattr(_cache_key, "source_hash", lambda: "edited")
        _train_step()
        assert _hits() == 1, dict(counters["aot_autograd"])  # new code, new key


def test_user_joint_pass_still_runs_and_is_keyed():
    seen = []

    class Mine(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            seen.append(len(graph.nodes))

        def uuid(self):
            return "mine-1"

    patches = _cache_key.keyed_patches({"joint_custom_pre_pass": Mine()})
    key_pass = patches["joint_custom_pre_pass"]
    assert key_pass.uuid()[:2] == ("fp8compile", _cache_key.source_hash())
    assert key_pass.uuid()[-1] == "mine-1"
    key_pass(torch.fx.Graph())
    assert seen == [0]
    # Applying twice does not nest.
    assert _cache_key.keyed_patches(patches) is patches


def test_user_pass_without_uuid_keeps_inductor_bypass():
    patches = _cache_key.keyed_patches({"joint_custom_pre_pass": lambda g: None})
    assert patches["joint_custom_pre_pass"].uuid() is None


@pytest.mark.parametrize("name", _cache_key.TRACE_SWITCHES)
def test_trace_switches_change_the_key(name, monkeypatch):
    """A graph traced with kernels inlined must not be served to a process that asked for
    opaque ops (or another GEMM backend), and the other way round."""
    key_pass = _cache_key.keyed_patches({})["joint_custom_pre_pass"]
    monkeypatch.delenv(name, raising=False)
    before = key_pass.uuid()
    monkeypatch.setenv(name, "0")
    assert key_pass.uuid() != before


def test_opaque_retry_has_its_own_key():
    """The backend's retry with opaque ops must not load the inlined graph that failed."""
    from fp8compile.ops import _inline

    key_pass = _cache_key.keyed_patches({})["joint_custom_pre_pass"]
    inlined = key_pass.uuid()
    with _inline.opaque_ops():
        assert key_pass.uuid() != inlined
    assert key_pass.uuid() == inlined
