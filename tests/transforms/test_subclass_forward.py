"""Convert never replaces a user subclass's own ``forward`` by an integer layer computing something else:
a pad-then-conv forward lowers (padding folded in), any other stays the user's float module."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta.integer.base import IntegerModule


class GatedLinear(nn.Linear):
    """A Linear with extra logic in its forward (a learned gate and a residual)."""

    def __init__(self, features: int) -> None:
        super().__init__(features, features)
        self.gate = nn.Parameter(torch.full((features,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate) * super().forward(x) + x


class NamedLinear(nn.Linear):
    """A Linear subclass that only adds an attribute: torch's forward runs."""

    def __init__(self, i: int, o: int, tag: str = "proj") -> None:
        super().__init__(i, o)
        self.tag = tag


class SameConv(nn.Conv2d):
    """TF-ported "same" padding computed in forward, then F.conv2d on self.weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = max(self.kernel_size[0] - self.stride[0], 0)
        pad_w = max(self.kernel_size[1] - self.stride[1], 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SameConv(3, 8, 3, stride=2)
        self.gated = GatedLinear(8)
        self.named = NamedLinear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.named(self.gated(torch.relu(self.conv(x)).mean(dim=(2, 3))))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Net().eval()
    data = [torch.randn(8, 3, 9, 9) for _ in range(2)]
    sim = quanta.calibrate(quanta.prepare(model, quanta.preset("static_int8")), data, progress=False)
    return model, sim, quanta.convert(sim)


def test_a_subclass_whose_forward_quanta_cannot_lower_stays_the_users_float_module(net):
    model, _, q = net
    module = q.gated
    assert type(module) is GatedLinear and not any(True for _ in module.children())  # no quantizers left
    entry = {r.name: r for r in quanta.conversion_report(q)}["gated"]
    assert entry.result == "float" and "subclass GatedLinear overrides forward" in entry.detail
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(module(x), model.gated(x))  # the user's logic, in float, exactly


def test_a_subclass_that_pads_then_convolves_lowers_with_its_padding(net):
    _, sim, q = net
    assert isinstance(q.conv, IntegerModule) and q.conv.extra_padding == (0, 1, 0, 1)
    entry = {r.name: r for r in quanta.conversion_report(q)}["conv"]
    assert entry.result == "Int8PaddedConv2d"
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = torch.relu(sim.conv(x))  # (the model's ReLU is fused into the integer conv)
        assert q.conv.post_op == "relu"
        torch.testing.assert_close(q.conv(x), ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


def test_a_subclass_without_its_own_forward_still_lowers(net):
    _, sim, q = net
    assert isinstance(q.named, IntegerModule)
    h = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(q.named(h), sim.named(h), atol=1e-5, rtol=0)


def test_the_whole_model_computes_what_the_simulation_computes(net):
    model, sim, q = net
    expected = copy.deepcopy(sim)
    expected.gated = copy.deepcopy(model.gated)  # (convert made it float again)
    x = torch.randn(16, 3, 9, 9)
    with torch.no_grad():
        ref, simulated, out = model(x), expected(x), q(x)
    torch.testing.assert_close(out, simulated, atol=1e-5, rtol=0)
    assert F.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.99
