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


def test_registry_orders_stages_and_lists_every_algorithm() -> None:
    from quanta.algorithms import pipeline

    assert set(pipeline.ALGORITHMS) == set(pipeline.BY_NAME)
    stages = [pipeline.STAGES.index(pipeline.BY_NAME[n].stage) for n in pipeline.ALGORITHMS]
    assert stages == sorted(stages)  # ALGORITHMS is pipeline order
    for algo in pipeline.REGISTRY:  # every registered entry point and options class exists
        assert callable(algo.load(algo.run)), algo.name
        if algo.options is not None:
            assert pipeline.build_options(algo, {}) is not None
    assert pipeline.at_stage(("empirical_bias_correction", "cle"), "float") == ("cle",)


def test_algorithm_options_validate_round_trip_and_reach_the_algorithm(monkeypatch) -> None:
    config = quanta.QuantConfig(default=W_PER_TENSOR, algorithms=("adaround",),
                                algorithm_options={"adaround": {"iterations": 7, "min_samples": 8}})
    again = quanta.QuantConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.algorithm_options == {"adaround": {"iterations": 7, "min_samples": 8}}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['iters'\].*iterations"):
        quanta.QuantConfig(algorithms=("adaround",), algorithm_options={"adaround": {"iters": 7}})
    with pytest.raises(ValueError, match="positive int"):
        quanta.QuantConfig(algorithms=("adaround",), algorithm_options={"adaround": {"iterations": 0}})
    with pytest.raises(ValueError, match="which algorithms does not run"):
        quanta.QuantConfig(algorithm_options={"adaround": {"iterations": 7}})
    with pytest.raises(ValueError, match="takes no options"):
        quanta.QuantConfig(algorithms=("cle",), algorithm_options={"cle": {"sweeps": 2}})

    import importlib

    module = importlib.import_module("quanta.algorithms.adaround")  # the package exports the function
    seen = []
    monkeypatch.setattr(module, "adaround", lambda model, data, options, **kw: seen.append(options) or
                        {"algorithm": "adaround", "note": "stub for the plumbing test"})
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    quanta.quantize(model, config, [torch.randn(16, 4)], speed_check=False, progress=False)
    assert seen and seen[0].iterations == 7 and seen[0].min_samples == 8
    seen.clear()  # the same through a preset's options
    quanta.quantize(model, "dynamic_int8", [torch.randn(16, 4)], speed_check=False, progress=False,
                    algorithms=["adaround"], algorithm_options={"adaround": {"iterations": 3}})
    assert seen[0].iterations == 3


def test_prepare_with_a_data_algorithm_needs_data_and_leaves_the_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    config = quanta.QuantConfig(default=W_PER_TENSOR, algorithms=("best_calibration",))
    sim = quanta.prepare(model, config)  # calibrated-stage algorithms do not run in prepare
    assert not hasattr(sim, ALGORITHMS_ATTR)
