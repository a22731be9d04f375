"""The dense native conv loop on several threads equals the reference bit for bit. The suite runs on
one thread, while the loop splits its tasks (pixel chunks x channel groups; pixel-major for weights
up to 256 KiB, group-major above) only with several: ResNet-18's conv kinds at batch > 1 (3x3
stride 1 and 2 with padding, the 1x1 stride-2 downsample, weights under and over 256 KiB), odd
channel counts, ReLU / none into uint8 codes and float32 out, zero points 0 (the padding's taps
skipped) and not, on 2 and 3 threads and on more threads than the machine has cores."""

from __future__ import annotations

import os

import pytest
import torch

from quanta.kernels import conv_native
from quanta.kernels.conv import int8_conv
from quanta.kernels.u8s8_saturation import SEVEN_BIT_MAX

pytestmark = pytest.mark.skipif("dense" not in conv_native.ISA_KINDS[conv_native.conv_isa()],
                                reason="this build has no native dense conv loop")

# (batch, in channels, out channels, size, kernel, stride, padding)
CASES = {
    "3x3-64-batch4": (4, 64, 64, 8, 3, 1, 1),       # small weights: pixel-major tasks
    "3x3-stride2-odd-out": (3, 32, 70, 11, 3, 2, 1),  # 70 channels: a tail block of 6
    "3x3-512-batch2": (2, 512, 96, 5, 3, 1, 1),     # 442 KiB of weights: group-major tasks
    "1x1-stride2-downsample": (5, 64, 128, 9, 1, 2, 0),
    "3x3-12-to-20-batch6": (6, 12, 20, 7, 3, 1, 1),  # few channels, many small tasks
}
OUTPUTS = {"u8-relu": ("relu", (0.05, 0)), "u8-none": ("none", (0.07, 131)), "f32-relu": ("relu", (None, 0))}


@pytest.mark.parametrize("threads", [2, 3, 2 * (os.cpu_count() or 1) + 1])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_dense_loop_on_several_threads_equals_reference(case, threads):
    n, c, o, size, k, stride, pad = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    x = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-SEVEN_BIT_MAX, SEVEN_BIT_MAX + 1, (o, c, k, k), dtype=torch.int8, generator=g)
    ws, bias = torch.rand(o, generator=g) * 0.01 + 1e-4, torch.randn(o, generator=g)
    before = torch.get_num_threads()
    try:
        for zp in (0, 9):  # 0: the padding's taps skipped
            for post_op, (out_scale, out_zp) in OUTPUTS.values():
                args = (x, 0.013, zp, w, ws, bias, [stride] * 2, [pad] * 2, [1, 1], 1, post_op, out_scale, out_zp,
                        None)
                torch.set_num_threads(1)
                ref = int8_conv(*args, impl="reference")
                torch.set_num_threads(threads)
                for _ in range(3):  # (a different split each call)
                    got = int8_conv(*args, impl="native")
                    assert got.dtype == ref.dtype and got.shape == ref.shape
                    assert torch.equal(got, ref), f"max diff {(got.double() - ref.double()).abs().max().item()}"
    finally:
        torch.set_num_threads(before)
