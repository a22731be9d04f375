"""A MobileNetV2-style network trained once per session on digits (16×16) for the algorithm tests."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from mobilenet import TinyMobileNetV2, spread_channel_ranges, upsample

from quanta import demo


class Digits16(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@pytest.fixture(scope="session")
def digits16() -> Digits16:
    x_train, y_train, x_test, y_test = demo.digits(seed=0)
    return Digits16(upsample(x_train), y_train, upsample(x_test), y_test)


@pytest.fixture(scope="session")
def trained_mobilenet(digits16: Digits16) -> TinyMobileNetV2:
    """Trained 6 epochs (96.4% test accuracy), then its channel ranges spread 4× per stage by an
    exact reparametrisation (`spread_channel_ranges`): per-tensor int8 weights then lose ~8 points.
    Tests must copy it before changing it."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = demo.train_classifier(TinyMobileNetV2(), digits16.x_train, digits16.y_train, epochs=6, lr=3e-3)
    finally:
        torch.set_num_threads(before)
    return spread_channel_ranges(model.eval(), spread=4.0)
