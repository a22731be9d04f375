"""convert / quantize: structure (which module and kernel ran), accuracy on trained models,
integer vs simulated agreement, presets, activation fusion, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta.demo import accuracy
from quanta.integer.attention import Int8MultiheadAttention
from quanta.integer.conv import Int8Conv2d
from quanta.integer.linear import Int8Linear
from quanta.integer.recurrent import DynamicInt8LSTM
from quanta.integer.weight_only import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from quanta.kernels import conv_native
from quanta.kernels.conv import ONEDNN_SATURATION, int8_conv


def _kernels(model: nn.Module) -> dict[str, dict[str, int]]:
    return {n: dict(m.kernel_counts) for n, m in model.named_modules() if isinstance(m, quanta.integer.IntegerModule)}


@pytest.fixture(scope="module")
def cnn_int8(trained_cnn, digits_data):
    return quanta.quantize(trained_cnn, "static_int8", digits_data.calib_batches(8), progress=False, speed_check=False)


def test_static_int8_cnn_structure_and_kernels(cnn_int8, digits_data):
    convs = [m for m in cnn_int8.modules() if isinstance(m, Int8Conv2d)]
    assert len(convs) == 3 and isinstance(cnn_int8.head, Int8Linear)
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in cnn_int8.modules())
    with torch.no_grad():
        cnn_int8(digits_data.x_test[:16])
    ran = _kernels(cnn_int8)
    # the fast int8 convs ran, not the reference: oneDNN for the 1-channel input, quanta's own
    # direct conv (csrc/conv.cpp) for the 16- and 32-channel ones where it is built (AVX-512 VNNI);
    # without VNNI neither is available (oneDNN's u8×s8 sums would saturate): the exact reference
    native = conv_native.conv_isa() == "avx512_vnni"  # (an AVX2 build's native loop: 7-bit depthwise only)
    full_range = "onednn" in int8_conv.available_impls() and ONEDNN_SATURATION.exact()  # (its weights are 8-bit)
    onednn = "onednn" if full_range else "reference"
    expect = {"features.0": onednn, "features.3": "native" if native else onednn,
              "features.7": "native" if native else onednn}
    for name, impl in expect.items():
        assert ran[name] == {impl: 1}, ran
    # conv -> (BN folded) -> ReLU -> conv: the first conv hands uint8 codes to the second
    assert cnn_int8.features[0].output_kind == "uint8"
    report = quanta.coverage(cnn_int8)
    assert report.counts["integer"] == 4
    assert f"kernels: {onednn}" in str(report) and (not native or "native" in str(report))


def test_static_int8_cnn_accuracy(cnn_int8, trained_cnn, digits_data):
    base = accuracy(trained_cnn, digits_data.x_test, digits_data.y_test)
    acc = accuracy(cnn_int8, digits_data.x_test, digits_data.y_test)
    assert acc >= base - 1.0, (base, acc)


def test_integer_cnn_matches_simulation(trained_cnn, digits_data):
    cfg = quanta.preset("static_int8")
    sim = quanta.calibrate(quanta.prepare(trained_cnn, cfg), digits_data.calib_batches(8), progress=False)
    integer = quanta.convert(sim)
    x = digits_data.x_test[:128]
    with torch.no_grad():
        ys, yi = sim(x), integer(x)
    # The head's input grid: one code of difference there moves a logit by at most
    # step * max_row |W|; the integer path may flip a code only at rounding ties.
    head_in = sim.head.input_quantizer.qparams()[0]
    bound = float(head_in) * float(sim.head.weight.detach().abs().sum(1).max())
    assert (yi - ys).abs().max() <= bound
    assert (yi.argmax(1) == ys.argmax(1)).float().mean() >= 0.99


def test_reference_backend_equals_fast_within_ties(trained_cnn, digits_data):
    sim = quanta.calibrate(quanta.prepare(trained_cnn, quanta.preset("static_int8")),
                           digits_data.calib_batches(4), progress=False)
    fast, ref = quanta.convert(sim), quanta.convert(sim, backend="reference")
    x = digits_data.x_test[:64]
    with torch.no_grad():
        yf, yr = fast(x), ref(x)
    assert set(k for v in _kernels(ref).values() for k in v) == {"reference"}
    assert torch.allclose(yf, yr, atol=float(sim.head.input_quantizer.qparams()[0]) * 5)


def test_dynamic_int8_lstm_and_transformer(trained_lstm, sequence_data, trained_transformer, token_data):
    q_lstm = quanta.quantize(trained_lstm, "dynamic_int8")
    assert isinstance(q_lstm.lstm, DynamicInt8LSTM) and isinstance(q_lstm.head, Int8Linear)
    base = accuracy(trained_lstm, sequence_data.x_test, sequence_data.y_test)
    assert accuracy(q_lstm, sequence_data.x_test, sequence_data.y_test) >= base - 1.0
    q_tf = quanta.quantize(trained_transformer, "dynamic_int8")
    enc = q_tf.encoder
    assert isinstance(enc.linear1, Int8Linear) and isinstance(enc.linear2, Int8Linear)
    assert isinstance(enc.self_attn, Int8MultiheadAttention)  # in/out projections per token, integer
    assert enc.self_attn.in_proj.act_spec.dynamic
    base = accuracy(trained_transformer, token_data.x_test, token_data.y_test)
    with torch.no_grad():  # eval + no_grad is where torch's fused path would have been taken
        assert accuracy(q_tf, token_data.x_test, token_data.y_test) >= base - 1.0
    assert enc.linear1.kernel_counts.total() > 0


@pytest.mark.parametrize("preset,cls,max_ratio", [
    ("weight_only_int8", Int8WeightOnlyLinear, 0.27), ("weight_only_int4", Int4WeightOnlyLinear, 0.15)])
def test_weight_only_sizes_and_accuracy(preset, cls, max_ratio):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512)).eval()
    q = quanta.quantize(model, preset, group_size=128 if preset.endswith("int4") else None)
    assert all(isinstance(q[i], cls) for i in (0, 2))
    assert quanta.storage_bytes(q) <= max_ratio * quanta.storage_bytes(model)
    x = torch.randn(4, 512)
    with torch.no_grad():
        y, yq = model(x), q(x)
    sqnr = 10 * torch.log10(y.pow(2).sum() / (y - yq).pow(2).sum())
    assert sqnr > (30 if preset.endswith("int8") else 15)


def test_float_model_untouched_by_quantize(trained_cnn, digits_data):
    before = copy.deepcopy(trained_cnn.state_dict())
    quanta.quantize(trained_cnn, "static_int8", digits_data.calib_batches(2), progress=False)
    after = trained_cnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(trained_cnn.features[0], nn.Conv2d)


def test_convert_uncalibrated_names_the_quantizer(trained_cnn):
    sim = quanta.prepare(trained_cnn, quanta.preset("static_int8"))
    with pytest.raises(ValueError, match=r"features\.0\.input_quantizer.*calibrate"):
        quanta.convert(sim)


def test_static_preset_without_data_raises(trained_cnn):
    with pytest.raises(ValueError, match="calib_data"):
        quanta.quantize(trained_cnn, "static_int8")


def test_bad_presets_and_backends(trained_cnn, digits_data):
    with pytest.raises(ValueError, match="unknown preset"):
        quanta.quantize(trained_cnn, "int3_magic")
    with pytest.raises(ValueError, match="group_size"):
        quanta.quantize(trained_cnn, "weight_only_int4", group_size=48)
    sim = quanta.calibrate(quanta.prepare(trained_cnn, quanta.preset("static_int8")),
                           digits_data.calib_batches(1), progress=False)
    with pytest.raises(ValueError, match="backend"):
        quanta.convert(sim, backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            quanta.convert(sim, backend="cuda")
    with pytest.raises(ValueError, match="no quantized modules"):
        quanta.convert(trained_cnn)


def test_integer_module_rejects_wrong_inputs(cnn_int8):
    with pytest.raises(TypeError):
        cnn_int8.head(torch.ones(2, 32, dtype=torch.int64))


@pytest.mark.parametrize("preset,kernel", [("weight_only_int8", "int8pack_mm"), ("weight_only_int4", "int4pack_mm")])
def test_weight_only_bf16_activations_match_simulation(preset, kernel):
    """The weight-only presets simulate bfloat16 activations and outputs, which is what the
    fast CPU kernels compute: integer vs simulated differs by bfloat16 rounding only."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    sim = quanta.prepare(model, quanta.preset(preset, **({"group_size": 64} if preset.endswith("int4") else {})))
    q = quanta.convert(sim)
    x = torch.randn(3, 256)
    with torch.no_grad():
        ys, yq = sim[0](x), q[0](x)
        # per layer, on the same input: the kernel rounds the product to bfloat16 before adding
        # the bias, so the difference is bounded by 2 bfloat16 steps (2^-8 relative each) of
        # the magnitudes summed, |x̂|·|Ŵ|ᵀ + |b|, not of the (possibly cancelled) result
        w_hat = sim[0].weight_quantizer(sim[0].weight)
        magnitude = x.bfloat16().float().abs() @ w_hat.abs().t() + sim[0].bias.abs()
        assert ((yq - ys).abs() <= 2 * 2.0 ** -8 * magnitude).all()
        zs, zq = sim(x), q(x)  # through both layers the bf16 differences compound a little
    assert 10 * torch.log10(zs.pow(2).sum() / (zs - zq).pow(2).sum()) > 35
    assert q[0].kernel_counts == {kernel: 2} and q[0].activation == "bfloat16"
