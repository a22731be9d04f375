"""The speed check: an integer layer is kept only where it is faster than float, and the report says so."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
import torch
from torch import nn

import quanta
from quanta.integer import lowering_classes
from quanta.integer.base import IntegerModule
from quanta.io.save_load import _without_timings
from quanta.transforms.convert import _walk
from quanta.transforms.speed_cache import DecisionCache
from quanta.transforms.speed_check import DEFAULT_TOLERANCE, TOLERANCE, keep_faster


def _lowered(sim: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    target, report, twins = copy.deepcopy(sim), [], {}
    _walk(target, "", lowering_classes(), report, twins)
    return target, twins


def _sim_cnn(trained_cnn, digits_data):
    sim = quanta.prepare(trained_cnn, quanta.preset("static_int8"))
    return quanta.calibrate(sim, digits_data.calib_batches(2), progress=False)


def _fake(integer_s: float, float_s: float):
    def measure(kind, fn):
        fn()
        return integer_s if kind == "integer" else float_s
    return measure


def test_slower_integer_layers_become_their_float_twins(trained_cnn, digits_data):
    sim = _sim_cnn(trained_cnn, digits_data)
    model, twins = _lowered(sim)
    assert set(twins) == {"features.0", "features.3", "features.7", "head"}
    x = digits_data.x_test[:32]
    choices = keep_faster(model, twins, x, measure=_fake(2e-3, 1e-3), repeats=3)
    assert {c.name for c in choices} == set(twins) and all(c.picked == "float" for c in choices)
    assert all(c.integer_ms == 2.0 and c.float_ms == 1.0 and c.ratio == 2.0 for c in choices)
    assert not any(isinstance(m, IntegerModule) for m in model.modules())
    assert type(model.features[0]) is nn.Conv2d and type(model.head) is nn.Linear
    assert not any(isinstance(m, quanta.TensorQuantizer) for m in model.modules())
    with torch.no_grad():  # float twins hold the (BN-folded) float weights: the float model's numbers
        torch.testing.assert_close(model(x), trained_cnn(x), atol=1e-4, rtol=1e-4)
    assert choices[0].input_shape == (32, 1, 8, 8)


def test_faster_integer_layers_stay_and_counts_are_untouched(trained_cnn, digits_data):
    model, twins = _lowered(_sim_cnn(trained_cnn, digits_data))
    choices = keep_faster(model, twins, digits_data.x_test[:16], measure=_fake(1e-3, 2e-3), repeats=2)
    assert all(c.picked == "integer" for c in choices)
    assert all(not m.kernel_counts for m in model.modules() if isinstance(m, IntegerModule))
    assert sum(isinstance(m, IntegerModule) for m in model.modules()) == 4


def test_layers_the_example_does_not_reach_stay_integer():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.a(x)

    sim = quanta.prepare(TwoHeads().eval(), quanta.preset("dynamic_int8"))
    model, twins = _lowered(sim)
    choices = keep_faster(model, twins, torch.randn(4, 64), measure=_fake(2.0, 1.0), repeats=1)
    assert [c.name for c in choices] == ["a"]
    assert type(model.a) is nn.Linear and isinstance(model.b, IntegerModule)
    with pytest.raises(ValueError, match="repeats"):
        keep_faster(model, twins, torch.randn(4, 64), repeats=0)


def test_convert_reports_each_choice_consistently(trained_transformer, token_data):
    """Real timings: whatever they are, the report, the modules and coverage agree."""
    q = quanta.quantize(trained_transformer, "dynamic_int8", token_data.calib_batches(1), progress=False)
    report = {r.name: r for r in quanta.conversion_report(q)}
    cov = {e.name: e for e in quanta.coverage(q).entries}
    for name in ("encoder.linear1", "encoder.linear2", "head"):
        mod, r = q.get_submodule(name), report[name]
        assert " ms vs float " in r.detail  # both timings (quanta.save drops them: test_kept_float.py)
        if r.result == "float":
            assert type(mod) is nn.Linear and cov[name].status == "float"
            assert r.detail.startswith("integer kernel slower: Int8Linear") and "more than 1.10x" in r.detail
        else:
            assert isinstance(mod, IntegerModule) and r.result == "Int8Linear" and cov[name].status == "integer"
            assert "speed-checked" in r.detail
    with torch.no_grad():
        acc = (q(token_data.x_test).argmax(1) == token_data.y_test).float().mean()
        base = (trained_transformer(token_data.x_test).argmax(1) == token_data.y_test).float().mean()
    assert acc >= base - 0.01


def test_no_example_or_speed_check_off_keeps_every_layer_integer(trained_transformer, token_data):
    for q in (quanta.quantize(trained_transformer, "dynamic_int8", progress=False),
              quanta.quantize(trained_transformer, "dynamic_int8", token_data.calib_batches(1), progress=False,
                              speed_check=False)):
        assert all(r.result == "Int8Linear" for r in quanta.conversion_report(q) if r.simulated == "QuantLinear")


def test_one_shot_calibration_iterator_is_used_once_for_both(trained_cnn, digits_data):
    batches = digits_data.calib_batches(3)
    q = quanta.quantize(trained_cnn, "static_int8", iter(batches), progress=False)
    assert len(quanta.conversion_report(q)) == 4
    with pytest.raises(ValueError, match="calib_data is empty"):
        quanta.quantize(trained_cnn, "static_int8", iter([]), progress=False)


def test_a_speed_checked_model_saves_and_loads_exactly(trained_transformer, token_data, tmp_path):
    q = quanta.quantize(trained_transformer, "dynamic_int8", token_data.calib_batches(1), progress=False)
    quanta.save(q, tmp_path / "q.safetensors")
    back = quanta.load(tmp_path / "q.safetensors")
    x = token_data.x_test[:32]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    # the same report, less the timings (a file holds none: test_kept_float.py)
    assert [dataclasses.asdict(r) for r in quanta.conversion_report(back)] == \
        [_without_timings(dataclasses.asdict(r)) for r in quanta.conversion_report(q)]
    assert [type(m) for m in back.modules()] == [type(m) for m in q.modules()]


def test_convs_of_a_uint8_chain_are_decided_together(trained_cnn, digits_data):
    from quanta.nn.modules.fused import FusedActivation
    from quanta.transforms.fuse import fuse_activations

    model, twins = _lowered(_sim_cnn(trained_cnn, digits_data))
    fused = fuse_activations(model)
    chain = {p for p, _, out in fused if out == "uint8"}
    assert chain == {"features.0"}  # features.0 hands uint8 codes to features.3
    x = digits_data.x_test[:32]
    with torch.no_grad():
        before = model(x)
    choices = keep_faster(model, twins, x, measure=_fake(2e-3, 1e-3), repeats=1)
    assert {c.name for c in choices} == set(twins)  # the chain features.0 -> features.3 as a whole
    assert [c.chain_layers for c in choices if c.name in ("features.0", "features.3")] == [2, 2]
    assert type(model.features[0]) is nn.Conv2d and type(model.features[3]) is nn.Conv2d
    # features.7 had fused the ReLU after it (a FusedActivation in its place): its float twin comes back
    # alone and so does the user's ReLU module, so the model has the user's architecture again
    assert type(model.features[7]) is nn.Conv2d
    after7 = [type(m) for m in list(model.features)[8:]]
    assert nn.ReLU in after7 and not any(issubclass(t, FusedActivation) for t in after7)  # (BN folded: Identity)
    assert type(model.head) is nn.Linear
    assert not any(isinstance(m, (IntegerModule, FusedActivation)) for m in model.features.modules())
    with torch.no_grad():  # every layer float now: close to the all-integer model, and it still runs
        after = model(x)
    assert (after.argmax(1) == before.argmax(1)).float().mean() >= 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_speed_check_on_cuda_times_queued_work():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval().cuda()
    x = torch.randn(64, 256, device="cuda")
    q = quanta.quantize(mlp, "dynamic_int8", [x], progress=False)
    report = quanta.conversion_report(q)
    assert all("ms" in r.detail for r in report)
    with torch.no_grad():
        torch.testing.assert_close(q(x), mlp(x), atol=0.1, rtol=0.1)


def _noisy(ratio: float, seed: int, spikes: float = 0.1):
    """A loaded machine: every round ±8% jitter, and a fraction ``spikes`` of rounds (either
    side) hit by interference that multiplies the time by 3-30."""
    rng = random.Random(seed)

    def measure(kind, fn):
        base = 1e-3 * (ratio if kind == "integer" else 1.0) * rng.uniform(0.92, 1.08)
        return base * (rng.uniform(3, 30) if rng.random() < spikes else 1.0)
    return measure


def _mlp_sim():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    return quanta.prepare(mlp, quanta.preset("dynamic_int8"))


@pytest.mark.parametrize("ratio, expected", [(1.0, "integer"), (1.05, "integer"), (0.9, "integer"),
                                             (1.4, "float"), (3.0, "float")])
def test_noise_and_interference_within_the_tolerance_never_flip_a_decision(ratio, expected):
    sim = _mlp_sim()
    picks = set()
    for seed in range(12):
        model, twins = _lowered(sim)
        choices = keep_faster(model, twins, torch.randn(4, 64), measure=_noisy(ratio, seed))
        picks |= {c.picked for c in choices}
        assert all(len(c.name) for c in choices) and len(choices) == 2
    assert picks == {expected}


def test_a_few_rounds_are_not_enough_for_one_lucky_spike_to_decide():
    sim = _mlp_sim()
    model, twins = _lowered(sim)
    calls = {"integer": 0, "float": 0}

    def measure(kind, fn):  # equal kernels, but the float side's first rounds are disturbed
        calls[kind] += 1
        return 1e-3 * (5.0 if kind == "float" and calls[kind] <= 3 else 1.0)

    choices = keep_faster(model, twins, torch.randn(4, 64), measure=measure)
    assert all(c.picked == "integer" for c in choices)
    assert calls["integer"] >= 15 * len(choices)  # MIN_ROUNDS interleaved rounds each


def test_a_cached_decision_is_reused_without_timing_again(tmp_path):
    cache_file = tmp_path / "decisions.json"
    sim = _mlp_sim()
    model, twins = _lowered(sim)
    first = keep_faster(model, twins, torch.randn(4, 64), measure=_fake(2e-3, 1e-3), cache=DecisionCache(cache_file))
    assert [c.picked for c in first] == ["float", "float"] and not any(c.cached for c in first)
    stored = json.loads(cache_file.read_text())["decisions"]
    assert len(stored) == 2 and {e["picked"] for e in stored.values()} == {"float"}

    timed = []
    model, twins = _lowered(sim)  # a fresh conversion; the timer now says integer is faster
    again = keep_faster(model, twins, torch.randn(4, 64), measure=lambda kind, fn: timed.append(kind) or 1e-3,
                        cache=DecisionCache(cache_file))
    assert [c.picked for c in again] == ["float", "float"] and all(c.cached for c in again)
    assert timed == [] and type(model[0]) is nn.Linear

    model, twins = _lowered(sim)  # another input shape is another decision: measured
    other = keep_faster(model, twins, torch.randn(9, 64), measure=_fake(1e-3, 2e-3), cache=DecisionCache(cache_file))
    assert [c.picked for c in other] == ["integer", "integer"] and not any(c.cached for c in other)


def test_a_broken_cache_file_is_skipped_not_fatal(tmp_path):
    bad = tmp_path / "decisions.json"
    bad.write_text("{not json")
    model, twins = _lowered(_mlp_sim())
    choices = keep_faster(model, twins, torch.randn(4, 64), measure=_fake(2e-3, 1e-3), cache=DecisionCache(bad))
    assert [c.picked for c in choices] == ["float", "float"]


def test_weight_only_layers_stay_unless_grossly_slower_and_int8_compute_layers_unless_clearly_slower():
    """What a user of each preset expects: weight-only layers exist to be small (kept at 1.5x
    float's time), int8 compute layers to be fast (float at 1.5x)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    assert TOLERANCE["Int8WeightOnlyLinear"] == TOLERANCE["Int4WeightOnlyLinear"] == 2.0
    assert DEFAULT_TOLERANCE == 1.10
    for preset, expected in (("weight_only_int8", "integer"), ("dynamic_int8", "float"), ("w4a8", "float")):
        model, twins = _lowered(quanta.prepare(mlp, quanta.preset(preset)))
        choices = keep_faster(model, twins, torch.randn(16, 64), measure=_fake(1.5e-3, 1e-3))
        assert [c.picked for c in choices] == [expected] * 2, preset


def test_quantize_with_calib_data_times_weight_only_layers_and_reports_no_timings(tmp_path, monkeypatch):
    """Real timings: weight-only layers reached by the calibration batch are timed (each has a
    choice in the report) and the saved file's report carries no timing."""
    monkeypatch.setenv("QUANTA_SPEED_CACHE", str(tmp_path / "cache.json"))
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    q = quanta.quantize(mlp, "weight_only_int8", [torch.randn(16, 128)], progress=False)
    report = quanta.conversion_report(q)
    assert len(report) == 2 and all("speed-checked" in r.detail or "slower" in r.detail for r in report)
    saved = [_without_timings(dataclasses.asdict(r)) for r in report]  # what quanta.save writes
    assert not any(" ms" in r["detail"] for r in saved) and all(" ms vs float " in r.detail for r in report)
    assert len(json.loads((tmp_path / "cache.json").read_text())["decisions"]) == 2
    again = quanta.quantize(mlp, "weight_only_int8", [torch.randn(16, 128)], progress=False)
    # the cached decisions: the same choices and saved report
    assert [_without_timings(dataclasses.asdict(r)) for r in quanta.conversion_report(again)] == saved
