"""QuantConfig: per-type overrides, per-name rules and globs, exclusions, precedence, round-trip."""

from __future__ import annotations

import dataclasses
import json

import pytest
from torch import nn

import quanta
from quanta import QuantConfig
from quanta.demo import DigitsCNN, TinyTransformer
from quanta.nn import LayerQuantConfig, QuantDescriptor, QuantModule

W4 = LayerQuantConfig(input=QuantDescriptor(num_bits=4), weight=QuantDescriptor(num_bits=4, per_channel=True))
W2 = LayerQuantConfig(input=QuantDescriptor(num_bits=2), weight=QuantDescriptor(num_bits=2))
CONVS = ("features.0", "features.3", "features.7")


def _prepare(config: QuantConfig) -> nn.Module:
    return quanta.prepare(DigitsCNN(), config)


def _bits(model: nn.Module, name: str) -> int | None:
    """Bits of the module's weight quantizer (input quantizer for pools); None if float."""
    mod = model.get_submodule(name)
    if not isinstance(mod, QuantModule):
        return None
    q = mod.weight_quantizer or mod.input_quantizer
    return q.spec.bits


def _status(model: nn.Module) -> dict[str, tuple[str, str]]:
    return {e.name: (e.status, e.detail) for e in quanta.coverage(model).entries}


def test_default_quantizes_every_supported_layer_at_int8():
    model = _prepare(QuantConfig())
    for name in (*CONVS, "head"):
        layer = model.get_submodule(name)
        assert layer.weight_quantizer.spec.bits == 8 and layer.weight_quantizer.spec.axis == 0
        assert layer.input_quantizer.spec.bits == 8 and layer.input_quantizer.spec.axis is None
    assert _bits(model, "features.6") == 8 and _bits(model, "pool") == 8


@pytest.mark.parametrize("key", ["Linear", nn.Linear], ids=["by-name", "by-class"])
def test_per_type_override(key):
    model = _prepare(QuantConfig(module_types={key: W4}))
    assert _bits(model, "head") == 4
    assert [_bits(model, n) for n in CONVS] == [8, 8, 8]


def test_per_type_uses_the_closest_class_in_the_mro():
    model = _prepare(QuantConfig(module_types={"Module": W2, "Conv2d": W4}))
    assert [_bits(model, n) for n in CONVS] == [4, 4, 4]
    assert _bits(model, "head") == 2 and _bits(model, "pool") == 2


def test_per_type_none_leaves_that_type_in_float():
    model = _prepare(QuantConfig(module_types={"Linear": None}))
    assert type(model.head) is nn.Linear
    assert _status(model)["head"] == ("excluded", "type:Linear")


@pytest.mark.parametrize("pattern,expected", [
    ("head", {"head": 4, "features.0": 8}),
    ("features.*", {"features.0": 4, "features.3": 4, "features.6": 4, "features.7": 4, "head": 8, "pool": 8}),
    ("features", {"features.0": 4, "features.7": 4, "head": 8}),  # a container scope covers its insides
    ("*.[03]", {"features.0": 4, "features.3": 4, "features.7": 8}),
], ids=["exact", "glob", "container", "glob-charset"])
def test_per_name_rules(pattern, expected):
    model = _prepare(QuantConfig(rules={pattern: W4}))
    assert {name: _bits(model, name) for name in expected} == expected


@pytest.mark.parametrize("exclude", [("features.0", "head"), "features.0"], ids=["tuple", "single-string"])
def test_exclusion_keeps_the_float_class_and_coverage_says_excluded(exclude):
    config = QuantConfig(exclude=exclude)
    assert isinstance(config.exclude, tuple)
    model = _prepare(config)
    assert type(model.features[0]) is nn.Conv2d
    status = _status(model)
    assert status["features.0"] == ("excluded", "exclude:'features.0'")
    assert status["features.3"][0] == "quantized"
    assert (type(model.head) is nn.Linear) == ("head" in config.exclude)


def test_excluding_a_container_glob_keeps_everything_inside_float():
    model = _prepare(QuantConfig(exclude=("features.*",)))
    assert not any(isinstance(m, QuantModule) for m in model.features.modules())
    assert isinstance(model.head, QuantModule) and isinstance(model.pool, QuantModule)
    assert quanta.coverage(model).counts["excluded"] == len(model.features)


def test_precedence_exclude_beats_rule_beats_type():
    model = _prepare(QuantConfig(exclude=("head",), rules={"head": W4, "features.0": W4},
                                 module_types={"Conv2d": W2, "Linear": W2}))
    assert type(model.head) is nn.Linear  # exclude > rule on the same name
    assert _bits(model, "features.0") == 4  # rule > type
    assert _bits(model, "features.3") == 2  # type > default


def test_precedence_the_more_specific_name_wins():
    model = _prepare(QuantConfig(exclude=("features",), rules={"features.3": W4}))
    assert type(model.features[0]) is nn.Conv2d
    assert _bits(model, "features.3") == 4  # a rule on the module itself beats its container's exclusion
    status = _status(model)
    assert status["features"][0] == "excluded" and status["features.3"][0] == "quantized"
    assert "features.0" not in status  # covered by the container's entry
    model = _prepare(QuantConfig(rules={"features": W4}, exclude=("features.3",)))
    assert _bits(model, "features.0") == 4 and type(model.features[3]) is nn.Conv2d


def test_quantize_only_named_layers_with_a_catch_all_none_rule():
    model = _prepare(QuantConfig(rules={"features.3": W4, "*": None}))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantModule)]
    assert quantized == ["features.3"] and _bits(model, "features.3") == 4


def test_a_type_mapped_to_none_keeps_everything_inside_float():
    model = quanta.prepare(TinyTransformer(), QuantConfig(module_types={"TransformerEncoderLayer": None}))
    assert type(model.encoder) is nn.TransformerEncoderLayer
    assert not any(isinstance(m, QuantModule) for m in model.encoder.modules())
    assert isinstance(model.head, QuantModule) and isinstance(model.embed, QuantModule)


def test_precedence_the_first_matching_rule_wins():
    model = _prepare(QuantConfig(rules={"features.*": W4, "features.0": W2}))
    assert _bits(model, "features.0") == 4
    model = _prepare(QuantConfig(rules={"features.0": W2, "features.*": W4}))
    assert _bits(model, "features.0") == 2 and _bits(model, "features.3") == 4


def test_rule_mapped_to_none_excludes():
    model = _prepare(QuantConfig(rules={"head": None}))
    assert type(model.head) is nn.Linear
    assert _status(model)["head"] == ("excluded", "rule:'head'")


def test_to_dict_from_dict_round_trip_through_json():
    config = QuantConfig(
        default=LayerQuantConfig(output=QuantDescriptor(symmetric=False, calib_method="percentile")),
        module_types={nn.Linear: W4, "Conv2d": None}, rules={"features.*": W2, "head": None},
        exclude=("pool",), fold_bn=True)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["version"] == 1 and data["module_types"]["Linear"]["weight"]["num_bits"] == 4
    again = QuantConfig.from_dict(data)
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert list(again.rules) == ["features.*", "head"]  # order (precedence) survives


def test_layer_config_and_descriptor_round_trip():
    layer = LayerQuantConfig(input=QuantDescriptor(num_bits=6, unsigned=True, amax=3.0),
                             weight=QuantDescriptor(group_size=32), output=None)
    assert LayerQuantConfig.from_dict(json.loads(json.dumps(layer.to_dict()))) == layer
    desc = QuantDescriptor(per_token=True, num_bits=4, rounding="half_away")
    assert QuantDescriptor.from_dict(desc.to_dict()) == desc


def test_from_dict_rejects_unknown_fields_and_newer_versions():
    with pytest.raises(ValueError, match="unknown field.*'rulez'"):
        QuantConfig.from_dict({"rulez": {}})
    with pytest.raises(ValueError, match="unknown field.*'inputs'"):
        LayerQuantConfig.from_dict({"inputs": None})
    with pytest.raises(ValueError, match="unknown field.*'bits'"):
        QuantDescriptor.from_dict({"bits": 8})
    with pytest.raises(ValueError, match="version"):
        QuantConfig.from_dict({"version": 2})


def test_configs_are_frozen_and_applying_one_does_not_change_it():
    config = QuantConfig(rules={"head": W4})
    before = config.to_dict()
    _prepare(config)
    assert config.to_dict() == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.fold_bn = True  # type: ignore[misc]
