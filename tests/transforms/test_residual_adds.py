"""Residual additions written the way users write them (``out += identity``, ``x + self.conv(x)``,
``torch.add(a, b)``) run as quanta's integer addition, as if the model had used ``quanta.nn.Add``."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import quanta
from quanta.integer.add import Int8Add
from quanta.nn import Add, QuantAdd
from quanta.transforms.fuse import uint8_chains
from quanta.transforms.residual_adds import MARK, redo_residual_adds, rewrite_residual_adds


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, line for line (``explicit``: the add through ``quanta.nn.Add``)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, explicit: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        self.explicit = Add() if explicit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        if self.explicit is not None:
            out = self.explicit(out, identity)
        else:
            out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (expansion 4)."""

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, width * 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(*_conv_bn(cin, width * 4, 1, stride))
                           if stride != 1 or cin != width * 4 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class MBConv(nn.Module):
    """An inverted residual as TF ports write it: ``x + self.conv(x)``."""

    def __init__(self, c: int, torch_add: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn(c, 2 * c, 1), nn.ReLU6(), *_conv_bn(2 * c, 2 * c, 3, groups=2 * c),
                                  nn.ReLU6(), *_conv_bn(2 * c, c, 1))
        self.torch_add = torch_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(x, self.conv(x)) if self.torch_add else x + self.conv(x)


class ShapeBranch(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so its addition stays float."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            return x + self.conv(x)
        return self.conv(x)


class PlusConstant(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + 0.5


class OptionalSkip(nn.Module):
    """``skip is not None`` would be traced as always true: left alone."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x)
        return y + skip if skip is not None else y


class Nested(nn.Module):
    """A block holding blocks, with its own addition around them."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(MBConv(c), MBConv(c, torch_add=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + x


class Net(nn.Module):
    def __init__(self, explicit: bool = False, odd: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 8, 3), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(8, 8, explicit=explicit), BasicBlock(8, 16, 2, explicit=explicit))
        self.layer2 = Bottleneck(16, 4)
        self.shared = MBConv(16)
        self.nested = Nested(16)
        # (fx cannot trace ShapeBranch: then the whole-model passes cannot either, and no uint8
        # codes flow anywhere; `odd` models test what stays float)
        self.branch, self.constant = (ShapeBranch(16), PlusConstant(16)) if odd else (nn.Identity(), nn.Identity())
        self.optional = OptionalSkip(16) if odd else nn.Identity()
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        x = self.nested(self.shared(self.shared(x)))  # one block, called twice
        x = self.optional(self.constant(self.branch(x)))
        return self.head(x.mean((2, 3)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
    return model.eval()


TRUSTED = [Net, BasicBlock, Bottleneck, MBConv, Nested, ShapeBranch, PlusConstant, OptionalSkip]
CONFIG = quanta.preset("static_int8", weight_bits=7)
REWRITTEN = ["layer1.0.residual_add", "layer1.1.residual_add", "layer2.residual_add", "shared.residual_add",
             "nested.residual_add", "nested.inner.0.residual_add", "nested.inner.1.residual_add"]


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    model = _randomize_bn(Net())
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(2, 3, 10, 10, generator=g) for _ in range(3)]
    sim = quanta.calibrate(quanta.prepare(model, CONFIG), data, progress=False)
    q = quanta.convert(sim, speed_check=False)
    return model, sim, q, data, torch.randn(2, 3, 10, 10, generator=g)


def test_the_users_model_is_untouched_and_blocks_keep_their_class(built):
    model, sim, _, _, _ = built
    assert not any(MARK in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    assert not any(isinstance(m, Add) for m in model.modules())
    assert type(sim.layer1[0]) is BasicBlock and type(sim.layer2) is Bottleneck and type(sim.shared) is MBConv
    adds = sorted(n for n, m in sim.named_modules() if isinstance(m, QuantAdd))
    assert adds == sorted(REWRITTEN)


def test_prepared_with_quantizers_off_equals_float_exactly(built):
    _, _, _, data, x = built
    torch.manual_seed(0)
    model = _randomize_bn(Net(odd=True))
    sim = quanta.prepare(model, dataclasses.replace(CONFIG, fold_bn=False))  # (folding BN changes rounding)
    assert isinstance(sim.layer2.residual_add, QuantAdd)
    for m in sim.modules():
        if isinstance(m, quanta.TensorQuantizer):
            m.disable()
    with torch.no_grad():
        for batch in (*data, x, x[:1]):  # (a batch of one takes the other branch of ShapeBranch)
            assert torch.equal(sim(batch), model(batch))


def test_the_additions_run_as_int8_add_and_hand_on_uint8_codes(built):
    _, _, q, _, x = built
    with torch.no_grad():
        q(x)
    for name in REWRITTEN:
        add = q.get_submodule(name)
        assert isinstance(add, Int8Add) and sum(add.kernel_counts.values()) >= 1, name
    assert q.shared.residual_add.kernel_counts.total() == 2  # the shared block: called twice
    assert q.layer1[0].residual_add.output_kind == "uint8" and q.layer1[0].residual_add.post_op == "relu"
    chains = uint8_chains(q)
    assert any({"layer1.0.residual_add", "layer1.1.residual_add", "layer2.residual_add"} <= set(c) for c in chains)
    report = {r.name: r.result for r in quanta.conversion_report(q)}
    assert report["layer2.residual_add"] == "Int8Add"


def test_the_integer_model_equals_one_written_with_quanta_add(built):
    """The BasicBlocks with ``quanta.nn.Add`` written by hand, same weights: bit-identical integer outputs."""
    model, sim, q, data, x = built
    explicit = _randomize_bn(Net(explicit=True))
    explicit.load_state_dict(model.state_dict())
    with torch.no_grad():
        feats = [model.stem(d) for d in data]
        ours, theirs = (quanta.convert(quanta.calibrate(quanta.prepare(m.layer1, CONFIG), feats, progress=False),
                                       speed_check=False) for m in (model, explicit))
        h = model.stem(x)
        assert torch.equal(ours(h), theirs(h))
        assert ours[0].residual_add.kernel_counts.total() == theirs[0].explicit.kernel_counts.total() == 1
        y_sim, y = sim(x), q(x)
    sqnr = 10 * torch.log10(y_sim.pow(2).sum() / (y_sim - y).pow(2).sum())
    assert sqnr > 25  # the whole integer model follows its simulation (uint8 hand-offs round once)


def test_what_stays_float_and_why():
    sim = quanta.prepare(_randomize_bn(Net(odd=True)), CONFIG)
    assert isinstance(sim.layer2.residual_add, QuantAdd)
    assert not any(isinstance(m, (Add, QuantAdd)) for m in sim.branch.modules())
    assert not any(isinstance(m, (Add, QuantAdd)) for m in sim.constant.modules())
    rows = {e.name: e for e in quanta.coverage(sim).entries}
    assert rows["branch"].status == "float" and "torch.fx cannot trace" in rows["branch"].detail
    assert not any(isinstance(m, (Add, QuantAdd)) for m in sim.optional.modules())
    assert "optional argument 'skip'" in rows["optional"].detail
    assert "branch" in str(quanta.coverage(sim))


def test_dynamic_presets_and_an_add_type_mapped_to_none_leave_the_forward_alone(built):
    model = built[0]
    no_add = dataclasses.replace(CONFIG, module_types={**CONFIG.module_types, "Add": None})
    for config in (quanta.preset("dynamic_int8"), no_add):
        sim = quanta.prepare(model, config)
        assert not any(isinstance(m, (Add, QuantAdd)) for m in sim.modules())
        assert not any(MARK in m.__dict__ for m in sim.modules())
    sim = quanta.prepare(model, CONFIG.extended(exclude=["layer2"]))
    assert not hasattr(sim.layer2, "residual_add") and isinstance(sim.layer1[0].residual_add, QuantAdd)


def test_save_load_round_trip_rebuilds_the_rewrite(built, tmp_path):
    model, sim, q, _, x = built
    for m, name in ((q, "int"), (sim, "sim")):
        path = tmp_path / f"{name}.quanta"
        quanta.save(m, path)
        for loaded in (quanta.load(path, model=copy.deepcopy(model)),
                       quanta.load(path, trusted=TRUSTED)):
            assert type(loaded.layer2) is Bottleneck
            with torch.no_grad():
                assert torch.equal(loaded(x), m(x))


def test_a_file_whose_forward_changed_is_refused(built, tmp_path, monkeypatch):
    model, _, q, _, _ = built
    quanta.save(q, tmp_path / "q.quanta")

    def edited(self, x):  # the class's code changed since the file was saved
        return self.relu(self.bn3(self.conv3(self.conv2(self.conv1(x)))) + x)

    monkeypatch.setattr(Bottleneck, "forward", edited)
    with pytest.raises(quanta.io.ArchitectureError, match="'layer2' .*not the one the file") as err:
        quanta.load(tmp_path / "q.quanta", model=copy.deepcopy(model))
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    record = getattr(q.layer2, MARK)
    with pytest.raises(ValueError, match="not the one the file"):
        redo_residual_adds(MBConv(16), {**record}, "layer2")
    with pytest.raises(ValueError, match="malformed"):
        redo_residual_adds(Bottleneck(16, 4), {"fingerprint": 3}, "layer2")


def test_deepcopy_keeps_the_rewritten_forward(built):
    _, _, q, _, x = built
    twin = copy.deepcopy(q)
    assert twin.layer2.forward.module is twin.layer2
    with torch.no_grad():
        assert torch.equal(twin(x), q(x))


def test_onnx_export_matches(built, tmp_path):
    pytest.importorskip("onnxruntime")
    _, _, q, _, x = built
    path = quanta.export_onnx(q, x, tmp_path / "r.onnx")
    report = quanta.compare_onnx(q, path, x)
    assert report.within(steps=1, identical=0.0), report  # (the float head: float rounding apart)
    adds = [r for r in report.layers if "residual_add" in r.name]
    assert len(adds) >= 5 and all(r.frac_identical == 1.0 for r in adds), report


class TrainingBranch(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.training else y


def test_a_forward_that_depends_on_the_mode_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), TrainingBranch(4)).eval()
    reasons = rewrite_residual_adds(model)
    assert "self.training" in reasons["1"] and "forward" not in model[1].__dict__
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), MBConv(4)).eval()
    assert rewrite_residual_adds(plain) == {} and isinstance(plain[1].residual_add, Add)


def test_pickle_and_torch_save_keep_the_rewritten_forward(built):
    import io
    import pickle

    _, _, q, _, x = built
    buffer = io.BytesIO()
    torch.save(q, buffer)
    buffer.seek(0)
    for twin in (pickle.loads(pickle.dumps(q)), torch.load(buffer, weights_only=False)):
        with torch.no_grad():
            assert torch.equal(twin(x), q(x))
        assert twin.layer2.residual_add.kernel_counts.total() >= 1


class StoresOnSelf(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.conv(x)  # (tracing would leave an fx proxy here)
        return x + self.last


def test_tracing_leaves_no_trace_on_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), StoresOnSelf(4)).eval()
    rewrite_residual_adds(model)
    assert "last" not in model[1].__dict__
    with torch.no_grad():
        x = torch.randn(1, 3, 4, 4)
        assert torch.equal(model(x), model[1].conv(model[0](x)) + model[0](x))
