"""Conv subclasses written like TF ports (``nn.ZeroPad2d`` / ``F.pad`` "same" padding, then
``F.conv2d`` on the module's own weight): recognised exactly by `analyse_conv_subclass`, BatchNorm
folded, equalization pairs found, lowered to integer convs with the padding folded in
(asymmetric through `Int8PaddedConv2d`); anything else stays the user's float module."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta.algorithms.pairs import find_pairs, plain_forward
from quanta.analysis.metrics import sqnr_db
from quanta.core import quantize
from quanta.integer.conv import _Int8ConvNd
from quanta.integer.padded_conv import Int8PaddedConv1d, Int8PaddedConv2d
from quanta.kernels.conv import reference
from quanta.transforms.conv_subclass import PadThenConv, analyse_conv_subclass


def _same_pads(k: int, stride: int) -> tuple[int, int]:
    total = max(k - stride, 0)  # TF "same" on an input divisible by the stride
    return total // 2, total - total // 2


class TFConv2d(nn.Conv2d):
    """A TF-ported conv: static "same" padding by an nn.ZeroPad2d child, then F.conv2d."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> None:
        super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=bias)
        a, b = _same_pads(k, stride)
        self.pad = nn.ZeroPad2d((a, b, a, b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FPadConv2d(nn.Conv2d):
    """Static pads through F.pad with constant zeros, then torch's own forward (its padding too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, [0, 1, 2, 0], mode="constant", value=0.0))


class ConstPadConv1d(nn.Conv1d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pad = nn.ConstantPad1d((0, 2), 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(self.pad(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DoubledConv2d(TFConv2d):
    """Pads like TFConv2d but scales its weight on the way: not a plain conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.pad(x), self.weight * 2, self.bias, self.stride, 0, self.dilation, self.groups)


class ScaledOutConv2d(TFConv2d):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class StandardizedConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DynamicSameConv2d(nn.Conv2d):
    """timm-style dynamic "same": the pads are computed from the input's size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih = x.shape[-1]
        pad = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        return F.conv2d(F.pad(x, [0, pad, 0, pad]), self.weight, self.bias, self.stride)


class OnesPadConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, [1, 1, 1, 1], value=1.0))


class ReflectConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, [1, 1, 1, 1], mode="reflect"))


@pytest.mark.parametrize("module,conv_padding,extra", [
    (TFConv2d(4, 4, 3, stride=2), (0, 0), (0, 1, 0, 1)),
    (TFConv2d(4, 4, 5, stride=2), (1, 1), (0, 1, 0, 1)),
    (TFConv2d(4, 4, 3, stride=1, groups=4), (1, 1), (0, 0, 0, 0)),
    (FPadConv2d(4, 4, 3, padding=1), (1, 1), (0, 1, 2, 0)),
    (ConstPadConv1d(4, 4, 3, padding=1), (1,), (0, 2)),
], ids=["k3s2", "k5s2", "k3s1-depthwise", "F.pad+super", "conv1d"])
def test_pad_then_conv_is_recognised_with_its_padding(module, conv_padding, extra):
    plan = analyse_conv_subclass(module)
    assert plan == PadThenConv(conv_padding, extra)
    x = torch.randn(2, 4, *(11,) * (module.weight.dim() - 2))
    conv = F.conv2d if module.weight.dim() == 4 else F.conv1d
    with torch.no_grad():  # the plan computes what the module computes
        expected = conv(F.pad(x, extra), module.weight, module.bias, module.stride, conv_padding, module.dilation,
                        module.groups)
        assert torch.equal(module(x), expected)


class GatedInputConv2d(nn.Conv2d):
    """A forward with a second input (a gate): not one padding-then-conv of its input."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x * gate, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("module,reason", [
    (DoubledConv2d(4, 4, 3), "self.weight"),
    (ScaledOutConv2d(4, 4, 3), "does not return conv2d"),
    (StandardizedConv2d(4, 4, 3), "self.weight"),
    (DynamicSameConv2d(4, 4, 3, stride=2), "torch.fx cannot trace"),
    (OnesPadConv2d(4, 4, 3), "value 1.0"),
    (ReflectConv2d(4, 4, 3), "mode='reflect'"),
    (GatedInputConv2d(4, 4, 3), "its forward takes 2 inputs, not one"),
], ids=["weight*2", "learned-scale", "weight-standardization", "input-dependent-pad", "ones-pad", "reflect",
        "two-inputs"])
def test_anything_else_is_not_lowerable_with_a_reason(module, reason):
    plan = analyse_conv_subclass(module)
    assert isinstance(plan, str) and reason in plan
    assert not plain_forward(module)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(TFConv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU6())
        self.depthwise = nn.Sequential(TFConv2d(mid, mid, k, stride, groups=mid), nn.BatchNorm2d(mid), nn.ReLU6())
        self.project = nn.Sequential(TFConv2d(mid, cout, 1), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class TFMobileNet(nn.Module):
    """An MBConv stack built like a TF port: every conv a TFConv2d subclass."""

    def __init__(self, head_cls: type = TFConv2d) -> None:
        super().__init__()
        self.stem = nn.Sequential(TFConv2d(1, 16, 3, 2), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(MBConv(16, 24, 3, 2), MBConv(24, 24, 3, 1), MBConv(24, 40, 5, 2),
                                    MBConv(40, 40, 5, 1))
        self.head = nn.Sequential(head_cls(40, 64, 1), nn.BatchNorm2d(64), nn.ReLU6())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # 8x8 digits -> 16x16
        return self.fc(self.head(self.blocks(self.stem(x))).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tf_mobile(digits_data):
    from quanta import demo

    torch.manual_seed(0)
    with torch.random.fork_rng():
        model = demo.train_classifier(TFMobileNet(), digits_data.x_train, digits_data.y_train, epochs=2, seed=0)
    sim = quanta.calibrate(quanta.prepare(model, quanta.preset("static_int8")), digits_data.calib_batches(4),
                           progress=False)
    return model.eval(), sim, quanta.convert(sim)


def _tf_convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, TFConv2d)]


def test_bn_folded_and_every_tf_conv_lowered_to_an_integer_conv(tf_mobile):
    model, sim, q = tf_mobile
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sim.modules())  # all 14 folded
    report = quanta.conversion_report(q)
    assert len(_tf_convs(model)) == 14
    convs = [r for r in report if r.simulated == "QuantTFConv2d"]
    assert len(convs) == 14 and all(r.result in ("Int8Conv2d", "Int8PaddedConv2d") for r in convs)
    padded = [r.name for r in convs if r.result == "Int8PaddedConv2d"]  # the stride-2 ones
    assert padded == ["stem", "blocks.0.depthwise", "blocks.2.depthwise"]  # (wrappers collapsed)
    assert not any(r.result in ("simulated", "float") for r in report)
    stem = q.stem
    assert isinstance(stem, Int8PaddedConv2d) and stem.output_kind == "uint8" and stem.post_op == "relu6"
    cov = quanta.coverage(q)
    assert cov.counts["quantized"] == 0 and cov.counts["integer"] >= 14


def test_the_integer_model_is_close_to_fp32(tf_mobile, digits_data):
    model, _, q = tf_mobile
    x = digits_data.x_test[:256]
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert sqnr_db(ref, out) > 25
    agree = float((ref.argmax(1) == out.argmax(1)).float().mean())
    assert agree > 0.97 and float((ref.argmax(1) == digits_data.y_test[:256]).float().mean()) > 0.8


def test_each_padded_integer_conv_equals_the_reference_on_zero_point_padded_codes(tf_mobile, digits_data):
    """Tier 1: the padded integer conv is exactly the reference kernel on the codes padded with the
    zero point (the real 0.0) by the full TF padding, and matches the simulated layer."""
    _, sim, q = tf_mobile
    for name, m in q.named_modules():
        if not isinstance(m, Int8PaddedConv2d):
            continue
        layer = copy.deepcopy(m).set_output("float", post_op="none")
        x = torch.randn(3, m.in_channels, 16, 16) * 2
        codes = quantize(x, m.input_scale, m.input_zero_point, m.input_spec)
        full = F.pad(codes, [e + p for e, p in zip(m.extra_padding, [m.padding[1]] * 2 + [m.padding[0]] * 2)],
                     value=int(m.input_zero_point))
        expected = reference(full.to(torch.uint8), float(m.input_scale), int(m.input_zero_point), m.weight,
                             m.weight_scale, m.bias, list(m.stride), [0, 0], list(m.dilation), m.groups, "none",
                             None, 0, None)
        with torch.no_grad():
            got = layer(x)
            sim_layer = sim.get_submodule(name)
            if isinstance(sim_layer, nn.Sequential):  # (convert collapsed Sequential(conv, Identity, ReLU6))
                sim_layer = sim_layer[0]
            simulated = sim_layer(x)
        assert torch.equal(got.contiguous(), expected), name
        torch.testing.assert_close(got, simulated, atol=1e-5 * float(simulated.abs().max()), rtol=0)


def test_padded_conv1d_equals_the_simulation_and_the_reference():
    torch.manual_seed(0)
    model = nn.Sequential(ConstPadConv1d(4, 8, 3, padding=1, stride=2)).eval()
    data = [torch.randn(4, 4, 17) for _ in range(2)]
    sim = quanta.calibrate(quanta.prepare(model, quanta.preset("static_int8")), data, progress=False)
    q = quanta.convert(sim)
    m = q[0]
    assert isinstance(m, Int8PaddedConv1d) and m.extra_padding == (0, 2) and m.padding == (1,)
    x = torch.randn(3, 4, 17)
    codes = quantize(x, m.input_scale, m.input_zero_point, m.input_spec).to(torch.uint8)
    expected = reference(F.pad(codes, [1, 3], value=int(m.input_zero_point)), float(m.input_scale),
                         int(m.input_zero_point), m.weight, m.weight_scale, m.bias, [2], [0], [1], 1, "none", None, 0, None)
    with torch.no_grad():
        assert torch.equal(m(x).contiguous(), expected)
        torch.testing.assert_close(m(x), sim(x), atol=1e-5 * float(sim(x).abs().max()), rtol=0)


def test_save_load_gives_identical_outputs(tf_mobile, digits_data, tmp_path):
    _, _, q = tf_mobile
    quanta.save(q, tmp_path / "tf.quanta")
    back = quanta.load(tmp_path / "tf.quanta", model=TFMobileNet())
    x = digits_data.x_test[:32]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert [type(m).__name__ for m in back.modules() if isinstance(m, _Int8ConvNd)] == \
        [type(m).__name__ for m in q.modules() if isinstance(m, _Int8ConvNd)]


def test_equalization_pairs_include_tf_convs():
    model = TFMobileNet().eval()
    folded = quanta.fold_batchnorm(model)  # (the pairs CLE sees: after folding)
    assert len(folded) == 14
    pairs, _ = find_pairs(model)
    assert ("blocks.0.expand.0", "blocks.0.depthwise.0") in [(p.first, p.second) for p in pairs]
    assert all(plain_forward(model.get_submodule(n)) for n in _tf_convs(model))


def test_a_subclass_with_an_extra_op_stays_the_users_float_module(digits_data):
    torch.manual_seed(0)
    model = TFMobileNet(head_cls=DoubledConv2d).eval()
    sim = quanta.calibrate(quanta.prepare(model, quanta.preset("static_int8")), digits_data.calib_batches(2),
                           progress=False)
    q = quanta.convert(sim)
    entry = {r.name: r for r in quanta.conversion_report(q)}["head.0"]
    assert entry.result == "float" and "DoubledConv2d" in entry.detail and "self.weight" in entry.detail
    head = q.head[0]
    assert type(head) is DoubledConv2d and not any(isinstance(c, quanta.TensorQuantizer) for c in head.modules())
    assert isinstance(q.head[1], nn.BatchNorm2d)  # its BatchNorm is not folded into a forward it cannot see
    x = torch.randn(2, 40, 4, 4)
    with torch.no_grad():
        assert torch.equal(q.head(x), model.head(x))  # exactly the user's float computation
