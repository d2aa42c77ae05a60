"""FP16 loss scaling (torch.amp.GradScaler), gradient clipping, and the overflow monitor
with demotion to BF16, all through the FP8 path."""

import logging

import torch
import torch.nn.functional as F
from torch import nn

import fp8compile
from fp8compile.numerics import Fp8Format, Granularity
from fp8compile.training import Fp8Monitor, quantization_stats


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(),
                         nn.Linear(256, 128))


def _step(compiled, model, opt, scaler, x, t):
    with torch.autocast("cpu", dtype=torch.float16):
        y = compiled(x)
        loss = F.mse_loss(y.float(), t)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    scaler.step(opt)
    scaler.update()
    return y, norm


def test_grad_scaler_and_clipping_fp16():
    model = _mlp()
    be = fp8compile.backend({"overrides": {"4": "fp8"}})
    compiled = torch.compile(model, backend=be)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, t = torch.randn(32, 256), torch.randn(32, 128)
    y, norm = _step(compiled, model, opt, scaler, x, t)
    assert y.dtype == torch.float16  # autocast semantics kept around the FP8 op
    assert len(be.plan.fp8) == 3
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    # Gradients were unscaled before clipping: the pre-clip norm is the true one (O(0.1),
    # not 65536 times that), and after clipping the norm is at most 0.05.
    assert 1e-3 < float(norm) < 10
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(clipped) <= 0.05 * 1.001
    assert scaler.get_scale() == 2.0**16

    # An fp16 overflow (loss scale far too large) reaches the grads as inf/NaN through the
    # FP8 GEMMs (E4M3 has no inf: NaN), so the scaler skips the step and backs off.
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    before = [p.detach().clone() for p in model.parameters()]
    _step(compiled, model, opt, scaler2, x, t)
    assert scaler2.get_scale() < 2.0**60
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_quantization_stats_counts():
    x = torch.randn(4, 256)
    st = quantization_stats(x, Granularity.GROUP, Fp8Format.E4M3)
    assert st.saturated == 0 and st.numel == 1024  # dynamic scales never saturate
    x[0, 0] = 1e6  # one outlier: tensorwise scaling flushes small values to zero
    st = quantization_stats(x, Granularity.TENSOR, Fp8Format.E4M3)
    assert st.flushed > 100
    assert quantization_stats(x, Granularity.GROUP, Fp8Format.E4M3).flushed < st.flushed
    st = quantization_stats(x, Granularity.TENSOR, Fp8Format.E4M3, scale=torch.tensor(1e-3))
    assert st.saturated > 100  # a stale (too small) scale saturates


def test_monitor_delayed_overflow_demotes_and_plan_says_why(caplog):
    torch.manual_seed(0)
    model = _mlp()
    cfg = {"recipe": "tensorwise", "scaling": "delayed", "amax_history_len": 2}
    be = fp8compile.backend(cfg)
    compiled = torch.compile(model, backend=be)
    x = torch.randn(16, 256)
    compiled(x).sum().backward()
    compiled(x).sum().backward()
    mon = Fp8Monitor(model, backend=be, max_overflow_rate=0.01, patience=2)
    assert set(mon.layers()) == {"0", "2"}  # "4" is the output head, kept high precision
    calm = mon.measure(lambda m: m(x).sum())
    assert calm["0"].overflow_rate == 0 and not mon.demoted
    # Inputs 50x larger than the history: layer 0's activation saturates at the delayed scale.
    with caplog.at_level(logging.WARNING, logger="fp8compile.training"):
        for _ in range(2):
            stats = mon.measure(lambda m: m(x * 50).sum())
    assert stats["0"].tensors["activation"].saturated > 1000
    assert "0" in mon.demoted and "demoting 0 to bf16" in caplog.text
    assert "grad" in stats["0"].tensors
    be2 = mon.backend()
    compiled = torch.compile(model, backend=be2)
    compiled(x).sum().backward()
    entry = next(e for e in be2.plan.gemms if e.module == "0")
    assert entry.precision == "bf16" and entry.rule == "override:0"
    assert "overflow rate" in entry.reason and entry.extra["demoted"]
    assert model[0].weight.grad is not None


def test_monitor_underflow_criterion_dynamic():
    model = _mlp()
    mon = Fp8Monitor(model, {"recipe": "tensorwise"}, max_underflow_rate=0.05, patience=1)
    x = torch.randn(16, 256) * 1e-3
    x[0, 0] = 1e4  # one outlier per tensor: most of layer 0's input flushes to zero
    stats = mon.measure(lambda m: m(x).sum())
    assert stats["0"].underflow_rate > 0.05
    assert "underflow" in mon.demoted["0"]
    assert mon.demoted_config().precision_override("0")[1] == "bf16"
    assert model[0].weight.grad is None  # measuring leaves .grad alone
