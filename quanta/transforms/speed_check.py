"""Keep an integer layer only where it is faster than float, on the inputs it really gets.

An int8 kernel has a fixed cost per call (quantizing the activation, dispatch, the epilogue)
that a tiny layer never earns back: a 32-wide LSTM or a 10-class head runs slower in int8 than
in float. After lowering and fusion, `keep_faster` runs the model once on example inputs,
records what each integer module receives, times the integer module against its float twin
(the simulated module's own float class, sharing the original float weights) on exactly those
inputs, interleaved (fastest round of each), and puts the float twin back where the integer
module was slower by more than `MARGIN` (followed by the activation the integer module had
fused, whose own module `fuse_activations` replaced by ``Identity``). The
choice is reported (`conversion_report`, `coverage`): the layer then computes in float,
unquantized. Convolutions inside a uint8 chain (emitting codes to, or taking codes from,
another integer conv) are not timed alone: the chain's point is that no layer of it pays a
quantize/dequantize pair, which a per-layer timing cannot credit, and swapping one member
would break its neighbours' interface.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..integer.base import IntegerModule
from .calibrate import default_forward

#: the integer layer is replaced only when slower than its float twin by more than this fraction
#: (timing noise between two near-equal kernels must not cost the layer its compression)
MARGIN = 0.05
#: ``measure(kind, fn) -> seconds`` for one call of ``fn``; ``kind`` is "integer" or "float"
#: (tests inject their own)
Measure = Callable[[str, Callable[[], Any]], float]


@dataclass(frozen=True)
class SpeedChoice:
    name: str
    integer: str  # the integer class
    input_shape: tuple[int, ...]
    integer_ms: float
    float_ms: float
    picked: str  # "integer" or "float"

    def describe(self) -> str:
        return (f"{self.integer} {self.integer_ms:.3f} ms vs float {self.float_ms:.3f} ms on input "
                f"{list(self.input_shape)}: {self.picked} kept")


def _perf_counter(kind: str, fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cuda_perf_counter(kind: str, fn: Callable[[], Any]) -> float:
    """Wall time of ``fn`` including its queued CUDA work."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


#: the activation module of each fused ``post_op`` (a module whose fused activation replaced the
#: model's own activation module by ``Identity``: its float twin must apply it again)
_POST_OP_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


def _with_post_op(twin: nn.Module, mod: nn.Module) -> nn.Module:
    """The float twin of ``mod``, followed by the activation ``mod`` has fused (if any)."""
    post = getattr(mod, "post_op", "none")
    return twin if post == "none" else nn.Sequential(twin, _POST_OP_MODULES[post]())


def _in_uint8_chain(mod: nn.Module, args: tuple[Any, ...]) -> bool:
    """Emits uint8 codes to, or takes them from, another integer conv (`fuse_activations`)."""
    takes = bool(args) and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.uint8
    return takes or getattr(mod, "output_kind", "float") == "uint8"


def _capture(model: nn.Module, batch: Any, forward_fn: Callable[[nn.Module, Any], Any] | None,
             names: dict[nn.Module, str]) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = names[mod]
        if name not in seen:
            seen[name] = (tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            (forward_fn or default_forward)(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def keep_faster(model: nn.Module, twins: dict[str, nn.Module], example: Any, *,
                forward_fn: Callable[[nn.Module, Any], Any] | None = None, repeats: int = 7,
                measure: Measure | None = None) -> list[SpeedChoice]:
    """Time each integer module of ``model`` named in ``twins`` (name → float twin) against its
    twin on the input it gets from ``example`` (one batch); swap in the twin where the integer
    module is slower. Modules not called by ``example`` stay integer."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    on_cuda = any(b.is_cuda for b in model.buffers()) or any(p.is_cuda for p in model.parameters())
    measure = measure or (_cuda_perf_counter if on_cuda else _perf_counter)
    modules = {n: m for n, m in model.named_modules() if n in twins and isinstance(m, IntegerModule)}
    counts = {m: m.kernel_counts.copy() for m in model.modules() if isinstance(m, IntegerModule)}
    try:
        inputs = _capture(model, example, forward_fn, {m: n for n, m in modules.items()})
        return _choose(model, modules, twins, inputs, repeats, measure)
    finally:  # the example and timing runs are not calls of the model
        for m, c in counts.items():
            m.kernel_counts.clear()
            m.kernel_counts.update(c)


def _choose(model: nn.Module, modules: dict[str, IntegerModule], twins: dict[str, nn.Module],
            inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]], repeats: int,
            measure: Measure) -> list[SpeedChoice]:
    choices = []
    for name, mod in modules.items():
        if name not in inputs:
            continue
        args, kwargs = inputs[name]
        if _in_uint8_chain(mod, args):
            continue  # its neighbours compute on its uint8 codes: it stays with them
        twin = _with_post_op(twins[name].eval(), mod)
        with torch.no_grad():
            int_call, float_call = (lambda: mod(*args, **kwargs)), (lambda: twin(*args, **kwargs))
            int_call(), float_call()  # warm-up (first-call allocations, lazy packing)
            ti, tf = [measure("integer", int_call)], [measure("float", float_call)]
            # short calls get more rounds (about 20 ms of each), interleaved so drift hits both
            rounds = min(max(repeats, int(0.02 / max(ti[0], tf[0], 1e-6))), 10 * repeats)
            for _ in range(rounds - 1):
                ti.append(measure("integer", int_call))
                tf.append(measure("float", float_call))
        shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
        # the fastest round of each: interference from other processes only ever adds time
        int_ms, float_ms = min(ti) * 1e3, min(tf) * 1e3
        picked = "float" if int_ms > float_ms * (1 + MARGIN) else "integer"
        choices.append(SpeedChoice(name, type(mod).__name__, shape, int_ms, float_ms, picked))
        if picked == "float":
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, twin)
    return choices
