"""`QuantConfig.algorithms`: validation, round trip, where the pipeline runs each, the record
on the model and in the saved file."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import quanta
from quanta.algorithms import ALGORITHMS_ATTR
from quanta.io import safe_file
from quanta.nn import LayerQuantConfig, QuantDescriptor

W_PER_TENSOR = LayerQuantConfig(input=None, weight=QuantDescriptor(per_channel=False, narrow_range=True))
DATA_FREE = ("cle", "high_bias_absorption", "bias_correction")


def test_config_validates_and_round_trips() -> None:
    config = quanta.QuantConfig(fold_bn=True, algorithms=["cle", "bias_correction"])
    assert config.algorithms == ("cle", "bias_correction")
    assert quanta.QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert quanta.QuantConfig.from_dict({"fold_bn": True}).algorithms == ()
    with pytest.raises(ValueError, match=r"unknown algorithm 'cle_equalize'.*did you mean 'cle'"):
        quanta.QuantConfig(algorithms=("cle_equalize",))
    with pytest.raises(ValueError, match="repeated"):
        quanta.QuantConfig(algorithms=("cle", "cle"))
    with pytest.raises(ValueError, match="choose one of"):
        quanta.QuantConfig(algorithms=("bias_correction", "empirical_bias_correction"))
    with pytest.raises(TypeError, match="tuple of algorithm names"):
        quanta.QuantConfig(algorithms=(1,))


def test_prepare_runs_and_records_the_data_free_algorithms(trained_mobilenet, digits16) -> None:
    state = copy.deepcopy(trained_mobilenet.state_dict())
    sim = quanta.prepare(trained_mobilenet, quanta.QuantConfig(default=W_PER_TENSOR, fold_bn=True,
                                                               algorithms=DATA_FREE))
    records = getattr(sim, ALGORITHMS_ATTR)
    assert [r["algorithm"] for r in records] == list(DATA_FREE)
    assert len(records[0]["pairs"]) == 6 and records[2]["layers"]
    assert all(torch.equal(v, state[k]) for k, v in trained_mobilenet.state_dict().items())  # user's model untouched
    assert not hasattr(trained_mobilenet, ALGORITHMS_ATTR)


def test_saved_file_records_the_algorithms_and_load_reproduces_the_model(trained_mobilenet, digits16, tmp_path) -> None:
    calib = [digits16.x_train[i * 64:(i + 1) * 64] for i in range(2)]
    config = quanta.QuantConfig(default=LayerQuantConfig(input=QuantDescriptor(unsigned=True, symmetric=False),
                                                         weight=W_PER_TENSOR.weight),
                                fold_bn=True, algorithms=("cle", "high_bias_absorption", "empirical_bias_correction"))
    model = quanta.quantize(trained_mobilenet, config, calib, speed_check=False, progress=False)
    path = quanta.save(model, tmp_path / "m.safetensors")
    again = quanta.save(model, tmp_path / "m2.safetensors")
    assert path.read_bytes() == again.read_bytes()  # deterministic
    _, manifest = safe_file.read(path)
    assert manifest["config"]["algorithms"] == list(config.algorithms)
    assert [r["algorithm"] for r in manifest["algorithms"]] == list(config.algorithms)
    loaded = quanta.load(path, model=trained_mobilenet)
    assert getattr(loaded, ALGORITHMS_ATTR) == manifest["algorithms"]
    assert loaded._quanta_config.algorithms == config.algorithms
    x = digits16.x_test[:32]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_empirical_bias_correction_needs_calibration_data() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    config = quanta.QuantConfig(default=W_PER_TENSOR, algorithms=("empirical_bias_correction",))
    with pytest.raises(ValueError, match="needs calibration data"):
        quanta.quantize(model, config, speed_check=False, progress=False)
