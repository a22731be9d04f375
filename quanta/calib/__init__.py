"""Calibrators: see tensors, propose clipping ranges; every state is mergeable.

Example::

    cal = make_calibrator("percentile", percentile=99.9, name="fc1.input")
    cal.collect(torch.randn(64, 128))
    lo, hi = cal.compute_range()          # 0-d float32 tensors
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import Calibrator
from .histogram import METHODS as HISTOGRAM_METHODS
from .histogram import HistogramCalibrator
from .max_calibrator import MaxCalibrator
from .moving_average import MovingAverageCalibrator


def _histogram_with(method: str) -> Callable[..., Calibrator]:
    def build(**kwargs: Any) -> Calibrator:
        if "method" in kwargs:
            raise ValueError(f"make_calibrator({method!r}) fixes method={method!r}; use 'histogram' to pass one")
        return HistogramCalibrator(method=method, **kwargs)

    return build


@dataclass(frozen=True)
class CalibrationMethod:
    """One calibration method name: how its calibrator is built and what that calibrator collects.

    Methods with the same ``statistics`` can share one calibrator (one histogram serves
    ``"percentile"``, ``"mse"`` and ``"entropy"``). ``range_rule`` is False for ``"histogram"``,
    whose name collects statistics but leaves the range rule to its ``method`` argument."""

    name: str
    build: Callable[..., Calibrator]
    statistics: str  # "max", "moving_average" or "histogram"
    range_rule: bool = True


#: the calibrator registry: every calibration method name quanta accepts, in the order it lists them
CALIBRATORS: dict[str, CalibrationMethod] = {m.name: m for m in (
    CalibrationMethod("max", MaxCalibrator, "max"),
    CalibrationMethod("moving_average", MovingAverageCalibrator, "moving_average"),
    CalibrationMethod("histogram", HistogramCalibrator, "histogram", range_rule=False),
    *(CalibrationMethod(name, _histogram_with(name), "histogram") for name in HISTOGRAM_METHODS if name != "max"),
)}
#: every method name (`QuantDescriptor.calib_method`, `quanta.calibrate(method=...)`)
CALIBRATION_METHODS = tuple(CALIBRATORS)
#: the names that choose a range rule (what ``quanta quantize --calib-method`` offers)
RANGE_METHODS = tuple(name for name, m in CALIBRATORS.items() if m.range_rule)


def statistics_of(method: str) -> str:
    """What the calibrator of ``method`` collects (an unknown name is its own kind)."""
    return CALIBRATORS[method].statistics if method in CALIBRATORS else method


def make_calibrator(method: str, /, **kwargs: Any) -> Calibrator:
    """Build a calibrator by method name, passing ``kwargs`` to its constructor.

    ``"max"`` → `MaxCalibrator`, ``"moving_average"`` → `MovingAverageCalibrator`,
    ``"histogram"`` → `HistogramCalibrator`; ``"percentile"``, ``"mse"``, ``"entropy"`` →
    a `HistogramCalibrator` whose ``compute_range()`` uses that method by default (its
    parameters, e.g. ``percentile=99.9``, may be given here).
    """
    if method not in CALIBRATORS:
        raise ValueError(
            f"unknown calibration method {method!r}; choose one of {', '.join(map(repr, CALIBRATION_METHODS))}"
        )
    return CALIBRATORS[method].build(**kwargs)


__all__ = [
    "CALIBRATION_METHODS",
    "CALIBRATORS",
    "HISTOGRAM_METHODS",
    "RANGE_METHODS",
    "CalibrationMethod",
    "Calibrator",
    "HistogramCalibrator",
    "MaxCalibrator",
    "MovingAverageCalibrator",
    "make_calibrator",
    "statistics_of",
]
