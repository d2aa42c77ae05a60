"""FP8 weight copies shared across graphs, and ``release_weights`` (fp8compile.passes.weights).

The CPU path compiles with the reference ops, so outputs of a model with released weights
must equal those of the same model compiled without releasing, bit for bit."""

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
from torch import nn

import fp8compile
from fp8compile import numerics as nx
from fp8compile.passes import weights
from tests.models import TinyLM

FP8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _compile(model, config=None):
    be = fp8compile.backend(config)
    return torch.compile(model, backend=be), be


def _run(cm, *args):
    with torch.no_grad():
        return cm(*args)


def _reference(model, ids, config=None):
    """Output of a copy of ``model`` compiled without release_weights (Dynamo reset after)."""
    cm, _ = _compile(copy.deepcopy(model), config)
    y = _run(cm, ids)
    torch._dynamo.reset()
    return y


def _ids(t=32):
    return torch.randint(0, 512, (2, t))


def test_release_frees_the_fp8_linears_weights_only():
    model, ids = TinyLM(layers=2), _ids()
    ref = _reference(model, ids)
    cm, be = _compile(model, {"release_weights": True})
    y = _run(cm, ids)
    assert torch.equal(y, ref)
    freed = {n for n, p in model.named_parameters() if weights.released(p)}
    assert freed == {f"layers.{i}.{m}.weight" for i in range(2) for m in FP8_LINEARS}
    for n, p in model.named_parameters():  # shape, dtype and device stay: no recompile
        if n in freed:
            assert p.untyped_storage().nbytes() == 0 and p.shape[-1] in (256, 512)
    stats = be.plan.stats
    assert stats["released_weights"] == 14
    assert stats["released_weight_bytes"] == sum(
        p.numel() * 4 for n, p in model.named_parameters() if n in freed)
    assert stats["weights_kept"] == []
    assert "14, 5.00 MiB freed" in be.plan.summary()
    assert torch.equal(_run(cm, ids), ref)  # and again, from the stored copies


def test_weights_are_released_while_the_graph_compiles(monkeypatch):
    """Each weight is freed once its cache holds the FP8 copy, before Inductor compiles: the
    compile never holds both copies of every weight."""
    model, ids = TinyLM(layers=1), _ids()
    seen = []
    real = fp8compile.Fp8Backend._inductor

    def spy(self, gm, inputs, plan):
        seen.append([weights.released(p) for p in model.layers[0].parameters()])
        return real(self, gm, inputs, plan)

    monkeypatch.setattr(fp8compile.Fp8Backend, "_inductor", spy)
    cm, be = _compile(model, {"release_weights": True})
    _run(cm, ids)
    # attn_norm, q, k, v, o, mlp_norm, gate, up, down
    assert seen == [[False, True, True, True, True, False, True, True, True]]
    assert be.plan.stats["released_weights"] == 7


def test_a_swiglu_fold_keeps_one_copy_of_gate_up():
    """The SwiGLU epilogue reads the stacked gate/up copy as it is (gate stacked first): one
    copy, quantized once, in the store and in the graph's example inputs."""
    model, ids = TinyLM(layers=1), _ids()
    cm, be = _compile(model, {"fuse_swiglu": True})
    _run(cm, ids)
    gc.collect()
    ctx = be.contexts[0]
    assert ctx.stats["swiglu_epilogues"] == 1
    (cache,) = [c for c in ctx.weight_caches
                if any(ctx.example_inputs[i] is model.layers[0].gate_proj.weight
                       for i in c.indices)]
    assert len(cache.indices) == 2
    assert cache.order is None
    ws = [ctx.example_inputs[i] for i in cache.indices]
    assert weights.lookup(ws, cache.form, None)[0] is cache.value[0]
    assert weights.lookup(ws, cache.form, 1) is None
    assert cache.quantizations == 1
    assert any(t is cache.value[0] for t in ctx.extra_examples)


def test_later_graphs_take_the_stored_copies():
    """A recompile (another shape, then dynamic shapes) quantizes nothing: the copies are
    shared, also when nothing is released."""
    for release in (False, True):
        torch._dynamo.reset()
        model = TinyLM(layers=1)
        inputs = {t: _ids(t) for t in (16, 24, 40)}
        refs = {t: _reference(model, x) for t, x in inputs.items()}
        cm, be = _compile(model, {"release_weights": release})
        for t, x in inputs.items():
            assert torch.equal(_run(cm, x), refs[t])
        assert len(be.contexts) >= 2
        first, later = be.contexts[0].weight_caches, be.contexts[-1].weight_caches
        assert sum(c.quantizations for c in later) == 0
        assert all(a.value[0] is b.value[0] for a, b in zip(first, later))


def test_copies_are_held_weakly_until_a_release():
    model = TinyLM(layers=1)
    cm, be = _compile(model)
    _run(cm, _ids())
    ref = weakref.ref(be.contexts[0].weight_caches[0].value[0])
    del cm, be
    torch._dynamo.reset()
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("fold_first", [True, False])
def test_fold_and_plain_graphs_share_the_released_gate_up_copy(fold_first):
    """A graph with the SwiGLU epilogue and one without read the same stacked gate/up copy:
    compiled after the release, the other graph quantizes nothing, holds the same tensor,
    and its output is what it would have been."""
    model, ids = TinyLM(layers=1), _ids()
    fold = {"fuse_swiglu": fold_first}
    other = {"fuse_swiglu": not fold_first}
    ref = _reference(model, ids, other)
    cm, be = _compile(model, {"release_weights": True, **fold})
    _run(cm, ids)
    first = [c for c in be.contexts[0].weight_caches if len(c.indices) == 2]
    assert [c.order for c in first] == [None] * len(first) and first
    torch._dynamo.reset()
    cm2, be2 = _compile(model, {"release_weights": True, **other})
    assert torch.equal(_run(cm2, ids), ref)
    assert sum(c.quantizations for c in be2.contexts[0].weight_caches) == 0
    later = [c for c in be2.contexts[0].weight_caches if len(c.indices) == 2]
    assert len(later) == len(first)
    assert all(a.value[0] is b.value[0] for a, b in zip(first, later))


@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
@pytest.mark.parametrize("transposed", [False, True])
def test_derive_equals_quantizing_in_that_order(granularity, transposed):
    g, u = torch.randn(384, 200), torch.randn(384, 200) * 3
    ws = [nn.Parameter(g.t().contiguous() if transposed else g),
          nn.Parameter(u.t().contiguous() if transposed else u)]
    form = ("WeightCache", (granularity, "e4m3", False), (transposed, transposed))
    gran = nx.Granularity(granularity)
    orders = {None: torch.cat([g, u]), 1: torch.cat([u, g])}
    made = {k: nx.quantize_by_rows(v, gran) for k, v in orders.items()}
    for have in orders:
        weights.put(ws, form, have, made[have])
        for want in orders:
            got = weights.derive(ws, form, want) if want != have else made[have]
            assert got is not None
            assert torch.equal(got[0].view(torch.uint8), made[want][0].view(torch.uint8))
            assert torch.equal(got[1], made[want][1])
        weights._forget(id(ws[0]))
    assert weights.derive(ws, form, None) is None  # nothing stored


def test_another_recipe_after_a_release_is_refused():
    model, ids = TinyLM(layers=1), _ids()
    cm, _ = _compile(model, {"release_weights": True})
    _run(cm, ids)
    torch._dynamo.reset()
    cm2, _ = _compile(model, {"recipe": "rowwise"})
    with pytest.raises(Exception, match=r"release_weights=True.*row e4m3|row e4m3.*release"):
        _run(cm2, ids)


def test_high_precision_reads_of_released_weights_are_refused():
    model, ids = TinyLM(layers=1), _ids()
    # compiled first, reading q_proj in high precision: checked at its next call
    hp_cm, _ = _compile(lambda x: model(x), {"overrides": {"layers.0.q_proj": "bf16"}})
    _run(hp_cm, ids)
    cm, _ = _compile(model, {"release_weights": True})
    _run(cm, ids)
    assert weights.released(model.layers[0].q_proj.weight)
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.weight'.*release_weights"):
        _run(hp_cm, ids)
    # compiled after: refused at compile time
    torch._dynamo.reset()
    late, _ = _compile(model, {"overrides": {"layers.0.q_proj": "bf16"}})
    with pytest.raises(Exception, match=r"layers\.0\.q_proj\.weight"):
        _run(late, ids)


def test_plan_export_and_calibrate_refuse_a_released_model(tmp_path):
    model, ids = TinyLM(layers=1), _ids()
    cm, _ = _compile(model, {"release_weights": True})
    _run(cm, ids)
    with pytest.raises(ValueError, match="fp8compile.plan runs the model eagerly"):
        fp8compile.plan(model, ids)
    with pytest.raises(ValueError, match="fp8compile.export_onnx runs the model eagerly"):
        fp8compile.export_onnx(cm, (ids,), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="fp8compile.calibrate runs the model eagerly"):
        fp8compile.calibrate(model, [ids])


def test_new_data_is_quantized_and_released_again():
    model, ids = TinyLM(layers=1), _ids()
    torch.manual_seed(0)
    base = TinyLM(layers=1)  # the same weights: the fixture seeds 0 before each test
    cm, _ = _compile(model, {"release_weights": True})
    _run(cm, ids)
    w = model.layers[0].down_proj.weight
    assert weights.released(w)
    fresh = torch.randn(w.shape) * 0.05
    w.data = fresh.clone()
    assert not weights.released(w)
    y = _run(cm, ids)  # no recompile: the cache quantizes the new data
    assert weights.released(w)
    base.layers[0].down_proj.weight.data = fresh
    assert torch.equal(y, _reference(base, ids))


def _other_state(layers=1, seed=1):
    """The state dict of another TinyLM (other weights), and that model."""
    torch.manual_seed(seed)
    other = TinyLM(layers=layers)
    return copy.deepcopy(other.state_dict()), other


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_brings_released_weights_back(assign):
    """load_state_dict into a released model: the copy gets its storage back first (it
    used to write through a null pointer); the next call quantizes the new weights and
    releases them again, without a recompile."""
    model, ids = TinyLM(layers=1), _ids()
    sd, other = _other_state()
    cm, be = _compile(model, {"release_weights": True})
    _run(cm, ids)
    assert sum(weights.released(p) for p in model.parameters()) == 7
    model.load_state_dict(sd, assign=assign)
    assert not any(weights.released(p) for p in model.parameters())
    assert all(torch.equal(p, sd[n]) for n, p in model.named_parameters())
    y = _run(cm, ids)
    assert len(be.plans) == 1  # no recompile
    assert sum(weights.released(p) for p in model.parameters()) == 7
    assert torch.equal(y, _reference(other, ids))


def test_state_dict_of_a_released_model_is_refused():
    """state_dict() would hold the released parameters without data (a checkpoint that
    fails to load): a ValueError naming one; once loaded again, the state is readable."""
    model, ids = TinyLM(layers=1), _ids()
    before = copy.deepcopy(model.state_dict())
    cm, _ = _compile(model, {"release_weights": True})
    _run(cm, ids)
    with pytest.raises(ValueError, match=r"'layers\.0\.q_proj\.weight' \(256, 256\) was "
                                         r"released.*Save the state dict before compiling"):
        model.state_dict()
    with pytest.raises(ValueError, match=r"parameter 'q_proj\.weight'"):
        model.layers[0].state_dict()  # a submodule's: its own prefixes
    model.load_state_dict(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_load_that_fails_leaves_the_weights_released():
    """A state dict entry of another shape is not copied (load_state_dict reports it), and
    a missing one (strict=False) is not touched: those parameters stay released."""
    model, ids = TinyLM(layers=1), _ids()
    sd, _ = _other_state()
    cm, _ = _compile(model, {"release_weights": True})
    _run(cm, ids)
    blk = model.layers[0]
    sd["layers.0.o_proj.weight"] = torch.zeros(256, 128)
    del sd["layers.0.up_proj.weight"]
    with pytest.raises(RuntimeError, match="size mismatch for layers.0.o_proj.weight"):
        model.load_state_dict(sd, strict=False)  # the other entries are loaded all the same
    assert weights.released(blk.o_proj.weight) and weights.released(blk.up_proj.weight)
    assert not weights.released(blk.q_proj.weight)
    assert torch.equal(blk.q_proj.weight, sd["layers.0.q_proj.weight"])


def test_copies_and_pickles_of_released_parameters_are_refused():
    """copy.deepcopy(model) read the freed storage and crashed the process; torch.save(model)
    wrote a checkpoint that failed to load.  Both raise a ValueError now, and so does any
    pickling of a released parameter, also one no module hook reaches."""
    model, ids = TinyLM(layers=1), _ids()
    cm, be = _compile(model, {"release_weights": True})
    y = _run(cm, ids)
    with pytest.raises(ValueError, match=r"copy\.deepcopy of a parameter \(256, 256\) "
                                         r"torch\.float32 whose storage was released"):
        copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"pickling .* of a parameter \(\d+, \d+\).*Copy or "
                                         r"save the model before compiling"):
        torch.save(model, io.BytesIO())
    w = model.layers[0].up_proj.weight
    for copier in (copy.copy, pickle.dumps, lambda t: torch.save({"w": t}, io.BytesIO())):
        with pytest.raises(ValueError, match="whose storage was released"):
            copier(w)
    assert torch.equal(_run(cm, ids), y)  # the refusals left the model as it was
    assert len(be.plans) == 1  # no recompile


def _roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["load_state_dict", "data"])
def test_copies_work_again_once_new_data_is_in(how):
    """After load_state_dict (or p.data = ...) the parameters hold data: deepcopy and
    torch.save(model) work and carry the new weights, with nothing of the refusal left on
    the tensors; the next call releases them again, and copies are refused again."""
    model, ids = TinyLM(layers=1), _ids()
    sd, _ = _other_state()
    cm, be = _compile(model, {"release_weights": True})
    _run(cm, ids)
    refusals = set(weights._READS)
    if how == "load_state_dict":
        model.load_state_dict(sd)  # its hook takes the refusals off
        assert not any(set(p.__dict__) & refusals for p in model.parameters())
    else:  # they stay until a copy finds the data back
        for n, p in model.named_parameters():
            p.data = sd[n].clone()
    for clone in (copy.deepcopy(model), _roundtrip(model)):
        for n, p in clone.named_parameters():
            assert torch.equal(p, sd[n]), n
            assert not set(p.__dict__) & refusals, n
    assert not any(set(p.__dict__) & refusals for p in model.parameters())
    _run(cm, ids)
    assert len(be.plans) == 1  # no recompile
    assert sum(weights.released(p) for p in model.parameters()) == 7
    with pytest.raises(ValueError, match="copy.deepcopy of a parameter"):
        copy.deepcopy(model)


def test_conversions_of_a_released_model_are_refused_before_any():
    """model.half() read the freed storage of the first released parameter and crashed the
    process.  A conversion that would read one now raises a ValueError before any parameter
    is converted; one with nothing to convert (the model's own dtype and device) still works,
    and so do the tensor methods that read nothing."""
    model, ids = TinyLM(layers=1), _ids()
    cm, be = _compile(model, {"release_weights": True})
    y = _run(cm, ids)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    for convert in (model.half, model.double, lambda: model.to(torch.bfloat16), cm.half,
                    lambda: model.layers[0].to(torch.float64), model.layers[0].up_proj.double):
        with pytest.raises(ValueError, match=r"converting the model .* would read parameter "
                                             r"'.*weight' \(\d+, \d+\) torch\.float32.*"
                                             r"Nothing was converted"):
            convert()
        assert {n: p.dtype for n, p in model.named_parameters()} == dtypes
    for same in (model.float, model.cpu, lambda: model.to("cpu"), lambda: cm.to(torch.float32)):
        same()
    w = model.layers[0].up_proj.weight
    assert w.to("cpu") is w and w.float() is w and w.cpu() is w
    assert w.type() == "torch.FloatTensor"
    for read in (w.half, w.clone, w.tolist, w.numpy, lambda: w.to("cpu", copy=True)):
        with pytest.raises(ValueError, match=r"Tensor\.\w+\(\) of a parameter \(\d+, 256\) "
                                             r"torch\.float32 whose storage was released"):
            read()
    assert torch.equal(_run(cm, ids), y)
    assert len(be.plans) == 1  # neither the refusals nor the checks recompiled


def test_conversions_and_copies_work_once_new_data_is_in():
    """After load_state_dict the model converts, and the conversions carry the new weights.
    A deep copy or a pickle of the model has the module checks of its own: converting the
    copy converts the copy, not the model."""
    model, ids = TinyLM(layers=1), _ids()
    sd, _ = _other_state()
    cm, _ = _compile(model, {"release_weights": True})
    _run(cm, ids)
    model.load_state_dict(sd)
    for clone in (copy.deepcopy(model), _roundtrip(model)):
        clone.double()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        for n, p in clone.named_parameters():
            assert p.dtype == torch.float64 and torch.equal(p, sd[n].double()), n
    model.double()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float64 and torch.equal(p, sd[n].double()), n
        assert not set(p.__dict__) & set(weights._READS), n


def test_owners_are_hooked_once_per_module():
    """Two graphs of one model release the same parameters: each owning module has one
    pair of hooks, and only modules that own a released parameter have any."""
    model, _ = TinyLM(layers=1), _ids()
    cm, be = _compile(model, {"release_weights": True})
    _run(cm, _ids(32))
    _run(cm, _ids(48))
    assert len(be.plans) == 2
    for name, module in model.named_modules():
        owns = any(weights.released(p) for p in module.parameters(recurse=False))
        assert len(module._load_state_dict_pre_hooks) == int(owns), name
        assert len(module._state_dict_hooks) == int(owns), name


def test_weights_sharing_storage_are_kept():
    model, ids = TinyLM(layers=1), _ids()
    blk = model.layers[0]
    both = torch.cat([blk.gate_proj.weight.detach(), blk.up_proj.weight.detach()])
    blk.gate_proj.weight = nn.Parameter(both[:512])
    blk.up_proj.weight = nn.Parameter(both[512:])
    cm, be = _compile(model, {"release_weights": True})
    _run(cm, ids)
    assert not weights.released(blk.gate_proj.weight)
    assert not weights.released(blk.up_proj.weight)
    assert weights.released(blk.down_proj.weight)
    _run(cm, _ids(48))  # a second graph keeps them for the same reasons: listed once
    kept = be.plan.stats["weights_kept"]
    assert len(be.plans) == 2 and len(kept) == len(set(kept)) == 2
    assert "layers.0.gate_proj.weight: its storage holds other tensors too" in kept
    assert "gate_proj" in be.plan.summary().split("weights kept in high precision:")[1]


def test_tied_and_high_precision_weights_are_kept():
    """A weight an FP8 GEMM reads that the graph also reads in high precision stays."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(256, 256, bias=False)
            self.head = nn.Linear(256, 256, bias=False)

        def forward(self, x):
            return self.head(self.a(x) * self.a.weight.sum())

    model, x = Tied(), torch.randn(8, 256)
    cm, be = _compile(model, {"release_weights": True})
    _run(cm, x)
    assert not weights.released(model.a.weight)
    assert any(k.startswith("a.weight: also read in high precision")
               for k in be.plan.stats["weights_kept"])


def test_training_graphs_release_nothing():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    cm, be = _compile(model, {"release_weights": True, "cache_training_weights": True})
    cm(torch.randn(8, 256)).sum().backward()
    assert not any(weights.released(p) for p in model.parameters())
    assert be.plan.stats["weights_kept"] == ["all: a training graph reads its parameters"]


def test_config_checks():
    with pytest.raises(ValueError, match="release_weights=True.*inference=False"):
        fp8compile.Fp8Config(release_weights=True, inference=False)
    with pytest.raises(ValueError, match="release_weights=1 must be True/False"):
        fp8compile.Fp8Config(release_weights=1)
    assert fp8compile.Fp8Config.from_dict({"release_weights": True}).release_weights


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA graphs (mode='reduce-overhead') need a CUDA GPU")
@pytest.mark.parametrize("swiglu", [True, False])
def test_release_under_cuda_graphs(swiglu):
    """Two graphs of one model (prefill- and decode-like shapes) replayed as CUDA graphs:
    outputs equal those without releasing (benchmarks/memory.py measures the memory)."""
    model = TinyLM(layers=2).cuda().to(torch.bfloat16).eval()
    inputs = [torch.randint(0, 512, s, device="cuda") for s in ((2, 64), (1, 16), (2, 64))]

    def outputs(m, release):
        be = fp8compile.backend({"release_weights": release, "fuse_swiglu": swiglu},
                                mode="reduce-overhead")
        cm = torch.compile(m, backend=be)
        out = []
        with torch.no_grad():
            for _ in range(3):  # warm-up, record, replay
                for x in inputs:
                    torch.compiler.cudagraph_mark_step_begin()
                    out.append(cm(x).clone())
        torch._dynamo.reset()
        return out

    ref = outputs(copy.deepcopy(model), False)
    got = outputs(model, True)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert [n for n, p in model.named_parameters() if weights.released(p)] == [
        f"layers.{i}.{m}.weight" for i in range(2) for m in FP8_LINEARS]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA graphs (mode='reduce-overhead') need a CUDA GPU")
def test_load_state_dict_under_cuda_graphs():
    """New weights loaded into a released model replayed as CUDA graphs: the graphs read
    them (re-recorded where the parameters' addresses moved), as a model compiled with them
    does, and release them again."""
    model = TinyLM(layers=1).cuda().to(torch.bfloat16).eval()
    sd, other = _other_state()
    other = other.cuda().to(torch.bfloat16).eval()
    sd = {k: v.cuda().to(torch.bfloat16) for k, v in sd.items()}
    inputs = [torch.randint(0, 512, s, device="cuda") for s in ((2, 64), (1, 16))]

    def steps(cm, rounds=3):
        out = []
        with torch.no_grad():
            for _ in range(rounds):  # warm-up, record, replay
                for x in inputs:
                    torch.compiler.cudagraph_mark_step_begin()
                    out.append(cm(x).clone())
        return out

    def backend(release):
        return fp8compile.backend({"release_weights": release}, mode="reduce-overhead")

    ref = steps(torch.compile(other, backend=backend(False)))
    torch._dynamo.reset()
    cm = torch.compile(model, backend=backend(True))
    steps(cm)
    model.load_state_dict(sd)
    got = steps(cm)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert sum(weights.released(p) for p in model.parameters()) == 7


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="moving a model between devices needs a CUDA GPU")
def test_device_moves_of_a_released_model_on_the_gpu():
    """model.cpu() of a released model on the GPU read freed device memory; it is refused
    with nothing moved, while model.cuda() and .to(its own device and dtype) are no-ops
    that leave the CUDA-graph replays as they were."""
    model = TinyLM(layers=1).cuda().to(torch.bfloat16).eval()
    x = torch.randint(0, 512, (2, 64), device="cuda")
    cm = torch.compile(model, backend=fp8compile.backend({"release_weights": True},
                                                         mode="reduce-overhead"))

    def step():
        with torch.no_grad():
            torch.compiler.cudagraph_mark_step_begin()
            return cm(x).clone()

    y = [step() for _ in range(3)][-1]
    for move in (model.cpu, lambda: model.to("cpu"), lambda: cm.to(torch.float16)):
        with pytest.raises(ValueError, match="Nothing was converted"):
            move()
        assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16
                   for p in model.parameters())
    model.cuda()
    cm.to("cuda", torch.bfloat16)
    w = model.layers[0].up_proj.weight
    assert w.cuda() is w and w.to(torch.bfloat16) is w
    with pytest.raises(ValueError, match=r"Tensor\.cpu\(\) of a parameter"):
        w.cpu()
    assert torch.equal(step(), y)
    torch._dynamo.reset()


def test_merged_plan_counts_shared_weights_once():
    """A model's graphs quantize the same weights and share the copies: the plan of both
    counts each once (it used to add the graphs' figures)."""
    model = TinyLM(layers=1)
    cm, be = _compile(model)
    for t in (16, 24):
        _run(cm, _ids(t))
    assert len(be.plans) == 2
    fp8 = [n for n, _ in model.named_parameters() if any(m in n for m in FP8_LINEARS)]
    stats = be.plan.stats
    assert stats["quantized_weights"] == len(fp8) == 7
    assert stats["weight_bytes"] == sum(model.get_parameter(n).numel() * 4 for n in fp8)
    assert stats["fp8_weight_bytes"] == be.plans[0].stats["fp8_weight_bytes"]
    assert "2.50 MiB -> 0.63 MiB in FP8" in be.plan.summary()


def test_expert_weights_released_while_compiling(monkeypatch):
    """A mixture of experts' expert weights reach their grouped quantization through a
    transpose: they are freed during the compile too, and the output does not move."""
    from tests.models import tiny_hf_mixtral

    model = tiny_hf_mixtral().eval()
    ids = torch.randint(0, 100, (2, 16))
    ref = _reference(model, ids)
    experts = [n for n, _ in model.named_parameters() if ".experts." in n]
    seen = []
    real = fp8compile.Fp8Backend._inductor

    def spy(self, gm, inputs, plan):
        seen.append([weights.released(model.get_parameter(n)) for n in experts])
        return real(self, gm, inputs, plan)

    monkeypatch.setattr(fp8compile.Fp8Backend, "_inductor", spy)
    cm, _ = _compile(model, {"release_weights": True})
    assert torch.equal(_run(cm, ids).logits, ref.logits)
    assert len(experts) == 4 and seen == [[True] * 4]
