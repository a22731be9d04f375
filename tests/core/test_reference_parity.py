"""Bit-identity (atol=0) with PyTorch's reference quantization ops.

quanta computes ``v = x * (1 / scale)`` with the reciprocal in float32, then
``clamp(round_half_even(v) + zero_point)``, exactly like ``torch.fake_quantize_per_*_affine``.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from quanta.core import QuantSpec, dequantize, fake_quantize, quantize, quantize_tensor

from .helpers import no_deprecation

SCALE = 0.0123  # not a power of two: x / s and x * (1 / s) differ on some ties

# (id, bits, signed, narrow) -> the fake ops' quant_min / quant_max come from QuantSpec.qmin/qmax
RANGES = [
    ("s8", 8, True, False), ("s8-narrow", 8, True, True), ("u8", 8, False, False),
    ("u8-narrow", 8, False, True), ("s4", 4, True, False), ("u4", 4, False, False),
    ("s2", 2, True, False), ("s16", 16, True, False), ("u16", 16, False, False),
]
RANGE_IDS = [r[0] for r in RANGES]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(kind: str, span: float, scale: float | torch.Tensor = SCALE) -> torch.Tensor:
    """Random inputs of one kind; ``span`` is the half-width of the grid in x units."""
    g = _gen(zlib.crc32(kind.encode()) % 1000)
    if kind == "1":
        return torch.randn(1, generator=g) * span
    if kind == "7":
        return torch.randn(7, generator=g) * span
    if kind == "33x7":
        return torch.randn(33, 7, generator=g) * span
    if kind == "transposed":
        return (torch.randn(7, 33, generator=g) * span).t()
    if kind == "strided":
        return (torch.randn(33, 66, generator=g) * span)[:, ::2]
    if kind == "large":
        return torch.randn(1_000_000, generator=g) * span
    if kind == "ties":  # v = k + 1/2 exactly in the real numbers, rounded once to float32
        k = torch.randint(-int(span / SCALE) - 2, int(span / SCALE) + 2, (200_000,), generator=g)
        return (k.float() + 0.5) * scale
    raise AssertionError(kind)


KINDS = ["1", "7", "33x7", "transposed", "strided", "large", "ties"]


def _spec(bits: int, signed: bool, narrow: bool, **kw) -> QuantSpec:
    return QuantSpec(bits=bits, signed=signed, symmetric=False, narrow_range=narrow, **kw)


def test_tie_inputs_distinguish_division_from_reciprocal():
    """The tie inputs really separate x / s from x * (1 / s): a true division would fail parity."""
    x = _inputs("ties", 2.0)
    s = torch.tensor(SCALE)
    ref = torch.fake_quantize_per_tensor_affine(x, SCALE, 0, -128, 127)
    by_division = torch.round(x / s).clamp(-128, 127) * s
    assert (by_division != ref).sum() > 1000
    v = x * (1.0 / s)
    assert (v == torch.floor(v) + 0.5).float().mean() > 0.3  # many are exact float32 ties


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,bits,signed,narrow", RANGES, ids=RANGE_IDS)
def test_fake_quantize_per_tensor_matches_torch(name, bits, signed, narrow, kind):
    spec = _spec(bits, signed, narrow)
    qmin, qmax = spec.qmin, spec.qmax
    zp = qmin + (qmax - qmin) // 3 if not signed else (qmax - qmin) // 7  # off-centre, odd
    span = (qmax - qmin) * SCALE * 0.6  # about a fifth of the values clip
    x = _inputs(kind, span)
    ours = fake_quantize(x, SCALE, zp, spec)
    ref = torch.fake_quantize_per_tensor_affine(x, SCALE, zp, qmin, qmax)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    # dequantize(quantize(x)) is the same function as fake_quantize
    torch.testing.assert_close(dequantize(quantize(x, SCALE, zp, spec), SCALE, zp, spec), ref, atol=0, rtol=0)


CHANNEL_CASES = [  # (id, shape, axis, transform)
    ("3d-axis0", (7, 33, 4), 0, None),
    ("3d-axis1", (7, 33, 4), 1, None),
    ("3d-axis2", (7, 33, 4), 2, None),
    ("3d-axis-1", (7, 33, 4), -1, None),
    ("1d", (33,), 0, None),
    ("transposed", (33, 7), 0, "t"),
    ("strided", (7, 66), 1, "stride"),
    ("large", (1000, 1000), 1, None),
]


def _channel_input(shape, axis, transform, seed=1):
    g = _gen(seed)
    x = torch.randn(shape, generator=g)
    if transform == "t":
        x = x.t()
    elif transform == "stride":
        x = x[:, ::2]
    ax = axis % x.dim()
    c = x.shape[ax]
    scale = torch.rand(c, generator=g) * 0.05 + 0.003
    return x, ax, scale


@pytest.mark.parametrize("case", CHANNEL_CASES, ids=[c[0] for c in CHANNEL_CASES])
@pytest.mark.parametrize("name,bits,signed,narrow", RANGES[:6], ids=RANGE_IDS[:6])
def test_fake_quantize_per_channel_matches_torch(name, bits, signed, narrow, case):
    _, shape, axis, transform = case
    x, ax, scale = _channel_input(shape, axis, transform)
    spec = _spec(bits, signed, narrow, granularity="per_channel", axis=axis)
    qmin, qmax = spec.qmin, spec.qmax
    zp = torch.randint(qmin, qmax + 1, scale.shape, generator=_gen(2), dtype=torch.int32)
    bshape = [1] * x.dim()
    bshape[ax] = -1
    x = x * (scale.view(bshape) * (qmax - qmin) * 0.4)  # some values clip in every channel
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, ax, qmin, qmax)
    torch.testing.assert_close(fake_quantize(x, scale, zp, spec), ref, atol=0, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fake_quantize_per_channel_ties_match_torch(axis):
    g = _gen(3)
    shape = [50, 60, 70]
    scale = torch.rand(shape[axis], generator=g) * 0.05 + 0.003
    bshape = [1, 1, 1]
    bshape[axis] = -1
    k = torch.randint(-100, 100, shape, generator=g).float() + 0.5
    x = k * scale.view(bshape)  # x / scale sits on a .5 tie (up to one float32 rounding)
    spec = QuantSpec(bits=8, granularity="per_channel", axis=axis)
    zp = torch.zeros(shape[axis], dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, -128, 127)
    torch.testing.assert_close(fake_quantize(x, scale, zp, spec), ref, atol=0, rtol=0)


# ----------------------------------------------------------------- int_repr of real quantized tensors
INT_REPR = [("qint8", torch.qint8, True), ("quint8", torch.quint8, False)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,dtype,signed", INT_REPR, ids=[r[0] for r in INT_REPR])
def test_quantize_per_tensor_int_repr_matches_torch(name, dtype, signed, kind):
    spec = QuantSpec(bits=8, signed=signed, symmetric=signed)
    x = _inputs(kind, 200 * SCALE)
    if not signed:
        x = x.abs()  # zero point 0: the unsigned grid starts at 0
    with no_deprecation():
        ref = torch.quantize_per_tensor(x, SCALE, 0, dtype).int_repr()
    ours = quantize(x, SCALE, 0, spec)
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


@pytest.mark.parametrize("case", CHANNEL_CASES, ids=[c[0] for c in CHANNEL_CASES])
@pytest.mark.parametrize("name,dtype,signed", INT_REPR, ids=[r[0] for r in INT_REPR])
def test_quantize_per_channel_int_repr_matches_torch(name, dtype, signed, case):
    _, shape, axis, transform = case
    x, ax, scale = _channel_input(shape, axis, transform, seed=4)
    bshape = [1] * x.dim()
    bshape[ax] = -1
    x = x * scale.view(bshape) * 150
    if not signed:
        x = x.abs()
    spec = QuantSpec(bits=8, signed=signed, symmetric=signed, granularity="per_channel", axis=axis)
    with no_deprecation():
        ref = torch.quantize_per_channel(x, scale.double(), torch.zeros(scale.shape, dtype=torch.long), ax, dtype)
    torch.testing.assert_close(quantize(x, scale, 0, spec), ref.int_repr(), atol=0, rtol=0)


@pytest.mark.parametrize("signed", [True, False], ids=["qint8-sym", "quint8-asym"])
def test_quanta_qparams_reproduce_torch_per_tensor(signed):
    """With the scale / zero point quanta chooses, torch's fake op gives quanta's values."""
    x = torch.randn(4096, generator=_gen(5)) * 3 + (0 if signed else 1)
    spec = QuantSpec(bits=8, signed=signed, symmetric=signed)
    qt = quantize_tensor(x, spec)
    ref = torch.fake_quantize_per_tensor_affine(x, float(qt.scale), int(qt.zero_point), spec.qmin, spec.qmax)
    torch.testing.assert_close(qt.dequantize(), ref, atol=0, rtol=0)


def _torch_quantize_model(x: torch.Tensor, inv: torch.Tensor, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """torch.quantize_per_* rounds fma(x, 1/s, zp) once (fbgemm), i.e. it adds zp *before* rounding."""
    fused = (x.double() * inv.double() + zp).float()  # product exact in float64: one rounding
    return torch.round(fused).clamp(qmin, qmax)


@pytest.mark.parametrize("kind", ["large", "ties"])
@pytest.mark.parametrize("name,dtype,signed,zp", [("qint8", torch.qint8, True, -5),
                                                 ("quint8", torch.quint8, False, 131)],
                         ids=["qint8-zp-5", "quint8-zp131"])
def test_int_repr_with_nonzero_zero_point_differs_only_on_ties(name, dtype, signed, zp, kind):
    """Documented divergence: torch.quantize_per_* rounds ``x/s + zp`` (fused), the fake ops and
    ONNX round ``x/s`` then add zp. quanta follows the fake ops; the two differ by one code only
    where ``x/s`` is within float32 rounding of a .5 tie, and agree everywhere when zp == 0."""
    spec = QuantSpec(bits=8, signed=signed, symmetric=False)
    x = _inputs(kind, 100 * SCALE)
    with no_deprecation():
        ref = torch.quantize_per_tensor(x, SCALE, zp, dtype).int_repr()
    inv = 1.0 / torch.tensor(SCALE)
    torch.testing.assert_close(ref.float(), _torch_quantize_model(x, inv, zp, spec.qmin, spec.qmax), atol=0, rtol=0)
    ours = quantize(x, SCALE, zp, spec)
    diff = ours.int() - ref.int()
    assert int(diff.abs().max()) <= 1
    v = (x * inv).double()
    near_tie = ((v - v.floor()) - 0.5).abs() <= 2.0**-14
    assert bool((near_tie | (diff == 0)).all())
    fq = torch.fake_quantize_per_tensor_affine(x, SCALE, zp, spec.qmin, spec.qmax)
    torch.testing.assert_close(dequantize(ours, SCALE, zp, spec), fq, atol=0, rtol=0)
