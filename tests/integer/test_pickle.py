"""Copies of integer models (deepcopy, pickle, torch.save / torch.load) compute what the original does.

Each model has been called before it is copied, so its integer modules hold settled calls and
packed runtime weights, which copies must drop and rebuild (`IntegerModule._RUNTIME`).
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

import quanta
from quanta.demo import SequenceLSTM
from quanta.integer.base import IntegerModule
from quanta.nn import Add, LayerQuantConfig, QuantDescriptor


class _ResidualPoolCNN(nn.Module):
    """conv → ReLU → max-pool → conv (+ residual Add) → ReLU → linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.relu = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv, self.add, self.relu2 = nn.Conv2d(16, 16, 3, padding=1), Add(), nn.ReLU()
        self.head = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu(self.stem(x)))
        return self.head(torch.flatten(self.relu2(self.add(self.conv(h), h)), 1))


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 32)
        self.gru = nn.GRU(32, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embed(t))[0][:, -1])


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()


def _cases() -> dict[str, tuple[Callable[[], nn.Module], object, Callable[[torch.Generator], torch.Tensor], bool]]:
    images = lambda g: torch.randn(2, 3, 8, 8, generator=g)
    rows = lambda g: torch.randn(3, 64, generator=g)
    tokens = lambda g: torch.randint(0, 20, (2, 7), generator=g)
    table = quanta.QuantConfig(default=LayerQuantConfig(input=QuantDescriptor(dynamic=True), weight=None),
                               module_types={"Embedding": LayerQuantConfig(input=None, weight=QuantDescriptor(
                                   per_channel=True, narrow_range=True)),
                                   "GRU": quanta.preset("dynamic_int8").module_types["GRU"],
                                   "Linear": quanta.preset("dynamic_int8").default})
    return {
        "conv-add-pool-linear static": (_ResidualPoolCNN, "static_int8", images, True),
        "linear dynamic": (_mlp, "dynamic_int8", rows, False),
        "conv dynamic": (_ResidualPoolCNN, "dynamic_int8", images, False),
        "weight-only int8": (_mlp, "weight_only_int8", rows, False),
        "weight-only int4": (_mlp, quanta.preset("weight_only_int4", group_size=32), rows, False),
        "fp16 weights": (_mlp, "fp16", rows, False),
        "lstm": (lambda: SequenceLSTM(hidden=16), "dynamic_int8",
                 lambda g: torch.randn(2, 5, 1, generator=g), False),
        "embedding + gru": (_Tokens, table, tokens, False),
    }


def _copies() -> dict[str, Callable[[nn.Module], nn.Module]]:
    def via_torch_save(m: nn.Module) -> nn.Module:
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch.save": via_torch_save}


@pytest.mark.parametrize("copier", list(_copies()))
@pytest.mark.parametrize("case", list(_cases()))
def test_copies_of_integer_models_compute_the_same(case, copier):
    build, config, inputs, static = _cases()[case]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = build().eval()
    calib = [inputs(g) for _ in range(2)] if static else None
    q = quanta.quantize(model, config, calib, speed_check=False, progress=False)
    integer = [type(m).__name__ for m in q.modules() if isinstance(m, IntegerModule)]
    assert integer, f"{case}: nothing was lowered"
    x = inputs(g)
    with torch.no_grad():
        expected = q(x)
        q(x)  # settled calls exist now
        twin = _copies()[copier](q)
        assert [type(m).__name__ for m in twin.modules() if isinstance(m, IntegerModule)] == integer
        assert torch.equal(twin(x), expected)
        assert torch.equal(twin(x), expected)  # the copy's own settled calls
        assert torch.equal(q(x), expected)  # the original is untouched by the copy
    assert quanta.conversion_report(twin) == quanta.conversion_report(q)
