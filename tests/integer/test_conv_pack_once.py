"""Pack once: one `quanta.quantize` lays each integer conv (and residual addition) out for its
kernels once, where it did so three times (construction, `from_simulated`, convert), and every
change the runtime form depends on (set_output, a device move, load_state_dict, a copy, new
weights then ``pack()``) still rebuilds it or is served fresh: nothing stale runs.

Conv builds are counted by the work they do (`weight_code_max` of the weight codes, which every
build computes), whatever the method doing it is called; the addition's by its ``build_packed``."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

import quanta
from quanta.integer import conv as int_conv
from quanta.integer.add import Int8Add
from quanta.integer.conv import Int8Conv2d, _Int8ConvNd
from quanta.transforms import speed_check as speed_check_module


class ResidualCNN(nn.Module):
    """conv + BN + ReLU, a max-pool, a residual block whose sum is a `quanta.nn.Add`, a 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv1, self.relu1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        self.add, self.relu2 = quanta.nn.Add(), nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.relu(self.bn(self.stem(x))))
        return self.head(self.relu2(self.add(self.conv2(self.relu1(self.conv1(y))), y)))


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Builds per module (``("conv", id(weight codes))`` / ``("add", id(module))``)."""
    seen: Counter = Counter()
    code_max, add_build = int_conv.weight_code_max, Int8Add.build_packed

    def counted_code_max(w: torch.Tensor) -> int:
        seen[("conv", id(w))] += 1
        return code_max(w)

    def counted_add_build(self: Int8Add) -> None:
        seen[("add", id(self))] += 1
        add_build(self)

    monkeypatch.setattr(int_conv, "weight_code_max", counted_code_max)
    monkeypatch.setattr(Int8Add, "build_packed", counted_add_build)
    return seen


def _model() -> ResidualCNN:
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    with torch.no_grad():  # BN statistics that folding has to honour
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _quantize(speed_check: bool) -> nn.Module:
    data = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    return quanta.quantize(_model(), "static_int8", data, example=data[0], speed_check=speed_check, progress=False)


def _built(model: nn.Module, builds: Counter) -> dict[str, int]:
    return {name: builds[("conv", id(m.weight)) if isinstance(m, _Int8ConvNd) else ("add", id(m))]
            for name, m in model.named_modules() if isinstance(m, (_Int8ConvNd, Int8Add))}


def _integer_fast(kind: str, fn) -> float:
    """The speed check's clock, made up: every integer layer 2x faster than float (so the chain
    stays integer on any CPU; on one without VNNI the real clock reverts 8-bit conv chains)."""
    fn()
    return 1.0 if kind == "integer" else 2.0


@pytest.mark.parametrize("speed_check", [False, True], ids=["no-speed-check", "speed-check"])
def test_quantize_builds_each_conv_and_add_once(builds, speed_check, monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTA_SPEED_CACHE", str(tmp_path / "decisions.json"))
    monkeypatch.setattr(speed_check_module, "_perf_counter", _integer_fast)
    q = _quantize(speed_check)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        q(x)
        q(x)
    built = _built(q, builds)
    assert "add" in built and sum(n.startswith("conv") or n == "head" for n in built) >= 2, built
    assert set(built.values()) == {1}, built  # (was 3 per conv)
    # and no module that was built and then dropped (a layer the speed check put back) built twice
    assert max(builds.values()) == 1, builds


def _conv(seed: int) -> Int8Conv2d:
    g = torch.Generator().manual_seed(seed)
    m = Int8Conv2d(8, 6, 3, padding=1)
    m.weight.copy_(torch.randint(-127, 128, m.weight.shape, dtype=torch.int8, generator=g))
    m.weight_scale.copy_(torch.rand(6, generator=g) * 0.01 + 1e-3)
    m.bias.copy_(torch.randn(6, generator=g))
    m.input_scale.fill_(0.05)
    m.input_zero_point.fill_(7 + seed)
    return m


def test_every_change_is_served_fresh(builds):
    x = torch.randn(2, 8, 5, 5)
    a, b = _conv(1), _conv(2)
    with torch.no_grad():
        ya, yb = a(x), b(x)
        assert builds[("conv", id(a.weight))] == 1  # (built by the first call, not the constructor)
        a(x)
        # set_output: the settled call carried the float output; the uint8 one is served fresh
        a.set_output("uint8", 0.1, 5, post_op="relu")
        codes = a(x)
        assert codes.dtype == torch.uint8 and torch.equal(codes, _conv(1).set_output("uint8", 0.1, 5, "relu")(x))
        a.set_output("float")
        assert torch.equal(a(x), ya)
        # load_state_dict: b's weights and grids in a, rebuilt from the loaded buffers
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), yb) and a.input_code_qparams() == b.input_code_qparams()
        # new weights in place, then pack(): rebuilt at once (the module was built before)
        before = builds[("conv", id(a.weight))]
        for name, t in _conv(1).state_dict().items():  # (a's own tensors, changed in place)
            getattr(a, name).copy_(t)
        a.pack()
        assert builds[("conv", id(a.weight))] == before + 1
        assert torch.equal(a(x), ya)
        # a device move (here to the same device) rebuilds at once; a copy builds its own form
        a.to("cpu")
        assert builds[("conv", id(a.weight))] == before + 2
        twin = copy.deepcopy(a)
        assert twin.binding.calls == {} and torch.equal(twin(x), ya)
        assert builds[("conv", id(twin.weight))] == 1


def test_a_module_never_built_is_built_by_what_reads_its_runtime_form(builds):
    m = _conv(3)
    m.pack()
    m.pack()
    assert builds[("conv", id(m.weight))] == 0  # pending: construction and pack() alone build nothing
    assert m.input_code_qparams() == (pytest.approx(0.05), 10)  # reading the grid builds it
    assert "zp=10" in repr(m)
    assert builds[("conv", id(m.weight))] == 1
    add = Int8Add()
    add.set_output("uint8", 0.1, 3)
    assert builds[("add", id(add))] == 0
    assert add.operand_code_qparams(0) == (1.0, 0) and builds[("add", id(add))] == 1
