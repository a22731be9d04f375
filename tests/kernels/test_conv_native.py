"""Tier 1: ``quanta::int8_conv``'s ``native`` implementation (csrc/conv.cpp) equals the reference
bit for bit: the integer sums are exact and the float32 epilogue is the reference's own.

Covered: dense (groups=1) and depthwise convolutions, 1d and 2d, every remainder of the 6-pixel
× 64-channel tiles, strides, dilations, paddings wider than the kernel's reach, uint8 and int8
codes, non-contiguous inputs, float and uint8 outputs with each post-op, the extreme codes.

The loops of the library loaded here are tested (`conv_native.conv_isa`): AVX-512 VNNI (full-range
weights) or AVX2 (``vpmaddubsw`` is exact for weights within ±64, so the cases draw 7-bit weights
there, up to ±64 itself, and the guard must refuse wider ones).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta.kernels import conv_native, native
from quanta.kernels.conv import int8_conv
from quanta.kernels.u8s8_saturation import SEVEN_BIT_MAX

HAS_NATIVE = "native" in int8_conv.available_impls()
pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="native int8 conv (AVX-512 VNNI or AVX2 build) not available")
ISA = conv_native.conv_isa()
VNNI = ISA == "avx512_vnni"
#: the weight codes the loops sum exactly: full range with VNNI, within ±64 (7-bit) without
W_LO, W_HI = (-128, 127) if VNNI else (-SEVEN_BIT_MAX, SEVEN_BIT_MAX)


def _skip_without_loop(groups):
    kind = "dense" if groups == 1 else "depthwise"
    if kind not in conv_native.ISA_KINDS[ISA]:
        pytest.skip(f"this build ({ISA}) has no {kind} loop")


def _args(n, c, o, size, k, stride, pad, dil, groups, *, dims=2, act="u8", bias=True, gen=None, extreme=False,
          zero_code_zp=False):
    """Random op arguments; ``zero_code_zp``: the zero point whose kernel code is 0 (uint8 0, int8
    -128), where the dense loop skips the taps that fall in the padding."""
    gen = gen or torch.Generator().manual_seed(0)
    shape = (n, c) + (size,) * dims
    if act == "u8":
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        zp = 0 if zero_code_zp else int(torch.randint(0, 256, (), generator=gen))
    else:
        x = torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
        zp = -128 if zero_code_zp else int(torch.randint(-128, 128, (), generator=gen))
    w = torch.randint(W_LO, W_HI + 1, (o, c // groups) + (k,) * dims, dtype=torch.int8, generator=gen)
    if extreme:  # the largest products everywhere: 255 x -128 (7-bit: 255 x -64, pair sums -32640)
        x.fill_(255 if act == "u8" else 127)
        zp = 0 if act == "u8" else -128
        w.fill_(W_LO)
    ws = torch.rand(o, generator=gen) * 0.01 + 1e-4
    b = torch.randn(o, generator=gen) if bias else None
    return (x, 0.013, zp, w, ws, b, [stride] * dims, [pad] * dims, [dil] * dims, groups)


def _check(args, post_op="relu", out=(0.05, 3)):
    full = (*args, post_op, *out, None)
    assert int8_conv.choose(*full) in ("native", "onednn")
    ref = int8_conv(*full, impl="reference")
    got = int8_conv(*full, impl="native")
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.stride() == ref.stride()
    assert torch.equal(got, ref), f"max diff {(got.double() - ref.double()).abs().max().item()}"


# (n, c, o, size, k, stride, pad, dilation, groups)
DENSE = {
    "1x1-tails": (1, 4, 5, 7, 1, 1, 0, 1, 1),  # 49 pixels: 8 tiles of 6 and one of 1; 5 channels
    "1x1-64-ch": (2, 16, 64, 3, 1, 1, 0, 1, 1),
    "1x1-stride2": (1, 32, 70, 9, 1, 2, 0, 1, 1),
    "3x3-pad1": (1, 12, 130, 11, 3, 1, 1, 1, 1),  # 130 channels: 2 full groups of 64 and 2 more
    "3x3-stride2": (3, 8, 24, 13, 3, 2, 1, 1, 1),
    "5x5-dilated": (1, 4, 17, 12, 5, 1, 4, 2, 1),
    "2x2-wide-pad": (1, 8, 48, 5, 2, 1, 3, 1, 1),  # pads past the kernel's reach: all-pad rows
    "7x7-stride2-pad3": (2, 4, 20, 15, 7, 2, 3, 1, 1),  # a ResNet-style stem (4 channels); 20 = 16 + 4
}
DEPTHWISE = {
    "3x3-c16": (1, 16, 16, 9, 3, 1, 1, 1, 16),  # 128-bit vectors; 9 taps = 4 + 4 + 1 (the last tap alone)
    "3x3-c32-stride2": (2, 32, 32, 13, 3, 2, 1, 1, 32),  # 7 columns: 4 + 3 (a pair and a half pair)
    "3x3-c40-stride2": (2, 40, 40, 15, 3, 2, 1, 1, 40),  # 3 blocks, the last one of 8 channels
    "3x3-c96": (1, 96, 96, 6, 3, 1, 1, 1, 96),  # 6 blocks: one group of 4 and one of 2
    "5x5-c7-dilated": (1, 7, 7, 11, 5, 1, 4, 2, 7),
    "3x3-c72-odd-width": (1, 72, 72, 7, 3, 1, 1, 1, 72),  # 7 columns: the last pixel alone
    "3x3-c144": (2, 144, 144, 8, 3, 1, 1, 1, 144),  # 64 + 64 + a last group of 16 (128-bit)
    "5x5-c48-stride2": (1, 48, 48, 12, 5, 2, 2, 1, 48),  # 25 taps = 6 x 4 + 1; interior runs of 5x5
    "5x5-c24-no-interior": (1, 24, 24, 3, 5, 1, 2, 1, 24),  # every pixel's taps reach the padding
    "3x3-c8-pad0": (1, 8, 8, 10, 3, 1, 0, 1, 8),  # no padding: every pixel in interior runs
    "4x4-c64": (1, 64, 64, 9, 4, 1, 1, 1, 64),  # no interior-run loop: tiles only; 16 taps
    # AVX2: 256-bit halves of each 64-channel group, tails through a bounce buffer
    "3x3-c33": (2, 33, 33, 7, 3, 1, 1, 1, 33),  # a full half and a last half of 1 channel (128-bit)
    "3x3-c49-stride2": (1, 49, 49, 9, 3, 2, 1, 1, 49),  # a half and 17 channels (256-bit, masked)
    "5x5-c81": (1, 81, 81, 8, 5, 1, 2, 1, 81),  # a group and 17 channels of the next
    "7x7-c100-dilated": (1, 100, 100, 13, 7, 1, 3, 2, 100),  # 64 + 32 + 4; tiles only (no 7x7 runs)
    "1x1-c20": (2, 20, 20, 5, 1, 1, 0, 1, 20),  # one tap alone; 20 channels
}


@pytest.mark.parametrize("zp", ["random-zp", "zero-code-zp"])
@pytest.mark.parametrize("act", ["u8", "s8"])
@pytest.mark.parametrize("case", list(DENSE.values()) + list(DEPTHWISE.values()), ids=list(DENSE) + list(DEPTHWISE))
def test_native_equals_reference(case, act, zp):
    _skip_without_loop(case[-1])
    gen = torch.Generator().manual_seed(1)
    for post_op, out in (("none", (None, 0)), ("relu", (0.05, 3)), ("relu6", (0.02, 0)), ("relu6", (None, 0))):
        _check(_args(*case, act=act, bias=post_op != "relu", gen=gen, zero_code_zp=zp == "zero-code-zp"), post_op, out)


# padded geometries of the dense loop's tap skipping (zero point 0): every run of output rows and
# columns that sees its own taps (edges, corners, rows that see only padding), tile tails per run
PADDED = {
    "7x7-pad1-batch3": (3, 8, 20, 7, 3, 1, 1, 1, 1),  # ResNet's last stage in small: 9 runs, 3 images
    "3x3-stride2-pad1": (2, 4, 70, 14, 3, 2, 1, 1, 1),  # only the first row and column are padded
    "5x5-pad2-dilated": (1, 12, 33, 9, 5, 1, 4, 2, 1),
    "3x3-pad3-tiny": (2, 4, 17, 2, 3, 1, 3, 1, 1),  # outputs whose taps are all padding
    "1x1-pad1": (1, 8, 16, 5, 1, 1, 1, 1, 1),  # a padded 1x1 conv: its border outputs are the bias
    "3x3-64-channels": (2, 16, 64, 6, 3, 1, 1, 1, 1),
}


@pytest.mark.parametrize("act", ["u8", "s8"])
@pytest.mark.parametrize("case", list(PADDED.values()), ids=list(PADDED))
def test_native_padding_skip_equals_reference(case, act):
    _skip_without_loop(case[-1])
    gen = torch.Generator().manual_seed(3)
    for post_op, out in (("none", (None, 0)), ("relu6", (0.02, 0))):
        _check(_args(*case, act=act, gen=gen, zero_code_zp=True), post_op, out)
        _check(_args(*case, act=act, gen=gen, zero_code_zp=True, extreme=True), post_op, out)
    n, c, o, size, k, stride, pad, dil, groups = case  # a rectangular image and kernel
    x, xs, zp, w, ws, b, *_ = _args(*case, act=act, gen=gen, zero_code_zp=True)
    x = torch.cat([x, x[:, :, :1]], dim=2)[..., :max(1, size - 1)]
    w = torch.cat([w, w[:, :, :1]], dim=2)
    _check((x, xs, zp, w, ws, b, [stride, 1], [pad, max(0, pad - 1)], [dil, 1], groups), "relu", (0.05, 3))


@pytest.mark.parametrize("case", [DENSE["3x3-pad1"], DEPTHWISE["3x3-c40-stride2"]], ids=["dense", "depthwise"])
def test_native_1d_strided_and_extreme_inputs(case):
    n, c, o, size, k, stride, pad, dil, groups = case
    _skip_without_loop(groups)
    _check(_args(n, c, o, 31, k, stride, pad, dil, groups, dims=1), "relu6", (0.03, 5))
    args = _args(*case)
    wide = torch.cat([args[0], args[0]], dim=1)
    strided = wide.transpose(0, 1)[::2].transpose(0, 1)  # every other channel: not contiguous
    assert not strided.is_contiguous()
    _check((strided, *args[1:]), "none", (None, 0))
    for act in ("u8", "s8"):
        big = _args(n, c, o, size, k, stride, pad, dil, groups, act=act, extreme=True, bias=False)
        _check(big, "none", (None, 0))
        _check(big, "none", (1000.0, 0))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2), c4=st.integers(1, 12), o=st.integers(1, 80), size=st.integers(1, 9),
       k=st.integers(1, 5), stride=st.integers(1, 3), pad=st.integers(0, 3), dil=st.integers(1, 2),
       depthwise=st.booleans(), zero_code_zp=st.booleans(), seed=st.integers(0, 2**16))
def test_native_random_geometry(n, c4, o, size, k, stride, pad, dil, depthwise, zero_code_zp, seed):
    depthwise = depthwise or "dense" not in conv_native.ISA_KINDS[ISA]
    c = 4 * c4 if not depthwise else c4 * 3
    o, groups = (c, c) if depthwise else (o, 1)
    if size + 2 * pad < dil * (k - 1) + 1:
        return  # no output
    _check(_args(n, c, o, size, k, stride, pad, dil, groups, gen=torch.Generator().manual_seed(seed),
                 zero_code_zp=zero_code_zp), "relu6", (0.04, 7))


@pytest.mark.skipif(not VNNI, reason="the VNNI build's choices (AVX2: test_avx2_guard_and_preference)")
def test_guard_and_preference():
    args = _args(1, 6, 8, 5, 3, 1, 1, 1, 1)  # 6 input channels: not a multiple of 4
    why = conv_native.guard_native(*args, "none", None, 0, None)
    assert why is not None and "multiple of 4" in why
    assert int8_conv.choose(*args, "none", None, 0, None) == "onednn"
    grouped = _args(1, 8, 8, 5, 3, 1, 1, 1, 2)
    assert "groups=2" in conv_native.guard_native(*grouped, "none", None, 0, None)
    # a large output of short sums: oneDNN is faster there, so auto picks it; named native still runs
    big = _args(4, 16, 96, 112, 1, 1, 0, 1, 1)
    assert conv_native.prefer_onednn(*big, "none", None, 0, None) is not None
    assert int8_conv.choose(*big, "none", None, 0, None) == "onednn"
    # large depthwise convs: native with interior runs (3x3, 5x5), oneDNN for other kernels
    for kernel in (3, 5):
        big_depthwise = _args(1, 96, 96, 80, kernel, 1, 1, 1, 96)
        assert int8_conv.choose(*big_depthwise, "none", None, 0, None) == "native"
    narrow = _args(2, 32, 32, 112, 3, 1, 1, 1, 32)  # 32 channels at 112x112 (MobileNetV2's first)
    assert int8_conv.choose(*narrow, "none", None, 0, None) == "native"
    big_7x7 = _args(1, 96, 96, 80, 7, 1, 3, 1, 96)  # 614 K outputs
    assert "depthwise conv of 614400 outputs with a 7x7" in conv_native.prefer_onednn(*big_7x7, "none", None, 0, None)
    assert int8_conv.choose(*big_7x7, "none", None, 0, None) == "onednn"
    short_sums = _args(2, 16, 96, 112, 1, 1, 0, 1, 1)  # 2.4 M outputs of 16-product sums
    assert int8_conv.choose(*short_sums, "none", None, 0, None) == "onednn"
    for small in (_args(1, 16, 96, 56, 1, 1, 0, 1, 1), _args(1, 48, 48, 9, 3, 1, 1, 1, 48)):
        assert int8_conv.choose(*small, "none", None, 0, None) == "native"
    _check(big_7x7)  # a named call runs native wherever its guard accepts


@pytest.mark.skipif(VNNI, reason="the AVX2 build's choices (VNNI: test_guard_and_preference)")
def test_avx2_guard_and_preference():
    """auto on the AVX2 build (conv_native.AVX2_DENSE_NATIVE_OUTPUTS, measured): native for depthwise
    3x3 / 5x5 convs, 1x1 convs without padding (the pointwise loop) at every size, and other
    dense convs of up to ~160 K outputs or long sums, oneDNN for the rest."""
    limit = conv_native.AVX2_DENSE_NATIVE_OUTPUTS
    for small in (_args(1, 144, 32, 28, 1, 1, 0, 1, 1), _args(1, 576, 160, 7, 1, 1, 0, 1, 1),
                  _args(16, 64, 64, 7, 3, 1, 1, 1, 1)):  # 25 K, 7.8 K and 50 K outputs
        assert conv_native.prefer_onednn(*small, "relu6", 0.05, 3, None) is None
        assert int8_conv.choose(*small, "relu6", 0.05, 3, None) == "native"
    big = _args(1, 16, 32, 112, 3, 1, 1, 1, 1)  # 401 K outputs of 144-product sums (a 3x3 conv)
    why = conv_native.prefer_onednn(*big, "relu6", 0.05, 3, None)
    assert why is not None and f"faster above {limit} outputs" in why
    assert int8_conv.choose(*big, "relu6", 0.05, 3, None) == "onednn"
    # 1x1 convs without padding run the pointwise loop at every size (batch 16 at 112x112: 19 M outputs)
    for pointwise in (_args(1, 16, 96, 112, 1, 1, 0, 1, 1), _args(2, 96, 24, 56, 1, 1, 0, 1, 1),
                      _args(2, 32, 64, 56, 1, 2, 0, 1, 1), _args(16, 16, 96, 112, 1, 1, 0, 1, 1)):
        assert conv_native.prefer_onednn(*pointwise, "relu6", 0.05, 3, None) is None
        assert int8_conv.choose(*pointwise, "relu6", 0.05, 3, None) == "native"
    padded = _args(1, 16, 96, 112, 1, 1, 1, 1, 1)  # a padded 1x1 conv: the dense loop's table
    assert conv_native.prefer_onednn(*padded, "relu6", 0.05, 3, None) is not None
    long_sums = _args(4, 128, 128, 28, 3, 1, 1, 1, 1)  # 400 K outputs of 1152-product sums
    assert int8_conv.choose(*long_sums, "relu6", 0.05, 3, None) == "native"
    for kernel in (3, 5):  # depthwise: native at any size (batch 16 at 112x112: 6.4 M outputs of 9 products)
        big_depthwise = _args(16, 32, 32, 112, kernel, 1, kernel // 2, 1, 32)
        assert conv_native.prefer_onednn(*big_depthwise, "relu6", 0.05, 3, None) is None
        assert int8_conv.choose(*big_depthwise, "relu6", 0.05, 3, None) == "native"
    _check(_args(1, 16, 24, 40, 1, 1, 0, 1, 1))  # a named call runs native wherever its guard accepts


def test_plan_rejects_bad_inputs_with_named_errors():
    native.ensure()
    args = _args(1, 16, 16, 5, 3, 1, 1, 1, 1)
    plan = conv_native.make_plan(args[3], args[4], args[5], args[1], args[2], *args[6:], "relu", 0.05, 3)
    x = args[0].contiguous(memory_format=torch.channels_last)
    assert torch.equal(plan.run(x), int8_conv(*args, "relu", 0.05, 3, None, impl="reference"))
    with pytest.raises(RuntimeError, match="channels-last uint8"):
        plan.run(args[0].contiguous())  # NCHW memory order
    with pytest.raises(RuntimeError, match="channels-last uint8"):
        plan.run(x[:, :8].contiguous(memory_format=torch.channels_last))  # wrong channel count
    unpadded = conv_native.make_plan(args[3], args[4], args[5], args[1], args[2], [1, 1], [0, 0], [1, 1], 1,
                                     "none", None, 0)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        unpadded.run(torch.zeros(1, 16, 2, 2, dtype=torch.uint8).contiguous(memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match="wpack must be"):
        native.module().ConvPlan(torch.zeros(3, dtype=torch.int8), torch.zeros(16, dtype=torch.int32), 0.1, 0,
                                 torch.ones(16), None, 16, 16, [3, 3], [1, 1], [1, 1], [1, 1], False, 0, None, 0)


@pytest.mark.parametrize("threads", [2, 3])
def test_native_thread_splits_give_the_reference(threads):
    """The suite runs on one thread; the task splits (pixel chunks x channel groups, pixel- or
    group-major by weight size; depthwise rows, split by channel groups when rows are few)
    only differ with several: each must still give the reference's bits."""
    cases = [
        (1, 64, 384, 14, 1, 1, 0, 1, 1),     # small weights: pixel-major, channel groups split
        (1, 512, 160, 7, 3, 1, 1, 1, 1),     # 737 KiB of weights: group-major
        (2, 16, 96, 23, 1, 1, 0, 1, 1),      # many pixel chunks
        (1, 8, 8, 1, 1, 1, 0, 1, 1),         # one pixel
        (1, 144, 144, 7, 3, 1, 1, 1, 144),   # depthwise, 7 rows < 4 x threads: split by channels
        (1, 96, 96, 29, 3, 2, 1, 1, 96),     # depthwise, 15 rows
        (2, 24, 24, 15, 3, 1, 1, 1, 24),     # depthwise <= 32 channels: 256-bit vectors
    ]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for case in cases:  # (both builds have both loops; AVX2's 1x1 convs run the pointwise loop)
            _check(_args(*case, gen=torch.Generator().manual_seed(7)), "relu6", (0.04, 3))
            _check(_args(*case, gen=torch.Generator().manual_seed(8)), "none", (None, 0))
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(VNNI, reason="VNNI sums full-range weights exactly: nothing to refuse")
@pytest.mark.parametrize("groups", [24, 1], ids=["depthwise", "dense"])
def test_avx2_guard_refuses_eight_bit_weights(groups):
    args = _args(1, 24, 24, 6, 3, 1, 1, 1, groups)
    assert conv_native.guard_native(*args, "relu", 0.05, 3, None) is None  # 7-bit: runs natively
    for wide in (65, -65, 127, -128):
        w = args[3].clone()
        w[5, 0, 1, 1] = wide  # one code past ±64 is enough to saturate a pair sum
        wide_args = (*args[:3], w, *args[4:])
        why = conv_native.guard_native(*wide_args, "relu", 0.05, 3, None)
        assert why is not None and f"wider than ±{SEVEN_BIT_MAX}" in why and "weight_bits=7" in why, why
        assert int8_conv.choose(*wide_args, "relu", 0.05, 3, None) != "native"
        with pytest.raises(Exception, match="wider than"):
            int8_conv(*wide_args, "relu", 0.05, 3, None, impl="native")


@pytest.mark.skipif(VNNI, reason="the checks of a build without VNNI")
def test_avx2_plan_refuses_wide_weights():
    native.ensure()
    x, xs, zp, w, ws, b, stride, pad, dil, groups = _args(1, 16, 16, 5, 3, 1, 1, 1, 16)
    plan = conv_native.make_plan(w, ws, b, xs, zp, stride, pad, dil, groups, "relu6", 0.02, 0)
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(plan.run(xcl), int8_conv(x, xs, zp, w, ws, b, stride, pad, dil, groups, "relu6", 0.02, 0,
                                                None, impl="reference"))
    with pytest.raises(RuntimeError, match="channels-last uint8"):
        plan.run(x.contiguous())
    w[0, 0, 0, 0] = 65  # the plan checks the packed codes itself (a caller past the guard)
    with pytest.raises(RuntimeError, match=r"wider than \+-64"):
        conv_native.make_plan(w, ws, b, xs, zp, stride, pad, dil, groups, "relu6", 0.02, 0)
    dense = _args(1, 16, 16, 5, 3, 1, 1, 1, 1)
    dense[3][3, 2, 1, 0] = -65
    with pytest.raises(RuntimeError, match=r"wider than \+-64"):
        conv_native.make_plan(*dense[3:6], dense[1], dense[2], *dense[6:], "none", None, 0)


class _TFDepthwiseConv(torch.nn.Conv2d):
    """A TF-ported depthwise conv: "same" padding by F.pad (asymmetric at stride 2), then F.conv2d."""

    def __init__(self, channels: int, kernel: int, stride: int = 1) -> None:
        super().__init__(channels, channels, kernel, stride, padding=0, groups=channels)
        total = max(kernel - stride, 0)
        self.pads = [total // 2, total - total // 2] * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, self.pads), self.weight, self.bias, self.stride,
                                          0, self.dilation, self.groups)


def test_seven_bit_depthwise_model_runs_native_and_equals_the_reference(seven_bit_fast_and_reference):
    """A MobileNet-style stack quantized with 7-bit weights (plain and TF-ported depthwise convs,
    asymmetric padding folded in, a pointwise conv onto 24 channels): every conv runs the native
    loops (VNNI or AVX2) and the model's output equals the reference backend's bit for bit."""
    from quanta.integer.conv import _Int8ConvNd

    torch.manual_seed(0)
    dw = (lambda c, k, s=1: torch.nn.Conv2d(c, c, k, s, padding=k // 2, groups=c))
    model = torch.nn.Sequential(dw(40, 3), torch.nn.ReLU6(), torch.nn.Conv2d(40, 24, 1), _TFDepthwiseConv(24, 3, 2),
                                torch.nn.ReLU6(), dw(24, 5, 2), torch.nn.ReLU(), _TFDepthwiseConv(24, 5)).eval()
    images = [torch.rand(8, 40, 16, 16) for _ in range(2)]
    fast, ref = seven_bit_fast_and_reference(model, images)
    x = torch.rand(3, 40, 16, 16)
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))
    convs = [m for m in fast.modules() if isinstance(m, _Int8ConvNd)]
    assert len(convs) == 5 and all(set(m.kernel_counts) == {"native"} for m in convs), \
        [m.kernel_counts for m in convs]


def test_doctor_names_the_loaded_conv_loops():
    from quanta.kernels.doctor import diagnose

    report = diagnose()
    assert report.native_conv_isa == ISA and f"int8 conv native loops: {ISA}" in str(report)
    conv = next(op for op in report.ops if op.name == "int8_conv")
    state = next(i for i in conv.impls if i.name == "native")
    assert state.available and (("7-bit" in state.limits) != VNNI), state
