"""Entropy (KL) calibration against a slow, readable reference of TensorRT's published algorithm.

The reference (`reference_threshold`) is the loop of Migacz, "8-bit Inference with TensorRT"
(GTC 2017), as NVIDIA's pytorch-quantization implements it, one candidate at a time:

    for i in num_quantized_bins .. nbins:              # candidate threshold: i bins
        P = hist[:i]; P[i-1] += sum(hist[i:])          # clipped outliers folded into the last bin
        Q = hist[:i] merged into num_quantized_bins groups (bin j -> group j * nq // i),
            each group's mass spread evenly over its bins where P is non-zero
        KL(P || Q) of the normalised P, Q              # inf where P has mass that Q lacks
    threshold = the i with the least KL (ties: the largest i), as the bin's upper EDGE i * width

Conventions compared (both sides use them): the threshold is the upper bin edge ``i`` (as
pytorch-quantization's ``calib_bin_edges[i]``; the slides' ``(i + 0.5) * width`` is half a bin
more); Q is spread over P's support (pytorch-quantization uses ``hist[:i] != 0``: the two differ
only when bin ``i - 1`` is empty but receives the outliers, where theirs rejects the candidate).

How quanta maps onto it: the reference runs on the histogram quanta holds (bins of width
``2^k``, 1024 to 2048 of them occupied), *minus the exact zeros* counted apart in its state:
every grid represents 0 exactly, and left in bin 0 they form a spike that only a one-bin group
reproduces, which made the search collapse to its first candidate (pytorch-quantization patches
the same spike with ``bins[0] = bins[1]``). ``num_quantized_bins`` is the number of grid levels
on ``|x|``: ``2^bits`` for an unsigned grid on data never negative, else ``2^(bits-1)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta.calib import HistogramCalibrator
from quanta.calib import histogram_ranges as hr


def reference_kl(hist: np.ndarray, i: int, nq: int) -> float:
    """KL(P || Q) for one candidate threshold ``i`` (bins), straight from the definition."""
    p = hist[:i].astype(np.float64)
    p[i - 1] += hist[i:].sum()  # the clipped outliers join the last kept bin
    group = np.arange(i) * nq // i  # bin j -> quantized bin j * nq // i
    group_mass = np.bincount(group, weights=hist[:i].astype(np.float64), minlength=nq)
    group_support = np.bincount(group, weights=(p > 0).astype(np.float64), minlength=nq)
    q = np.where(p > 0, group_mass[group] / np.maximum(group_support[group], 1), 0.0)  # expanded back
    if np.any((p > 0) & (q == 0)):  # P has mass that Q lacks (e.g. only outliers, hist[:i] empty)
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    kept = p > 0
    return float(np.sum(p[kept] * np.log(p[kept] / q[kept])))


def reference_divergences(hist: list[int], nq: int) -> tuple[list[int], list[float]]:
    """Every candidate ``nq .. n`` (``n`` = occupied bins; just ``n`` when ``n < nq``) and its KL."""
    n = max(j for j, c in enumerate(hist) if c > 0) + 1
    hist = np.asarray(hist[:n], dtype=np.int64)
    thresholds = list(range(min(nq, n), n + 1))
    return thresholds, [reference_kl(hist, i, nq) for i in thresholds]


def reference_threshold(hist: list[int], nq: int) -> int:
    thresholds, kls = reference_divergences(hist, nq)
    best = min(kls)
    return max(i for i, kl in zip(thresholds, kls) if kl == best)


def is_reference_choice(chosen: int, hist: list[int], nq: int) -> bool:
    """``chosen`` is the reference's threshold, or ties with it to rounding (the vectorised KL
    sums in another order: candidates within 1e-9 of the least KL are equally good)."""
    thresholds, kls = reference_divergences(hist, nq)
    best = min(kls)
    near = [i for i, kl in zip(thresholds, kls) if kl <= best + 1e-9 * max(abs(best), 1.0)]
    return chosen in near


def assert_same_choice(chosen: int, hist: list[int], nq: int) -> None:
    assert is_reference_choice(chosen, hist, nq), (chosen, reference_threshold(hist, nq))


# ---------------------------------------------------------------- histograms of every shape
def _shaped_hist(shape: str, n: int, seed: int, spike: int) -> list[int]:
    rng = np.random.default_rng(seed)
    size = 20 * n
    if shape == "gaussian":
        v = np.abs(rng.normal(0, n / 4, size))
    elif shape == "heavy_tail":  # Student t with 2 degrees of freedom: outliers far past the bulk
        v = np.abs(rng.standard_t(2, size)) * n / 20
    elif shape == "relu":  # a ReLU of a Gaussian: half exact zeros (bin 0), half a half-normal
        v = np.maximum(rng.normal(0, n / 4, size), 0)
    elif shape == "uniform":
        v = rng.uniform(0, n, size)
    else:  # "sparse": a few occupied bins with gaps (Q must spread only over P's support)
        v = rng.choice(rng.uniform(0, n, 12), size)
    hist = np.bincount(np.minimum(v, n - 1).astype(np.int64), minlength=n)
    hist[0] += spike
    return [int(c) for c in hist]


SHAPES = ["gaussian", "heavy_tail", "relu", "uniform", "sparse"]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SHAPES), st.integers(20, 260), st.sampled_from([4, 8, 16, 32]),
       st.integers(0, 2**31), st.sampled_from([0, 0, 50, 5000]))
def test_entropy_bins_is_the_reference_threshold(shape, n, nq, seed, spike):
    hist = _shaped_hist(shape, n, seed, spike)
    bits = int(math.log2(nq)) + 1  # signed: 2^(bits-1) = nq groups
    chosen = hr.entropy_bins(torch.tensor(hist), bits, False, None, 1)
    assert_same_choice(chosen, hist, nq)
    assert hr.entropy_bins(torch.tensor(hist), bits - 1, True, None, 1) == chosen  # unsigned: 2^bits


@pytest.mark.parametrize("shape", SHAPES)
def test_entropy_bins_on_int8_sized_histograms(shape):
    """The real sizes: 2048 bins, 128 groups (the reference runs on every candidate)."""
    hist = _shaped_hist(shape, 2048, 7, 0)
    assert_same_choice(hr.entropy_bins(torch.tensor(hist), 8, False, None, 1), hist, 128)


def _data(shape: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30_000, generator=g)
    if shape == "heavy_tail":
        return x / torch.rand(30_000, generator=g).clamp_min(1e-3).sqrt()  # a Student-t-like tail
    if shape == "relu":
        return x.clamp_min(0)
    if shape == "relu6_scaled":
        return (x * 3).clamp(0, 6)
    return x


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(["gaussian", "heavy_tail", "relu", "relu6_scaled"]), st.integers(0, 2**31),
       st.booleans(), st.sampled_from([4, 8]))
def test_calibrator_threshold_is_the_reference_on_its_own_histogram(shape, seed, unsigned, bits):
    """The threshold `HistogramCalibrator` returns is the reference's on the histogram it holds,
    minus its exact zeros, with the grid's levels per side."""
    x = _data(shape, seed)
    cal = HistogramCalibrator(num_bits=bits, unsigned=unsigned, method="entropy")
    for part in x.chunk(3):
        cal.collect(part)
    state = cal.state_dict()
    hist = [int(c) for c in state["hist"]]
    assert int(state["zeros"]) == int((x == 0).sum())
    hist[0] -= int(state["zeros"])
    levels_unsigned = unsigned and not bool((x < 0).any())
    nq = 2 ** (bits - 1 + int(levels_unsigned))
    amax, width, top = float(cal.compute_amax()), cal.bin_width, float(x.abs().max())
    # amax = min(i * width, max |x|): the candidate edges i that give it (two when max |x| is an edge)
    chosen = [i for i in range(1, len(hist) + 1) if min(i * width, top) == amax]
    assert chosen and any(is_reference_choice(i, hist, nq) for i in chosen), (chosen, reference_threshold(hist, nq))
