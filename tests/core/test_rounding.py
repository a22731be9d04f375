"""Rounding modes: ties and negative numbers per definition, and unbiased stochastic rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quanta.core import QuantSpec, Rounding, fake_quantize, quantize, round_values

from .helpers import FAST, MEDIUM

TIES = [-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5]
EXPECTED_TIES = {
    "half_even": [-4, -2, -2, 0, 0, 2, 2, 4],
    "half_away": [-4, -3, -2, -1, 1, 2, 3, 4],
    "floor": [-4, -3, -2, -1, 0, 1, 2, 3],
}
# the float32 just below 0.5: a naive floor(v + 0.5) rounds it to 1
BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))
HARD = [BELOW_HALF, -BELOW_HALF, -0.75, 0.75, -1.25, 2.0**22 + 0.5, -(2.0**22 + 0.5), 2.0**23 - 0.5, -(2.0**23 - 0.5)]
EXPECTED_HARD = {
    "half_even": [0, 0, -1, 1, -1, 2.0**22, -(2.0**22), 2.0**23, -(2.0**23)],
    "half_away": [0, 0, -1, 1, -1, 2.0**22 + 1, -(2.0**22 + 1), 2.0**23, -(2.0**23)],
    "floor": [0, -1, -1, 0, -2, 2.0**22, -(2.0**22 + 1), 2.0**23 - 1, -(2.0**23)],
}
MODES = ["half_even", "half_away", "floor"]


@pytest.mark.parametrize("mode", MODES)
def test_ties_follow_the_definition(mode):
    v = torch.tensor(TIES)
    out = round_values(v, Rounding(mode))
    assert out.tolist() == EXPECTED_TIES[mode]
    # through quantize with the spec's rounding, scale 1 and zero point 0
    q = quantize(v, 1.0, 0, QuantSpec(bits=8, rounding=mode))
    assert q.tolist() == EXPECTED_TIES[mode]


@pytest.mark.parametrize("mode", MODES)
def test_negative_and_near_tie_values(mode):
    v = torch.tensor(HARD, dtype=torch.float32)
    assert v.tolist() == HARD  # all exact in float32
    assert round_values(v, Rounding(mode)).tolist() == EXPECTED_HARD[mode]


@pytest.mark.parametrize("mode", MODES)
def test_rounding_mode_is_used_with_a_scale_and_zero_point(mode):
    s, zp = 0.25, 5  # power-of-two scale: x * (1/s) is exact, so x sits exactly on the ties
    x = torch.tensor(TIES) * s
    q = quantize(x, s, zp, QuantSpec(bits=8, signed=False, symmetric=False, rounding=mode))
    assert q.tolist() == [e + zp for e in EXPECTED_TIES[mode]]
    xh = fake_quantize(x, s, zp, QuantSpec(bits=8, signed=False, symmetric=False, rounding=mode))
    assert xh.tolist() == [e * s for e in EXPECTED_TIES[mode]]


@MEDIUM
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=64))
def test_round_values_matches_float64_definitions(values):
    v = torch.tensor(values, dtype=torch.float32)
    a = np.asarray(values, dtype=np.float64)
    np.testing.assert_array_equal(round_values(v, Rounding.HALF_EVEN).numpy(), np.rint(a))
    np.testing.assert_array_equal(round_values(v, Rounding.FLOOR).numpy(), np.floor(a))
    np.testing.assert_array_equal(round_values(v, Rounding.HALF_AWAY).numpy(), np.sign(a) * np.floor(np.abs(a) + 0.5))


# ----------------------------------------------------------------- stochastic rounding
N_DRAWS = 20_000


@pytest.mark.parametrize("value", [0.3, -1.7, 2.5, -0.5, 0.01, 7.0, 0.0])
def test_stochastic_rounding_is_unbiased(value):
    v = torch.full((N_DRAWS,), value)
    g = torch.Generator().manual_seed(1234)
    out = round_values(v, Rounding.STOCHASTIC, generator=g)
    lo = math.floor(value)
    assert set(out.unique().tolist()) <= {lo, lo + 1}  # only the two neighbours
    p = value - lo
    sigma = math.sqrt(p * (1 - p) / N_DRAWS)
    assert abs(float(out.double().mean()) - value) <= 5 * sigma + 1e-9
    if p > 0:  # both neighbours occur: not a deterministic rounding
        assert 0 < float((out == lo).double().mean()) < 1


@FAST
@given(st.floats(-100, 100, width=32), st.integers(0, 2**31 - 1))
def test_stochastic_fake_quantize_is_unbiased_in_scale_units(value, seed):
    s, n = 0.125, 4000
    x = torch.full((n,), value)
    spec = QuantSpec(bits=16, rounding="stochastic")
    xh = fake_quantize(x, s, 0, spec, generator=torch.Generator().manual_seed(seed))
    v = value / s
    p = v - math.floor(v)
    assert bool(((xh == math.floor(v) * s) | (xh == (math.floor(v) + 1) * s)).all())
    assert abs(float(xh.double().mean()) / s - v) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-6


def test_stochastic_rounding_is_reproducible_with_a_seed():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 5
    spec = QuantSpec(bits=8, rounding="stochastic")

    def draw(seed):
        return quantize(x, 0.05, 0, spec, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    # every code is the floor or the ceiling of x / s
    v = x * (1.0 / torch.tensor(0.05))
    q = draw(9).float()
    assert bool(((q == v.floor().clamp(-128, 127)) | (q == v.ceil().clamp(-128, 127))).all())


def test_stochastic_rounding_per_channel_uses_the_generator():
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0, rounding="stochastic")
    scale = torch.tensor([0.1, 0.2, 0.3, 0.4])
    a = quantize(x, scale, 0, spec, generator=torch.Generator().manual_seed(3))
    b = quantize(x, scale, 0, spec, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
