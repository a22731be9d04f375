"""Which lowering classes `convert` asks about a module: those whose declared ``simulated_type``
the module is (structural), not those whose refusal text happens to read like a type mismatch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.integer import lowering_classes
from quanta.integer.linear import Int8Linear
from quanta.integer.padded_conv import PADDED
from quanta.nn.modules.weighted import QuantLinear
from quanta.transforms.convert import handles


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _calibrated() -> nn.Module:
    torch.manual_seed(0)
    sim = quanta.prepare(_Block().eval(), quanta.preset("static_int8"))
    return quanta.calibrate(sim, [torch.randn(2, 3, 6, 6) for _ in range(2)], progress=False)


def _row(model: nn.Module, name: str):
    return next(r for r in quanta.conversion_report(model) if r.name == name)


@pytest.mark.parametrize("cls", lowering_classes(), ids=lambda c: c.__name__)
def test_every_lowering_class_declares_the_simulated_type_it_lowers(cls):
    assert isinstance(cls.simulated_type, type) and issubclass(cls.simulated_type, nn.Module)
    assert handles(cls, cls.simulated_type.__new__(cls.simulated_type)) is (cls not in PADDED.values())


def test_a_refusal_reading_like_a_type_mismatch_is_still_reported(monkeypatch):
    """Int8Linear refusing a QuantLinear with text containing " is not a " used to be taken for
    "wrong module type" and dropped from the report."""
    reason = "the weight is not a multiple of 64 rows (made-up refusal)"
    monkeypatch.setattr(Int8Linear, "accepts", classmethod(lambda cls, sim: reason))
    integer = quanta.convert(_calibrated(), speed_check=False)
    assert isinstance(integer.head, QuantLinear)
    row = _row(integer, "head")
    assert row.result == "simulated" and f"Int8Linear: {reason}" in row.detail


def test_only_classes_for_the_module_type_are_asked(monkeypatch):
    asked: dict[str, list[str]] = {}
    for cls in lowering_classes():
        def spy(klass, sim, _orig=cls.accepts.__func__):
            asked.setdefault(type(sim).__name__, []).append(klass.__name__)
            return _orig(klass, sim)

        monkeypatch.setattr(cls, "accepts", classmethod(spy))
    integer = quanta.convert(_calibrated(), speed_check=False)
    assert type(integer.conv).__name__ == "Int8Conv2d" and isinstance(integer.head, Int8Linear)
    # (from_simulated asks accepts once more: check_lowerable)
    assert set(asked["QuantConv2d"]) == {"Int8Conv2d"} and set(asked["QuantLinear"]) == {"Int8Linear"}


def test_a_plain_conv_refused_is_not_explained_by_the_padded_conv():
    sim = _calibrated()
    sim.conv.padding_mode = "reflect"
    integer = quanta.convert(sim, speed_check=False)
    row = _row(integer, "conv")
    assert row.result == "simulated" and "padding_mode='reflect'" in row.detail
    assert "Padded" not in row.detail and "padded conv view" not in row.detail
