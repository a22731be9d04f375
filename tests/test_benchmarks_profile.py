"""benchmarks/profile_layers.py: every piece of work lands in the right bucket, once; OpenVINO's
performance counters are read and bucketed; the table carries both columns and the totals.

Timing values are never asserted (only that time was attributed where the work happened)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
profile_layers = pytest.importorskip("profile_layers", reason="benchmarks/ not present")


class _Block(nn.Module):
    """A transformer-ish block whose attention and padding are written in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.norm, self.act = nn.LayerNorm(16), nn.GELU()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(self.q(x), self.k(x).transpose(-1, -2)).softmax(-1)
        y = self.act(self.norm(x + torch.matmul(scores, x)))
        y = self.mha(y, y, y, need_weights=False)[0]
        return F.pad(y, (0, 1))


def test_each_unit_and_each_call_between_units_is_bucketed_once():
    prof = profile_layers.profile_torch("fp32", _Block().eval(), torch.randn(2, 5, 16), rounds=3)
    items = {key: count for key, (count, _ms) in prof.items.items()}
    assert items[("linear/matmul", "Linear")] == 2 * 3  # q and k, 3 rounds
    assert items[("attention", "matmul()")] == 2 * 3 and items[("attention", "softmax()")] == 3
    assert items[("attention", "MultiheadAttention")] == 3  # one unit: its own projections are not counted again
    assert items[("norm", "LayerNorm")] == 3 and items[("activation", "GELU")] == 3
    assert items[("other", "pad()")] == 3 and items[("other", "add()")] == 3
    assert not any(name == "linear()" for _, name in items)  # the Linears' own F.linear is inside a unit
    assert prof.calls == 3 and prof.end_to_end_ms > 0
    assert all(prof.bucket_ms(b) > 0 for b in ("linear/matmul", "attention", "norm", "activation", "other"))
    assert prof.bucket_ms("conv") == 0


def test_buckets_by_name():
    b = profile_layers.module_bucket
    assert b(nn.Conv1d(2, 2, 1)) == "conv" and b(nn.ReLU6()) == "activation" and b(nn.BatchNorm2d(2)) == "norm"
    assert b(nn.ZeroPad2d(1)) == "other" and b(nn.AdaptiveAvgPool2d(1)) == "other"
    assert profile_layers.ov_bucket("GroupConvolution") == "conv"
    assert profile_layers.ov_bucket("FullyConnectedQuantizedLegacy") == "linear/matmul"
    assert profile_layers.ov_bucket("MVN") == "norm" and profile_layers.ov_bucket("Reorder") == "other"


def test_hooks_are_removed_and_the_model_still_computes_the_same():
    model, x = _Block().eval(), torch.randn(1, 4, 16)
    with torch.inference_mode():
        before = model(x)
    profile_layers.profile_torch("fp32", model, x, rounds=1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(model(x), before)


def test_openvino_counters_and_the_table(tmp_path):
    pytest.importorskip("openvino", reason="optional peer openvino not installed")
    pytest.importorskip("nncf", reason="optional peer nncf not installed")
    import workloads as W

    wl = W.Workload("tiny_cnn", "cnn", lambda: nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)), lambda b: (b, 3, 16, 16), [1])
    model, x = wl.model(), wl.input(1)
    ov = profile_layers.profile_openvino(wl, model, x, threads=1, rounds=2)
    assert ov.label.startswith("OpenVINO int8 (runs in") and ov.calls == 2 and ov.end_to_end_ms > 0
    assert ov.bucket_ms("conv") > 0 and ov.top("conv")
    fp32 = profile_layers.profile_torch("torch fp32", model, x, rounds=2)
    text = profile_layers.table("tiny_cnn, batch 1", [fp32, ov])
    lines = text.splitlines()
    assert lines[2].startswith("| bucket | torch fp32 ms | OpenVINO int8")
    for bucket in profile_layers.BUCKETS:
        row = next(ln for ln in lines if ln.startswith(f"| {bucket} |"))
        assert row.count("|") == lines[2].count("|"), row  # every row has every column
    assert any(ln.startswith("| **sum of layers** |") for ln in lines)
    assert any(ln.startswith("| end-to-end (no instrumentation) |") for ln in lines)
