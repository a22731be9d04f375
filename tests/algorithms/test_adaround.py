"""AdaRound: learned rounding beats round-to-nearest at 4-bit weights on the trained
MobileNetV2-style model; the learned codes are exactly what the integer model runs; bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta import demo
from quanta.algorithms import ALGORITHMS_ATTR
from quanta.algorithms.adaround import AdaRoundOptions, adaround
from quanta.core.quantize import quantize
from quanta.nn import LayerQuantConfig, QuantDescriptor

#: 4-bit per-channel weights, float activations: round-to-nearest loses ~30 points on the model
W4 = LayerQuantConfig(input=None, weight=QuantDescriptor(num_bits=4, per_channel=True, narrow_range=True))
#: per-channel int8 weights, static uint8 activations: what the integer conv kernels run
W8A8 = LayerQuantConfig(input=QuantDescriptor(unsigned=True, symmetric=False),
                        weight=QuantDescriptor(per_channel=True, narrow_range=True))
FAST = AdaRoundOptions(iterations=100)


def _calib(digits16, n: int = 4) -> list[torch.Tensor]:
    return [digits16.x_train[i * 64:(i + 1) * 64] for i in range(n)]


def _nearest_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is not None and wq.is_enabled:
            out[name] = quantize(m.weight.detach(), *wq.qparams(m.weight), wq.spec).float()
    return out


def test_adaround_beats_round_to_nearest_at_4_bit(trained_mobilenet, digits16) -> None:
    config = quanta.QuantConfig(default=W4, fold_bn=True)
    nearest = quanta.prepare(trained_mobilenet, config)
    learned = quanta.prepare(trained_mobilenet, config)
    record = adaround(learned, _calib(digits16), FAST, progress=False)
    acc_fp = demo.accuracy(trained_mobilenet, digits16.x_test, digits16.y_test)
    acc_rtn = demo.accuracy(nearest, digits16.x_test, digits16.y_test)
    acc_ada = demo.accuracy(learned, digits16.x_test, digits16.y_test)
    # measured: float 96.4, 4-bit per-channel round-to-nearest 66.1, AdaRound (100 iterations) 94.0
    assert acc_ada > acc_rtn + 15 and acc_ada > acc_fp - 10, (acc_fp, acc_rtn, acc_ada)
    assert not record["skipped"] and len(record["layers"]) == 12
    assert all(r["loss_adaround"] <= r["loss_nearest"] for r in record["layers"])
    assert sum(r["flips"] for r in record["layers"]) > 100


def test_learned_codes_are_what_the_integer_model_runs(trained_mobilenet, digits16) -> None:
    calib = _calib(digits16)
    sim = quanta.prepare(trained_mobilenet, quanta.QuantConfig(default=W8A8, fold_bn=True))
    quanta.calibrate(sim, calib, progress=False)
    before = _nearest_codes(sim)
    record = adaround(sim, calib[:2], AdaRoundOptions(iterations=10), progress=False)
    learned = _nearest_codes(sim)  # the frozen weight quantizer on the written-back weights
    flips = {r["layer"]: r["flips"] for r in record["layers"]}
    assert sum(flips.values()) > 0
    for name, codes in learned.items():
        m = sim.get_submodule(name)
        scale, _ = m.weight_quantizer.qparams(m.weight)
        v = m.weight.detach() / scale.reshape(-1, *[1] * (m.weight.dim() - 1))
        assert torch.allclose(v, v.round(), atol=1e-3), name  # the weight sits on the grid
        assert int((codes != before[name]).sum()) == flips[name], name
    integer = quanta.convert(copy.deepcopy(sim), inplace=True, speed_check=False)
    lowered = {n: m for n, m in integer.named_modules() if hasattr(m, "weight_scale")}
    assert len(lowered) == len(learned) == 12
    for (name, codes), mod in zip(learned.items(), lowered.values()):  # conv+ReLU fused: "x.0" → "x"
        assert mod.weight.dtype == torch.int8 and torch.equal(mod.weight.float(), codes), name
    x = digits16.x_test[:256]  # integer requantization may move an activation by one step: logits agree closely
    assert (integer(x).argmax(1) == sim(x).argmax(1)).float().mean() > 0.98


def test_adaround_through_quantize_is_recorded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    calib = [torch.randn(32, 8) for _ in range(3)]
    config = quanta.QuantConfig(default=W8A8, algorithms=("adaround", "empirical_bias_correction"))
    integer = quanta.quantize(model, config, calib, speed_check=False, progress=False)
    names = [r["algorithm"] for r in getattr(integer, ALGORITHMS_ATTR)]
    assert names == ["adaround", "empirical_bias_correction"]
    assert [r["layer"] for r in getattr(integer, ALGORITHMS_ATTR)[0]["layers"]] == ["0", "2"]


def test_too_little_data_raises_with_the_number_needed(trained_mobilenet, digits16) -> None:
    sim = quanta.prepare(trained_mobilenet, quanta.QuantConfig(default=W4, fold_bn=True))
    state = copy.deepcopy(sim.state_dict())
    with pytest.raises(ValueError, match="at least 64 calibration samples, got 16"):
        adaround(sim, [digits16.x_train[:16]], FAST, progress=False)
    assert all(torch.equal(v, sim.state_dict()[k]) for k, v in state.items())


class _WithSpareHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.spare = nn.Linear(8, 3)  # never called on this data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_layer_it_cannot_handle_is_skipped_unchanged() -> None:
    torch.manual_seed(0)
    sim = quanta.prepare(_WithSpareHead().eval(), quanta.QuantConfig(default=W4))
    spare = sim.spare.weight.detach().clone()
    record = adaround(sim, [torch.randn(64, 8)], AdaRoundOptions(iterations=20), progress=False)
    assert [r["layer"] for r in record["layers"]] == ["body"]
    assert record["skipped"] == [{"layer": "spare", "reason": "the calibration data never reaches it"}]
    assert torch.equal(sim.spare.weight, spare) and sim.spare.weight_quantizer.amax is None


@pytest.mark.parametrize("field,value", [("iterations", 0), ("lr", -1.0), ("warmup", 1.0), ("batch_size", 1.5)])
def test_options_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"AdaRoundOptions.{field}"):
        AdaRoundOptions(**{field: value})


def test_weight_range_is_frozen_so_codes_survive_a_range_that_follows_the_weight() -> None:
    # an MSE-chosen weight range depends on the whole weight histogram: without freezing it,
    # writing the learned weight back would move the scale and re-round every code
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    mse_w4 = LayerQuantConfig(input=None, weight=QuantDescriptor(num_bits=4, per_channel=False, calib_method="mse"))
    sim = quanta.prepare(model, quanta.QuantConfig(default=mse_w4))
    scales = {n: sim.get_submodule(n).weight_quantizer.qparams(sim.get_submodule(n).weight)[0] for n in ("0", "2")}
    record = adaround(sim, [torch.randn(64, 16)], AdaRoundOptions(iterations=50), progress=False)
    assert [r["layer"] for r in record["layers"]] == ["0", "2"] and sum(r["flips"] for r in record["layers"]) > 0
    for n, scale in scales.items():
        m = sim.get_submodule(n)
        assert torch.equal(m.weight_quantizer.qparams(m.weight)[0], scale), n
        assert torch.equal(quantize(m.weight.detach(), *m.weight_quantizer.qparams(m.weight), m.weight_quantizer.spec)
                           .float() * scale, m.weight.detach()), n


def test_saved_file_holds_the_learned_codes_and_load_reproduces_them(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    calib = [torch.randn(32, 3, 6, 6) for _ in range(3)]
    config = quanta.QuantConfig(default=W8A8, algorithms=("best_calibration", "adaround"))
    integer = quanta.quantize(model, config, calib, speed_check=False, progress=False)
    assert sum(r["flips"] for r in getattr(integer, ALGORITHMS_ATTR)[1]["layers"]) > 0
    loaded = quanta.load(quanta.save(integer, tmp_path / "m.safetensors"), model=model)
    assert [r["algorithm"] for r in getattr(loaded, ALGORITHMS_ATTR)] == ["best_calibration", "adaround"]
    for (name, a), b in zip(integer.named_buffers(), loaded.buffers()):
        assert torch.equal(a, b), name
    x = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(loaded(x), integer(x), rtol=0, atol=0)
