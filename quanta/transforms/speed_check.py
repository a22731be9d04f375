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
reuse it, with the load it was measured under: a decision measured on a busy machine is measured
again on an idle one, and the report says "measured on a busy machine" where one is used.

A uint8 chain (integer convs and additions handing each other codes, `fuse.uint8_chains`) is
judged as a whole: its point is that no member pays a quantize/dequantize pair, which a timing
of one layer alone cannot credit, and one member cannot go float alone (its neighbours compute on
its codes). Each member is timed in its chain context (the codes it really gets in, its output
kind as set) against its float twin on the dequantized input; the chain goes float, every member
together, when the sum of its integer times is clearly slower than the sum of the float ones
(the fastest rounds' sums and the median rounds' sums, the same tolerance), and each member is
reported with its own timings and the chain's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..core import Granularity
from ..integer.add import Int8Add
from ..integer.base import IntegerModule
from ..integer.conv import _Int8ConvNd
from ..kernels.u8s8_saturation import cpu_vnni_features
from ..nn.modules.functional import Add
from ..nn.modules.fused import FusedActivation
from .capture import first_calls
from .fuse import restore_float_pools, uint8_chains
from .speed_cache import DecisionCache, LoadSource, MachineLoad, decision_key, recorded_load, stored_load
from .speed_choice import DEFAULT_TOLERANCE, SPEED_CHOICE_ATTR, KeptFloat, SpeedChoice, kept_float

__all__ = ["DEFAULT_TOLERANCE", "TOLERANCE", "KeptFloat", "SpeedChoice", "keep_faster", "kept_float"]

_log = logging.getLogger(__name__)

#: an integer layer becomes float only when it takes more than this times its float twin's time
#: (by both the fastest rounds and the median round). Memory is the point of weight-only and
#: half-precision layers: they stay unless grossly slower. Int8 compute layers are there for
#: speed (and size): they stay unless clearly slower (`DEFAULT_TOLERANCE`).
TOLERANCE: dict[str, float] = {
    "Int8WeightOnlyLinear": 2.0, "Int4WeightOnlyLinear": 2.0, "HalfLinear": 2.0,
    "Int8Embedding": 2.0, "Int4Embedding": 2.0,
}
#: at least this many interleaved rounds (unless `keep_faster` is told fewer), about this much
#: measured time of each side, at most this many rounds
MIN_ROUNDS, BUDGET_S, MAX_ROUNDS = 15, 0.05, 400
#: ``measure(kind, fn) -> seconds`` for one call of ``fn``; ``kind`` is "integer" or "float"
#: (tests inject their own)
Measure = Callable[[str, Callable[[], Any]], float]


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
_MACHINE_LOAD: Any = object()  # keep_faster's default: this machine's load when timing for real
_Loads = tuple["float | None", "LoadSource | None"]  # the load when the example ran, and its source


def keep_faster(model: nn.Module, twins: dict[str, nn.Module], example: Any, *,
                forward_fn: Callable[[nn.Module, Any], Any] | None = None, repeats: int = MIN_ROUNDS,
                measure: Measure | None = None, cache: DecisionCache | None | Any = _MACHINE_CACHE,
                load: LoadSource | None | Any = _MACHINE_LOAD) -> list[SpeedChoice]:
    """Time each integer module of ``model`` named in ``twins`` (name → float twin) against its
    twin on the input it gets from ``example`` (one batch); swap in the twin where the integer
    module is clearly slower (see the module docstring). Modules not called by ``example`` stay
    integer; a uint8 chain is decided as a whole (module docstring), its additions included (their
    float twin: `quanta.nn.Add`). ``repeats``: the least number of interleaved rounds. ``cache``: where decisions are
    reused and stored; by default this machine's (`speed_cache`) when ``measure`` is the real
    clock, none with an injected ``measure``; ``None``: measure everything, store nothing. ``load``:
    called for the load the timings are taken under (`speed_cache.MachineLoad`, by default when
    ``measure`` is the real clock; ``None``: unknown): before the example run (a window starts),
    after it (the load now: whether a cached decision is reused) and after each decision's
    timings (the load it was measured under: cached with it and reported)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if cache is _MACHINE_CACHE:
        cache = DecisionCache() if measure is None else None
    if load is _MACHINE_LOAD:
        load = MachineLoad() if measure is None else None
    if load is not None:
        load()  # (a window starts)
    on_cuda = any(b.is_cuda for b in model.buffers()) or any(p.is_cuda for p in model.parameters())
    measure = measure or (_cuda_perf_counter if on_cuda else _perf_counter)
    chains = uint8_chains(model)
    chained = {n for chain in chains for n in chain}
    modules = {n: m for n, m in model.named_modules()
               if (n in twins or n in chained) and isinstance(m, IntegerModule)}
    counts = {m: m.kernel_counts.copy() for m in model.modules() if isinstance(m, IntegerModule)}
    try:
        inputs = first_calls(model, example, modules, forward_fn)
        loads = (load() if load is not None else None, load)
        alone = {n: m for n, m in modules.items() if n not in chained}
        choices = _choose(model, alone, twins, inputs, repeats, measure, cache, loads)
        for chain in chains:
            choices += _choose_chain(model, chain, modules, twins, inputs, repeats, measure, cache, loads)
        if any(c.picked == "float" and c.chain_layers for c in choices):
            restore_float_pools(model)  # (the pools a reverted chain had on codes: the user's again)
        order = {n: i for i, n in enumerate(modules)}
        return sorted(choices, key=lambda c: order[c.name])
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
                       ratio, tolerance, hint=seven_bit_hint(mod, kernel) if picked == "float" else "")


#: appended to the report of an int8 layer kept float that 7-bit weights would make fast here
SEVEN_BIT_HINT = ("; 7-bit weights (weight_bits=7) would run it on the fast int8 kernels (quanta's AVX2 convs, "
                  "oneDNN), exact on this CPU without VNNI")


def seven_bit_hint(mod: IntegerModule, kernel: str) -> str:
    """`SEVEN_BIT_HINT` for a layer with 8-bit weight codes that ran the exact but slow paths
    (``reference`` / ``float_sums``) on a CPU without VNNI, where oneDNN sums 7-bit codes exactly and
    the layer's activations suit oneDNN (static per tensor: the integer convs, a static Int8Linear);
    else ``""``."""
    if not {"reference", "float_sums"} & set(kernel.split("+")) or getattr(mod, "weight_code_max", 0) <= 64:
        return ""
    spec = getattr(mod, "act_spec", None)
    static_linear = spec is not None and not spec.dynamic and spec.granularity is Granularity.PER_TENSOR
    if not (isinstance(mod, _Int8ConvNd) or static_linear) or cpu_vnni_features():
        return ""
    return SEVEN_BIT_HINT


def _settle(mod: IntegerModule, twin: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            float_args: tuple[Any, ...]) -> tuple[Callable[[], Any], Callable[[], Any], str]:
    """The integer and float calls to time (warmed up) and the kernel(s) the integer call runs."""
    int_call, float_call = functools.partial(mod, *args, **kwargs), functools.partial(twin, *float_args, **kwargs)
    int_call(), float_call()  # warm-up (first-call allocations, lazy packing, settling)
    before = mod.kernel_counts.copy()
    int_call()  # a settled call: the kernel it names is the one later calls run
    return int_call, float_call, "+".join(sorted(k for k, n in (mod.kernel_counts - before).items() if n > 0))


def _shape(args: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()


def _choose(model: nn.Module, modules: dict[str, IntegerModule], twins: dict[str, nn.Module],
            inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]], repeats: int,
            measure: Measure, cache: DecisionCache | None, loads: _Loads) -> list[SpeedChoice]:
    choices = []
    load_now = loads[0]
    for name, mod in modules.items():
        if name not in inputs:
            continue
        args, kwargs = inputs[name]
        if _in_uint8_chain(mod, args):
            continue  # codes set by hand (no traced chain): its neighbours compute on them, it stays
        twin = _with_post_op(twins[name].eval(), mod)
        tolerance = TOLERANCE.get(type(mod).__name__, DEFAULT_TOLERANCE)
        shape = _shape(args)
        with torch.no_grad():
            int_call, float_call, kernel = _settle(mod, twin, args, kwargs, args)
            key = decision_key(_layer_parts(mod, twin, args, kwargs, kernel)) if cache is not None else ""
            hit = cache.get(key, load_now) if cache is not None else None
            if hit is not None:
                choice = SpeedChoice(name, type(mod).__name__, shape, float(hit.get("integer_ms", 0.0)),
                                     float(hit.get("float_ms", 0.0)), hit["picked"], kernel,
                                     float(hit.get("ratio", 0.0)), tolerance, cached=True,
                                     hint=seven_bit_hint(mod, kernel) if hit["picked"] == "float" else "",
                                     load=recorded_load(hit))
            else:
                choice = _decide(mod, name, shape, kernel, tolerance, int_call, float_call, repeats, measure)
                choice = dataclasses.replace(choice, load=_measured_under(loads))
                if cache is not None:
                    cache.put(key, {"picked": choice.picked, "ratio": round(choice.ratio, 4),
                                    "integer_ms": round(choice.integer_ms, 5), "float_ms": round(choice.float_ms, 5),
                                    "layer": choice.integer, "input": list(shape), "kernel": kernel,
                                    "tolerance": tolerance, "load": stored_load(choice.load),
                                    "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _log.info("quanta speed check: %s: %s", name, choice.describe())
        choices.append(choice)
        if choice.picked == "float":
            _put_float(model, name, twins[name].eval(), twin, choice)
    return choices


def _measured_under(loads: _Loads) -> float | None:
    """The load over the timings just taken (the source's window since its last call)."""
    return loads[1]() if loads[1] is not None else loads[0]


def _put_float(model: nn.Module, name: str, twin: nn.Module, with_post_op: nn.Module, choice: SpeedChoice) -> None:
    """``name`` becomes its float twin: alone where the user's activation module(s) its kernel had
    taken over come back, else followed by the activation it had fused (``with_post_op``)."""
    placed = twin if _restore_activations(model, name) else with_post_op
    # (a plain attribute: it follows the module through renames and copies, never into a file)
    placed.__dict__[SPEED_CHOICE_ATTR] = choice
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, placed)


def _dequantized(mod: IntegerModule, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` as the float model would pass them: uint8 codes dequantized on the grid ``mod`` takes
    them on (a conv's input grid, an addition's operand grid), in the default memory order."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dtype == torch.uint8:
            scale, zp = mod.operand_code_qparams(i) if isinstance(mod, Int8Add) else mod.input_code_qparams()
            a = ((a.float() - float(zp)) * float(scale)).contiguous()
        out.append(a)
    return tuple(out)


class _Member(NamedTuple):
    """A chain member, ready to time."""

    name: str
    mod: IntegerModule
    twin: Callable[..., Any]  # its float twin (with the activation it fused)
    shape: tuple[int, ...]
    kernel: str
    int_call: Callable[[], Any]
    float_call: Callable[[], Any]
    parts: dict[str, Any]  # what its timing depends on (`_layer_parts`)


def _add_then(add: nn.Module, activation: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return activation(add(a, b))


def _choose_chain(model: nn.Module, chain: list[str], modules: dict[str, IntegerModule],
                  twins: dict[str, nn.Module], inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]],
                  repeats: int, measure: Measure, cache: DecisionCache | None, loads: _Loads) -> list[SpeedChoice]:
    """Decide a uint8 chain as a whole (module docstring); every member float when it is clearly slower."""
    base = {n: twins[n].eval() if n in twins else Add().eval() if isinstance(modules.get(n), Int8Add) else None
            for n in chain}
    missing = [n for n in chain if n not in inputs or base[n] is None]
    if missing:
        _log.info("quanta speed check: uint8 chain %s stays integer: %s not called by the example or "
                  "without a float twin", chain, missing)
        return []
    members = []
    with torch.no_grad():
        for name in chain:
            mod, (args, kwargs) = modules[name], inputs[name]
            twin = _with_post_op(base[name], mod) if not isinstance(mod, Int8Add) else base[name]
            if isinstance(mod, Int8Add) and mod.post_op != "none":  # (timed with its activation, which
                twin = functools.partial(_add_then, base[name], _POST_OP_MODULES[mod.post_op]())  # stays)
            int_call, float_call, kernel = _settle(mod, twin, args, kwargs, _dequantized(mod, args))
            members.append(_Member(name, mod, twin, _shape(args), kernel, int_call, float_call,
                                   _layer_parts(mod, base[name], args, kwargs, kernel)))
        tolerance = max(TOLERANCE.get(type(m.mod).__name__, DEFAULT_TOLERANCE) for m in members)
        key = decision_key({"uint8_chain": [m.parts for m in members]}) if cache is not None else ""
        hit = cache.get(key, loads[0]) if cache is not None else None
        timed = hit.get("members") if hit is not None else None
        if isinstance(timed, list) and len(timed) == len(members):
            picked, ratio, cached, load = hit["picked"], float(hit.get("ratio", 0.0)), True, recorded_load(hit)
            fastest = [(float(i), float(f)) for i, f in timed]
        else:
            rounds = [_time_pair(m.int_call, m.float_call, repeats, measure) for m in members]
            fastest = [(min(ti) * 1e3, min(tf) * 1e3) for ti, tf in rounds]
            medians = [(statistics.median(ti), statistics.median(tf)) for ti, tf in rounds]
            ratio = min(sum(i for i, _ in fastest) / max(sum(f for _, f in fastest), 1e-9),
                        sum(i for i, _ in medians) / max(sum(f for _, f in medians), 1e-12))
            picked, cached, load = ("float" if ratio > tolerance else "integer"), False, _measured_under(loads)
            if cache is not None:
                cache.put(key, {"picked": picked, "ratio": round(ratio, 4),
                                "layers": [type(m.mod).__name__ for m in members],
                                "members": [[round(i, 5), round(f, 5)] for i, f in fastest],
                                "tolerance": tolerance, "load": stored_load(load),
                                "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    total_i, total_f = sum(i for i, _ in fastest), sum(f for _, f in fastest)
    choices = [SpeedChoice(m.name, type(m.mod).__name__, m.shape, ms_i, ms_f, picked, m.kernel, ratio, tolerance,
                           cached, len(members), total_i, total_f,
                           hint=seven_bit_hint(m.mod, m.kernel) if picked == "float" else "", load=load)
               for m, (ms_i, ms_f) in zip(members, fastest)]
    for choice, m in zip(choices, members):
        _log.info("quanta speed check: %s: %s", m.name, choice.describe())
        if picked == "float":  # every member: no codes flow any more, each twin takes floats (an
            # addition's fused activation is a module put back or an op still in the forward)
            _put_float(model, m.name, base[m.name], m.twin if isinstance(m.twin, nn.Module) else base[m.name], choice)
    return choices
