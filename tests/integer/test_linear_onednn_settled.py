"""Tier 1 / 3: an `Int8Linear` whose first call ran oneDNN (7-bit weights, static per-tensor
activations, a CPU without VNNI) settles that call: later eager calls are one lookup and the
same two library calls (`quanta.kernels.linear_onednn.onednn_linear_call`), bit-identical to the
guarded path, and rebuilt when the weights change."""

from __future__ import annotations

import pytest
import torch

from quanta.core import QuantSpec
from quanta.integer.linear import Int8Linear
from quanta.kernels import linear as L
from quanta.kernels.linear_avx2 import avx2_gemm_available
from quanta.kernels.linear_onednn import onednn_auto_pack
from quanta.kernels.u8s8_saturation import SEVEN_BIT_MAX

pytestmark = pytest.mark.skipif(
    L.int8_linear.why_not_available("onednn") is not None or L.ONEDNN_SATURATION.exact()
    or onednn_auto_pack(torch.ones(2, 4, dtype=torch.int8)) is None,
    reason="impl='auto' runs oneDNN for 7-bit weights only on CPUs without VNNI")

K, N = 48, 40
#: the 7-bit GEMM impl="auto" settles on here: quanta's AVX2 GEMM (bit-exact) where this build has it
SEVEN_BIT_GEMM = "avx2_gemm" if avx2_gemm_available() else "onednn"
SPECS = {
    "u8_asym": QuantSpec(bits=8, signed=False, symmetric=False),
    "s8_sym": QuantSpec(bits=8, signed=True, symmetric=True),
    "s8_asym": QuantSpec(bits=8, signed=True, symmetric=False),
}


def _seven_bit_linear(spec: QuantSpec, post_op: str = "none", seed: int = 0) -> Int8Linear:
    g = torch.Generator().manual_seed(seed)
    mod = Int8Linear(K, N, act_spec=spec, weight_bits=7, post_op=post_op)
    mod.weight.copy_(torch.randint(-SEVEN_BIT_MAX, SEVEN_BIT_MAX + 1, (N, K), generator=g, dtype=torch.int8))
    mod.weight_scale.copy_(torch.rand(N, generator=g) * 0.01 + 1e-3)
    mod.bias.copy_(torch.randn(N, generator=g))
    mod.input_scale.fill_(0.031)
    mod.input_zero_point.fill_(0 if spec.symmetric else (-5 if spec.signed else 121))
    mod.pack()
    return mod


@pytest.mark.parametrize("post_op", ["none", "gelu"])
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_settled_onednn_call_equals_guarded_call(spec, post_op):
    mod = _seven_bit_linear(spec, post_op)
    x = torch.randn(3, 64, K) * 2
    first = mod(x)
    assert mod.kernel_counts[SEVEN_BIT_GEMM] == 1
    settled = {sig: impl for sig, (impl, _) in mod.binding.calls.items()}
    assert list(settled.values()) == [SEVEN_BIT_GEMM], settled
    again = mod(x)
    assert mod.kernel_counts[SEVEN_BIT_GEMM] == 2
    assert torch.equal(first, again)  # the settled call computes what the guarded call computed
    # and what the guarded kernels compute when asked directly, on a fresh input
    y = torch.randn(5, 7, K)
    fresh = _seven_bit_linear(spec, post_op)
    fresh.set_impl(SEVEN_BIT_GEMM)  # (a preferred kernel never settles: every call takes the guarded path)
    assert torch.equal(mod(y), fresh(y)) and not fresh.binding.calls


def test_settled_onednn_call_is_rebuilt_after_new_weights():
    mod = _seven_bit_linear(SPECS["u8_asym"])
    x = torch.randn(64, K)
    before = mod(x)
    other = _seven_bit_linear(SPECS["u8_asym"], seed=1)
    mod.load_state_dict(other.state_dict())
    after = mod(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, other(x))
