"""Data-free recovery on a trained MobileNetV2-style model with per-tensor int8 weights, and
bias correction (analytical from BatchNorm statistics, empirical on calibration data)."""

from __future__ import annotations

import pytest
import torch

import quanta
from quanta import demo
from quanta.algorithms import activation_mean
from quanta.nn import LayerQuantConfig, QuantDescriptor

#: per-tensor int8 weights (one range for the whole layer), float activations
PER_TENSOR = LayerQuantConfig(input=None, weight=QuantDescriptor(per_channel=False, narrow_range=True))
#: the same weights with static uint8 activations
PER_TENSOR_A8 = LayerQuantConfig(input=QuantDescriptor(unsigned=True, symmetric=False), weight=PER_TENSOR.weight)


@pytest.mark.parametrize("activation", ["identity", "relu", "relu6"])
def test_activation_mean_matches_sampling(activation: str) -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([-2.0, 0.0, 1.5, 5.0, 7.0], dtype=torch.float64)
    std = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    y = mean + std * torch.randn(400_000, 5, generator=g, dtype=torch.float64)
    y = {"identity": y, "relu": y.clamp_min(0), "relu6": y.clamp(0, 6)}[activation]
    torch.testing.assert_close(activation_mean(mean, std, activation), y.mean(0), atol=0.02, rtol=0)


def _accuracy(model: torch.nn.Module, data) -> float:
    return demo.accuracy(model, data.x_test, data.y_test)


def test_data_free_recipe_recovers_per_tensor_int8_loss(trained_mobilenet, digits16) -> None:
    fp = _accuracy(trained_mobilenet, digits16)
    acc = {}
    for algorithms in [(), ("bias_correction",), ("cle", "high_bias_absorption", "bias_correction")]:
        sim = quanta.prepare(trained_mobilenet, quanta.QuantConfig(default=PER_TENSOR, fold_bn=True,
                                                                   algorithms=algorithms))
        acc[algorithms] = _accuracy(sim, digits16)
    plain, bc, full = acc.values()
    # measured: float 96.4, per-tensor int8 88.2, + bias correction 92.9, CLE + absorption + bias correction 96.7
    assert plain < fp - 5, acc
    assert bc > plain + (fp - plain) / 3, acc
    assert full > fp - 1, acc


def test_empirical_bias_correction_in_quantize(trained_mobilenet, digits16) -> None:
    calib = [digits16.x_train[i * 64:(i + 1) * 64] for i in range(4)]
    acc = {}
    for algorithms in [(), ("empirical_bias_correction",), ("cle", "high_bias_absorption", "empirical_bias_correction")]:
        config = quanta.QuantConfig(default=PER_TENSOR_A8, fold_bn=True, algorithms=algorithms)
        model = quanta.quantize(trained_mobilenet, config, iter(calib), speed_check=False, progress=False)
        acc[algorithms] = _accuracy(model, digits16)
    plain, emp, full = acc.values()
    # measured: 87.8 (per-tensor int8 weights, uint8 activations) → 89.8 → 96.2 (float 96.4)
    assert emp > plain + 1, acc
    assert full > _accuracy(trained_mobilenet, digits16) - 1.5, acc
