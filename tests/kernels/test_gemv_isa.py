"""Tier 1: the native int8 gemv's fast loop (AVX-512 VNNI, or AVX2's exact ``vpmaddwd`` on
int16-widened codes) gives the exact int32 sums at the extremes of full 8-bit weights and codes,
at every K tail, for 1..5 activation rows, with int8 codes (read as code + 128) and uint8 ones;
`gemv_isa` and `quanta doctor` say truthfully which loop the build has."""

from __future__ import annotations

import zlib

import pytest
import torch

from quanta.kernels import build_config as cfg
from quanta.kernels import linear as L
from quanta.kernels import native
from quanta.kernels.gemv_rows import gemv_isa, gemv_max_rows

ISA = gemv_isa()
needs_gemv = pytest.mark.skipif(ISA == "none", reason=f"no native gemv loop here (native: {native.status()})")

#: every remainder of the 32-column (AVX2) and 64 / 128-column (VNNI) steps, and 4096 (+-1)
KS = [1, 2, 31, 32, 33, 63, 64, 65, 127, 129, 4095, 4096, 4097]


def _exact(x: torch.Tensor, zp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.long() - zp.reshape(-1, 1).long()) @ w.long().t()


def _gemv(x, zp, w):
    """The native gemv with unit scales and no bias: float32 of the zero-point-corrected int32 sums."""
    n = w.shape[0]
    return L._int8_linear_gemv_native(x, torch.tensor(1.0), zp, w, torch.ones(n), None, None, None)


def test_gemv_isa_is_truthful():
    if not native.ready():
        assert ISA == "none"
        return
    vnni = bool(native.module().gemv_has_vnni())
    assert ISA in ("avx512_vnni", "avx2", "none")
    assert (ISA == "avx512_vnni") == vnni  # gemv_has_vnni stays the VNNI-only GEMM's switch
    if not vnni and "avx2" in cfg.cpu_features():
        assert ISA == "avx2"
    from quanta.kernels.doctor import diagnose
    report = diagnose()
    assert report.native_gemv_isa == ISA and report.native_vnni == vnni
    impls = {i.name: i for op in report.ops if op.name == "int8_linear" for i in op.impls}
    assert impls["gemv_native"].available == (ISA != "none")
    assert impls["gemm_native"].available == vnni
    text = str(report)
    assert "int8 GEMV" in text and ("AVX2" in text if ISA == "avx2" else True)


@needs_gemv
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("xdtype", [torch.uint8, torch.int8], ids=["u8", "s8-flip"])
def test_gemv_sums_exact_at_the_extremes(K, M, xdtype):
    """Codes at the top of their range (255 / 127, the largest products with -128) against weights
    of only -128 and 127 (signs random): raw sums up to 4097 * 255 * 128 (~2^27, exact int32 needed);
    with the zero point at the top too, the corrected sums stay below 2^24, so the float32 output
    shows a raw sum off by one."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((K, M, str(xdtype))).encode()) % 2**31)
    top = 255 if xdtype == torch.uint8 else 127
    N = 17
    w = torch.where(torch.rand(N, K, generator=g) < 0.5, -128, 127).to(torch.int8)
    x = (top - torch.randint(0, 6, (M, K), generator=g)).to(xdtype)
    for zp in (torch.tensor(top, dtype=torch.int32), torch.full((M,), top, dtype=torch.int32)):
        out = _gemv(x, zp, w)
        assert torch.equal(out.double(), _exact(x, zp, w).double())
        ref = L.int8_linear(x, torch.tensor(1.0), zp, w, torch.ones(N), None, None, None, impl="reference")
        assert torch.equal(out, ref)
    # all at the extremes, zero point 0: the largest |sums| (float32-rounded like the reference)
    for wv in (-128, 127):
        wf = torch.full((3, K), wv, dtype=torch.int8)
        xf = torch.full((M, K), top if xdtype == torch.uint8 else -128, dtype=xdtype)
        zp0 = torch.tensor(0, dtype=torch.int32)
        assert torch.equal(_gemv(xf, zp0, wf), _exact(xf, zp0, wf).float())


@needs_gemv
@pytest.mark.parametrize("K", [1, 33, 4097])
def test_row_sums_exact(K):
    """int8_row_sums (the zero-point term, a row of ones through the same kernel)."""
    g = torch.Generator().manual_seed(K)
    w = torch.randint(-128, 128, (37, K), dtype=torch.int8, generator=g)
    w[0] = -128
    w[1] = 127
    assert torch.equal(native.module().int8_row_sums(w), w.sum(1, dtype=torch.int32))


@needs_gemv
@pytest.mark.parametrize("xdtype", [torch.uint8, torch.int8], ids=["u8", "s8"])
def test_guard_picks_the_gemv_up_to_its_measured_rows(xdtype):
    """Where the build has the loop, the guards run it for a few rows (exact: same bits as the
    reference) and hand larger row counts to the other exact kernels."""
    g = torch.Generator().manual_seed(5)
    K, N = 96, 40
    limit = gemv_max_rows(N, K)
    assert limit >= 1
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    for M in (1, limit, limit + 1):
        lo, hi = (-128, 128) if xdtype == torch.int8 else (0, 256)
        x = torch.randint(lo, hi, (M, K), dtype=xdtype, generator=g)
        args = (x, torch.rand(M, generator=g) + 0.01, torch.randint(-3, 4, (M,), dtype=torch.int32, generator=g), w,
                torch.rand(N, generator=g) + 0.01, torch.randn(N, generator=g), None, None)
        chosen = L.int8_linear.choose(*args)
        assert (chosen == "gemv_native") == (M <= limit), (M, chosen)
        assert torch.equal(L.int8_linear(*args), L.int8_linear(*args, impl="reference"))
