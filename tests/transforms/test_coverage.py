"""The coverage report: quantized (bits, granularity), excluded by rule, float (type); counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta import QuantConfig
from quanta.demo import DigitsCNN, SequenceLSTM, TinyTransformer
from quanta.nn import LayerQuantConfig, QuantDescriptor


def _entries(model: nn.Module) -> dict[str, quanta.transforms.coverage.CoverageEntry]:
    return {e.name: e for e in quanta.coverage(model).entries}


def test_cnn_report_lists_quantized_float_and_counts():
    report = quanta.coverage(quanta.prepare(DigitsCNN()))
    assert report.counts == {"integer": 0, "quantized": 6, "fused": 0, "excluded": 0, "float": 6}
    entries = {e.name: e for e in report.entries}
    conv = entries["features.0"]
    assert (conv.type, conv.status) == ("QuantConv2d", "quantized")
    assert "input: int8 s sym per_tensor" in conv.detail
    assert "weight: int8 s sym narrow per_channel(axis=0)" in conv.detail
    assert entries["pool"].detail == "input: int8 s sym per_tensor"
    floats = {e.name: e.type for e in report.by_status("float")}
    assert floats == {"features.1": "BatchNorm2d", "features.2": "ReLU", "features.4": "BatchNorm2d",
                      "features.5": "ReLU", "features.8": "BatchNorm2d", "features.9": "ReLU"}
    assert "features" not in entries  # containers are not layers
    text = str(report)
    assert text.splitlines()[-1] == ("6 quantized, 0 excluded by rule, 6 float "
                                     "(no quantized version: BatchNorm2d×3, ReLU×3)")


def test_report_shows_bits_granularity_and_disabled_quantizers():
    cfg = QuantConfig(rules={"head": LayerQuantConfig(input=QuantDescriptor(num_bits=4, symmetric=False),
                                                      weight=QuantDescriptor(num_bits=4, group_size=8))})
    model = quanta.prepare(DigitsCNN(), cfg)
    head = _entries(model)["head"]
    assert "input: int4 s asym per_tensor" in head.detail
    assert "weight: int4 s sym per_group(g=8" in head.detail
    model.head.input_quantizer.disable()
    assert "input: off" in _entries(model)["head"].detail


def test_excluded_modules_are_listed_with_their_rule():
    cfg = QuantConfig(exclude=("features.0",), rules={"head": None}, module_types={"AvgPool2d": None})
    report = quanta.coverage(quanta.prepare(DigitsCNN(), cfg))
    excluded = {e.name: (e.type, e.detail) for e in report.by_status("excluded")}
    assert excluded == {"features.0": ("Conv2d", "exclude:'features.0'"), "head": ("Linear", "rule:'head'"),
                        "features.6": ("AvgPool2d", "type:AvgPool2d")}
    assert report.counts == {"integer": 0, "quantized": 3, "fused": 0, "excluded": 3, "float": 6}
    assert "3 quantized, 3 excluded by rule, 6 float" in str(report)


def test_lstm_report_has_no_internal_containers():
    report = quanta.coverage(quanta.prepare(SequenceLSTM()))
    assert {e.name: e.status for e in report.entries} == {"lstm": "quantized", "head": "quantized"}
    assert report.counts == {"integer": 0, "quantized": 2, "fused": 0, "excluded": 0, "float": 0}
    assert "hidden[l1]: int8" in report.entries[0].detail


def test_transformer_report_lists_attention_pieces():
    entries = _entries(quanta.prepare(TinyTransformer()))
    for name in ("embed", "encoder", "encoder.self_attn", "encoder.self_attn.out_proj",
                 "encoder.self_attn.qk_matmul", "encoder.self_attn.av_matmul", "encoder.linear1",
                 "encoder.linear2", "encoder.sa_add", "encoder.ff_add", "head"):
        assert entries[name].status == "quantized", name
    assert {entries[n].type for n in ("encoder.norm1", "encoder.dropout")} == {"LayerNorm", "Dropout"}
    assert entries["encoder.norm1"].status == "float"


class Custom(nn.Module):
    def forward(self, x):
        return x * 2


def test_unsupported_modules_are_never_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.LayerNorm(4), Custom(), nn.Identity(),
                          nn.Sequential(), nn.Flatten(), nn.Softmax(-1))
    prepared = quanta.prepare(model)
    report = quanta.coverage(prepared)
    assert report.counts == {"integer": 0, "quantized": 1, "fused": 0, "excluded": 0, "float": 6}
    assert {e.type for e in report.by_status("float")} == {"GELU", "LayerNorm", "Custom", "Identity",
                                                             "Flatten", "Softmax"}
    quanta.calibrate(prepared, [torch.randn(3, 4)], progress=False)
    assert prepared(torch.randn(3, 4)).shape == (3, 4)


def test_a_float_model_reports_everything_float():
    report = quanta.coverage(DigitsCNN())
    assert report.counts["quantized"] == 0 and report.counts["float"] == 12


@pytest.mark.parametrize("root", [nn.Linear(3, 3), nn.Conv2d(1, 1, 1)], ids=["linear", "conv2d"])
def test_a_quantizable_root_module_is_swapped_itself(root):
    prepared = quanta.prepare(root)
    assert isinstance(prepared, quanta.nn.QuantModule) and not isinstance(root, quanta.nn.QuantModule)
    report = quanta.coverage(prepared)
    assert [(e.name, e.status) for e in report.entries] == [("", "quantized")]
    assert report.counts["quantized"] == 1 and "(root)" in str(report)


def test_a_bare_encoder_layer_counts_itself_and_its_insides():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    entries = _entries(quanta.prepare(layer))
    assert entries[""].type == "QuantTransformerEncoderLayer"
    assert entries["self_attn.qk_matmul"].status == "quantized"
