"""Property tests of the int numerics over every granularity, sign, symmetry and width 2..16."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from quanta.core import QuantSpec, choose_qparams, compute_range, dequantize, fake_quantize, quantize, quantize_tensor

from .helpers import FAST, MEDIUM, expand_param, int_cases


def _storage(spec: QuantSpec) -> torch.dtype:
    if spec.signed:
        return torch.int8 if spec.bits <= 8 else torch.int16
    return torch.uint8 if spec.bits <= 8 else torch.int32


def _tol(spec: QuantSpec, s: torch.Tensor) -> torch.Tensor:
    """Half a step, plus float32 rounding of v = x * (1/s) (|v| <= qmax - qmin) and of q * s."""
    return s * (0.5 + (spec.qmax - spec.qmin + 2) * 2.0**-21) + 1e-44


@MEDIUM
@given(int_cases())
def test_dequantize_quantize_error_is_at_most_half_a_step(case):
    spec, x = case
    x0 = x.clone()
    qt = quantize_tensor(x, spec)
    xh = qt.dequantize()
    assert xh.shape == x.shape and xh.dtype == torch.float32
    s = expand_param(qt.scale, x.shape, spec).double()
    z = expand_param(qt.zero_point, x.shape, spec).double()
    xd = x.double()
    inside = (xd >= (spec.qmin - z - 0.5) * s) & (xd <= (spec.qmax - z + 0.5) * s)
    if spec.signed or not spec.symmetric:  # the chosen range covers every value
        assert bool(inside.all())
    else:  # unsigned symmetric: negative values clip to 0, positive ones are covered
        assert bool(inside[x >= 0].all())
    err = (xh.double() - xd).abs()
    assert bool((err <= _tol(spec, s))[inside].all()), float((err / s)[inside].max())
    # clipped values land on the nearest end of the grid
    below = xd < (spec.qmin - z) * s
    assert torch.equal(xh.double()[below], ((spec.qmin - z) * s).float().double()[below])
    assert torch.equal(x, x0)


@MEDIUM
@given(int_cases(), st.sampled_from([1.0, 3.0, 0.25]))
def test_quantize_is_idempotent_on_its_grid(case, stretch):
    spec, x = case
    scale, zp = choose_qparams(*compute_range(x, spec), spec)
    q = quantize(x * stretch, scale, zp, spec)  # stretch > 1: many values clip
    again = quantize(dequantize(q, scale, zp, spec), scale, zp, spec)
    assert again.dtype == q.dtype
    assert torch.equal(again, q)
    xh = fake_quantize(x * stretch, scale, zp, spec)
    assert torch.equal(fake_quantize(xh, scale, zp, spec), xh)


@MEDIUM
@given(int_cases())
def test_zero_maps_to_the_zero_point_and_back_to_exact_zero(case):
    spec, x = case
    scale, zp = choose_qparams(*compute_range(x, spec), spec)
    x = torch.where(torch.arange(x.numel()).reshape(x.shape) % 3 == 0, torch.zeros(()), x)
    q = quantize(x, scale, zp, spec)
    z = expand_param(zp, x.shape, spec)
    zero = x == 0
    assert torch.equal(q[zero].long(), z[zero].long())
    xh = dequantize(q, scale, zp, spec)
    assert bool((xh[zero] == 0).all())
    assert bool((torch.signbit(xh[zero]) == False).all())  # +0.0, not -0.0  # noqa: E712
    if spec.symmetric:
        assert bool((zp == 0).all())


@MEDIUM
@given(int_cases(), st.sampled_from([1.0, 10.0, -10.0]))
def test_codes_stay_in_qmin_qmax_with_storage_dtype(case, stretch):
    spec, x = case
    qt = quantize_tensor(x, spec)
    assert bool(((qt.zero_point >= spec.qmin) & (qt.zero_point <= spec.qmax)).all())
    assert qt.scale.dtype == torch.float32 and qt.zero_point.dtype == torch.int32
    assert bool((qt.scale > 0).all()) and bool(torch.isfinite(qt.scale).all())
    q = quantize(x * stretch, qt.scale, qt.zero_point, spec)
    assert q.dtype == _storage(spec) and q.shape == x.shape
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    amax = x.abs().max()
    if stretch == 10.0 and amax > 0 and bool((x == amax).any()):  # the largest value is positive

        assert int(q.max()) == spec.qmax  # ... so stretched by 10 it clips to qmax exactly


@FAST
@given(int_cases())
def test_fake_quantize_equals_dequantize_of_quantize(case):
    spec, x = case
    scale, zp = choose_qparams(*compute_range(x, spec), spec)
    x2 = x * 1.7
    ref = dequantize(quantize(x2, scale, zp, spec), scale, zp, spec)
    assert torch.equal(fake_quantize(x2, scale, zp, spec), ref)
    # half / bfloat16 inputs come back in their own dtype
    xh = x2.to(torch.bfloat16)
    out = fake_quantize(xh, scale, zp, spec)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dequantize(quantize(xh, scale, zp, spec), scale, zp, spec).to(torch.bfloat16))


@FAST
@given(int_cases(min_bits=2, max_bits=8))
def test_quantize_matches_the_written_formula(case):
    """q = clamp(round_half_even(x * (1/s)) + zp, qmin, qmax), from broadcast parameters."""
    spec, x = case
    scale, zp = choose_qparams(*compute_range(x, spec), spec)
    s = expand_param(scale, x.shape, spec)
    z = expand_param(zp, x.shape, spec).float()
    x2 = x * 1.3
    ref = (torch.round(x2 * (1.0 / s)) + z).clamp(spec.qmin, spec.qmax)
    assert torch.equal(quantize(x2, scale, zp, spec).float(), ref)
    assert torch.equal(dequantize(ref.to(_storage(spec)), scale, zp, spec), (ref - z) * s)
