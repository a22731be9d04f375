"""Weight-only (bfloat16) integer layers in ONNX: int8 computes torch's kernel's numbers (bf16
scales, the product rounded to bf16 before the bias), int4 states per layer that it cannot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()


def test_weight_only_int8_bf16_export_matches_onnx_runtime_bit_for_bit(tmp_path):
    q = quanta.quantize(_model(), "weight_only_int8", progress=False)
    assert all(m.kernel_counts == {} or "int8pack_mm" in m.kernel_counts for m in (q[0], q[2]))
    x = torch.randn(96, 64)
    quanta.export_onnx(q, x[:2], tmp_path / "wo8.onnx", dynamic_batch=True)
    report = quanta.compare_onnx(q, tmp_path / "wo8.onnx", x)
    assert "int8pack_mm" in q[0].kernel_counts  # the fast bf16 kernel is what ran and what is matched
    assert [r.name for r in report.layers] == ["0", "2"]
    for row in report.outputs + report.layers:
        assert row.frac_identical >= 0.999 and row.max_steps <= 1.0, row
        assert row.note == ""


def test_weight_only_int4_bf16_layers_say_they_cannot_be_bit_exact_and_by_how_much(tmp_path):
    q = quanta.quantize(_model(), "weight_only_int4", group_size=32, progress=False)
    x = torch.randn(64, 64)
    quanta.export_onnx(q, x[:2], tmp_path / "wo4.onnx", dynamic_batch=True)
    report = quanta.compare_onnx(q, tmp_path / "wo4.onnx", x)
    assert [r.name for r in report.layers] == ["0", "2"]
    for row in report.layers:
        assert row.note.startswith("not bit-exact: torch's int4 kernel")
        assert 0 < row.max_rel_diff < 0.05 and row.max_abs_diff > 0
    text = str(report)
    assert "max rel" in text and "not bit-exact" in text
