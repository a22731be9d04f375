"""dynamic_int8 quantizes convolutions (activation range per call, int8 conv kernels); a preset
that covers nothing in a model says what it covers and what to use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.integer.dynamic_conv import DynamicInt8Conv1d, DynamicInt8Conv2d


class TextDetector(nn.Module):
    """A conv-only detection CNN (conv-BN-ReLU, depthwise, 1×1 head, sigmoid score map)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
            nn.Conv2d(16, 32, 1, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding="valid"), nn.ReLU())
        self.score = nn.Conv2d(32, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.score(self.body(x)))


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = TextDetector().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, folded by the preset
        model.body[1].running_mean.uniform_(-0.2, 0.2)
        model.body[1].running_var.uniform_(0.5, 2.0)
    return model


def test_dynamic_int8_quantizes_a_conv_only_model_without_data(detector):
    q = quanta.quantize(detector, "dynamic_int8", speed_check=False, progress=False)
    convs = [m for m in q.modules() if isinstance(m, DynamicInt8Conv2d)]
    assert len(convs) == 5 and not any(type(m) is nn.Conv2d for m in q.modules())
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        ref, out = detector(x), q(x)
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.999
    assert all(sum(m.kernel_counts.values()) == 1 for m in convs)
    assert quanta.storage_bytes(q) < 0.4 * quanta.storage_bytes(detector)  # int8 weights


def test_dynamic_conv_equals_its_simulation_at_every_input_scale(detector):
    sim = quanta.prepare(detector, quanta.preset("dynamic_int8"))
    q = quanta.convert(sim)
    for gain in (0.01, 1.0, 50.0):  # the range follows each call: no calibrated clipping
        x = torch.randn(2, 3, 16, 16) * gain
        with torch.no_grad():
            torch.testing.assert_close(q(x), sim(x), atol=1e-5, rtol=0)


def test_dynamic_conv1d_and_copies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 2, 1)).eval()
    sim = quanta.prepare(model, quanta.preset("dynamic_int8"))
    q = quanta.convert(sim)
    assert isinstance(q[0], DynamicInt8Conv1d)
    x = torch.randn(3, 4, 20)
    with torch.no_grad():
        torch.testing.assert_close(q(x), sim(x), atol=1e-5, rtol=0)


def test_dynamic_conv_saves_and_loads_exactly(detector, tmp_path):
    q = quanta.quantize(detector, "dynamic_int8", speed_check=False, progress=False)
    quanta.save(q, tmp_path / "det.safetensors")
    loaded = quanta.load(tmp_path / "det.safetensors", TextDetector().eval())
    x = torch.rand(1, 3, 20, 20)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


@pytest.mark.parametrize("preset", ["weight_only_int8", "weight_only_int4", "w4a8", "fp16"])
def test_a_preset_covering_nothing_says_what_it_covers_and_what_to_use(detector, preset):
    with pytest.raises(ValueError, match=rf"preset '{preset}' quantizes Linear layers.*TextDetector has none"
                                         r".*Conv2d×5.*use 'dynamic_int8' or 'static_int8'"):
        quanta.quantize(detector, preset)


def test_a_config_covering_nothing_says_so(detector):
    with pytest.raises(ValueError, match=r"the configuration quantizes no module of TextDetector"):
        quanta.quantize(detector, "dynamic_int8", exclude=["*"])
