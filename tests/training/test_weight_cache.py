"""Cached FP8 weights in training (``cache_training_weights``): ``W`` and ``Wᵀ`` quantized once
per parameter version and fed to ``fp8compile::linear_w``, as for gradient accumulation."""

import copy

import pytest
import torch
from torch import nn

import fp8compile
from tests.models import LlamaBlock


def _train(model, config, steps=3, micro_batches=2, seed=0):
    """Losses and final gradients of SGD with gradient accumulation through fp8hpf, and the
    backend (its weight caches)."""
    torch._dynamo.reset()
    be = fp8compile.backend(config)
    compiled = torch.compile(model, backend=be)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(micro_batches):
            x = torch.randn(2, 8, 256, generator=gen)
            loss = compiled(x).pow(2).mean()
            loss.backward()
            losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return torch.stack(losses), grads, be


@pytest.mark.parametrize("recipe", ["blockwise", "rowwise", "tensorwise"])
def test_cached_weights_train_exactly_as_uncached(recipe):
    """Same losses and gradients, bit for bit, over optimizer steps: a cache that missed a
    parameter update (a stale W or Wᵀ) changes the losses after the first step."""
    base = LlamaBlock()
    want, want_grads, _ = _train(copy.deepcopy(base), {"recipe": recipe})
    got, got_grads, be = _train(copy.deepcopy(base),
                                {"recipe": recipe, "cache_training_weights": True})
    assert torch.equal(got, want), (got, want)
    for name in want_grads:
        assert torch.equal(got_grads[name], want_grads[name]), name
    caches = be.contexts[-1].weight_caches
    assert len(caches) == len(be.plan.fp8) == 7
    # Quantized at the first call and after each of the 2 optimizer steps that a later
    # call saw, not once per micro-batch.
    assert [c.quantizations for c in caches] == [3] * 7


def test_cache_refreshes_in_place():
    """A parameter update requantizes into the same tensors: a compiled graph that holds
    them by address (CUDA graphs) reads the new values."""
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    be = fp8compile.backend({"recipe": "tensorwise", "cache_training_weights": True,
                             "overrides": {"2": "fp8"}})
    compiled = torch.compile(model, backend=be)
    compiled(torch.randn(4, 256)).sum().backward()
    cache = be.contexts[-1].weight_caches[0]
    before = [t.data_ptr() for t in cache.value]
    old_q = cache.value[0].clone()
    with torch.no_grad():
        model[0].weight.mul_(-3)
    compiled(torch.randn(4, 256)).sum().backward()
    assert cache.quantizations == 2
    assert [t.data_ptr() for t in cache.value] == before
    assert not torch.equal(cache.value[0].view(torch.uint8), old_q.view(torch.uint8))


def test_plan_says_the_weights_are_cached():
    model = LlamaBlock()
    be = fp8compile.backend({"cache_training_weights": True})
    torch.compile(model, backend=be)(torch.randn(2, 8, 256)).sum().backward()
    text = be.plan.summary()
    assert "W and Wᵀ quantized once per parameter version (cached)" in text
    assert "weights cached in FP8 per parameter version (W and Wᵀ)" in text


def test_cache_needs_dynamic_scaling():
    with pytest.raises(ValueError, match="cache_training_weights=True caches dynamically"):
        fp8compile.Fp8Config(recipe="tensorwise", scaling="delayed",
                             cache_training_weights=True)
    with pytest.raises(ValueError, match="cache_training_weights"):
        fp8compile.Fp8Config(cache_training_weights="yes")


@pytest.mark.skipif(not (torch.cuda.is_available()
                         and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="the inlined Triton kernels need a CUDA GPU with FP8")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_gpu_cached_weights_train_exactly_as_uncached(mode):
    """On a GPU, with and without CUDA graphs (which read the cache's tensors by address):
    the same losses as the uncached path over optimizer steps.  An MLP block: its GEMMs and
    reductions are deterministic, where attention's backward need not be."""

    class Mlp(nn.Module):
        def __init__(self, d=512, ffn=1024):
            super().__init__()
            self.norm = nn.RMSNorm(d)
            self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
            self.down = nn.Linear(ffn, d, bias=False)

        def forward(self, x):
            h = self.norm(x)
            return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))

    def run(cache):
        torch.manual_seed(0)
        model = Mlp().cuda().to(torch.bfloat16)
        torch._dynamo.reset()
        be = fp8compile.backend({"recipe": "tensorwise", "cache_training_weights": cache},
                                mode=mode)
        compiled = torch.compile(model, backend=be)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator(device="cuda").manual_seed(1)
        losses = []
        # CUDA graphs: one micro-batch per step (the cache refilled in place every step);
        # default mode: two, the second served from the cache.
        for _ in range(3):
            for _ in range(1 if mode else 2):
                x = torch.randn(2, 64, 512, device="cuda", dtype=torch.bfloat16, generator=gen)
                torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph trees
                loss = compiled(x).float().pow(2).mean()
                loss.backward()
                losses.append(loss.detach().clone())
            opt.step()
            opt.zero_grad(set_to_none=True)
        return torch.stack(losses)

    want, got = run(False), run(True)
    assert torch.equal(got, want), (got, want)
