"""Presets take options (exclude, rules, group_size where it applies); bad ones raise; a layer a
preset cannot take stays float with the reason; wrong kinds of model get clear errors."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import quanta
from quanta.integer import IntegerModule
from quanta.integer.linear import Int8Linear
from quanta.nn import LayerQuantConfig, QuantDescriptor


def _report(q: nn.Module) -> dict[str, object]:
    return {r.name: r for r in quanta.conversion_report(q)}


def test_static_preset_with_exclude_and_rules(trained_cnn, digits_data):
    dynamic_head = LayerQuantConfig(input=QuantDescriptor(per_token=True, symmetric=False, unsigned=True),
                                    weight=QuantDescriptor(per_channel=True, narrow_range=True))
    q = quanta.quantize(trained_cnn, "static_int8", digits_data.calib_batches(2), exclude=["features.0"],
                        rules={"head": dynamic_head}, speed_check=False, progress=False)
    assert type(q.features[0]) is nn.Conv2d  # excluded: float
    assert isinstance(q.features[3], IntegerModule)
    assert isinstance(q.head, Int8Linear) and q.head.act_spec.dynamic  # the rule won over the preset
    cfg = q._quanta_config
    assert cfg.exclude[0] == "features.0" and "head" in cfg.rules
    x = digits_data.x_test[:64]
    with torch.no_grad():
        agree = (q(x).argmax(-1) == trained_cnn(x).argmax(-1)).float().mean()
    assert agree > 0.95


def test_quant_config_takes_exclude_too(trained_cnn, digits_data):
    cfg = quanta.preset("static_int8")
    q = quanta.quantize(trained_cnn, cfg, digits_data.calib_batches(1), exclude="head", speed_check=False,
                        progress=False)
    assert type(q.head) is nn.Linear and isinstance(q.features[0], IntegerModule)


@pytest.mark.parametrize("name,options,match", [
    ("static_int8", {"group_size": 32}, r"'static_int8' takes no option 'group_size'.*weight_only_int4"),
    ("dynamic_int8", {"group_size": 64}, r"takes no option 'group_size'"),
    ("weight_only_int4", {"groupsize": 64}, r"takes no option 'groupsize'.*group_size"),
    ("static_int8", {"exclud": ["head"]}, r"takes no option 'exclud'.*exclude"),
    ("fp16", {"group_size": 32}, r"'fp16' takes no option"),
])
def test_unknown_preset_options_raise(name, options, match):
    with pytest.raises(ValueError, match=match):
        quanta.preset(name, **options)


def test_quantize_refuses_group_size_for_presets_that_ignore_it(trained_cnn):
    with pytest.raises(ValueError, match="group_size"):
        quanta.quantize(trained_cnn, "dynamic_int8", group_size=32)
    with pytest.raises(ValueError, match="unknown preset 'static_int'.*did you mean 'static_int8'"):
        quanta.quantize(trained_cnn, "static_int")


def _odd_width_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 16)).eval()


def test_a_layer_the_preset_cannot_take_stays_float_with_the_reason():
    model = _odd_width_mlp()
    with pytest.warns(UserWarning, match=r"1 layer\(s\) stay float.*'2'.*group_size 32 does not divide the length 40"):
        q = quanta.quantize(model, "weight_only_int4", group_size=32, speed_check=False, progress=False)
    assert isinstance(q[0], IntegerModule) and type(q[2]) is nn.Linear
    entry = _report(q)["2"]
    assert entry.result == "float" and "group_size 32 does not divide the length 40" in entry.detail
    cov = {e.name: e for e in quanta.coverage(q).entries}
    assert cov["2"].status == "float" and "does not divide" in cov["2"].detail
    x = torch.randn(8, 64)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99


def test_a_rule_naming_the_layer_that_cannot_take_it_raises():
    w4 = LayerQuantConfig(input=None, weight=QuantDescriptor(num_bits=4, group_size=32, symmetric=False))
    with pytest.raises(ValueError, match=r"cannot quantize module '2'.*does not divide"):
        quanta.prepare(_odd_width_mlp(), quanta.preset("dynamic_int8", rules={"2": w4}))


def _build() -> nn.Module:
    return nn.Linear(4, 4)


@pytest.mark.parametrize("bad,error,match", [
    (collections.OrderedDict(weight=torch.zeros(4, 4)), TypeError, r"got a OrderedDict \(a state_dict\?\).*load_state_dict"),
    ({"weight": torch.zeros(4, 4)}, TypeError, r"a state_dict"),
    (_build, TypeError, r"got the function '_build'.*_build\(\.\.\.\)"),
    (nn.Linear, TypeError, r"instance, got the class Linear"),
    ("model.pt", TypeError, r"expects an nn.Module, got str"),
], ids=["state_dict", "dict", "function", "class", "path"])
def test_things_that_are_not_models_raise_type_errors(bad, error, match):
    for call in (lambda: quanta.quantize(bad, "dynamic_int8"), lambda: quanta.prepare(bad)):
        with pytest.raises(error, match=match):
            call()


def test_quantizing_an_integer_model_says_so():
    q = quanta.quantize(_odd_width_mlp(), "dynamic_int8", speed_check=False, progress=False)
    with pytest.raises(ValueError, match=r"already an integer model \('0' is a Int8Linear\).*float model"):
        quanta.quantize(q, "dynamic_int8")
    with pytest.raises(ValueError, match="already an integer model"):
        quanta.prepare(q)


def test_presets_and_quantize_take_algorithms(trained_cnn, digits_data):
    from quanta.algorithms import ALGORITHMS_ATTR

    config = quanta.preset("static_int8", algorithms=["cle", "bias_correction"])
    assert config.algorithms == ("cle", "bias_correction")
    q = quanta.quantize(trained_cnn, "static_int8", digits_data.calib_batches(2), progress=False, speed_check=False,
                        algorithms=("cle",))
    assert [r["algorithm"] for r in getattr(q, ALGORITHMS_ATTR)] == ["cle"]
    with pytest.raises(ValueError, match="cel"):
        quanta.preset("dynamic_int8", algorithms=["cel"])
    with pytest.raises(TypeError, match="algorithms must be a list"):
        quanta.preset("static_int8", algorithms=3)
