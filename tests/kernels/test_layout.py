"""The tiled 2-D copy that lays transposed FP8 operands out K-major."""

import pytest
import torch

from fp8compile.kernels.layout import contiguous_2d


def _fp8_bits(shape, device):
    bits = torch.randint(0, 256, shape, dtype=torch.uint8)
    return bits.view(torch.float8_e4m3fn).to(device)  # every byte pattern, NaNs included


@pytest.mark.parametrize("shape", [(1, 130), (130, 1), (65, 130), (200, 77)])
def test_transpose_is_bit_exact(device, shape):
    q = _fp8_bits(shape, device)
    t = q.t()
    got = contiguous_2d(t)
    assert got.is_contiguous() and got.shape == t.shape and got.dtype == t.dtype
    assert torch.equal(got.view(torch.uint8).cpu(), t.contiguous().view(torch.uint8).cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e5m2])
def test_sliced_views_and_other_dtypes(device, dtype):
    x = torch.randn(150, 90).to(device).to(dtype)
    for view in (x[::3, 5:], x.t()[:, 1::2], x[7:8]):
        got = contiguous_2d(view)
        assert got.is_contiguous()
        assert torch.equal(got.float().nan_to_num(), view.float().nan_to_num())


def test_contiguous_input_is_returned_as_is(device):
    x = torch.randn(4, 4).to(device)
    assert contiguous_2d(x) is x
    empty = torch.empty(0, 5).to(device).t()
    assert contiguous_2d(empty).shape == (5, 0)


def test_rejects_non_2d(device):
    with pytest.raises(ValueError, match="2-D tensor, got shape"):
        contiguous_2d(torch.randn(2, 3, 4).to(device))
