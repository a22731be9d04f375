"""The registry of ONNX forms (`quanta.io.onnx_forms`): looked up along the class's MRO, one
registration per class, a clear error for an integer class without one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.integer.base import IntegerModule
from quanta.integer.conv import Int8Conv2d, _Int8ConvNd
from quanta.integer.linear import Int8Linear
from quanta.integer.padded_conv import Int8PaddedConv2d
from quanta.integer.recurrent import DynamicInt8LSTM
from quanta.io.onnx_forms import form_of, from_integer, onnx_form, refusal_of


class Doubler(IntegerModule):
    """An integer module type nobody registered an ONNX form for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


class MyInt8Linear(Int8Linear):
    """A subclass that registers nothing of its own."""


def test_lookup_follows_the_mro():
    assert form_of(MyInt8Linear) is form_of(Int8Linear) is not None
    assert form_of(Int8PaddedConv2d) is form_of(Int8Conv2d) is form_of(_Int8ConvNd)
    assert form_of(Doubler) is None
    assert refusal_of(Int8Linear) is None and "recurrence" in (refusal_of(DynamicInt8LSTM) or "")


def test_a_subclass_exports_with_its_base_form():
    lin = MyInt8Linear(8, 4)
    part = from_integer(lin, "lin")
    assert type(part).__name__ == "ExportLinear"
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(part(x), lin(x), atol=1e-5, rtol=1e-5)


def test_unregistered_integer_class_is_refused_by_name(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match=r"cannot export '1' to ONNX: no ONNX form for the integer module Doubler"):
        quanta.export_onnx(nn.Sequential(nn.ReLU(), Doubler()), torch.randn(2, 3), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_registration_is_checked():
    with pytest.raises(TypeError, match="IntegerModule subclasses"):
        onnx_form(nn.Linear)
    with pytest.raises(ValueError, match=r"Int8Linear already has its ONNX form \(_int8_linear\)"):
        onnx_form(Int8Linear)(lambda mod, path: nn.Identity())
    assert form_of(Int8Linear).__name__ == "_int8_linear"  # the failed registration changed nothing
