"""The algorithms `QuantConfig(algorithms=...)` names, where in the pipeline each runs, and the
record of what they changed (kept on the model, written by `quanta.save`)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

#: attribute of a prepared / converted model's root: one record (a JSON-able dict) per algorithm run
ALGORITHMS_ATTR = "_quanta_algorithms"

#: every name `QuantConfig.algorithms` accepts, in the order the pipeline runs them
DATA_FREE = ("cle", "high_bias_absorption", "bias_correction")
WITH_DATA = ("best_calibration", "adaround", "empirical_bias_correction")
ALGORITHMS = DATA_FREE + WITH_DATA


def check_algorithms(names: Any) -> tuple[str, ...]:
    """``names`` as a tuple, validated: known names (a typo gets the close ones), no repeats."""
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise TypeError("QuantConfig.algorithms must be a tuple of algorithm names")
    for n in names:
        if n not in ALGORITHMS:
            close = [a for a in ALGORITHMS if n.lower().startswith(a) or a.startswith(n.lower())]
            close += [a for a in difflib.get_close_matches(n, ALGORITHMS, n=2, cutoff=0.5) if a not in close]
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"QuantConfig.algorithms: unknown algorithm {n!r} (known: {', '.join(ALGORITHMS)}){hint}")
    if len(set(names)) != len(names):
        raise ValueError(f"QuantConfig.algorithms: {sorted(n for n in set(names) if names.count(n) > 1)} repeated")
    if "bias_correction" in names and "empirical_bias_correction" in names:
        raise ValueError("QuantConfig.algorithms: choose one of 'bias_correction' (from BatchNorm statistics) "
                         "and 'empirical_bias_correction' (measured on calibration data)")
    return tuple(names)


def _record(model: nn.Module, row: dict) -> None:
    records = list(getattr(model, ALGORITHMS_ATTR, []))
    records.append(row)
    setattr(model, ALGORITHMS_ATTR, records)


def before_quantizers(model: nn.Module, names: tuple[str, ...], fold: Callable[[nn.Module], Any] | None) -> dict:
    """Fold BatchNorm with ``fold`` (reading its statistics first; ``None``: no folding, no
    statistics) and run CLE / high-bias absorption on the float ``model`` in place. Returns the
    statistics for `after_quantizers`."""
    from .equalize import absorb_high_bias, cross_layer_equalization
    from .pairs import batchnorm_statistics, bn_pairs

    statistics = {}
    if fold is not None:
        statistics = batchnorm_statistics(model, bn_pairs(model))
        fold(model)
    if "cle" in names:
        _record(model, cross_layer_equalization(model, statistics=statistics))
    if "high_bias_absorption" in names:
        _record(model, absorb_high_bias(model, statistics))
    return statistics


def after_quantizers(model: nn.Module, names: tuple[str, ...], statistics: dict) -> None:
    """Analytical bias correction on the simulated ``model`` (its weight quantizers in place)."""
    from .bias_correction import bias_correction

    if "bias_correction" in names:
        _record(model, bias_correction(model, statistics))


def after_calibration(model: nn.Module, names: tuple[str, ...], data: Iterable[Any] | None, **kwargs: Any) -> None:
    """Per-quantizer calibration method, AdaRound, then empirical bias correction, on the
    calibrated simulated ``model`` (each needs ``data``: a list of batches, reused)."""
    from .adaround import adaround
    from .best_calibration import best_calibration
    from .bias_correction import empirical_bias_correction

    for name in (n for n in WITH_DATA if n in names):
        if data is None:
            raise ValueError(f"QuantConfig.algorithms {name!r} needs calibration data: pass calib_data")
    progress = kwargs.pop("progress", True)
    if "best_calibration" in names:
        _record(model, best_calibration(model, data, progress=progress, **kwargs))
    if "adaround" in names:
        _record(model, adaround(model, data, progress=progress, **kwargs))
    if "empirical_bias_correction" in names:
        _record(model, empirical_bias_correction(model, data, **kwargs))
