"""Calibrators: see tensors, propose clipping ranges; every state is mergeable.

Example::

    cal = make_calibrator("percentile", percentile=99.9, name="fc1.input")
    cal.collect(torch.randn(64, 128))
    lo, hi = cal.compute_range()          # 0-d float32 tensors
"""

from __future__ import annotations

from typing import Any, Callable

from .base import Calibrator
from .histogram import METHODS as HISTOGRAM_METHODS
from .histogram import HistogramCalibrator
from .max_calibrator import MaxCalibrator
from .moving_average import MovingAverageCalibrator

CALIBRATION_METHODS = ("max", "moving_average", "histogram", "percentile", "mse", "entropy")


def _histogram_with(method: str) -> Callable[..., Calibrator]:
    def build(**kwargs: Any) -> Calibrator:
        if "method" in kwargs:
            raise ValueError(f"make_calibrator({method!r}) fixes method={method!r}; use 'histogram' to pass one")
        return HistogramCalibrator(method=method, **kwargs)

    return build


_BUILDERS: dict[str, Callable[..., Calibrator]] = {
    "max": MaxCalibrator,
    "moving_average": MovingAverageCalibrator,
    "histogram": HistogramCalibrator,
    "percentile": _histogram_with("percentile"),
    "mse": _histogram_with("mse"),
    "entropy": _histogram_with("entropy"),
}


def make_calibrator(method: str, /, **kwargs: Any) -> Calibrator:
    """Build a calibrator by method name, passing ``kwargs`` to its constructor.

    ``"max"`` → `MaxCalibrator`, ``"moving_average"`` → `MovingAverageCalibrator`,
    ``"histogram"`` → `HistogramCalibrator`; ``"percentile"``, ``"mse"``, ``"entropy"`` →
    a `HistogramCalibrator` whose ``compute_range()`` uses that method by default (its
    parameters, e.g. ``percentile=99.9``, may be given here).
    """
    if method not in _BUILDERS:
        raise ValueError(
            f"unknown calibration method {method!r}; choose one of {', '.join(map(repr, CALIBRATION_METHODS))}"
        )
    return _BUILDERS[method](**kwargs)


__all__ = [
    "CALIBRATION_METHODS",
    "HISTOGRAM_METHODS",
    "Calibrator",
    "HistogramCalibrator",
    "MaxCalibrator",
    "MovingAverageCalibrator",
    "make_calibrator",
]
