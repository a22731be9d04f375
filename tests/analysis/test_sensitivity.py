"""`quanta.sensitivity`: layers ranked by the damage their quantization does, with a fix."""

from __future__ import annotations

import pytest
import torch
from fragile import FRAGILE, accuracy

import quanta


def test_fragile_layer_ranked_first_by_accuracy_and_keeping_it_float_restores_it(fragile_cnn, digits_data):
    x, y = digits_data.x_test, digits_data.y_test

    def test_accuracy(model):
        return accuracy(model, x, y)

    report = quanta.sensitivity(fragile_cnn, "static_int8", digits_data.calib_batches(), test_accuracy)
    top = report.rows[0]
    assert top.layer == FRAGILE, str(report)
    assert top.damage > 0.1 and top.suggestion == "keep float"
    assert all(r.damage < 0.05 for r in report.rows[1:]), str(report)
    assert report.float_metric == pytest.approx(accuracy(fragile_cnn, x, y))
    assert report.quantized_metric < report.float_metric - 0.1
    kept = quanta.quantize(fragile_cnn, "static_int8", digits_data.calib_batches(),
                           exclude=[r.layer for r in report.rows if r.suggestion == "keep float"],
                           speed_check=False, progress=False)
    assert accuracy(kept, x, y) > report.float_metric - 0.02
    assert "test_accuracy" in str(report) and "keep float" in str(report)


def test_default_proxy_all_but_one_and_weights_only(fragile_cnn, digits_data):
    batches = digits_data.calib_batches(2)
    report = quanta.sensitivity(fragile_cnn, "static_int8", batches, mode="all_but_one")
    assert report.rows[0].layer == FRAGILE and report.rows[0].damage > 10, str(report)  # dB gained keeping it float
    assert report.float_metric > 100  # the unquantized simulated model (BatchNorm folded) against float
    weights = quanta.sensitivity(fragile_cnn, "static_int8", batches, what="weights")
    assert weights.rows[0].layer == FRAGILE and weights.rows[0].metric_weights is None
    assert weights.rows[0].metric < 15 < weights.rows[-1].metric  # output SQNR dB with that layer alone
    assert set(weights.to_dict()["rows"][0]) >= {"layer", "metric", "damage", "suggestion"}


def test_per_tensor_weights_get_per_channel_suggestion(fragile_cnn, digits_data):
    from quanta import LayerQuantConfig, QuantConfig, QuantDescriptor

    per_tensor = QuantConfig(default=LayerQuantConfig(input=None, weight=QuantDescriptor()), fold_bn=True)
    report = quanta.sensitivity(fragile_cnn, per_tensor, digits_data.calib_batches(1))
    assert report.rows[0].layer == FRAGILE and report.rows[0].suggestion == "per-channel weights", str(report)


@pytest.mark.parametrize("bad, error, message", [
    (lambda m: float("nan"), ValueError, r"NaN in trial 'float \(no quantizer\)'"),
    (lambda m: "0.9", TypeError, r"returned str in trial"),
    (lambda m: None, TypeError, r"returned NoneType in trial"),
], ids=["nan", "string", "none"])
def test_bad_metric_raises_naming_the_trial(trained_cnn, digits_data, bad, error, message):
    with pytest.raises(error, match=message):
        quanta.sensitivity(trained_cnn, "static_int8", digits_data.calib_batches(1), bad)


def test_nan_in_a_later_trial_is_named(trained_cnn, digits_data):
    calls = []

    def flaky(model):
        calls.append(1)
        return float("nan") if len(calls) == 3 else 1.0

    with pytest.raises(ValueError, match=r"trial 'features.0 \(one_at_a_time, both\)'"):
        quanta.sensitivity(trained_cnn, "static_int8", digits_data.calib_batches(1), flaky)


def test_bad_arguments(trained_cnn, digits_data):
    batches = digits_data.calib_batches(1)
    with pytest.raises(ValueError, match="mode must be one of"):
        quanta.sensitivity(trained_cnn, "static_int8", batches, mode="greedy")
    with pytest.raises(ValueError, match="what must be one of"):
        quanta.sensitivity(trained_cnn, "static_int8", batches, what="bias")
    with pytest.raises(TypeError, match="metric must be a callable"):
        quanta.sensitivity(trained_cnn, "static_int8", batches, 0.5)
    with pytest.raises(ValueError, match="unknown preset|preset"):
        quanta.sensitivity(trained_cnn, "int3", batches)
    assert torch.is_tensor(batches[0])
