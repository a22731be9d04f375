"""The one way quanta watches a model's layers while it runs (forward hooks).

`hooked` calls ``on_call(name, module, args, kwargs, output)`` on every call of the named modules
(before the call with ``before=True``: ``output`` is None) and removes its hooks in ``finally``;
`evaluating` runs a block with the model in eval mode and restores every module's own train flag
in ``finally``. The captures quanta's passes share are built on these two:

- `capture_layer`: one layer's input or its output over calibration batches, concatenated (the
  layer-wise algorithms: AdaRound); `capture_inputs`: all its inputs (best calibration, which
  also chooses the ranges of a residual addition's two operands);
- `first_calls`: each module's first call arguments on one batch (the speed check replays them);
- `quanta.analysis.capture_outputs`: every named module's outputs per call, for comparisons.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .calibrate import default_forward

#: ``forward(model, batch)``: how one batch is fed to the model (`default_forward` when None)
ForwardFn = Callable[[nn.Module, Any], Any]
#: ``on_call(name, module, args, kwargs, output)``; ``output`` is None for a call not made yet
OnCall = Callable[[str, nn.Module, tuple, dict, Any], None]


class CaptureError(ValueError):
    """A layer's calls cannot be captured (not called, called with keyword or non-tensor inputs, ...)."""


@contextlib.contextmanager
def hooked(modules: Mapping[str, nn.Module], on_call: OnCall, *, before: bool = False) -> Iterator[None]:
    """``on_call`` hooked on every module of ``modules`` (name → module) for the block: after each
    call (``before=False``) or before it; the hooks are removed in ``finally``, whatever the block
    raises. ``on_call`` only records: what it returns is ignored (it never replaces an input or an
    output)."""
    handles = []

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            on_call(name, mod, args, kwargs, None)
        return hook

    def post_hook(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            on_call(name, mod, args, kwargs, out)
        return hook

    try:
        for name, mod in modules.items():
            if before:
                handles.append(mod.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(post_hook(name), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout off, batch norm on running statistics) for the block, each
    module's own ``training`` flag restored in ``finally``."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _calls(model: nn.Module, layer: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn | None,
           what: str, span_batch: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """Per call of ``layer`` while ``forward_fn(model, batch)`` runs over ``batches`` (eval mode, no
    gradients): its positional inputs (``what="inputs"``) or ``(output,)`` (``"output"``), copied.
    Every call must take positional tensors only and return one tensor (with ``span_batch``, each
    input as long in dim 0 as the output)."""
    forward = forward_fn or default_forward
    seen: list[tuple[torch.Tensor, ...]] = []
    problem: list[str] = []

    def record(name: str, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if not args or kwargs or not all(isinstance(a, torch.Tensor) for a in args) or not isinstance(out, torch.Tensor):
            problem.append("it is called with keyword or non-tensor inputs or gives a non-tensor output")
            return
        if span_batch and any(t.dim() == 0 or out.dim() == 0 or t.shape[0] != out.shape[0] for t in args):
            problem.append("its inputs do not all span the batch (dim 0) of its output")
            return
        seen.append(tuple(t.detach().clone() for t in (args if what == "inputs" else (out,))))

    with hooked({"layer": layer}, record), evaluating(model), torch.no_grad():
        for batch in batches:
            forward(model, batch)
    if problem:
        raise CaptureError(problem[0])
    if not seen:
        raise CaptureError("the calibration data never reaches it")
    return seen


def _concatenated(calls: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    if len({len(c) for c in calls}) != 1:
        raise CaptureError("it is called with different numbers of inputs")
    for position in zip(*calls):
        if len({t.shape[1:] for t in position}) != 1:
            raise CaptureError("its inputs change shape between calls")
    return tuple(torch.cat(position) for position in zip(*calls))


def capture_layer(model: nn.Module, layer: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn | None,
                  what: str) -> torch.Tensor:
    """``layer``'s positional input (``what="input"``; a layer of one input) or its output
    (``"output"``) on every call while ``forward_fn(model, batch)`` runs over ``batches`` (eval
    mode, no gradients), concatenated along dim 0. A `CaptureError` says why a layer cannot be
    captured."""
    if what not in ("input", "output"):
        raise ValueError(f"capture_layer: what must be 'input' or 'output', got {what!r}")
    calls = _calls(model, layer, batches, forward_fn, "inputs" if what == "input" else "output")
    if what == "input" and any(len(c) != 1 for c in calls):
        raise CaptureError("it is called with other than one tensor input")
    return _concatenated(calls)[0]


def capture_inputs(model: nn.Module, layer: nn.Module, batches: Iterable[Any],
                   forward_fn: ForwardFn | None) -> tuple[torch.Tensor, ...]:
    """All of ``layer``'s positional inputs (``a + b``: two) on every call, each concatenated along
    dim 0, so that ``layer(*inputs)`` replays every call at once. Every input of a call must span
    the batch, dim 0, of its output (an input broadcast over the batch cannot be concatenated);
    a `CaptureError` says why a layer cannot be captured."""
    return _concatenated(_calls(model, layer, batches, forward_fn, "inputs", span_batch=True))


def first_calls(model: nn.Module, batch: Any, modules: Mapping[str, nn.Module], forward_fn: ForwardFn | None = None,
                ) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """``{name: (args, kwargs)}`` of each module's first call while ``model`` runs on ``batch``
    (eval mode, no gradients; tensor arguments copied, so later in-place ops cannot change them).
    Modules not called are absent."""
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def record(name: str, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if name not in seen:
            seen[name] = (tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs))

    with hooked(modules, record, before=True), evaluating(model), torch.no_grad():
        (forward_fn or default_forward)(model, batch)
    return seen
