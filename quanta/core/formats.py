"""Codecs of the number formats: value in scale units ``v = x / scale`` → code → level.

Each format defines
- ``encode(v, zp, spec, generator) -> (code, inside)``: the stored code (a float tensor holding
  integers for int/pow2, a float8/float16 tensor for float formats) and the mask of values that
  were *not* clipped (the straight-through estimator passes gradients only there);
- ``decode(code, zp, spec) -> level``: the dequantized value in scale units (``x_hat / scale``).

Quantize, dequantize and fake-quantize are all built from these two, so simulation and integer
execution share one definition of every format.
"""

from __future__ import annotations

import torch

from .rounding import round_values
from .spec import Format, QuantSpec

FP8_DTYPES = {Format.FP8_E4M3: torch.float8_e4m3fn, Format.FP8_E5M2: torch.float8_e5m2}
CAST_DTYPES = {Format.FP16: torch.float16, Format.BF16: torch.bfloat16}


def fp8_max(fmt: Format) -> float:
    return float(torch.finfo(FP8_DTYPES[fmt]).max)


def pow2_levels(spec: QuantSpec) -> int:
    """Number of non-zero magnitudes ``K`` of a power-of-two grid: ``2^0 .. 2^(1-K)``."""
    return 2 ** (spec.bits - 1) - 1 if spec.signed else 2**spec.bits - 1


def storage_dtype(spec: QuantSpec) -> torch.dtype:
    """The dtype `quantize` returns for ``spec``."""
    if spec.format in FP8_DTYPES:
        return FP8_DTYPES[spec.format]
    if spec.format in CAST_DTYPES:
        return CAST_DTYPES[spec.format]
    if spec.signed:
        return torch.int8 if spec.bits <= 8 else torch.int16
    return torch.uint8 if spec.bits <= 8 else torch.int32


def max_level(spec: QuantSpec) -> float:
    """Largest magnitude in scale units: what `choose_qparams` maps the range's amax to."""
    if spec.format is Format.INT:
        return float(spec.qmax)
    if spec.format in FP8_DTYPES:
        return fp8_max(spec.format)
    if spec.format is Format.POW2:
        return 1.0
    return 1.0  # plain casts carry no scale


def encode(
    v: torch.Tensor, zp: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = spec.format
    if fmt is Format.INT:
        qmin, qmax = spec.qmin, spec.qmax
        if spec.bits == 1 and spec.signed:  # binary: sign(v) in {-1, +1}, 0 -> +1
            code = torch.where(v >= 0, torch.ones_like(v), -torch.ones_like(v))
            return code, v.abs() <= 1
        # Same order of operations as PyTorch's kernels: round(v) + zp, then clamp.
        q = round_values(v, spec.rounding, generator) + zp
        inside = (q >= qmin) & (q <= qmax)
        return q.clamp(qmin, qmax), inside
    if fmt in FP8_DTYPES:
        m = fp8_max(fmt)
        return v.clamp(-m, m).to(FP8_DTYPES[fmt]), v.abs() <= m
    if fmt in CAST_DTYPES:
        dt = CAST_DTYPES[fmt]
        m = float(torch.finfo(dt).max)
        return v.clamp(-m, m).to(dt), v.abs() <= m
    # POW2: magnitude code m in 0..K, level 2^(m-K), m = 0 means zero; sign kept when signed.
    k = pow2_levels(spec)
    mag = v.abs() if spec.signed else v.clamp_min(0)
    m_raw = torch.round(torch.log2(mag)) + k  # log2(0) = -inf -> m_raw = -inf -> 0
    inside = m_raw <= k
    m = m_raw.clamp(0, k)
    code = torch.sign(v) * m if spec.signed else m
    return code, inside


def decode(code: torch.Tensor, zp: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    fmt = spec.format
    if fmt is Format.INT:
        return code.float() - zp
    if fmt in FP8_DTYPES or fmt in CAST_DTYPES:
        return code.float()
    k = pow2_levels(spec)
    c = code.float()
    m = c.abs()
    level = torch.where(m > 0, torch.exp2(m - k), torch.zeros_like(m))
    return torch.sign(c) * level if spec.signed else level
