"""One static quantize: `quantize_activation` with static qparams (its native path) runs
`quanta.kernels.codes.quantize_codes`, and its codes equal quantize_codes' reference, the fused
path and quanta.core bit for bit (ties at .5, values beyond the clamp, 2..8 bits)."""

from __future__ import annotations

import pytest
import torch

from quanta.core import QuantSpec
from quanta.kernels import activation as A
from quanta.kernels import codes as C
from quanta.kernels import native

needs_native = pytest.mark.skipif(not native.ready(), reason="needs the native kernels")


def _rows(m: int, k: int, inv: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (150.0 / inv)
    ties = (torch.randint(-200, 200, (m, k), generator=g).float() + 0.5) / inv
    pick = torch.rand(m, k, generator=g) < 0.3
    return torch.where(pick, ties, x)


@needs_native
@pytest.mark.parametrize("bits,signed,symmetric", [(8, False, False), (8, True, True), (4, False, False),
                                                   (7, True, False)], ids=["u8", "s8-sym", "u4", "s7"])
@pytest.mark.parametrize("m,k", [(1, 7), (33, 64)], ids=["1x7", "33x64"])
def test_static_native_path_is_quantize_codes(monkeypatch, bits, signed, symmetric, m, k):
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric)
    scale = torch.tensor(0.037)
    zp = torch.tensor(0 if symmetric else (2 if signed else 3 * (1 << bits) // 8), dtype=torch.int32)
    x = _rows(m, k, 1 / 0.037, seed=m * k + bits)
    assert A.quantize_activation.choose(x, scale, zp, bits, signed, symmetric, False, False, "half_even") == "native"

    calls = []
    op = A.quantize_codes  # (an AttributeError before: the static path had its own quantize)

    def spy(*args, **kwargs):
        calls.append(kwargs.get("impl"))
        return op(*args, **kwargs)
    monkeypatch.setattr(A, "quantize_codes", spy)
    codes, s, z = A.quantize_activation_spec(x, spec, scale, zp, impl="native")
    assert calls == ["native"]
    assert torch.equal(s, scale) and torch.equal(z, zp)

    inv = float(torch.reciprocal(scale))
    want = C.quantize_codes(x, inv, int(zp), spec.qmin, spec.qmax, signed, False, impl="reference")
    assert codes.dtype == want.dtype and torch.equal(codes, want)
    for impl in ("fused", "reference"):
        assert torch.equal(A.quantize_activation_spec(x, spec, scale, zp, impl=impl)[0], want)
