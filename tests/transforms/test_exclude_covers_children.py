"""An excluded module keeps everything inside it float, next to a rule whose glob's ``*`` also
matches its children by name (``exclude=["layers.*.self_attn"]`` with a rule on ``"layers.*"``):
MultiheadAttention's ``out_proj`` stays float in prepare, calibration leaves no quantizer
without a range, convert has no gap to paper over, and the excluded block computes the float
numbers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import quanta
from quanta import LayerQuantConfig, QuantConfig, TensorQuantizer
from quanta.transforms.decisions import DECISIONS_ATTR

RULED = QuantConfig(exclude=("layers.*.self_attn",), rules={"layers.*": LayerQuantConfig()})


class Encoder(nn.Module):
    """Transformer encoder layers held in ``self.layers``, as users write them."""

    def __init__(self, layers: int = 2, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
                                    for _ in range(layers))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder().eval()


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 5, 16, generator=g) for _ in range(n)]


def test_decide_lets_the_deeper_exclusion_win_over_a_wider_glob_rule():
    out_proj = nn.Linear(4, 4)
    assert RULED.decide("layers.0.self_attn.out_proj", out_proj).reason == "exclude:'layers.*.self_attn'"
    assert RULED.decide("layers.0.self_attn", out_proj).reason == "exclude:'layers.*.self_attn'"
    assert RULED.decide("layers.0.linear1", out_proj).reason == "rule:'layers.*'"
    # the same with a rule mapped to None in place of the exclusion
    none_rule = QuantConfig(rules={"layers.*.self_attn": None, "layers.*": LayerQuantConfig()})
    assert none_rule.decide("layers.0.self_attn.out_proj", out_proj).config is None
    # a pattern naming a module inside an excluded container still quantizes it
    inner = QuantConfig(exclude=("layers",), rules={"layers.*.linear1": LayerQuantConfig()})
    assert inner.decide("layers.0.linear1", out_proj).reason == "rule:'layers.*.linear1'"
    assert inner.decide("layers.0.linear2", out_proj).reason == "exclude:'layers'"


def test_excluded_attention_stays_float_through_prepare_calibrate_convert(encoder):
    prepared = quanta.prepare(encoder, RULED)
    decisions = getattr(prepared, DECISIONS_ATTR)
    for i, layer in enumerate(prepared.layers):
        assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert not any(isinstance(m, TensorQuantizer) for m in layer.self_attn.modules())
        assert decisions[f"layers.{i}.self_attn.out_proj"] == "exclude:'layers.*.self_attn'"
        assert isinstance(layer.linear1.weight_quantizer, TensorQuantizer)  # (the rule still applies)
    entries = {e.name: (e.status, e.detail) for e in quanta.coverage(prepared).entries}
    assert entries["layers.0.self_attn"] == ("excluded", "exclude:'layers.*.self_attn'")
    assert not any(name.startswith("layers.0.self_attn.") and status == "quantized"
                   for name, (status, _) in entries.items())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "quantizer(s) saw no data")
        quanta.calibrate(prepared, _batches())
    assert not [n for n, m in prepared.named_modules() if isinstance(m, TensorQuantizer) and m.needs_calibration]

    converted = quanta.convert(prepared)
    assert not [row for row in quanta.conversion_report(converted) if "calibration" in row.detail]
    x = _batches(1)[0]
    with torch.no_grad():
        for float_layer, layer in zip(encoder.layers, converted.layers):
            assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
            assert torch.equal(layer.self_attn(x, x, x)[0], float_layer.self_attn(x, x, x)[0])
        assert torch.nn.functional.cosine_similarity(converted(x).flatten(), encoder(x).flatten(), dim=0) > 0.99


def test_hf_bert_excluded_attention_keeps_every_submodule_float():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    bert = transformers.BertModel(config).eval()
    cfg = QuantConfig(exclude=("encoder.layer.*.attention",), rules={"encoder.layer.*": LayerQuantConfig()})
    prepared = quanta.prepare(bert, cfg)
    for layer in prepared.encoder.layer:
        assert not any(isinstance(m, TensorQuantizer) for m in layer.attention.modules())
        assert type(layer.attention.self.query) is nn.Linear and type(layer.attention.output.dense) is nn.Linear
        assert isinstance(layer.intermediate.dense.weight_quantizer, TensorQuantizer)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    quanta.calibrate(prepared, [ids])
    converted = quanta.convert(prepared)
    with torch.no_grad():
        hidden = bert.embeddings(ids)
        for float_layer, layer in zip(bert.encoder.layer, converted.encoder.layer):
            assert torch.equal(layer.attention(hidden)[0], float_layer.attention(hidden)[0])
