"""Rounding modes, each exact in float32 for |v| < 2^23 (no `x + 0.5` tricks)."""

from __future__ import annotations

import torch

from .spec import Rounding


def round_values(v: torch.Tensor, mode: Rounding, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round ``v`` to integers (returned as floats) with ``mode``.

    ``stochastic`` rounds up with probability equal to the fractional part, so
    ``E[round(v)] = v``; pass a seeded ``torch.Generator`` for reproducible draws.
    """
    if mode is Rounding.HALF_EVEN:
        return torch.round(v)
    if mode is Rounding.FLOOR:
        return torch.floor(v)
    if mode is Rounding.HALF_AWAY:
        whole = torch.trunc(v)
        frac = v - whole  # exact: both share the exponent range of v
        return whole + torch.where(frac.abs() >= 0.5, torch.sign(v), torch.zeros_like(v))
    if mode is Rounding.STOCHASTIC:
        low = torch.floor(v)
        frac = v - low
        u = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device)
        return low + (u < frac).to(v.dtype)
    raise ValueError(f"unknown rounding mode {mode!r}")
