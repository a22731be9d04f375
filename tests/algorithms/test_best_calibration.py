"""Per-quantizer choice of the calibration method on the trained MobileNetV2-style model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.algorithms import ALGORITHMS_ATTR, best_calibration

#: static uint8 activations, float weights: only the activation ranges matter
A8 = quanta.nn.LayerQuantConfig(input=quanta.nn.QuantDescriptor(unsigned=True, symmetric=False), weight=None)
METHODS = ("max", "percentile", "mse", "entropy")


@torch.no_grad()
def _error(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((model(x) - reference).pow(2).mean())


def test_chosen_methods_beat_the_worst_single_method(trained_mobilenet, digits16) -> None:
    calib = [digits16.x_train[i * 64:(i + 1) * 64] for i in range(4)]
    x = digits16.x_test
    with torch.no_grad():
        reference = trained_mobilenet(x)
    config = quanta.QuantConfig(default=A8, fold_bn=True)
    single = {}
    for method in METHODS:
        sim = quanta.prepare(trained_mobilenet, config)
        quanta.calibrate(sim, calib, method, progress=False)
        single[method] = _error(sim, x, reference)
    sim = quanta.prepare(trained_mobilenet, config)
    quanta.calibrate(sim, calib, progress=False)
    record = best_calibration(sim, calib, progress=False)
    chosen = _error(sim, x, reference)
    # measured (logit MSE vs float): max 0.0190, percentile 0.0157, mse 0.0125, entropy 0.0887; chosen 0.0149
    assert chosen < max(single.values()), (chosen, single)
    assert chosen < single["max"], (chosen, single)
    # the residual additions prepare made of the blocks' ``x + y`` take two tensors: both operand
    # quantizers of each are chosen too, on the addition replayed with its two captured inputs
    adds = [row for row in record["quantizers"] if ".residual_add." in row["quantizer"]]
    assert {row["quantizer"].rpartition(".")[2] for row in adds} == {"input_quantizer", "other_quantizer"}
    assert len(record["quantizers"]) - len(adds) == 12 and len(adds) >= 2 and not record["skipped"]
    for row in record["quantizers"]:
        assert row["method"] in METHODS and row["errors"][row["method"]] == min(row["errors"].values())
    assert len({row["method"] for row in record["quantizers"]}) > 1  # a per-layer choice, not one method


def test_best_calibration_through_quantize_is_recorded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    config = quanta.QuantConfig(default=A8, algorithms=("best_calibration",))
    integer = quanta.quantize(model, config, [torch.randn(32, 8) for _ in range(3)], speed_check=False,
                              progress=False)
    (row,) = getattr(integer, ALGORITHMS_ATTR)
    assert row["algorithm"] == "best_calibration"
    assert [r["quantizer"] for r in row["quantizers"]] == ["0.input_quantizer", "2.input_quantizer"]


def test_unknown_method_is_refused() -> None:
    sim = quanta.prepare(nn.Sequential(nn.Linear(4, 4)), quanta.QuantConfig(default=A8))
    with pytest.raises(ValueError, match="best_calibration: methods must be"):
        best_calibration(sim, [torch.randn(4, 4)], ("max", "median"), progress=False)
