"""The native conv loops and the residual add round like the reference whatever rounding mode the
calling thread has set.

Their epilogue's float32 multiply / add and the conversion to codes (which is the rounding half to
even: no separate round instruction) follow MXCSR; each parallel task holds it at round to nearest
(`NearestRounding` in csrc/conv_kernels.h) and gives the caller's mode back. Without that, a caller
in ``FE_UPWARD`` (a numerics library, an interval-arithmetic user) would get other codes. The plan
(its float32 constants) is built first, as an integer module settles it once: torch's own ops that
build it follow the caller's mode like any torch op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest
import torch

from quanta.kernels import conv_native, native
from quanta.kernels.codes import add_codes
from quanta.kernels.conv import int8_conv
from quanta.kernels.u8s8_saturation import SEVEN_BIT_MAX

HAS_NATIVE = "native" in int8_conv.available_impls()
pytestmark = [
    pytest.mark.skipif(not HAS_NATIVE, reason="native int8 conv (AVX-512 VNNI or AVX2 build) not available"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 rounding-mode values"),
]
#: <fenv.h> on x86: the rounding directions fesetround takes
FE_TONEAREST, FE_DOWNWARD, FE_UPWARD, FE_TOWARDZERO = 0x000, 0x400, 0x800, 0xC00
LIBM = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")

# (n, c, o, size, k, stride, pad, groups): a 1x1 conv (the AVX2 pointwise loop), a padded 3x3
# (the dense loop), a depthwise 3x3, a 3-channel stem (the AVX2 gathered loop)
CASES = {
    "pointwise": (2, 16, 40, 9, 1, 1, 0, 1),
    "dense-3x3": (1, 12, 24, 11, 3, 1, 1, 1),
    "depthwise-3x3": (2, 32, 32, 13, 3, 2, 1, 32),
    "stem-3-channels": (1, 3, 16, 15, 3, 2, 1, 1),
}


def _args(n, c, o, size, k, stride, pad, groups):
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=gen)
    lo, hi = (-128, 127) if conv_native.conv_isa() == "avx512_vnni" else (-SEVEN_BIT_MAX, SEVEN_BIT_MAX)
    w = torch.randint(lo, hi + 1, (o, c // groups, k, k), dtype=torch.int8, generator=gen)
    ws = torch.rand(o, generator=gen) * 0.01 + 1e-4
    return (x, 0.013, 7, w, ws, torch.randn(o, generator=gen), [stride] * 2, [pad] * 2, [1, 1], groups)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("post_op,out", [("relu", (0.05, 3)), ("relu6", (0.03, 0)), ("none", (0.07, 128)),
                                         ("relu", (None, 0))])
@pytest.mark.parametrize("case", list(CASES))
def test_native_conv_ignores_the_callers_rounding_mode(case, post_op, out, threads):
    args = (*_args(*CASES[case]), post_op, *out, None)
    if int8_conv.choose(*args) != "native" and conv_native.guard_native(*args) is not None:
        pytest.skip(f"the native loop does not take {case} here: {conv_native.guard_native(*args)}")
    ref = int8_conv(*args, impl="reference")
    x, x_scale, x_zp, w, ws, bias, stride, padding, dilation, groups = args[:10]
    plan = conv_native.make_plan(w, ws, bias, x_scale, x_zp, stride, padding, dilation, groups, *args[10:13])
    x = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(plan.run(x), ref)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for mode in (FE_UPWARD, FE_DOWNWARD, FE_TOWARDZERO):
            assert LIBM.fesetround(mode) == 0
            got = plan.run(x)
            assert LIBM.fegetround() == mode, "the kernel must give the caller's rounding mode back"
            LIBM.fesetround(FE_TONEAREST)
            assert torch.equal(got, ref), f"mode {mode:#x}: max diff {(got.double() - ref.double()).abs().max()}"
    finally:
        LIBM.fesetround(FE_TONEAREST)
        torch.set_num_threads(before)


@pytest.mark.skipif(not native.ready(), reason="needs the native kernels")
@pytest.mark.parametrize("post_op", ["none", "relu", "relu6"])
def test_native_add_codes_ignores_the_callers_rounding_mode(post_op):
    gen = torch.Generator().manual_seed(2)
    a, b = (torch.randint(0, 256, (4, 24, 9, 9), dtype=torch.uint8, generator=gen) for _ in range(2))
    args = (a, 0.0371, 3, b, 0.125, 128, post_op, 1 / 0.05, 7, 0, 255)
    ref = add_codes(*args, impl="reference")
    try:
        for mode in (FE_UPWARD, FE_DOWNWARD, FE_TOWARDZERO):
            assert LIBM.fesetround(mode) == 0
            got = add_codes(*args, impl="native")
            assert LIBM.fegetround() == mode
            LIBM.fesetround(FE_TONEAREST)
            assert torch.equal(got, ref), f"mode {mode:#x}"
    finally:
        LIBM.fesetround(FE_TONEAREST)
