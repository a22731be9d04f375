"""`QuantDescriptor`: the pytorch-quantization spellings it promises, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.nn import LayerQuantConfig, QuantDescriptor, TensorQuantizer


@pytest.mark.parametrize("axis", [(0,), [0], 0], ids=["tuple", "list", "int"])
def test_one_axis_tuple_is_the_same_descriptor_as_the_int(axis):
    desc = QuantDescriptor(num_bits=8, axis=axis)
    assert desc.axis == 0 and desc == QuantDescriptor(num_bits=8, axis=0)
    assert QuantDescriptor.from_dict(desc.to_dict()) == desc
    assert desc.to_spec().axis == 0


def test_one_axis_tuple_quantizes_a_linear_per_output_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    cfg = quanta.QuantConfig(default=LayerQuantConfig(input=None, weight=QuantDescriptor(num_bits=8, axis=(0,))))
    sim = quanta.prepare(model, cfg)
    wq = sim[0].weight_quantizer
    assert isinstance(wq, TensorQuantizer) and wq.spec.axis == 0
    x = torch.randn(4, 16)
    assert torch.allclose(sim(x), model(x), atol=0.05)


@pytest.mark.parametrize("axis", [(0, 1), ()], ids=["two", "empty"])
def test_several_or_no_axes_are_refused_by_name(axis):
    with pytest.raises(ValueError, match="QuantDescriptor.axis"):
        QuantDescriptor(axis=axis)


def test_axis_of_another_type_is_refused():
    with pytest.raises(TypeError, match="QuantDescriptor.axis"):
        QuantDescriptor(axis="0")
    with pytest.raises(TypeError, match="QuantDescriptor.axis"):
        QuantDescriptor(axis=("0",))
