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
    """
    n = hist.numel()
    counts = hist.to(torch.float64)
    cumulative = torch.cumsum(counts, 0)
    total = cumulative[-1]
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))
    out = []
    for chunk in thresholds.to(torch.int64).split(rows):
        i = chunk[:, None]
        j = torch.arange(n, dtype=torch.int64)[None, :]
        inside = j < i
        kept = torch.where(inside, counts, 0.0)
        tail = (total - cumulative[chunk - 1])[:, None]
        p = kept + torch.where(j == i - 1, tail, 0.0)
        support = p > 0
        group = torch.where(inside, j * num_quant_bins // i, 0)
        zeros = torch.zeros(chunk.numel(), num_quant_bins, dtype=torch.float64)
        mass = zeros.scatter_add(1, group, kept)
        width = zeros.scatter_add(1, group, support.to(torch.float64))
        q = torch.where(support, mass.gather(1, group) / width.gather(1, group).clamp_min(1.0), 0.0)
        p = p / p.sum(1, keepdim=True)
        q = q / q.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        terms = torch.where(support, p * (torch.log(p) - torch.log(q)), 0.0)
        out.append(terms.sum(1))
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
