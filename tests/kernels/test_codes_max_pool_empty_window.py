"""Codes max-pooling over windows that lie wholly in the padding (dilated pooling): float max
pooling gives -inf there, whose code is the lowest of the dtype (-128 int8, 0 uint8); the
reference, the native kernel and the codes pooling modules give that code, not a wrapped 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quanta.core import QuantSpec, dequantize, quantize
from quanta.integer.pooling import CodesMaxPool1d, CodesMaxPool2d
from quanta.kernels import native
from quanta.kernels.codes import max_pool2d_codes

CL = torch.channels_last
# ((H, W), kernel, stride, padding, dilation): output windows holding no tap inside the image
# (with padding at most half the kernel, a dimension has such windows only where all are)
EMPTY_WINDOWS = [
    ((4, 4), [2, 2], [1, 1], [1, 1], [5, 5]),   # both dimensions' windows in the padding
    ((2, 5), [2, 2], [1, 1], [1, 1], [3, 3]),   # rows in the padding, columns inside
    ((5, 2), [3, 2], [2, 1], [1, 1], [2, 3]),   # columns in the padding, rows strided inside
]
SPECS = {"int8": (QuantSpec(bits=8, signed=True, symmetric=False), torch.int8, -128),
         "uint8": (QuantSpec(bits=8, signed=False, symmetric=False), torch.uint8, 0)}


def _empty_window_count(size, k, s, p, d) -> int:
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    return sum(not any(0 <= o * s - p + i * d < size for i in range(k)) for o in range(out))


def _codes(dtype_name: str, hw, seed: int) -> tuple[torch.Tensor, float, int]:
    spec, _, _ = SPECS[dtype_name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, *hw, generator=g) * 3 + 0.5
    scale, zp = 0.05, (3 if spec.signed else 131)
    return quantize(x, scale, zp, spec).contiguous(memory_format=CL), scale, zp


@pytest.mark.parametrize("geometry", EMPTY_WINDOWS, ids=["both", "rows", "columns-strided"])
@pytest.mark.parametrize("dtype_name", ["int8", "uint8"])
def test_reference_is_the_quantized_float_max_pool(dtype_name, geometry):
    hw, k, s, p, d = geometry
    assert any(_empty_window_count(n, ki, si, pi, di) for n, ki, si, pi, di in zip(hw, k, s, p, d))
    spec, dtype, lowest = SPECS[dtype_name]
    q, scale, zp = _codes(dtype_name, hw, seed=len(hw) + k[0])
    got = max_pool2d_codes(q, k, s, p, d, False, impl="reference")
    pooled = F.max_pool2d(dequantize(q, scale, zp, spec), k, s, p, d)
    assert bool(torch.isneginf(pooled).any())  # (the case under test: float pools -inf there)
    want = quantize(pooled, scale, zp, spec)
    assert got.dtype == dtype and torch.equal(got, want)
    assert bool((got[torch.isneginf(pooled)] == lowest).all())


@pytest.mark.skipif(not native.ready(), reason="needs the native kernels")
@pytest.mark.parametrize("geometry", EMPTY_WINDOWS, ids=["both", "rows", "columns-strided"])
def test_native_takes_empty_windows_and_equals_the_reference(geometry):
    hw, k, s, p, d = geometry
    q, _, _ = _codes("uint8", hw, seed=7)
    args = (q, k, s, p, d, False)
    assert max_pool2d_codes.choose(*args) == "native"
    got = max_pool2d_codes(*args, impl="native")
    assert got.is_contiguous(memory_format=CL)
    assert torch.equal(got, max_pool2d_codes(*args, impl="reference"))


@pytest.mark.parametrize("dtype_name", ["int8", "uint8"])
def test_codes_pooling_modules_give_the_lowest_code(dtype_name):
    spec, dtype, lowest = SPECS[dtype_name]
    q, scale, zp = _codes(dtype_name, (4, 4), seed=3)
    pool2d = CodesMaxPool2d(2, stride=1, padding=1, dilation=5)
    assert torch.equal(pool2d(q), torch.full((2, 5, 1, 1), lowest, dtype=dtype))
    rows = q[:, :, 0, :].contiguous()  # [N, C, W]: 1d pooling runs widened to float
    pool1d = CodesMaxPool1d(2, stride=1, padding=1, dilation=5)
    want = quantize(F.max_pool1d(dequantize(rows, scale, zp, spec), 2, 1, 1, 5), scale, zp, spec)
    assert torch.equal(pool1d(rows), want) and bool((want == lowest).all())
