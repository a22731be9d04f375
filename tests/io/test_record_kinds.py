"""File records by registration (`quanta.io.record_kinds`): the walkers in `quanta.io.records`
hold no per-kind branch, a registered kind round-trips through save / load, and what a transform
may put in a float module's place is declared once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import quanta
from quanta.integer import lowering_classes
from quanta.io import record_kinds
from quanta.io.architecture import ArchitectureError, class_path
from quanta.io.record_kinds import RecordKind, kind_for, register_record_kind
from quanta.io.records import describe, validate_records

RECORDS_PY = Path(record_kinds.__file__).with_name("records.py")


class _Gain(nn.Module):
    """A module whose constructor argument is not an attribute (the "module" kind cannot rebuild it)."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.register_buffer("g", torch.tensor(float(gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.g


def _gain_kind() -> RecordKind:
    def check(rec, where):
        if not isinstance(rec.get("gain"), float):
            raise ValueError(f"module {where!r}: 'gain' must be a number")

    def rebuild(rec, current, ctx):
        ctx.place(rec["path"], _Gain(rec["gain"]))

    return RecordKind("gain", lambda m: isinstance(m, _Gain), lambda m, path, ctx: {"kind": "gain", "gain": float(m.g)},
                      check, rebuild)


@pytest.fixture
def gain_kind():
    kind = register_record_kind(_gain_kind())
    try:
        yield kind
    finally:
        del record_kinds.RECORD_KINDS["gain"]


def test_the_walkers_hold_no_kind_branch():
    tree = ast.parse(RECORDS_PY.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not names & {"IntegerModule", "QuantModule", "TensorQuantizer", "QuantAdd", "Add", "CODES_POOL"}
    assert not any(isinstance(n, ast.Constant) and n.value in ("quant", "quantizer", "module") for n in ast.walk(tree))


def test_kinds_in_the_order_tried_with_the_catch_all_last():
    assert list(record_kinds.RECORD_KINDS) == ["integer", "quant", "quantizer", "rewritten", "module"]
    with pytest.raises(ValueError, match="'quant' is registered already"):
        register_record_kind(record_kinds.RECORD_KINDS["quant"])


def test_every_integer_class_is_described_as_integer_without_an_edit_in_io():
    assert set(record_kinds.integer_classes().values()) == set(lowering_classes())
    for cls in lowering_classes():
        assert record_kinds.RECORD_KINDS["integer"].matches(cls.__new__(cls)), cls.__name__


def test_a_registered_kind_round_trips(tmp_path, gain_kind):
    model = nn.Sequential(nn.Linear(3, 3), _Gain(2.5))
    assert kind_for(model[1]) is gain_kind and kind_for(model[0]).name == "module"
    records, _ = describe(model)
    assert records[2] == {"path": "1", "training": True, "kind": "gain", "gain": 2.5}
    quanta.save(model, tmp_path / "m.safetensors")
    skeleton = nn.Sequential(nn.Linear(3, 3), _Gain(1.0))
    loaded = quanta.load(tmp_path / "m.safetensors", model=skeleton)
    assert float(loaded[1].g) == 2.5 and float(skeleton[1].g) == 1.0
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x), model(x))
    bad = [dict(r) for r in records]
    bad[2]["gain"] = "loud"
    with pytest.raises(ValueError, match="module '1': 'gain' must be a number"):
        validate_records(bad)


def test_an_unregistered_kind_in_a_file_is_refused_by_name(gain_kind):
    records, _ = describe(nn.Sequential(_Gain(1.0)))
    del record_kinds.RECORD_KINDS["gain"]
    try:
        with pytest.raises(ValueError, match="unknown kind 'gain'.*newer quanta"):
            validate_records(records)
    finally:
        record_kinds.RECORD_KINDS["gain"] = gain_kind


def test_transform_results_replace_only_what_they_were_declared_for():
    from quanta.integer.pooling import CodesMaxPool2d
    from quanta.nn.modules.functional import Add, QuantAdd

    replaceable = record_kinds._replaceable
    assert replaceable(Add(), class_path(QuantAdd)) and not replaceable(nn.ReLU(), class_path(QuantAdd))
    assert replaceable(nn.MaxPool2d(2), class_path(CodesMaxPool2d))
    assert not replaceable(nn.AvgPool2d(2), class_path(CodesMaxPool2d))
    assert replaceable(nn.BatchNorm2d(3), class_path(nn.Identity))  # folded
    assert not replaceable(nn.Linear(2, 2), class_path(nn.ReLU))
    with pytest.raises(ArchitectureError, match="is a Linear in the model, but the file holds a ReLU"):
        rec = {"path": "0", "kind": "module", "cls": class_path(nn.ReLU), "kwargs": {}}
        ctx = record_kinds.Rebuilding(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)), None, None)
        record_kinds.RECORD_KINDS["module"].rebuild(rec, ctx.get("0"), ctx)
