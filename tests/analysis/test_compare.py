"""`quanta.compare`: layer-by-layer errors between float, simulated and integer models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from fragile import FRAGILE, accuracy
from torch import nn

import quanta
from quanta.analysis.capture import capture_outputs
from quanta.analysis.compare import OUTPUT


def test_fragile_layer_ranked_first_and_keeping_it_float_restores_accuracy(fragile_cnn, fragile_sim, fragile_int,
                                                                           digits_data):
    x, y = digits_data.x_test, digits_data.y_test
    assert accuracy(fragile_cnn, x, y) > 0.95
    assert accuracy(fragile_int, x, y) < 0.8  # the planted layer costs accuracy in int8
    for quant in (fragile_sim, fragile_int):
        report = quanta.compare(fragile_cnn, quant, x[:128])
        assert report.ranked()[0].name == FRAGILE, str(report)
        assert report.row(FRAGILE).local_sqnr_db < 15 < report.row("features.0").local_sqnr_db
        assert report.row(OUTPUT).sqnr_db < 10
    kept = quanta.quantize(fragile_cnn, "static_int8", digits_data.calib_batches(), exclude=[FRAGILE],
                           speed_check=False, progress=False)
    assert accuracy(kept, x, y) > accuracy(fragile_cnn, x, y) - 0.02
    assert quanta.compare(fragile_cnn, kept, x[:128]).row(OUTPUT).sqnr_db > 20


def test_simulated_and_integer_agree_layer_by_layer(fragile_sim, fragile_int, digits_data):
    report = quanta.compare(fragile_sim, fragile_int, digits_data.x_test[:64], labels=("simulated", "integer"))
    compared = [r for r in report.rows if not math.isnan(r.sqnr_db)]
    assert {"features.0", "features.3", "features.7", "head", OUTPUT} <= {r.name for r in compared}
    # integer convs emit uint8 codes on the next layer's grid (rounded there: ~47 dB); after
    # that the integer model computes what the simulated one does
    assert min(r.sqnr_db for r in compared) > 40, str(report)
    assert report.row(OUTPUT).sqnr_db > 60
    assert "Int8Conv2d" in str(report) and "simulated" in str(report)


def test_separate_weight_and_activation_quantization(fragile_cnn, fragile_sim, digits_data):
    states = [(q.is_enabled) for q in fragile_sim.modules() if isinstance(q, quanta.TensorQuantizer)]
    report = quanta.compare(fragile_cnn, fragile_sim, digits_data.x_test[:64], separate=True)
    row = report.row(FRAGILE)
    # the 100x weight column ruins the layer's weight grid far more than the activations
    assert row.sqnr_weights_only_db < 12 < row.sqnr_activations_only_db
    assert row.sqnr_weights_only_db is not None and "W-only dB" in str(report)
    assert states == [q.is_enabled for q in fragile_sim.modules() if isinstance(q, quanta.TensorQuantizer)]
    with pytest.raises(ValueError, match="simulated model"):
        quanta.compare(fragile_cnn, fragile_cnn, digits_data.x_test[:8], separate=True)


def test_renamed_and_missing_layers_are_reported_not_skipped(trained_cnn, digits_data):
    class Wrapped(nn.Module):  # a conv-BN-ReLU block in a Sequential, as torchvision writes it
        def __init__(self, cnn: nn.Module):
            super().__init__()
            f = cnn.features
            self.features = nn.Sequential(nn.Sequential(f[0], f[1], f[2]), *list(f)[3:])
            self.pool, self.head = cnn.pool, cnn.head

        def forward(self, x):
            return self.head(torch.flatten(self.pool(self.features(x)), 1))

    model = Wrapped(copy.deepcopy(trained_cnn)).eval()
    q = quanta.quantize(model, "static_int8", digits_data.calib_batches(2), speed_check=False, progress=False)
    assert type(dict(q.named_modules())["features.0"]).__name__ == "Int8Conv2d"  # collapsed by convert
    report = quanta.compare(model, q, digits_data.x_test[:64])
    assert "features.0.0" in report.unmatched_a and "features.0" in report.unmatched_a["features.0.0"]
    assert report.row("features.0").sqnr_db > 30  # the block's output against the integer conv
    extra = copy.deepcopy(q)
    extra.extra = nn.Identity()
    del model.head  # (a broken model still reports: a name only one side has)
    report = quanta.compare(Wrapped(copy.deepcopy(trained_cnn)).eval(), extra, digits_data.x_test[:8])
    assert report.unmatched_b["extra"] == "no module of that name in the other model"
    assert "only in quantized: extra" in str(report)
    assert set(report.to_dict()) == {"labels", "rows", "unmatched_a", "unmatched_b", "notes"}


def test_capture_removes_hooks_when_forward_raises(trained_cnn):
    model = copy.deepcopy(trained_cnn)
    with pytest.raises(RuntimeError):
        capture_outputs(model, torch.zeros(2, 3, 8, 8))  # wrong channel count
    assert all(not m._forward_hooks for m in model.modules())
    got = capture_outputs(model, [torch.zeros(2, 1, 8, 8)] * 2, ["features.0"], inputs=True)
    assert len(got.outputs["features.0"]) == 2 and got.outputs["features.0"][0].shape == (2, 16, 8, 8)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        capture_outputs(model, torch.zeros(1, 1, 8, 8), ["nope"])


def test_bad_input_is_named(trained_cnn):
    with pytest.raises(TypeError, match="quant_model must be an nn.Module"):
        quanta.compare(trained_cnn, "model.pt", torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="data is empty"):
        quanta.compare(trained_cnn, trained_cnn, [])


def test_transformer_encoder_layer(trained_transformer, token_data):
    x = token_data.x_test[:64]
    q = quanta.quantize(trained_transformer, "dynamic_int8", speed_check=False, progress=False)
    report = quanta.compare(trained_transformer, q, x)
    for name in ("encoder.linear1", "encoder.linear2", "head"):
        assert report.row(name).kind_b == "Int8Linear" and report.row(name).sqnr_db > 30, str(report)
    assert report.row("embed").local_sqnr_db == math.inf  # token ids fed to the float embedding
    assert "never called as a module" in report.row("encoder.self_attn.out_proj").note
    # (the integer attention's own children are compared as the attention, the rest as the layer)
    assert report.unmatched_b and all(why.endswith(("compared as 'encoder'", "compared as 'encoder.self_attn'"))
                                      for why in report.unmatched_b.values())
