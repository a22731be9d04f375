"""`compare_stages`: a deliberately broken stage is located at the broken layer."""

from __future__ import annotations

import copy

import pytest
import torch

import quanta
from quanta.analysis import compare_stages


@pytest.fixture(scope="module")
def stages(trained_cnn, digits_data, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    sim = quanta.prepare(trained_cnn, quanta.preset("static_int8"))
    quanta.calibrate(sim, digits_data.calib_batches(2), progress=False)
    integer = quanta.convert(sim, speed_check=False)
    path = tmp_path_factory.mktemp("stages") / "cnn.onnx"
    quanta.export_onnx(integer, digits_data.x_test[:2], path, dynamic_batch=True)
    return sim, integer, path


def test_healthy_stages_do_not_part(trained_cnn, stages, digits_data):
    sim, integer, path = stages
    report = compare_stages(trained_cnn, sim, digits_data.x_test[:64], integer, onnx_path=path)
    assert report.located["simulated -> integer"] is None, str(report)
    assert report.located["integer -> ONNX Runtime"] is None, str(report)
    assert report.located["float -> simulated (most error added)"] in {"features.0", "features.3", "features.7", "head"}
    assert {r.name for r in report.onnx.layers} >= {"features.3", "features.7"}


def test_broken_onnx_scale_is_located_at_its_layer(trained_cnn, stages, digits_data, tmp_path):
    import onnx
    from onnx import numpy_helper

    sim, integer, path = stages
    proto = onnx.load(path)
    for init in proto.graph.initializer:
        if init.name == "features.7.weight_quantizer.scale":  # scales given to the wrong channels
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[::-1].copy(), init.name))
    onnx.save(proto, tmp_path / "broken.onnx")
    report = compare_stages(trained_cnn, sim, digits_data.x_test[:64], integer, onnx_path=tmp_path / "broken.onnx")
    assert report.located["integer -> ONNX Runtime"] == "features.7", str(report.onnx)
    assert report.located["simulated -> integer"] is None


def test_broken_integer_layer_is_located(trained_cnn, stages, digits_data):
    sim, integer, _ = stages
    broken = copy.deepcopy(integer)
    layer = dict(broken.named_modules())["features.3"]
    with torch.no_grad():
        layer.weight_scale.copy_(layer.weight_scale.flip(0))
    layer.pack()
    report = compare_stages(trained_cnn, sim, digits_data.x_test[:64], broken)
    assert report.located["simulated -> integer"] == "features.3", str(report)
    assert "simulated -> integer: features.3" in str(report)
