"""`calibrate`: run data through a prepared model and fix its activation ranges."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..nn.tensor_quantizer import TensorQuantizer
from ..progress import Progress
from .distributed import DistributedCalibration


def calibration_targets(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """Enabled static quantizers whose range comes from data (not dynamic, not weights)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and m.is_enabled and m.spec.has_scale and not m.spec.dynamic
            and not m.track_tensor and m.desc.amax is None]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor → ``model(batch)``; a tuple/list → ``model(batch[0])`` (inputs, then targets);
    a mapping → ``model(**batch)``."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("calibration batch is an empty tuple/list")
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(f"cannot feed a calibration batch of type {type(batch).__name__}; "
                    "pass forward_fn=lambda model, batch: ... to say how")


def calibrate(model: nn.Module, data: Iterable[Any], method: str | None = None, *,
              num_batches: int | None = None, forward_fn: Callable[[nn.Module, Any], Any] | None = None,
              progress: bool = True, group: Any = None, dist_timeout: float = 120.0,
              **method_kwargs: Any) -> nn.Module:
    """Collect activation statistics over ``data`` and load each quantizer's range.

    ``data``: a DataLoader or any iterable of tensors, ``(inputs, targets)`` tuples or dicts
    of keyword arguments; ``forward_fn(model, batch)`` for anything else. ``method``
    overrides each quantizer's ``calib_method`` (``max``, ``moving_average``, ``percentile``,
    ``mse``, ``entropy``); ``method_kwargs`` reach the range computation (e.g.
    ``percentile=99.9``). The model runs in eval mode under ``torch.no_grad`` and gets its
    previous mode back. Returns the model (calibrated in place).

    Under ``torch.distributed`` (initialised), every rank calibrates on its shard and the
    statistics are merged across the ranks of ``group`` (default: the world), so every rank
    gets bit-identical ranges equal to one process on all the data (see
    `quanta.transforms.distributed`); ranks that disagree on the quantizers, or do not arrive
    within ``dist_timeout`` seconds, raise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate expects an nn.Module, got {type(model).__name__}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    targets = calibration_targets(model)
    if not targets:
        if not any(isinstance(m, TensorQuantizer) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} has no quantizers to calibrate: prepare it with "
                             "quanta.prepare() first")
        warnings.warn(f"quanta.calibrate: every quantizer of {type(model).__name__} is dynamic, fixed or a "
                      "weight quantizer: nothing needs calibration data", UserWarning, stacklevel=2)
        return model
    if isinstance(data, torch.Tensor):
        raise TypeError("data must be an iterable of batches (a DataLoader, a list of tensors); "
                        "wrap a single tensor as [tensor]")
    forward = forward_fn or default_forward
    was_training = model.training
    all_quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    saved = [(q, q._if_quant, q._if_calib) for q in all_quantizers]
    seen = 0
    sync: DistributedCalibration | None = None
    start = time.perf_counter()
    called: set[str] = set()
    owners = {name.rpartition(".")[0] for name, _ in targets}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: called.add(n))
             for n, m in model.named_modules() if n in owners]
    try:
        model.eval()
        for name, q in targets:
            q.name = name
            q.reset_calibrator()
            q.disable_quant()
            q.enable_calib(method)
        for q in all_quantizers:  # weights and dynamic quantizers pass through while calibrating
            if not any(q is t for _, t in targets):
                q.disable_quant()
        sync = DistributedCalibration.start(targets, group=group, timeout=dist_timeout)
        bar = Progress("calibrating", total=num_batches, unit="batch", enabled=progress)
        with torch.no_grad(), bar:
            for batch in data:
                forward(model, batch)
                seen += 1
                bar.update(1)
                if num_batches is not None and seen >= num_batches:
                    break  # before pulling another batch from the iterator
        if sync is not None:  # every rank now holds the statistics of all ranks' data
            seen_anywhere = sync.reduce(seen)
        if seen == 0 and (sync is None or seen_anywhere == 0):
            raise ValueError("calibration data is empty: no batch was produced")
        unseen = []
        for name, q in targets:
            if q.calibrator is None or q.calibrator.num_batches == 0:
                if name.rpartition(".")[0] not in called:  # e.g. key/value inputs of self-attention are unused
                    unseen.append(name)
                continue
            q.load_calib_amax(method, **method_kwargs)
        if unseen:
            warnings.warn(f"quanta.calibrate: {len(unseen)} quantizer(s) saw no data (their modules were "
                          f"not called): {', '.join(unseen[:8])}{' …' if len(unseen) > 8 else ''}",
                          UserWarning, stacklevel=2)
    finally:
        if sync is not None:
            sync.close()
        for h in hooks:
            h.remove()
        for q, if_quant, _ in saved:
            q._if_quant = if_quant
            q._if_calib = False
        model.train(was_training)
    model._quanta_calibration = {"batches": seen, "seconds": round(time.perf_counter() - start, 3),
                                 "method": method}
    return model
