"""Sub-byte packing (int4 / int2 / int1): exact round trips, the documented bit order, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quanta.core import QuantSpec, pack_bits, qrange, quantize_tensor, unpack_bits

from .helpers import MEDIUM

WIDTHS = [(4, True), (4, False), (2, True), (2, False), (1, True), (1, False)]
WIDTH_IDS = [f"{'s' if s else 'u'}{b}" for b, s in WIDTHS]


def _codes(shape, bits, signed, seed=0):
    g = torch.Generator().manual_seed(seed)
    if bits == 1 and signed:
        return torch.randint(0, 2, shape, generator=g, dtype=torch.int8) * 2 - 1
    lo, hi = qrange(bits, signed)
    return torch.randint(lo, hi + 1, shape, generator=g).to(torch.int8 if signed else torch.uint8)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 33])
@pytest.mark.parametrize("bits,signed", WIDTHS, ids=WIDTH_IDS)
def test_round_trip_is_exact_for_any_last_dim(bits, signed, n):
    q = _codes((3, 5, n), bits, signed, seed=n)
    q0 = q.clone()
    packed = pack_bits(q, bits, signed)
    per = 8 // bits
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, -(-n // per))
    out = unpack_bits(packed, bits, signed, length=n)
    assert out.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(out, q)
    assert torch.equal(q, q0)


@MEDIUM
@given(st.sampled_from(WIDTHS), st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_round_trip_property(width, shape, seed):
    bits, signed = width
    q = _codes(tuple(shape), bits, signed, seed)
    for dtype in (torch.int32, torch.int64, q.dtype):  # any integer dtype packs
        packed = pack_bits(q.to(dtype), bits, signed)
        assert torch.equal(unpack_bits(packed, bits, signed, length=shape[-1]), q)


def test_bit_order_is_first_element_in_the_low_bits():
    assert pack_bits(torch.tensor([-1, 2], dtype=torch.int8), 4).tolist() == [0x2F]
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2, signed=False).tolist() == [0b00111001]
    assert pack_bits(torch.tensor([-2, 1, -1, 0]), 2).tolist() == [0b00110110]
    assert pack_bits(torch.tensor([1, -1, -1, 1, 1, 1, -1, 1, 1]), 1).tolist() == [0b10111001, 0b1]
    assert pack_bits(torch.tensor([7, -8, 5]), 4).tolist() == [0x87, 0x05]  # odd length: zero padded
    assert unpack_bits(torch.tensor([0x87, 0x05], dtype=torch.uint8), 4, length=3).tolist() == [7, -8, 5]


@pytest.mark.parametrize("bits", [4, 2])
def test_packs_what_quantize_produces(bits):
    x = torch.randn(6, 33, generator=torch.Generator().manual_seed(1))
    for signed in (True, False):
        spec = QuantSpec(bits=bits, signed=signed, symmetric=signed, granularity="per_channel", axis=0)
        qt = quantize_tensor(x, spec)
        out = unpack_bits(pack_bits(qt.q, bits, signed), bits, signed, length=33)
        assert torch.equal(out, qt.q)


def test_binary_codes_round_trip_through_one_bit():
    qt = quantize_tensor(torch.randn(4, 7), QuantSpec(bits=1))
    assert torch.equal(unpack_bits(pack_bits(qt.q, 1), 1, length=7), qt.q)


def test_packing_errors():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(4, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), 8)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.zeros(4), 4)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.zeros(4, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match=r"range \[-8, 7\]"):
        pack_bits(torch.tensor([8, 0]), 4)
    with pytest.raises(ValueError, match=r"range \[0, 15\]"):
        pack_bits(torch.tensor([-1, 0]), 4, signed=False)
    with pytest.raises(ValueError, match="-1 or \\+1"):
        pack_bits(torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_bits(torch.tensor(3), 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(torch.zeros(4, dtype=torch.int8), 4)
    packed = pack_bits(torch.zeros(7, dtype=torch.int8), 4)  # 4 bytes hold 7 or 8 codes
    with pytest.raises(ValueError, match="length"):
        unpack_bits(packed, 4, length=6)
    with pytest.raises(ValueError, match="length"):
        unpack_bits(packed, 4, length=9)
    assert unpack_bits(packed, 4).shape == (8,)
