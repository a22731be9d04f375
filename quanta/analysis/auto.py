"""`auto_quantize`: choose per layer among candidate quantizations (presets, a `LayerQuantConfig`
or ``"float"``) to meet an accuracy budget at the lowest measured cost.

The search is greedy and time-boxed; every trial is an ordinary `quanta.quantize` call with a
`QuantConfig` whose per-name ``rules`` hold the layer choices, measured by ``metric`` (higher is
better) and by its cost:

1. every layer starts at its first applicable candidate (``candidates`` go from the most
   compressed to the most accurate; a preset applies to a layer when it quantizes it);
2. if that trial misses the budget, `quanta.sensitivity` (one at a time, on that starting
   config, with the same metric) ranks the layers by damage;
3. the most damaging layer not yet at its last candidate is promoted to its next one, and the
   model is quantized and measured again, until a trial meets the budget, no layer can be
   promoted, or the next trial would overrun ``time_budget_s``.

The budget: with a user ``metric``, ``float_metric - metric <= max_drop``; without one the
metric is the SQNR (dB) of the model's output against the float model's on ``data``, and the
budget is ``metric >= min_sqnr_db``. The cost: ``objective="size"``: `quanta.storage_bytes` of
the integer model; ``"latency"``: the model's measured time per batch on this machine (converted
with the speed check, whose per-layer timings are cached per machine) or ``latency_fn(model,
batch) -> seconds``. The result is the cheapest trial that met the budget (else the last one).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..integer.base import storage_bytes
from ..nn import LayerQuantConfig, lookup
from ..transforms.config import QuantConfig
from ..transforms.prepare import check_float_model
from ..transforms.presets import PRESETS, preset
from ..transforms.quantize import quantize
from .capture import ForwardFn, batches_of
from .sensitivity import _metric_value, _proxy, sensitivity

FLOAT = "float"
OBJECTIVES = ("latency", "size")
DEFAULT_CANDIDATES = ("static_int8", FLOAT)
DEFAULT_MIN_SQNR_DB = 30.0


@dataclass(frozen=True)
class Trial:
    index: int
    choices: dict[str, str]  # layer → candidate label
    metric: float
    cost: float  # bytes or seconds per batch (``AutoQuantResult.objective``)
    met: bool
    seconds: float  # how long the trial took
    note: str = ""  # why this trial (start, promotion)


@dataclass
class AutoQuantResult:
    config: QuantConfig
    model: nn.Module  # the integer model of the chosen trial
    choices: dict[str, str]
    objective: str
    metric_name: str
    float_metric: float
    budget: str  # the condition, in words
    met: bool
    trials: list[Trial] = field(default_factory=list)
    stopped: str = ""  # why the search stopped

    def __str__(self) -> str:
        unit = "bytes" if self.objective == "size" else "ms/batch"
        def cost(t: Trial) -> str:
            return f"{t.cost:.0f}" if self.objective == "size" else f"{t.cost * 1e3:.3f}"
        lines = [(f"auto_quantize ({self.objective}): {self.metric_name} float {self.float_metric:.4g}, budget "
                  f"{self.budget}; {'met' if self.met else 'NOT met'}; stopped: {self.stopped}"),
                 f"{'trial':<6}{self.metric_name[:14]:>15}{unit:>14}  met  note"]
        for t in self.trials:
            lines.append(f"{t.index:<6}{t.metric:>15.4g}{cost(t):>14}  {'yes' if t.met else 'no ':<3}  {t.note}")
        lines.append("chosen: " + ", ".join(f"{n}={c}" for n, c in self.choices.items()))
        return "\n".join(lines)


def _candidate_table(candidates: Sequence[Any]) -> list[tuple[str, QuantConfig | LayerQuantConfig | None]]:
    if isinstance(candidates, str) or not isinstance(candidates, Sequence) or not candidates:
        raise TypeError("candidates must be a non-empty list of preset names, LayerQuantConfig or 'float'")
    table: list[tuple[str, QuantConfig | LayerQuantConfig | None]] = []
    for i, c in enumerate(candidates):
        if c == FLOAT:
            table.append((FLOAT, None))
        elif isinstance(c, str):
            if c not in PRESETS:
                preset(c)  # raises naming the closest presets
            table.append((c, preset(c)))
        elif isinstance(c, LayerQuantConfig):
            table.append((f"custom{i}", c))
        else:
            raise TypeError(f"candidates[{i}] must be a preset name, a LayerQuantConfig or 'float', got "
                            f"{type(c).__name__}")
    return table


def _layer_config(cand: QuantConfig | LayerQuantConfig | None, name: str, module: nn.Module) -> LayerQuantConfig | None:
    if isinstance(cand, QuantConfig):
        return cand.decide(name, module).config
    return cand


def _options(model: nn.Module, table: list[tuple[str, Any]]) -> dict[str, list[tuple[str, LayerQuantConfig | None]]]:
    """Per quantizable layer, the candidates that apply to it (in order); ``float`` always applies."""
    options = {}
    for name, mod in model.named_modules():
        if not name or lookup(mod) is None:
            continue
        opts = []
        for label, cand in table:
            if label == FLOAT:
                opts.append((label, None))
                continue
            cfg = _layer_config(cand, name, mod)
            if cfg is not None and (cfg.weight is not None or cfg.input is not None) and _fits(mod, cfg):
                opts.append((label, cfg))
        if any(label != FLOAT for label, _ in opts):
            options[name] = opts
    return options


def _fits(module: nn.Module, cfg: LayerQuantConfig) -> bool:
    """Whether ``cfg`` can quantize ``module``'s shapes (``group_size 128`` does not divide a
    32-wide layer): what `prepare` would refuse for a rule naming the layer. ``module`` is not
    changed (the quantized module built to check shares its parameters)."""
    try:
        lookup(module).from_float(module, cfg)
    except (ValueError, TypeError):
        return False
    return True


def _config(base: QuantConfig, options: dict[str, list[tuple[str, Any]]], level: dict[str, int]) -> QuantConfig:
    return base.extended(rules={n: options[n][level[n]][1] for n in options})


def _measure_latency(model: nn.Module, batch: Any, forward_fn: ForwardFn | None) -> float:
    from ..transforms.calibrate import default_forward

    run = forward_fn or default_forward
    with torch.no_grad():
        run(model, batch)  # warm-up
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            run(model, batch)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def auto_quantize(model: nn.Module, data: Any, metric: Callable[[nn.Module], Any] | None = None, *,
                  max_drop: float | None = None, min_sqnr_db: float = DEFAULT_MIN_SQNR_DB,
                  candidates: Sequence[Any] = DEFAULT_CANDIDATES, objective: str = "latency",
                  time_budget_s: float = 600.0, calib_data: Any = None, forward_fn: ForwardFn | None = None,
                  latency_fn: Callable[[nn.Module, Any], float] | None = None) -> AutoQuantResult:
    """Pick per layer of ``model`` one of ``candidates`` to meet the accuracy budget at the lowest
    measured cost (see the module docstring). ``data``: batches for the default metric, the
    latency measurement and (unless ``calib_data`` is given) calibration. ``model`` is not
    modified."""
    check_float_model(model, "auto_quantize")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be a callable(model) -> float, got {type(metric).__name__}")
    if metric is not None and (max_drop is None or isinstance(max_drop, bool) or not isinstance(max_drop, (int, float))
                               or not max_drop >= 0):
        raise ValueError(f"max_drop must be a number >= 0 with a user metric (the largest drop allowed), got {max_drop!r}")
    if isinstance(time_budget_s, bool) or not isinstance(time_budget_s, (int, float)) or not time_budget_s > 0:
        raise ValueError(f"time_budget_s must be a positive number of seconds, got {time_budget_s!r}")
    table = _candidate_table(candidates)
    batches = batches_of(data)
    calib = batches if calib_data is None else calib_data
    options = _options(model, table)
    if not options:
        raise ValueError(f"no candidate in {[label for label, _ in table]} quantizes any layer of {type(model).__name__}")
    base = next((c for _, c in table if isinstance(c, QuantConfig)), None) or QuantConfig(fold_bn=True)
    measure = metric or _proxy(model, batches, forward_fn)
    name = getattr(metric, "__name__", "metric") if metric is not None else "output SQNR dB"
    float_metric = _metric_value(measure(model), "float model", "auto_quantize") if metric is not None else math.inf
    if metric is not None:
        budget, meets = f"drop <= {max_drop:g}", (lambda m: float_metric - m <= max_drop)
    else:
        budget, meets = f">= {min_sqnr_db:g} dB", (lambda m: m >= min_sqnr_db)
    speed_check = objective == "latency" and latency_fn is None
    started = time.perf_counter()
    trials: list[Trial] = []
    models: list[tuple[QuantConfig, nn.Module]] = []

    def run_trial(level: dict[str, int], note: str) -> Trial:
        t0 = time.perf_counter()
        config = _config(base, options, level)
        qmodel = quantize(model, config, calib, forward_fn=forward_fn, progress=False, speed_check=speed_check,
                          example=batches[0])
        choices = {n: options[n][level[n]][0] for n in options}
        label = f"{len(trials)} ({note})"
        value = _metric_value(measure(qmodel), label, "auto_quantize")
        if objective == "size":
            cost = float(storage_bytes(qmodel))
        else:
            cost = float(latency_fn(qmodel, batches[0]) if latency_fn else _measure_latency(qmodel, batches[0], forward_fn))
        trial = Trial(len(trials), choices, value, cost, meets(value), time.perf_counter() - t0, note)
        trials.append(trial)
        models.append((config, qmodel))
        return trial

    level = {n: 0 for n in options}
    first = run_trial(level, "start: first applicable candidate per layer")
    if first.seconds > time_budget_s:
        raise ValueError(f"time_budget_s={time_budget_s:g} is too small for one trial: the first took "
                         f"{first.seconds:.2f} s")
    stopped = "the first trial met the budget"
    if not first.met:
        ranking = sensitivity(model, _config(base, options, level), batches, metric, what="both",
                              calib_data=calib_data, forward_fn=forward_fn)
        order = [r.layer for r in ranking.rows if r.layer in options]
        order += [n for n in options if n not in order]
        stopped = "every layer is at its last candidate"
        while True:
            promotable = [n for n in order if level[n] + 1 < len(options[n])]
            if not promotable:
                break
            if time.perf_counter() - started + trials[-1].seconds > time_budget_s:
                stopped = f"time budget ({time_budget_s:g} s) spent"
                break
            layer = promotable[0]
            level[layer] += 1
            if run_trial(dict(level), f"promote {layer} to {options[layer][level[layer]][0]}").met:
                stopped = "a trial met the budget"
                break
    met = [t for t in trials if t.met]
    best = min(met, key=lambda t: t.cost) if met else trials[-1]
    config, qmodel = models[best.index]
    return AutoQuantResult(config, qmodel, dict(best.choices), objective, name, float_metric, budget, bool(met),
                           trials, stopped)
