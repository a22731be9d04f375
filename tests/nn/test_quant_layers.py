"""Quantized Linear / Conv / ConvTranspose: exact fake-quant numerics, the per-channel axis,
and user Conv2d subclasses whose forward pads before convolving."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta.core import choose_qparams, compute_range, fake_quantize
from quanta.nn import LayerQuantConfig, QuantConv2d, QuantDescriptor, QuantModule, TensorQuantizer

PER_CHANNEL = QuantDescriptor(per_channel=True, narrow_range=True)
PER_TENSOR = QuantDescriptor(narrow_range=True)


def _fq(t: torch.Tensor, spec) -> torch.Tensor:
    """Reference fake quantization of ``t`` with its own range, from quanta.core alone."""
    lo, hi = compute_range(t, spec)
    return fake_quantize(t, *choose_qparams(lo, hi, spec), spec)


def _sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.detach(), test.detach()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum()))


LAYERS = {
    "linear": (lambda: nn.Linear(12, 5), lambda: torch.randn(7, 12), F.linear, {}),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1, stride=2), lambda: torch.randn(2, 3, 9, 9),
               F.conv2d, {"stride": 2, "padding": 1}),
}


@pytest.mark.parametrize("weight", [PER_CHANNEL, PER_TENSOR, QuantDescriptor(num_bits=4, per_channel=True)],
                         ids=["w8-per-channel", "w8-per-tensor", "w4-per-channel"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fake_quant_layer_equals_float_op_on_core_fake_quantized_tensors(kind, weight):
    torch.manual_seed(0)
    make, make_x, op, kwargs = LAYERS[kind]
    float_layer = make()
    x = make_x()
    qlayer = quanta.prepare(float_layer, quanta.QuantConfig(default=LayerQuantConfig(weight=weight)))
    assert isinstance(qlayer, QuantModule)
    quanta.calibrate(qlayer, [x], progress=False)
    got = qlayer(x)

    in_spec = qlayer.input_quantizer.spec
    w_spec = weight.to_spec(axis=0)
    expected = op(_fq(x, in_spec), _fq(float_layer.weight, w_spec), float_layer.bias, **kwargs)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.equal(got, op(x, float_layer.weight, float_layer.bias, **kwargs))


# ---------------------------------------------------------------------------- per-channel axis
def _wild_weight(shape: tuple[int, ...], out_axis: int) -> torch.Tensor:
    """Random weights whose magnitude spans 10^-3 .. 10^3 across output channels."""
    torch.manual_seed(1)
    w = torch.randn(shape)
    n_out = shape[out_axis]
    mags = torch.logspace(-3, 3, n_out)
    view = [1] * len(shape)
    view[out_axis] = n_out
    return w * mags.reshape(view)


AXIS_CASES = {
    # name: (float layer, input, functional op, output-channel axis of the weight)
    "linear": (lambda: nn.Linear(6, 5), (4, 6), F.linear, 0),
    "conv2d": (lambda: nn.Conv2d(4, 5, 3), (2, 4, 6, 6), F.conv2d, 0),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 5, 3), (2, 4, 5, 5), F.conv_transpose2d, 1),
}


@pytest.mark.parametrize("case", sorted(AXIS_CASES))
def test_per_channel_weights_use_the_output_channel_axis(case):
    torch.manual_seed(0)
    make, x_shape, op, out_axis = AXIS_CASES[case]
    layer, x = make(), torch.randn(x_shape)
    with torch.no_grad():
        layer.weight.copy_(_wild_weight(tuple(layer.weight.shape), out_axis))
    cfg = quanta.QuantConfig(default=LayerQuantConfig(input=None, weight=PER_CHANNEL))
    qlayer = quanta.prepare(layer, cfg)
    assert qlayer.weight_quantizer.spec.axis == out_axis
    with torch.no_grad():
        got = qlayer(x)

    w, b = layer.weight.detach(), layer.bias.detach()
    right = op(x, _fq(w, PER_CHANNEL.to_spec(axis=out_axis)), b)
    wrong = op(x, _fq(w, PER_CHANNEL.to_spec(axis=1 - out_axis)), b)
    exact = op(x, w, b)
    torch.testing.assert_close(got, right, atol=0, rtol=0)
    # every output channel, even the 10^-3 one, survives with an output-channel scale;
    # an input-channel scale is set by the 10^3 channel and wipes out the small ones.
    channel_dim = 1 if x.dim() > 2 else -1

    def worst_channel_error(y: torch.Tensor) -> float:
        err = (y - exact).abs().transpose(0, channel_dim).flatten(1).amax(1)
        scale = (exact - b.reshape([-1] + [1] * (x.dim() - 2))).abs()
        scale = scale.transpose(0, channel_dim).flatten(1).amax(1)
        return float((err / scale).max())

    assert worst_channel_error(got) < 0.05  # 8-bit: about 0.01
    assert worst_channel_error(wrong) > 0.5  # about 1: channels zeroed


# ---------------------------------------------------------------------------- padding subclasses
class PadThenConv(nn.Conv2d):
    """Pads inside its own forward, then calls F.conv2d with self.weight directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class PadThenSuper(nn.Conv2d):
    """Pads inside its own forward, then calls nn.Conv2d.forward through super()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (1, 1, 1, 1), mode="reflect"))


@pytest.mark.parametrize("cls", [PadThenConv, PadThenSuper], ids=["F.conv2d", "super().forward"])
def test_conv_subclass_padding_in_forward_keeps_shape_values_and_quantizes_weights(cls):
    torch.manual_seed(0)
    model = nn.Sequential(cls(3, 8, 3), nn.ReLU()).eval()
    x = torch.rand(4, 3, 10, 10)
    expected = model(x)
    assert expected.shape == (4, 8, 10, 10)

    qmodel = quanta.prepare(model)
    conv = qmodel[0]
    assert isinstance(conv, cls) and isinstance(conv, QuantConv2d)
    assert type(conv).__name__ == f"Quant{cls.__name__}"
    quanta.calibrate(qmodel, [x], progress=False)
    used: list[torch.Tensor] = []
    conv.weight_quantizer.register_forward_hook(lambda mod, args, out: used.append(out))
    got = qmodel(x)
    assert got.shape == expected.shape
    assert _sqnr_db(expected, got) > 30  # within quantization error of the float model
    assert not torch.equal(got, expected)

    assert len(used) == 1  # the weight quantizer ran once and its output is the weight used
    w_q = used[0]
    assert not torch.equal(w_q, conv.weight)
    xq = conv.input_quantizer(x)
    reference = F.relu(F.conv2d(F.pad(xq, (1, 1, 1, 1), mode="reflect"), w_q, conv.bias))
    torch.testing.assert_close(got, reference, atol=0, rtol=0)
    torch.testing.assert_close(w_q, _fq(conv.weight, PER_CHANNEL.to_spec(axis=0)), atol=0, rtol=0)
    # the shadowing is undone after the call: the parameter is the float one again
    assert isinstance(conv.weight, nn.Parameter) and "weight" not in conv.__dict__


def test_weight_gradient_reaches_the_float_parameter():
    torch.manual_seed(0)
    qlayer = quanta.prepare(nn.Linear(6, 3), quanta.QuantConfig(default=LayerQuantConfig(input=None)))
    qlayer(torch.randn(5, 6)).sum().backward()
    assert qlayer.weight.grad is not None and bool(qlayer.weight.grad.abs().sum() > 0)


def test_quantizers_are_tensor_quantizer_children_with_expected_axes():
    qconv = quanta.prepare(nn.ConvTranspose2d(2, 3, 3))
    assert isinstance(qconv.input_quantizer, TensorQuantizer)
    assert qconv.weight_quantizer.spec.axis == 1
    assert quanta.prepare(nn.Conv1d(2, 3, 3)).weight_quantizer.spec.axis == 0
    emb = quanta.prepare(nn.Embedding(10, 4))
    assert emb.input_quantizer is None  # indices are not quantized
    out = emb(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 4) and not torch.equal(out, emb.weight[[1, 2, 3]].unsqueeze(0))
