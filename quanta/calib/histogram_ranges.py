"""Choosing a clipping threshold from a histogram of ``|x|``: percentile, MSE, entropy (KL).

All functions work in *bin units*: bin ``i`` covers ``[i, i + 1)``, its centre is ``i + 0.5``,
and a threshold of ``t`` bins means ``amax = t * bin_width``. The histogram ``hist`` holds
integer counts (any dtype); only its occupied prefix (up to the last non-empty bin) matters.
A candidate "``i`` bins" keeps bins ``0 .. i - 1`` and clips at their upper edge ``i``.
"""

from __future__ import annotations

import torch

from quanta.core import QuantSpec, choose_qparams, fake_quantize

# Elements per [candidates, bins] matrix: bounds the memory of the vectorised searches.
_CHUNK_ELEMENTS = 1 << 20


def occupied_bins(hist: torch.Tensor) -> int:
    """Index of the last non-empty bin, plus one (``0`` for an empty histogram)."""
    nonzero = torch.nonzero(hist)
    return int(nonzero[-1, 0]) + 1 if nonzero.numel() else 0


def candidates(start_bin: int, stride: int, n: int) -> torch.Tensor:
    """Thresholds ``start_bin, start_bin + stride, ...`` up to ``n`` bins, ``n`` always included.

    ``start_bin`` is clamped to ``1 .. n``, so there is at least one candidate (``n``: no
    clipping at all).
    """
    start = min(max(start_bin, 1), n)
    found = torch.arange(start, n + 1, stride, dtype=torch.int64)
    if int(found[-1]) != n:
        found = torch.cat([found, torch.tensor([n], dtype=torch.int64)])
    return found


def percentile_bins(hist: torch.Tensor, percentile: float) -> int:
    """Upper edge (in bins) of the first bin where the CDF of ``hist`` reaches ``percentile``."""
    cdf = torch.cumsum(hist.to(torch.float64), 0)
    target = percentile / 100.0 * float(cdf[-1])
    index = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64))[0])
    return min(index, occupied_bins(hist) - 1) + 1


def mse_errors(
    hist: torch.Tensor, thresholds: torch.Tensor, num_bits: int, unsigned: bool
) -> torch.Tensor:
    """Expected squared error (bins², per value) of quantizing the bin centres at each threshold.

    Symmetric grid with ``scale = threshold / qmax`` (``qmax = 2^(bits-1) - 1`` signed,
    ``2^bits - 1`` unsigned) through quanta.core's `choose_qparams` / `fake_quantize`: one
    "channel" per candidate threshold, rows of a ``[candidates, bins]`` matrix.
    """
    n = hist.numel()
    counts = hist.to(torch.float64)
    centres = torch.arange(n, dtype=torch.float32) + 0.5
    spec = QuantSpec(bits=num_bits, signed=not unsigned, granularity="per_channel", axis=0)
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))
    errors = []
    for chunk in thresholds.to(torch.float32).split(rows):
        scale, zero_point = choose_qparams(torch.zeros_like(chunk), chunk, spec)
        grid = centres.expand(chunk.numel(), n)
        squared = (fake_quantize(grid, scale, zero_point, spec) - grid).to(torch.float64).square()
        errors.append(squared @ counts)
    return torch.cat(errors) / counts.sum()


def mse_bins(
    hist: torch.Tensor, amax_bins: float, num_bits: int, unsigned: bool, start_bin: int, stride: int
) -> float:
    """Threshold (bins, at most ``amax_bins``) with the least expected quantization error."""
    n = occupied_bins(hist)
    thresholds = candidates(start_bin, stride, n).to(torch.float64).clamp(max=amax_bins)
    errors = mse_errors(hist[:n], thresholds, num_bits, unsigned)
    return float(thresholds[int(torch.argmin(errors))])  # first minimum: the tightest range


def kl_divergences(hist: torch.Tensor, thresholds: torch.Tensor, num_quant_bins: int) -> torch.Tensor:
    """KL(P || Q) of TensorRT's entropy calibration, for each threshold ``i`` (in bins).

    - P: ``hist[:i]`` with the clipped tail mass ``sum(hist[i:])`` added to bin ``i - 1``;
    - Q: ``hist[:i]`` (without the tail) merged into ``num_quant_bins`` groups (bin ``j``
      joins group ``floor(j * num_quant_bins / i)``), each group's mass spread evenly over
      its bins where P is non-zero, and zero elsewhere;
    - both normalised; ``inf`` where P has mass that Q lacks.

    Q is constant over each group's support, so ``KL = sum_j p_j log p_j - sum_g P_g log q_g``
    with ``P_g`` the P-mass of group ``g``: both sums come from prefix sums over the bins, in
    ``O(candidates x groups)`` without looping over the bins of each candidate.
    """
    counts = hist.to(torch.float64)
    n = counts.numel()
    groups = min(num_quant_bins, n)  # with groups >= i every bin is its own group: same result
    zero = counts.new_zeros(1)
    mass_before = torch.cat([zero, torch.cumsum(counts, 0)])  # [j] = sum(counts[:j])
    xlogx_before = torch.cat([zero, torch.cumsum(torch.special.xlogy(counts, counts), 0)])
    filled_before = torch.cat([zero, torch.cumsum((counts > 0).to(torch.float64), 0)])
    total = mass_before[-1]
    g = torch.arange(groups, dtype=torch.int64)[None, :]
    out = []
    for chunk in thresholds.to(torch.int64).split(max(1, _CHUNK_ELEMENTS // groups)):
        i = chunk[:, None]
        last, tail = counts[chunk - 1][:, None], total - mass_before[i]
        p_last = last + tail  # P's last bin
        # sum_j p_j log p_j with p = counts / total (bins < i - 1) and p_last / total
        p_log_p = (xlogx_before[i - 1] + torch.special.xlogy(p_last, p_last)) / total - torch.log(total)
        lo, hi = (g * i + groups - 1) // groups, ((g + 1) * i + groups - 1) // groups  # group g: bins lo..hi-1
        mass = mass_before[hi] - mass_before[lo]
        support = filled_before[hi] - filled_before[lo]
        last_group = (i - 1) * groups // i
        support = support.scatter_add(1, last_group, ((last == 0) & (tail > 0)).to(torch.float64))
        p_mass = mass.scatter_add(1, last_group, tail) / total
        q = mass / support.clamp_min(1.0) / mass_before[i].clamp_min(1.0)  # Q on each bin of group g
        p_log_q = torch.where(p_mass > 0, p_mass * torch.log(q), 0.0).sum(1, keepdim=True)
        out.append((p_log_p - p_log_q)[:, 0])
    return torch.cat(out)


def entropy_bins(hist: torch.Tensor, num_bits: int, unsigned: bool, start_bin: int | None, stride: int) -> int:
    """TensorRT's entropy threshold (bins): the candidate with the least KL divergence.

    ``num_quant_bins = 2^(bits-1)`` signed (128 for int8), ``2^bits`` unsigned; candidates
    start at ``start_bin`` (default ``num_quant_bins``). Ties go to the largest threshold, as
    in NVIDIA's pytorch-quantization.
    """
    num_quant_bins = 2 ** (num_bits - 1 + int(unsigned))
    n = occupied_bins(hist)
    thresholds = candidates(num_quant_bins if start_bin is None else start_bin, stride, n)
    divergence = kl_divergences(hist[:n], thresholds, num_quant_bins)
    best = divergence.min()
    last = int(torch.nonzero(divergence == best)[-1, 0])
    return int(thresholds[last])
