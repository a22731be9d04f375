"""benchmarks/methods.fitted_thread_rows: the busy table's `, fit_threads` quanta rows run the same
model on a fitted thread count and leave the caller's count as it was (no timing here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
methods = pytest.importorskip("methods", reason="benchmarks/ not present")


class Threads(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.get_num_threads()


def test_fitted_rows_follow_each_eager_quanta_row_only():
    model = Threads()
    rows = [methods.Method("torch fp32 eager", methods.FP32, fn=model),
            methods.Method("quanta static_int8", methods.QUANTA, fn=model, size_bytes=7),
            methods.Method("quanta static_int8 + compile", methods.QUANTA, fn=model),
            methods.Method("quanta dynamic_int8", methods.QUANTA, error="failed: x")]
    fitted = methods.fitted_thread_rows(rows)
    assert [m.name for m in fitted] == ["quanta static_int8, fit_threads"]
    assert fitted[0].group == methods.QUANTA and fitted[0].size_bytes == 7
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = fitted[0].fn(torch.ones(3))
        assert 1 <= y[0].item() <= 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_busy_runs_build_a_fitted_row_per_eager_quanta_row(tmp_path):
    run = pytest.importorskip("run", reason="benchmarks/ not present")
    workloads = pytest.importorskip("workloads")
    wl = workloads.Workload("tiny", "linear", lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
                            lambda b: (b, 64), [1], calib_count=2)
    model = wl.model()
    rows = run.build_methods(wl, model, 1, str(tmp_path), log=lambda *a: None, families=("quanta",),
                             fit_threads=True)
    eager = [m.name for m in rows if m.fn is not None and not m.name.endswith((" + compile", ", fit_threads"))]
    assert eager and [m.name for m in rows if m.name.endswith(", fit_threads")] == [n + ", fit_threads" for n in eager]
    fitted = next(m for m in rows if m.name.endswith(", fit_threads"))
    x = wl.input(1)
    with torch.inference_mode():
        assert torch.equal(fitted.fn(x), next(m for m in rows if m.name == eager[0]).fn(x))
    assert not [m for m in run.build_methods(wl, model, 1, str(tmp_path), log=lambda *a: None,
                                             families=("quanta",)) if m.name.endswith(", fit_threads")]
