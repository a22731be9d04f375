"""The native depthwise loop's asymmetric padding (`ConvPlan` with 4 padding values) and the
padded depthwise conv module that uses it in place of an ``F.pad`` copy (`quanta.integer.padded_depthwise`):
bit for bit the reference kernel on the explicitly padded codes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quanta.kernels import conv_native, native
from quanta.kernels.conv import int8_conv

HAS_DEPTHWISE = "native" in int8_conv.available_impls() and "depthwise" in conv_native.ISA_KINDS[conv_native.conv_isa()]
pytestmark = pytest.mark.skipif(not HAS_DEPTHWISE, reason="no native depthwise loop in this build")
W_MAX = 127 if conv_native.conv_isa() == "avx512_vnni" else 64

# (n, c, h, w, k, stride, (before H, before W, after H, after W), dilation)
CASES = {
    "tf-same-s2-c96": (2, 96, 12, 12, 3, 2, (0, 0, 1, 1), 1),  # TF "same" at stride 2 on an even input
    "tf-same-s2-c33-odd": (3, 33, 9, 11, 3, 2, (0, 0, 1, 1), 1),  # odd channels and sizes
    "s2-c144-wide": (1, 144, 14, 14, 3, 2, (0, 0, 1, 1), 1),  # 64 + 64 + a last group of 16
    "s1-more-after": (2, 49, 7, 8, 3, 1, (0, 1, 2, 1), 1),  # stride 1, uneven both ways
    "more-before": (1, 40, 10, 9, 3, 2, (2, 1, 0, 0), 1),
    "5x5-s2": (2, 24, 11, 10, 5, 2, (1, 1, 2, 2), 1),
    "dilated": (1, 16, 12, 12, 3, 1, (1, 2, 3, 2), 2),
}


def _codes(n, c, h, w, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=gen)
    weight = torch.randint(-W_MAX, W_MAX + 1, (c, 1, k, k), dtype=torch.int8, generator=gen)
    return x, weight, torch.rand(c, generator=gen) * 0.01 + 1e-4, torch.randn(c, generator=gen)


@pytest.mark.parametrize("post_op", ["relu6", "none"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_asymmetric_padding_equals_the_reference_on_padded_codes(case, post_op):
    native.ensure()
    n, c, h, w, k, stride, (top, left, bottom, right), dil = case
    x, weight, w_scale, bias = _codes(n, c, h, w, k)
    x_scale, zp, out = 0.02, 9, (0.03, 4) if post_op == "relu6" else (None, 0)
    plan = conv_native.make_plan(weight, w_scale, bias, x_scale, zp, [stride] * 2, [top, left, bottom, right],
                                 [dil] * 2, c, post_op, *out)
    got = plan.run(x.contiguous(memory_format=torch.channels_last))
    padded = F.pad(x, (left, right, top, bottom), value=zp)
    ref = int8_conv(padded, x_scale, zp, weight, w_scale, bias, [stride] * 2, [0, 0], [dil] * 2, c, post_op, *out, None,
                    impl="reference")
    assert got.shape == ref.shape and torch.equal(got, ref)


def test_asymmetric_padding_is_refused_for_dense_convs_with_a_named_error():
    native.ensure()
    x, weight, w_scale, bias = _codes(1, 8, 6, 6, 3)
    dense = torch.randint(-W_MAX, W_MAX + 1, (8, 8, 3, 3), dtype=torch.int8)
    with pytest.raises(RuntimeError, match="asymmetric padding needs a depthwise conv"):
        conv_native.make_plan(dense, w_scale, bias, 0.02, 3, [1, 1], [0, 0, 1, 1], [1, 1], 1, "none", None, 0)
    with pytest.raises(RuntimeError, match="padding need 2 values each|need 2 values each"):
        conv_native.make_plan(weight, w_scale, bias, 0.02, 3, [1, 1], [0, 0, 1], [1, 1], 8, "none", None, 0)


class SameConv(nn.Conv2d):
    """A TF-ported "same" conv: pads in forward (more after than before at stride 2), then F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = (max(k - s, 0) for k, s in zip(self.kernel_size, self.stride))
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TFBlock(nn.Module):
    """expand 1x1 -> depthwise 3x3 stride 2 (TF same) -> project 1x1, ReLU6, BN; then a residual block."""

    def __init__(self, c: int = 12, e: int = 36) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 1), nn.BatchNorm2d(c), nn.ReLU6())
        self.down = nn.Sequential(nn.Conv2d(c, e, 1), nn.BatchNorm2d(e), nn.ReLU6(),
                                  SameConv(e, e, 3, stride=2, groups=e), nn.BatchNorm2d(e), nn.ReLU6(),
                                  nn.Conv2d(e, c, 1), nn.BatchNorm2d(c))
        self.res = nn.Sequential(nn.Conv2d(c, e, 1), nn.ReLU6(), nn.Conv2d(e, e, 3, padding=1, groups=e), nn.ReLU6(),
                                 nn.Conv2d(e, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(self.stem(x))
        return y + self.res(y)


def test_padded_depthwise_module_pads_in_the_kernel_and_equals_the_reference(seven_bit_fast_and_reference):
    torch.manual_seed(0)
    model = TFBlock().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    images = [torch.randn(4, 3, 14, 14) for _ in range(2)]
    fast, ref = seven_bit_fast_and_reference(model, images)
    padded = [m for m in fast.modules() if type(m).__name__ == "Int8PaddedConv2d"]
    assert len(padded) == 1 and padded[0].groups == padded[0].in_channels
    x = torch.randn(3, 3, 14, 14)  # batch 3, odd channels after the stem (12 -> 36)
    with torch.no_grad():
        expected = ref(x)
        first = fast(x)  # settles the padded input on the native kernel, then files the unpadded call
        assert any(k[0] == "unpadded" for k in padded[0].binding.calls if isinstance(k, tuple))
        before = padded[0].kernel_counts["native"]
        second = fast(x)  # the kernel pads
        assert padded[0].kernel_counts["native"] == before + 1
    assert torch.equal(first, expected) and torch.equal(second, expected)
