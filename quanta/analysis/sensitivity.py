"""`sensitivity`: which layers cost accuracy when quantized, by trial, with a suggested fix.

The model is prepared with the config and calibrated once; each trial then switches quantizers
of that one simulated model (`quanta.analysis.toggles`) and measures ``metric(model)`` (higher is
better; default: the SQNR in dB of the model's output against the float model's on ``data``):

- ``mode="one_at_a_time"``: only the layer's quantizers on; its *damage* is the float model's
  metric minus the trial's (where that is infinite, as for the SQNR proxy, the damage is
  ``-metric``: minus the SQNR the layer alone leaves);
- ``mode="all_but_one"``: every layer's quantizers on but this layer's; its damage is what keeping
  it float gains over the fully quantized model.

``what``: ``"weights"`` or ``"activations"`` (only those quantizers), or ``"both"`` (the layer's
ranking trial with all its quantizers, plus one trial each for weights and activations alone,
which the suggestions use). A layer *damages* when its damage exceeds ``tolerance`` (default:
0.01 for a user metric; for the SQNR proxy, an SQNR under 20 dB one at a time or a 3 dB gain
all but one). Suggestions, first rule that applies:

1. no trial damages → ``none needed``;
2. weights damage with per-tensor weight scales → ``per-channel weights``;
3. weights damage with fewer than 8 bits → ``8-bit weights``;
4. activations alone damage (not weights) with a ``max`` calibrated input range → ``percentile
   or mse calibration``; with fewer than 8 bits → ``8-bit activations``;
5. otherwise → ``keep float`` (``quanta.quantize(..., exclude=[name])``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core import Granularity
from ..transforms.calibrate import calibrate, calibration_targets
from ..transforms.config import QuantConfig
from ..transforms.prepare import check_float_model, prepare
from ..transforms.presets import preset
from .capture import ForwardFn, batches_of, capture_outputs
from .metrics import ErrorStats
from .toggles import check_what, quant_layers, quantizing_only

MODES = ("one_at_a_time", "all_but_one")
PROXY_MIN_SQNR_DB = 20.0
PROXY_MIN_GAIN_DB = 3.0


@dataclass(frozen=True)
class SensitivityRow:
    layer: str
    kind: str  # class of the simulated layer
    metric: float  # the ranking trial's metric (``what`` quantizers of this layer, per ``mode``)
    damage: float  # see the module docstring; larger is worse
    metric_weights: float | None = None  # what="both": weights alone
    metric_activations: float | None = None  # what="both": activations alone
    suggestion: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SensitivityReport:
    mode: str
    what: str
    metric_name: str
    float_metric: float
    quantized_metric: float  # every layer quantized (per ``what``)
    rows: list[SensitivityRow] = field(default_factory=list)  # most damaging first

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "what": self.what, "metric_name": self.metric_name, "float_metric": self.float_metric,
                "quantized_metric": self.quantized_metric, "rows": [r.to_dict() for r in self.rows]}

    def __str__(self) -> str:
        def f(v: float | None) -> str:
            return "-" if v is None else (f"{v:.4g}" if math.isfinite(v) else str(v))
        head = ["layer", "kind", self.metric_name, "damage", "weights only", "activations only", "suggestion"]
        lines = [head] + [[r.layer, r.kind, f(r.metric), f(r.damage), f(r.metric_weights), f(r.metric_activations),
                           r.suggestion] for r in self.rows]
        widths = [max(len(c[i]) for c in lines) for i in range(len(head))]
        out = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in lines]
        out.insert(1, "-" * len(out[0]))
        return (f"sensitivity ({self.mode}, {self.what}): {self.metric_name} float {f(self.float_metric)}, "
                f"all quantized {f(self.quantized_metric)}\n" + "\n".join(out))


def _metric_value(value: Any, trial: str, who: str = "sensitivity") -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: the metric returned {type(value).__name__} in trial {trial!r}; it must "
                        "return a number (higher is better)")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{who}: the metric returned NaN in trial {trial!r}")
    return value


def _proxy(float_model: nn.Module, batches: list[Any], forward_fn: ForwardFn | None) -> Callable[[nn.Module], float]:
    reference = capture_outputs(float_model, batches, [], forward_fn=forward_fn).final

    def output_sqnr_db(model: nn.Module) -> float:
        stats = ErrorStats()
        for ref, got in zip(reference, capture_outputs(model, batches, [], forward_fn=forward_fn).final):
            stats.add(ref, got)
        return stats.sqnr_db
    return output_sqnr_db


def _suggest(layer: nn.Module, damaging: Callable[[float | None], bool], row: SensitivityRow, what: str) -> str:
    if not damaging(row.damage):
        return "none needed"
    quantizers = dict(layer.quantizers())
    wq, iq = quantizers.get("weight"), quantizers.get("input")
    w_bad = damaging(row.metric_weights) if what == "both" else what == "weights"
    a_bad = damaging(row.metric_activations) if what == "both" else what == "activations"
    if w_bad and wq is not None:
        if wq.spec.granularity is Granularity.PER_TENSOR:
            return "per-channel weights"
        if wq.spec.bits < 8:
            return f"8-bit weights (now {wq.spec.bits})"
    if a_bad and not w_bad and iq is not None:
        if iq.desc.calib_method == "max" and not iq.spec.dynamic:
            return "percentile or mse calibration"
        if iq.spec.bits < 8:
            return f"8-bit activations (now {iq.spec.bits})"
    return "keep float"


def sensitivity(float_model: nn.Module, config: QuantConfig | str, data: Any,
                metric: Callable[[nn.Module], Any] | None = None, *, mode: str = "one_at_a_time",
                what: str = "both", calib_data: Any = None, forward_fn: ForwardFn | None = None,
                tolerance: float | None = None) -> SensitivityReport:
    """Rank the layers ``config`` (a `QuantConfig` or a preset name) quantizes in ``float_model``
    by the damage their quantization does to ``metric`` (see the module docstring). ``data``:
    batches for the default metric and for calibration (unless ``calib_data`` is given).
    ``float_model`` is not modified."""
    check_float_model(float_model, "sensitivity")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_what(what)
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be a callable(model) -> float, got {type(metric).__name__}")
    if isinstance(config, str):
        config = preset(config)
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig or a preset name, got {type(config).__name__}")
    batches = batches_of(data)
    sim = prepare(float_model, config)
    if calibration_targets(sim):
        calibrate(sim, batches if calib_data is None else calib_data, forward_fn=forward_fn, progress=False)
    layers = quant_layers(sim)
    if not layers:
        raise ValueError(f"the config quantizes no layer of {type(float_model).__name__}: nothing to rank")
    measure = metric or _proxy(float_model, batches, forward_fn)
    name = getattr(metric, "__name__", "metric") if metric is not None else "output SQNR dB"

    def trial(label: str, on: list[str], kinds: str) -> float:
        with quantizing_only(sim, on, kinds):
            return _metric_value(measure(sim), label)

    float_metric = trial("float (no quantizer)", [], "both")
    full = trial(f"all layers ({what})", list(layers), what)
    if mode == "one_at_a_time":
        ref = float_metric
        def damage(m: float) -> float:
            return ref - m if math.isfinite(ref) else -m
    else:
        def damage(m: float) -> float:
            return m - full
    if tolerance is not None:
        limit = tolerance
    elif metric is not None:
        limit = 0.01
    else:
        limit = -PROXY_MIN_SQNR_DB if mode == "one_at_a_time" else PROXY_MIN_GAIN_DB

    def damaging(d: float | None) -> bool:
        return d is not None and d > limit

    rows = []
    for lname, layer in layers.items():
        def on(kinds: str, lname: str = lname) -> float:
            chosen = [lname] if mode == "one_at_a_time" else [n for n in layers if n != lname]
            return trial(f"{lname} ({mode}, {kinds})", chosen, kinds)
        main = on(what)
        alone = {k: on(k) for k in ("weights", "activations")} if what == "both" else {}
        row = SensitivityRow(lname, type(layer).__name__, main, damage(main),
                             alone.get("weights"), alone.get("activations"))
        d_w = damage(alone["weights"]) if alone else None
        d_a = damage(alone["activations"]) if alone else None
        probe = SensitivityRow(lname, row.kind, main, row.damage, d_w, d_a)
        rows.append(SensitivityRow(**{**row.to_dict(), "suggestion": _suggest(layer, damaging, probe, what)}))
    rows.sort(key=lambda r: -r.damage)
    return SensitivityReport(mode, what, name, float_metric, full, rows)
