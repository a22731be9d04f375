"""Per-quantizer choice of the calibration method (algorithm ``"best_calibration"``): for each
static per-tensor activation quantizer, in model order, the range from max / percentile / MSE /
entropy (one histogram collected per quantizer) that gives its module the smallest output error
against the module's float output on the calibration data, with every earlier choice in place.
A module of several inputs (a residual ``Add``: ``input`` and ``other``) is replayed on all of them,
its operand quantizers chosen one after the other."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..calib import HISTOGRAM_METHODS
from ..core.granularity import Granularity
from ..nn.tensor_quantizer import TensorQuantizer
from ..progress import Progress
from ..transforms.capture import CaptureError, capture_inputs
from .capture import quantizers_off

METHODS = HISTOGRAM_METHODS  # the range rules one histogram serves


def _owners(model: nn.Module, targets: list[tuple[str, TensorQuantizer]]) -> dict[str, list[tuple[str, TensorQuantizer]]]:
    """Quantizers grouped by the module that owns them (``a.b.input_quantizer`` → ``a.b``), in model order."""
    out: dict[str, list[tuple[str, TensorQuantizer]]] = {}
    for name, q in targets:
        out.setdefault(name.rpartition(".")[0], []).append((name, q))
    return out


@torch.no_grad()
def _module_output(module: nn.Module, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """``module(*xs)`` in chunks of 256 along the batch."""
    return [module(*chunk) for chunk in zip(*(x.split(256) for x in xs))]


@torch.no_grad()
def _module_error(module: nn.Module, xs: tuple[torch.Tensor, ...], target: list[torch.Tensor]) -> float:
    return sum(float((y - t).float().pow(2).sum()) for y, t in zip(_module_output(module, xs), target)) \
        / max(sum(t.numel() for t in target), 1)


def best_calibration(model: nn.Module, data: Iterable[Any], methods: tuple[str, ...] = METHODS, *,
                     num_batches: int | None = None, forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                     progress: bool = True) -> dict:
    """Choose, per activation quantizer of the simulated ``model``, the calibration method among
    ``methods`` with the smallest output error of its module, in place (one histogram pass over
    ``data``, then one capture pass per module). Quantizers that are per-channel or whose module
    cannot be captured keep their range and are listed under ``skipped``."""
    from ..transforms.calibrate import calibrate, calibration_targets, default_forward

    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ValueError(f"best_calibration: methods must be a non-empty subset of {METHODS}, got {methods!r}")
    forward = forward_fn or default_forward
    batches = list(itertools.islice(data, num_batches)) if num_batches else list(data)
    if not batches:
        raise ValueError("best_calibration: the data produced no batch")
    targets = calibration_targets(model)
    per_tensor = [(n, q) for n, q in targets if q.spec.granularity is Granularity.PER_TENSOR]
    skipped = [{"quantizer": n, "reason": f"{q.spec.granularity.value} (histogram methods are per-tensor)"}
               for n, q in targets if q.spec.granularity is not Granularity.PER_TENSOR]
    if not per_tensor:
        return {"algorithm": "best_calibration", "quantizers": [], "skipped": skipped,
                "note": "no static per-tensor activation quantizer: nothing chosen"}
    previous = {n: (q.amax, q.amin) for n, q in per_tensor}
    others = [q for n, q in targets if q.spec.granularity is not Granularity.PER_TENSOR]
    for q in others:  # keep their ranges: out of the histogram pass
        q.disable()
    try:
        calibrate(model, batches, "mse", forward_fn=forward, progress=False)  # histograms for every quantizer
    finally:
        for q in others:
            q.enable()
    rows = []
    was_training = model.training
    model.eval()
    try:
        groups = _owners(model, per_tensor)
        with Progress("choosing calibration methods", total=len(groups), unit="module", enabled=progress) as bar:
            for owner, quantizers in groups.items():
                module = model.get_submodule(owner)
                try:
                    xs = capture_inputs(model, module, batches, forward)
                except CaptureError as e:
                    for name, _q in quantizers:  # keep the histogram's MSE range calibrate loaded
                        skipped.append({"quantizer": name, "reason": f"its module: {e}"})
                    bar.update()
                    continue
                with quantizers_off(module), torch.no_grad():
                    target = _module_output(module, xs)
                for name, q in quantizers:
                    errors = {}
                    for method in methods:
                        q.load_calib_amax(method)
                        errors[method] = _module_error(module, xs, target)
                    best = min(errors, key=errors.__getitem__)
                    q.load_calib_amax(best)
                    rows.append({"quantizer": name, "method": best,
                                 "errors": {k: float(f"{v:.6g}") for k, v in errors.items()}})
                bar.update()
    except BaseException:
        for name, q in per_tensor:
            q.amax, q.amin = previous[name]
            q._cache = None
        raise
    finally:
        model.train(was_training)
    chosen = {m: sum(r["method"] == m for r in rows) for m in methods}
    return {"algorithm": "best_calibration", "quantizers": rows, "skipped": skipped,
            "note": f"{len(rows)} quantizer(s): " + ", ".join(f"{k} ×{v}" for k, v in chosen.items() if v)}


def run(model: nn.Module, ctx: Any) -> dict:
    """Pipeline entry (`pipeline.REGISTRY`)."""
    return best_calibration(model, ctx.data, num_batches=ctx.num_batches, forward_fn=ctx.forward_fn,
                            progress=ctx.progress)
