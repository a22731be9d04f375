"""Minimal activation capture for the layer-wise algorithms: one layer's inputs or outputs over
calibration batches, in the simulated model as it is or with every quantizer off (the float
model). Algorithms sit below `quanta.analysis`, so this is their own small copy of the idea."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


class CaptureError(ValueError):
    """A layer's calls cannot be captured (not called, called with several or keyword inputs)."""


@torch.no_grad()
def capture(model: nn.Module, layer: nn.Module, batches: list, forward: Callable[[nn.Module, Any], Any],
            what: str) -> torch.Tensor:
    """``layer``'s first positional input (``what="input"``) or its output (``"output"``) on every
    call while ``forward(model, batch)`` runs over ``batches``, concatenated along dim 0."""
    if what not in ("input", "output"):
        raise ValueError(f"capture: what must be 'input' or 'output', got {what!r}")
    seen: list[torch.Tensor] = []
    problem: list[str] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            problem.append("it is called with other than one tensor input and one tensor output")
            return
        seen.append((args[0] if what == "input" else out).detach().clone())

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        handle.remove()
    if problem:
        raise CaptureError(problem[0])
    if not seen:
        raise CaptureError("the calibration data never reaches it")
    if len({t.shape[1:] for t in seen}) != 1:
        raise CaptureError("its inputs change shape between calls")
    return torch.cat(seen)


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

