"""Shared helpers for the quanta.core tests: independent re-statements of the conventions
(parameter broadcasting, ranges) so that tests never check the code against itself."""

from __future__ import annotations

import contextlib
import warnings

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from quanta.core import Granularity, QuantSpec

# Every hypothesis test runs on a 2-core CI box: no deadline, a bounded number of examples.
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def no_deprecation():
    """torch.quantize_per_tensor / _per_channel warn that they are deprecated: hide it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def expand_param(p: torch.Tensor, x_shape: tuple[int, ...], spec: QuantSpec) -> torch.Tensor:
    """Broadcast a compact scale / zero point to ``x_shape`` *without* quanta's Layout."""
    g = spec.granularity
    ndim = len(x_shape)
    if g in (Granularity.PER_TENSOR, Granularity.GLOBAL):
        return p.reshape(()).expand(x_shape)
    if g is Granularity.PER_CHANNEL:
        shape = [1] * ndim
        shape[spec.axis % ndim] = x_shape[spec.axis % ndim]
        return p.reshape(shape).expand(x_shape)
    if g is Granularity.PER_TOKEN:
        return p.reshape(*x_shape[:-1], 1).expand(x_shape)
    ga = spec.group_axis % ndim
    return p.repeat_interleave(spec.group_size, dim=ga)


def ref_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granularity (min, max) by explicit slicing, for shape/axis checks."""
    g = spec.granularity
    if g in (Granularity.PER_TENSOR, Granularity.GLOBAL):
        return x.min(), x.max()
    if g is Granularity.PER_CHANNEL:
        ax = spec.axis % x.dim()
        mins = [x.select(ax, i).min() for i in range(x.shape[ax])]
        maxs = [x.select(ax, i).max() for i in range(x.shape[ax])]
        return torch.stack(mins), torch.stack(maxs)
    if g is Granularity.PER_TOKEN:
        return x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    ga = spec.group_axis % x.dim()
    chunks = x.split(spec.group_size, dim=ga)
    lo = torch.cat([c.amin(dim=ga, keepdim=True) for c in chunks], dim=ga)
    hi = torch.cat([c.amax(dim=ga, keepdim=True) for c in chunks], dim=ga)
    return lo, hi


DIMS = st.sampled_from([1, 2, 3, 4, 6, 7, 8])


@st.composite
def int_cases(draw, min_bits: int = 2, max_bits: int = 16):
    """(spec, x): an int spec of any granularity and a matching random tensor."""
    bits = draw(st.integers(min_bits, max_bits))
    signed = draw(st.booleans())
    symmetric = draw(st.booleans())
    narrow = draw(st.booleans())
    gran = draw(st.sampled_from(["per_tensor", "per_channel", "per_group", "per_token"]))
    shape = tuple(draw(st.lists(DIMS, min_size=1, max_size=3)))
    ndim = len(shape)
    kw: dict = {}
    if gran == "per_channel":
        kw["axis"] = draw(st.integers(-ndim, ndim - 1))
    elif gran == "per_group":
        ga = draw(st.integers(-ndim, ndim - 1))
        n = shape[ga]
        kw["group_axis"] = ga
        kw["group_size"] = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow,
                     granularity=gran, **kw)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mag = 10.0 ** draw(st.floats(-4, 4))
    offset = draw(st.sampled_from([0.0, 0.5, -0.5, 3.0, -3.0])) * mag
    x = torch.randn(shape, generator=gen) * mag + offset
    kind = draw(st.sampled_from(["randn", "randn", "some_zeros", "constant", "zeros"]))
    if kind == "some_zeros":
        x = torch.where(torch.rand(shape, generator=gen) < 0.3, torch.zeros(()), x)
    elif kind == "constant":
        x = torch.full(shape, offset if offset else mag)
    elif kind == "zeros":
        x = torch.zeros(shape)
    return spec, x
