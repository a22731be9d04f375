"""The `quanta` command line as a user runs it: quantize (spec, --hf, --config, --calib files),
config dump, bench, export, --version, `python -m quanta`; one-line errors and exit codes."""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import quanta
from quanta.cli import main
from quanta.commands import CommandError
from quanta.commands.sources import spec_factory

MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    class Head(nn.Linear):  # a user subclass of a supported module
        pass

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), Head(32, 4))

    def mlp_with_data():
        g = torch.Generator().manual_seed(1)
        return mlp(), [torch.randn(8, 16, generator=g) for _ in range(3)]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    def cnn():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        return Net().eval(), [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]

    def not_a_model():
        return 42
''')


@pytest.fixture
def models(tmp_path: pathlib.Path) -> pathlib.Path:
    """A user's model module, written into tmp_path; returns its path (spec ``<path>:factory``)."""
    path = tmp_path / "tinymodels.py"
    path.write_text(MODELS)
    return path


def _quanta(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quanta", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def _fails(capsys, argv: list[str], status: int) -> str:
    """Run ``argv``; check the exit status and that stderr is one line; return that line."""
    try:
        got = main(argv)
    except SystemExit as e:  # argparse's usage errors
        got = e.code
    assert got == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


# --------------------------------------------------------------------------------- as a user runs it
def test_round_trip_spec_quantize_inspect_bench_export_in_subprocesses(models):
    cwd = models.parent
    spec = "tinymodels:mlp_with_data"  # an import spec, found from the current directory
    run = _quanta("quantize", spec, "--preset", "static_int8", "--no-speed-check", "-q", "-o", "m.safetensors", cwd=cwd)
    assert run.returncode == 0, run.stderr
    assert "wrote m.safetensors" in run.stdout and "2 of 2 quantized layers run on integer kernels" in run.stdout
    run = _quanta("inspect", "m.safetensors", "--json", cwd=cwd)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["manifest"]["kind"] == "integer"
    run = _quanta("bench", "m.safetensors", "--model", spec, "--rounds", "3", cwd=cwd)
    assert run.returncode == 0, run.stderr
    for field in ("input (8, 16) float32", "fp32", "quantized", "latency", "size", "speed-up",
                  "2 of 2 quantized layers on integer kernels"):
        assert field in run.stdout
    run = _quanta("export", "m.safetensors", "--model", spec, "-o", "m.onnx", cwd=cwd)
    assert run.returncode == 0, run.stderr
    assert "QuantizeLinear" in run.stdout and (cwd / "m.onnx").stat().st_size > 0


def test_python_m_quanta_version_and_output_into_a_closed_pipe(tmp_path):
    run = _quanta("--version", cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == f"quanta {quanta.__version__}"
    # `quanta config dump | head -1`: the reader is gone before quanta writes; no traceback
    proc = subprocess.Popen([sys.executable, "-m", "quanta", "config", "dump", "static_int8"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and err == b"", err.decode()  # nothing on stderr, no traceback


# ------------------------------------------------------------------------------------ config files
def test_config_file_and_the_equivalent_flags_write_identical_files(models, tmp_path, capsys):
    spec = f"{models}:mlp_with_data"
    flags = tmp_path / "flags.safetensors"
    assert main(["quantize", spec, "--preset", "static_int8", "--exclude", "2", "--no-speed-check", "-q",
                 "-o", str(flags)]) == 0
    capsys.readouterr()
    assert main(["config", "dump", "static_int8"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert quanta.QuantConfig.from_dict(dumped) == quanta.preset("static_int8")
    dumped["exclude"] = ["2"]  # the user's edit
    (tmp_path / "c.json").write_text(json.dumps(dumped))
    yaml = pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(dumped))
    for name in ("c.json", "c.yaml"):
        out = tmp_path / f"{name}.safetensors"
        assert main(["quantize", spec, "--config", str(tmp_path / name), "--no-speed-check", "-q",
                     "-o", str(out)]) == 0
        assert out.read_bytes() == flags.read_bytes(), name
    model = quanta.load(flags, model=spec_factory(f"{models}:mlp"))
    assert type(model[0]).__name__ == "Int8Linear" and type(model[2]).__name__ == "Head"  # excluded: float


def test_config_dump_takes_the_preset_options(capsys):
    assert main(["config", "dump", "weight_only_int4", "--group-size", "32", "--exclude", "lm_head"]) == 0
    got = quanta.QuantConfig.from_dict(json.loads(capsys.readouterr().out))
    assert got == quanta.preset("weight_only_int4", group_size=32, exclude=["lm_head"])


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"defaults": {}}', "unknown field(s) ['defaults']"),
    ("[1, 2]", "expected a mapping"),
])
def test_bad_config_files_fail_on_one_line(models, tmp_path, capsys, content, message):
    (tmp_path / "bad.json").write_text(content)
    err = _fails(capsys, ["quantize", f"{models}:mlp", "--config", str(tmp_path / "bad.json"),
                          "-o", str(tmp_path / "x.safetensors")], 1)
    assert err.startswith("quanta quantize: --config") and message in err
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------------- calibration data
@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors"])
def test_calibration_data_from_tensor_files(models, tmp_path, capsys, suffix):
    data = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    path = tmp_path / f"calib{suffix}"
    if suffix == ".pt":
        torch.save(list(data.split(16)), path)  # a list of batches
    elif suffix == ".npy":
        np.save(path, data.numpy())  # one [N, ...] array, split into batches
    else:
        from safetensors.torch import save_file

        save_file({"x": data}, str(path))
    out = tmp_path / "m.safetensors"
    assert main(["quantize", f"{models}:mlp", "--preset", "static_int8", "--calib", str(path),
                 "--calib-batch-size", "16", "--calib-method", "max", "--no-speed-check", "-q", "-o", str(out)]) == 0
    scale = quanta.load(out, model=spec_factory(f"{models}:mlp"))[0].input_scale
    # calibrated (max) on all of the file's data: uint8 affine over [min(x, 0), max(x, 0)]
    assert float(scale) == pytest.approx(float(data.max() - data.min()) / 255, rel=1e-5)


def test_pickled_calibration_file_is_refused(models, tmp_path, capsys):
    torch.save({"batches": [torch.randn(4, 16)], "when": datetime.date(2020, 1, 1)}, tmp_path / "evil.pt")
    err = _fails(capsys, ["quantize", f"{models}:mlp", "--preset", "static_int8", "--calib",
                          str(tmp_path / "evil.pt"), "-o", str(tmp_path / "m.safetensors")], 1)
    assert "--calib" in err and "cannot read it" in err


def test_static_preset_without_data_says_how_to_give_it(models, tmp_path, capsys):
    err = _fails(capsys, ["quantize", f"{models}:mlp", "--preset", "static_int8", "-o", str(tmp_path / "m.safetensors")], 1)
    assert "--calib FILE" in err


# ---------------------------------------------------------------------------------- usage and errors
@pytest.mark.parametrize("argv", [
    ["quantize", "x:y", "-o", "m.safetensors", "--bogus"],
    ["quantize", "x:y"],  # no -o
    ["quantize", "x:y", "-o", "m.safetensors", "--preset", "int3"],
    ["bench", "x:y", "--rounds", "many"],
    ["frobnicate"],
])
def test_usage_errors_exit_2_on_one_line(capsys, argv):
    assert "(see quanta" in _fails(capsys, argv, 2)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:build", "no module named 'no_such_module_xyz'"),
    ("justaname", "is not of the form package.module:factory"),
    ("{models}:missing", "has no attribute 'missing'"),
    ("{models}:not_a_model", "returned int, not an nn.Module"),
    ("/nonexistent/m.py:f", "no file /nonexistent/m.py"),
])
def test_bad_specs_exit_1_on_one_line(models, tmp_path, capsys, spec, message):
    err = _fails(capsys, ["quantize", spec.format(models=models), "-o", str(tmp_path / "m.safetensors")], 1)
    assert err.startswith("quanta quantize: ") and message in err


@pytest.mark.parametrize("before", [True, False])
def test_debug_shows_the_traceback(models, tmp_path, before):
    argv = ["quantize", f"{models}:mlp", "--preset", "static_int8", "-o", str(tmp_path / "m.safetensors")]
    with pytest.raises(CommandError, match="give calibration data"):
        main(["--debug", *argv] if before else [*argv, "--debug"])


@pytest.mark.parametrize("name, message", [
    ("missing.pt", "no such file"),
    ("data.csv", "unknown kind of file"),
    ("empty.npy", "the tensor has no samples"),
])
def test_bad_calibration_files(models, tmp_path, capsys, name, message):
    (tmp_path / "data.csv").write_text("1,2\n")
    np.save(tmp_path / "empty.npy", np.zeros((0, 16), dtype=np.float32))
    err = _fails(capsys, ["quantize", f"{models}:mlp", "--calib", str(tmp_path / name),
                          "-o", str(tmp_path / "m.safetensors")], 1)
    assert err.startswith(f"quanta quantize: --calib {tmp_path / name}") and message in err


def test_hf_without_transformers_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    (tmp_path / "config.json").write_text("{}")
    err = _fails(capsys, ["quantize", "--hf", str(tmp_path), "-o", str(tmp_path / "m.safetensors")], 1)
    assert "pip install transformers" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "interleaved timing rounds (default: 10)" in out


# ----------------------------------------------------------------------------------- bench, export
def test_bench_of_a_spec_prints_latency_size_and_speed_up(models, capsys):
    assert main(["bench", f"{models}:cnn", "--input-shape", "2,3,8,8", "--rounds", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "input (2, 3, 8, 8) float32; 3 interleaved rounds" in out and "1 threads" in out
    assert all(word in out for word in ("fp32", "quantized", "latency", "ms (rounds", "size", "speed-up"))


def test_bench_errors(models, tmp_path, capsys):
    assert "needs --model SPEC" in _fails(capsys, ["bench", str(tmp_path / "m.safetensors")], 1)
    assert "needs --input-shape" in _fails(capsys, ["bench", f"{models}:Net", "--rounds", "3"], 1)  # a class
    err = _fails(capsys, ["bench", f"{models}:cnn", "--input-shape", "2,5,8,8", "--rounds", "3"], 1)
    assert err.startswith("quanta bench: ") and "(2, 5, 8, 8)" in err  # the input that does not fit
    err = _fails(capsys, ["bench", f"{models}:Net", "--preset", "static_int8", "--input-shape", "2,3,8,8"], 1)
    assert "give calibration data (--calib FILE" in err


def test_quantize_speed_check_on_an_input_shape(models, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert "--input-shape '2,a'" in _fails(capsys, ["quantize", f"{models}:mlp", "--input-shape", "2,a", "-o", str(out)], 1)
    assert not out.exists()
    assert main(["quantize", f"{models}:mlp", "--input-shape", "4,16", "-q", "-o", str(out)]) == 0
    assert "quantized layers run on integer kernels" in capsys.readouterr().out


def test_export_with_an_input_shape(models, tmp_path, capsys):
    out = tmp_path / "cnn.safetensors"
    assert main(["quantize", f"{models}:cnn", "--preset", "static_int8", "--no-speed-check", "-q", "-o", str(out)]) == 0
    onnx_file = tmp_path / "cnn.onnx"
    assert main(["export", str(out), "--model", f"{models}:cnn", "--input-shape", "2,3,8,8", "--dynamic-batch",
                 "-o", str(onnx_file)]) == 0
    assert "dynamic batch" in capsys.readouterr().out and onnx_file.stat().st_size > 0
    assert "must end in .onnx" in _fails(capsys, ["export", str(out), "-o", str(tmp_path / "x.txt")], 1)
    assert "--input-shape" in _fails(capsys, ["export", str(out), "--input-shape", "2,a", "-o", str(onnx_file)], 1)


# ------------------------------------------------------------------------------------ transformers
def test_hf_directory_from_save_pretrained(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    out = tmp_path / "bert.safetensors"
    assert main(["quantize", "--hf", str(tmp_path / "bert"), "--calib", str(tmp_path / "ids.pt"),
                 "--calib-batch-size", "4", "--no-speed-check", "-q", "-o", str(out)]) == 0
    assert "13 of 13 quantized layers run on integer kernels" in capsys.readouterr().out
    assert quanta.inspect(out, show=False).to_dict()["manifest"]["kind"] == "integer"
    err = _fails(capsys, ["quantize", "--hf", str(tmp_path), "-o", str(out)], 1)
    assert "no config.json" in err
    assert "one of them" in _fails(capsys, ["quantize", "--hf", str(tmp_path / "bert"), "x:y", "-o", str(out)], 1)


def test_algorithm_flags_run_in_the_pipeline_and_equal_the_config_file(models, tmp_path, capsys):
    spec = f"{models}:cnn"
    flags = tmp_path / "flags.safetensors"
    assert main(["quantize", spec, "--preset", "static_int8", "--algorithm", "cle", "--algorithm",
                 "bias_correction", "--no-speed-check", "-q", "-o", str(flags)]) == 0
    manifest = quanta.inspect(flags, show=False).to_dict()["manifest"]
    assert manifest["config"]["algorithms"] == ["cle", "bias_correction"]
    capsys.readouterr()
    assert main(["config", "dump", "static_int8", "--algorithm", "cle", "--algorithm", "bias_correction"]) == 0
    (tmp_path / "cfg.json").write_text(capsys.readouterr().out)
    from_file = tmp_path / "file.safetensors"
    assert main(["quantize", spec, "--config", str(tmp_path / "cfg.json"), "--no-speed-check", "-q",
                 "-o", str(from_file)]) == 0
    assert flags.read_bytes() == from_file.read_bytes()


def test_algorithm_options_in_a_config_file_reach_gptq(models, tmp_path, capsys):
    """`config dump` → edit `algorithm_options` → `quantize --config`: GPTQ runs with those options
    (recorded in the file), and an unknown option fails on one line like any bad config file."""
    assert main(["config", "dump", "weight_only_int4", "--group-size", "32", "--algorithm", "gptq"]) == 0
    config = json.loads(capsys.readouterr().out)
    config["algorithm_options"] = {"gptq": {"act_order": True, "min_samples": 8}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    out = tmp_path / "m.safetensors"
    assert main(["quantize", f"{models}:mlp_with_data", "--config", str(tmp_path / "cfg.json"),
                 "--no-speed-check", "-q", "-o", str(out)]) == 0
    manifest = quanta.inspect(out, show=False).to_dict()["manifest"]
    record = next(r for r in manifest["algorithms"] if r["algorithm"] == "gptq")
    assert record["options"]["act_order"] is True and record["options"]["min_samples"] == 8
    assert manifest["config"]["algorithm_options"] == {"gptq": {"act_order": True, "min_samples": 8}}
    config["algorithm_options"] = {"gptq": {"act_ordr": True}}
    (tmp_path / "bad.json").write_text(json.dumps(config))
    err = _fails(capsys, ["quantize", f"{models}:mlp_with_data", "--config", str(tmp_path / "bad.json"),
                          "-o", str(tmp_path / "bad.safetensors")], 1)
    assert err.startswith("quanta quantize: --config") and "unknown option(s) ['act_ordr']" in err
    assert "act_order" in err and not (tmp_path / "bad.safetensors").exists()
