"""Ranges from the histogram: percentile, MSE and entropy against references and on data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta.calib import HistogramCalibrator
from quanta.calib import histogram_ranges as hr
from quanta.core import QuantSpec, choose_qparams, fake_quantize


def _data_mse(x: torch.Tensor, amax: torch.Tensor, bits: int = 8) -> float:
    spec = QuantSpec(bits=bits)
    scale, zp = choose_qparams(-amax, amax, spec)
    return float((fake_quantize(x, scale, zp, spec) - x).double().square().mean())


@pytest.fixture(scope="module")
def gaussian_with_outliers() -> tuple[torch.Tensor, HistogramCalibrator]:
    """N(0, 1), 2M values, with two planted outliers at +50 and -50, in 4 batches."""
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
    x[123] = 50.0
    x[1_500_000] = -50.0
    cal = HistogramCalibrator()
    for part in x.chunk(4):
        cal.collect(part)
    return x, cal


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_clipping_methods_beat_max_on_gaussian_with_outliers(gaussian_with_outliers, method):
    x, cal = gaussian_with_outliers
    max_amax = cal.compute_amax("max")
    assert float(max_amax) == 50.0
    lo, hi = cal.compute_range(method)
    assert float(lo) == -float(hi)
    assert 2.5 < float(hi) < 10.0
    assert _data_mse(x, hi) < 0.5 * _data_mse(x, max_amax)


def test_percentile_is_the_bin_edge_of_the_exact_quantile():
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(1)) * 3
    cal = HistogramCalibrator(num_bins=512)
    cal.collect(x)
    mag = x.abs().double()
    for p in (10.0, 50.0, 99.0, 99.99, 100.0):
        v = float(torch.kthvalue(mag, math.ceil(p / 100 * x.numel())).values)
        w = cal.bin_width
        expected = min((math.floor(v / w) + 1) * w, float(mag.max()))
        assert float(cal.compute_amax("percentile", percentile=p)) == pytest.approx(expected, rel=1e-7), p


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=2, max_size=40), st.floats(1.0, 100.0))
def test_percentile_bins_is_the_first_bin_reaching_the_cdf(counts, p):
    hist = torch.tensor(counts, dtype=torch.int64)
    if int(hist.sum()) == 0:
        hist[0] = 1
    edge = hr.percentile_bins(hist, p)
    cdf = hist.cumsum(0).double() / hist.sum()
    assert float(cdf[edge - 1]) >= p / 100 - 1e-12
    assert edge == 1 or float(cdf[edge - 2]) < p / 100 + 1e-12
    assert 1 <= edge <= hr.occupied_bins(hist)


def _reference_mse(hist: np.ndarray, threshold: float, bits: int, unsigned: bool) -> float:
    """One candidate at a time, per-tensor fake quantization of the bin centres."""
    spec = QuantSpec(bits=bits, signed=not unsigned)
    centres = torch.arange(len(hist), dtype=torch.float32) + 0.5
    scale, zp = choose_qparams(0.0, threshold, spec)
    err = (fake_quantize(centres, scale, zp, spec) - centres).double().square().numpy()
    return float((err * hist).sum() / hist.sum())


@pytest.mark.parametrize("bits,unsigned", [(4, False), (3, True), (8, False)])
def test_mse_matches_one_candidate_at_a_time(bits, unsigned):
    rng = np.random.default_rng(bits)
    hist = np.bincount(np.minimum(np.abs(rng.standard_t(3, 20_000)) * 20, 299).astype(np.int64), minlength=300)
    thresholds = hr.candidates(5, 3, len(hist)).double()
    errors = hr.mse_errors(torch.from_numpy(hist), thresholds, bits, unsigned)
    expected = [_reference_mse(hist, float(t), bits, unsigned) for t in thresholds]
    np.testing.assert_allclose(errors.numpy(), expected, rtol=1e-12)
    best = hr.mse_bins(torch.from_numpy(hist), 1e9, bits, unsigned, start_bin=5, stride=3)
    assert best == float(thresholds[int(np.argmin(expected))])


def test_unsigned_mse_uses_the_twice_as_fine_grid():
    hist = torch.randint(0, 100, (200,), generator=torch.Generator().manual_seed(2))
    t = hr.candidates(1, 1, 200).double()
    assert torch.equal(hr.mse_errors(hist, t, 8, True), hr.mse_errors(hist, t, 9, False))


def _reference_kl(hist: np.ndarray, i: int, nq: int) -> float:
    """TensorRT's loop for one threshold i (bins), written directly."""
    p = hist[:i].astype(np.float64).copy()
    p[i - 1] += hist[i:].sum()
    q = np.zeros(i)
    groups = np.array([j * nq // i for j in range(i)])
    for g in range(nq):
        members = groups == g
        support = members & (p > 0)
        if support.any():
            q[support] = hist[:i][members].sum() / support.sum()
    p, q = p / p.sum(), q / max(q.sum(), 1e-300)
    with np.errstate(divide="ignore"):
        return float(sum(pj * math.log(pj / qj) if qj > 0 else math.inf for pj, qj in zip(p, q) if pj > 0))


@pytest.mark.parametrize("nq,zeros", [(8, None), (16, (40, 60)), (4, (40, 60)), (4, (0, 30)), (256, None)])
def test_kl_divergences_match_the_loop(nq, zeros):
    rng = np.random.default_rng(nq)
    hist = np.bincount(np.minimum(np.abs(rng.normal(0, 30, 5000)), 149).astype(np.int64), minlength=150)
    hist[-1] = 3  # a clipped tail beyond the typical thresholds
    if zeros:
        hist[slice(*zeros)] = 0  # empty bins: Q spreads only over P's support; inf where P has mass Q lacks
    thresholds = hr.candidates(nq, 1, len(hist))
    got = hr.kl_divergences(torch.from_numpy(hist), thresholds, nq).numpy()
    expected = np.array([_reference_kl(hist, int(i), nq) for i in thresholds])
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-9, atol=1e-12)
    if zeros:
        assert np.isinf(expected).any()
    last_best = int(np.flatnonzero(expected == expected.min())[-1])
    assert hr.entropy_bins(torch.from_numpy(hist), int(math.log2(nq)) + 1, False, None, 1) == int(thresholds[last_best])


def test_candidates_always_include_the_end():
    assert hr.candidates(128, 100, 1000).tolist() == [128, 228, 328, 428, 528, 628, 728, 828, 928, 1000]
    assert hr.candidates(500, 1, 10).tolist() == [10]
    assert hr.candidates(1, 4, 9).tolist() == [1, 5, 9]


def test_method_defaults_and_overrides():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(3))
    cal = HistogramCalibrator(method="percentile", percentile=90.0)
    cal.collect(x)
    assert torch.equal(cal.compute_amax(), cal.compute_amax("percentile", percentile=90.0))
    assert float(cal.compute_amax()) < float(cal.compute_amax(percentile=99.9)) < float(cal.compute_amax("max"))
    coarse = cal.compute_amax("mse", stride=64, start_bin=64)
    assert (float(coarse) / cal.bin_width - 64) % 64 == 0 or float(coarse) == float(cal.compute_amax("max"))


def test_relu_data_with_unsigned_grid():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(4)).clamp_min(0)
    cal = HistogramCalibrator(unsigned=True, method="mse")
    cal.collect(x)
    lo, hi = cal.compute_range()
    assert float(lo) == 0.0 and 0 < float(hi) <= float(x.max())


def _relu_calibrator(zeros: int, unsigned: bool = True) -> HistogramCalibrator:
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(200_000, generator=g).abs(), torch.zeros(zeros)])
    cal = HistogramCalibrator(unsigned=unsigned)
    cal.collect(x)
    return cal


@pytest.mark.parametrize("unsigned", [True, False])
def test_exact_zeros_do_not_move_the_entropy_threshold(unsigned):
    # A ReLU's clamped half lands in bin 0 as a spike that TensorRT's merge can only match with a
    # one-bin group, i.e. at the first candidate: the search collapsed to 256 (128) bins. Every
    # grid holds 0 exactly, so the zeros carry no evidence: the threshold must not depend on them.
    without = _relu_calibrator(0, unsigned)
    for zeros in (1_000, 200_000, 2_000_000):
        cal = _relu_calibrator(zeros, unsigned)
        assert cal.bin_width == without.bin_width and int(cal.state_dict()["zeros"]) == zeros
        assert torch.equal(cal.compute_amax("entropy"), without.compute_amax("entropy")), zeros
    amax = float(without.compute_amax("entropy"))
    assert 2.5 < amax < float(without.compute_amax("max")), amax  # N(0,1) magnitudes: clips only the far tail


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_unsigned_grid_over_signed_data_has_half_the_levels_per_side(method):
    # An affine uint8 grid stretched over (-amax, amax) puts 128 levels on each side, like int8:
    # the error models must not assume 256 levels on |x| once a negative value was seen.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(100_000, generator=g) * torch.rand(100_000, generator=g).pow(2) * 4  # heavy-ish tail
    affine, signed, relu = HistogramCalibrator(unsigned=True), HistogramCalibrator(), HistogramCalibrator(unsigned=True)
    affine.collect(x)
    signed.collect(x)
    relu.collect(x.abs())
    assert torch.equal(affine.compute_amax(method), signed.compute_amax(method))
    assert float(relu.compute_amax(method)) > float(signed.compute_amax(method))  # twice the levels: clip less
