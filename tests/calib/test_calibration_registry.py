"""One calibrator registry (`quanta.calib.CALIBRATORS`): every place that lists calibration
method names reads it, and each name builds a calibrator collecting what the registry says."""

from __future__ import annotations

import inspect

import pytest
import torch

from quanta import calib
from quanta.algorithms import best_calibration
from quanta.calib import (
    CALIBRATION_METHODS,
    CALIBRATORS,
    HISTOGRAM_METHODS,
    RANGE_METHODS,
    make_calibrator,
)
from quanta.cli import build_parser
from quanta.nn import QuantDescriptor, TensorQuantizer

STATISTICS = {"max": calib.MaxCalibrator, "moving_average": calib.MovingAverageCalibrator,
              "histogram": calib.HistogramCalibrator}


@pytest.mark.parametrize("name", CALIBRATION_METHODS)
def test_each_name_builds_the_calibrator_of_its_statistics(name):
    cal = make_calibrator(name)
    assert type(cal) is STATISTICS[CALIBRATORS[name].statistics]
    cal.collect(torch.linspace(-3, 2, 1000))
    _, hi = cal.compute_range()
    assert 0 < float(hi) <= 3


def test_every_list_of_method_names_is_the_registry():
    assert CALIBRATION_METHODS == ("max", "moving_average", "histogram", "percentile", "mse", "entropy")
    assert RANGE_METHODS == tuple(m for m in CALIBRATION_METHODS if m != "histogram")
    assert HISTOGRAM_METHODS == ("max", "percentile", "mse", "entropy")
    for name in CALIBRATION_METHODS:
        assert QuantDescriptor(calib_method=name).calib_method == name
    with pytest.raises(ValueError, match="unknown 'median'; choose one of"):
        QuantDescriptor(calib_method="median")
    option = next(a for a in build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
                  if a.dest == "calib_method")
    assert tuple(option.choices) == RANGE_METHODS
    assert inspect.signature(best_calibration).parameters["methods"].default == HISTOGRAM_METHODS


@pytest.mark.parametrize("first, then", [("percentile", "entropy"), ("mse", "histogram"), ("max", "moving_average")])
def test_a_quantizer_keeps_its_calibrator_only_for_the_same_statistics(first, then):
    q = TensorQuantizer(QuantDescriptor())
    q.enable_calib(first)
    before = q.calibrator
    q.enable_calib(then)
    same = CALIBRATORS[first].statistics == CALIBRATORS[then].statistics
    assert (q.calibrator is before) == same
