"""Tier 1 and structure for ``int8_linear``'s ``gemm_native``: the dense VNNI loop of the
convolutions run as a linear (int8 codes read as uint8 + 128, rescale_rows' per-row epilogue and
the activation in registers) equals the reference bit for bit, at every tail of its register
tiles (6 rows x 64 columns, 4 codes per step), and the guards only choose it with a packed weight."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta.kernels import linear as L
from quanta.kernels import native
from quanta.kernels.linear_native import POST_OPS, apply_post_op

VNNI = native.ready() and bool(native.module().gemv_has_vnni())
pytestmark = pytest.mark.skipif(not VNNI, reason="needs the native kernels built with AVX-512 VNNI")


def _args(M, K, N, xdtype, per_token, g, transposed=False, bias=True):
    lo, hi = (-128, 128) if xdtype == torch.int8 else (0, 256)
    x = (torch.randint(lo, hi, (K, M), dtype=xdtype, generator=g).t() if transposed
         else torch.randint(lo, hi, (M, K), dtype=xdtype, generator=g))
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    n = M if per_token else 1
    xs = torch.rand(n, generator=g) * 0.1 + 1e-3
    zp = torch.randint(-20, 20, (n,), dtype=torch.int32, generator=g) + (0 if xdtype == torch.int8 else 128)
    if not per_token:
        xs, zp = xs.reshape(()), zp.reshape(())
    b = torch.randn(N, generator=g) if bias else None
    return (x, xs, zp, w, torch.rand(N, generator=g) * 0.01 + 1e-4, b, None, L.gemm_pack(w))


@pytest.mark.parametrize("M", [1, 5, 6, 7, 13, 50])
@pytest.mark.parametrize("K", [4, 60, 64, 68, 260])
@pytest.mark.parametrize("N", [1, 15, 16, 17, 64, 65, 130])
def test_gemm_native_equals_reference_bitwise_at_every_tail(M, K, N):
    """Row tails (M % 6), column tails (N % 16, N % 64), short and odd-length K; int8 and uint8
    codes, per-token and per-tensor zero points, with and without bias, non-contiguous codes (the
    implementation is called directly: its guard leaves a few rows to the gemv)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((M, K, N)).encode()) % 2**31)
    for xdtype in (torch.int8, torch.uint8):
        for per_token in (False, True):
            args = _args(M, K, N, xdtype, per_token, g, transposed=per_token, bias=xdtype == torch.int8)
            ref = L.int8_linear(*args, impl="reference")
            torch.testing.assert_close(L._int8_linear_gemm_native(*args), ref, atol=0, rtol=0)


def test_gemm_native_sums_exact_at_the_extremes():
    """Codes of -128 read as 0 (+128) against weights of -128: the correction (zp + 128) * Σw
    carries the whole sum, K * 128 * 128, exactly; the largest K the guard admits for int32."""
    for K in (4, 4096):
        x = torch.full((7, K), -128, dtype=torch.int8)
        w = torch.full((20, K), -128, dtype=torch.int8)
        out = L._int8_linear_gemm_native(x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), w, torch.ones(20),
                                         None, None, L.gemm_pack(w))
        assert torch.equal(out.double(), torch.full((7, 20), K * 128.0 * 128.0, dtype=torch.float64))
    x = torch.full((7, 64), 127, dtype=torch.int8)
    w = torch.full((3, 64), 127, dtype=torch.int8)
    zp = torch.tensor(-128, dtype=torch.int32)
    out = L._int8_linear_gemm_native(x, torch.tensor(1.0), zp, w, torch.ones(3), None, None, L.gemm_pack(w))
    assert torch.equal(out.double(), torch.full((7, 3), 64 * 255.0 * 127.0, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(M=st.integers(1, 40), K4=st.integers(1, 40), N=st.integers(1, 80), per_token=st.booleans(),
       post=st.sampled_from(sorted(POST_OPS)), seed=st.integers(0, 2**31 - 1))
def test_gemm_epilogue_activation_equals_rescale_rows_then_the_activation(M, K4, N, per_token, post, seed):
    """The activation applied in registers gives what ``rescale_rows`` followed by the native
    post-op gives (the settled int_mm path), value for value: the same function on each lane."""
    g = torch.Generator().manual_seed(seed)
    x, xs, zp, w, ws, b, _, packed = _args(M, 4 * K4, N, torch.int8, per_token, g)
    lib = native.module()
    w_sum = L.weight_sum(w)
    zp1, xs1 = zp.reshape(-1).contiguous(), xs.reshape(-1).contiguous()
    fused = lib.int8_gemm(x, zp1, xs1, packed, w_sum, ws, b, POST_OPS[post])
    unfused = lib.rescale_rows(torch._int_mm(x, w.t()) if 4 * K4 >= 2 else None, zp1, w_sum, xs1, ws, b, 0)
    assert torch.equal(fused, apply_post_op(unfused, post, native_ran=True))


def test_guards_choose_gemm_native_only_with_its_packed_weight():
    g = torch.Generator().manual_seed(3)
    args = _args(40, 64, 32, torch.int8, True, g)
    assert L.int8_linear.choose(*args) == "gemm_native"
    assert L.int8_linear.choose(*args[:7], None) == "int_mm_native"  # no packed weight
    assert L.int8_linear.choose(*(a[:5] if i < 3 and a.dim() else a for i, a in enumerate(args[:3])), *args[3:]) \
        == "gemv_native"  # a few rows: the gemv, which needs no packed weight
    odd = _args(40, 66, 32, torch.int8, True, g)
    assert L.gemm_pack(odd[3]) is None  # K % 4: no packed form
    why = L._guard_gemm_native(*odd[:7], L.gemm_pack(args[3]))
    assert "K=66 is not a multiple of 4" in why
    assert "no weight packed" in L._guard_gemm_native(*args[:7], None)


def test_int8_gemm_refuses_bad_arguments():
    lib = native.module()
    w = torch.randint(-128, 128, (20, 8), dtype=torch.int8)
    ok = (torch.zeros(1, dtype=torch.int32), torch.ones(1), L.gemm_pack(w), L.weight_sum(w), torch.ones(20), None)
    x = torch.zeros(3, 8, dtype=torch.int8)
    assert lib.int8_gemm(x, *ok).shape == (3, 20)
    with pytest.raises(RuntimeError, match="row-major int8 codes"):
        lib.int8_gemm(x.to(torch.uint8), *ok)
    with pytest.raises(RuntimeError, match="K % 4 == 0"):
        lib.int8_gemm(torch.zeros(3, 6, dtype=torch.int8), *ok)
    with pytest.raises(RuntimeError, match="wpack must be contiguous int8"):
        lib.int8_gemm(x, ok[0], ok[1], w, *ok[3:])
    with pytest.raises(RuntimeError, match="wpack must be"):  # N is w_scale's length: the packed weight disagrees
        lib.int8_gemm(x, *ok[:4], torch.ones(40), None)
    with pytest.raises(RuntimeError, match="w_sum must be"):  # (as many 16-row blocks: the sums disagree)
        lib.int8_gemm(x, *ok[:4], torch.ones(24), None)
    with pytest.raises(RuntimeError, match="post_op"):
        lib.int8_gemm(x, *ok, 7)
