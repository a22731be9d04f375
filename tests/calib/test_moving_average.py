"""MovingAverageCalibrator: mean of per-batch extremes (exact merge) and EMA (torch's observer)."""

from __future__ import annotations

import pytest
import torch
from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

from quanta.calib import MovingAverageCalibrator


def _batches(shape, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i % 3) - i for i in range(n)]


@pytest.mark.parametrize("axis", [None, 1, -3])
def test_mean_mode_is_mean_of_batch_extremes(axis):
    batches = _batches((4, 3, 5))
    cal = MovingAverageCalibrator(axis=axis)
    for b in batches:
        cal.collect(b)
    dims = None if axis is None else tuple(d for d in range(3) if d != axis % 3)
    mins = torch.stack([b.amin(dim=dims) if dims else b.min() for b in batches])
    maxs = torch.stack([b.amax(dim=dims) if dims else b.max() for b in batches])
    lo, hi = cal.compute_range()
    torch.testing.assert_close(lo, mins.double().mean(0).float())
    torch.testing.assert_close(hi, maxs.double().mean(0).float())
    assert lo.dtype == torch.float32 and lo.shape == (() if axis is None else (batches[0].shape[axis],))


@pytest.mark.parametrize("axis", [None, 0])
def test_mean_mode_merge_is_exact(axis):
    batches = _batches((6, 7), n=7, seed=1)
    whole = MovingAverageCalibrator(axis=axis)
    for b in batches:
        whole.collect(b)
    a, b = MovingAverageCalibrator(axis=axis), MovingAverageCalibrator(axis=axis)
    for x in batches[4:]:
        a.collect(x)
    for x in batches[:4]:
        b.collect(x)
    a.merge(b)
    for key in ("min_sum", "max_sum", "num_batches", "num_samples"):
        assert torch.equal(a.state_dict()[key], whole.state_dict()[key]), key
    for x, y in zip(a.compute_range(), whole.compute_range()):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("momentum", [0.01, 0.3, 1.0])
def test_ema_matches_torch_observer(momentum):
    batches = _batches((8, 16), n=6, seed=2)
    cal = MovingAverageCalibrator(momentum=momentum)
    obs = MovingAverageMinMaxObserver(averaging_constant=momentum)
    for b in batches:
        cal.collect(b)
        obs(b)
    lo, hi = cal.compute_range()
    torch.testing.assert_close(lo, obs.min_val, atol=0, rtol=0)
    torch.testing.assert_close(hi, obs.max_val, atol=0, rtol=0)


def test_ema_per_channel_matches_torch_observer():
    batches = _batches((4, 6, 3), n=5, seed=4)
    cal = MovingAverageCalibrator(momentum=0.2, axis=1)
    obs = MovingAveragePerChannelMinMaxObserver(averaging_constant=0.2, ch_axis=1)
    for b in batches:
        cal.collect(b)
        obs(b)
    lo, hi = cal.compute_range()
    torch.testing.assert_close(lo, obs.min_val, atol=0, rtol=0)
    torch.testing.assert_close(hi, obs.max_val, atol=0, rtol=0)


def test_ema_merge_is_batch_weighted_mean():
    a, b = MovingAverageCalibrator(momentum=0.5), MovingAverageCalibrator(momentum=0.5)
    for x in ([0.0, 2.0], [-2.0, 4.0], [-4.0, 4.0]):
        a.collect(torch.tensor(x))
    b.collect(torch.tensor([-10.0, 10.0]))
    (a_lo, a_hi), (b_lo, b_hi) = a.compute_range(), b.compute_range()
    a.merge(b)
    lo, hi = a.compute_range()
    assert lo == (3 * a_lo + b_lo) / 4 and hi == (3 * a_hi + b_hi) / 4
    assert a.num_batches == 4


def test_ema_merge_into_empty_copies():
    a, b = MovingAverageCalibrator(momentum=0.1, axis=0), MovingAverageCalibrator(momentum=0.1, axis=0)
    b.collect(torch.randn(3, 2))
    a.merge(b)
    for x, y in zip(a.compute_range(), b.compute_range()):
        assert torch.equal(x, y)
