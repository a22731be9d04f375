"""Tier 1: ``avx2_gemm`` (csrc/linear_avx2.cpp), the AVX2 u8 x s8 GEMM for 7-bit weights, gives the
reference `int8_linear`'s bits: exact int32 sums and the reference's float32 epilogue, at odd sizes
(K not a multiple of 4 or 16, N not a multiple of 16, row counts that leave partial register tiles),
int8 and uint8 codes, per-tensor and per-row qparams, with and without bias; its fused static
quantization gives ``quantize_static``'s codes; weights past ±64 are refused."""

from __future__ import annotations

import pytest
import torch

from quanta.kernels import linear as L
from quanta.kernels import native
from quanta.kernels.linear_avx2 import avx2_auto_pack, avx2_gemm_available, avx2_pack, is_avx2_pack

pytestmark = pytest.mark.skipif(not avx2_gemm_available(), reason="avx2_gemm: needs an AVX2 build without VNNI")

SHAPES = [(1, 3, 1), (5, 17, 9), (7, 384, 24), (13, 130, 33), (6, 4, 16), (128, 384, 40), (19, 1537, 17), (2, 64, 8)]


def _case(m, k, n, dtype, per_row, bias, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 255) if dtype == torch.uint8 else (-128, 127)
    x = torch.randint(lo, hi + 1, (m, k), generator=g, dtype=torch.int16).to(dtype)
    w = torch.randint(-64, 65, (n, k), generator=g, dtype=torch.int8)
    rows = m if per_row else 1
    xs = torch.rand(rows, generator=g) * 0.1 + 0.01
    xz = torch.randint(lo, hi + 1, (rows,), generator=g, dtype=torch.int32)
    return (x, xs, xz, w, torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g) if bias else None, None,
            avx2_pack(w))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("per_row", [False, True], ids=["per_tensor", "per_row"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8], ids=["u8", "s8"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_avx2_gemm_equals_reference_bit_for_bit(shape, dtype, per_row, bias):
    args = _case(*shape, dtype, per_row, bias, seed=sum(shape))
    ref = L.int8_linear(*args, impl="reference")
    assert torch.equal(L.int8_linear(*args, impl="avx2_gemm"), ref)
    assert L.int8_linear.choose(*args) in ("avx2_gemm", "gemv_native")  # (the gemv: few rows)


def test_avx2_gemm_extreme_codes_are_exact():
    # every pair sum at the int16 edge (255 * 64 * 2 = 32640) and the int32 sums far from zero
    m, k, n = 9, 1000, 20
    x = torch.full((m, k), 255, dtype=torch.uint8)
    w = torch.full((n, k), 64, dtype=torch.int8)
    w[::2] = -64
    args = (x, torch.tensor(0.5), torch.tensor(0, dtype=torch.int32), w, torch.ones(n), None, None, avx2_pack(w))
    assert torch.equal(L.int8_linear(*args, impl="avx2_gemm"), L.int8_linear(*args, impl="reference"))


@pytest.mark.parametrize("signed,zp", [(False, 121), (True, -5), (True, 0)])
@pytest.mark.parametrize("shape", [(50, 77, 20), (128, 384, 384), (3, 5, 70)])
def test_fused_quantize_gives_quantize_static_codes_and_reference_bits(shape, signed, zp):
    m, k, n = shape
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g) * 3
    w = torch.randint(-64, 65, (n, k), generator=g, dtype=torch.int8)
    w_scale, bias, scale = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g), torch.tensor(0.031)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    inv = float(torch.reciprocal(scale))
    lib = native.module()
    codes = lib.quantize_static(x, inv, zp, qmin, qmax, signed)
    ref = L.int8_linear(codes, scale, torch.tensor(zp, dtype=torch.int32), w, w_scale, bias, None, None,
                        impl="reference")
    got = lib.quantized_linear_avx2(x, inv, zp, qmin, qmax, scale.reshape(1), avx2_pack(w),
                                    w.sum(1, dtype=torch.int32), w_scale, bias)
    assert torch.equal(got, ref)


def test_wide_weights_are_refused_with_a_reason():
    w = torch.randint(-64, 65, (16, 32), dtype=torch.int8)
    w[3, 5] = 65
    assert avx2_auto_pack(w) is None
    x = torch.zeros(40, 32, dtype=torch.uint8)
    args = (x, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), w, torch.ones(16), None, None, avx2_pack(w))
    assert "±64" in L.int8_linear._by_name["avx2_gemm"].guard(*args)
    assert L.int8_linear.choose(*args) != "avx2_gemm"
    with pytest.raises(Exception, match="64"):
        L.int8_linear(*args, impl="avx2_gemm")


def test_pack_layout_and_bad_pack_errors():
    w = torch.arange(-20, 20, dtype=torch.int8).reshape(5, 8)
    p = avx2_pack(w)
    assert p.shape == (1, 2, 16, 4) and is_avx2_pack(p, 5, 8) and not is_avx2_pack(p, 5, 12)
    assert torch.equal(p[0, 1, 2], w[2, 4:8]) and not p[0, :, 5:].any()  # channel 2, inputs 4..7; zero rows past N
    with pytest.raises(RuntimeError, match="wpack must be"):
        native.module().int8_linear_avx2(torch.zeros(3, 12, dtype=torch.uint8), torch.zeros(1, dtype=torch.int32),
                                         torch.ones(1), p, w.sum(1, dtype=torch.int32), torch.ones(5), None)


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
@pytest.mark.parametrize("shape", [(1, 37, 23), (7, 130, 40), (1025, 37, 23), (13, 384, 8)])
def test_relu_in_the_tiles_gives_the_reference_bits(shape, signed):
    # post_op 1 (ReLU) applied by the kernel to each output tile: torch.relu of the reference's output
    m, k, n = shape
    g = torch.Generator().manual_seed(m * 7 + k + n)
    x = torch.randn(m, k, generator=g) * 3
    w = torch.randint(-64, 65, (n, k), generator=g, dtype=torch.int8)
    w_scale, bias, scale = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g), torch.tensor(0.029)
    qmin, qmax, zp = (-128, 127, -3) if signed else (0, 255, 131)
    inv, lib = float(torch.reciprocal(scale)), native.module()
    codes = lib.quantize_static(x, inv, zp, qmin, qmax, signed)
    z = torch.tensor(zp, dtype=torch.int32)
    ref = torch.relu(L.int8_linear(codes, scale, z, w, w_scale, bias, None, None, impl="reference"))
    ws, pack = w.sum(1, dtype=torch.int32), avx2_pack(w)
    assert torch.equal(lib.quantized_linear_avx2(x, inv, zp, qmin, qmax, scale.reshape(1), pack, ws, w_scale, bias,
                                                 post_op=1), ref)
    assert torch.equal(lib.int8_linear_avx2(codes, z.reshape(1), scale.reshape(1), pack, ws, w_scale, bias, post_op=1), ref)


def test_gelu_in_the_tiles_is_apply_post_op_on_the_output():
    # the tiles run apply_post_op_'s own code on each value: the same bits as the whole-tensor pass
    m, k, n = 45, 70, 37
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g) * 3
    w = torch.randint(-64, 65, (n, k), generator=g, dtype=torch.int8)
    args = (x, 25.0, 120, 0, 255, torch.tensor([0.04]), avx2_pack(w), w.sum(1, dtype=torch.int32),
            torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g))
    lib = native.module()
    for code in (2, 3):
        assert torch.equal(lib.quantized_linear_avx2(*args, post_op=code),
                           lib.apply_post_op_(lib.quantized_linear_avx2(*args), code))
    with pytest.raises(RuntimeError, match="post_op must be"):
        lib.quantized_linear_avx2(*args, post_op=4)  # (relu6: not a linear post-op)
