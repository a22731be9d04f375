"""Bias correction: remove the expected output shift that weight quantization causes, either
analytically from BatchNorm statistics (no data) or measured on calibration data."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..nn.tensor_quantizer import TensorQuantizer
from .equalize import expected_output
from .pairs import find_pairs


def _relu_mean(mu: torch.Tensor, sigma: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """``E[max(y, floor)] − floor`` for ``y ~ N(mu, sigma²)`` (the clipped-normal mean)."""
    m = mu - floor
    sigma = sigma.clamp_min(1e-12)
    z = m / sigma
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return m * cdf + sigma * pdf


def activation_mean(mean: torch.Tensor, std: torch.Tensor, activation: str) -> torch.Tensor:
    """Per-channel ``E[act(y)]`` for a normal pre-activation ``y`` (``relu``, ``relu6``, ``identity``)."""
    if activation == "identity":
        return mean
    if activation == "relu":
        return _relu_mean(mean, std)
    if activation == "relu6":  # clip(y, 0, 6) = relu(y) − relu(y − 6)
        return _relu_mean(mean, std) - _relu_mean(mean, std, 6.0)
    raise ValueError(f"unknown activation {activation!r}")


def _weight_error(layer: nn.Module) -> torch.Tensor | None:
    wq = getattr(layer, "weight_quantizer", None)
    if not isinstance(wq, TensorQuantizer) or not wq.is_enabled:
        return None
    w = layer.weight.detach()
    return (wq(w) - w).double()


def _bias_of(layer: nn.Module) -> torch.Tensor:
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
    return layer.bias


@torch.no_grad()
def bias_correction(model: nn.Module, statistics: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Analytical bias correction on a simulated model, in place: for each weight-quantized layer
    fed (through ReLU / ReLU6 / identity) by a layer with BatchNorm ``statistics``, subtract
    ``E[ΔW x] = ΔW E[x]`` from its bias (``ΔW``: the weight quantization error, ``E[x]``: the
    clipped-normal mean of the activation). Layers fed by anything else are left alone."""
    rows = []
    pairs, _ = find_pairs(model)
    for p in pairs:
        if p.first not in statistics:
            continue
        layer = model.get_submodule(p.second)
        dw = _weight_error(layer)
        if dw is None:
            continue
        mean, std = statistics[p.first]
        shift = expected_output(layer, dw, activation_mean(mean, std, p.activation))
        bias = _bias_of(layer)
        bias.copy_((bias.double() - shift).to(bias.dtype))
        rows.append({"layer": p.second, "shift_max": round(float(shift.abs().max()), 6)})
    note = f"{len(rows)} layer(s) corrected" if rows else \
        "no weight-quantized layer is fed by a layer with BatchNorm statistics: nothing corrected"
    return {"algorithm": "bias_correction", "layers": rows, "note": note}


def _channel_mean(t: torch.Tensor, linear: bool) -> tuple[torch.Tensor, int]:
    t = t.double()
    if linear:
        flat = t.reshape(-1, t.shape[-1])
    else:
        flat = t.transpose(0, 1).reshape(t.shape[1], -1).T
    return flat.sum(dim=0), flat.shape[0]


@torch.no_grad()
def empirical_bias_correction(model: nn.Module, data: Iterable[Any], *, num_batches: int | None = None,
                              forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> dict:
    """Bias correction measured on data, in place, on a simulated (calibrated) model: for each
    weight-quantized conv/linear in turn (so that each sees the corrected layers before it), the
    mean per output channel of ``y(quantized weights) − y(float weights)`` on the inputs it gets
    in the simulated model over ``data`` (one pass per layer; a list, not a one-shot iterator),
    subtracted from its bias."""
    from ..transforms.calibrate import default_forward

    forward = forward_fn or default_forward
    batches = list(itertools.islice(data, num_batches)) if num_batches else list(data)
    if not batches:
        raise ValueError("empirical_bias_correction: the data produced no batch")
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and _weight_error(m) is not None]
    rows = []
    was_training = model.training
    model.eval()
    try:
        for name, layer in layers:
            shift = _measured_shift(model, layer, batches, forward)
            if shift is None:
                continue
            bias = _bias_of(layer)
            bias.copy_((bias.double() - shift).to(bias.dtype))
            rows.append({"layer": name, "shift_max": round(float(shift.abs().max()), 6)})
    finally:
        model.train(was_training)
    note = f"{len(rows)} layer(s) corrected on {len(batches)} batch(es)" if rows else "no weight-quantized layer"
    return {"algorithm": "empirical_bias_correction", "layers": rows, "batches": len(batches), "note": note}


def _measured_shift(model: nn.Module, layer: nn.Module, batches: list, forward: Callable) -> torch.Tensor | None:
    total: list[Any] = [0, 0]
    busy = [False]

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        if busy[0] or not isinstance(out, torch.Tensor):
            return
        busy[0] = True
        try:
            mod.weight_quantizer.disable()
            ref = mod(*args)
        finally:
            mod.weight_quantizer.enable()
            busy[0] = False
        s, n = _channel_mean(out - ref, isinstance(mod, nn.Linear))
        total[0], total[1] = total[0] + s, total[1] + n

    handle = layer.register_forward_hook(hook)
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        handle.remove()
    return None if total[1] == 0 else total[0] / total[1]


def run_analytical(model: nn.Module, ctx: Any) -> dict:
    """Pipeline entry (`pipeline.REGISTRY`): analytical bias correction from BatchNorm statistics."""
    return bias_correction(model, ctx.statistics)


def run_empirical(model: nn.Module, ctx: Any) -> dict:
    """Pipeline entry: bias correction measured on the calibration batches."""
    return empirical_bias_correction(model, ctx.data, num_batches=ctx.num_batches, forward_fn=ctx.forward_fn)
