"""The algorithms `QuantConfig(algorithms=...)` names: one registry saying where in the pipeline
each runs, whether it needs calibration data and which options it takes; and the record of what
they changed (kept on the model, written by `quanta.save`).

Stages, in pipeline order (`quanta.prepare` runs the first two, `quanta.quantize` the third after
calibrating; within a stage, registry order):

- ``float``: on the float model after BatchNorm folding (statistics read first), before any
  quantizer exists: equalization, scale migration (it may change the float function only by
  rescalings that are exact in float).
- ``simulated``: the quantizers are in place, activations not yet calibrated.
- ``calibrated``: after calibration: rounding and range choices measured on data.

To add one: write ``run(model, ctx) -> dict`` (the record: ``{"algorithm": name, ..., "note": ...}``)
in its own module, optionally a frozen dataclass of options validated in ``__post_init__``, and add
an `Algorithm` row to `REGISTRY`."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

#: attribute of a prepared / converted model's root: one record (a JSON-able dict) per algorithm run
ALGORITHMS_ATTR = "_quanta_algorithms"

STAGES = ("float", "simulated", "calibrated")


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One registered algorithm. ``run`` and ``options`` are ``"module:attribute"`` paths under
    `quanta.algorithms`, imported when used (so the registry imports nothing heavy)."""

    name: str
    stage: str
    run: str  # run(model, ctx: AlgorithmContext) -> dict
    needs_data: bool = False
    options: str | None = None  # a frozen dataclass; QuantConfig.algorithm_options[name] holds its fields
    summary: str = ""

    def load(self, attr: str) -> Any:
        module, _, obj = attr.partition(":")
        return getattr(importlib.import_module(f"quanta.algorithms.{module}"), obj)


@dataclasses.dataclass
class AlgorithmContext:
    """What an algorithm's ``run`` gets besides the model."""

    options: Any = None  # its options dataclass (defaults when the config names none)
    config: Any = None  # the QuantConfig being applied (what each layer's quantizers will be: config.decide)
    statistics: dict = dataclasses.field(default_factory=dict)  # BatchNorm (mean, std) per folded layer
    data: list | None = None  # calibration batches (a list, reusable), None if the stage has none
    num_batches: int | None = None
    forward_fn: Callable[[nn.Module, Any], Any] | None = None
    progress: bool = True


REGISTRY: tuple[Algorithm, ...] = (
    Algorithm("cle", "float", "equalize:run_cle",
              summary="cross-layer equalization of conv/linear pairs through ReLU/ReLU6/identity"),
    Algorithm("high_bias_absorption", "float", "equalize:run_absorption",
              summary="moves the always-positive part of a ReLU layer's bias into the next layer"),
    Algorithm("smoothquant", "float", "smoothquant:run", needs_data=True, options="smoothquant:SmoothQuantOptions",
              summary="W8A8: activation outliers migrated into the weights of Linears fed by a norm"),
    Algorithm("awq", "float", "awq:run", needs_data=True, options="awq:AWQOptions",
              summary="weight-only int4: activation-aware per-channel weight scaling, folded into the norm"),
    Algorithm("bias_correction", "simulated", "bias_correction:run_analytical",
              summary="bias shift from weight quantization, from BatchNorm statistics"),
    Algorithm("best_calibration", "calibrated", "best_calibration:run", needs_data=True,
              summary="per-quantizer calibration method chosen by its module's output error"),
    Algorithm("adaround", "calibrated", "adaround:run", needs_data=True, options="adaround:AdaRoundOptions",
              summary="learned rounding of weights, layer by layer"),
    Algorithm("gptq", "calibrated", "gptq:run", needs_data=True, options="gptq:GPTQOptions",
              summary="error-compensating rounding of Linear / Conv1D weights (GPTQ), group by group of layers"),
    Algorithm("empirical_bias_correction", "calibrated", "bias_correction:run_empirical", needs_data=True,
              summary="bias shift from weight quantization, measured on calibration data"),
)
BY_NAME: dict[str, Algorithm] = {a.name: a for a in REGISTRY}
#: every name `QuantConfig.algorithms` accepts, in the order the pipeline runs them
ALGORITHMS = tuple(a.name for s in STAGES for a in REGISTRY if a.stage == s)
#: pairs that must not be combined, with why
EXCLUSIVE = ((("bias_correction", "empirical_bias_correction"),
              ("choose one of 'bias_correction' (from BatchNorm statistics) and 'empirical_bias_correction' "
               "(measured on calibration data)")),
             (("adaround", "gptq"), "choose one of 'adaround' and 'gptq': both learn the weights' rounding"))


def check_algorithms(names: Any) -> tuple[str, ...]:
    """``names`` as a tuple, validated: known names (a typo gets the close ones), no repeats."""
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise TypeError("QuantConfig.algorithms must be a tuple of algorithm names")
    for n in names:
        if n not in BY_NAME:
            close = [a for a in ALGORITHMS if n.lower().startswith(a) or a.startswith(n.lower())]
            close += [a for a in difflib.get_close_matches(n, ALGORITHMS, n=2, cutoff=0.5) if a not in close]
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"QuantConfig.algorithms: unknown algorithm {n!r} (known: {', '.join(ALGORITHMS)}){hint}")
    if len(set(names)) != len(names):
        raise ValueError(f"QuantConfig.algorithms: {sorted(n for n in set(names) if names.count(n) > 1)} repeated")
    for pair, why in EXCLUSIVE:
        if all(p in names for p in pair):
            raise ValueError(f"QuantConfig.algorithms: {why}")
    return tuple(names)


def check_options(options: Any, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``QuantConfig.algorithm_options`` validated: each key an algorithm that ``names`` runs and that
    takes options, each value a mapping its options dataclass accepts (built once here to check)."""
    if not isinstance(options, Mapping):
        raise TypeError(f"QuantConfig.algorithm_options must be a mapping of algorithm name to options, "
                        f"got {type(options).__name__}")
    out = {}
    for name, fields in options.items():
        if name not in BY_NAME:
            raise ValueError(f"QuantConfig.algorithm_options: unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})")
        if name not in names:
            raise ValueError(f"QuantConfig.algorithm_options: options for {name!r}, which algorithms does not run "
                             f"(add it to QuantConfig.algorithms)")
        algo = BY_NAME[name]
        if algo.options is None:
            raise ValueError(f"QuantConfig.algorithm_options: {name!r} takes no options")
        if not isinstance(fields, Mapping):
            raise TypeError(f"QuantConfig.algorithm_options[{name!r}] must be a mapping of option to value, "
                            f"got {type(fields).__name__}")
        build_options(algo, fields)
        out[name] = dict(fields)
    return out


def build_options(algo: Algorithm, fields: Mapping[str, Any] | None) -> Any:
    """The options dataclass of ``algo`` from ``fields`` (defaults where absent); a bad field raises
    ``ValueError`` naming the algorithm and the fields it takes."""
    if algo.options is None:
        return None
    cls = algo.load(algo.options)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields or {}) - set(known))
    if unknown:
        raise ValueError(f"QuantConfig.algorithm_options[{algo.name!r}]: unknown option(s) {unknown} "
                         f"(it takes {', '.join(known)})")
    return cls(**(fields or {}))


def needs_data(names: tuple[str, ...], stage: str | None = None) -> tuple[str, ...]:
    """The names among ``names`` (at ``stage``, or any) that need calibration data."""
    return tuple(n for n in names if BY_NAME[n].needs_data and stage in (None, BY_NAME[n].stage))


def at_stage(names: tuple[str, ...], stage: str) -> tuple[str, ...]:
    """The names among ``names`` that run at ``stage``, in pipeline order."""
    return tuple(n for n in ALGORITHMS if n in names and BY_NAME[n].stage == stage)


def _record(model: nn.Module, row: dict) -> None:
    records = list(getattr(model, ALGORITHMS_ATTR, []))
    records.append(row)
    setattr(model, ALGORITHMS_ATTR, records)


def run_stage(model: nn.Module, stage: str, names: tuple[str, ...], ctx: AlgorithmContext,
              options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Run, in place, the algorithms of ``names`` that belong to ``stage`` and record each."""
    for name in at_stage(names, stage):
        algo = BY_NAME[name]
        if algo.needs_data and ctx.data is None:
            raise ValueError(f"QuantConfig.algorithms {name!r} needs calibration data: pass calib_data")
        step = dataclasses.replace(ctx, options=build_options(algo, (options or {}).get(name)))
        _record(model, algo.load(algo.run)(model, step))


def before_quantizers(model: nn.Module, names: tuple[str, ...], fold: Callable[[nn.Module], Any] | None,
                      ctx: AlgorithmContext | None = None,
                      options: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """Fold BatchNorm with ``fold`` (reading its statistics first; ``None``: no folding, no
    statistics) and run the ``float``-stage algorithms on the float ``model`` in place. Returns the
    statistics for the ``simulated`` stage."""
    from .pairs import batchnorm_statistics, bn_pairs

    ctx = AlgorithmContext() if ctx is None else ctx
    statistics = {}
    if fold is not None:
        statistics = batchnorm_statistics(model, bn_pairs(model))
        fold(model)
    run_stage(model, "float", names, dataclasses.replace(ctx, statistics=statistics), options)
    return statistics
