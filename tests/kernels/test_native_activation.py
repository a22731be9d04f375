"""The native epilogue's activations (csrc/activation.h): ReLU exactly, GELU (exact-erf and tanh
forms) within a stated bound of torch's, the same result wherever a value sits in a row, and
fused into `rescale_rows` / `int8_gemv` with the same bits as applying it after them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quanta.kernels import native
from quanta.kernels.linear_native import POST_OPS

pytestmark = pytest.mark.skipif(not native.ready(), reason="needs the native kernels")
#: |native - torch| <= BOUND * max(1, |x|) (measured 1.4e-6 for the erf form: torch's own erf
#: is ~1.2e-6 from float64's, the native one ~4e-7)
BOUND = 2e-6
GELUS = [("gelu", "none"), ("gelu_tanh", "tanh")]


def _apply(x: torch.Tensor, op: str) -> torch.Tensor:
    return native.module().apply_post_op_(x.clone(), POST_OPS[op])


def _within(got: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, bound: float = BOUND) -> None:
    err = (got.double() - ref.double()).abs() / x.double().abs().clamp_min(1)
    assert float(err.max()) <= bound, (float(err.max()), x[err.argmax()].item())


@pytest.mark.parametrize("op,approximate", GELUS)
def test_gelu_is_within_the_bound_of_torch_and_of_float64(op, approximate):
    x = torch.cat([torch.linspace(-12, 12, 400_001), torch.randn(50_000) * 4])
    got = _apply(x, op)
    _within(got, F.gelu(x, approximate=approximate), x)
    _within(got, F.gelu(x.double(), approximate=approximate), x, bound=7e-7)  # closer to the truth


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=70),
       st.sampled_from(GELUS))
def test_gelu_bound_on_arbitrary_rows(values, gelu):
    op, approximate = gelu
    x = torch.tensor(values, dtype=torch.float32)
    _within(_apply(x, op), F.gelu(x, approximate=approximate), x)


@pytest.mark.parametrize("op", ["gelu", "gelu_tanh", "relu"])
def test_special_values(op):
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 50.0, -50.0, 1e30, -1e30, float("inf"), float("nan")])
    got = _apply(x, op)
    assert torch.isnan(got[-1])  # NaN in, NaN out
    assert got[8] == float("inf") and got[6] == 1e30 and got[4] == 50.0
    assert got[0] == 0 and abs(float(got[5])) < 1e-30 and abs(float(got[7])) < 1e-30
    if op == "relu":
        assert torch.equal(got[:-1], torch.relu(x[:-1]))


@pytest.mark.parametrize("op", ["gelu", "gelu_tanh", "relu"])
def test_a_value_gives_one_result_wherever_it_sits(op):
    """Whole vectors and the masked last one run the same code."""
    v = torch.randn(7)
    expect = _apply(v.repeat(16 // 7 + 1)[:16].contiguous(), op)[:7]
    for n in range(1, 50):
        row = v.repeat(n // 7 + 1)[:n].contiguous()
        got = _apply(row, op)
        assert torch.equal(got, expect.repeat(n // 7 + 1)[:n]), n


def test_relu_is_torch_relu_bit_for_bit():
    x = torch.randn(10_001) * 100
    assert torch.equal(_apply(x, "relu"), torch.relu(x))


@pytest.mark.parametrize("op", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("M", [1, 3, 40])
def test_fused_epilogues_equal_the_separate_pass(op, M):
    lib = native.module()
    g = torch.Generator().manual_seed(M)
    K, N = 70, 37
    x = torch.randint(0, 256, (M, K), dtype=torch.uint8, generator=g)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    zp = torch.randint(0, 256, (M,), dtype=torch.int32, generator=g)
    xs, ws, b = torch.rand(M, generator=g) * 0.1, torch.rand(N, generator=g) * 0.1, torch.randn(N, generator=g)
    w_sum = lib.int8_row_sums(w)
    plain = lib.int8_gemv(x, zp, w, w_sum, xs, ws, b)
    assert torch.equal(lib.int8_gemv(x, zp, w, w_sum, xs, ws, b, POST_OPS[op]), _apply(plain, op))
    acc = x.int() @ w.int().t()
    fused = lib.rescale_rows(acc.clone(), zp, w_sum, xs, ws, b, POST_OPS[op])
    assert torch.equal(fused, _apply(lib.rescale_rows(acc.clone(), zp, w_sum, xs, ws, b), op))


def test_bad_post_op_codes_are_named():
    lib = native.module()
    with pytest.raises(RuntimeError, match="apply_post_op_: post_op must be"):
        lib.apply_post_op_(torch.zeros(3), 4)
    with pytest.raises(RuntimeError, match="apply_post_op_: needs a float32"):
        lib.apply_post_op_(torch.zeros(3, dtype=torch.float64), 1)
    with pytest.raises(RuntimeError, match="rescale_rows: post_op must be"):
        lib.rescale_rows(torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                         torch.zeros(2, dtype=torch.int32), torch.ones(1), torch.ones(2), None, -1)
