"""choose_qparams: the symmetric / asymmetric formulas, exact zero, degenerate and bad ranges."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quanta.core import QuantSpec, choose_qparams, compute_range, dequantize, quantize

from .helpers import MEDIUM

TINY = torch.finfo(torch.float32).tiny
f32 = torch.float32


@pytest.mark.parametrize("bits,signed,narrow,qmax", [
    (8, True, False, 127), (8, True, True, 127), (4, True, False, 7), (2, True, False, 1),
    (16, True, False, 32767), (8, False, False, 255), (1, False, False, 1),
], ids=["s8", "s8-narrow", "s4", "s2", "s16", "u8", "u1"])
def test_symmetric_scale_is_amax_over_qmax(bits, signed, narrow, qmax):
    spec = QuantSpec(bits=bits, signed=signed, narrow_range=narrow, symmetric=True)
    scale, zp = choose_qparams(-3.0, 2.0, spec)
    assert scale.dtype == f32 and zp.dtype == torch.int32 and scale.shape == ()
    assert scale.item() == (torch.tensor(3.0) / qmax).item()
    assert zp.item() == 0
    scale, _ = choose_qparams(-1.0, 5.0, spec)  # amax from either side
    assert scale.item() == (torch.tensor(5.0) / qmax).item()


@pytest.mark.parametrize("bits,signed,qmin,qmax,zp", [
    (8, False, 0, 255, 64), (8, True, -128, 127, -64), (4, True, -8, 7, -4), (4, False, 0, 15, 4),
], ids=["u8", "s8", "s4", "u4"])
def test_asymmetric_scale_and_zero_point(bits, signed, qmin, qmax, zp):
    spec = QuantSpec(bits=bits, signed=signed, symmetric=False)
    scale, z = choose_qparams(-1.0, 3.0, spec)  # -1 / (4 / (qmax - qmin)) = -(qmax - qmin) / 4
    assert scale.item() == (torch.tensor(4.0) / (qmax - qmin)).item()
    assert z.item() == zp


@pytest.mark.parametrize("lo,hi,where", [(2.0, 5.0, "qmin"), (-5.0, -2.0, "qmax")], ids=["positive", "negative"])
def test_asymmetric_range_is_widened_to_include_zero(lo, hi, where):
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    scale, zp = choose_qparams(lo, hi, spec)
    assert scale.item() == (torch.tensor(5.0) / 255).item()
    assert zp.item() == getattr(spec, where)
    q = quantize(torch.tensor([lo, hi, 0.0]), scale, zp, spec)
    assert q[2].item() == zp.item()


def test_per_channel_ranges_give_per_channel_params():
    lo = torch.tensor([-1.0, 0.0, -4.0, 0.0])
    hi = torch.tensor([3.0, 2.0, -1.0, 0.0])
    spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_channel", axis=0)
    lo0, hi0 = lo.clone(), hi.clone()
    scale, zp = choose_qparams(lo, hi, spec)
    assert scale.shape == (4,) and zp.shape == (4,)
    expected = torch.tensor([4.0, 2.0, 4.0, 255.0]) / 255  # an all-zero channel gets scale 1
    assert torch.equal(scale, expected)
    assert zp.tolist() == [64, 0, 255, 0]
    assert torch.equal(lo, lo0) and torch.equal(hi, hi0)  # inputs untouched


@MEDIUM
@given(st.floats(-1e6, 1e6, width=32), st.floats(-1e6, 1e6, width=32),
       st.integers(2, 16), st.booleans(), st.booleans())
def test_zero_is_exactly_representable(a, b, bits, signed, symmetric):
    lo, hi = min(a, b), max(a, b)
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric)
    scale, zp = choose_qparams(lo, hi, spec)
    assert bool(torch.isfinite(scale)) and scale.item() > 0
    assert spec.qmin <= zp.item() <= spec.qmax
    q = quantize(torch.zeros(3), scale, zp, spec)
    assert q.tolist() == [zp.item()] * 3
    assert dequantize(q, scale, zp, spec).tolist() == [0.0] * 3
    # the ends of the range are reached within half a step (unsigned symmetric: positive end only)
    ends = torch.tensor([lo, hi]) if (signed or not symmetric) else torch.tensor([max(hi, 0.0)])
    err = (dequantize(quantize(ends, scale, zp, spec), scale, zp, spec) - ends).abs()
    assert bool((err <= scale * (0.5 + 2.0**-6)).all())


DEGENERATE = [
    ("zeros", 0.0, 0.0), ("const-pos", 3.7, 3.7), ("const-neg", -3.7, -3.7),
    ("tiny", 1e-40, 1e-40), ("tiny-pm", -1e-40, 1e-40), ("denormal-min", 0.0, 1e-45),
    ("huge", -3e38, 3e38), ("max", -torch.finfo(f32).max, torch.finfo(f32).max),
]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("name,lo,hi", DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_degenerate_ranges_give_finite_positive_scales(name, lo, hi, symmetric):
    for spec in (QuantSpec(bits=8, symmetric=symmetric), QuantSpec(bits=8, signed=False, symmetric=symmetric),
                 QuantSpec(bits=4, symmetric=symmetric)):
        scale, zp = choose_qparams(lo, hi, spec)
        assert bool(torch.isfinite(scale)) and scale.item() >= TINY, (spec, scale)
        assert spec.qmin <= zp.item() <= spec.qmax
        x = torch.tensor([lo, hi, 0.0, lo / 2 + hi / 2])
        q = quantize(x, scale, zp, spec)
        xh = dequantize(q, scale, zp, spec)
        assert not bool(torch.isnan(xh).any())
        if name != "max":  # at +-FLT_MAX, qmax * (FLT_MAX / qmax) may round up to inf
            assert bool(torch.isfinite(xh).all())
        assert xh[2].item() == 0.0
    if name == "zeros":
        assert scale.item() == 1.0
    if name.startswith("const") and symmetric:
        assert scale.item() == (torch.tensor(3.7) / 7).item()  # the 4-bit spec, last in the loop


def test_constant_tensor_roundtrips_within_half_a_step():
    for c in (3.7, -3.7, 1e-3):
        x = torch.full((5, 3), c)
        for spec in (QuantSpec(bits=8), QuantSpec(bits=8, signed=False, symmetric=False),
                     QuantSpec(bits=8, granularity="per_channel", axis=1)):
            scale, zp = choose_qparams(*compute_range(x, spec), spec)
            xh = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
            assert bool(((xh - x).abs() <= scale.max() * 0.501).all()), (c, spec)


@pytest.mark.parametrize("fmt,level", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0), ("pow2", 1.0), ("fp16", None)])
def test_float_format_scales(fmt, level):
    spec = QuantSpec(format=fmt, bits={"fp8_e4m3": 8, "fp8_e5m2": 8, "pow2": 4, "fp16": 16}[fmt])
    scale, zp = choose_qparams(-3.0, 2.0, spec)
    assert zp.item() == 0
    assert scale.item() == (1.0 if level is None else (torch.tensor(3.0) / level).item())


def test_bad_ranges_raise():
    spec = QuantSpec(bits=8)
    with pytest.raises(ValueError, match="min_val must be <= max_val"):
        choose_qparams(1.0, -1.0, spec)
    with pytest.raises(ValueError, match="NaN"):
        choose_qparams(float("nan"), 1.0, spec)
    with pytest.raises(ValueError, match="Inf"):
        choose_qparams(0.0, float("inf"), spec)
    with pytest.raises(ValueError, match="shape"):
        choose_qparams(torch.zeros(3), torch.ones(4), spec)


def test_compute_range_rejects_nan_empty_and_integers():
    spec = QuantSpec(bits=8)
    x = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    with pytest.raises(ValueError, match=r"1 NaN and 1 Inf .*index \(1,\)"):
        compute_range(x, spec)
    with pytest.raises(ValueError, match="empty"):
        compute_range(torch.zeros(0), spec)
    with pytest.raises(TypeError, match="floating"):
        compute_range(torch.arange(3), spec)
