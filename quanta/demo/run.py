"""`quanta demo`: train small real models offline, quantize them with each preset, and print
one table of accuracy, size, latency and speedup measured on this machine."""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..integer import storage_bytes
from ..progress import Progress, echo
from ..transforms import conversion_report, quantize
from .data import digits, majority_tokens, sine_sequences
from .models import DigitsCNN, SequenceLSTM, TinyTransformer
from .train import accuracy, train_classifier


@dataclass(frozen=True)
class DemoRow:
    model: str
    preset: str
    accuracy: float
    delta: float
    size_bytes: int
    size_ratio: float
    latency_ms: float
    speedup: float
    integer_layers: str = ""  # "integer / lowerable" layers; the rest stayed float (slower in int8)


#: suffix of a plan entry that keeps every layer integer (no speed check)
ALL_INTEGER = " (all integer)"
#: (model name, presets) the demo runs; "fp32" is the float baseline. A preset runs with the
#: speed check (layers whose int8 kernel is slower than float on the test batch stay float);
#: ``ALL_INTEGER`` rows force every layer integer, to show what int8 itself costs and saves.
PLAN: dict[str, tuple[str, ...]] = {
    "DigitsCNN": ("fp32", "static_int8", "static_int8" + ALL_INTEGER),
    "SequenceLSTM": ("fp32", "dynamic_int8", "dynamic_int8" + ALL_INTEGER),
    "TinyTransformer": ("fp32", "dynamic_int8", "dynamic_int8" + ALL_INTEGER, "weight_only_int8", "weight_only_int4",
                        "w4a8", "fp16", "bf16"),
}


def _latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _tasks(quick: bool) -> dict[str, tuple[nn.Module, list[torch.Tensor], torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    cnn = train_classifier(DigitsCNN(), xtr, ytr, epochs=4 if quick else 8)
    xs, ys = sine_sequences(n=2000)
    lstm = train_classifier(SequenceLSTM(), xs[:1500], ys[:1500], epochs=6)
    xt, yt = majority_tokens(n=2000)
    torch.manual_seed(0)
    tf = train_classifier(TinyTransformer(), xt[:1500], yt[:1500], epochs=4 if quick else 8)
    return {
        "DigitsCNN": (cnn, list(xtr[:512].split(64)), xte, yte),
        "SequenceLSTM": (lstm, list(xs[:256].split(64)), xs[1500:], ys[1500:]),
        "TinyTransformer": (tf, list(xt[:256].split(64)), xt[1500:], yt[1500:]),
    }


def run_demo(quick: bool = False, log: Callable[[str], None] = echo, progress: bool = True) -> list[DemoRow]:
    """Train a CNN on scikit-learn's digits, an LSTM on generated sine sequences and a small
    transformer on a generated token task, then quantize each with the presets in `PLAN`.
    ``log`` receives one line per result; the progress bar (`quanta.progress`) is live on a
    terminal only."""
    threads = torch.get_num_threads()
    from ..kernels import native
    native.ensure()  # (says what it does when it has to build; silent when it loads)
    log(f"native CPU kernels: {native.status()}")
    log(f"training 3 small models offline (torch threads: {threads})")
    tasks = _tasks(quick)
    repeats = 5 if quick else 20
    rows: list[DemoRow] = []
    steps = sum(len(p) for p in PLAN.values())
    with Progress("quantizing", total=steps, unit="preset", enabled=progress, leave=False) as bar:
        for name, presets in PLAN.items():
            model, calib, x, y = tasks[name]
            base_acc, base_size = accuracy(model, x, y), storage_bytes(model)
            base_ms = _latency_ms(model, x, repeats)
            for preset in presets:
                # the speed check times layers on the evaluation batch: what this demo then runs
                q = model if preset == "fp32" else _quantize(model, preset, calib, x)
                acc = base_acc if preset == "fp32" else accuracy(q, x, y)
                ms = base_ms if preset == "fp32" else _latency_ms(q, x, repeats)
                size = storage_bytes(q)
                layers = "" if preset == "fp32" else _integer_layers(q)
                rows.append(DemoRow(name, preset, acc, acc - base_acc, size, size / base_size, ms, base_ms / ms,
                                    layers))
                bar.update(1)
                log(f"  {name:<16} {preset:<31} acc {acc:6.2f}% ({acc - base_acc:+.2f})  "
                    f"size {size / 1024:7.1f} KiB ({size / base_size:.2f}x)  {ms:7.2f} ms ({base_ms / ms:.2f}x)"
                    + (f"  integer layers {layers}" if layers else ""))
    return rows


def _quantize(model: nn.Module, preset: str, calib: list[torch.Tensor], x: torch.Tensor) -> Any:
    all_integer = preset.endswith(ALL_INTEGER)
    preset = preset.removesuffix(ALL_INTEGER)
    options = {"group_size": 32} if preset == "weight_only_int4" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize(model, preset, calib, progress=False, example=x, speed_check=not all_integer, **options)


def _integer_layers(model: nn.Module) -> str:
    report = conversion_report(model)
    lowered = [r for r in report if r.result != "simulated"]
    return f"{sum(r.result != 'float' for r in lowered)}/{len(lowered)}"


def format_table(rows: list[DemoRow]) -> str:
    lines = ["| model | preset | accuracy % | Δ vs fp32 | size KiB | size vs fp32 | latency ms | speedup "
             "| integer layers |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.model} | {r.preset} | {r.accuracy:.2f} | {r.delta:+.2f} | {r.size_bytes / 1024:.1f} | "
              f"{r.size_ratio:.2f}x | {r.latency_ms:.2f} | {r.speedup:.2f}x | {r.integer_layers or '—'} |"
              for r in rows]
    return "\n".join(lines)
