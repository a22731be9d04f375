"""`Int8MultiheadAttention`'s attention matmuls: the simulated ``qk_matmul`` / ``av_matmul``
quantizers (static per-tensor) applied as `FrozenFakeQuant` (five tensor ops instead of
`quanta.core.fake_quantize`'s machinery). Tier 1: bit-identical to the quantizers themselves, on
millions of values and on whole attentions (masks, both layouts, weights); tier 3: the fast path
is what runs, and a copy holds its own."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta.core import QuantSpec
from quanta.integer.attention import FrozenFakeQuant, Int8MultiheadAttention
from quanta.nn.descriptor import QuantDescriptor
from quanta.nn.modules.attention import mha_forward
from quanta.nn.tensor_quantizer import TensorQuantizer


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _calibrated(spec: QuantSpec, amax: float, amin: float | None = None) -> TensorQuantizer:
    q = TensorQuantizer(QuantDescriptor(num_bits=spec.bits, unsigned=not spec.signed, symmetric=spec.symmetric))
    q.set_range(torch.tensor(-amax if amin is None else amin), torch.tensor(amax))
    return q


SPECS = {
    "u8_asym": (QuantSpec(bits=8, signed=False, symmetric=False), 0.37, -0.21),
    "s8_sym": (QuantSpec(bits=8, signed=True, symmetric=True), 0.5, None),
    "u8_sym_probs": (QuantSpec(bits=8, signed=False, symmetric=True), 0.0123, 0.0),
}


@pytest.mark.parametrize("name", SPECS)
def test_frozen_fake_quant_is_the_quantizer_bit_for_bit(name):
    spec, amax, amin = SPECS[name]
    q = _calibrated(spec, amax, amin)
    assert q.spec.signed == spec.signed and q.spec.symmetric == spec.symmetric
    fast = FrozenFakeQuant(q)
    assert fast.eligible
    s, _ = q.qparams()
    g = torch.Generator().manual_seed(0)
    ties = (torch.arange(-300, 300) + 0.5) * float(s)  # every half-way point of the grid, and past its ends
    x = torch.cat([torch.randn(2_000_000, generator=g) * amax, ties, torch.tensor([0.0, -0.0, 1e30, -1e30, 1e-40])])
    with torch.no_grad():
        assert torch.equal(_bits(fast(x)), _bits(q(x)))
        strided = x[: 64 * 100].view(100, 64).t()  # a transposed (non-contiguous) operand, as kᵀ is
        assert torch.equal(_bits(fast(strided)), _bits(q(strided)))


def test_frozen_fake_quant_defers_to_the_quantizer_outside_its_case():
    q = _calibrated(*SPECS["u8_asym"][:2], -0.21)
    fast = FrozenFakeQuant(q)
    x = torch.randn(50)
    q.disable()
    assert fast(x) is x
    q.enable()
    q.enable_calib()  # (collecting statistics: the quantizer itself must see the data)
    calls = []
    q.register_forward_hook(lambda *a: calls.append(1))
    fast(x)
    assert calls == [1]
    q.disable_calib()
    fast(x.double())  # (another dtype)
    assert calls == [1, 1]
    fast(x)
    assert calls == [1, 1]
    assert not FrozenFakeQuant(TensorQuantizer(QuantDescriptor(num_bits=8, dynamic=True))).eligible
    assert not FrozenFakeQuant(TensorQuantizer(QuantDescriptor(num_bits=8, per_token=True, dynamic=True))).eligible


def _encoder(batch_first: bool, norm_first: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    shape = (3, 10, 32) if batch_first else (10, 3, 32)
    data = [torch.randn(*shape) for _ in range(3)]
    return quanta.quantize(model, "static_int8", calib_data=data, speed_check=False), data[0]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_int_attention_equals_its_quantizers_path(batch_first):
    """The same module through `mha_forward` with its `QuantMatMul` modules (what the simulation
    applies between the projections) gives the same bits, with masks and attention weights."""
    q, x = _encoder(batch_first, norm_first=batch_first)
    attn = q.layers[0].self_attn
    assert isinstance(attn, Int8MultiheadAttention)
    quantizers = [m for m in (attn.qk_matmul, attn.av_matmul) for m in m.modules() if isinstance(m, TensorQuantizer)]
    assert len(quantizers) == 4 and all(m.quantizing for m in quantizers)
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[1:, 6:] = True
    causal = torch.triu(torch.full((10, 10), float("-inf")), 1)
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": kpm}, {"attn_mask": causal, "need_weights": True},
                       {"key_padding_mask": kpm, "need_weights": True, "average_attn_weights": False}):
            full = {"key_padding_mask": None, "need_weights": False, "attn_mask": None, "average_attn_weights": True,
                    **kwargs}
            out, w = attn(x, x, x, **full)
            ref, ref_w = mha_forward(attn, attn._project, x, x, x, full["key_padding_mask"], full["need_weights"],
                                     full["attn_mask"], full["average_attn_weights"], False)
            assert torch.equal(_bits(out), _bits(ref))
            assert (w is None) == (ref_w is None) and (w is None or torch.equal(_bits(w), _bits(ref_w)))
        # unbatched
        x1 = x[0] if batch_first else x[:, 0]
        out, _ = attn(x1, x1, x1, need_weights=False)
        ref, _ = mha_forward(attn, attn._project, x1, x1, x1, None, False, None, True, False)
        assert torch.equal(_bits(out), _bits(ref))


def test_one_disabled_operand_quantizer_takes_the_per_operand_path_with_the_same_bits():
    q, x = _encoder(False, False)
    attn = q.layers[0].self_attn
    assert attn._frozen.fused(x)
    attn.av_matmul.other_quantizer.disable()  # v left in float
    try:
        assert not attn._frozen.fused(x)
        with torch.no_grad():
            out, _ = attn(x, x, x, need_weights=False)
            ref, _ = mha_forward(attn, attn._project, x, x, x, None, False, None, True, False)
        assert torch.equal(_bits(out), _bits(ref))
    finally:
        attn.av_matmul.other_quantizer.enable()


def test_attention_runs_the_frozen_path_one_projection_each():
    q, x = _encoder(True, False)
    attn = q.layers[0].self_attn
    calls = []
    for m in attn.modules():
        if isinstance(m, TensorQuantizer):
            m.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        attn(x, x, x, need_weights=False)
        before = (sum(attn.in_proj.kernel_counts.values()), sum(attn.out_proj.kernel_counts.values()))
        attn(x, x, x, need_weights=False)
    assert attn._frozen.fused(x)  # q, k, v fake-quantized in one pass over the in-projection's output
    assert calls == []  # no quantizer module ran: the four operands went through FrozenFakeQuant
    assert (sum(attn.in_proj.kernel_counts.values()), sum(attn.out_proj.kernel_counts.values())) == \
        (before[0] + 1, before[1] + 1)  # one packed in-projection GEMM, one out-projection per call


def test_a_copy_uses_its_own_quantizers():
    q, x = _encoder(True, False)
    attn = q.layers[0].self_attn
    with torch.no_grad():
        before = attn(x, x, x, need_weights=False)[0]
        twin = copy.deepcopy(attn)
        twin.qk_matmul.input_quantizer.amax.mul_(0.5)  # a different range in the copy only
        assert torch.equal(attn(x, x, x, need_weights=False)[0], before)
        changed = twin(x, x, x, need_weights=False)[0]
        ref, _ = mha_forward(twin, twin._project, x, x, x, None, False, None, True, False)
    assert not torch.equal(changed, before) and torch.equal(changed, ref)
