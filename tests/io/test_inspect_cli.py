"""quanta.inspect and `quanta inspect`: the manifest, bytes per layer, totals."""

from __future__ import annotations

import json
import os

import torch

import quanta
from quanta.cli import main


def test_inspect_reports_layers_and_totals(trained_transformer, tmp_path, capsys):
    q = quanta.quantize(trained_transformer, "dynamic_int8", progress=False)
    path = quanta.save(q, tmp_path / "t.safetensors")
    report = quanta.inspect(path)
    printed = capsys.readouterr().out
    layers = {layer.path: layer for layer in report.layers}
    lin = layers["encoder.linear1"]
    assert lin.kind == "integer" and lin.cls == "Int8Linear"
    assert lin.dtypes["I8"] == 64 * 32  # the int8 weight, stored as int8
    assert lin.bytes == sum(t.numel() * t.element_size() for t in q.encoder.linear1.state_dict().values())
    assert report.tensor_bytes == quanta.storage_bytes(q)
    assert report.file_bytes == os.path.getsize(path)
    for text in ("encoder.linear1", "Int8Linear", "total:", f"quanta file format {quanta.io.FORMAT_VERSION}", "TinyTransformer",
                 "rebuildable from the file", '"weight": "int8"'):
        assert text in printed
    assert str(report) in printed


def test_inspect_folds_quantizer_ranges_into_their_layer(trained_cnn, digits_data, tmp_path):
    sim = quanta.prepare(trained_cnn, quanta.preset("static_int8"))
    quanta.calibrate(sim, digits_data.calib_batches(1), progress=False)
    report = quanta.inspect(quanta.save(sim, tmp_path / "s.safetensors"), show=False)
    paths = [layer.path for layer in report.layers]
    assert "features.0" in paths and not any("quantizer" in p for p in paths)
    first = next(layer for layer in report.layers if layer.path == "features.0")
    assert first.kind == "simulated"
    assert first.bytes == sum(t.numel() * t.element_size() for t in sim.features[0].state_dict().values())


def test_cli_inspect_text_json_verify_and_errors(trained_cnn, tmp_path, capsys):
    path = str(quanta.save(trained_cnn, tmp_path / "f.safetensors"))
    assert main(["inspect", path, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "features.0" in out and "verified" in out
    assert main(["inspect", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["manifest"]["kind"] == "float"
    assert data["tensor_bytes"] == quanta.storage_bytes(trained_cnn)
    data_bytes = bytearray(open(path, "rb").read())
    data_bytes[-3] ^= 0xFF
    open(path, "wb").write(bytes(data_bytes))
    assert main(["inspect", path]) == 0  # the manifest is intact: inspect reads only that
    capsys.readouterr()
    assert main(["inspect", path, "--verify"]) == 1
    assert "does not match its checksum" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    assert "No such file" in capsys.readouterr().err


def test_inspect_plain_float_module(tmp_path):
    big = torch.nn.Linear(256, 256)
    path = quanta.save(big, tmp_path / "b.safetensors")
    report = quanta.inspect(path, show=False)
    assert report.bytes_by_dtype() == {"F32": (256 * 256 + 256) * 4}
