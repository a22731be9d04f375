"""Tier 1: the pointwise loop (csrc/conv_pointwise.cpp: 1x1 convolutions without padding, any stride,
as a register-blocked GEMM of 6 pixels x 16 channels on the AVX2 build) equals the reference bit for
bit, and equals the general dense loop (``ConvPlan.run_dense_loop``) it replaces.

Covered: input / output channel counts that are not multiples of the tiles (4 .. 320 inputs, 3 .. 320
outputs), pixel counts that are not multiples of 6, strides 1 and 2 (also unequal), batches 1 and 5,
relu / relu6 / none, uint8 codes and float32 out, the extreme products (255 x -64: pair sums of
-32640), 1-3 threads (pixel chunks and channel-block splits), and a model built like a user's
(MobileNetV2 inverted residual blocks quantized with 7-bit weights) whose pointwise convs run natively.

On a VNNI build the same 1x1 shapes run the VNNI dense loop (the pointwise loop is AVX2 only); the
checks hold there too.
"""

from __future__ import annotations

import pytest
import torch

from quanta.kernels import conv_native, native
from quanta.kernels.conv import int8_conv
from quanta.kernels.u8s8_saturation import SEVEN_BIT_MAX

HAS_NATIVE = "native" in int8_conv.available_impls()
pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="native int8 conv (AVX-512 VNNI or AVX2 build) not available")
VNNI = conv_native.conv_isa() == "avx512_vnni"
W_LO, W_HI = (-128, 127) if VNNI else (-SEVEN_BIT_MAX, SEVEN_BIT_MAX)


def _args(n, c, o, hw, stride, *, seed=0, extreme=False, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, *hw), dtype=torch.uint8, generator=gen)
    zp = int(torch.randint(0, 256, (), generator=gen))
    w = torch.randint(W_LO, W_HI + 1, (o, c, 1, 1), dtype=torch.int8, generator=gen)
    if extreme:  # the largest products everywhere
        x.fill_(255)
        zp = 0
        w.fill_(W_LO)
    ws = torch.rand(o, generator=gen) * 0.01 + 1e-4
    b = torch.randn(o, generator=gen) if bias else None
    return (x, 0.013, zp, w, ws, b, list(stride), [0, 0], [1, 1], 1)


def _check(args, post_op, out):
    """native == reference, and the plan's pointwise loop == its general dense loop."""
    x, xs, zp, w, ws, b, stride, pad, dil, groups = args
    ref = int8_conv(*args, post_op, *out, None, impl="reference")
    got = int8_conv(*args, post_op, *out, None, impl="native")
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.stride() == ref.stride()
    assert torch.equal(got, ref), f"max diff {(got.double() - ref.double()).abs().max().item()}"
    plan = conv_native.make_plan(w, ws, b, xs, zp, stride, pad, dil, groups, post_op, *out)
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(plan.run_dense_loop(xcl), ref)
    assert torch.equal(plan.run(xcl), ref)


# (batch, in channels, out channels, (H, W), (stride h, stride w))
CASES = {
    "c4-o3-49px": (1, 4, 3, (7, 7), (1, 1)),
    "c16-o17-stride2": (5, 16, 17, (9, 11), (2, 2)),
    "c40-o40-45px": (1, 40, 40, (5, 9), (1, 1)),
    "c96-o24-b5": (5, 96, 24, (6, 7), (1, 1)),
    "c144-o144-stride2": (1, 144, 144, (13, 13), (2, 2)),
    "c320-o96": (1, 320, 96, (7, 7), (1, 1)),
    "c24-o320-b5": (5, 24, 320, (5, 5), (1, 1)),
    "c8-o40-stride-2x1": (2, 8, 40, (8, 5), (2, 1)),
    "c4-o16-one-pixel": (1, 4, 16, (1, 1), (1, 1)),
}
OUTS = {"codes": (0.04, 7), "float": (None, 0)}


@pytest.mark.parametrize("out", list(OUTS), ids=list(OUTS))
@pytest.mark.parametrize("post_op", ["relu6", "none", "relu"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_pointwise_equals_reference_and_dense_loop(case, post_op, out):
    n, c, o, hw, stride = case
    _check(_args(n, c, o, hw, stride, seed=c + o, bias=post_op != "relu"), post_op, OUTS[out])


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_extreme_products(stride):
    """255 x W_LO in every product (AVX2: 255 x -64, vpmaddubsw pair sums of -32640, the most
    negative that do not saturate) over 320 input channels, into float and uint8 codes."""
    args = _args(1, 320, 40, (7, 7), (stride, stride), extreme=True)
    _check(args, "none", (None, 0))
    _check(args, "relu6", (0.04, 7))
    # all outputs very negative: relu clamps every one of them to code zp
    y = int8_conv(*args, "relu", 0.04, 7, None, impl="native")
    assert torch.equal(y, torch.full_like(y, 7))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pointwise_thread_splits(threads):
    """pixel chunks x 16-channel block splits (few pixels: the blocks split) on 1-3 threads."""
    cases = [(1, 64, 384, (14, 14), (1, 1)), (1, 576, 160, (7, 7), (1, 1)), (2, 16, 96, (23, 23), (1, 1)),
             (1, 32, 8, (1, 1), (1, 1)), (3, 24, 144, (15, 15), (2, 2))]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for i, (n, c, o, hw, stride) in enumerate(cases):
            _check(_args(n, c, o, hw, stride, seed=i), "relu6", (0.04, 3))
    finally:
        torch.set_num_threads(before)


class _InvertedResidual(torch.nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project (+ the residual at stride 1)."""

    def __init__(self, c_in: int, c_out: int, expand: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(c_in, hidden, 1, bias=False), torch.nn.BatchNorm2d(hidden), torch.nn.ReLU6(),
            torch.nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), torch.nn.BatchNorm2d(hidden),
            torch.nn.ReLU6(), torch.nn.Conv2d(hidden, c_out, 1, bias=False), torch.nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def test_mobilenet_blocks_run_pointwise_native_and_equal_the_reference(seven_bit_fast_and_reference):
    from quanta.integer.conv import _Int8ConvNd

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU6(), _InvertedResidual(16, 24, 6, 2),
                                _InvertedResidual(24, 24, 6, 1), torch.nn.Conv2d(24, 40, 1)).eval()
    images = [torch.rand(4, 3, 32, 32) for _ in range(2)]
    fast, ref = seven_bit_fast_and_reference(model, images)
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))
    pointwise = [m for m in fast.modules() if isinstance(m, _Int8ConvNd) and m.kernel_size == (1, 1)]
    assert len(pointwise) == 5 and all(set(m.kernel_counts) == {"native"} for m in pointwise), \
        [m.kernel_counts for m in pointwise]


def test_dense_loop_binding_needs_channels_last_codes():
    native.ensure()
    x, xs, zp, w, ws, b, stride, pad, dil, groups = _args(1, 16, 24, (5, 5), (1, 1))
    plan = conv_native.make_plan(w, ws, b, xs, zp, stride, pad, dil, groups, "relu6", 0.05, 3)
    with pytest.raises(RuntimeError, match="channels-last uint8"):
        plan.run_dense_loop(x.contiguous())


@pytest.mark.parametrize("post_op", ["relu6", "relu", "none"])
@pytest.mark.parametrize("out", [(1e-4, 0), (0.02, 255), (0.5, 128), (100.0, 3)],
                         ids=["tiny-scale", "zp-255", "zp-128", "huge-scale"])
def test_pointwise_codes_at_the_clamps(out, post_op):
    """The codes' epilogue (relu6's min(y, 6) folded into the upper clamp min(6 / out_scale, 255 - zp),
    the zero point added to saturated int16 packs, two pixels per byte pack) at the clamps: most
    codes 0 / 255 (tiny scale), a zero point of 255 (every rounded value <= 0) or 128, all codes
    near the zero point (huge scale); 13 pixels (pairs and a single), 40 channels (a full block, a
    half one)."""
    _check(_args(1, 32, 40, (1, 13), (1, 1), seed=3), post_op, out)
    _check(_args(2, 64, 48, (5, 5), (2, 2), seed=4), post_op, out)
