"""Number formats: fp8 (e4m3 / e5m2) with scales, fp16 / bf16 casts, power-of-two, binary."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quanta.core import (
    QuantSpec,
    choose_qparams,
    compute_range,
    dequantize,
    fake_quantize,
    max_level,
    quantize,
    quantize_tensor,
    storage_dtype,
)

from .helpers import FAST

FP8 = [("fp8_e4m3", torch.float8_e4m3fn, 448.0), ("fp8_e5m2", torch.float8_e5m2, 57344.0)]
FP8_IDS = [f[0] for f in FP8]
FP8_GRANS = [("per_tensor", {}), ("per_channel-axis0", {"granularity": "per_channel", "axis": 0}),
             ("per_channel-axis1", {"granularity": "per_channel", "axis": 1})]


def _x(shape=(33, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g).mul(4).exp()
    x[0, 0] = 0.0
    return x


def _bview(p: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.axis is None:
        return p
    shape = [1] * x.dim()
    shape[spec.axis] = -1
    return p.reshape(shape)


@pytest.mark.parametrize("gname,gkw", FP8_GRANS, ids=[g[0] for g in FP8_GRANS])
@pytest.mark.parametrize("fmt,dtype,fmax", FP8, ids=FP8_IDS)
def test_fp8_matches_a_direct_cast(fmt, dtype, fmax, gname, gkw):
    spec = QuantSpec(format=fmt, bits=8, **gkw)
    assert storage_dtype(spec) == dtype and max_level(spec) == fmax
    x = _x()
    x0 = x.clone()
    scale, zp = choose_qparams(*compute_range(x, spec), spec)
    s = _bview(scale, x, spec)
    amax = x.abs().amax(dim=1 - spec.axis) if spec.axis is not None else x.abs().max()
    assert torch.equal(scale, amax / fmax)
    ref = (x * (1.0 / s)).to(dtype)  # quanta multiplies by the float32 reciprocal
    q = quantize(x, scale, zp, spec)
    assert q.dtype == dtype
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))  # bitwise
    assert torch.equal(dequantize(q, scale, zp, spec), ref.float() * s)
    assert torch.equal(fake_quantize(x, scale, zp, spec), ref.float() * s)
    assert torch.equal(x, x0)
    # the amax of each slice lands exactly on the format's max
    assert float(q.float().abs().max()) == fmax


@pytest.mark.parametrize("fmt,dtype,fmax", FP8, ids=FP8_IDS)
def test_fp8_saturates_instead_of_overflowing(fmt, dtype, fmax):
    spec = QuantSpec(format=fmt, bits=8)
    x = torch.tensor([1e6, -1e6, 2 * fmax, fmax, 0.0])
    q = quantize(x, 1.0, 0, spec)
    assert q.float().tolist() == [fmax, -fmax, fmax, fmax, 0.0]
    assert fake_quantize(x, 2.0, 0, spec).tolist() == [2 * fmax, -2 * fmax, 2 * fmax, fmax, 0.0]


@FAST
@given(st.sampled_from(FP8_IDS), st.integers(0, 2**31 - 1), st.floats(-6, 6))
def test_fp8_fake_quantize_is_idempotent(fmt, seed, log_mag):
    spec = QuantSpec(format=fmt, bits=8, granularity="per_channel", axis=0)
    x = _x((5, 9), seed) * 10.0**log_mag
    qt = quantize_tensor(x, spec)
    xh = qt.dequantize()
    assert torch.equal(fake_quantize(xh, qt.scale, 0, spec), xh)
    rel = ((xh - x).abs() / x.abs().clamp_min(1e-30))[x.abs() > qt.scale.view(-1, 1) * 2.0**-6 * 4]
    mantissa_bits = 3 if fmt == "fp8_e4m3" else 2
    assert float(rel.max()) <= 2.0 ** -(mantissa_bits + 1) * (1 + 1e-5)  # half an ulp (normal range)


@pytest.mark.parametrize("fmt,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_fp16_bf16_are_plain_casts(fmt, dtype):
    spec = QuantSpec(format=fmt, bits=16)
    assert not spec.has_scale and storage_dtype(spec) == dtype
    x = _x((33, 7), seed=1) * 100
    x[1, 1], x[2, 2] = 1e-6, -3e-9  # subnormal / underflowing values too
    qt = quantize_tensor(x, spec)
    assert qt.scale.item() == 1.0 and qt.zero_point.item() == 0
    assert qt.q.dtype == dtype
    assert torch.equal(qt.q, x.to(dtype))
    assert torch.equal(qt.dequantize(), x.to(dtype).float())
    assert torch.equal(fake_quantize(x, 1.0, 0, spec), x.to(dtype).float())
    assert torch.equal(fake_quantize(x.t(), 1.0, 0, spec), x.t().to(dtype).float())
    # beyond the format's max: saturate (a plain .to() would give inf)
    big = torch.tensor([1e39 if fmt == "bf16" else 1e5]).float()
    assert quantize(big, 1.0, 0, spec).float().item() == torch.finfo(dtype).max


POW2 = [(2, True), (3, True), (4, True), (8, True), (2, False), (4, False)]


@pytest.mark.parametrize("bits,signed", POW2, ids=[f"{'s' if s else 'u'}{b}" for b, s in POW2])
def test_pow2_levels_are_zero_or_signed_powers_of_two(bits, signed):
    spec = QuantSpec(format="pow2", bits=bits, signed=signed)
    levels_k = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    x = _x((64, 16), seed=2)
    qt = quantize_tensor(x, spec)
    scale = qt.scale
    assert scale.item() == x.abs().max().item()  # max_level 1: the largest value is the scale
    xh = qt.dequantize()
    mags = scale * torch.exp2(-torch.arange(levels_k, dtype=torch.float32))
    allowed = torch.cat([torch.zeros(1), mags, -mags if signed else mags])
    assert bool(torch.isin(xh, allowed).all())
    assert torch.isin(allowed, xh).sum() >= min(len(allowed), 3)  # several levels used
    assert bool((torch.sign(xh) * torch.sign(x) >= 0).all())  # sign kept (or zero)
    if not signed:
        assert bool((xh[x < 0] == 0).all())
    # nearest level in the log domain for values inside the grid
    v = x.abs() / scale
    inside = (v >= 2.0 ** -(levels_k - 1)) & (v <= 1) & (x > 0 if not signed else torch.ones_like(v, dtype=torch.bool))
    dist = (torch.log2(xh.abs() / scale) - torch.log2(v))[inside].abs()
    assert float(dist.max()) <= 0.5 + 1e-6
    # the codes are integers of the storage dtype
    assert qt.q.dtype == storage_dtype(spec)


def test_pow2_examples():
    """Rounding is to the nearest level in log2; below half a log-step under the smallest level
    (v < 2^-(K - 1/2)) values go to zero; above 1 they clip to 1 (times scale)."""
    spec = QuantSpec(format="pow2", bits=3)  # K = 3 magnitudes: 1, 1/2, 1/4 (times scale)
    x = torch.tensor([1.0, 0.6, 0.4, 0.3, 0.1, 0.0, -0.55, -1.0, 3.0])
    xh = fake_quantize(x, 2.0, 0, spec)  # scale 2 -> v = x / 2
    assert xh.tolist() == [1.0, 0.5, 0.5, 0.0, 0.0, 0.0, -0.5, -1.0, 2.0]
    assert quantize(x, 2.0, 0, spec).tolist() == [2, 1, 1, 0, 0, 0, -1, -2, 3]


def test_binary_one_bit_signed():
    spec = QuantSpec(bits=1, signed=True)
    assert (spec.qmin, spec.qmax) == (-1, 1)
    x = torch.tensor([-2.0, -0.3, 0.0, 0.2, 1.5])
    qt = quantize_tensor(x, spec)
    assert qt.scale.item() == 2.0 and qt.zero_point.item() == 0
    assert qt.q.dtype == torch.int8 and qt.q.tolist() == [-1, -1, 1, 1, 1]  # 0 -> +1
    assert qt.dequantize().tolist() == [-2.0, -2.0, 2.0, 2.0, 2.0]
    assert set(fake_quantize(torch.randn(100), 0.7, 0, spec).tolist()) == {-0.699999988079071, 0.699999988079071}


def test_one_bit_unsigned_is_an_ordinary_grid():
    spec = QuantSpec(bits=1, signed=False, symmetric=False)
    qt = quantize_tensor(torch.tensor([0.0, 0.3, 0.7, 1.0, 0.5]), spec)
    assert qt.scale.item() == 1.0 and qt.zero_point.item() == 0
    assert qt.q.dtype == torch.uint8 and qt.q.tolist() == [0, 0, 1, 1, 0]  # 0.5 ties to even
    assert qt.dequantize().tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
