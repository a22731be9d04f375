"""`collapse_wrappers` (run by `convert`): a container that, after BN folding and fusion, only
wraps one integer module is replaced by it; everything else keeps its structure. Same numbers,
fewer module calls, a report that names modules as they are, and files that load."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

import quanta
from quanta.integer.base import IntegerModule
from quanta.integer.conv import Int8Conv2d
from quanta.transforms.capture import hooked
from quanta.transforms.simplify import collapse_wrappers

convert_mod = importlib.import_module("quanta.transforms.convert")  # (the package exports the function)


def _cna(cin: int, cout: int, k: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6())


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_cna(c, 2 * c, 1), _cna(2 * c, 2 * c, 3, groups=2 * c),
                                  nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.add = quanta.nn.Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x, self.conv(x))


class TinyMobile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_cna(4, 16, 3), Block(16), Block(16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


@pytest.fixture(scope="module")
def tiny():
    model, sim, _ = calibrated_tiny(size=16, batches=4)
    return model, sim


def calibrated_tiny(size: int, batches: int) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    """``TinyMobile`` with non-trivial BN statistics (float twins must hold the folded BN), and its
    static_int8 simulation calibrated on ``batches`` random [4, 4, size, size] batches."""
    torch.manual_seed(0)
    model = TinyMobile().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.75, 1.25)
    calib = [torch.randn(4, 4, size, size) for _ in range(batches)]
    sim = quanta.calibrate(quanta.prepare(model, quanta.preset("static_int8")), calib, progress=False)
    return model, sim, calib


def _calls(model: nn.Module, x: torch.Tensor) -> int:
    n = [0]
    with hooked(dict(model.named_modules()), lambda *_: n.__setitem__(0, n[0] + 1), before=True), torch.no_grad():
        model(x)
    return n[0]


def test_wrappers_of_one_integer_module_collapse_with_the_same_numbers(tiny, monkeypatch):
    _, sim = tiny
    q = quanta.convert(sim, speed_check=False)
    monkeypatch.setattr(convert_mod, "collapse_wrappers", lambda model: {})
    kept = quanta.convert(sim, speed_check=False)
    assert type(q.features[0]) is Int8Conv2d and type(kept.features[0]) is nn.Sequential
    block = q.features[1].conv  # two working children and a trailing Identity: kept as it is
    assert [type(m).__name__ for m in block] == ["Int8Conv2d", "Int8Conv2d", "Int8Conv2d", "Identity"]
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(x), kept(x))
    assert _calls(q, x) < _calls(kept, x) - 10
    names = dict(q.named_modules())
    integer = [r for r in quanta.conversion_report(q) if r.result not in ("simulated", "float")]
    assert integer and all(isinstance(names.get(r.name), IntegerModule) for r in integer)
    assert "features.0" in {r.name for r in integer} and "features.1.conv.0" in {r.name for r in integer}


def test_containers_with_hooks_custom_forward_or_two_modules_stay():
    conv = Int8Conv2d(4, 4, 1)
    hooked = nn.Sequential(copy.deepcopy(conv), nn.Identity())
    hooked.register_forward_hook(lambda *_: None)

    class Custom(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    root = nn.Module()
    root.hooked, root.custom = hooked, Custom(copy.deepcopy(conv), nn.Identity())
    root.two = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(conv))
    root.float_only = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Identity())
    root.plain = nn.Sequential(nn.Identity(), copy.deepcopy(conv), nn.Identity())
    renamed = collapse_wrappers(root)
    assert renamed == {"plain.1": "plain"} and isinstance(root.plain, Int8Conv2d)
    assert all(type(getattr(root, n)) is not Int8Conv2d for n in ("hooked", "custom", "two", "float_only"))


def test_collapsed_model_saves_and_loads_onto_a_fresh_float_model(tiny, tmp_path):
    model, sim = tiny
    q = quanta.convert(sim, speed_check=False)
    quanta.save(q, tmp_path / "m.quanta")
    back = quanta.load(tmp_path / "m.quanta", model=TinyMobile())
    assert type(back.features[0]) is Int8Conv2d
    x = torch.randn(3, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert [r.name for r in quanta.conversion_report(back)] == [r.name for r in quanta.conversion_report(q)]


def test_collapsed_model_exports_to_onnx(tiny, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from quanta.io.onnx_export import export_onnx

    _, sim = tiny
    q = quanta.convert(sim, speed_check=False)
    x = torch.randn(2, 4, 16, 16)
    export_onnx(q, x, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ours = q(x)
    torch.testing.assert_close(got, ours, rtol=0, atol=0.05 * float(ours.abs().max()))
