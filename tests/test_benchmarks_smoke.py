"""The benchmark harness runs end to end on a tiny workload (one timed round, no compile).

Timing is never asserted here (benchmarks/ measures it); this only proves that the harness
builds every row, writes the Markdown table with its header, and measures accuracy sanely.
The peers are optional extras: without them the test skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao", reason="optional peer torchao not installed")
pytest.importorskip("onnxruntime", reason="optional peer onnxruntime not installed")
pytest.importorskip("onnx", reason="optional peer onnx not installed")

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"


def _row(text: str, method: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].strip("*") == method:
            return cells
    raise AssertionError(f"no row {method!r} in:\n{text}")


@pytest.mark.skipif(not RUN.exists(), reason="benchmarks/ not present")
def test_harness_runs_linear_stack_quick(tmp_path):
    out = tmp_path / "results.md"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--workload", "linear_stack", "--repeats", "1",
         "--threads", "1", "--onnx-exporter", "torchscript", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()

    # header: date, machine, versions
    assert re.search(r"date: \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)
    assert "CPU:" in text and "torch.set_num_threads(1)" in text
    assert "torchao 0." in text and "onnxruntime 1." in text and "quanta " in text
    assert "### linear_stack, batch 1" in text

    # fp32 baseline: a measured time, ratio 1, exact against itself, 4 x 1024 x 1024 fp32 weights
    fp32 = _row(text, "torch fp32 eager")
    assert float(fp32[1]) > 0 and fp32[2] == "1.00×" and fp32[5] == "exact"
    assert fp32[4] == "16.0 MiB"

    # a peer that always works on CPU: int8 ORT is measured, 4x smaller, and accurate
    ort = _row(text, "onnxruntime quantize_dynamic int8")
    assert float(ort[1]) > 0 and ort[4] == "4.0 MiB" and float(ort[5]) > 25

    # every quanta row is present: measured, or saying why not (API still in flux)
    for preset in ("quanta dynamic_int8", "quanta weight_only_int8"):
        row = _row(text, preset)
        assert re.match(r"[\d.]+$", row[1]) or row[1].startswith(("not available", "failed")), row
    # compile rows are skipped in --quick, as rows
    assert _row(text, "quanta dynamic_int8 + compile")[1].startswith(("skipped", "not available"))
