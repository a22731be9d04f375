"""`quanta.auto_quantize`: per-layer precision chosen to meet an accuracy budget at the lowest cost."""

from __future__ import annotations

import pytest
import torch
from fragile import FRAGILE, accuracy

import quanta
from quanta.demo.models import DigitsCNN


def test_meets_budget_full_int8_misses_keeping_few_layers_float_and_round_trips(fragile_cnn, digits_data, tmp_path):
    x, y = digits_data.x_test, digits_data.y_test

    def test_accuracy(model):
        return accuracy(model, x, y)

    result = quanta.auto_quantize(fragile_cnn, digits_data.calib_batches(), test_accuracy, max_drop=0.02,
                                  candidates=("static_int8", "float"), objective="size")
    float_acc = accuracy(fragile_cnn, x, y)
    first = result.trials[0]
    assert not first.met and float_acc - first.metric > 0.1, str(result)  # full int8 misses the budget
    assert result.met and float_acc - accuracy(result.model, x, y) <= 0.02, str(result)
    floats = [n for n, c in result.choices.items() if c == "float"]
    assert floats == [FRAGILE], str(result)  # the fragile layer first, and only it
    assert len(result.trials) == 2 and all(t.cost > 0 for t in result.trials)
    assert result.config.rules[FRAGILE] is None and result.config.rules["features.0"] is not None
    assert "promote features.3 to float" in str(result) and "met" in str(result)
    path = quanta.save(result.model, tmp_path / "auto.safetensors")
    loaded = quanta.load(path, DigitsCNN)
    with torch.no_grad():
        assert torch.equal(loaded(x[:64]), result.model(x[:64]))
    # the config is an ordinary one: quantize with it again gives the same model
    again = quanta.quantize(fragile_cnn, result.config, digits_data.calib_batches(), speed_check=False, progress=False)
    with torch.no_grad():
        assert torch.equal(again(x[:64]), result.model(x[:64]))


def test_default_sqnr_metric_and_injected_latency(fragile_cnn, digits_data):
    seen = []

    def latency(model, batch):
        seen.append(sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()))
        return 1e-3 * (1 + seen[-1])  # float convs cost more here

    result = quanta.auto_quantize(fragile_cnn, digits_data.calib_batches(2), min_sqnr_db=25.0, latency_fn=latency)
    assert result.met and result.trials[-1].metric >= 25.0 and result.trials[0].metric < 25.0, str(result)
    assert result.choices[FRAGILE] == "float" and list(result.choices.values()).count("float") <= 2, str(result)
    assert len(seen) == len(result.trials) and result.trials[-1].cost == pytest.approx(1e-3 * (1 + seen[-1]))


@pytest.mark.parametrize("bad, error, message", [
    (lambda m: float("nan"), ValueError, r"auto_quantize: the metric returned NaN in trial 'float model'"),
    (lambda m: "0.9", TypeError, r"returned str in trial 'float model'"),
], ids=["nan", "string"])
def test_bad_metric_raises_naming_the_trial(trained_cnn, digits_data, bad, error, message):
    with pytest.raises(error, match=message):
        quanta.auto_quantize(trained_cnn, digits_data.calib_batches(1), bad, max_drop=0.1, objective="size")


def test_nan_in_a_trial_is_named(trained_cnn, digits_data):
    calls = []

    def flaky(model):
        calls.append(1)
        return 1.0 if len(calls) == 1 else float("nan")

    with pytest.raises(ValueError, match=r"trial '0 \(start"):
        quanta.auto_quantize(trained_cnn, digits_data.calib_batches(1), flaky, max_drop=0.1, objective="size")


def test_time_budget_too_small_for_one_trial(trained_cnn, digits_data):
    before = {k: v.clone() for k, v in trained_cnn.state_dict().items()}
    with pytest.raises(ValueError, match="too small for one trial"):
        quanta.auto_quantize(trained_cnn, digits_data.calib_batches(1), objective="size", time_budget_s=1e-6)
    assert all(torch.equal(v, trained_cnn.state_dict()[k]) for k, v in before.items())


def test_bad_arguments(trained_cnn, digits_data):
    batches = digits_data.calib_batches(1)
    with pytest.raises(ValueError, match="max_drop must be a number"):
        quanta.auto_quantize(trained_cnn, batches, lambda m: 1.0)
    with pytest.raises(ValueError, match="objective must be one of"):
        quanta.auto_quantize(trained_cnn, batches, objective="speed")
    with pytest.raises(ValueError, match="unknown preset"):
        quanta.auto_quantize(trained_cnn, batches, candidates=("int3", "float"))
    with pytest.raises(TypeError, match=r"candidates\[0\] must be"):
        quanta.auto_quantize(trained_cnn, batches, candidates=(8, "float"))
    with pytest.raises(ValueError, match="quantizes any layer"):
        quanta.auto_quantize(trained_cnn, batches, candidates=("float",))
    with pytest.raises(ValueError, match="time_budget_s must be"):
        quanta.auto_quantize(trained_cnn, batches, time_budget_s=0)


def test_a_candidate_a_layer_cannot_take_is_skipped_for_that_layer(fragile_cnn, digits_data):
    """weight_only_int4's group size 128 does not divide the 32-wide head (and it does not cover
    convs): the search starts each layer at the first candidate that fits it, never aborts."""
    x, y = digits_data.x_test, digits_data.y_test
    result = quanta.auto_quantize(fragile_cnn, digits_data.calib_batches(), lambda m: accuracy(m, x, y),
                                  max_drop=0.02, candidates=("weight_only_int4", "static_int8", "float"),
                                  objective="size")
    assert result.met, str(result)
    assert "weight_only_int4" not in result.choices.values()
    assert result.choices["head"] == "static_int8" and result.choices[FRAGILE] == "float", str(result)
