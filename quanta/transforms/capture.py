"""The one way quanta watches a model's layers while it runs (forward hooks).

`hooked` calls ``on_call(name, module, args, kwargs, output)`` on every call of the named modules
(before the call with ``before=True``: ``output`` is None) and removes its hooks in ``finally``;
`evaluating` runs a block with the model in eval mode and restores every module's own train flag
in ``finally``. The captures quanta's passes share are built on these two:

- `capture_layer`: one layer's first positional input or its output over calibration batches,
  concatenated (the layer-wise algorithms: AdaRound, best calibration);
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
    """A layer's calls cannot be captured (not called, called with several or keyword inputs)."""


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


def capture_layer(model: nn.Module, layer: nn.Module, batches: Iterable[Any], forward_fn: ForwardFn | None,
                  what: str) -> torch.Tensor:
    """``layer``'s first positional input (``what="input"``) or its output (``"output"``) on every
    call while ``forward_fn(model, batch)`` runs over ``batches`` (eval mode, no gradients),
    concatenated along dim 0. A `CaptureError` says why a layer cannot be captured."""
    if what not in ("input", "output"):
        raise ValueError(f"capture_layer: what must be 'input' or 'output', got {what!r}")
    forward = forward_fn or default_forward
    seen: list[torch.Tensor] = []
    problem: list[str] = []

    def record(name: str, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            problem.append("it is called with other than one tensor input and one tensor output")
            return
        seen.append((args[0] if what == "input" else out).detach().clone())

    with hooked({"layer": layer}, record), evaluating(model), torch.no_grad():
        for batch in batches:
            forward(model, batch)
    if problem:
        raise CaptureError(problem[0])
    if not seen:
        raise CaptureError("the calibration data never reaches it")
    if len({t.shape[1:] for t in seen}) != 1:
        raise CaptureError("its inputs change shape between calls")
    return torch.cat(seen)


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
