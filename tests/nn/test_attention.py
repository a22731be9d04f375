"""Quantized attention: exact float behaviour when off (masks, torch's fast path), the
re-implemented attention path, and int8 quality with quantized Q·Kᵀ and softmax·V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta.nn import QuantMatMul, QuantMultiheadAttention, QuantTransformerEncoderLayer, TensorQuantizer

B, T, E, H = 3, 6, 16, 4


def _quantizers(model: nn.Module) -> list[TensorQuantizer]:
    return [m for m in model.modules() if isinstance(m, TensorQuantizer)]


def _set_all(model: nn.Module, mode: str) -> None:
    """``off``: every quantizer disabled; ``observe``: active but only collecting (identity)."""
    for q in _quantizers(model):
        if mode == "off":
            q.disable()
        else:
            q.enable()
            q.disable_quant()
            q.enable_calib()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _sqnr_db(test: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (test - ref).pow(2).sum()))


def _masks(batch_first: bool) -> dict[str, dict]:
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, 4:] = True
    kpm[2, 1:] = True
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    float_mask = torch.randn(T, T)
    return {
        "no-mask": {},
        "key-padding": {"key_padding_mask": kpm},
        "bool-causal": {"attn_mask": causal},
        "float-masks": {"attn_mask": float_mask,
                        "key_padding_mask": torch.zeros(B, T).masked_fill(kpm, float("-inf"))},
        "per-head-mask": {"attn_mask": torch.randn(B * H, T, T)},
        "causal-hint": {"attn_mask": causal, "is_causal": True},
    }


MASK_IDS = list(_masks(True))


def _mha_and_inputs(batch_first: bool, **kwargs):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **kwargs).eval()
    shape = (B, T, E) if batch_first else (T, B, E)
    return mha, torch.randn(shape), torch.randn(shape)


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("mask", MASK_IDS)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_mha_with_masks_off_equals_float_and_observe_path_matches(batch_first, mask, need_weights):
    mha, x, kv = _mha_and_inputs(batch_first)
    kwargs = dict(_masks(batch_first)[mask], need_weights=need_weights)
    qmha = quanta.prepare(mha)
    assert type(qmha) is QuantMultiheadAttention
    for q_in, k_in in ((x, x), (x, kv)):  # self-attention and cross-attention
        expected, exp_w = mha(q_in, k_in, k_in, **kwargs)
        _set_all(qmha, "off")
        got, got_w = qmha(q_in, k_in, k_in, **kwargs)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        if need_weights:
            torch.testing.assert_close(got_w, exp_w, atol=0, rtol=0)
        # quantizers active but only observing: quanta's own attention implementation runs
        _set_all(qmha, "observe")
        got, got_w = qmha(q_in, k_in, k_in, **kwargs)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert (got_w is None) == (exp_w is None)
        if need_weights:
            torch.testing.assert_close(got_w, exp_w, atol=1e-5, rtol=1e-5)
    assert qmha.qk_matmul.input_quantizer.calibrator.num_batches == 2


def test_mha_off_equals_float_on_torchs_inference_fast_path(monkeypatch):
    mha, x, _ = _mha_and_inputs(True)
    calls = []
    real = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    qmha = quanta.prepare(mha)
    _set_all(qmha, "off")
    with torch.no_grad():
        expected, _ = mha(x, x, x, need_weights=False)
        got, _ = qmha(x, x, x, need_weights=False)
    assert len(calls) == 2  # both took torch's fused path
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("extra", [{"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 8, "vdim": 12}],
                         ids=["bias-kv", "zero-attn", "separate-kv-dims"])
def test_mha_variants_observe_path_matches_float(extra):
    mha, x, _ = _mha_and_inputs(True, **extra)
    k = torch.randn(B, T, extra.get("kdim", E))
    v = torch.randn(B, T, extra.get("vdim", E))
    qmha = quanta.prepare(mha)
    _set_all(qmha, "observe")
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, 3:] = True
    expected, exp_w = mha(x, k, v, key_padding_mask=kpm)
    got, got_w = qmha(x, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_w, exp_w, atol=1e-5, rtol=1e-5)


@pytest.fixture
def fast_path_calls(monkeypatch):
    """Counts calls of torch's fused encoder-layer kernel (its inference fast path)."""
    calls = []
    real = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    return calls


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "key-padding"])
def test_encoder_layer_off_equals_float_on_the_fast_path(fast_path_calls, norm_first, padding):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.1, batch_first=True, norm_first=norm_first).eval()
    x = torch.randn(B, T, E)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, 4:] = True
    kwargs = {"src_key_padding_mask": kpm} if padding else {}
    qlayer = quanta.prepare(layer)
    assert type(qlayer) is QuantTransformerEncoderLayer
    _set_all(qlayer, "off")
    with torch.no_grad():
        expected = layer(x, **kwargs)
        assert len(fast_path_calls) == 1  # torch's fast path did apply to the float layer
        got = qlayer(x, **kwargs)
    assert len(fast_path_calls) == 2
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_encoder_layer_int8_leaves_the_fast_path_and_stays_close(fast_path_calls):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True).eval()
    calib = [torch.randn(8, T, E) for _ in range(4)]
    x = torch.randn(B, T, E)
    qlayer = quanta.prepare(layer)
    quanta.calibrate(qlayer, calib, progress=False)
    with torch.no_grad():
        got = qlayer(x)
        assert len(fast_path_calls) == 0  # the fused kernel would have bypassed every quantizer
        expected = layer(x)
    assert not torch.equal(got, expected)
    assert _cosine(got, expected) >= 0.99
    assert _sqnr_db(got, expected) > 25  # measured 36 dB at int8 (4-bit: 14 dB)
    for add in (qlayer.sa_add, qlayer.ff_add):
        assert add.input_quantizer.amax is not None and add.other_quantizer.amax is not None


def test_trained_transformer_int8_is_close_to_float_with_quantized_attention_matmuls(trained_transformer, token_data):
    model = quanta.prepare(trained_transformer)
    attn = model.encoder.self_attn
    assert isinstance(attn, QuantMultiheadAttention)
    assert isinstance(attn.qk_matmul, QuantMatMul) and isinstance(attn.av_matmul, QuantMatMul)
    quanta.calibrate(model, token_data.calib_batches(4, 64), progress=False)
    x = token_data.x_test
    with torch.no_grad():
        got, expected = model(x), trained_transformer(x)
    assert not torch.equal(got, expected)
    assert _cosine(got, expected) >= 0.99
    assert _sqnr_db(got, expected) > 35  # measured 47 dB at int8; 4-bit gives 19 dB, cosine 0.994
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree >= 0.97

    # the coverage report shows both attention matmuls quantized at int8 ...
    report = {e.name: e for e in quanta.coverage(model).entries}
    for name in ("encoder.self_attn.qk_matmul", "encoder.self_attn.av_matmul"):
        assert report[name].status == "quantized" and "int8" in report[name].detail
    assert "int8 u" in report["encoder.self_attn.av_matmul"].detail  # softmax output: unsigned
    # ... and calibration gave each of their quantizers a range
    for mm in (attn.qk_matmul, attn.av_matmul):
        for _, q in mm.quantizers():
            assert q.amax is not None and float(q.amax) > 0
    probs_amax = float(attn.av_matmul.input_quantizer.amax)
    assert 0 < probs_amax <= 1.0  # softmax probabilities


def test_mha_calibration_does_not_warn_about_unused_key_value_quantizers(recwarn):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.0, batch_first=True).eval()
    qlayer = quanta.prepare(layer)
    quanta.calibrate(qlayer, [torch.randn(4, T, E)], progress=False)
    assert not [w for w in recwarn if "saw no data" in str(w.message)]
    assert qlayer.self_attn.key_input_quantizer.amax is None  # self-attention reuses the query codes
