"""A layer the speed check keeps float because its 8-bit codes run the exact but slow paths on a CPU
without VNNI says that 7-bit weights would run it on oneDNN there (and only then)."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import quanta
from quanta.kernels.u8s8_saturation import cpu_vnni_features
from quanta.transforms.speed_check import SEVEN_BIT_HINT, seven_bit_hint

speed_check = importlib.import_module("quanta.transforms.speed_check")
NO_VNNI = not cpu_vnni_features()


def _integer_slow(kind, fn):
    fn()
    return 3.0 if kind == "integer" else 1.0


@pytest.fixture
def slow_integer(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTA_SPEED_CACHE", str(tmp_path / "decisions.json"))
    monkeypatch.setattr(speed_check, "_perf_counter", _integer_slow)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()


def _details(q: nn.Module) -> dict[str, str]:
    return {k.name: k.reason for k in quanta.kept_float(q)}


@pytest.mark.parametrize("weight_bits", [8, 7])
def test_static_convs_kept_float_name_seven_bit_weights_where_they_help(slow_integer, weight_bits):
    data = [torch.randn(2, 3, 12, 12) for _ in range(2)]
    q = quanta.quantize(_cnn(), quanta.preset("static_int8", weight_bits=weight_bits), data, progress=False)
    details = _details(q)
    assert details, "the made-up clock makes every integer layer slower: some must be kept float"
    convs = [d for name, d in details.items() if name.startswith(("0", "2"))]
    assert convs
    for detail in convs:
        assert (SEVEN_BIT_HINT in detail) == (NO_VNNI and weight_bits == 8), detail


def test_dynamic_per_token_linears_get_no_hint(slow_integer):
    """Per-token activations stay off oneDNN (it takes one activation scale): 7-bit weights would not help."""
    q = quanta.quantize(_mlp(), "dynamic_int8", example=torch.randn(8, 64), progress=False)
    details = _details(q)
    assert details and not any(SEVEN_BIT_HINT in d for d in details.values()), details


def test_static_linear_hint_and_the_hint_survives_save_load(slow_integer, tmp_path):
    # (48 rows: more than the AVX2 gemv takes, which is fast and earns no hint, so float_sums runs)
    data = [torch.randn(48, 64) for _ in range(2)]
    q = quanta.quantize(_mlp(), "static_int8", data, progress=False)
    details = _details(q)
    assert details and all((SEVEN_BIT_HINT in d) == NO_VNNI for d in details.values()), details
    quanta.save(q, tmp_path / "m.safetensors")
    loaded = quanta.load(tmp_path / "m.safetensors", model=_mlp)
    assert _details(loaded) and all((SEVEN_BIT_HINT in d) == NO_VNNI for d in _details(loaded).values())


def test_no_hint_for_a_layer_that_ran_a_fast_kernel():
    class Fake(nn.Module):
        weight_code_max = 127

    assert seven_bit_hint(Fake(), "onednn") == ""
    assert seven_bit_hint(Fake(), "reference") == ""  # (neither a conv nor a static linear)
