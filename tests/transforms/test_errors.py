"""Bad input gets clear errors: unmatched rules, wrongly typed configs, bad calibration data."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import quanta
from quanta import QuantConfig
from quanta.demo import DigitsCNN
from quanta.nn import LayerQuantConfig, QuantDescriptor, TensorQuantizer

W4 = LayerQuantConfig(weight=QuantDescriptor(num_bits=4))


# ---------------------------------------------------------------------------- rules that match nothing
@pytest.mark.parametrize("config,pattern,close", [
    (QuantConfig(rules={"featurs.0": W4}), "featurs.0", "features.0"),
    (QuantConfig(exclude=("haed",)), "haed", "head"),
    (QuantConfig(rules={"feature.*": W4}), "feature.*", "features"),
], ids=["rule-typo", "exclude-typo", "glob-typo"])
def test_unmatched_rule_warns_with_the_closest_names(config, pattern, close):
    with pytest.warns(UserWarning, match="matches no module") as record:
        quanta.prepare(DigitsCNN(), config)
    message = str(record[0].message)
    assert repr(pattern) in message and close in message and "DigitsCNN" in message


def test_matching_rules_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quanta.prepare(DigitsCNN(), QuantConfig(rules={"features.*": W4, "head": None}, exclude=("pool",)))


# ---------------------------------------------------------------------------- wrong types name the field
BAD_VALUES = {
    # id: (builder, field the message must name)
    "config-default-str": (lambda: QuantConfig(default="int8"), "QuantConfig.default"),
    "config-type-value-int": (lambda: QuantConfig(module_types={"Linear": 8}), "QuantConfig.module_types"),
    "config-type-key-int": (lambda: QuantConfig(module_types={3: W4}), "QuantConfig.module_types"),
    "config-rule-dict": (lambda: QuantConfig(rules={"head": {"weight": None}}), "QuantConfig.rules"),
    "config-exclude-int": (lambda: QuantConfig(exclude=[1]), "QuantConfig.exclude"),
    "config-fold_bn-str": (lambda: QuantConfig(fold_bn="yes"), "QuantConfig.fold_bn"),
    "layer-input-int": (lambda: LayerQuantConfig(input=8), "LayerQuantConfig.input"),
    "layer-weight-dict": (lambda: LayerQuantConfig(weight={"num_bits": 4}), "LayerQuantConfig.weight"),
    "desc-bits-str": (lambda: QuantDescriptor(num_bits="8"), "QuantDescriptor.num_bits"),
    "desc-bits-float": (lambda: QuantDescriptor(num_bits=8.0), "QuantDescriptor.num_bits"),
    "desc-per_channel-int": (lambda: QuantDescriptor(per_channel=1), "QuantDescriptor.per_channel"),
    "desc-amax-str": (lambda: QuantDescriptor(amax="2.0"), "QuantDescriptor.amax"),
    "desc-axis-bool": (lambda: QuantDescriptor(axis=True), "QuantDescriptor.axis"),
    "desc-calib_method-unknown": (lambda: QuantDescriptor(calib_method="median"), "QuantDescriptor.calib_method"),
    "desc-amax-negative": (lambda: QuantDescriptor(amax=-1.0), "QuantDescriptor.amax"),
    "desc-percentile-101": (lambda: QuantDescriptor(percentile=101), "QuantDescriptor.percentile"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_wrong_config_values_raise_naming_the_field(case):
    build, field = BAD_VALUES[case]
    with pytest.raises((TypeError, ValueError), match=field.replace(".", r"\.")):
        build()


def test_descriptor_rejects_two_granularities_and_bad_bits():
    with pytest.raises(ValueError, match="granularity"):
        QuantDescriptor(per_channel=True, per_token=True)
    with pytest.raises(ValueError, match="bits"):
        QuantDescriptor(num_bits=17)
    with pytest.raises(ValueError, match="learn_amax"):
        QuantDescriptor(per_token=True, learn_amax=True)


# ---------------------------------------------------------------------------- calibration errors
def test_calibrating_a_model_without_quantizers_raises_clearly():
    with pytest.raises(ValueError, match=r"no quantizers to calibrate.*quanta\.prepare"):
        quanta.calibrate(DigitsCNN(), [torch.rand(2, 1, 8, 8)], progress=False)
    everything_excluded = quanta.prepare(nn.Sequential(nn.Linear(2, 2)), QuantConfig(exclude=("0",)))
    with pytest.raises(ValueError, match="no quantizers to calibrate"):
        quanta.calibrate(everything_excluded, [torch.rand(2, 2)], progress=False)


@pytest.mark.parametrize("data", [[], iter(()), torch.utils.data.DataLoader([])], ids=["list", "iterator", "loader"])
def test_empty_calibration_data_raises(data):
    model = quanta.prepare(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="calibration data is empty"):
        quanta.calibrate(model, data, progress=False)
    assert model[0].input_quantizer.mode == "quantize"  # the quantizers are left as they were


def test_a_single_tensor_or_unknown_batch_type_raises():
    model = quanta.prepare(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match=r"wrap a single tensor"):
        quanta.calibrate(model, torch.rand(4, 2), progress=False)
    with pytest.raises(TypeError, match="forward_fn"):
        quanta.calibrate(model, [3.0], progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        quanta.calibrate("model", [torch.rand(4, 2)], progress=False)


class MakesNaN(nn.Module):
    def forward(self, x):
        return x.masked_fill(x > 0.9, float("nan"))


def test_nan_activations_during_calibration_raise_naming_the_module():
    model = quanta.prepare(nn.Sequential(nn.Linear(4, 4), MakesNaN(), nn.Linear(4, 2)))
    model.train()
    x = torch.full((2, 4), 0.0)
    with torch.no_grad():
        model[0].bias.fill_(1.0)  # every activation becomes 1.0 > 0.9 → NaN
    with pytest.raises(ValueError, match=r"'2\.input_quantizer'.*NaN"):
        quanta.calibrate(model, [x], progress=False)
    # the model is left usable: modes and training flag restored, no stale calibration state
    assert model.training
    assert {q.mode for q in model.modules() if isinstance(q, TensorQuantizer)} == {"quantize"}
    with torch.no_grad():
        model[0].bias.fill_(0.0)
    quanta.calibrate(model, [torch.rand(2, 4) * 0.1], progress=False)
    assert model[2].input_quantizer.amax is not None
