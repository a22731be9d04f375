"""state_dict round trips, reset, merge bookkeeping, repr and the factory."""

from __future__ import annotations

import json

import pytest
import torch

from quanta.calib import (
    CALIBRATION_METHODS,
    Calibrator,
    HistogramCalibrator,
    MaxCalibrator,
    MovingAverageCalibrator,
    make_calibrator,
)

CONFIGS = {
    "max": lambda: MaxCalibrator(),
    "max_axis-1": lambda: MaxCalibrator(axis=-1, num_bits=4),
    "mean_axis0": lambda: MovingAverageCalibrator(axis=0),
    "ema": lambda: MovingAverageCalibrator(momentum=0.05, unsigned=True),
    "histogram": lambda: HistogramCalibrator(num_bins=256, method="entropy", num_bits=6),
}
every_config = pytest.mark.parametrize("build", CONFIGS.values(), ids=list(CONFIGS))
HIST_METHODS = ("max", "percentile", "mse", "entropy")


def _feed(cal: Calibrator, seed: int = 0, n: int = 3) -> Calibrator:
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        cal.collect(torch.randn(8, 5, generator=g) * (i + 1))
    return cal


def _ranges(cal: Calibrator):
    if isinstance(cal, HistogramCalibrator):
        return [cal.compute_range(m) for m in HIST_METHODS]
    return [cal.compute_range()]


@every_config
def test_round_trip_gives_the_same_ranges(build):
    cal = _feed(build())
    state = cal.state_dict()
    plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    json.dumps(plain)  # settings are plain values
    assert all(isinstance(v, torch.Tensor) for k, v in state.items() if k not in plain)
    fresh = build()
    fresh.load_state_dict(state)
    for (a_lo, a_hi), (b_lo, b_hi) in zip(_ranges(cal), _ranges(fresh)):
        assert torch.equal(a_lo, b_lo) and torch.equal(a_hi, b_hi)
    assert (fresh.num_batches, fresh.num_samples) == (3, 120)
    # the loaded calibrator owns its tensors and keeps collecting like the original
    for v in state.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v.fill_(123.0)
    _feed(cal, seed=1, n=1)
    _feed(fresh, seed=1, n=1)
    for (a_lo, a_hi), (b_lo, b_hi) in zip(_ranges(cal), _ranges(fresh)):
        assert torch.equal(a_lo, b_lo) and torch.equal(a_hi, b_hi)


@every_config
def test_empty_state_round_trip_and_reset(build):
    empty = build().state_dict()
    assert int(empty["num_batches"]) == 0
    cal = _feed(build())
    cal.load_state_dict(empty)
    assert cal.num_batches == 0
    with pytest.raises(ValueError, match="has seen no data"):
        cal.compute_range()
    _feed(cal).reset()
    assert (cal.num_batches, cal.num_samples) == (0, 0)
    with pytest.raises(ValueError, match="has seen no data"):
        cal.compute_range()


@every_config
def test_merge_bookkeeping(build):
    a, b = build(), _feed(build())
    a.merge(build())  # empty into empty: nothing
    assert a.num_batches == 0
    a.merge(b)
    for (x_lo, x_hi), (y_lo, y_hi) in zip(_ranges(a), _ranges(b)):
        assert torch.equal(x_lo, y_lo) and torch.equal(x_hi, y_hi)
    b.merge(build())  # merging an empty calibrator changes nothing
    assert b.num_batches == 3
    a.merge(b)
    assert (a.num_batches, a.num_samples) == (6, 240)


def test_load_refuses_other_settings_and_corrupt_states():
    state = _feed(MaxCalibrator(axis=0)).state_dict()
    with pytest.raises(ValueError, match="state_dict has axis=0, this calibrator axis=1"):
        MaxCalibrator(axis=1).load_state_dict(state)
    with pytest.raises(ValueError, match="state_dict is for 'MaxCalibrator', not 'MovingAverageCalibrator'"):
        MovingAverageCalibrator(axis=0).load_state_dict(state)
    with pytest.raises(ValueError, match="missing 'max'"):
        MaxCalibrator(axis=0).load_state_dict({k: v for k, v in state.items() if k != "max"})
    with pytest.raises(ValueError, match=r"unexpected state_dict key\(s\) \['extra'\]"):
        MaxCalibrator(axis=0).load_state_dict({**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="'min' exceeds 'max'"):
        MaxCalibrator(axis=0).load_state_dict({**state, "min": state["max"] + 1})
    with pytest.raises(ValueError, match="must be a 1-d torch.float32"):
        MaxCalibrator(axis=0).load_state_dict({**state, "min": state["min"].double()})
    hist_state = _feed(HistogramCalibrator(num_bins=64)).state_dict()
    with pytest.raises(ValueError, match="num_bins=64, this calibrator num_bins=128"):
        HistogramCalibrator(num_bins=128).load_state_dict(hist_state)
    with pytest.raises(ValueError, match="'log2_width' does not match"):
        HistogramCalibrator(num_bins=64).load_state_dict({**hist_state, "log2_width": hist_state["log2_width"] - 1})
    with pytest.raises(ValueError, match="'zeros' must be an int64 count between 0 and hist"):
        HistogramCalibrator(num_bins=64).load_state_dict({**hist_state, "zeros": hist_state["hist"][0] + 1})
    with pytest.raises(ValueError, match="missing 'zeros'"):
        HistogramCalibrator(num_bins=64).load_state_dict({k: v for k, v in hist_state.items() if k != "zeros"})
    with pytest.raises(ValueError, match="version 2 is not 1"):
        HistogramCalibrator(num_bins=64).load_state_dict({**hist_state, "version": 2})


def test_repr():
    cal = _feed(HistogramCalibrator(num_bins=64, method="mse", name="fc1.input"), n=2)
    assert repr(cal) == (
        "HistogramCalibrator(num_bits=8, axis=None, unsigned=False, num_bins=64, name='fc1.input', "
        "num_batches=2, method='mse')"
    )
    assert repr(MovingAverageCalibrator(momentum=0.5, axis=1)) == (
        "MovingAverageCalibrator(num_bits=8, axis=1, unsigned=False, momentum=0.5, num_batches=0)"
    )


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_factory(method):
    cal = make_calibrator(method, num_bits=6, name="layer.input")
    expected = {"max": MaxCalibrator, "moving_average": MovingAverageCalibrator}.get(method, HistogramCalibrator)
    assert type(cal) is expected and cal.num_bits == 6 and cal.name == "layer.input"
    if method in ("percentile", "mse", "entropy"):
        assert cal.method == method
        _feed(cal)
        assert torch.equal(cal.compute_amax(), cal.compute_amax(method))


def test_factory_passes_method_parameters():
    cal = _feed(make_calibrator("percentile", percentile=50.0, num_bins=128))
    assert torch.equal(cal.compute_amax(), cal.compute_amax("percentile", percentile=50.0))
    assert make_calibrator("moving_average", momentum=0.1, axis=0).momentum == 0.1
    with pytest.raises(ValueError, match="fixes method='mse'"):
        make_calibrator("mse", method="entropy")
    with pytest.raises(ValueError, match="per-tensor only"):
        make_calibrator("entropy", axis=1)


def test_factory_histogram_takes_a_method():
    cal = make_calibrator("histogram", method="entropy", num_bins=512)
    assert cal.method == "entropy" and cal.num_bins == 512


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@every_config
def test_cuda_matches_cpu_and_merges_across_devices(build):
    batches = [torch.randn(64, 5, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(4)]
    cpu, gpu, mixed = build(), build(), build()
    for b in batches:
        cpu.collect(b)
        gpu.collect(b.cuda())
    for b in batches[:2]:
        mixed.collect(b.cuda())
    rest = build()
    for b in batches[2:]:
        rest.collect(b)
    mixed.merge(rest)  # CPU state into a CUDA calibrator
    for (c_lo, c_hi), (g_lo, g_hi), (m_lo, m_hi) in zip(_ranges(cpu), _ranges(gpu), _ranges(mixed)):
        assert g_hi.device.type == "cuda"
        torch.testing.assert_close(g_lo.cpu(), c_lo, rtol=0, atol=0)
        torch.testing.assert_close(g_hi.cpu(), c_hi, rtol=0, atol=0)
        if not (isinstance(cpu, MovingAverageCalibrator) and cpu.momentum is not None):  # EMA merge approximates
            torch.testing.assert_close(m_lo.cpu(), c_lo, rtol=0, atol=0)
            torch.testing.assert_close(m_hi.cpu(), c_hi, rtol=0, atol=0)
