"""Conformance: every integer class `convert` can lower to (`quanta.integer.lowering_classes`) goes
through prepare → calibrate → convert → save/load → ONNX export + ONNX Runtime parity on a small
model built the way users write it, and agrees with its simulation.

``CASES`` maps each class to (model factory, config, inputs); a class without an entry fails
`test_every_lowering_class_has_a_case`, so a new integer module cannot be added without going
through all of it. Classes that lower from one model under one config share its case (the
convolutions of each preset, the encoder's Linear and attention): it is converted, saved and
exported once, and each class's tests check that class. A class whose ONNX form is a registered refusal (`quanta.io.onnx_forms`) must
be refused with that reason, naming the module.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta import LayerQuantConfig, QuantConfig, QuantDescriptor
from quanta.analysis.metrics import sqnr_db
from quanta.integer import lowering_classes
from quanta.integer.add import Int8Add
from quanta.integer.attention import Int8MultiheadAttention
from quanta.integer.conv import Int8Conv1d, Int8Conv2d, Int8Conv3d
from quanta.integer.dynamic_conv import (
    DynamicInt8Conv1d,
    DynamicInt8Conv2d,
    DynamicInt8Conv3d,
)
from quanta.integer.embedding import Int4Embedding, Int8Embedding
from quanta.integer.linear import Int8Linear
from quanta.integer.padded_conv import (
    PADDED,
    Int8PaddedConv1d,
    Int8PaddedConv2d,
    Int8PaddedConv3d,
)
from quanta.integer.recurrent import (
    DynamicInt8GRU,
    DynamicInt8GRUCell,
    DynamicInt8LSTM,
    DynamicInt8LSTMCell,
    DynamicInt8RNN,
    DynamicInt8RNNCell,
)
from quanta.integer.weight_only import (
    HalfLinear,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
)
from quanta.io.onnx_forms import form_of, inexact_reason, refusal_of
from quanta.nn import Add

ONE_STEP = 1 + 1e-5  # a one-code difference measured in float32 reads up to 1.0000004 steps
#: an input code rounded the other way at a tie moves a float output by its weight code: at most
#: 127 accumulator units (tests/io/test_onnx_export.py's bound for layers without an output grid)
ACCUMULATOR_STEPS = 127


# ----------------------------------------------------------------------------- models
class PadConv(nn.Module):
    """Builds TF-"same"-style conv subclasses: ``F.pad`` asymmetrically, then torch's forward."""

    @staticmethod
    def make(dims: int) -> type[nn.Module]:
        base = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]

        class SamePadConv(base):  # type: ignore[valid-type, misc]
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(F.pad(x, [0, 1] * dims))

        SamePadConv.__name__ = f"SamePadConv{dims}d"
        return SamePadConv


def _convs(dims: int, padded: bool = False) -> nn.Module:
    conv = PadConv.make(dims) if padded else (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    last = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    first = conv(3, 8, 3, stride=2) if padded else conv(3, 8, 3, padding=1)
    return nn.Sequential(first, nn.ReLU(), last(8, 4, 3, padding=1))


class Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        cls = getattr(nn, kind)
        self.rnn = cls(8, 16) if kind.endswith("Cell") else cls(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.stem(x))
        return self.add(self.conv(h), h)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x))


class Branches(nn.Module):
    """Independent small models side by side, one input each, a tuple of their outputs."""

    def __init__(self, *parts: tuple[nn.Module, int]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(m for m, _ in parts)
        self.feeds = [i for _, i in parts]  # which input each part takes

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(xs[i]) for m, i in zip(self.parts, self.feeds))


def _static_convs() -> nn.Module:
    """Int8Conv1d/2d/3d, Int8PaddedConv1d/2d/3d (TF-"same" subclasses) and an Int8Add residual."""
    return Branches(*((_convs(d), d - 1) for d in (1, 2, 3)), *((_convs(d, padded=True), d - 1) for d in (1, 2, 3)),
                    (Residual(), 1))


def _conv_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) for shape in ((2, 3, 16), (2, 3, 8, 8), (2, 3, 4, 4, 4)))


def _rand(*shape: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    return lambda seed: (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)),)


def _tokens(vocab: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    return lambda seed: (torch.randint(0, vocab, (4, 6), generator=torch.Generator().manual_seed(seed)),)


def _embedding_config(desc: QuantDescriptor | None) -> Callable[[], QuantConfig]:
    return lambda: QuantConfig(default=LayerQuantConfig(weight=desc) if desc else LayerQuantConfig())


@dataclass(frozen=True)
class Case:
    model: Callable[[], nn.Module]
    config: Callable[[], QuantConfig]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]


def _preset(name: str, **options: object) -> Callable[[], QuantConfig]:
    return lambda: quanta.preset(name, **options)


def _recurrent(kind: str) -> Case:
    return Case(lambda: Recurrent(kind), _preset("dynamic_int8"), _rand(4, 8) if kind.endswith("Cell") else
                _rand(2, 5, 8))


STATIC_CONVS = Case(_static_convs, _preset("static_int8"), _conv_inputs)
DYNAMIC_CONVS = Case(lambda: Branches(*((_convs(d), d - 1) for d in (1, 2, 3))), _preset("dynamic_int8"),
                     _conv_inputs)
ENCODER = Case(Encoder, _preset("static_int8"), _rand(2, 6, 16))

CASES: dict[type, Case] = {
    Int8Linear: ENCODER,
    Int8MultiheadAttention: ENCODER,
    Int4WeightOnlyLinear: Case(lambda: nn.Sequential(nn.Linear(64, 32)), _preset("weight_only_int4", group_size=32),
                               _rand(4, 64)),
    Int8WeightOnlyLinear: Case(lambda: nn.Sequential(nn.Linear(64, 32)), _preset("weight_only_int8"), _rand(4, 64)),
    HalfLinear: Case(lambda: nn.Sequential(nn.Linear(16, 8)), _preset("fp16"), _rand(4, 16)),
    **dict.fromkeys((Int8Conv1d, Int8Conv2d, Int8Conv3d, Int8PaddedConv1d, Int8PaddedConv2d, Int8PaddedConv3d,
                     Int8Add), STATIC_CONVS),
    **dict.fromkeys((DynamicInt8Conv1d, DynamicInt8Conv2d, DynamicInt8Conv3d), DYNAMIC_CONVS),
    **{cls: _recurrent(cls.__name__.removeprefix("DynamicInt8"))
       for cls in (DynamicInt8LSTM, DynamicInt8GRU, DynamicInt8RNN, DynamicInt8LSTMCell, DynamicInt8GRUCell,
                   DynamicInt8RNNCell)},
    Int8Embedding: Case(lambda: nn.Sequential(nn.Embedding(20, 16)), _embedding_config(None), _tokens(20)),
    Int4Embedding: Case(lambda: nn.Sequential(nn.Embedding(20, 64)),
                        _embedding_config(QuantDescriptor(num_bits=4, group_size=32)), _tokens(20)),
}


def _build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.model().eval()


# ----------------------------------------------------------------------------- the pipeline
def test_every_lowering_class_has_a_case():
    missing = [c.__name__ for c in lowering_classes() if c not in CASES]
    assert not missing, f"integer classes without a conformance case (add one to CASES): {missing}"
    assert set(CASES) == set(lowering_classes())
    no_form = [c.__name__ for c in lowering_classes() if form_of(c) is None]
    assert not no_form, f"integer classes without an ONNX form or refusal (quanta.io.onnx_forms): {no_form}"


@pytest.fixture(scope="module")
def shared() -> dict[tuple[str, int], object]:
    """What cases shared by several classes compute once: (stage, id(case)) -> result."""
    return {}


@pytest.fixture(scope="module", params=lowering_classes(), ids=lambda c: c.__name__)
def lowered(request, shared):
    cls = request.param
    case = CASES[cls]
    key = ("lowered", id(case))
    if key not in shared:
        with warnings.catch_warnings():  # dynamic / weight-only models: "nothing needs calibration data"
            warnings.filterwarnings("ignore", message=".*nothing needs calibration data")
            sim = quanta.calibrate(quanta.prepare(_build(case), case.config()), [case.inputs(s) for s in range(3)],
                                   forward_fn=lambda m, batch: m(*batch), progress=False)
        shared[key] = (sim, quanta.convert(sim, speed_check=False))
    sim, q = shared[key]
    return cls, case, sim, q


def _outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return list(out) if isinstance(out, tuple) else [out]


def test_converts_to_the_class(lowered):
    cls, _, _, q = lowered
    found = [type(m).__name__ for m in q.modules() if type(m) is cls]
    assert found, f"no {cls.__name__} in {[type(m).__name__ for m in q.modules()]}"


def test_save_load_bit_identical(lowered, tmp_path):
    cls, case, _, q = lowered
    quanta.save(q, tmp_path / "m.quanta")
    back = quanta.load(tmp_path / "m.quanta", model=_build(case))
    assert any(type(m) is cls for m in back.modules())
    x = case.inputs(7)
    for a, b in zip(_outputs(back, x), _outputs(q, x), strict=True):
        assert torch.equal(a, b)


def test_integer_agrees_with_simulation(lowered):
    _, case, sim, q = lowered
    x = case.inputs(7)
    for ref, out in zip(_outputs(sim, x), _outputs(q, x), strict=True):
        assert out.shape == ref.shape
        assert sqnr_db(ref.float(), out.float()) > 40.0, sqnr_db(ref.float(), out.float())


def _exported(case: Case, q: nn.Module, folder: Path, shared: dict) -> tuple[object, object]:
    key = ("exported", id(case))
    if key not in shared:
        path, x = folder / f"case{len(shared)}.onnx", case.inputs(7)
        shared[key] = (quanta.export_onnx(q, x, path), quanta.compare_onnx(q, path, x, layers=False))
    return shared[key]


def test_onnx_export_and_runtime_parity(lowered, shared, tmp_path, tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    cls, case, _, q = lowered
    reason = refusal_of(cls)
    if reason is not None:
        with pytest.raises(ValueError, match=r"cannot export '.+' to ONNX: " + re.escape(f"{cls.__name__} {reason}")):
            quanta.export_onnx(q, case.inputs(7), tmp_path / "m.onnx")
        assert not os.path.exists(tmp_path / "m.onnx")
        return
    exported, report = _exported(case, q, tmp_path_factory.mktemp("onnx"), shared)
    assert any(c == cls.__name__ for _, c, _ in exported.layers), exported  # exported by its own form
    if cls in PADDED.values():  # the asymmetric padding: a Pad of the float input before its QuantizeLinear
        assert exported.op_counts.get("Pad", 0) >= 1, exported
    inexact = {inexact_reason(m) for m in q.modules()} - {""}
    for row in report.outputs:
        if inexact:  # a form registered as not bit-exact (torch's int4 bf16 kernel): relative bound
            assert row.max_rel_diff < 0.05, (inexact, row)
        elif row.max_steps is None:  # no grid, no integer matmul at the output: float32 rounding only
            assert row.max_rel_diff <= 1e-5, row
        else:
            bound = ACCUMULATOR_STEPS if "accumulator" in row.step else ONE_STEP
            assert row.max_steps <= bound and row.max_rel_diff <= 0.01, row
