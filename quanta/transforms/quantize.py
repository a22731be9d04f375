"""`quantize`: prepare → calibrate → convert in one call."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..algorithms.pipeline import AlgorithmContext, needs_data, run_stage
from ..nn import LayerQuantConfig
from .calibrate import calibrate, calibration_targets
from .config import QuantConfig
from .convert import convert
from .float_dtype import check_float_dtype, run_float_work_in
from .prepare import check_float_model, prepare
from .presets import COVERS, PRESETS, preset, quantizes_any


def quantize(model: nn.Module, config: QuantConfig | str = "dynamic_int8", calib_data: Iterable[Any] | None = None,
             *, backend: str = "auto", group_size: int | None = None, method: str | None = None,
             num_batches: int | None = None, forward_fn: Callable[[nn.Module, Any], Any] | None = None,
             progress: bool = True, speed_check: bool = True, example: Any = None,
             exclude: Iterable[str] | str | None = None,
             rules: Mapping[str, LayerQuantConfig | None] | None = None,
             algorithms: Iterable[str] | str | None = None,
             algorithm_options: Mapping[str, Mapping[str, Any]] | None = None,
             float_dtype: torch.dtype | None = None) -> nn.Module:
    """Return an integer copy of ``model`` (the float model is not modified).

    ``config``: a `QuantConfig` or a preset name: ``dynamic_int8``, ``static_int8``,
    ``weight_only_int8``, ``weight_only_int4`` (``group_size`` 32/64/128/256), ``w4a8``,
    ``fp16``, ``bf16``. Static activations need ``calib_data`` (see `quanta.calibrate`).

    ``exclude`` (module names or globs that stay float) and ``rules`` (name or glob →
    `LayerQuantConfig`, or ``None`` for float) refine a preset or a `QuantConfig`; they win over
    its own choices. A layer whose shape the config cannot take stays float (see `quanta.prepare`)
    and the conversion report says why. ``algorithms`` (names in `quanta.algorithms.ALGORITHMS`:
    ``"cle"``, ``"high_bias_absorption"``, ``"smoothquant"``, ``"awq"``, ``"bias_correction"``,
    ``"best_calibration"``, ``"adaround"``, ``"gptq"``, ``"empirical_bias_correction"``) run in the
    pipeline, with ``algorithm_options`` (``{"adaround": {"iterations": 500}}``) over the config's own.

    Speed check (see `quanta.convert`): layers whose integer kernel is slower than float on
    ``example`` (one batch of real inputs; default: the first batch of ``calib_data``, for any
    preset) stay float, and `quanta.conversion_report` says so. Without either, or with
    ``speed_check=False``, every lowerable layer becomes integer.

    ``float_dtype=torch.bfloat16``: the float work between the integer layers (LayerNorm,
    attention, GELU, residual additions, layers kept float) runs in bfloat16, and so do the
    model's inputs and outputs (`quanta.transforms.float_dtype`; fast only on CPUs with native
    bfloat16, logged otherwise).
    """
    check_float_model(model, "quantize")
    if float_dtype is not None:
        float_dtype = check_float_dtype(float_dtype)
    refine = {k: v for k, v in (("exclude", exclude), ("rules", rules), ("algorithms", algorithms),
                                ("algorithm_options", algorithm_options)) if v is not None}
    name = config if isinstance(config, str) else None
    if isinstance(config, str):
        config = preset(config, **({} if group_size is None else {"group_size": group_size}), **refine)
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig or a preset name, got {type(config).__name__}")
    else:
        if group_size is not None:
            raise ValueError("group_size applies to the 'weight_only_int4' preset, not to a QuantConfig")
        config = config.extended(**refine) if refine else config
    was_training = model.training
    if config.fold_bn and was_training:
        config = dataclasses.replace(config, fold_bn=False)
        warnings.warn("quanta.quantize: the model is in training mode, so BatchNorm is not folded; "
                      "call model.eval() first for an inference model", UserWarning, stacklevel=2)
    if not quantizes_any(model, config):
        _nothing_covered(model, None if set(refine) - {"algorithms", "algorithm_options"} else name)
    first = None
    if calib_data is not None:
        if isinstance(calib_data, torch.Tensor):
            raise TypeError("calib_data must be an iterable of batches (a DataLoader, a list of tensors); "
                            "wrap a single tensor as [tensor]")
        batches = iter(calib_data)
        first = next(batches, None)
        if first is None:
            raise ValueError("calib_data is empty: no batch was produced")
        calib_data = itertools.chain([first], batches)  # one pass, even over a one-shot iterator
        if needs_data(config.algorithms):  # more passes over the batches
            calib_data = list(itertools.islice(calib_data, num_batches)) if num_batches else list(calib_data)
    sim = prepare(model, config, calib_data=calib_data if needs_data(config.algorithms) else None,
                  num_batches=num_batches, forward_fn=forward_fn, progress=progress)
    if calibration_targets(sim):
        if calib_data is None:
            raise ValueError("this configuration quantizes activations statically: pass calib_data "
                             "(a DataLoader or a list of batches) to calibrate their ranges")
        calibrate(sim, calib_data, method, num_batches=num_batches, forward_fn=forward_fn, progress=progress)
    run_stage(sim, "calibrated", config.algorithms,
              AlgorithmContext(config=config, data=calib_data if needs_data(config.algorithms) else None, num_batches=num_batches,
                               forward_fn=forward_fn, progress=progress), config.algorithm_options)
    converted = convert(sim, backend=backend, inplace=True, example=first if example is None else example,
                        forward_fn=forward_fn, speed_check=speed_check)
    return converted if float_dtype is None else run_float_work_in(converted, float_dtype)


def _nothing_covered(model: nn.Module, name: str | None) -> None:
    """Raise: the config (preset ``name``, unrefined, or any other) quantizes no module of
    ``model``; say what the preset covers and which presets would quantize something."""
    layers = Counter(type(m).__name__ for m in model.modules() if not any(True for _ in m.children()))
    listed = ", ".join(f"{k}×{v}" for k, v in layers.most_common(5)) or "none"
    others = [p for p in PRESETS if p != name and quantizes_any(model, preset(p))] if name else []
    what = (f"preset {name!r} quantizes {COVERS[name]}, and {type(model).__name__} has none of them"
            if name in COVERS else f"the configuration quantizes no module of {type(model).__name__}")
    use = f"; use {' or '.join(map(repr, others))}" if others else \
        ("" if name in COVERS else "; check its exclude / rules / module_types")
    raise ValueError(f"{what} (its layers: {listed}){use}")
