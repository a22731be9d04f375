"""Keep an integer layer only where it is not clearly slower than float, on the inputs it really gets.

An int8 kernel has a fixed cost per call (quantizing the activation, dispatch, the epilogue)
that a tiny layer never earns back: a 32-wide LSTM or a 10-class head runs slower in int8 than
in float. After lowering and fusion, `keep_faster` runs the model once on example inputs,
records what each integer module receives, times the integer module against its float twin
(the simulated module's own float class, sharing the original float weights) on exactly those
inputs, and puts the float twin back where the integer module is *clearly* slower (followed by
the activation the integer module had fused, whose own module `fuse_activations` replaced by
``Identity``). The choice is reported with both timings and the input (`conversion_report`,
`coverage`, `kept_float`; `quanta.save` drops the timings, which would make files differ from run
to run): the layer then computes in float, unquantized.

Robust by construction: at least `MIN_ROUNDS` interleaved rounds (alternating which side goes
first) and about `BUDGET_S` of each side; a layer goes float only when both the ratio of the
fastest rounds and the median of the per-round ratios exceed its class's tolerance (what a
user of the preset expects: int8 compute layers are there to be fast and stay integer unless
more than 10% slower; weight-only and half-precision layers are there to be small and stay
unless more than twice as slow). Each decision is cached per machine (`speed_cache`), keyed by
the layer, its input, the kernel that ran, the CPU, thread count and versions, so later runs
reuse it. Convolutions inside a uint8 chain (emitting codes to, or taking codes from, another
integer conv) are not timed alone: the chain's point is that no layer of it pays a
quantize/dequantize pair, which a per-layer timing cannot credit, and swapping one member
would break its neighbours' interface.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..integer.base import IntegerModule
from ..nn.modules.fused import FusedActivation
from .capture import first_calls
from .decisions import REPORT_ATTR
from .speed_cache import DecisionCache, decision_key

_log = logging.getLogger(__name__)

#: an integer layer becomes float only when it takes more than this times its float twin's time
#: (by both the fastest rounds and the median round). Memory is the point of weight-only and
#: half-precision layers: they stay unless grossly slower. Int8 compute layers are there for
#: speed (and size): they stay unless clearly slower (`DEFAULT_TOLERANCE`).
TOLERANCE: dict[str, float] = {
    "Int8WeightOnlyLinear": 2.0, "Int4WeightOnlyLinear": 2.0, "HalfLinear": 2.0,
    "Int8Embedding": 2.0, "Int4Embedding": 2.0,
}
DEFAULT_TOLERANCE = 1.10
#: at least this many interleaved rounds (unless `keep_faster` is told fewer), about this much
#: measured time of each side, at most this many rounds
MIN_ROUNDS, BUDGET_S, MAX_ROUNDS = 15, 0.05, 400
#: ``measure(kind, fn) -> seconds`` for one call of ``fn``; ``kind`` is "integer" or "float"
#: (tests inject their own)
Measure = Callable[[str, Callable[[], Any]], float]
#: attribute of a float twin the speed check put back: its `SpeedChoice` (read by `kept_float`)
SPEED_CHOICE_ATTR = "_quanta_speed_choice"


@dataclass(frozen=True)
class SpeedChoice:
    name: str
    integer: str  # the integer class
    input_shape: tuple[int, ...]
    integer_ms: float  # fastest round (or the cached measurement)
    float_ms: float
    picked: str  # "integer" or "float"
    kernel: str = ""  # the implementation(s) the integer module ran
    ratio: float = 0.0  # the decisive integer / float time ratio (the smaller of the two estimates)
    tolerance: float = DEFAULT_TOLERANCE
    cached: bool = False  # reused from this machine's cache, not measured now

    def timings(self) -> str:
        """``"(0.123 ms vs float 0.045 ms)"``: the one way timings are written (`quanta.save` strips
        exactly this from a report's detail, so a saved file stays a function of the model)."""
        return f"({self.integer_ms:.3f} ms vs float {self.float_ms:.3f} ms)"

    def describe(self) -> str:
        """For the log: the decision with its timings."""
        return f"{self.report_detail()}{' (cached)' if self.cached else ''}"

    def report_detail(self) -> str:
        """The reason, with both timings and the input (the conversion report's detail)."""
        kernel = f" ({self.kernel})" if self.kernel else ""
        if self.picked == "float":
            return (f"{self.integer}{kernel} on input {list(self.input_shape)} {self.timings()}: more than "
                    f"{self.tolerance:.2f}x float's time on this machine; float kept")
        return f"speed-checked {self.timings()}: at most {self.tolerance:.2f}x float's time"


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


def _restore_activations(model: nn.Module, producer: str) -> bool:
    """Put back the user's activation module(s) that ``producer``'s kernel had taken over
    (`FusedActivation.original`), so that the float twin alone restores the model as it was (a saved
    file then matches the user's architecture). False where there is none to put back."""
    fused = [(n, m) for n, m in model.named_modules()
             if isinstance(m, FusedActivation) and m.into == producer and m.original is not None]
    for n, m in fused:
        parent, _, leaf = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, m.original)
    return bool(fused)


def _in_uint8_chain(mod: nn.Module, args: tuple[Any, ...]) -> bool:
    """Emits uint8 codes to, or takes them from, another integer conv (`fuse_activations`)."""
    takes = bool(args) and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.uint8
    return takes or getattr(mod, "output_kind", "float") == "uint8"


_MACHINE_CACHE: Any = object()  # keep_faster's default: this machine's cache when timing for real


def keep_faster(model: nn.Module, twins: dict[str, nn.Module], example: Any, *,
                forward_fn: Callable[[nn.Module, Any], Any] | None = None, repeats: int = MIN_ROUNDS,
                measure: Measure | None = None, cache: DecisionCache | None | Any = _MACHINE_CACHE,
                ) -> list[SpeedChoice]:
    """Time each integer module of ``model`` named in ``twins`` (name → float twin) against its
    twin on the input it gets from ``example`` (one batch); swap in the twin where the integer
    module is clearly slower (see the module docstring). Modules not called by ``example`` stay
    integer. ``repeats``: the least number of interleaved rounds. ``cache``: where decisions are
    reused and stored; by default this machine's (`speed_cache`) when ``measure`` is the real
    clock, none with an injected ``measure``; ``None``: measure everything, store nothing."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if cache is _MACHINE_CACHE:
        cache = DecisionCache() if measure is None else None
    on_cuda = any(b.is_cuda for b in model.buffers()) or any(p.is_cuda for p in model.parameters())
    measure = measure or (_cuda_perf_counter if on_cuda else _perf_counter)
    modules = {n: m for n, m in model.named_modules() if n in twins and isinstance(m, IntegerModule)}
    counts = {m: m.kernel_counts.copy() for m in model.modules() if isinstance(m, IntegerModule)}
    try:
        inputs = first_calls(model, example, modules, forward_fn)
        return _choose(model, modules, twins, inputs, repeats, measure, cache)
    finally:  # the example and timing runs are not calls of the model
        for m, c in counts.items():
            m.kernel_counts.clear()
            m.kernel_counts.update(c)


def _describe_tensors(values: Any) -> Any:
    if isinstance(values, torch.Tensor):
        return [list(values.shape), str(values.dtype), values.is_contiguous()]
    if isinstance(values, (tuple, list)):
        return [_describe_tensors(v) for v in values]
    if isinstance(values, dict):
        return {str(k): _describe_tensors(v) for k, v in sorted(values.items())}
    return None if values is None else type(values).__name__


def _layer_parts(mod: IntegerModule, twin: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 kernel: str) -> dict[str, Any]:
    """What a decision depends on besides the machine (`speed_cache.decision_key` adds that)."""
    try:
        config: Any = mod.config()
    except TypeError:
        config = {k: list(v.shape) for k, v in mod.state_dict().items()}
    return {"class": type(mod).__name__, "config": config, "post_op": getattr(mod, "post_op", "none"),
            "twin": type(twin).__name__, "twin_dtype": str(next((p.dtype for p in twin.parameters()), None)),
            "args": _describe_tensors(args), "kwargs": _describe_tensors(kwargs), "kernel": kernel}


def _time_pair(int_call: Callable[[], Any], float_call: Callable[[], Any], repeats: int,
               measure: Measure) -> tuple[list[float], list[float]]:
    """Interleaved rounds, alternating which side goes first (drift and cache effects hit both):
    at least ``repeats``, about `BUDGET_S` of each side, at most `MAX_ROUNDS` (or ``repeats``)."""
    ti, tf = [measure("integer", int_call)], [measure("float", float_call)]
    wanted = int(BUDGET_S / max(ti[0], tf[0], 1e-6))
    rounds = max(repeats, min(wanted, MAX_ROUNDS))
    for k in range(1, rounds):
        first, second = ((tf, "float", float_call), (ti, "integer", int_call))[:: 1 if k % 2 else -1]
        first[0].append(measure(first[1], first[2]))
        second[0].append(measure(second[1], second[2]))
    return ti, tf


def _decide(mod: IntegerModule, name: str, shape: tuple[int, ...], kernel: str, tolerance: float,
            int_call: Callable[[], Any], float_call: Callable[[], Any], repeats: int,
            measure: Measure) -> SpeedChoice:
    ti, tf = _time_pair(int_call, float_call, repeats, measure)
    # the fastest rounds (interference only adds time) and the median paired round (robust to a
    # few disturbed rounds): float only when both say clearly slower
    ratio = min(min(ti) / max(min(tf), 1e-12), statistics.median(a / max(b, 1e-12) for a, b in zip(ti, tf)))
    picked = "float" if ratio > tolerance else "integer"
    return SpeedChoice(name, type(mod).__name__, shape, min(ti) * 1e3, min(tf) * 1e3, picked, kernel,
                       ratio, tolerance)


def _choose(model: nn.Module, modules: dict[str, IntegerModule], twins: dict[str, nn.Module],
            inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]], repeats: int,
            measure: Measure, cache: DecisionCache | None) -> list[SpeedChoice]:
    choices = []
    for name, mod in modules.items():
        if name not in inputs:
            continue
        args, kwargs = inputs[name]
        if _in_uint8_chain(mod, args):
            continue  # its neighbours compute on its uint8 codes: it stays with them
        twin = _with_post_op(twins[name].eval(), mod)
        tolerance = TOLERANCE.get(type(mod).__name__, DEFAULT_TOLERANCE)
        shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
        with torch.no_grad():
            int_call, float_call = functools.partial(mod, *args, **kwargs), functools.partial(twin, *args, **kwargs)
            int_call(), float_call()  # warm-up (first-call allocations, lazy packing, settling)
            before = mod.kernel_counts.copy()
            int_call()  # a settled call: the kernel it names is the one later calls run
            kernel = "+".join(sorted(k for k, n in (mod.kernel_counts - before).items() if n > 0))
            key = decision_key(_layer_parts(mod, twin, args, kwargs, kernel)) if cache is not None else ""
            hit = cache.get(key) if cache is not None else None
            if hit is not None:
                choice = SpeedChoice(name, type(mod).__name__, shape, float(hit.get("integer_ms", 0.0)),
                                     float(hit.get("float_ms", 0.0)), hit["picked"], kernel,
                                     float(hit.get("ratio", 0.0)), tolerance, cached=True)
            else:
                choice = _decide(mod, name, shape, kernel, tolerance, int_call, float_call, repeats, measure)
                if cache is not None:
                    cache.put(key, {"picked": choice.picked, "ratio": round(choice.ratio, 4),
                                    "integer_ms": round(choice.integer_ms, 5), "float_ms": round(choice.float_ms, 5),
                                    "layer": choice.integer, "input": list(shape), "kernel": kernel,
                                    "tolerance": tolerance, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _log.info("quanta speed check: %s: %s", name, choice.describe())
        choices.append(choice)
        if choice.picked == "float":
            restored = _restore_activations(model, name)
            placed = twins[name].eval() if restored else twin
            # (a plain attribute: it follows the module through renames and copies, never into a file)
            placed.__dict__[SPEED_CHOICE_ATTR] = choice
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, placed)
    return choices


@dataclass(frozen=True)
class KeptFloat:
    """A layer quanta was asked to quantize and keeps float, and why: the speed check measured its
    integer kernel slower (``integer_ms`` / ``float_ms`` on ``input_shape``, fastest rounds), or it
    could not be lowered (its shape does not fit the config, calibration never reached it, a
    subclass ``forward`` quanta cannot follow: no timings). A model loaded from a file has the
    reasons without the timings (files hold no timings)."""

    name: str
    type: str  # the float module's class
    reason: str  # the conversion report's detail
    integer: str = ""  # the integer class the speed check timed ("" when none was)
    integer_ms: float | None = None
    float_ms: float | None = None
    input_shape: tuple[int, ...] | None = None

    def describe(self) -> str:
        """``"head (Linear): integer kernel slower: Int8Linear on input [64, 10] (0.031 ms vs float 0.012 ms):
        ..."``: the one line every consumer (CLI, demo, benchmark notes) prints."""
        return f"{self.name} ({self.type}): {self.reason}"


def kept_float(model: nn.Module) -> list[KeptFloat]:
    """The layers of a converted ``model`` that stay float, in conversion order, with the speed
    check's timings where it decided (see `KeptFloat`); ``[]`` for a model not converted by quanta."""
    out = []
    for row in getattr(model, REPORT_ATTR, []):
        if row.result != "float":
            continue
        try:
            mod: nn.Module | None = model.get_submodule(row.name) if row.name else model
        except AttributeError:
            mod = None
        choice = getattr(mod, SPEED_CHOICE_ATTR, None) if mod is not None else None
        layer = mod[0] if isinstance(mod, nn.Sequential) and choice is not None else mod  # (twin, its activation)
        kind = type(layer).__name__ if layer is not None else row.simulated
        if isinstance(choice, SpeedChoice):
            out.append(KeptFloat(row.name, kind, row.detail, choice.integer, choice.integer_ms, choice.float_ms,
                                 choice.input_shape))
        else:
            out.append(KeptFloat(row.name, kind, row.detail))
    return out
