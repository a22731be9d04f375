"""One truth for the layers quanta keeps float: `quanta.kept_float` names each with both timings and
its input, and the conversion report, `coverage`, the CLI summary, the demo table and the benchmark
rows' notes all say exactly that (issue 25, item 5)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import quanta
from quanta.commands.quantize_cmd import QuantizeJob, quantize_file
from quanta.demo.table import DemoRow, format_table, kept_float_notes
from quanta.integer.base import IntegerModule
from quanta.transforms import speed_check

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def build_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def _head_slower(kind: str, fn) -> float:
    """The clock the speed check reads: the 10-class head's integer kernel takes 2 ms against
    float's 0.5 ms; every other integer layer is faster than its float twin."""
    fn()
    module = fn.func[0] if isinstance(fn.func, nn.Sequential) else fn.func  # (a twin with its fused activation)
    head = module.out_features == 10
    if kind == "integer":
        assert isinstance(module, IntegerModule)
        return 2e-3 if head else 1e-3
    return 0.5e-3 if head else 2e-3


@pytest.fixture
def slow_head(monkeypatch, tmp_path):
    """quanta's speed check on a clock where only the head is slower in integer; a cache of its
    own (the machine's cache is neither read nor written)."""
    monkeypatch.setenv("QUANTA_SPEED_CACHE", str(tmp_path / "decisions.json"))
    monkeypatch.setattr(speed_check, "_perf_counter", _head_slower)


def _quantized() -> nn.Module:
    return quanta.quantize(build_mlp(), "dynamic_int8", example=torch.randn(8, 32), progress=False)


def _check_head(kept: list[quanta.KeptFloat]) -> None:
    assert [(k.name, k.type, k.integer) for k in kept] == [("4", "Linear", "Int8Linear")]
    assert kept[0].integer_ms == 2.0 and kept[0].float_ms == 0.5 and kept[0].input_shape == (8, 64)


def test_kept_float_names_the_layer_with_both_timings_in_the_report_and_coverage(slow_head):
    q = _quantized()
    assert type(q[4]) is nn.Linear and isinstance(q[0], IntegerModule) and isinstance(q[2], IntegerModule)
    kept = quanta.kept_float(q)
    _check_head(kept)
    line = kept[0].describe()
    assert line.startswith("4 (Linear): integer kernel slower: Int8Linear")
    assert "on input [8, 64] (2.000 ms vs float 0.500 ms)" in line and "more than 1.10x" in line
    row = next(r for r in quanta.conversion_report(q) if r.name == "4")
    assert row.result == "float" and row.detail == kept[0].reason  # the report's detail is the reason
    entry = next(e for e in quanta.coverage(q).entries if e.name == "4")
    assert entry.status == "float" and entry.detail == kept[0].reason
    # the integer layers' report rows carry their timings too
    assert "(1.000 ms vs float 2.000 ms)" in next(r.detail for r in quanta.conversion_report(q) if r.name == "0")


def test_a_saved_file_holds_the_reason_without_timings_and_loads_it(slow_head, tmp_path, monkeypatch):
    q = _quantized()
    first = quanta.save(q, tmp_path / "a.safetensors").read_bytes()
    loaded = quanta.load(tmp_path / "a.safetensors", model=build_mlp())
    (k,) = quanta.kept_float(loaded)
    assert (k.name, k.type, k.integer_ms, k.float_ms) == ("4", "Linear", None, None)
    assert "ms vs float" not in k.reason and k.reason.startswith("integer kernel slower: Int8Linear")
    assert "on input [8, 64]: more than 1.10x" in k.reason
    # other timings, the same decisions: the same file, byte for byte
    monkeypatch.setenv("QUANTA_SPEED_CACHE", str(tmp_path / "other.json"))
    monkeypatch.setattr(speed_check, "_perf_counter", lambda kind, fn: 3 * _head_slower(kind, fn))
    again = _quantized()
    assert quanta.kept_float(again)[0].integer_ms == 6.0
    assert quanta.save(again, tmp_path / "b.safetensors").read_bytes() == first


def test_layers_that_cannot_be_lowered_are_listed_without_timings():
    model = nn.Sequential(nn.Linear(32, 40), nn.ReLU(), nn.Linear(40, 10)).eval()
    with pytest.warns(UserWarning, match="stay float"):
        q = quanta.quantize(model, "weight_only_int4", group_size=32, speed_check=False, progress=False)
    (kept,) = quanta.kept_float(q)  # 40 inputs do not fit groups of 32
    assert (kept.name, kept.type, kept.integer_ms, kept.float_ms, kept.input_shape) == ("2", "Linear", None, None, None)
    assert "group_size 32 does not divide the length 40" in kept.reason and kept.reason in kept.describe()
    assert quanta.kept_float(build_mlp()) == []  # not converted by quanta: nothing to say


def test_the_cli_summary_names_the_kept_layer_with_its_timings(slow_head, tmp_path):
    spec = tmp_path / "tinymodel.py"
    spec.write_text("import torch\nfrom torch import nn\n\n\ndef mlp():\n"
                    "    torch.manual_seed(0)\n"
                    "    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),"
                    " nn.Linear(64, 10)).eval()\n")
    summary = quantize_file(QuantizeJob(output=str(tmp_path / "m.safetensors"), spec=f"{spec}:mlp",
                                        input_shape="8,32", progress=False))
    first, *rest = summary.splitlines()
    assert "2 of 3 quantized layers run on integer kernels" in first
    assert rest == [f"  kept float: {k.describe()}" for k in quanta.kept_float(_quantized())]
    assert "(2.000 ms vs float 0.500 ms)" in rest[0]


def test_the_demo_table_notes_the_kept_layer_with_its_timings(slow_head):
    q = _quantized()
    notes = kept_float_notes(q)
    assert notes == (quanta.kept_float(q)[0].describe(),)
    row = DemoRow("MLP", "dynamic_int8", 90.0, -1.0, 1000, 1.0, (0.9, 1.1), 1.2, 30.0, "2/3", "trained",
                  "onednn×2", notes)
    table = format_table([row])
    assert f"- MLP, dynamic_int8: kept float: {notes[0]}" in table.splitlines()
    fp32 = DemoRow("MLP", "fp32", 91.0, 0.0, 1000, 1.2, (1.0, 1.3), 1.0, float("inf"), "", "trained")
    assert "Layers kept float" in table and "Layers kept float" not in format_table([fp32])


def test_the_benchmark_row_notes_name_the_kept_layer_with_its_timings(slow_head, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    methods = pytest.importorskip("methods") if (BENCHMARKS / "methods.py").exists() else pytest.skip("no benchmarks")
    monkeypatch.setattr(methods, "COMPILE", {"enabled": False, "why": "not in this test"})
    eager, compiled = methods.quanta_rows(build_mlp(), [("dynamic_int8", {})], [torch.randn(8, 32)],
                                          example=torch.randn(8, 32))
    assert eager.error is None, eager.error
    assert eager.notes == [f"kept float: {k.describe()}" for k in quanta.kept_float(eager.fn)]
    assert "4 (Linear): integer kernel slower" in eager.notes[0] and "(2.000 ms vs float 0.500 ms)" in eager.notes[0]
    assert compiled.error and "skipped" in compiled.error
    sys.modules.pop("methods", None)
