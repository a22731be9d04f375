"""Tier 3 / 1: transformer models as users build them (an HF BERT from a small config,
``nn.TransformerEncoderLayer`` stacks, plain Linears of odd sizes) under ``static_int8(weight_bits=7)``
on an AVX2 CPU without VNNI: every Linear runs ``avx2_gemm`` (settled after its first call), and the
whole model gives, bit for bit, what the same model gives with every Linear on the reference
kernel, at batch 1 and 8."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import quanta
from quanta.core import QuantSpec
from quanta.integer.linear import Int8Linear
from quanta.kernels.linear_avx2 import avx2_gemm_available

pytestmark = pytest.mark.skipif(not avx2_gemm_available(), reason="avx2_gemm: needs an AVX2 build without VNNI")


def _linears(model: nn.Module) -> list[Int8Linear]:
    return [m for m in model.modules() if isinstance(m, Int8Linear)]


def _on_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Int8Linear on the reference kernel (all else the same)."""
    import copy
    ref = copy.deepcopy(model)
    for m in _linears(ref):
        m.set_impl("reference")
    return ref


def _config() -> quanta.QuantConfig:
    return quanta.preset("static_int8", weight_bits=7)


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_size=68, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=131, max_position_embeddings=64)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 97, (2, 24), generator=g) for _ in range(3)]
    return quanta.quantize(model, _config(), calib_data=calib, speed_check=False).eval()


@pytest.mark.parametrize("batch", [1, 8])
def test_hf_bert_linears_run_avx2_gemm_bit_exact(bert, batch):
    ids = torch.randint(0, 97, (batch, 24), generator=torch.Generator().manual_seed(batch))
    ref = _on_reference(bert)
    with torch.no_grad():
        first, again, want = bert(ids).last_hidden_state, bert(ids).last_hidden_state, ref(ids).last_hidden_state
    lins = _linears(bert)
    assert len(lins) == 12
    assert all(set(m.kernel_counts) == {"avx2_gemm"} for m in lins), [dict(m.kernel_counts) for m in lins]
    assert all({impl for impl, _ in m.binding.calls.values()} == {"avx2_gemm"} for m in lins)
    assert torch.equal(first, again) and torch.equal(first, want)


@pytest.mark.parametrize("batch", [1, 8])
def test_transformer_encoder_layers_bit_exact(batch):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(36, 4, 70, dropout=0.0, batch_first=True, activation="gelu")
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    data = [torch.randn(2, 20, 36) for _ in range(3)]
    q = quanta.quantize(model, _config(), calib_data=data, speed_check=False).eval()
    ref = _on_reference(q)
    x = torch.randn(batch, 20, 36)
    with torch.no_grad():
        first, again, want = q(x), q(x), ref(x)
    assert torch.equal(first, again) and torch.equal(first, want)
    ran = Counter(impl for m in _linears(q) for impl in m.kernel_counts)
    assert set(ran) == {"avx2_gemm"}, ran


@pytest.mark.parametrize("post_op", ["none", "relu", "gelu"])
@pytest.mark.parametrize("spec", [QuantSpec(bits=8, signed=False, symmetric=False),
                                  QuantSpec(bits=8, signed=True, symmetric=True),
                                  QuantSpec(granularity="per_token")], ids=["u8_asym", "s8_sym", "dynamic_per_token"])
@pytest.mark.parametrize("k,n", [(37, 23), (130, 9), (64, 48)])
def test_plain_linear_settled_avx2_gemm_equals_reference(k, n, spec, post_op):
    g = torch.Generator().manual_seed(k * n)
    mod = Int8Linear(k, n, act_spec=spec, weight_bits=7, post_op=post_op)
    mod.weight.copy_(torch.randint(-63, 64, (n, k), generator=g, dtype=torch.int8))
    mod.weight_scale.copy_(torch.rand(n, generator=g) * 0.01 + 1e-3)
    mod.bias.copy_(torch.randn(n, generator=g))
    if not spec.dynamic:
        mod.input_scale.fill_(0.029)
        mod.input_zero_point.fill_(0 if spec.symmetric else 117)
    mod.pack()
    ref = _on_reference(mod)
    for rows in (40, 40, 77):  # guarded, settled, settled
        x = torch.randn(rows, k, generator=g) * 2
        assert torch.equal(mod(x), ref(x))
    assert set(mod.kernel_counts) == {"avx2_gemm"} and mod.kernel_counts["avx2_gemm"] == 3
    assert [impl for impl, _ in mod.binding.calls.values()] == ["avx2_gemm"]
