"""Tier 1: the gathered loop (csrc/conv_pointwise.cpp, ``gathered_conv``: a dense conv of C % 4 != 0
input channels, e.g. a network's 3-channel stem, as each output pixel's taps gathered into one row of
round_up(taps x C, 4) codes, then the pointwise GEMM) equals the reference bit for bit.

Covered: 1, 2, 3, 5, 6 and 7 input channels (kernel rows of 3 .. 35 codes: the small copies'
overlapping moves and byte copies), 1x1 / 3x3 / 5x5 / 3x1 kernels, strides 1 and 2, padding (also
asymmetric, TF "same": more after than before), dilation, batches 1-3, relu6 / relu / none, uint8
codes and float32 out, the extreme products, 1-3 threads, a 1d conv, int8 activations, and a model
built like a user's (a TF-ported MobileNet stem: a Conv2d subclass padding "same" in forward, 3
channels, stride 2) whose stem runs the native kernel. AVX2 build only (VNNI builds run these convs
on oneDNN, which the guard says).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quanta.kernels import conv_native, native
from quanta.kernels.conv import int8_conv
from quanta.kernels.u8s8_saturation import SEVEN_BIT_MAX

HAS_GATHERED = "native" in int8_conv.available_impls() and "gathered" in conv_native.ISA_KINDS[conv_native.conv_isa()]
pytestmark = pytest.mark.skipif(not HAS_GATHERED, reason="no gathered loop in this build (AVX2 without VNNI only)")


def _args(n, c, o, hw, k, stride, pad, dil=(1, 1), *, seed=0, extreme=False, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, *hw), dtype=torch.uint8, generator=gen)
    zp = int(torch.randint(0, 256, (), generator=gen))
    w = torch.randint(-SEVEN_BIT_MAX, SEVEN_BIT_MAX + 1, (o, c, *k), dtype=torch.int8, generator=gen)
    if extreme:
        x.fill_(255)
        zp = 0
        w.fill_(-SEVEN_BIT_MAX)
    ws = torch.rand(o, generator=gen) * 0.01 + 1e-4
    b = torch.randn(o, generator=gen) if bias else None
    return (x, 0.013, zp, w, ws, b, list(stride), list(pad), list(dil), 1)


def _check(args, post_op, out):
    ref = int8_conv(*args, post_op, *out, None, impl="reference")
    got = int8_conv(*args, post_op, *out, None, impl="native")
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got, ref), f"max diff {(got.double() - ref.double()).abs().max().item()}"


# (batch, in channels, out channels, (H, W), kernel, stride, padding, dilation)
CASES = {
    "stem-c3-o32-s2": (1, 3, 32, (23, 21), (3, 3), (2, 2), (1, 1), (1, 1)),
    "stem-c3-o16-b3-s1": (3, 3, 16, (9, 10), (3, 3), (1, 1), (1, 1), (1, 1)),
    "c1-o8-no-pad": (2, 1, 8, (7, 6), (3, 3), (1, 1), (0, 0), (1, 1)),
    "c2-o24-5x5-s2": (1, 2, 24, (11, 12), (5, 5), (2, 2), (2, 2), (1, 1)),
    "c5-o40-dilated": (2, 5, 40, (12, 12), (3, 3), (1, 1), (2, 2), (2, 2)),
    "c6-o17-3x1": (1, 6, 17, (8, 9), (3, 1), (1, 2), (1, 0), (1, 1)),
    "c7-o48-5x5": (1, 7, 48, (9, 9), (5, 5), (1, 1), (2, 2), (1, 1)),
    "c3-o8-1x1": (2, 3, 8, (5, 7), (1, 1), (1, 1), (0, 0), (1, 1)),
}
OUTS = {"codes": (0.04, 7), "float": (None, 0)}


@pytest.mark.parametrize("out", list(OUTS), ids=list(OUTS))
@pytest.mark.parametrize("post_op", ["relu6", "none", "relu"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_gathered_equals_reference(case, post_op, out):
    n, c, o, hw, k, stride, pad, dil = case
    _check(_args(n, c, o, hw, k, stride, pad, dil, seed=c + o, bias=post_op != "relu"), post_op, OUTS[out])


def test_gathered_is_chosen_and_extreme_products_stay_exact():
    """auto picks the native kernel for a stem at batch 16's size; 255 x -64 in every product."""
    stem = _args(16, 3, 32, (224, 224), (3, 3), (2, 2), (1, 1))
    assert conv_native.guard_native(*stem, "relu6", 0.05, 3, None) is None
    assert conv_native.prefer_onednn(*stem, "relu6", 0.05, 3, None) is None
    assert int8_conv.choose(*stem, "relu6", 0.05, 3, None) == "native"
    extreme = _args(1, 7, 40, (6, 6), (5, 5), (1, 1), (2, 2), extreme=True)
    _check(extreme, "none", (None, 0))
    _check(extreme, "relu6", (0.04, 7))


@pytest.mark.parametrize("pads", [(0, 0, 1, 1), (1, 0, 2, 1), (2, 2, 0, 0)], ids=["tf-same-s2", "uneven", "before"])
def test_gathered_asymmetric_padding_equals_reference_on_padded_codes(pads):
    """ConvPlan with 4 padding values (before H, W, after H, W): the gather reads the zero point
    outside the image, as the reference on explicitly padded codes."""
    native.ensure()
    top, left, bottom, right = pads
    x, xs, zp, w, ws, b, *_ = _args(2, 3, 24, (12, 13), (3, 3), (2, 2), (0, 0), seed=5)
    plan = conv_native.make_plan(w, ws, b, xs, zp, [2, 2], [top, left, bottom, right], [1, 1], 1, "relu6", 0.03, 4)
    got = plan.run(x.contiguous(memory_format=torch.channels_last))
    padded = F.pad(x, (left, right, top, bottom), value=zp)
    ref = int8_conv(padded, xs, zp, w, ws, b, [2, 2], [0, 0], [1, 1], 1, "relu6", 0.03, 4, None, impl="reference")
    assert got.shape == ref.shape and torch.equal(got, ref)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gathered_thread_splits(threads):
    """pixel chunks (each thread's gather buffer) x 16-channel block splits (few pixels) on 1-3 threads."""
    cases = [(1, 3, 32, (40, 40), (3, 3), (2, 2), (1, 1)), (1, 3, 96, (3, 3), (3, 3), (1, 1), (1, 1)),
             (3, 5, 24, (17, 15), (3, 3), (1, 1), (1, 1))]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for i, (n, c, o, hw, k, stride, pad) in enumerate(cases):
            _check(_args(n, c, o, hw, k, stride, pad, seed=i), "relu6", (0.04, 3))
    finally:
        torch.set_num_threads(before)


def test_gathered_1d_conv_and_int8_codes():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 3, 30), dtype=torch.uint8, generator=gen)
    w = torch.randint(-SEVEN_BIT_MAX, SEVEN_BIT_MAX + 1, (20, 3, 5), dtype=torch.int8, generator=gen)
    ws, b = torch.rand(20, generator=gen) * 0.01 + 1e-4, torch.randn(20, generator=gen)
    _check((x, 0.02, 11, w, ws, b, [2], [2], [1], 1), "relu6", (0.04, 7))
    x8 = torch.randint(-128, 128, (2, 3, 9, 9), dtype=torch.int8, generator=gen)
    w2 = torch.randint(-SEVEN_BIT_MAX, SEVEN_BIT_MAX + 1, (16, 3, 3, 3), dtype=torch.int8, generator=gen)
    _check((x8, 0.02, -5, w2, ws[:16], b[:16], [1, 1], [1, 1], [1, 1], 1), "none", (None, 0))


class SameConv(nn.Conv2d):
    """A TF-ported "same" conv: pads in forward (more after than before at stride 2), then F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = (max(k - s, 0) for k, s in zip(self.kernel_size, self.stride))
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_tf_stem_runs_native_and_equals_the_reference(seven_bit_fast_and_reference):
    torch.manual_seed(0)
    model = nn.Sequential(SameConv(3, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.Conv2d(16, 8, 1), nn.ReLU6(), nn.Conv2d(8, 3, 3, padding=1), nn.Conv2d(3, 10, 3)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2), model[1].running_var.uniform_(0.5, 2.0)
    images = [torch.randn(4, 3, 18, 18) for _ in range(2)]
    fast, ref = seven_bit_fast_and_reference(model, images)
    x = torch.randn(3, 3, 18, 18)
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))
    convs = [m for m in fast.modules() if hasattr(m, "kernel_counts") and m.in_channels == 3]
    assert len(convs) == 2 and all(set(m.kernel_counts) == {"native"} for m in convs), \
        [dict(m.kernel_counts) for m in convs]
