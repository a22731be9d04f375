"""Bad input is refused loudly, naming the calibrator, and never changes the state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quanta.calib import HistogramCalibrator, MaxCalibrator, MovingAverageCalibrator, make_calibrator

BUILDERS = {
    "max": lambda **kw: MaxCalibrator(**kw),
    "max_axis0": lambda **kw: MaxCalibrator(axis=0, **kw),
    "moving_average": lambda **kw: MovingAverageCalibrator(**kw),
    "ema_axis1": lambda **kw: MovingAverageCalibrator(momentum=0.1, axis=1, **kw),
    "histogram": lambda **kw: HistogramCalibrator(**kw),
}
every_calibrator = pytest.mark.parametrize("build", BUILDERS.values(), ids=list(BUILDERS))


@every_calibrator
def test_nan_inf_message_counts_and_locates_and_names(build):
    cal = build(name="encoder.fc1.input")
    x = torch.zeros(10, 64)
    x[0, 3] = float("nan")
    x[5, 1] = float("nan")
    x[7, 7] = float("-inf")
    with pytest.raises(ValueError) as err:
        cal.collect(x)
    assert str(err.value) == (
        "calibrator 'encoder.fc1.input': calibration data contains 2 NaN and 1 Inf value(s) "
        "out of 640 (first at index (0, 3))"
    )
    assert cal.num_batches == 0 and cal.num_samples == 0
    assert cal.state_dict()["num_batches"] == 0


@every_calibrator
def test_unnamed_calibrator_is_named_by_class(build):
    cal = build()
    with pytest.raises(ValueError, match=rf"^{type(cal).__name__}: calibration data contains 0 NaN and 1 Inf"):
        cal.collect(torch.tensor([[1.0, float("inf")]]))


@every_calibrator
def test_no_data(build):
    cal = build(name="head.output")
    msg = "calibrator 'head.output' has seen no data; run calibration before computing a range"
    with pytest.raises(ValueError, match=f"^{msg}$"):
        cal.compute_range()
    with pytest.raises(ValueError, match="has seen no data"):
        cal.compute_amax()


@every_calibrator
@pytest.mark.parametrize("bad", [torch.arange(6).reshape(2, 3), torch.ones(2, 3, dtype=torch.bool), np.ones((2, 3))],
                         ids=["int64", "bool", "numpy"])
def test_non_float_input(build, bad):
    with pytest.raises(TypeError, match="floating-point tensor|torch.Tensor"):
        build().collect(bad)


@every_calibrator
def test_empty_batch(build):
    with pytest.raises(ValueError, match=r"calibration batch is empty \(shape \(0, 4\)\)"):
        build(name="x").collect(torch.empty(0, 4))


@pytest.mark.parametrize("axis", [2, -3])
def test_axis_out_of_range(axis):
    cal = MaxCalibrator(axis=axis, name="conv1.weight")
    with pytest.raises(ValueError, match=rf"calibrator 'conv1.weight': axis {axis} is out of range .* 2 dimension"):
        cal.collect(torch.randn(3, 4))
    with pytest.raises(ValueError, match="out of range .* 0 dimension"):
        MovingAverageCalibrator(axis=0).collect(torch.tensor(1.0))


@pytest.mark.parametrize("cls", [MaxCalibrator, MovingAverageCalibrator])
def test_channel_count_must_not_change(cls):
    cal = cls(axis=1, name="bn")
    cal.collect(torch.randn(2, 8))
    with pytest.raises(ValueError, match="calibrator 'bn': axis 1 has length 4 in this batch but 8"):
        cal.collect(torch.randn(2, 4))
    assert cal.num_batches == 1


@pytest.mark.parametrize("bits", [0, 17, -8])
def test_bad_num_bits_value(bits):
    for cls in (MaxCalibrator, MovingAverageCalibrator, HistogramCalibrator):
        with pytest.raises(ValueError, match=f"num_bits must be in 1..16, got {bits}"):
            cls(num_bits=bits)


@pytest.mark.parametrize("bits", [8.0, True, "8"])
def test_bad_num_bits_type(bits):
    with pytest.raises(TypeError, match="num_bits must be an int"):
        MaxCalibrator(num_bits=bits)


def test_bad_settings():
    with pytest.raises(TypeError, match="axis must be an int or None"):
        MaxCalibrator(axis="0")
    with pytest.raises(TypeError, match="axis must be an int or None"):
        MaxCalibrator(axis=True)
    with pytest.raises(TypeError, match="unsigned must be a bool"):
        MaxCalibrator(unsigned=1)
    with pytest.raises(TypeError, match="name must be a str"):
        MaxCalibrator(name=3)
    with pytest.raises(ValueError, match="per-tensor only: axis must be None, got 0"):
        HistogramCalibrator(axis=0)
    for bins in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_bins must be a positive int"):
            HistogramCalibrator(num_bins=bins)
    for momentum in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\]"):
            MovingAverageCalibrator(momentum=momentum)
    with pytest.raises(TypeError, match="momentum must be a float"):
        MovingAverageCalibrator(momentum=True)
    with pytest.raises(ValueError, match="percentile must be in"):
        HistogramCalibrator(percentile=0)
    with pytest.raises(ValueError, match="stride must be a positive int"):
        HistogramCalibrator(stride=0)
    with pytest.raises(ValueError, match="start_bin must be a positive int"):
        HistogramCalibrator(start_bin=-1)


def test_unknown_methods():
    with pytest.raises(ValueError, match="unknown calibration method 'kl'.*'max', 'moving_average', 'histogram', "
                                         "'percentile', 'mse', 'entropy'"):
        make_calibrator("kl")
    with pytest.raises(ValueError, match="unknown calibration method 'median'.*'max', 'percentile', 'mse', 'entropy'"):
        HistogramCalibrator(method="median")
    cal = HistogramCalibrator()
    cal.collect(torch.randn(100))
    with pytest.raises(ValueError, match="unknown calibration method 'l1'"):
        cal.compute_range("l1")
    with pytest.raises(TypeError, match=r"method 'percentile' takes \['percentile'\], got \['stride'\]"):
        cal.compute_range("percentile", stride=2)
    with pytest.raises(ValueError, match="percentile must be in"):
        cal.compute_range("percentile", percentile=101)
    maxcal = MaxCalibrator()
    maxcal.collect(torch.randn(4))
    with pytest.raises(TypeError, match="takes no arguments"):
        maxcal.compute_range(method="mse")


def test_merge_mismatched_settings():
    cases = [
        (MaxCalibrator(axis=0), MaxCalibrator(axis=1), "axis: 0 != 1"),
        (MaxCalibrator(), MaxCalibrator(num_bits=4), "num_bits: 8 != 4"),
        (HistogramCalibrator(num_bins=2048), HistogramCalibrator(num_bins=1024), "num_bins: 2048 != 1024"),
        (MovingAverageCalibrator(), MovingAverageCalibrator(momentum=0.1), "momentum: None != 0.1"),
        (HistogramCalibrator(), HistogramCalibrator(unsigned=True), "unsigned: False != True"),
    ]
    for a, b, diff in cases:
        b.collect(torch.randn(3, 4))
        with pytest.raises(ValueError, match=f"different settings \\({diff}\\)"):
            a.merge(b)
        assert a.num_batches == 0
    with pytest.raises(TypeError, match="cannot merge a HistogramCalibrator into a MaxCalibrator"):
        MaxCalibrator().merge(HistogramCalibrator())


def test_merge_mismatched_channel_counts():
    a, b = MaxCalibrator(axis=0), MaxCalibrator(axis=0)
    a.collect(torch.randn(3, 4))
    b.collect(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"shape \(3,\) with \(5,\)"):
        a.merge(b)
    assert a.num_batches == 1


def test_float64_beyond_float32_range():
    with pytest.raises(ValueError, match="exceeds the float32 range"):
        MaxCalibrator().collect(torch.tensor([1e300], dtype=torch.float64))


@every_calibrator
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_input_is_never_modified(build, dtype):
    x = (torch.randn(6, 5, 4) * 3).to(dtype)
    before = x.clone()
    cal = build()
    cal.collect(x)
    cal.collect(x)
    cal.compute_range()
    assert torch.equal(x, before)
    assert cal.num_samples == 2 * x.numel()
