"""`quanta demo`: train real models on real data once (cached), quantize each with the methods
below, and print one table of accuracy, file size, latency, speed-up, logits SQNR and integer
layers, measured on this machine (also as Markdown with the date and the machine).

Tasks: a CNN on scikit-learn's 8×8 digits; a 2-layer, 256-wide transformer classifying which
standard-library module a docstring line comes from; a CNN on Fashion-MNIST where the Debian
package ``dataset-fashion-mnist`` is installed. Every method forces every quantizable layer
integer (``speed_check=False``), so the table shows what int8 / int4 itself costs and saves on
this CPU — where a kernel is slower than float here, the table says so."""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..progress import Progress, echo
from ..transforms import conversion_report, quantize
from ..transforms import preset as make_preset
from .cache import load_or_train
from .data import digits, fashion_mnist, stdlib_docstrings
from .models import DigitsCNN, DocstringTransformer
from .table import DemoRow, format_table, kept_float_notes, machine_line
from .train import accuracy, train_classifier

#: method label → (preset, its options); every label but "fp32" is one `quanta.quantize` call
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "static_int8": ("static_int8", {}),
    "static_int8 + cle, bias_correction": ("static_int8", {"algorithms": ["cle", "bias_correction"]}),
    # 7-bit weight codes keep oneDNN's u8 x s8 sums exact on CPUs without VNNI (no int16 pair saturation)
    "static_int8, 7-bit weights": ("static_int8", {"weight_bits": 7}),
    "dynamic_int8": ("dynamic_int8", {}),
    "weight_only_int4": ("weight_only_int4", {"group_size": 32}),
}
CNN_METHODS = ("fp32", "static_int8", "static_int8 + cle, bias_correction", "static_int8, 7-bit weights",
               "dynamic_int8", "weight_only_int4")
TEXT_METHODS = ("fp32", "static_int8", "static_int8, 7-bit weights", "dynamic_int8", "weight_only_int4")
BATCH = 64  # the batch every latency is measured on


@dataclass
class Task:
    name: str
    model: nn.Module
    calib: list[torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    methods: tuple[str, ...]
    weights: str  # "trained" or "cached"


@dataclass
class DemoReport:
    rows: list[DemoRow]
    machine: str
    rounds: int
    skipped: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        return format_table(self.rows, self.machine, self.rounds)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, init: dict[str, Any], recipe: dict[str, Any],
           label: str, log: Callable[[str], None], progress: bool, cache_dir: Path | None) -> tuple[nn.Module, str]:
    def train(m: nn.Module) -> nn.Module:
        with Progress(f"training {label}", total=recipe["epochs"], unit="pass", enabled=progress) as bar:
            return train_classifier(m, x, y, on_epoch=lambda _: bar.update(), **recipe)
    model, cached = load_or_train(model, init, (x, y), recipe, train, log, cache_dir)
    if cached:
        log(f"{label}: trained weights from the cache")
    return model, "cached" if cached else "trained"


def _tasks(quick: bool, log: Callable[[str], None], progress: bool, cache_dir: Path | None,
           skipped: list[str]) -> list[Task]:
    tasks = []
    xtr, ytr, xte, yte = digits()
    recipe = {"epochs": 3 if quick else 8, "lr": 3e-3, "seed": 0}
    torch.manual_seed(0)  # (initial weights: the cache key holds the seed, not the weights)
    cnn, w = _train(DigitsCNN(16), xtr, ytr, {"width": 16}, recipe, "DigitsCNN on digits", log, progress, cache_dir)
    tasks.append(Task("DigitsCNN on digits", cnn, list(xtr[:512].split(64)), xte, yte, CNN_METHODS, w))

    x, y, names = stdlib_docstrings(per_class=60 if quick else 300)
    n = int(0.8 * len(y))
    init = ({"vocab": 4096, "classes": len(names), "dim": 64, "layers": 1, "heads": 4, "length": 32} if quick else
            {"vocab": 4096, "classes": len(names), "dim": 256, "layers": 2, "heads": 4, "length": 32})
    recipe = {"epochs": 2 if quick else 3, "lr": 1e-3, "batch_size": 32, "seed": 0}
    label = f"DocstringTransformer ({init['layers']}×{init['dim']}) on stdlib docstrings"
    torch.manual_seed(0)
    tf, w = _train(DocstringTransformer(**init), x[:n], y[:n], init, recipe, label, log, progress, cache_dir)
    tasks.append(Task(label, tf, list(x[:256].split(64)), x[n:], y[n:], TEXT_METHODS, w))

    fashion = None if quick else fashion_mnist()
    if fashion is None:
        skipped.append("Fashion-MNIST" + (" (quick mode)" if quick else
                                          ": not installed (apt-get install dataset-fashion-mnist)"))
    else:
        fxtr, fytr, fxte, fyte = fashion
        recipe = {"epochs": 2, "lr": 3e-3, "seed": 0}
        torch.manual_seed(0)
        fcnn, w = _train(DigitsCNN(16), fxtr, fytr, {"width": 16}, recipe, "DigitsCNN on Fashion-MNIST", log,
                         progress, cache_dir)
        tasks.append(Task("DigitsCNN on Fashion-MNIST", fcnn, list(fxtr[:512].split(64)), fxte[:2000], fyte[:2000],
                          CNN_METHODS, w))
    return tasks


def _quantize(model: nn.Module, method: str, calib: list[torch.Tensor], progress: bool) -> nn.Module:
    name, options = METHODS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize(model, make_preset(name, **options), calib, progress=progress, speed_check=False)


def _integer_layers(model: nn.Module) -> str:
    lowered = [r for r in conversion_report(model) if r.result != "simulated"]
    return f"{sum(r.result != 'float' for r in lowered)}/{len(lowered)}"


def _kernels(model: nn.Module) -> str:
    """What the integer modules ran, summed over the model (``"onednn×4, reference×1"``)."""
    from collections import Counter

    from ..integer.base import IntegerModule

    total: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, IntegerModule):
            total.update({k: 1 for k in m.kernel_counts})  # (per layer: which kernel, not how often)
    return ", ".join(f"{k}×{v}" for k, v in total.most_common())


def _file_bytes(model: nn.Module) -> int:
    from ..io import save

    with tempfile.TemporaryDirectory() as d:
        path = save(model, Path(d) / "model.safetensors")
        return path.stat().st_size


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """10·log10(‖reference‖² / ‖reference − other‖²); ``inf`` when they are equal."""
    noise = float((reference.float() - other.float()).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(reference.float().pow(2).sum()) / noise)


def interleaved_ms(models: dict[str, nn.Module], x: torch.Tensor, rounds: int,
                   progress: bool = False) -> dict[str, list[float]]:
    """Milliseconds of one forward of each model on ``x``, ``rounds`` times, the models
    alternating within each round (so that a slow moment of the machine hits all alike)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode(), Progress("timing", total=rounds, unit="round", enabled=progress) as bar:
        for m in models.values():
            m(x)  # warm-up: first-call settling and allocations
        for _ in range(rounds):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                times[k].append(1000 * (time.perf_counter() - t))
            bar.update()
    return times


def run_demo(quick: bool = False, log: Callable[[str], None] = echo, progress: bool = True,
             cache_dir: Path | None = None, rounds: int | None = None) -> DemoReport:
    """Train (or load from the cache) each task's model, quantize it with its methods, and
    measure. ``rounds``: interleaved timing rounds (default 7, 3 with ``quick``)."""
    from ..kernels import native

    rounds = rounds if rounds is not None else (3 if quick else 7)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int of at least 1, got {rounds!r}")
    native.ensure()  # (says what it does when it has to build; silent when it loads)
    machine = machine_line(native.status())
    log(f"machine: {machine}")
    skipped: list[str] = []
    tasks = _tasks(quick, log, progress, cache_dir, skipped)
    for s in skipped:
        log(f"skipped {s}")
    rows: list[DemoRow] = []
    for task in tasks:
        models = {m: task.model if m == "fp32" else _quantize(task.model, m, task.calib, progress)
                  for m in task.methods}
        with torch.inference_mode():
            logits = {m: torch.cat([q(xb) for xb in task.x.split(256)]) for m, q in models.items()}
        times = interleaved_ms(models, task.x[:BATCH], rounds, progress)
        base_acc = _acc(logits["fp32"], task.y)
        base_ms = statistics.median(times["fp32"])
        for m, q in models.items():
            acc, ms = _acc(logits[m], task.y), statistics.median(times[m])
            row = DemoRow(task.name, m, acc, acc - base_acc, _file_bytes(q), ms, (min(times[m]), max(times[m])),
                          base_ms / ms, sqnr_db(logits["fp32"], logits[m]),
                          "" if m == "fp32" else _integer_layers(q), task.weights,
                          "" if m == "fp32" else _kernels(q), () if m == "fp32" else kept_float_notes(q))
            rows.append(row)
            log(f"  {task.name:<44} {m:<36} acc {acc:6.2f}% ({acc - base_acc:+.2f})  "
                f"file {row.file_bytes / 1024:8.1f} KiB  {ms:8.2f} ms ({row.speedup:.2f}x)")
            for note in row.kept_float:
                log(f"    kept float: {note}")
    return DemoReport(rows, machine, rounds, skipped)


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(-1) == y).float().mean())


__all__ = ["METHODS", "DemoReport", "DemoRow", "accuracy", "format_table", "interleaved_ms", "run_demo", "sqnr_db"]
