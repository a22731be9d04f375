"""Tier 1: ``quanta::int8_conv`` — the oneDNN implementation against the exact reference.

- Integer accumulation is exact: with unit scales and no bias the float output *is* the
  accumulator, and oneDNN equals the reference with ``atol=0`` (including the extreme codes
  255 × ±127 that would saturate a non-VNNI int16 pair sum).
- Float outputs: oneDNN rescales in float32; the bound is ``FLOAT_ULPS`` float32 epsilons of
  ``|acc · x_scale · w_scale| + |bias|`` per element (measured: 1.8 epsilons).
- uint8 outputs: equal, except by one code where ``y / out_scale`` lies within float32 rounding
  of a .5 tie (measured: 8 of 3.6 million codes, 2e-6; asserted below ``TIE_FRACTION``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quanta.core import quantize
from quanta.kernels.conv import ONEDNN_SATURATION, UINT8_SPEC, accumulate, int8_conv, prepack

FLOAT_ULPS = 4.0
EPS = torch.finfo(torch.float32).eps
TIE_FRACTION = 1e-4
# (full-range weights; without VNNI oneDNN runs only 7-bit ones: tests/kernels/test_u8s8_seven_bit.py)
HAS_ONEDNN = "onednn" in int8_conv.available_impls() and ONEDNN_SATURATION.exact()
needs_onednn = pytest.mark.skipif(not HAS_ONEDNN, reason=f"oneDNN int8 conv: {int8_conv.why_not_available('onednn')}"
                                  f" / {ONEDNN_SATURATION.reason()}")

# name: (dims, batch, in_ch, out_ch, size, kernel, stride, padding, dilation, groups)
CASES = {
    "2d-b1-c7-s33-stride2-pad1": (2, 1, 7, 6, 33, 3, 2, 1, 1, 1),
    "2d-dilation2-pad2": (2, 2, 7, 5, 33, 3, 1, 2, 2, 1),
    "2d-groups2": (2, 2, 8, 6, 17, 3, 1, 1, 1, 2),
    "2d-depthwise": (2, 2, 16, 16, 15, 3, 1, 1, 1, 16),
    "2d-depthwise-stride2": (2, 1, 7, 7, 33, 5, 2, 2, 1, 7),
    "2d-1x1": (2, 3, 7, 9, 11, 1, 1, 0, 1, 1),
    "1d-c7-l33-stride2": (1, 2, 7, 5, 33, 3, 2, 1, 1, 1),
    "1d-dilation-groups": (1, 1, 8, 4, 33, 3, 1, 2, 2, 2),
    "3d-c7-stride2": (3, 2, 7, 5, 9, 3, 2, 1, 1, 1),
    "3d-depthwise": (3, 1, 6, 6, 7, 3, 1, 1, 1, 6),
}


def _make(case, gen, act="u8", bias=True, contiguous=True):
    d, n, c, o, s, k, st, p, dl, g = case
    if act == "u8":
        x = torch.randint(0, 256, (n, c) + (s,) * d, dtype=torch.uint8, generator=gen)
        zp = int(torch.randint(0, 256, (), generator=gen))
    else:
        x = torch.randint(-128, 128, (n, c) + (s,) * d, dtype=torch.int8, generator=gen)
        zp = 0
    if not contiguous:  # a non-contiguous view: every other channel of a wider tensor, transposed back
        wide = torch.cat([x, x], dim=1)
        x = wide.transpose(0, 1)[::2].transpose(0, 1)
        assert not x.is_contiguous()
    w = torch.randint(-127, 128, (o, c // g) + (k,) * d, dtype=torch.int8, generator=gen)
    ws = torch.rand(o, generator=gen) * 0.01 + 1e-3
    b = torch.randn(o, generator=gen) if bias else None
    return x, 0.02, zp, w, ws, b, [st] * d, [p] * d, [dl] * d, g


def _float_bound(args):
    x, xs, zp, w, ws, b, st, p, dl, g = args
    acc = accumulate(x, zp, w, st, p, dl, g)
    bshape = (1, -1) + (1,) * (x.dim() - 2)
    mag = acc.abs() * (xs * ws.double()).view(bshape)
    if b is not None:
        mag = mag + b.double().abs().view(bshape)
    return FLOAT_ULPS * EPS * mag + 1e-30


@needs_onednn
@pytest.mark.parametrize("post_op", ["none", "relu", "relu6"])
@pytest.mark.parametrize("act", ["u8", "s8"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_float_output_matches_reference(case, act, post_op):
    gen = torch.Generator().manual_seed(1)
    args = _make(case, gen, act=act, bias=post_op != "relu6")
    full = (*args, post_op, None, 0)
    packed = prepack(args[3], args[4], args[1], args[2] + (128 if act == "s8" else 0), *args[6:10])
    assert int8_conv.choose(*full, packed) in ("native", "onednn")  # (native where its guard accepts)
    ref = int8_conv(*full, None, impl="reference")
    fast = int8_conv(*full, packed, impl="onednn")
    assert fast.dtype == ref.dtype == torch.float32 and fast.shape == ref.shape
    err = (fast.double() - ref.double()).abs()
    assert bool((err <= _float_bound(args)).all()), f"max error {err.max().item():.3g}"
    unpacked = int8_conv(*full, None, impl="onednn")  # prepacking per call gives the same numbers
    assert torch.equal(unpacked, fast)


@needs_onednn
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_uint8_output_matches_reference(case, contiguous):
    gen = torch.Generator().manual_seed(2)
    args = _make(case, gen, contiguous=contiguous)
    full = (*args, "relu", 0.05, 3)
    ref = int8_conv(*full, None, impl="reference")
    fast = int8_conv(*full, prepack(args[3], args[4], args[1], args[2], *args[6:10]), impl="onednn")
    assert fast.dtype == ref.dtype == torch.uint8 and fast.shape == ref.shape
    diff = (fast.int() - ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= TIE_FRACTION * 10


@needs_onednn
def test_uint8_output_differs_only_near_ties():
    """Many codes at several output scales: mismatches are rare, one code, and at near-ties."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (4, 32, 24, 24), dtype=torch.uint8, generator=gen)
    w = torch.randint(-127, 128, (32, 32, 3, 3), dtype=torch.int8, generator=gen)
    ws = torch.rand(32, generator=gen) * 0.01 + 1e-3
    b = torch.randn(32, generator=gen)
    xs, zp, conv = 0.013, 77, ([1, 1], [1, 1], [1, 1], 1)
    packed = prepack(w, ws, xs, zp, *conv)
    acc = accumulate(x, zp, w, *conv)
    y64 = acc * (xs * ws.double()).view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
    total = mismatched = 0
    for out_scale, out_zp in ((0.37, 3), (0.11, 128), (0.9, 0), (0.05, 200)):
        args = (x, xs, zp, w, ws, b, *conv, "none", out_scale, out_zp)
        ref, fast = int8_conv(*args, None, impl="reference"), int8_conv(*args, packed, impl="onednn")
        diff = (fast.int() - ref.int()).abs()
        assert int(diff.max()) <= 1
        v = (y64 / out_scale)[diff > 0]
        dist_to_tie = ((v - v.floor()) - 0.5).abs()
        assert bool((dist_to_tie <= 1e-3).all()), dist_to_tie.max()
        total += diff.numel()
        mismatched += int((diff > 0).sum())
    assert mismatched / total <= TIE_FRACTION


@needs_onednn
@pytest.mark.parametrize("in_ch", [32, 512], ids=["K288-extreme", "K4608-random"])
def test_integer_accumulation_is_exact(in_ch):
    """Unit scales, no bias: the float output is the int32 accumulator itself (|acc| < 2^24)."""
    gen = torch.Generator().manual_seed(4)
    if in_ch == 32:  # the largest products: 255 · 127 everywhere (saturates int16 pair sums)
        x = torch.full((2, in_ch, 9, 9), 255, dtype=torch.uint8)
        w = torch.where(torch.rand(8, in_ch, 3, 3, generator=gen) < 0.5, 127, -127).to(torch.int8)
        w[0] = 127
    else:
        x = torch.randint(0, 256, (1, in_ch, 6, 6), dtype=torch.uint8, generator=gen)
        w = torch.randint(-127, 128, (8, in_ch, 3, 3), dtype=torch.int8, generator=gen)
    args = (x, 1.0, 0, w, torch.ones(8), None, [1, 1], [1, 1], [1, 1], 1, "none", None, 0)
    acc = accumulate(x, 0, w, [1, 1], [1, 1], [1, 1], 1)
    assert float(acc.abs().max()) < 2**24
    fast = int8_conv(*args, None, impl="onednn")
    assert torch.equal(fast.double(), acc)
    assert torch.equal(int8_conv(*args, None, impl="reference").double(), acc)


def test_reference_pads_with_the_zero_point():
    """Zero padding means the real value 0.0, i.e. the code ``zp``: an all-``zp`` input gives bias."""
    x = torch.full((1, 3, 5, 5), 200, dtype=torch.uint8)
    w = torch.randint(-127, 128, (4, 3, 3, 3), dtype=torch.int8)
    b = torch.randn(4)
    args = (x, 0.1, 200, w, torch.ones(4), b, [1, 1], [1, 1], [1, 1], 1, "none", None, 0)
    for impl in int8_conv.available_impls():
        if impl != "reference" and int8_conv._by_name[impl].guard(*args, None) is not None:
            continue  # (native: 3 input channels)
        y = int8_conv(*args, None, impl=impl)
        assert torch.equal(y, b.view(1, 4, 1, 1).expand(1, 4, 5, 5)), impl


def test_reference_matches_float_convolution_of_dequantized_values():
    gen = torch.Generator().manual_seed(5)
    x, xs, zp, w, ws, b, st, p, dl, g = _make(CASES["2d-groups2"], gen)
    ref = int8_conv(x, xs, zp, w, ws, b, st, p, dl, g, "relu", None, 0, None, impl="reference")
    xf = (x.double() - zp) * xs
    wf = w.double() * ws.double().view(-1, 1, 1, 1)
    expect = F.conv2d(xf, wf, b.double(), st, p, dl, g).clamp_min(0)
    torch.testing.assert_close(ref.double(), expect, atol=1e-5, rtol=1e-6)
    codes = int8_conv(x, xs, zp, w, ws, b, st, p, dl, g, "relu", None, 0, None, impl="reference")
    assert torch.equal(int8_conv(x, xs, zp, w, ws, b, st, p, dl, g, "relu", 0.07, 5, None, impl="reference"),
                       quantize(codes, 0.07, 5, UINT8_SPEC))


# ---------------------------------------------------------------------------- structure
def _small_args(**over):
    gen = torch.Generator().manual_seed(6)
    x, xs, zp, w, ws, b, st, p, dl, g = _make(CASES["2d-1x1"], gen)
    a = dict(x=x, xs=xs, zp=zp, w=w, ws=ws, b=b, st=st, p=p, dl=dl, g=g, post="none", os=None, ozp=0, packed=None)
    a.update(over)
    return tuple(a.values())


def test_choose_structure():
    assert int8_conv.available_impls()[-1] == "reference"
    if HAS_ONEDNN:
        assert int8_conv.choose(*_small_args()) == "onednn"
        assert int8_conv.choose(*_small_args(packed=torch.zeros(3))) == "reference"  # not an mkldnn tensor
        long = _small_args(x=torch.zeros(1, 8192, 3, 3, dtype=torch.uint8),
                           w=torch.zeros(2, 8192, 3, 3, dtype=torch.int8), ws=torch.ones(2), b=None, p=[0, 0])
        assert int8_conv.choose(*long) == "reference"  # 73728 products may overflow int32
        assert int8_conv(*long).shape == (1, 2, 1, 1)
    else:
        assert int8_conv.choose(*_small_args()) == "reference"


@needs_onednn
def test_explicit_impl_with_failing_guard_raises():
    with pytest.raises(ValueError, match="cannot run these inputs.*mkldnn"):
        int8_conv(*_small_args(packed=torch.zeros(3)), impl="onednn")
    with pytest.raises(ValueError, match="unknown implementation"):
        int8_conv(*_small_args(), impl="fbgemm")


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_bad_arguments_raise_clearly(impl):
    with pytest.raises(TypeError, match="uint8 or int8"):
        int8_conv(*_small_args(x=torch.zeros(1, 7, 5, 5)), impl=impl)
    with pytest.raises(ValueError, match="input channels 6"):
        int8_conv(*_small_args(x=torch.zeros(1, 6, 5, 5, dtype=torch.uint8)), impl=impl)
    with pytest.raises(ValueError, match="w_scale"):
        int8_conv(*_small_args(ws=torch.ones(3)), impl=impl)
    with pytest.raises(ValueError, match="post_op"):
        int8_conv(*_small_args(post="gelu"), impl=impl)
    with pytest.raises(ValueError, match="out_zero_point"):
        int8_conv(*_small_args(os=0.1, ozp=300), impl=impl)
    with pytest.raises(ValueError, match="x_zero_point"):
        int8_conv(*_small_args(zp=-1), impl=impl)


def test_fake_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, xs, zp, w, ws, b, st, p, dl, g = _make(CASES["3d-c7-stride2"], torch.Generator().manual_seed(7))
    expect = int8_conv(x, xs, zp, w, ws, b, st, p, dl, g, "none", 0.1, 0, None, impl="reference")
    with FakeTensorMode() as mode:
        fx, fw, fws, fb = (mode.from_tensor(t) for t in (x, w, ws, b))
        out = int8_conv.op(fx, xs, zp, fw, fws, fb, st, p, dl, g, "none", 0.1, 0, None, "auto")
    assert tuple(out.shape) == tuple(expect.shape) and out.dtype == torch.uint8
