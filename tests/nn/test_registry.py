"""The float → quantized registry: custom registrations, user subclasses, idempotence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.core import choose_qparams, compute_range, fake_quantize
from quanta.nn import (
    LayerQuantConfig,
    QuantLinear,
    QuantModule,
    TensorQuantizer,
    lookup,
    register_quant_module,
    registered_types,
    unregister_quant_module,
)


class ChannelScale(nn.Module):
    """A user layer with a weight: ``x * weight`` per channel (last axis)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.0, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class QuantChannelScale(QuantModule, ChannelScale):
    float_type = ChannelScale
    weight_channel_axis = 0


@pytest.fixture
def registered_scale():
    register_quant_module(ChannelScale, QuantChannelScale)
    try:
        yield
    finally:
        unregister_quant_module(ChannelScale)
    assert ChannelScale not in registered_types()


def test_registered_custom_module_is_swapped_by_prepare(registered_scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), ChannelScale(6))
    qmodel = quanta.prepare(model)
    assert type(qmodel[1]) is QuantChannelScale
    assert type(model[1]) is ChannelScale  # the float model is untouched
    x = torch.randn(32, 4)
    quanta.calibrate(qmodel, [x], progress=False)
    assert qmodel[1].input_quantizer.amax is not None
    out = qmodel(x)
    expected = model(x)
    assert not torch.equal(out, expected)
    torch.testing.assert_close(out, expected, atol=0.05, rtol=0)
    report = quanta.coverage(qmodel)
    assert {e.name for e in report.by_status("quantized")} == {"0", "1"}


def test_unregistered_custom_module_stays_float():
    qmodel = quanta.prepare(nn.Sequential(ChannelScale(3)))
    assert type(qmodel[0]) is ChannelScale
    assert [e.status for e in quanta.coverage(qmodel).entries] == ["float"]


def test_register_validates_its_arguments(registered_scale):
    with pytest.raises(ValueError, match="already mapped"):
        register_quant_module(ChannelScale, QuantLinear)
    register_quant_module(ChannelScale, QuantChannelScale)  # the same mapping again is fine
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_quant_module(int, QuantChannelScale)
    with pytest.raises(TypeError, match="from_float"):
        register_quant_module(nn.Tanh, object)
    with pytest.raises(KeyError, match="Tanh"):
        unregister_quant_module(nn.Tanh)


def test_register_replace_overrides_a_builtin():
    class LoudLinear(QuantLinear):
        pass

    register_quant_module(nn.Linear, LoudLinear, replace=True)
    try:
        assert type(quanta.prepare(nn.Sequential(nn.Linear(2, 2)))[0]) is LoudLinear
    finally:
        register_quant_module(nn.Linear, QuantLinear, replace=True)
    assert lookup(nn.Linear) is QuantLinear


class AffineHead(nn.Linear):
    """A user subclass of nn.Linear with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x) + 1.0


def test_linear_subclass_gets_a_quantized_class_that_keeps_its_forward():
    torch.manual_seed(0)
    model = nn.Sequential(AffineHead(8, 3))
    qmodel = quanta.prepare(model)
    layer = qmodel[0]
    assert isinstance(layer, AffineHead) and isinstance(layer, QuantLinear)
    assert type(layer).__name__ == "QuantAffineHead"
    assert lookup(AffineHead) is QuantLinear
    x = torch.randn(16, 8)
    for q in qmodel.modules():
        if isinstance(q, TensorQuantizer):
            q.disable()
    torch.testing.assert_close(qmodel(x), model(x), atol=0, rtol=0)  # 2·linear + 1 kept
    for q in qmodel.modules():
        if isinstance(q, TensorQuantizer):
            q.enable()
    quanta.calibrate(qmodel, [x], progress=False)
    out = qmodel(x)
    assert not torch.equal(out, model(x))
    w_spec = layer.weight_quantizer.spec
    w_q = fake_quantize(layer.weight, *choose_qparams(*compute_range(layer.weight, w_spec), w_spec), w_spec)
    expected = 2.0 * torch.nn.functional.linear(layer.input_quantizer(x), w_q, layer.bias) + 1.0
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_prepare_twice_does_not_quantize_twice():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    once = quanta.prepare(model)
    twice = quanta.prepare(once)
    count = lambda m: sum(isinstance(q, TensorQuantizer) for q in m.modules())
    assert count(once) == count(twice) == 4
    assert lookup(QuantLinear) is None
    assert [type(m) for m in twice] == [QuantLinear, nn.ReLU, QuantLinear]


def test_from_float_rejects_the_wrong_type():
    with pytest.raises(TypeError, match="expects a Linear"):
        QuantLinear.from_float(nn.Conv2d(1, 1, 1), LayerQuantConfig())


# ----------------------------------------------------------------------------- type names in configs
@pytest.mark.parametrize("name,close", [("Linaer", "Linear"), ("conv1d", "Conv1d"), ("LSTMcell", "LSTMCell")])
def test_unknown_type_names_in_module_types_raise_with_close_names(name, close):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=rf"module_types: unknown type name '{name}'.*close names:.*{close}"):
        quanta.prepare(model, quanta.QuantConfig(module_types={name: None}))
    assert type(model[0]) is nn.Linear


def test_type_names_of_registered_classes_model_classes_and_by_path_classes_are_known():
    model = nn.Sequential(nn.Linear(4, 4), ChannelScale(4))  # ChannelScale: not registered, but in the model
    for name in ("ChannelScale", "Conv2d", "Conv1D", "TransformerEncoderLayer", "_ConvNd"):
        quanta.prepare(model, quanta.QuantConfig(module_types={name: None}))


def test_transformers_conv1d_is_registered_by_path_without_importing_transformers():
    import subprocess
    import sys

    code = ("import sys, quanta; from quanta.nn.registry import BY_PATH; "
            "assert 'transformers.pytorch_utils.Conv1D' in BY_PATH; "
            "assert 'transformers' not in sys.modules, 'quanta imported transformers'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
