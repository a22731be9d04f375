"""The speed check judges a uint8 chain (integer convs and additions handing each other codes) as a
whole: each member timed in its chain context against its float twin, the chain float when the sum
of its integer times is clearly slower, integer (codes between its members) otherwise (issue 25)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import json

import pytest
import torch
from test_simplify import (  # MobileNetV2-like: Conv-BN-ReLU6 blocks, a residual quanta.nn.Add
    calibrated_tiny,
)
from torch import nn

import quanta
from quanta.integer import lowering_classes
from quanta.integer.add import Int8Add
from quanta.integer.base import IntegerModule
from quanta.io.save_load import _without_timings
from quanta.nn.modules.fused import FusedActivation
from quanta.transforms.capture import hooked
from quanta.transforms.convert import _walk
from quanta.transforms.fuse import fuse_activations, uint8_chains
from quanta.transforms.speed_cache import DecisionCache
from quanta.transforms.speed_check import keep_faster, kept_float

speed_check = importlib.import_module("quanta.transforms.speed_check")


CHAIN = ["features.0.0", "features.1.conv.0.0", "features.1.conv.1.0", "features.1.conv.2", "features.1.add",
         "features.2.conv.0.0", "features.2.conv.1.0", "features.2.conv.2", "features.2.add"]


@pytest.fixture(scope="module")
def tiny():
    return calibrated_tiny(size=12, batches=3)


def _fused(sim: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    target, twins = copy.deepcopy(sim), {}
    _walk(target, "", lowering_classes(), [], twins)
    for m in target.modules():
        if isinstance(m, IntegerModule):
            m.pack()
    fuse_activations(target)
    return target, twins


def _fake(integer_s: float, float_s: float, add_integer_s: float | None = None):
    """Integer calls take ``integer_s`` (``add_integer_s`` for an `Int8Add`), float calls ``float_s``."""
    def measure(kind, fn):
        fn()
        owner = fn.func if isinstance(fn, functools.partial) else None
        if kind == "integer" and add_integer_s is not None and isinstance(owner, Int8Add):
            return add_integer_s
        return integer_s if kind == "integer" else float_s
    return measure


def _uint8_inputs(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the modules called with uint8 codes."""
    seen: set[str] = set()

    def record(name, _mod, args, _kwargs, _out):
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.uint8 for a in args):
            seen.add(name)

    integer = {n: m for n, m in model.named_modules() if isinstance(m, IntegerModule)}
    with hooked(integer, record, before=True), torch.no_grad():
        model(x)
    return seen


def test_the_chain_is_found_across_residual_additions(tiny):
    _, sim, _ = tiny
    model, _ = _fused(sim)
    assert uint8_chains(model) == [CHAIN]  # one chain: the stem, both blocks, both additions
    assert {"features.1.conv.0.0", "features.1.add", "features.2.add"} <= _uint8_inputs(model, tiny[2][0])


def test_a_slower_chain_goes_float_as_a_whole_with_the_float_models_numbers(tiny):
    float_model, sim, calib = tiny
    model, twins = _fused(sim)
    choices = keep_faster(model, twins, calib[0], measure=_fake(2e-3, 1e-3), repeats=2)
    by_name = {c.name: c for c in choices}
    assert set(CHAIN) <= set(by_name) and all(by_name[n].picked == "float" for n in CHAIN)
    assert all(by_name[n].chain_layers == len(CHAIN) for n in CHAIN)
    assert by_name[CHAIN[0]].chain_integer_ms == pytest.approx(2.0 * len(CHAIN))
    assert not any(isinstance(m, (IntegerModule, FusedActivation)) for m in model.features.modules())
    assert type(model.features[1].add) is quanta.nn.Add and type(model.features[0][0]) is nn.Conv2d
    assert type(model.features[0][2]) is nn.ReLU6  # the user's activation module is back
    x = torch.randn(3, 4, 12, 12)
    with torch.no_grad():  # the twins hold the BN-folded float weights: the float model's numbers
        torch.testing.assert_close(model(x), float_model(x), atol=1e-5, rtol=1e-5)


def test_a_faster_chain_stays_integer_with_codes_between_its_members(tiny):
    _, sim, calib = tiny
    model, twins = _fused(sim)
    x = calib[1]
    with torch.no_grad():
        before = model(x)
    choices = keep_faster(model, twins, calib[0], measure=_fake(1e-3, 2e-3), repeats=2)
    assert all(c.picked == "integer" for c in choices) and {c.name for c in choices} >= set(CHAIN)
    assert all(isinstance(model.get_submodule(n), IntegerModule) for n in CHAIN)
    assert set(CHAIN[1:]) <= _uint8_inputs(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_the_chain_is_decided_by_its_sums_not_member_by_member(tiny):
    _, sim, calib = tiny
    model, twins = _fused(sim)
    # the additions alone are 2.5x slower than float, the convs 2x faster: 7 + 2 * 5 < 1.1 * 9 * 2
    choices = keep_faster(model, twins, calib[0], measure=_fake(1e-3, 2e-3, add_integer_s=5e-3), repeats=2)
    adds = [c for c in choices if c.integer == "Int8Add"]
    assert len(adds) == 2 and all(c.integer_ms == 5.0 and c.picked == "integer" for c in adds)
    assert all(isinstance(model.get_submodule(n), IntegerModule) for n in CHAIN)
    # the other way round: the convs 2x slower, the additions far faster: the chain goes float
    model, twins = _fused(sim)
    choices = keep_faster(model, twins, calib[0], measure=_fake(4e-3, 2e-3, add_integer_s=1e-4), repeats=2)
    assert all(c.picked == "float" for c in choices if c.name in CHAIN)
    assert not any(isinstance(model.get_submodule(n), IntegerModule) for n in CHAIN)


def test_convert_reports_and_kept_float_names_each_reverted_layer_and_files_hold_no_timings(
        tiny, tmp_path, monkeypatch):
    float_model, sim, calib = tiny
    monkeypatch.setenv("QUANTA_SPEED_CACHE", str(tmp_path / "decisions.json"))
    monkeypatch.setattr(speed_check, "_perf_counter", _fake(3e-3, 1e-3))
    q = quanta.convert(sim, example=calib[0])
    rows = {r.name: r for r in quanta.conversion_report(q)}
    reverted = set(CHAIN)  # (named as lowered: a container holding a float twin does not collapse)
    assert reverted <= {n for n, r in rows.items() if r.result == "float"}
    detail = rows["features.1.add"].detail
    assert "Int8Add" in detail and "(3.000 ms vs float 1.000 ms)" in detail
    assert f"uint8 chain of {len(CHAIN)} integer layers (27.000 ms vs float 9.000 ms)" in detail
    kept = {k.name: k for k in kept_float(q)}
    assert reverted <= set(kept)
    assert kept["features.1.add"].type == "Add" and kept["features.1.conv.2"].type == "Conv2d"
    assert all(kept[n].integer_ms == 3.0 and kept[n].float_ms == 1.0 for n in reverted)
    saved = [_without_timings(dataclasses.asdict(r)) for r in quanta.conversion_report(q)]
    assert not any("ms vs float" in r["detail"] for r in saved)  # what quanta.save writes: no timings
    x = torch.randn(2, 4, 12, 12)
    assert type(q.head) is nn.Linear  # (timed alone, as slower: float too)
    with torch.no_grad():
        torch.testing.assert_close(q(x), float_model(x), atol=1e-5, rtol=1e-5)


def test_a_chain_decision_is_cached_under_its_own_key_and_reused(tiny, tmp_path):
    _, sim, calib = tiny
    cache_file = tmp_path / "decisions.json"
    model, twins = _fused(sim)
    first = keep_faster(model, twins, calib[0], measure=_fake(2e-3, 1e-3), repeats=2, cache=DecisionCache(cache_file))
    entries = json.loads(cache_file.read_text())["decisions"].values()
    chain_entries = [e for e in entries if "members" in e]
    assert len(chain_entries) == 1 and len(chain_entries[0]["members"]) == len(CHAIN)
    assert chain_entries[0]["picked"] == "float"
    timed = []
    model, twins = _fused(sim)
    again = keep_faster(model, twins, calib[0], measure=lambda kind, fn: timed.append(kind) or 1e-3,
                        cache=DecisionCache(cache_file))
    assert not timed and all(c.cached for c in again)
    assert [(c.name, c.picked, c.integer_ms, c.chain_layers) for c in again] == \
        [(c.name, c.picked, c.integer_ms, c.chain_layers) for c in first]
    assert not any(isinstance(model.get_submodule(n), IntegerModule) for n in CHAIN[1:])


def test_a_reverted_chain_gives_back_the_users_max_pool_and_saves_and_loads(tmp_path, monkeypatch):
    def net() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                             nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()

    model = net()
    calib = [torch.randn(2, 3, 12, 12) for _ in range(2)]
    sim = quanta.calibrate(quanta.prepare(model, quanta.preset("static_int8")), calib, progress=False)
    target, twins = _fused(sim)
    assert type(target[2]).__name__ == "CodesMaxPool2d" and uint8_chains(target) == [["0", "3"]]
    keep_faster(target, twins, calib[0], measure=_fake(2e-3, 1e-3), repeats=1)
    assert [type(m) for m in target[:5]] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU]
    monkeypatch.setenv("QUANTA_SPEED_CACHE", str(tmp_path / "decisions.json"))
    monkeypatch.setattr(speed_check, "_perf_counter", _fake(2e-3, 1e-3))
    q = quanta.quantize(model, "static_int8", calib, progress=False)
    assert type(q[2]) is nn.MaxPool2d and not any(isinstance(m, IntegerModule) for m in q.modules())
    loaded = quanta.load(quanta.save(q, tmp_path / "m.safetensors"), model=net())
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x), atol=0, rtol=0)
        torch.testing.assert_close(q(x), model(x), atol=1e-5, rtol=1e-5)
