"""Tier 3 / 1 on transformer models as users build them, under ``static_int8(weight_bits=7)`` on a
CPU without VNNI (where oneDNN sums 7-bit weight codes exactly): an HF BERT from a small config and
``nn.TransformerEncoderLayer`` stacks. Every Linear runs oneDNN, one activation quantize pass and
one GEMM per call, settled after the first call; the settled calls give the bits the first
(guarded) calls gave, and the integer model stays close to its simulation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import quanta
from quanta.integer.attention import Int8MultiheadAttention
from quanta.integer.linear import Int8Linear
from quanta.kernels import linear as L
from quanta.kernels import native
from quanta.kernels.linear_avx2 import avx2_gemm_available
from quanta.kernels.linear_onednn import onednn_auto_pack

pytestmark = pytest.mark.skipif(
    L.int8_linear.why_not_available("onednn") is not None or L.ONEDNN_SATURATION.exact()
    or onednn_auto_pack(torch.ones(2, 4, dtype=torch.int8)) is None or not native.ready(),
    reason="impl='auto' runs oneDNN for 7-bit weights only on CPUs without VNNI (with the native quantize)")


#: the 7-bit GEMM impl="auto" runs: quanta's AVX2 GEMM (bit-exact, the activation quantization fused
#: into its first pass) where this build has it, else oneDNN
SEVEN_BIT_GEMM = "avx2_gemm" if avx2_gemm_available() else "onednn"


def _config() -> quanta.QuantConfig:
    return quanta.preset("static_int8", weight_bits=7)


def _count_quantize_passes(monkeypatch) -> Counter:
    """Counts the native static quantize passes (the settled calls' and the guarded path's)."""
    lib = native.module()
    counts: Counter = Counter()
    real = lib.quantize_static

    class Counting:
        def __getattr__(self, name):
            return getattr(lib, name)

        @staticmethod
        def quantize_static(*args):
            counts["quantize_static"] += 1
            return real(*args)

        @staticmethod
        def quantized_linear_avx2(*args):  # (the quantize pass fused into the GEMM: one pass too)
            counts["quantize_static"] += 1
            return lib.quantized_linear_avx2(*args)
    monkeypatch.setattr(native, "module", lambda: Counting())
    return counts


def _linears(model: nn.Module) -> dict[str, Int8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 97, (2, 16), generator=g) for _ in range(3)]
    q = quanta.quantize(model, _config(), calib_data=calib, speed_check=False).eval()
    return model, q, torch.randint(0, 97, (2, 16), generator=g)


def test_hf_bert_linears_run_onednn_once_per_call_then_settle(bert, monkeypatch):
    model, q, ids = bert
    lins = _linears(q)
    assert len(lins) == 2 * 6  # query, key, value, attention output, intermediate, output per layer
    counts = _count_quantize_passes(monkeypatch)  # (before the first call: the settled calls hold the library)
    with torch.no_grad():
        first = q(ids).last_hidden_state
        assert all(m.kernel_counts == Counter({SEVEN_BIT_GEMM: 1}) for m in lins.values()), \
            {n: dict(m.kernel_counts) for n, m in lins.items()}
        assert all([impl for impl, _ in m.binding.calls.values()] == [SEVEN_BIT_GEMM] for m in lins.values())
        assert counts["quantize_static"] == len(lins)
        again = q(ids).last_hidden_state
    assert counts["quantize_static"] == 2 * len(lins)  # one activation quantize pass per Linear and call
    assert all(m.kernel_counts == Counter({SEVEN_BIT_GEMM: 2}) for m in lins.values())  # one GEMM per Linear per call
    assert torch.equal(first, again)  # settled calls: the guarded calls' bits
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), again.flatten(), dim=0)
    assert cos > 0.99, float(cos)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_transformer_encoder_attention_projections_run_onednn_settled(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    shape = (3, 10, 32) if batch_first else (10, 3, 32)
    data = [torch.randn(*shape) for _ in range(3)]
    q = quanta.quantize(model, _config(), calib_data=data, speed_check=False).eval()
    attn = [m for m in q.modules() if isinstance(m, Int8MultiheadAttention)]
    assert len(attn) == 2
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[1:, 7:] = True
    with torch.no_grad():
        first = q(data[0], src_key_padding_mask=mask)
        again = q(data[0], src_key_padding_mask=mask)
    assert torch.equal(first, again)
    for a in attn:  # one packed in-projection GEMM and one out-projection per call, on oneDNN, settled
        for proj in (a.in_proj, a.out_proj):
            assert proj.kernel_counts == Counter({SEVEN_BIT_GEMM: 2})
            assert [impl for impl, _ in proj.binding.calls.values()] == [SEVEN_BIT_GEMM]
        assert a._frozen.fused(data[0])
