"""FP8 GEMM kernel vs ops.scaled_mm_reference, every recipe, epilogue and odd shape."""

import pytest
import torch

from fp8compile import kernels
from fp8compile import numerics as nx
from fp8compile.kernels.gemm import scaled_mm
from fp8compile.numerics import Fp8Format, Granularity
from fp8compile.ops import scaled_mm_reference

G = Granularity
RECIPES = [(G.GROUP, G.BLOCK), (G.ROW, G.ROW), (G.TENSOR, G.TENSOR)]
# (out dtype, atol, rtol): fp32 differs from the reference only by summation order (and,
# on Hopper with fast accumulation, by the tensor core's ~2e-2 worst-case accumulator);
# bf16/fp16 by one rounding of the output.
TOL = {torch.float32: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def _operands(device, x_shape, n, recipe, fmt=Fp8Format.E4M3):
    xg, wg = recipe
    x = torch.randn(x_shape) * torch.rand(x_shape[-1]) * 3
    w = torch.randn(n, x_shape[-1]) * 0.05
    xq, xs = nx.quantize(x.to(device), xg, fmt)
    wq, ws = nx.quantize(w.to(device), wg, fmt)
    return xq, xs, wq, ws


def _check(y, ref):
    atol, rtol = TOL[y.dtype]
    if torch.cuda.is_available() and y.dtype == torch.float32:
        atol, rtol = 2e-2, 2e-2  # fast accumulation on Hopper
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y.float().cpu(), ref.float().cpu(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r[0]}x{r[1]}")
@pytest.mark.parametrize("accumulation", ["precise", "fast"])
@pytest.mark.parametrize("x_shape", [(1, 200), (2, 3, 272)], ids=["decode", "3d"])
def test_recipes_match_reference(device, recipe, accumulation, x_shape):
    xq, xs, wq, ws = _operands(device, x_shape, 130, recipe)
    y = scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], None, torch.float32, accumulation)
    ref = scaled_mm_reference(xq, xs, recipe[0], wq, ws, recipe[1], None, torch.float32,
                              "none", None)
    _check(y, ref)


@pytest.mark.parametrize("activation", ["none", "gelu", "silu", "relu"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_epilogue(device, activation, out_dtype):
    recipe = RECIPES[0]
    xq, xs, wq, ws = _operands(device, (2, 5, 256), 96, recipe)
    bias = torch.randn(96, device=device, dtype=torch.bfloat16)
    res = torch.randn(2, 5, 96, device=device, dtype=out_dtype)
    args = (xq, xs, recipe[0], wq, ws, recipe[1], bias, out_dtype)
    y = scaled_mm(*args, "precise", activation, res)
    _check(y, scaled_mm_reference(*args, activation, res))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r[0]}x{r[1]}")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_two_residuals_summed_in_fp32(device, recipe, out_dtype):
    """A residual stream passed as its two terms: their fp32 sum is added to the product and
    rounded once.  Rounding the stream to the output dtype first is a different function."""
    xq, xs, wq, ws = _operands(device, (2, 5, 256), 96, recipe)
    r1, r2 = ((torch.randn(2, 5, 96, device=device) * 4).to(out_dtype) for _ in range(2))
    args = (xq, xs, recipe[0], wq, ws, recipe[1], None, out_dtype)
    y = scaled_mm(*args, "precise", "none", r1, residual2=r2)
    ref = scaled_mm_reference(*args, "none", r1, r2)
    _check(y, ref)
    product = scaled_mm_reference(*args[:-1], torch.float32, "none", None)
    torch.testing.assert_close(ref.float(), (product + (r1.float() + r2.float())).to(out_dtype)
                               .float())
    rounded_first = scaled_mm_reference(*args, "none", (r1 + r2))
    assert not torch.equal(ref, rounded_first)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r[0]}x{r[1]}")
@pytest.mark.parametrize("x_shape", [(1, 200), (3, 100, 144)], ids=["decode", "3d"])
def test_swiglu_epilogue(device, recipe, x_shape):
    """silu(gate) * up of a stacked gate/up weight, with a bias and a residual: the
    Triton kernel's fp32 product and the SwiGLU after it, against the reference."""
    xq, xs, wq, ws = _operands(device, x_shape, 512, recipe)
    bias = torch.randn(512, device=device, dtype=torch.bfloat16)
    res = torch.randn(*x_shape[:-1], 256, device=device, dtype=torch.bfloat16)
    args = (xq, xs, recipe[0], wq, ws, recipe[1], bias, torch.bfloat16)
    y = scaled_mm(*args, "fast", "swiglu", res)
    ref = scaled_mm_reference(*args, "swiglu", res)
    assert y.shape == (*x_shape[:-1], 256)
    _check(y, ref)
    # which is silu(gate) * up of the plain GEMM's columns
    full = scaled_mm_reference(*args[:-1], torch.float32, "none", None)
    want = torch.nn.functional.silu(full[..., :256]) * full[..., 256:]
    _check(y, (want + res.float()).to(torch.bfloat16))


@pytest.mark.parametrize("x_shape", [(1, 256), (3, 7, 200), (33, 384), (300, 640)])
def test_swiglu_group_quantize(device, x_shape):
    """A blockwise gate/up GEMM's SwiGLU quantized in 1x128 groups: as numerics quantizes h
    computed from the plain GEMM's fp32 product on the same device (the same summation
    over K; the Hopper kernel's epilogue at M=300), with M-contiguous scales; near the fp32
    reference's; gate and up halves that are not multiples of 128 rows are refused."""
    from fp8compile.kernels.gemm import swiglu_group_quantize
    from tests.kernels.test_fused_kernel import assert_close_quant

    xq, xs, wq, ws = _operands(device, x_shape, 512, (G.GROUP, G.BLOCK))
    q, s = swiglu_group_quantize(xq, xs, wq, ws, Fp8Format.E4M3)
    y = scaled_mm(xq, xs, G.GROUP, wq, ws, G.BLOCK, None, torch.float32)
    qr, sr = nx.quantize(nx.swiglu(y), G.GROUP, Fp8Format.E4M3)
    assert q.shape == (*x_shape[:-1], 256) and s.shape == sr.shape
    assert s.stride() == (1, s.shape[0])
    assert_close_quant((q, s), (qr, sr), Fp8Format.E4M3)
    h = scaled_mm_reference(xq, xs, G.GROUP, wq, ws, G.BLOCK, None, torch.float32, "swiglu",
                            None)
    torch.testing.assert_close(s, nx.quantize(h, G.GROUP, Fp8Format.E4M3)[1], rtol=4e-3,
                               atol=0)
    with pytest.raises(ValueError, match="N % 256 == 0"):
        swiglu_group_quantize(xq, xs, wq[:384], ws[:3], Fp8Format.E4M3)


def test_swiglu_rejects_widths_that_do_not_pair(device):
    xq, xs, wq, ws = _operands(device, (4, 128), 384, RECIPES[1])
    with pytest.raises(ValueError, match="N % 256 == 0"):
        scaled_mm(xq, xs, G.ROW, wq, ws, G.ROW, activation="swiglu")
    with pytest.raises(ValueError, match="activation='tanh'"):
        scaled_mm(xq, xs, G.ROW, wq, ws, G.ROW, activation="tanh")


@pytest.mark.parametrize("split", [2, 3])
def test_split_k(device, split):
    for recipe in RECIPES:
        xq, xs, wq, ws = _operands(device, (3, 700), 70, recipe)
        bias = torch.randn(70, device=device)
        res = torch.randn(70, device=device)  # broadcast over rows
        args = (xq, xs, recipe[0], wq, ws, recipe[1], bias, torch.float32)
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": split,
               "num_warps": 4, "num_stages": 2}
        y = scaled_mm(*args, "precise", "silu", res, config=cfg)
        _check(y, scaled_mm_reference(*args, "silu", res))


def test_split_k_alone_keeps_the_tile(device, monkeypatch):
    """``{"SPLIT_K": s}`` forces the split of a small-M GEMM, tile left to the launcher; a
    split of a large GEMM or below 1 is refused."""
    launched = _launched_kernels(monkeypatch)
    recipe = RECIPES[0]
    xq, xs, wq, ws = _operands(device, (5, 1024), 96, recipe)
    args = (xq, xs, recipe[0], wq, ws, recipe[1], None, torch.float32)
    ref = scaled_mm_reference(*args, "none", None)
    for split in (1, 2, 4):
        launched.clear()
        _check(scaled_mm(*args, "precise", config={"SPLIT_K": split}), ref)
        assert "_splitk_epilogue_kernel" not in launched, (split, launched)  # folded
    with pytest.raises(ValueError, match="at least 1"):
        scaled_mm(*args, "precise", config={"SPLIT_K": 0})
    xq, xs, wq, ws = _operands(device, (300, 256), 32, recipe)
    with pytest.raises(ValueError, match="M <= 256 only"):
        scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], None, torch.float32, "precise",
                  config={"SPLIT_K": 2})


def _launched_kernels(monkeypatch) -> list[str]:
    from fp8compile.kernels import gemm

    launched, real_launch = [], gemm.launch

    def launch(fn):
        launched.append(getattr(fn, "__name__", None) or fn.fn.__name__)
        return real_launch(fn)

    monkeypatch.setattr(gemm, "launch", launch)
    return launched


@pytest.mark.parametrize("wg", [Granularity.TENSOR, Granularity.ROW])
@pytest.mark.parametrize("m, split", [(1, 1), (5, 2), (130, 1)])
def test_per_tensor_activation_scale_runs_as_stride_0_row_scales(device, monkeypatch, wg, m,
                                                                 split):
    """A per-tensor activation scale is launched as per-row scales that all read its one
    element (row stride 0), the kernel variant that ran 30% faster on an H200 at split 2;
    the product is bit-equal to the per-row launch of the same scale broadcast to every row,
    and matches the reference."""
    from fp8compile.kernels import gemm

    seen, real_launch = [], gemm.launch

    def launch(fn):
        runner = real_launch(fn)

        class Grid:
            def __getitem__(self, grid):
                def call(**kw):
                    seen.append(kw)
                    return runner[grid](**kw)
                return call
        return Grid()
    monkeypatch.setattr(gemm, "launch", launch)
    xq, xs, wq, ws = _operands(device, (m, 272), 48, (Granularity.TENSOR, wg))
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": split, "num_warps": 4,
           "num_stages": 2}
    y = scaled_mm(xq, xs, Granularity.TENSOR, wq, ws, wg, None, torch.float32, "fast",
                  config=cfg, gemv=False)
    gemm_kw = [kw for kw in seen if "A_GRAN" in kw]
    assert gemm_kw and all(kw["A_GRAN"] == 1 and kw["stride_as0"] == 0 for kw in gemm_kw)
    rows = xs.reshape(1).expand(m).contiguous()
    y_rows = scaled_mm(xq, rows, Granularity.ROW, wq, ws, wg, None, torch.float32, "fast",
                       config=cfg, gemv=False)
    assert torch.equal(y, y_rows)
    _check(y, scaled_mm_reference(xq, xs, Granularity.TENSOR, wq, ws, wg, None,
                                  torch.float32, "none", None))


@pytest.mark.parametrize("split", [2, 3, 5])
def test_folded_split_k_sums_as_the_second_kernel_does(device, monkeypatch, split):
    """The last program of each tile sums the partials in the GEMM kernel: the same bits
    as the split-K epilogue kernel (same summation order), NaN rows included, for every
    recipe and epilogue; the tile counters are zero again after each launch."""
    from fp8compile.kernels import gemm

    launched = _launched_kernels(monkeypatch)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": split,
           "num_warps": 4, "num_stages": 2}
    for recipe in RECIPES:
        xq, xs, wq, ws = _operands(device, (19, 1100), 70, recipe)
        if recipe[0] is not G.TENSOR:  # a NaN in one partial sum of row 4
            xs.view(19, -1)[4, 0] = float("nan")
        bias = torch.randn(70, device=device)
        bias[7] = float("nan")
        res = torch.randn(19, 70, device=device, dtype=torch.bfloat16)
        args = (xq, xs, recipe[0], wq, ws, recipe[1], bias, torch.bfloat16)
        got = {}
        for fold in (True, False, True):  # twice folded: counters reused
            monkeypatch.setattr(gemm, "FOLD_SPLIT", fold)
            launched.clear()
            got[fold] = scaled_mm(*args, "precise", "gelu", res, config=cfg)
            assert ("_splitk_epilogue_kernel" in launched) is not fold, launched
        torch.testing.assert_close(got[True], got[False], atol=0, rtol=0, equal_nan=True)
        nan_rows = [4] if recipe[0] is not G.TENSOR else []
        assert got[True][:, 7].isnan().all() and got[True][nan_rows].isnan().all()
        rows = [r for r in range(19) if r not in nan_rows]
        cols = [c for c in range(70) if c != 7]
        assert not got[True][rows][:, cols].isnan().any()
        _check(got[True][rows][:, cols],
               scaled_mm_reference(*args, "gelu", res)[rows][:, cols])
    counters = gemm._COUNTERS[next(k for k in gemm._COUNTERS if k[0] == xq.device)]
    assert all(int(c.count_nonzero()) == 0 for c in counters)


def test_split_k_counters_grow_and_keep_the_old_buffer(device):
    from fp8compile.kernels import gemm

    dev = torch.device(device)
    small = gemm._tile_counters(dev, 10)
    assert gemm._tile_counters(dev, small.numel()) is small
    big = gemm._tile_counters(dev, small.numel() + 1)
    assert big.numel() >= 2 * small.numel() and big.dtype == torch.int32
    assert not big.count_nonzero()
    buffers = next(v for k, v in gemm._COUNTERS.items() if k[0] == dev)
    assert buffers[-1] is big and any(b is small for b in buffers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and streams need a GPU")
def test_folded_split_k_on_the_gpu(monkeypatch):
    """The counters' ordering under load (many launches, every tile's programs racing), in a
    CUDA graph replayed many times, and on a second stream (its own counters): the same bits
    as the two-kernel split every time."""
    from fp8compile.kernels import gemm

    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4,
           "num_warps": 4, "num_stages": 4}
    xq, xs, wq, ws = _operands("cuda", (16, 4096), 4096, RECIPES[0])

    def run():
        return scaled_mm(xq, xs, G.GROUP, wq, ws, G.BLOCK, None, torch.float32, "precise",
                         config=cfg)

    monkeypatch.setattr(gemm, "FOLD_SPLIT", False)
    want = run()
    monkeypatch.setattr(gemm, "FOLD_SPLIT", True)
    for _ in range(200):
        assert torch.equal(run(), want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    for _ in range(200):
        y.zero_()
        graph.replay()
        assert torch.equal(y, want)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y2 = run()
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y2, want)
    streams = {k[1] for k in gemm._COUNTERS if k[0] == xq.device}
    assert side.cuda_stream in streams and len(streams) >= 2  # eager, side
    for buffers in gemm._COUNTERS.values():
        assert all(int(b.count_nonzero()) == 0 for b in buffers)
    assert not gemm._ARENAS[xq.device][0].any()  # the graph's counters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and streams need a GPU")
def test_graphs_captured_on_one_stream_replay_at_once(monkeypatch):
    """Two graphs captured on torch's default capture stream, replayed at the same time on
    two streams: each captured launch has counters of its own (a slice of the arena, not the
    capture stream's buffer, which the two would share and miscount in)."""
    from fp8compile.kernels import gemm

    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4,
           "num_warps": 4, "num_stages": 4}
    monkeypatch.setattr(gemm, "FOLD_SPLIT", True)
    ops = [_operands("cuda", (16, 4096), 4096, RECIPES[0]) for _ in range(2)]

    def run(xq, xs, wq, ws):
        return scaled_mm(xq, xs, G.GROUP, wq, ws, G.BLOCK, None, torch.float32, "precise",
                         config=cfg)

    want = [run(*o) for o in ops]  # eager: also makes the arena
    given = []
    real = gemm._tile_counters
    monkeypatch.setattr(gemm, "_tile_counters", lambda d, t: given.append(real(d, t)) or given[-1])
    graphs, outs = [], []
    for o in ops:
        graphs.append(torch.cuda.CUDAGraph())
        with torch.cuda.graph(graphs[-1]):
            outs.append(run(*o))
    arena = gemm._ARENAS[ops[0][0].device][0]
    spans = [(c.data_ptr(), c.data_ptr() + 4 * c.numel()) for c in given]
    assert len(given) == 2 and all(c._base is arena for c in given)
    assert spans[0][1] <= spans[1][0] or spans[1][1] <= spans[0][0]  # disjoint
    streams = [torch.cuda.Stream() for _ in graphs]
    for _ in range(100):
        for y in outs:
            y.zero_()
        for g, st in zip(graphs, streams):
            st.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(st):
                g.replay()
        for st in streams:
            torch.cuda.current_stream().wait_stream(st)
        assert all(torch.equal(y, w) for y, w in zip(outs, want))
    torch.cuda.synchronize()
    assert not arena.any()


@pytest.mark.parametrize("where", ["traced", "deciding"])
def test_traced_split_k_keeps_the_second_kernel(device, monkeypatch, where):
    """A traced graph (Inductor's own launch) cannot carry the counters between launches:
    there the split-K epilogue kernel sums the partials, and so it does in the eager runs
    that time and tune the graph's GEMM at compile time (what they measure is what the
    graph launches)."""
    import contextlib

    from fp8compile.kernels import gemm
    from fp8compile.ops import _inline

    launched = _launched_kernels(monkeypatch)
    xq, xs, wq, ws = _operands(device, (5, 1024), 96, RECIPES[1])
    args = (xq, xs, G.ROW, wq, ws, G.ROW, None, torch.float32)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2,
           "num_warps": 4, "num_stages": 2}
    with contextlib.ExitStack() as context:
        if where == "traced":
            context.enter_context(monkeypatch.context()).setattr(gemm, "tracing", lambda: True)
        else:
            context.enter_context(_inline._tracing())
            context.enter_context(_inline.outside_tracing())
            context.enter_context(_inline.outside_tracing())  # nested: still deciding
        y = scaled_mm(*args, "precise", config=cfg)
    _check(y, scaled_mm_reference(*args, "none", None))
    assert launched == ["_scaled_mm_kernel", "_splitk_epilogue_kernel"]
    assert not _inline.deciding() and not _inline.tracing()
    launched.clear()
    with _inline.outside_tracing():  # not inside a trace: an eager launch, folded
        scaled_mm(*args, "precise", config=cfg)
    assert launched == ["_scaled_mm_kernel"]


def test_traced_launch_names_every_kernel_parameter(device, monkeypatch):
    """Inductor's wrapper of a Triton kernel takes a call only with every parameter named
    (a default left out fails its mutation analysis, and a CUDA-graphed decode step with it):
    a launch with a config that omits the tuning switches still names them all."""
    from fp8compile.kernels import gemm

    named, real_launch = [], gemm.launch

    def launch(fn):
        def at(grid):
            def call(**kwargs):
                named.append((fn, set(kwargs)))
                return real_launch(fn)[grid](**kwargs)
            return call
        return type("Launch", (), {"__getitem__": lambda self, grid: at(grid)})()

    monkeypatch.setattr(gemm, "launch", launch)
    monkeypatch.setattr(gemm, "tracing", lambda: True)
    for recipe in RECIPES[:2]:
        xq, xs, wq, ws = _operands(device, (3, 256), 64, recipe)
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4,
               "num_stages": 2}
        scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], None, torch.float32, config=cfg)
    kernels_named = [(fn, names) for fn, names in named if fn is gemm._scaled_mm_kernel]
    assert len(kernels_named) == 2
    for _, names in kernels_named:
        assert set(gemm._scaled_mm_kernel.arg_names) <= names


def test_split_k_of_taller_tiles_keeps_the_second_kernel(device, monkeypatch):
    """Above 32-row tiles one program's sum of the partials costs more than a second launch
    (M = 64 on H200): the split-K epilogue kernel sums them."""
    launched = _launched_kernels(monkeypatch)
    xq, xs, wq, ws = _operands(device, (70, 1024), 96, RECIPES[1])
    args = (xq, xs, G.ROW, wq, ws, G.ROW, None, torch.float32)
    ref = scaled_mm_reference(*args, "none", None)
    for bm, kernels_launched in ((16, ["_scaled_mm_kernel"]), (32, ["_scaled_mm_kernel"]),
                                 (64, ["_scaled_mm_kernel", "_splitk_epilogue_kernel"])):
        launched.clear()
        cfg = {"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2,
               "num_warps": 4, "num_stages": 2}
        _check(scaled_mm(*args, "precise", config=cfg), ref)
        assert launched == kernels_launched, bm


def test_tiles_and_mixed_recipes(device):
    """Edge tiles in M and N, a 64-wide K step, and recipe mixes the ops never pick."""
    for xg, wg in [(G.GROUP, G.ROW), (G.ROW, G.BLOCK), (G.TENSOR, G.BLOCK)]:
        xq, xs, wq, ws = _operands(device, (37, 300), 150, (xg, wg))
        args = (xq, xs, xg, wq, ws, wg, None, torch.float32)
        cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
        _check(scaled_mm(*args, "precise", config=cfg), scaled_mm_reference(*args, "none", None))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r[0]}x{r[1]}")
@pytest.mark.parametrize("accumulation", ["precise", "fast"])
@pytest.mark.parametrize("swap_ab, ahead", [(True, False), (False, True), (True, True)])
def test_swapped_operands_and_scales_ahead(device, recipe, accumulation, swap_ab, ahead):
    """The weight tile as the MMA's left operand (``SWAP_AB``) and the promotion scales loaded
    a step ahead (``SCALES_AHEAD``), alone and split over K: K = 400 ends in a partial step,
    and each split at 256 too; a NaN row stays NaN, and only that row (E5M2: the interpreter
    loses E4M3's NaN, SPEC §4)."""
    xg, wg = recipe
    x = torch.randn(5, 400) * 2
    x[3, 11] = float("nan")
    xq, xs = nx.quantize(x.to(device), xg, Fp8Format.E5M2)
    wq, ws = nx.quantize((torch.randn(200, 400) * 0.05).to(device), wg, Fp8Format.E5M2)
    args = (xq, xs, xg, wq, ws, wg, None, torch.float32)
    ref = scaled_mm_reference(*args, "none", None)
    for split, block_k in ((1, 128), (2, 128), (2, 64)):
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": block_k, "SWAP_AB": swap_ab,
               "SCALES_AHEAD": ahead, "SPLIT_K": split, "num_warps": 4, "num_stages": 2}
        y = scaled_mm(*args, accumulation, config=cfg)
        assert y[3].isnan().all() and not y[[0, 1, 2, 4]].isnan().any(), split
        _check(y[[0, 1, 2, 4]], ref[[0, 1, 2, 4]])


def test_e5m2_and_nan_rows(device):
    recipe = RECIPES[1]
    x = torch.randn(4, 128)
    x[2, 7] = float("nan")
    xq, xs = nx.quantize(x.to(device), recipe[0], Fp8Format.E5M2)
    wq, ws = nx.quantize(torch.randn(32, 128, device=device), recipe[1], Fp8Format.E5M2)
    y = scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], None, torch.float32, "fast")
    assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()
    ref = scaled_mm_reference(xq, xs, recipe[0], wq, ws, recipe[1], None, torch.float32,
                              "none", None)
    _check(y[[0, 1, 3]], ref[[0, 1, 3]])


def test_rejects_bad_inputs(device):
    xq, xs, wq, ws = _operands(device, (4, 128), 32, RECIPES[0])
    with pytest.raises(ValueError, match="FP8 operands"):
        scaled_mm(xq.float(), xs, G.GROUP, wq, ws, G.BLOCK)
    with pytest.raises(ValueError, match="scale"):
        scaled_mm(xq, xs[:, :0], G.GROUP, wq, ws, G.BLOCK)
    with pytest.raises(ValueError, match="K"):
        scaled_mm(xq[:, :64], xs, G.GROUP, wq, ws, G.BLOCK)
    with pytest.raises(ValueError, match="accumulation"):
        scaled_mm(xq, xs, G.GROUP, wq, ws, G.BLOCK, accumulation="exact")


def test_dispatcher_falls_back_on_mixed_formats(device):
    xq, xs = nx.quantize(torch.randn(4, 128, device=device), G.ROW, Fp8Format.E4M3)
    wq, ws = nx.quantize(torch.randn(32, 128, device=device), G.ROW, Fp8Format.E5M2)
    args = (xq, xs, G.ROW, wq, ws, G.ROW, None, torch.float32)
    y = kernels.scaled_mm(*args, "precise", "none", None)
    torch.testing.assert_close(y, scaled_mm_reference(*args, "none", None))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r[0]}x{r[1]}")
def test_transposed_operands(device, recipe):
    # The backward GEMMs hand over dy_q.t() and x_q.t(): column-major FP8 views, which the
    # launcher lays out K-major (tiled transpose) before the kernel reads them.
    xq, xs, wq, ws = _operands(device, (70, 272), 130, recipe)
    xq_t = xq.t().contiguous().t()
    wq_t = wq.t().contiguous().t()
    assert xq_t.stride(1) != 1 and wq_t.stride(1) != 1
    y = scaled_mm(xq_t, xs, recipe[0], wq_t, ws, recipe[1], None, torch.float32, "precise")
    ref = scaled_mm_reference(xq, xs, recipe[0], wq, ws, recipe[1], None, torch.float32,
                              "none", None)
    _check(y, ref)


def _tuning_args(precise):
    return {"M_BUCKET": 4096, "N": 4096, "K": 4096, "A_GRAN": 1, "W_GRAN": 1,
            "PRECISE": precise, "SPLIT_K": 1, "M": 4096}


@pytest.mark.parametrize("bucket", [16, 32])
@pytest.mark.parametrize("a_gran, w_gran, precise, stages", [
    (2, 3, True, {3, 4}),    # blockwise: promoted every 128 of K
    (2, 3, False, {3, 4}),
    (1, 1, True, {4, 5}),    # row, precise
    (1, 1, False, {4, 5}),   # row, fast
    (0, 0, False, {4, 5}),   # tensor, fast
])
def test_small_row_tiles_tune_swapped_configs(bucket, a_gran, w_gran, precise, stages):
    """At M <= 32 every tuned config puts the weight on the MMA's M side and loads the
    scales ahead, bucket x 64 x 128 tiles; each recipe times only its own two stage counts;
    larger buckets keep unswapped tiles."""
    from fp8compile.kernels import tuning

    args = {**_tuning_args(precise), "M_BUCKET": bucket, "M": bucket - 7, "A_GRAN": a_gran,
            "W_GRAN": w_gran}
    kept = tuning.prune(tuning.configs(), args)
    assert {c.num_stages for c in kept} == stages and len(kept) == 2
    for c in kept:
        assert c.kwargs["SWAP_AB"] and c.kwargs["SCALES_AHEAD"]
        assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) == (bucket, 64, 128)
    assert tuning.default_config(bucket, a_gran >= 2)["SWAP_AB"]
    for larger in (64, 128, 256, 4096):
        kept = tuning.prune(tuning.configs(), {**args, "M_BUCKET": larger})
        assert kept and not any(c.kwargs["SWAP_AB"] for c in kept)


@pytest.mark.parametrize("bucket, a_gran, w_gran, tile, stages", [
    (128, 2, 3, (64, 64), {3}),    # blockwise: the narrower tile, fewer stages
    (128, 3, 3, (64, 64), {3}),
    (128, 1, 1, (64, 128), {4}),   # row
    (128, 0, 0, (64, 128), {4}),   # tensor
    (64, 2, 3, (64, 64), {3}),
    (64, 1, 1, (64, 64), {5}),
    (256, 2, 3, (64, 64), {3}),
    (256, 1, 1, (128, 128), {6}),
    (256, 0, 0, (128, 128), {6}),
])
@pytest.mark.parametrize("precise", [True, False])
def test_wgmma_sized_buckets_tune_by_the_scales(bucket, a_gran, w_gran, tile, stages, precise):
    """At 33-256 rows one unswapped config per kind of scales: blockwise 3 stages on 64x64
    tiles from 64 rows on; the others 5 stages at 64 rows, 4 at 128 (64x128 tiles), 6 at 256
    (128x128); the default config's tile agrees."""
    from fp8compile.kernels import tuning

    args = {**_tuning_args(precise), "M_BUCKET": bucket, "M": bucket - 28, "A_GRAN": a_gran,
            "W_GRAN": w_gran}
    kept = tuning.prune(tuning.configs(), args)
    assert kept and {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == {tile}
    assert {c.num_stages for c in kept} == stages
    assert not any(c.kwargs["SWAP_AB"] for c in kept)
    blockwise = max(a_gran, w_gran) >= 2
    assert tuning.small_tile(bucket, blockwise) == tile
    config = tuning.default_config(bucket, blockwise)
    assert (config["BLOCK_M"], config["BLOCK_N"]) == tile and not config["SWAP_AB"]


def test_autotune_configs_compile_together_once_per_key(monkeypatch):
    """Before the autotuner times a new key, every config it will time is compiled through
    Triton's async-compile mode (threads), once; a compile error is left to the autotuner."""
    from triton.runtime import _async_compile

    from fp8compile.kernels import gemm, tuning

    calls = []

    class FakeKernel:
        def warmup(self, grid, **kwargs):
            assert _async_compile.active_mode.get() is not None  # compiles go to the pool
            calls.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"],
                          kwargs["num_stages"]))
            if kwargs["BLOCK_M"] == 256:
                raise RuntimeError("out of resources")  # the autotuner's problem, not ours

    monkeypatch.setattr(gemm, "_kernel", FakeKernel())
    monkeypatch.setattr(gemm.os, "cpu_count", lambda: 16)
    gemm._PRECOMPILED.clear()
    fast = _tuning_args(precise=False)
    gemm._precompile_configs(fast, (torch.float8_e4m3fn, torch.bfloat16, None, "none", False))
    want = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in tuning.prune(tuning.configs(), fast)]
    assert sorted(calls) == sorted(want) and len(want) >= 2
    calls.clear()
    gemm._precompile_configs(fast, (torch.float8_e4m3fn, torch.bfloat16, None, "none", False))
    assert calls == []  # tuned key: nothing to compile
    gemm._precompile_configs(_tuning_args(precise=True),
                             (torch.float8_e4m3fn, torch.bfloat16, None, "none", False))
    assert len(calls) == len(tuning.prune(tuning.configs(), _tuning_args(precise=True)))
    monkeypatch.setattr(gemm.os, "cpu_count", lambda: 1)
    calls.clear()
    gemm._precompile_configs(_tuning_args(precise=True),
                             (torch.float8_e4m3fn, torch.float32, None, "none", False))
    assert calls == []  # one core: the autotuner compiles as before


@pytest.mark.parametrize("n, k, row_split, block_split", [
    (4096, 4096, 4, 4),    # 64 tiles of 16x64; blockwise: at least 1024 of K per split
    (14336, 4096, 1, 2),   # 224 tiles: ~2 (or ~4) programs per SM on 132 SMs
    (4096, 14336, 4, 8),
    (4096, 1024, 2, 1),    # at least 512 (1024) of K per split
    (57344, 4096, 1, 1),   # the tiles alone fill the SMs
])
def test_split_k_keeps_more_programs_in_flight_for_blockwise_scales(n, k, row_split,
                                                                    block_split):
    from fp8compile.kernels import tuning

    assert tuning.split_k(16, n, k, 16, 64, 132) == row_split
    assert tuning.split_k(16, n, k, 16, 64, 132, blockwise=True) == block_split


@pytest.mark.parametrize("m, k, row_split, block_split", [
    (128, 4096, 2, 4),     # 64x128: split 4's partials would be half the weight's bytes
    (100, 4096, 2, 4),
    (128, 14336, 4, 4),    # the same tiles, partials cheap next to a 3.5x longer weight
    (64, 4096, 4, 4),      # 64x64 tiles: two (four) programs per SM
    (256, 4096, 1, 2),     # 64x128 (not 128x128 at split 2); blockwise 64x64 tiles
    (256, 14336, 2, 2),    # 128x128: not 3, a power of two
])
def test_split_k_of_large_tiles_weighs_the_partials(m, k, row_split, block_split):
    """Tiles of 64x128 and up split past one program per SM only while the fp32 partials
    stay under half the weight's bytes; smaller tiles keep two (four blockwise) programs per
    SM."""
    from fp8compile.kernels import tuning

    tile = tuning.small_tile(tuning.m_bucket(m), False, 4096, k, 132)
    assert tuning.split_k(m, 4096, k, *tile, 132) == row_split
    block_tile = tuning.small_tile(tuning.m_bucket(m), True, 4096, k, 132)
    assert tuning.split_k(m, 4096, k, *block_tile, 132, blockwise=True) == block_split


@pytest.mark.parametrize("m, n, k, tile", [
    (256, 4096, 4096, (64, 128)),     # 64 tiles of 128x128 would need split 2: partials
    (200, 4096, 4096, (64, 128)),     # as large as the weight
    (256, 4096, 14336, (128, 128)),   # split 2's partials small next to the weight
    (256, 14336, 4096, (128, 128)),   # 224 tiles: no split
    (256, 1024, 1024, (64, 128)),
    (128, 4096, 4096, (64, 128)),     # 128 rows: one tile whatever the shape
    (128, 1024, 1024, (64, 128)),
])
def test_256_rows_halve_tiles_that_fill_the_sms_only_by_a_costly_split(monkeypatch, m, n, k,
                                                                      tile):
    """At 256 rows without blockwise scales, 128x128 tiles that would fill the SMs only by
    a split whose partials outweigh half the weight become 64x128 tiles; the launcher, the
    autotuner's pruning and the default config agree, and blockwise 64x64 tiles stay."""
    from fp8compile.kernels import tuning

    monkeypatch.setattr(tuning, "num_sms", lambda device: 132)
    bucket = tuning.m_bucket(m)
    assert tuning.small_tile(bucket, False, n, k, 132) == tile
    assert tuning.small_tile(bucket, True, n, k, 132) == (64, 64)
    args = {**_tuning_args(False), "M_BUCKET": bucket, "M": m, "N": n, "K": k,
            "a_ptr": torch.empty(1)}
    for a_gran in (0, 1):
        kept = tuning.prune(tuning.configs(), {**args, "A_GRAN": a_gran, "W_GRAN": a_gran})
        assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == {tile}
    config = tuning.default_config(bucket, False, n, k, 132)
    assert (config["BLOCK_M"], config["BLOCK_N"]) == tile


def test_traced_and_eager_launches_split_k_alike(monkeypatch):
    """The config a traced decode GEMM is launched with splits K as the eager launcher
    does for the same recipe: twice the programs for blockwise scales."""
    from fp8compile.kernels import gemm, tuning

    monkeypatch.setattr(tuning, "num_sms", lambda device: 132)
    for (xg, wg), acc in [((G.GROUP, G.BLOCK), "precise"), ((G.ROW, G.ROW), "fast"),
                          ((G.ROW, G.ROW), "precise")]:
        key = (16, 14336, 4096, xg, wg, acc, torch.float8_e4m3fn, torch.bfloat16, "none",
               False, False)
        monkeypatch.setitem(gemm._COMPILE_TIME_CONFIGS, key, {"BLOCK_M": 16, "BLOCK_N": 64})
        xq = torch.zeros(16, 4096, dtype=torch.float8_e4m3fn)
        wq = torch.zeros(14336, 4096, dtype=torch.float8_e4m3fn)
        got = gemm._compile_time_config(xq, None, xg, wq, None, wg, None, torch.bfloat16, acc,
                                        "none", None)
        blockwise = xg is G.GROUP
        assert got["SPLIT_K"] == tuning.split_k(16, 14336, 4096, 16, 64, 132, blockwise)
        assert got["SPLIT_K"] == (2 if blockwise else 1)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r[0]}x{r[1]}")
@pytest.mark.parametrize("activation", ["none", "swiglu"])
def test_fp8_output_with_a_static_scale(device, recipe, activation):
    # An FP8 out_dtype takes out_scale: the product (with its epilogue) cast with it.  Where
    # the Gluon kernel does not serve the GEMM (here: the interpreter, or M <= 256), the fp32
    # product then one cast: the bits of that cast of this kernel's fp32 output.
    xq, xs, wq, ws = _operands(device, (5, 256), 512, recipe)
    scale = torch.tensor([0.5 / 448], device=device)
    q = scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], None, torch.float8_e4m3fn, "fast",
                  activation, out_scale=scale)
    y = scaled_mm(xq, xs, recipe[0], wq, ws, recipe[1], None, torch.float32, "fast",
                  activation)
    want = nx.quantize_with_scale(y, scale.reshape(()), G.TENSOR, Fp8Format.E4M3)
    assert q.dtype == torch.float8_e4m3fn and q.shape == y.shape
    assert torch.equal(q.view(torch.uint8).cpu(), want.view(torch.uint8).cpu())
    assert (q.float().abs() == 448).any()  # some values saturate


def test_fp8_output_needs_its_scale(device):
    xq, xs, wq, ws = _operands(device, (4, 128), 128, (G.ROW, G.ROW))
    with pytest.raises(ValueError, match="needs out_scale"):
        scaled_mm(xq, xs, G.ROW, wq, ws, G.ROW, None, torch.float8_e4m3fn, "fast")
    with pytest.raises(ValueError, match="out_scale casts to FP8"):
        scaled_mm(xq, xs, G.ROW, wq, ws, G.ROW, None, torch.bfloat16, "fast",
                  out_scale=torch.ones(1, device=device))
