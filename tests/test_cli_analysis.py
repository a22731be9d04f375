"""`quanta compare` and `quanta report` as a user runs them on a file written by `quanta quantize`."""

from __future__ import annotations

import pathlib

import pytest
from test_cli_commands import MODELS  # the user's model file the CLI tests write (its cnn: Conv2d → Linear)

from quanta.cli import main


@pytest.fixture
def quantized(tmp_path: pathlib.Path) -> tuple[str, str]:
    """``(file, spec)``: the spec's model quantized static int8 by the CLI."""
    (tmp_path / "analysismodels.py").write_text(MODELS)
    spec = f"{tmp_path / 'analysismodels.py'}:cnn"
    out = str(tmp_path / "m.safetensors")
    assert main(["quantize", spec, "--preset", "static_int8", "--no-speed-check", "-q", "-o", out]) == 0
    return out, spec


def test_compare_prints_each_layer_against_float(quantized, capsys):
    file, spec = quantized
    capsys.readouterr()
    assert main(["compare", file, "--model", spec, "--batches", "2"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"conv", "fc"} <= lines, out
    assert "dB" in out


def test_report_writes_html_with_its_pngs(quantized, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    file, spec = quantized
    html = tmp_path / "rep" / "r.html"
    assert main(["report", file, "--model", spec, "-o", str(html)]) == 0
    assert capsys.readouterr().out.strip().endswith("r.html")
    text = html.read_text()
    pngs = [p for p in html.parent.glob("r_*.png")]
    assert pngs and all(p.name in text and p.stat().st_size > 1000 for p in pngs)


@pytest.mark.parametrize("argv, message", [
    (["report", "{file}", "--model", "{spec}", "-o", "r.txt"], "must end in .html"),
    (["compare", "missing.safetensors", "--model", "{spec}"], "no such file"),
    (["compare", "{file}", "--model", "{spec}", "--batches", "0"], "--batches"),
], ids=["report-suffix", "missing-file", "zero-batches"])
def test_bad_input_is_one_line_exit_1(quantized, capsys, argv, message):
    file, spec = quantized
    capsys.readouterr()
    assert main([a.format(file=file, spec=spec) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
