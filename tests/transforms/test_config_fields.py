"""No config field is dropped on the way: every field of a `QuantConfig` / `LayerQuantConfig` /
`QuantDescriptor` set to a non-default value survives `QuantConfig.extended`, `quantize`'s
refinement path, QAT's learned-range rewrite and the dict round-trip. The configs below set every
field (a test checks that), so a field added later without being carried fails here."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import quanta
from quanta import QuantConfig
from quanta.nn import LayerQuantConfig, QuantDescriptor
from quanta.transforms.prepare import CONFIG_ATTR
from quanta.transforms.qat import QATConfig

# two descriptors that between them set every field away from its default (granularities exclude each other)
D_AXIS = QuantDescriptor(num_bits=6, axis=1, unsigned=True, symmetric=False, narrow_range=True, rounding="half_away",
                         amax=3.0, fake_quant=False, calib_method="percentile", percentile=99.5, num_bins=512,
                         name="in")
D_GROUP = QuantDescriptor(num_bits=4, group_size=16, dynamic=True, name="w")
D_CHANNEL = QuantDescriptor(num_bits=7, per_channel=True, narrow_range=True, learn_amax=True)
D_TOKEN = QuantDescriptor(format="pow2", num_bits=4, per_token=True)
LAYER = LayerQuantConfig(input=D_AXIS, weight=D_GROUP, output=D_TOKEN)
SMALL = LayerQuantConfig(input=None, weight=D_CHANNEL, output=None)
CONFIG = QuantConfig(default=LayerQuantConfig(input=None, weight=D_CHANNEL), module_types={"Linear": SMALL},
                     rules={"0": SMALL, "2": None}, exclude=("4",), fold_bn=True, algorithms=("smoothquant",),
                     algorithm_options={"smoothquant": {"alpha": 0.7}})
UNSETTABLE = {"version", "VERSION"}  # only version 1 exists


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


@pytest.mark.parametrize("objs", [(D_AXIS, D_GROUP, D_CHANNEL, D_TOKEN), (LAYER,), (CONFIG,)],
                         ids=["descriptor", "layer", "config"])
def test_the_configs_here_set_every_field(objs):
    default = type(objs[0])()
    unset = {k for k, v in _fields(default).items() if all(getattr(o, k) == v for o in objs)}
    assert unset <= UNSETTABLE, f"set these fields in this test's configs: {sorted(unset - UNSETTABLE)}"


@pytest.mark.parametrize("obj", [D_AXIS, D_GROUP, D_CHANNEL, LAYER, CONFIG], ids=["axis", "group", "channel",
                                                                                 "layer", "config"])
def test_dict_round_trip_keeps_every_field(obj):
    again = type(obj).from_dict(obj.to_dict())
    assert _fields(again) == _fields(obj)


def test_extended_keeps_every_field_and_prepends_the_refinements():
    out = CONFIG.extended(exclude="5", rules={"1": LAYER}, algorithms=["bias_correction"],
                          algorithm_options={"smoothquant": {"alpha": 0.2}})
    refined = {"exclude": ("5", "4"), "rules": {"1": LAYER, "0": SMALL, "2": None},
               "algorithms": ("smoothquant", "bias_correction"), "algorithm_options": {"smoothquant": {"alpha": 0.2}}}
    assert _fields(out) == {**_fields(CONFIG), **refined}
    assert list(out.rules) == ["1", "0", "2"]  # the new rule matches first


@pytest.mark.filterwarnings("ignore:quanta smoothquant")  # the model has no norm → Linear group
def test_quantize_refinement_keeps_every_field_of_the_config():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    data = [torch.randn(40, 8)]
    out = quanta.quantize(model, CONFIG, data, exclude=["2"], rules={"4": SMALL}, speed_check=False, progress=False)
    kept = getattr(out, CONFIG_ATTR)
    assert _fields(kept) == {**_fields(CONFIG), "exclude": ("2", "4"), "rules": {"4": SMALL, "0": SMALL, "2": None}}


def test_quantize_in_training_mode_drops_only_fold_bn():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).train()
    config = dataclasses.replace(CONFIG, algorithms=(), algorithm_options={})
    with pytest.warns(UserWarning, match="training mode"):
        out = quanta.quantize(model, config, speed_check=False, progress=False)
    assert _fields(getattr(out, CONFIG_ATTR)) == {**_fields(config), "fold_bn": False}


def test_qat_learned_ranges_keep_every_field():
    plain = dataclasses.replace(D_CHANNEL, learn_amax=False)
    config = dataclasses.replace(CONFIG, default=LayerQuantConfig(input=D_AXIS, weight=plain, output=D_GROUP))
    out = QATConfig(config=config).quant_config()
    learned = dataclasses.replace(D_CHANNEL, learn_amax=True)
    assert out.default == LayerQuantConfig(input=D_AXIS, weight=learned, output=D_GROUP)
    assert _fields(out) == {**_fields(config), "fold_bn": False, "default": out.default}
