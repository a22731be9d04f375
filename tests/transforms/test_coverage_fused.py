"""`coverage` reports an activation an integer kernel applies as "fused" (with the module whose
kernel applies it), not as float; the marker survives save / load; a producer the speed check
kept float makes its activation "float" again."""

from __future__ import annotations

import torch
from torch import nn

import quanta
from quanta.nn.modules.fused import FusedActivation


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.conv2(self.act1(self.conv1(x)))))


def test_linear_activations_are_reported_fused_with_their_kernel(tmp_path) -> None:
    q = quanta.quantize(_mlp(), "dynamic_int8", speed_check=False, progress=False)
    report = quanta.coverage(q)
    fused = {e.name: e for e in report.by_status("fused")}
    assert set(fused) == {"1", "3"}
    assert fused["1"].type == "GELU" and "'0' (Int8Linear)" in fused["1"].detail
    assert fused["3"].type == "ReLU" and "'2'" in fused["3"].detail
    assert not any(e.type in ("GELU", "ReLU", "Identity") for e in report.by_status("float"))
    assert report.counts["fused"] == 2 and "2 activation(s) fused" in str(report)

    loaded = quanta.load(quanta.save(q, tmp_path / "m.safetensors"), model=_mlp())
    assert isinstance(loaded[1], FusedActivation) and loaded[1].into == "0"
    assert quanta.coverage(loaded).counts["fused"] == 2
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x), rtol=0, atol=0)


def test_conv_activations_fused_into_integer_convs_are_reported() -> None:
    model = _ConvNet().eval()
    x = torch.randn(2, 3, 12, 12)
    q = quanta.quantize(model, "static_int8", [x, torch.randn_like(x)], speed_check=False, progress=False)
    fused = {e.name: e for e in quanta.coverage(q).by_status("fused")}
    assert set(fused) == {"act1", "act2"}
    assert "conv1" in fused["act1"].detail and fused["act2"].type == "ReLU6"
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0) > 0.99


def test_an_activation_whose_producer_went_back_to_float_is_float_again() -> None:
    q = quanta.quantize(_mlp(), "dynamic_int8", speed_check=False, progress=False)
    q[0] = nn.Sequential(nn.Linear(32, 64), nn.GELU())  # what the speed check puts back: the float twin + activation
    entry = next(e for e in quanta.coverage(q).entries if e.name == "1")
    assert entry.status == "float" and "kept float" in entry.detail


def test_a_producer_the_speed_check_keeps_float_gets_the_users_activation_back_and_loads(tmp_path, monkeypatch) -> None:
    """The speed check puts back the float twin of a layer whose kernel had taken over the next
    activation: the user's activation module comes back in its place (no wrapper), so the saved file
    loads onto the user's float model."""
    from quanta.transforms import speed_check

    monkeypatch.setattr(speed_check, "_decide", lambda mod, name, shape, kernel, tol, *a: speed_check.SpeedChoice(
        name, type(mod).__name__, shape, 2.0, 1.0, "float", kernel, 2.0, tol))  # every layer: float is faster
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(8 * 10 * 10, 16), nn.GELU(),
                             nn.Linear(16, 4)).eval()

    model = build()
    x = torch.randn(2, 3, 12, 12)
    q = quanta.quantize(model, "static_int8", [x, torch.randn_like(x)], progress=False)
    assert [type(m) for m in q] == [type(m) for m in model]  # float twins and the user's activations back
    loaded = quanta.load(quanta.save(q, tmp_path / "m.safetensors"), model=build())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_fused_activation_follows_its_producer_when_a_wrapper_collapses() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(16, 32)), nn.GELU(), nn.Linear(32, 4)).eval()
    q = quanta.quantize(model, "dynamic_int8", speed_check=False, progress=False)
    assert type(q[0]).__name__ == "Int8Linear"  # the wrapper collapsed: "0.0" is now "0"
    assert isinstance(q[1], FusedActivation) and q[1].into == "0"
    assert quanta.coverage(q).by_status("fused")[0].detail.startswith("applied by '0' (Int8Linear)")
