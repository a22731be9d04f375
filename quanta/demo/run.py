"""`quanta demo`: train small real models offline, quantize them several ways, print a table."""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..nn import LayerQuantConfig, QuantDescriptor
from ..transforms import QuantConfig, calibrate, coverage, prepare
from .data import digits, sine_sequences
from .models import DigitsCNN, SequenceLSTM
from .train import accuracy, train_classifier


@dataclass(frozen=True)
class DemoRow:
    model: str
    scheme: str
    accuracy: float
    delta: float
    weight_bits: int
    seconds: float


def schemes() -> dict[str, QuantConfig | None]:
    """The quantization schemes the demo compares (None = the float model)."""
    w8 = QuantDescriptor(per_channel=True, narrow_range=True)
    return {
        "fp32": None,
        "int8 static (w per-channel, a per-tensor)": QuantConfig(fold_bn=True),
        "int8 w / int8 a, percentile calib": QuantConfig(
            fold_bn=True, default=LayerQuantConfig(input=QuantDescriptor(calib_method="percentile"), weight=w8)),
        "int4 w per-channel / int8 a": QuantConfig(
            fold_bn=True, default=LayerQuantConfig(weight=QuantDescriptor(num_bits=4, per_channel=True))),
        "int8 w / dynamic per-tensor a": QuantConfig(
            fold_bn=True, default=LayerQuantConfig(input=QuantDescriptor(dynamic=True), weight=w8)),
        "int4 w+a per-tensor (too coarse)": QuantConfig(
            fold_bn=True, default=LayerQuantConfig(input=QuantDescriptor(num_bits=4), weight=QuantDescriptor(num_bits=4))),
    }


def _weight_bits(cfg: QuantConfig | None) -> int:
    if cfg is None or cfg.default.weight is None:
        return 32
    return cfg.default.weight.num_bits


def _evaluate(name: str, model: nn.Module, calib: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              log: Callable[[str], None], progress: bool) -> list[DemoRow]:
    rows: list[DemoRow] = []
    base = accuracy(model, x, y)
    for scheme, cfg in schemes().items():
        start = time.perf_counter()
        if cfg is None:
            acc = base
        else:
            sim = prepare(model, cfg)
            with warnings.catch_warnings():  # the dynamic scheme has nothing to calibrate
                warnings.simplefilter("ignore")
                calibrate(sim, calib, progress=progress)
            acc = accuracy(sim, x, y)
        rows.append(DemoRow(name, scheme, acc, acc - base, _weight_bits(cfg), time.perf_counter() - start))
        log(f"  {name:<12} {scheme:<44} {acc:6.2f}%  ({acc - base:+.2f})")
    return rows


def run_demo(quick: bool = False, log: Callable[[str], None] = print, progress: bool | None = None) -> list[DemoRow]:
    """Train a CNN on scikit-learn's digits and an LSTM on a generated task, then compare
    quantization schemes in simulation. ``quick`` trains shorter (for CI)."""
    progress = sys.stderr.isatty() if progress is None else progress
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    log(f"training DigitsCNN on scikit-learn digits ({len(ytr)} train / {len(yte)} test images)")
    cnn = train_classifier(DigitsCNN(), xtr, ytr, epochs=3 if quick else 8)
    rows = _evaluate("DigitsCNN", cnn, list(xtr[:512].split(64)), xte, yte, log, progress)
    log("\ncoverage of the int8 static CNN:")
    log(str(coverage(prepare(cnn, QuantConfig(fold_bn=True)))))
    xs, ys = sine_sequences(n=2000)
    split = int(0.75 * len(ys))
    log(f"\ntraining SequenceLSTM on generated sine sequences ({split} train)")
    lstm = train_classifier(SequenceLSTM(), xs[:split], ys[:split], epochs=6)
    rows += _evaluate("SequenceLSTM", lstm, list(xs[:256].split(64)), xs[split:], ys[split:], log, progress)
    return rows


def format_table(rows: list[DemoRow]) -> str:
    lines = ["| model | scheme | weight bits | accuracy % | Δ vs fp32 |", "|---|---|---|---|---|"]
    lines += [f"| {r.model} | {r.scheme} | {r.weight_bits} | {r.accuracy:.2f} | {r.delta:+.2f} |" for r in rows]
    return "\n".join(lines)
