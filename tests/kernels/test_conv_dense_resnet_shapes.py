"""The dense native conv loop on ResNet-18's conv shapes (scaled down in space) equals the reference
bit for bit. The AVX2 tile stores its pixels' codes in pairs (one shared pack of two pixels' 16
channels, `store16x2`) and a last odd pixel alone; segments of the padding skip hold odd pixel
counts, so both paths run in every case, with full 16-channel blocks and a tail block (``70``
channels), uint8 codes (ReLU, none) and float32 output, zero points 0 (taps in the padding skipped)
and not, batch 1 and > 1."""

from __future__ import annotations

import pytest
import torch

from quanta.kernels import conv_native
from quanta.kernels.conv import int8_conv
from quanta.kernels.u8s8_saturation import SEVEN_BIT_MAX

pytestmark = pytest.mark.skipif("dense" not in conv_native.ISA_KINDS[conv_native.conv_isa()],
                                reason="this build has no native dense conv loop")

# (batch, in channels, out channels, size, kernel, stride, padding): ResNet-18's dense convs in small
RESNET = {
    "3x3-64": (1, 64, 64, 9, 3, 1, 1),          # a stage-1 conv: 81 pixels in 9 segments
    "3x3-64-batch3": (3, 64, 64, 7, 3, 1, 1),   # the last stage's 7x7 maps, 3 images
    "3x3-stride2": (2, 64, 128, 11, 3, 2, 1),   # a stage's first conv (odd input size)
    "1x1-stride2": (2, 64, 128, 9, 1, 2, 0),    # the downsample branch
    "3x3-70-ch": (1, 12, 70, 6, 3, 1, 1),       # 4 full blocks and a tail block of 6 channels
    "7x7-stem-4ch": (1, 4, 64, 15, 7, 2, 3),    # a stem with 4 input channels
}
OUTPUTS = {  # post-op, output grid (None: float32 out)
    "u8-relu": ("relu", (0.05, 0)),
    "u8-none": ("none", (0.07, 131)),
    "f32-relu": ("relu", (None, 0)),
}


@pytest.mark.parametrize("output", list(OUTPUTS), ids=list(OUTPUTS))
@pytest.mark.parametrize("zp", [0, 9], ids=["zp0-skip-padding", "zp9"])
@pytest.mark.parametrize("case", list(RESNET.values()), ids=list(RESNET))
def test_dense_loop_equals_reference_on_resnet_shapes(case, zp, output):
    n, c, o, size, k, stride, pad = case
    post_op, (out_scale, out_zp) = OUTPUTS[output]
    g = torch.Generator().manual_seed(hash((case, zp)) % 2**31)
    x = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-SEVEN_BIT_MAX, SEVEN_BIT_MAX + 1, (o, c, k, k), dtype=torch.int8, generator=g)
    ws, bias = torch.rand(o, generator=g) * 0.01 + 1e-4, torch.randn(o, generator=g)
    args = (x, 0.013, zp, w, ws, bias, [stride] * 2, [pad] * 2, [1, 1], 1, post_op, out_scale, out_zp, None)
    ref = int8_conv(*args, impl="reference")
    got = int8_conv(*args, impl="native")
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got, ref), f"max diff {(got.double() - ref.double()).abs().max().item()}"
