"""HistogramCalibrator binning: power-of-two widths, exact coarsening, exact merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta.calib import HistogramCalibrator

STATE_KEYS = ("hist", "log2_width", "amax", "has_negative", "zeros", "num_batches", "num_samples")


def _fed(batches, num_bins=2048):
    cal = HistogramCalibrator(num_bins=num_bins)
    for b in batches:
        cal.collect(b)
    return cal


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for key in STATE_KEYS:
        assert torch.equal(sa[key], sb[key]), key


def _expected_hist(values: np.ndarray, num_bins: int) -> tuple[np.ndarray, int]:
    """Brute force: the smallest k with amax < num_bins * 2^k, then floor(|x| / 2^k)."""
    mag = np.abs(values.astype(np.float64))
    amax = mag.max()
    k = -149 - num_bins.bit_length()
    while not amax < num_bins * 2.0**k:
        k += 1
    return np.bincount(np.floor(mag / 2.0**k).astype(np.int64), minlength=num_bins), k


@pytest.mark.parametrize("num_bins", [1, 7, 100, 2048])
@pytest.mark.parametrize("scale", [1e-42, 1e-3, 1.0, 3e5, 1e37])
def test_bins_match_brute_force(num_bins, scale):
    g = torch.Generator().manual_seed(int(math.log10(scale) + 100) * 10 + num_bins)
    x = torch.randn(1000, generator=g) * scale
    cal = _fed([x], num_bins)
    hist, k = _expected_hist(x.numpy(), num_bins)
    state = cal.state_dict()
    assert int(state["log2_width"]) == k and cal.bin_width == 2.0**k
    assert np.array_equal(state["hist"].numpy(), hist)
    amax = float(x.abs().max())
    assert num_bins * cal.bin_width / 2 <= amax < num_bins * cal.bin_width  # the smallest such width


def test_coarsening_equals_direct_binning_of_all_data():
    g = torch.Generator().manual_seed(0)
    small, big = torch.randn(500, generator=g) * 1e-3, torch.randn(500, generator=g) * 1e6
    cal = _fed([small, big])
    hist, k = _expected_hist(torch.cat([small, big]).numpy(), 2048)
    assert int(cal.state_dict()["log2_width"]) == k
    assert np.array_equal(cal.state_dict()["hist"].numpy(), hist)


def test_merge_with_very_different_ranges_is_exact():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3000, generator=g) * 0.01
    b = torch.rand(2000, generator=g) * 5e4  # non-negative
    c = torch.randn(10, generator=g) * 1e-30
    whole = _fed([a, b, c])
    _assert_same_state(_fed([c, b, a]), whole)
    merged = _fed([b])
    merged.merge(_fed([a]))
    merged.merge(_fed([c]))
    _assert_same_state(merged, whole)
    reverse = _fed([c])
    reverse.merge(_fed([a, b]))
    _assert_same_state(reverse, whole)


batch_lists = st.lists(
    st.tuples(st.integers(1, 40), st.integers(-140, 120), st.booleans()), min_size=1, max_size=6
)


@settings(max_examples=40, deadline=None)
@given(batch_lists, st.sampled_from([1, 3, 64, 2048]), st.randoms(use_true_random=False))
def test_order_and_merge_independence(spec, num_bins, rnd):
    g = torch.Generator().manual_seed(rnd.randint(0, 2**31))
    batches = []
    for n, exponent, signed in spec:
        x = torch.randn(n, generator=g) * 2.0**exponent
        batches.append(x if signed else x.clamp_min(0))  # non-negative, with exact zeros
    whole = _fed(batches, num_bins)
    shuffled = list(batches)
    rnd.shuffle(shuffled)
    cut = rnd.randint(0, len(shuffled))
    left, right = _fed(shuffled[:cut], num_bins), _fed(shuffled[cut:], num_bins)
    right.merge(left)
    _assert_same_state(right, whole)
    _assert_same_state(_fed(shuffled, num_bins), whole)
    total = sum(b.numel() for b in batches)
    assert int(whole.state_dict()["hist"].sum()) == total == whole.num_samples
    assert int(whole.state_dict()["zeros"]) == sum(int((b == 0).sum()) for b in batches)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=50))
def test_percentile_100_is_the_max_and_counts_add_up(values):
    cal = _fed([torch.tensor(values, dtype=torch.float32)])
    amax = max(abs(v) for v in values)
    assert float(cal.compute_amax("max")) == amax
    assert float(cal.compute_amax("percentile", percentile=100.0)) == amax
    assert int(cal.state_dict()["hist"].sum()) == len(values)
    edge = float(cal.compute_amax("percentile", percentile=50.0))
    assert 0 <= edge <= amax


def test_all_zero_data():
    cal = _fed([torch.zeros(10), -torch.zeros(3)])  # -0.0 is not a negative value
    for method in ("max", "percentile", "mse", "entropy"):
        lo, hi = cal.compute_range(method)
        assert float(lo) == 0.0 and float(hi) == 0.0, method
    assert int(cal.state_dict()["hist"][0]) == int(cal.state_dict()["zeros"]) == 13
    cal.collect(torch.tensor([-2.0, 1.0]))
    lo, hi = cal.compute_range("max")
    assert (float(lo), float(hi)) == (-2.0, 2.0)
    assert int(cal.state_dict()["hist"][0]) == 13 and int(cal.state_dict()["hist"].sum()) == 15


def test_tiny_values():
    tiny = torch.tensor([2.0**-149, 2.0**-140, 0.0])
    cal = _fed([tiny])
    assert float(cal.compute_amax("max")) == 2.0**-140
    assert float(cal.compute_amax("percentile", percentile=100.0)) == 2.0**-140
    assert float(cal.compute_range("max")[0]) == 0.0  # no negative value seen
    merged = _fed([torch.tensor([3.0e38])])
    merged.merge(cal)
    _assert_same_state(merged, _fed([tiny, torch.tensor([3.0e38])]))
    assert int(merged.state_dict()["hist"][0]) == 3


def test_negative_values_make_the_range_symmetric():
    cal = _fed([torch.tensor([0.5, 3.0])])
    assert [float(t) for t in cal.compute_range("max")] == [0.0, 3.0]
    cal.collect(torch.tensor([-0.25]))
    assert [float(t) for t in cal.compute_range("max")] == [-3.0, 3.0]
