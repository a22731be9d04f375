"""Tier 1: every fast linear kernel equals its reference on fresh random integer inputs."""

from __future__ import annotations

import re
import zlib

import pytest
import torch

from quanta.core import QuantSpec, pack_bits, quantize_tensor
from quanta.kernels import activation as A
from quanta.kernels import fp8 as F8
from quanta.kernels import linear as L
from quanta.kernels import native
from quanta.kernels import weight_only as WO
from quanta.kernels.gemv_rows import gemv_isa, gemv_max_rows

#: what the guards choose for an int8 x int8 linear of >= 2 columns (conftest loads the native
#: kernels where they can be built)
INT_MM = "int_mm_native" if native.ready() else "int_mm"

SHAPES = [(1, 7, 33), (7, 33, 1), (33, 64, 7), (64, 2, 64), (1, 768, 48), (5, 130, 16)]
GEMV = gemv_isa() != "none"  # the native gemv's loop: AVX-512 VNNI or AVX2 (exact vpmaddwd)


def _choice(M: int, K: int, N: int) -> str:
    """What the guards pick for an int8 x int8 linear of these sizes on this machine."""
    if GEMV and M <= gemv_max_rows(N, K):
        return "gemv_native"
    if "float_sums" in L.int8_linear.available_impls() and K <= L.INT32_EXACT_MAX_K:
        return "float_sums"
    return INT_MM if K >= 2 else "reference"


def _ids(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _x_codes(M, K, dtype, g, transposed=False):
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    if transposed:  # non-contiguous (column-major) codes
        return torch.randint(lo, hi, (K, M), dtype=dtype, generator=g).t()
    return torch.randint(lo, hi, (M, K), dtype=dtype, generator=g)


def _int8_linear_args(M, K, N, xdtype, per_token, noncontig, g):
    """Random int8_linear arguments: codes, activation qparams (per token or per tensor), a
    wide-range int8 weight (incl. -128), weight scales, bias; no w_sum / packed weight."""
    x = _x_codes(M, K, xdtype, g, noncontig)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    n = M if per_token else 1
    xs = torch.rand(n, generator=g) * 0.1 + 1e-3
    lo, hi = (-20, 20) if xdtype == torch.int8 else (0, 256)
    zp = torch.randint(lo, hi, (n,), dtype=torch.int32, generator=g)
    if not per_token:
        xs, zp = xs.reshape(()), zp.reshape(())
    return (x, xs, zp, w, torch.rand(N, generator=g) * 0.01 + 1e-4, torch.randn(N, generator=g), None, None)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("xdtype", [torch.int8, torch.uint8], ids=["s8", "u8"])
@pytest.mark.parametrize("per_token", [False, True], ids=["tensor", "token"])
@pytest.mark.parametrize("noncontig", [False, True], ids=["contig", "transposed"])
def test_int8_linear_int_mm_equals_reference_bitwise(shape, xdtype, per_token, noncontig):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(xdtype), per_token, noncontig)).encode()) % 2**31)
    M, K, N = shape
    args = _int8_linear_args(M, K, N, xdtype, per_token, noncontig, g)
    x, xs, zp, w = args[:4]
    ref = L.int8_linear(*args, impl="reference")
    fast = L.int8_linear(*args, impl="int_mm")
    assert L.int8_linear.choose(*args) == _choice(M, K, N)
    torch.testing.assert_close(fast, ref, atol=0, rtol=0)  # same int32 sums, same rescale ops
    if _choice(M, K, N) == "gemv_native":  # the streaming kernel for a few rows: same sums, same epilogue
        torch.testing.assert_close(L.int8_linear(*args, impl="gemv_native"), ref, atol=0, rtol=0)
    if native.ready() and K >= 2:  # one fused pass for the zero point and the rescale: same numbers
        torch.testing.assert_close(L.int8_linear(*args, impl="int_mm_native"), ref, atol=0, rtol=0)
    # the integer sums themselves (scales 1, no bias) are exact even past 2^24 in the reference
    acc_ref = (x.long() - zp.reshape(-1, 1).long()) @ w.long().t()
    acc = L._int_mm_acc(x, zp, w, None)
    assert torch.equal(acc.long(), acc_ref)


@pytest.mark.skipif(not GEMV, reason="needs the native kernels built with AVX-512 VNNI or AVX2")
@pytest.mark.parametrize("M", [1, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("K", [1, 63, 64, 65, 130, 200, 256])
@pytest.mark.parametrize("N", [1, 5, 16, 37])
def test_gemv_native_equals_reference_bitwise_at_every_tail(M, K, N):
    """Passes of 4 activation rows over one weight row at a time, 128-byte steps of K, then one
    64-byte chunk, then a masked tail (VNNI; AVX2: 32-byte steps, then a zero-padded tail): every remainder, int8 and uint8 codes, per-token and per-tensor zero points, extreme values (the
    implementation is called directly: its guard also weighs speed, which refuses M = 16 here)."""
    gemv = L._int8_linear_gemv_native
    g = torch.Generator().manual_seed(zlib.crc32(repr((M, K, N)).encode()) % 2**31)
    for xdtype in (torch.int8, torch.uint8):
        for per_token in (False, True):
            args = _int8_linear_args(M, K, N, xdtype, per_token, False, g)
            ref = L.int8_linear(*args, impl="reference")
            torch.testing.assert_close(gemv(*args), ref, atol=0, rtol=0)
    lo = torch.full((M, K), -128, dtype=torch.int8)  # the largest |sums|
    w = torch.full((N, K), -128, dtype=torch.int8)
    out = gemv(lo, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), w, torch.ones(N), None, None, None)
    assert torch.equal(out.double(), torch.full((M, N), K * 128.0 * 128.0, dtype=torch.float64))


@pytest.mark.parametrize("M", [2, 7, 32])
@pytest.mark.parametrize("xdtype", [torch.int8, torch.uint8], ids=["s8", "u8"])
@pytest.mark.parametrize("per_token", [False, True], ids=["tensor", "token"])
def test_swapped_int_mm_equals_reference_bitwise(M, xdtype, per_token):
    """(W · Xᵀ)ᵀ for a few rows and a large weight: chosen by the guards, same numbers exactly."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((M, str(xdtype), per_token)).encode()) % 2**31)
    K, N = 2048, 2049  # N * K >= 2^22; odd N
    args = _int8_linear_args(M, K, N, xdtype, per_token, False, g)
    x, xs, zp = args[:3]
    expected = _choice(M, K, N)
    assert L.int8_linear.choose(*args) == (expected if expected in ("gemv_native", "float_sums") else "int_mm_swapped")
    fast = L.int8_linear(*args, impl="int_mm_swapped")
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, L.int8_linear(*args, impl="reference"), atol=0, rtol=0)
    assert L.int8_linear.choose(x[:1], xs if not per_token else xs[:1], zp if not per_token else zp[:1],
                                *args[3:]) == _choice(1, K, N)  # one row: the usual order is as fast


def test_int_mm_sums_exact_at_the_extremes():
    K = 4096
    x = torch.full((3, K), -128, dtype=torch.int8)
    w = torch.full((5, K), -128, dtype=torch.int8)
    assert torch.equal(L._int_mm_acc(x, torch.zeros((), dtype=torch.int32), w, None).long(),
                       torch.full((3, 5), K * 128 * 128, dtype=torch.long))
    xu = torch.full((2, K), 255, dtype=torch.uint8)
    acc = L._int_mm_acc(xu, torch.zeros((), dtype=torch.int32), torch.full((4, K), 127, dtype=torch.int8), None)
    assert torch.equal(acc.long(), torch.full((2, 4), K * 255 * 127, dtype=torch.long))


@pytest.mark.parametrize("shape", [(1, 7, 33), (7, 33, 5), (33, 64, 64), (64, 768, 7), (3, 1, 4)], ids=_ids)
@pytest.mark.parametrize("xdtype", [torch.int8, torch.uint8], ids=["s8", "u8"])
def test_int8_linear_onednn_matches_reference(shape, xdtype):
    why = L.int8_linear.why_not_available("onednn") or L.ONEDNN_SATURATION.reason()
    if why is not None:  # e.g. no VNNI: its int16 pair sums saturate (tests/kernels/test_u8s8_saturation.py;
        pytest.skip(f"onednn: {why}")  # 7-bit weights, exact there: tests/kernels/test_u8s8_seven_bit.py)
    g = torch.Generator().manual_seed(7)
    M, K, N = shape
    x = _x_codes(M, K, xdtype, g)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    xs = torch.tensor(0.037)
    zp = torch.tensor(0 if xdtype == torch.int8 else 131, dtype=torch.int32)
    ws = torch.rand(N, generator=g) * 0.01 + 1e-4
    b = torch.randn(N, generator=g)
    packed = L.onednn_prepack(w)
    args = (x, xs, zp, w, ws, b, None, packed)
    ref = L.int8_linear(*args, impl="reference")
    out = L.int8_linear(*args, impl="onednn")
    # integer sums exact: with unit scales and no bias the float output is the sum itself
    ones = L.int8_linear(x, torch.tensor(1.0), zp, w, torch.ones(N), None, None, packed, impl="onednn")
    assert torch.equal(ones.double(), ((x.long() - zp.long()) @ w.long().t()).double())
    ulp = torch.finfo(torch.float32).eps
    bound = L.ONEDNN_ULP_BOUND * ulp * (ref.abs() + b.abs())
    assert bool(((out - ref).abs() <= bound).all())
    if K >= 2 or _choice(M, K, N) == "gemv_native":
        assert L.int8_linear.choose(*args) == _choice(M, K, N)
    else:
        assert L.int8_linear.choose(*args) == "onednn"


def test_int8_linear_guards_raise_and_fall_back():
    x = torch.randint(-128, 128, (3, 1), dtype=torch.int8)
    w = torch.randint(-127, 128, (4, 1), dtype=torch.int8)
    args = (x, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), w, torch.ones(4), None, None, None)
    # K == 1: torch's CPU _int_mm is wrong there (the native gemv and the float sums are not)
    fallback = "float_sums" if "float_sums" in L.int8_linear.available_impls() else "reference"
    assert L.int8_linear.choose(*args) == ("gemv_native" if GEMV else fallback)
    with pytest.raises(ValueError, match="K=1"):
        L.int8_linear(*args, impl="int_mm")
    why = L.int8_linear.why_not_available("onednn")
    if why is None:
        with pytest.raises(ValueError, match="prepacked"):
            L.int8_linear(*args, impl="onednn")
    else:  # forced where it would give wrong sums (no VNNI) or cannot run: refused, saying why
        with pytest.raises(RuntimeError, match="not available on this machine: " + re.escape(why)):
            L.int8_linear(*args, impl="onednn")
    with pytest.raises(ValueError, match="unknown implementation"):
        L.int8_linear(*args, impl="nope")
    with pytest.raises(TypeError, match="int8/uint8"):
        L.int8_linear(x.float(), *args[1:], impl="reference")


@pytest.mark.parametrize("spec", [
    QuantSpec(granularity="per_token"),
    QuantSpec(granularity="per_token", symmetric=False),
    QuantSpec(granularity="per_token", symmetric=False, signed=False),
    QuantSpec(dynamic=True),
    QuantSpec(dynamic=True, symmetric=False, signed=False),
    QuantSpec(granularity="per_token", bits=4, narrow_range=True),
], ids=str)
def test_fused_activation_quantization_equals_core(spec):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(257, 1024, generator=g) * torch.rand(257, 1, generator=g) * 4
    # exact ties: values that land on k + 0.5 in scale units
    x[0, :16] = torch.arange(16) - 7.5
    x[0, 16] = 127.0
    ref = quantize_tensor(x, spec)
    codes, s, z = A.quantize_activation_spec(x, spec, impl="fused")
    assert A.quantize_activation_spec.__module__ == A.__name__
    assert torch.equal(codes, ref.q) and codes.dtype == ref.q.dtype
    assert torch.equal(s, ref.scale) and torch.equal(z, ref.zero_point)
    static = A.quantize_activation_spec(x, spec.replace(dynamic=False) if spec.granularity.value == "per_tensor"
                                        else spec, ref.scale if spec.granularity.value == "per_tensor" else None,
                                        ref.zero_point if spec.granularity.value == "per_tensor" else None)
    assert torch.equal(static[0], ref.q)


def test_fused_activation_quantization_raises_on_nan():
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        A.quantize_activation_spec(x, QuantSpec(granularity="per_token"), impl="fused")


@pytest.mark.parametrize("shape", [(1, 7, 33), (7, 64, 5), (8, 33, 64), (5, 256, 48)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_weight_only_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(11)
    M, K, N = shape
    x = torch.randn(K, M, generator=g).t().to(dtype)  # non-contiguous
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 0.02 + 1e-3
    b = torch.randn(N, generator=g)
    args = (x, w, s, b)
    bad_bf16 = dtype == torch.bfloat16 and K % 16  # torch's bf16 kernel crashes there
    assert WO.int8_weight_only_linear.choose(*args) == ("reference" if bad_bf16 else "int8pack_mm")
    if bad_bf16:
        return
    ref = WO.int8_weight_only_linear(*args, impl="reference")
    out = WO.int8_weight_only_linear(*args, impl="int8pack_mm")
    assert out.dtype == dtype
    # float accumulation in another order: bounded by K ulps of the sum of |terms| (+ bf16 rounding)
    eps = torch.finfo(dtype).eps
    mag = x.float().abs() @ (w.float().abs() * s[:, None]).t() + b.abs()
    assert bool(((out.float() - ref.float()).abs() <= 4 * eps * mag + K * 2**-23 * mag).all())


def test_weight_only_fp32_guard_many_rows():
    x = torch.randn(64, 32)
    args = (x, torch.zeros(16, 32, dtype=torch.int8), torch.ones(16), None)
    assert WO.int8_weight_only_linear.choose(*args) == "reference"
    assert WO.int8_weight_only_linear.choose(x.bfloat16(), *args[1:]) == "int8pack_mm"


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("kind", ["sym", "asym_signed", "asym_unsigned"])
@pytest.mark.parametrize("M", [1, 7])
def test_int4_weight_only_matches_reference(group_size, kind, M):
    g = torch.Generator().manual_seed(group_size + M)
    K, N = 256, 48
    symmetric, signed = kind == "sym", kind != "asym_unsigned"
    spec = WO.int4_spec(group_size, symmetric, signed)
    w = torch.randn(N, K, generator=g)
    q = quantize_tensor(w, spec)
    wp = pack_bits(q.q, 4, signed)
    zp = None if symmetric else q.zero_point.to(torch.int8)
    packed, sz = WO.int4pack_for_cpu(wp, q.scale, zp, group_size, signed, K)
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g)
    args = (x, wp, q.scale, zp, group_size, signed, b, packed, sz)
    assert WO.int4_weight_only_linear.choose(*args) == "int4pack_mm"
    ref = WO.int4_weight_only_linear(*args, impl="reference")
    out = WO.int4_weight_only_linear(*args, impl="int4pack_mm")
    mag = x.abs() @ q.dequantize().abs().t() + b.abs()
    assert bool(((out - ref).abs() <= 4 * K * 2**-23 * mag).all())
    # the reference is quanta.core's dequantize + matmul
    torch.testing.assert_close(ref, torch.nn.functional.linear(x, q.dequantize(), b), atol=0, rtol=0)


def test_int4_guards():
    K, N = 64, 8  # N % 16 != 0
    wp = torch.zeros(N, K // 2, dtype=torch.uint8)
    args = (torch.randn(1, K), wp, torch.ones(N, 2), None, 32, True, None, None, None)
    assert WO.int4_weight_only_linear.choose(*args) == "reference"
    with pytest.raises(ValueError, match="prepacked"):
        WO.int4_weight_only_linear(*args, impl="int4pack_mm")


def test_fp8_reference_and_cpu_choice():
    x = torch.randn(4, 32).to(torch.float8_e4m3fn)
    w = torch.randn(16, 32).to(torch.float8_e4m3fn)
    xs, ws = torch.tensor(0.5), torch.tensor(0.25)
    y = F8.fp8_linear(x, xs, w, ws, None)
    torch.testing.assert_close(y, (x.float() * 0.5) @ (w.float() * 0.25).t(), atol=0, rtol=0)
    assert F8.fp8_linear.choose(x, xs, w, ws, None) == "reference"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_int_mm_matches_reference():
    g = torch.Generator().manual_seed(0)
    M, K, N = 64, 256, 128
    x = torch.randint(0, 256, (M, K), dtype=torch.uint8, generator=g).cuda()
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g).cuda()
    xs, zp = torch.rand(M).cuda() + 0.01, torch.randint(0, 256, (M,), dtype=torch.int32).cuda()
    ws, b = torch.rand(N).cuda() * 0.01, torch.randn(N).cuda()
    args = (x, xs, zp, w, ws, b, None, None)
    assert L.int8_linear.choose(*args) == "cuda_int_mm"
    torch.testing.assert_close(L.int8_linear(*args), L.int8_linear(*args, impl="reference"), atol=0, rtol=0)


@cuda
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 needs capability >= 8.9")
def test_cuda_fp8_scaled_mm_close_to_reference():
    x = torch.randn(32, 64, device="cuda").to(torch.float8_e4m3fn)
    w = torch.randn(32, 64, device="cuda").to(torch.float8_e4m3fn)
    xs, ws = torch.tensor(0.5, device="cuda"), torch.tensor(0.25, device="cuda")
    assert F8.fp8_linear.choose(x, xs, w, ws, None) == "scaled_mm"
    torch.testing.assert_close(F8.fp8_linear(x, xs, w, ws, None),
                               F8.fp8_linear(x, xs, w, ws, None, impl="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M, K, N", [(1, 7, 33), (33, 64, 7), (5, 1024, 16), (3, 1025, 9), (4, 2500, 5), (2, 1, 3)],
                         ids=_ids)
@pytest.mark.parametrize("xdtype", [torch.int8, torch.uint8], ids=["s8", "u8"])
@pytest.mark.parametrize("per_token", [False, True], ids=["tensor", "token"])
def test_float_sums_equal_reference_bitwise(M, K, N, xdtype, per_token):
    """float32 GEMMs on the codes, in chunks of FLOAT_EXACT_K: the exact int32 sums (K past one
    chunk, extreme codes included), hence the reference's output bit for bit."""
    g = torch.Generator().manual_seed(M * 10007 + K * 31 + N)
    args = list(_int8_linear_args(M, K, N, xdtype, per_token, False, g))
    if K >= 2:  # the extremes: every product at its largest magnitude
        args[0][0] = -128 if xdtype == torch.int8 else 255
        args[3][0] = -128
    ref = L.int8_linear(*args, impl="reference")
    torch.testing.assert_close(L.int8_linear(*args, impl="float_sums"), ref, atol=0, rtol=0)


def test_float_sums_refuse_a_rounding_matmul_precision():
    g = torch.Generator().manual_seed(0)
    args = _int8_linear_args(4, 64, 8, torch.uint8, False, False, g)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert "matmul_precision" in L._guard_float_sums(*args)
    finally:
        torch.set_float32_matmul_precision(before)
    assert L._guard_float_sums(*args) is None
