"""What the data-driven algorithms need around a capture: the calibration batches read and
checked once (`calibration_batches`), and the float model seen through the simulated one
(`quantizers_off`). The capture itself is `quanta.transforms.capture.capture_layer`, the one
hook utility quanta's passes and analyses share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..nn.tensor_quantizer import TensorQuantizer


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Every enabled `TensorQuantizer` of ``model`` disabled for the block (the float model),
    restored in ``finally``."""
    turned = [q for q in model.modules() if isinstance(q, TensorQuantizer) and q.is_enabled]
    for q in turned:
        q.disable()
    try:
        yield
    finally:
        for q in turned:
            q.enable()


def batch_size(batch: Any) -> int:
    """Samples in one calibration batch (a tensor, a tuple/list led by the inputs, or a mapping
    whose first tensor value is an input)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return batch_size(v)
    return 1


def calibration_batches(algorithm: str, data: Any, options: Any, options_cls: type,
                        num_batches: int | None) -> tuple[Any, list, int]:
    """``(options, batches, samples)`` for a data-driven algorithm: ``options`` checked to be an
    ``options_cls`` (defaults when None), ``data`` read once into a list (the first ``num_batches``),
    and a ``ValueError`` naming the numbers when it holds fewer than ``options.min_samples`` samples."""
    import itertools

    opt = options_cls() if options is None else options
    if not isinstance(opt, options_cls):
        raise TypeError(f"{algorithm}: options must be {options_cls.__name__}(...), got {type(opt).__name__}")
    batches = list(itertools.islice(data, num_batches)) if num_batches else list(data)
    samples = sum(batch_size(b) for b in batches)
    if samples < opt.min_samples:
        raise ValueError(f"{algorithm} needs at least {opt.min_samples} calibration samples, got {samples}: "
                         f"pass more calib_data (or lower {options_cls.__name__}.min_samples)")
    return opt, batches, samples

