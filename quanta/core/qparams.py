"""Ranges → quantization parameters: ``choose_qparams`` and the range reductions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .formats import max_level
from .granularity import check_float, reduce_aminmax
from .spec import Format, Granularity, QuantSpec

_TINY = torch.finfo(torch.float32).tiny


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """Raise naming how many NaN/Inf values ``x`` holds and where the first one is."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(bad.sum()) - n_nan
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{what} contains {n_nan} NaN and {n_inf} Inf value(s) out of {x.numel()} "
            f"(first at index {first})"
        )


def compute_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of ``x`` per the granularity of ``spec``, in the compact shape."""
    check_float(x)
    if x.numel() == 0:
        raise ValueError("cannot compute a range of an empty tensor")
    check_finite(x)
    return reduce_aminmax(x, spec)


def global_range(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(min, max)`` over a set of tensors (``global`` granularity)."""
    if len(tensors) == 0:
        raise ValueError("global_range needs at least one tensor")
    spec = QuantSpec(granularity=Granularity.GLOBAL)
    ranges = [compute_range(t, spec) for t in tensors]
    return torch.stack([r[0] for r in ranges]).min(), torch.stack([r[1] for r in ranges]).max()


def choose_qparams(
    min_val: torch.Tensor | float, max_val: torch.Tensor | float, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) that cover ``[min_val, max_val]``.

    - symmetric: ``scale = amax / max_level`` with ``amax = max(|min|, |max|)``, zero point 0
      (int: ``max_level = qmax``, e.g. 127; fp8: the format's max; pow2: 1);
    - asymmetric (int only): the range is widened to include 0, then
      ``scale = (max - min) / (qmax - qmin)``, ``zero_point = qmin - round(min / scale)``
      clamped to ``[qmin, qmax]``, so 0.0 is exactly representable;
    - a zero-width range (all zeros) gets ``scale = 1`` instead of dividing by zero; scales are
      never below the smallest normal float32.
    """
    lo = torch.as_tensor(min_val, dtype=torch.float32).detach()
    hi = torch.as_tensor(max_val, dtype=torch.float32).detach()
    if lo.shape != hi.shape:
        raise ValueError(f"min_val shape {tuple(lo.shape)} != max_val shape {tuple(hi.shape)}")
    check_finite(lo, "min_val")
    check_finite(hi, "max_val")
    if bool((lo > hi).any()):
        raise ValueError("min_val must be <= max_val everywhere")
    if not spec.has_scale:
        return torch.ones_like(lo), torch.zeros(lo.shape, dtype=torch.int32, device=lo.device)
    if spec.symmetric or spec.format is not Format.INT:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = _safe_scale(amax / max_level(spec), amax)
        return scale, torch.zeros(lo.shape, dtype=torch.int32, device=lo.device)
    lo = lo.clamp_max(0.0)
    hi = hi.clamp_min(0.0)
    qmin, qmax = spec.qmin, spec.qmax
    width = hi - lo
    steps = float(qmax - qmin)
    # A range wider than float32's max overflows `hi - lo`: divide each end first there.
    scale = _safe_scale(torch.where(torch.isinf(width), hi / steps - lo / steps, width / steps), width)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zp.to(torch.int32)


def _safe_scale(scale: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    return torch.where(width > 0, scale.clamp_min(_TINY), torch.ones_like(scale))
