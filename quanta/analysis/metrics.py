"""Error metrics between a reference tensor and another, accumulated over batches.

``sqnr_db = 10·log10(Σ ref² / Σ (other − ref)²)`` (``inf`` when equal), ``cosine`` of the two
flattened tensors, ``rel_error = sqrt(Σ (other − ref)² / Σ ref²)`` (relative L2 error) and
``max_abs_error = max |other − ref|``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ErrorStats:
    """Running sums of one comparison (add one pair of tensors per batch)."""

    ref_power: float = 0.0
    other_power: float = 0.0
    noise_power: float = 0.0
    dot: float = 0.0
    max_abs: float = 0.0
    count: int = 0

    def add(self, ref: torch.Tensor, other: torch.Tensor) -> None:
        if ref.shape != other.shape:
            raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(other.shape)}")
        r, o = ref.double().flatten(), other.double().flatten()
        d = o - r
        self.ref_power += float(r @ r)
        self.other_power += float(o @ o)
        self.noise_power += float(d @ d)
        self.dot += float(r @ o)
        self.max_abs = max(self.max_abs, float(d.abs().max()) if d.numel() else 0.0)
        self.count += r.numel()

    @property
    def sqnr_db(self) -> float:
        if self.noise_power == 0.0:
            return math.inf
        if self.ref_power == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.ref_power / self.noise_power)

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.ref_power * self.other_power)
        if denom == 0.0:
            return 1.0 if self.noise_power == 0.0 else 0.0
        return self.dot / denom

    @property
    def rel_error(self) -> float:
        if self.ref_power == 0.0:
            return 0.0 if self.noise_power == 0.0 else math.inf
        return math.sqrt(self.noise_power / self.ref_power)


def sqnr_db(ref: torch.Tensor, other: torch.Tensor) -> float:
    """SQNR in dB of ``other`` against ``ref`` (see the module docstring)."""
    stats = ErrorStats()
    stats.add(ref, other)
    return stats.sqnr_db
