"""The opt-in torch.nn patch: quantized layers only inside it, originals always restored."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import quanta
from quanta import quant_modules
from quanta.nn import QuantConv2d, QuantLinear, QuantLSTM, QuantModule, QuantMultiheadAttention

PATCHED = [name for _, name, _ in quant_modules._DEFAULT_MODULES]
ORIGINALS = {name: getattr(nn, name) for name in PATCHED}


def _assert_torch_nn_restored() -> None:
    for name, cls in ORIGINALS.items():
        assert getattr(nn, name) is cls, name
        assert getattr(torch.nn, name) is cls, name
    assert not quant_modules.is_initialized()


@pytest.fixture(autouse=True)
def always_restore():
    """Whatever a test does, torch.nn is left as it was (other tests depend on it)."""
    _assert_torch_nn_restored()
    yield
    quant_modules.deactivate()
    _assert_torch_nn_restored()


def _build():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_models_built_inside_are_quantized_and_after_are_float():
    assert set(PATCHED) >= {"Linear", "Conv2d", "LSTM", "MultiheadAttention", "Embedding"}
    with quant_modules.enabled():
        inside = _build()
        lstm, mha = nn.LSTM(3, 4), nn.MultiheadAttention(8, 2)
    after = _build()
    assert type(inside[0]) is QuantConv2d and type(inside[3]) is QuantLinear
    assert type(lstm) is QuantLSTM and type(mha) is QuantMultiheadAttention
    assert type(inside[1]) is nn.ReLU  # no quantized version: untouched
    assert type(after[0]) is nn.Conv2d and type(after[3]) is nn.Linear
    assert not any(isinstance(m, QuantModule) for m in after.modules())


def test_model_built_inside_calibrates_and_simulates():
    torch.manual_seed(0)
    with quant_modules.enabled():
        model = _build()
    x = torch.rand(8, 1, 8, 8)
    quanta.calibrate(model, [x], progress=False)
    out = model(x)
    for m in model.modules():
        if isinstance(m, quanta.TensorQuantizer):
            m.disable()
    reference = model(x)
    assert not torch.equal(out, reference)
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0)


def test_float_module_list_is_honoured():
    with quant_modules.enabled(float_module_list=["Linear"]):
        model = _build()
        assert nn.Linear is ORIGINALS["Linear"] and nn.Conv2d is QuantConv2d
    assert type(model[3]) is nn.Linear and type(model[0]) is QuantConv2d


def test_float_module_list_rejects_unknown_names():
    with pytest.raises(ValueError, match="Linnear"):
        quant_modules.initialize(float_module_list=["Linnear"])
    _assert_torch_nn_restored()


class Block(nn.Module):
    def forward(self, x):
        return x


class QuantBlock(Block):
    pass


def test_custom_quant_modules_triples_are_patched_and_restored():
    namespace = types.SimpleNamespace(Block=Block)
    with quant_modules.enabled(custom_quant_modules=[(namespace, "Block", QuantBlock),
                                                     (nn, "Linear", QuantBlock)]):
        assert namespace.Block is QuantBlock
        assert nn.Linear is QuantBlock  # a custom triple overrides the default entry
        assert nn.Conv2d is QuantConv2d
    assert namespace.Block is Block


@pytest.mark.parametrize("entry,error,message", [
    (("not", "a", "triple", "!"), TypeError, "triples"),
    ((nn, "NoSuchLayer", QuantBlock), ValueError, "no attribute 'NoSuchLayer'"),
], ids=["not-a-triple", "missing-attribute"])
def test_custom_quant_modules_are_validated(entry, error, message):
    with pytest.raises(error, match=message):
        quant_modules.initialize(custom_quant_modules=[entry])
    _assert_torch_nn_restored()


def test_repeated_initialize_and_deactivate_restore_the_identical_classes():
    for _ in range(3):
        quant_modules.initialize()
        assert quant_modules.is_initialized()
        assert all(getattr(nn, name) is not ORIGINALS[name] for name in PATCHED)
        quant_modules.deactivate()
        _assert_torch_nn_restored()
    quant_modules.deactivate()  # a no-op when nothing is patched
    _assert_torch_nn_restored()


def test_an_exception_inside_enabled_still_restores():
    with pytest.raises(KeyError, match="boom"):
        with quant_modules.enabled():
            assert nn.Linear is QuantLinear
            raise KeyError("boom")
    _assert_torch_nn_restored()


def test_double_initialize_raises_and_keeps_the_first_patch_undoable():
    quant_modules.initialize()
    with pytest.raises(RuntimeError, match="already initialized"):
        quant_modules.initialize()
    with pytest.raises(RuntimeError, match="already initialized"):
        with quant_modules.enabled():
            pass
    assert nn.Linear is QuantLinear
    quant_modules.deactivate()
    _assert_torch_nn_restored()


def test_prepare_outside_the_patch_is_unaffected_by_it():
    with quant_modules.enabled():
        pass
    assert type(quanta.prepare(nn.Sequential(nn.Linear(2, 2)))[0]) is QuantLinear
