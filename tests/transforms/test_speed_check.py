"""The speed check: an integer layer is kept only where it is faster than float, and the report says so."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import quanta
from quanta.integer.base import IntegerModule
from quanta.transforms.convert import _walk
from quanta.integer import lowering_classes
from quanta.transforms.speed_check import keep_faster


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
    assert all(c.integer_ms == 2.0 and c.float_ms == 1.0 for c in choices)
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
        if r.result == "float":
            assert type(mod) is nn.Linear and cov[name].status == "float"
            assert r.detail.startswith("integer kernel slower: Int8Linear")
            int_ms, float_ms = map(float, re.search(r"Int8Linear ([\d.]+) ms vs float ([\d.]+) ms", r.detail).groups())
            assert int_ms >= float_ms  # (equal when both round to the same 3 decimals)
        else:
            assert isinstance(mod, IntegerModule) and r.result == "Int8Linear" and cov[name].status == "integer"
            assert "ms vs float" in r.detail
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
    assert quanta.conversion_report(back) == quanta.conversion_report(q)
    assert [type(m) for m in back.modules()] == [type(m) for m in q.modules()]


def test_convs_of_a_uint8_chain_are_not_timed_alone(trained_cnn, digits_data):
    from quanta.transforms.fuse import fuse_activations

    model, twins = _lowered(_sim_cnn(trained_cnn, digits_data))
    fused = fuse_activations(model)
    chain = {p for p, _, out in fused if out == "uint8"}
    assert chain == {"features.0"}  # features.0 hands uint8 codes to features.3
    x = digits_data.x_test[:32]
    with torch.no_grad():
        before = model(x)
    choices = keep_faster(model, twins, x, measure=_fake(2e-3, 1e-3), repeats=1)
    assert {c.name for c in choices} == {"features.7", "head"}  # not features.0 / features.3
    assert isinstance(model.features[0], IntegerModule) and isinstance(model.features[3], IntegerModule)
    # features.7 had fused the ReLU after it (its module is Identity now): its float twin brings it back
    f7 = model.features[7]
    assert type(f7) is nn.Sequential and type(f7[0]) is nn.Conv2d and type(f7[1]) is nn.ReLU
    with torch.no_grad():
        assert (f7(torch.randn(2, f7[0].in_channels, 8, 8)) >= 0).all()
    assert type(model.head) is nn.Linear
    assert any(isinstance(model.features[i], nn.Identity) for i in range(8, len(model.features)))
    with torch.no_grad():  # two layers now float: close to the all-integer model, and it still runs
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
