"""The native vector loops of the codes ops against their references: ``add_codes`` (AVX-512 or
AVX2: 16 codes a step, then a scalar tail) on every pair of input codes, spans long enough for
many vector steps plus every tail length, and the grids a residual block meets (ReLU after the sum,
zero points 0 and not); ``max_pool2d_codes`` (64 / 32 channels a register, then a scalar tail) on
ResNet's stem pooling and channel counts around the register widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quanta.kernels import native
from quanta.kernels.codes import add_codes, max_pool2d_codes

needs_native = pytest.mark.skipif(not native.ready(), reason="needs the native kernels")


def _all_pairs(extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (a, b) code pair once (65536 elements), plus ``extra`` more (a tail after the vectors)."""
    a = torch.arange(256, dtype=torch.uint8).repeat(256)
    b = torch.arange(256, dtype=torch.uint8).repeat_interleave(256)
    g = torch.Generator().manual_seed(extra)
    tail = torch.randint(0, 256, (2, extra), dtype=torch.uint8, generator=g)
    return torch.cat([a, tail[0]]), torch.cat([b, tail[1]])


@needs_native
@pytest.mark.parametrize("post_op", ["none", "relu", "relu6"])
@pytest.mark.parametrize("grid", [
    (0.0371, 0, 0.125, 128, 1 / 0.05, 0, 0, 255),     # a ReLU'd conv output + a signed-looking branch
    (0.02, 7, 0.03, 250, 37.7, 131, 0, 255),          # zero points everywhere, output clamps both ends
    (0.25, 0, 0.25, 128, 2.0, 100, 3, 200),           # exact .5 ties (y * inv = k / 2), narrow clamp
    (1e-3, 255, 4.0, 0, 8.0, 0, 0, 255),              # one operand dominates, saturating codes
], ids=["relu-chain", "zero-points", "ties", "saturating"])
@pytest.mark.parametrize("extra", [0, 1, 15, 17])
def test_add_codes_vector_loop_is_the_reference_on_every_code_pair(post_op, grid, extra):
    a, b = _all_pairs(extra)
    sa, za, sb, zb, inv, zo, lo, hi = grid
    args = (a, sa, za, b, sb, zb, post_op, inv, zo, lo, hi)
    assert add_codes.choose(*args) == "native"
    got, ref = add_codes(*args, impl="native"), add_codes(*args, impl="reference")
    assert got.dtype == ref.dtype == torch.uint8
    assert torch.equal(got, ref)


@needs_native
def test_add_codes_vector_loop_on_a_channels_last_residual_block_output():
    """A batch of ResNet-sized channels-last codes (several parallel chunks, odd channel count)."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(0, 256, (3, 67, 21, 19), dtype=torch.uint8, generator=g)
            .contiguous(memory_format=torch.channels_last) for _ in range(2))
    args = (a, 0.041, 0, b, 0.057, 121, "relu", 1 / 0.063, 0, 0, 255)
    got = add_codes(*args, impl="native")
    ref = add_codes(*args, impl="reference")
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, ref)


@needs_native
@pytest.mark.parametrize("channels", [64, 32, 31, 33, 67, 96, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_max_pool2d_codes_vector_loop_is_the_reference(channels, batch):
    """ResNet's 3x3 stride-2 pooling with padding 1 (border windows of 4 and 6 taps), and a 2x2
    stride-1 window, on channel counts that fill whole registers, leave a tail, or hold no register."""
    g = torch.Generator().manual_seed(channels * 10 + batch)
    x = torch.randint(0, 256, (batch, channels, 13, 11), dtype=torch.uint8, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    for args in ((x, [3, 3], [2, 2], [1, 1], [1, 1], False), (x, [2, 2], [1, 1], [0, 0], [1, 1], False)):
        assert max_pool2d_codes.choose(*args) == "native"
        got, ref = max_pool2d_codes(*args, impl="native"), max_pool2d_codes(*args, impl="reference")
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, ref)
        assert torch.equal(got.float(), F.max_pool2d(x.float(), *args[1:5]))
