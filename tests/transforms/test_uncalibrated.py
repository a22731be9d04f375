"""Modules calibration never calls stay float (and are reported); `convert` does not abort."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.integer.base import IntegerModule
from quanta.nn import Add


class _Block(nn.Module):
    """A residual block that defines its addition always but uses it only where shapes match."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.relu, self.add = nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(x))
        return self.add(h, x) if h.shape == x.shape else h


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_Block(3, 8), _Block(8, 8), _Block(8, 8))
        self.head = nn.Linear(8, 4)
        self.aux_head = nn.Linear(8, 2)  # used in training only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x).mean(dim=(2, 3))
        return self.head(h) + (self.aux_head(h).sum() if self.training else 0)


@pytest.fixture(scope="module")
def net_and_sim():
    torch.manual_seed(0)
    model = _Net().eval()
    data = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    with pytest.warns(UserWarning, match="saw no data"):
        sim = quanta.calibrate(quanta.prepare(model, quanta.preset("static_int8")), data, progress=False)
    return model, sim


def test_never_called_modules_stay_float_and_are_reported(net_and_sim):
    _, sim = net_and_sim
    q = quanta.convert(sim)
    assert type(q.blocks[0].add) is Add  # the first block's addition never ran: float again
    assert isinstance(q.blocks[1].add, IntegerModule) and isinstance(q.blocks[2].add, IntegerModule)
    assert type(q.aux_head) is nn.Linear
    report = {r.name: r for r in quanta.conversion_report(q)}
    for name in ("blocks.0.add", "aux_head"):
        assert report[name].result == "float" and "never called during calibration" in report[name].detail
    cov = {e.name: e for e in quanta.coverage(q).entries}
    assert cov["aux_head"].status == "float" and "never called" in cov["aux_head"].detail
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(q(x), sim(x), atol=1e-4)


def test_the_float_twin_computes_the_float_module(net_and_sim):
    model, sim = net_and_sim
    q = quanta.convert(sim)
    h = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(q.aux_head(h), model.aux_head(h))


def test_nothing_calibrated_still_raises_naming_the_quantizer(net_and_sim):
    model, _ = net_and_sim
    sim = quanta.prepare(model, quanta.preset("static_int8"))
    with pytest.raises(ValueError, match=r"blocks\.0\.conv\.input_quantizer.*calibrate"):
        quanta.convert(sim)


def test_self_attention_unused_key_value_quantizers_do_not_abort(trained_transformer, token_data):
    """Self-attention never feeds its key/value quantizers (key is query): convert does not abort;
    it lowers the attention's projections (`Int8MultiheadAttention`, self-attention only) and the rest."""
    sim = quanta.calibrate(quanta.prepare(trained_transformer), token_data.calib_batches(2), progress=False)
    q = quanta.convert(sim)
    report = {r.name: r for r in quanta.conversion_report(q)}
    attn = report["encoder.self_attn"]
    assert attn.result == "Int8MultiheadAttention"
    assert report["head"].result == "Int8Linear"
    x = token_data.x_test[:16]
    with torch.no_grad():
        ref, out = trained_transformer(x), q(x)
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() > 0.9
