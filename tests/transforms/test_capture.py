"""quanta's one capture utility (`quanta.transforms.capture`): hooks removed and train flags
restored whatever happens, the captured values exactly what the layers saw, copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.transforms.capture import CaptureError, capture_inputs, capture_layer, evaluating, first_calls, hooked


class _SameConv(nn.Conv2d):
    """A user conv subclass (TF-style "same" padding in its own forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(_SameConv(2, 4, 3), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_layer_input_and_output_in_eval_mode_with_modes_restored():
    net = _net()
    net.train()
    net[2].eval()  # mixed flags are restored as they were, module by module
    batches = [torch.randn(3, 2, 5, 5), torch.randn(2, 2, 5, 5)]
    x = capture_layer(net, net[4], batches, None, "input")
    y = capture_layer(net, net[0], batches, lambda m, b: m(b), "output")
    assert [m.training for m in net.modules()] == [True, True, True, False, True, True]
    assert _hook_count(net) == 0
    with torch.no_grad():
        net.eval()
        want_x = torch.cat([net[:4](b) for b in batches])  # dropout off: eval mode while capturing
        want_y = torch.cat([net[0](b) for b in batches])
    assert torch.equal(x, want_x)
    assert torch.equal(y, want_y)  # a copy: the in-place ReLU after the conv did not change it
    assert (y < 0).any()


def test_capture_layer_refusals():
    net = _net().eval()
    with pytest.raises(CaptureError, match="never reaches"):
        capture_layer(net, nn.Linear(2, 2), [torch.randn(1, 2, 5, 5)], None, "input")
    with pytest.raises(CaptureError, match="change shape"):
        capture_layer(net, net[0], [torch.randn(1, 2, 5, 5), torch.randn(1, 2, 6, 6)], lambda m, b: m[0](b), "output")
    with pytest.raises(ValueError, match="what must be 'input' or 'output', got 'weights'"):
        capture_layer(net, net[0], [torch.randn(1, 2, 5, 5)], None, "weights")
    assert _hook_count(net) == 0


def test_hooks_removed_and_modes_restored_when_the_forward_raises():
    net = _net().train()
    calls = []
    with pytest.raises(RuntimeError), hooked(dict(net.named_children()), lambda *a: calls.append(a[0])), \
            evaluating(net):
        net(torch.randn(1, 3, 5, 5))  # wrong channel count: the conv raises
    assert _hook_count(net) == 0 and all(m.training for m in net.modules())
    assert calls == []  # (the conv raised before its post-call hook)
    with pytest.raises(RuntimeError):
        capture_layer(net, net[4], [torch.randn(1, 3, 5, 5)], None, "input")
    assert _hook_count(net) == 0 and all(m.training for m in net.modules())


def test_hooked_before_and_after_and_returns_ignored():
    net = _net().eval()
    order = []

    def on_call(name, mod, args, kwargs, out):
        order.append((name, out is None))
        return torch.zeros(1)  # must not replace anything

    x = torch.randn(2, 2, 5, 5)
    want = net(x)
    with hooked({"conv": net[0]}, on_call, before=True), hooked({"head": net[4]}, on_call):
        got = net(x)
    assert torch.equal(got, want) and order == [("conv", True), ("head", False)]


def test_first_calls_records_the_first_call_only_as_copies():
    relu = nn.ReLU(inplace=True)
    lin = nn.Linear(4, 4)

    def forward(model, batch):
        return lin(relu(lin(relu(batch))))

    x = torch.randn(3, 4)
    x0 = x.clone()
    seen = first_calls(lin, x, {"lin": lin, "relu": relu, "never": nn.Identity()}, forward)
    assert set(seen) == {"lin", "relu"}
    (relu_in,), kwargs = seen["relu"]
    assert torch.equal(relu_in, x0) and kwargs == {}  # the in-place ReLU did not change the copy
    assert (x0 < 0).any() and torch.equal(seen["lin"][0][0], torch.relu(x0))
    assert _hook_count(lin) + _hook_count(relu) == 0


class _Residual(nn.Module):
    """A residual block calling an ``Add`` module, and a bias added by a second one (a broadcast operand)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.add, self.shift = quanta.nn.Add(), quanta.nn.Add()
        self.bias = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift(self.add(x, torch.relu_(self.conv(x))), self.bias)


def test_capture_inputs_replays_every_call_of_a_two_input_layer():
    torch.manual_seed(0)
    net = _Residual().eval()
    batches = [torch.randn(3, 4, 5, 5), torch.randn(2, 4, 5, 5)]
    a, b = capture_inputs(net, net.add, batches, None)
    with torch.no_grad():
        want_b = torch.cat([net.conv(x).relu() for x in batches])
    assert torch.equal(a, torch.cat(batches)) and torch.equal(b, want_b)
    assert torch.equal(net.add(a, b), torch.cat([net.add(x, net.conv(x).relu()) for x in batches]))
    # a bias broadcast over the batch cannot be concatenated per call: refused with the reason
    with pytest.raises(CaptureError, match="do not all span the batch"):
        capture_inputs(net, net.shift, batches, None)
    # the one-input capture refuses a two-input layer
    with pytest.raises(CaptureError, match="other than one tensor input"):
        capture_layer(net, net.add, batches, None, "input")
    assert _hook_count(net) == 0
