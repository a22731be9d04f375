"""What a benchmark row is, how sizes are counted, and the fp32 and quanta rows.

A `Method` is one row: a runner ``fn(x)`` taking an input already prepared by ``prep`` (layout
or numpy conversion happens outside the timed region) and ``post`` turning its output back
into a float torch tensor for the SQNR column. A method that could not be built carries
``error`` instead of ``fn`` and is reported as a row, never a crash.
"""

from __future__ import annotations

import copy
import functools
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

FP32, QUANTA, PEER = "fp32", "quanta", "peer"


def _identity(t: Any) -> Any:
    return t


@dataclass
class Method:
    name: str
    group: str  # FP32 | QUANTA | PEER
    fn: Callable[[Any], Any] | None = None
    size_bytes: int | None = None
    error: str | None = None
    prep: Callable[[torch.Tensor], Any] = _identity
    post: Callable[[Any], torch.Tensor] = _identity
    setup_s: float = 0.0
    notes: list[str] = field(default_factory=list)


class Skipped(Exception):
    """A row deliberately not run (e.g. ``torch.compile`` rows in ``--quick``)."""


COMPILE = {"enabled": True, "why": ""}


def compile_model(fn: Callable) -> Callable:
    """``torch.compile(fn)`` unless compile rows are switched off for this run."""
    if not COMPILE["enabled"]:
        raise Skipped(COMPILE["why"])
    return torch.compile(fn)


def guarded(name: str, group: str, build: Callable[[], Method], prefix: str = "failed") -> Method:
    """Run a row's builder; turn any exception into a row that says why."""
    t0 = time.perf_counter()
    try:
        m = build()
    except Skipped as e:
        return Method(name, group, error=f"skipped: {e}")
    except Exception as e:
        if os.environ.get("QUANTA_BENCH_DEBUG"):
            traceback.print_exc()
        return Method(name, group, error=f"{prefix}: {short_error(e)}")
    m.setup_s = time.perf_counter() - t0
    return m


def short_error(e: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(e).split())
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# ---------------------------------------------------------------- sizes
def _tensor_bytes(t: Any, seen: dict) -> int:
    if isinstance(t, torch.Tensor):
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
            names, _ = t.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(t, n), seen) for n in names)
        if isinstance(t, nn.Parameter) and type(t.data) is not torch.Tensor:
            return _tensor_bytes(t.data, seen)
        try:
            key = (t.data_ptr(), t.numel(), t.dtype)
        except Exception:
            key = id(t)
        if key in seen:
            return 0
        seen[key] = t  # hold a reference: unpacked temporaries must not free and reuse the address
        n = t.numel() * t.element_size()
        if t.is_quantized and t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            n += _tensor_bytes(t.q_per_channel_scales(), seen) + _tensor_bytes(t.q_per_channel_zero_points(), seen)
        return n
    if isinstance(t, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in t)
    if isinstance(t, dict):
        return sum(_tensor_bytes(v, seen) for v in t.values())
    if isinstance(t, torch.ScriptObject) and hasattr(t, "__getstate__"):
        return _tensor_bytes(t.__getstate__(), seen)
    return 0


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a model saves: ``state_dict`` tensors (quantized and subclass
    tensors counted by their stored components, packed params unpacked), plus tensors an FX
    graph reads through ``get_attr`` (where pt2e keeps its int8 weights), for an FX graph."""
    seen: dict = {}
    if not isinstance(model, torch.fx.GraphModule):
        return _tensor_bytes(dict(model.state_dict()), seen)
    total = 0  # a GraphModule may keep unused float originals: count what the graph reads
    for node in model.graph.nodes:
        if node.op == "get_attr":
            obj = model
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            total += _tensor_bytes(obj, seen)
    return total


# ---------------------------------------------------------------- fp32 rows
def torch_fp32(model: nn.Module) -> Method:
    return Method("torch fp32 eager", FP32, fn=model, size_bytes=state_dict_bytes(model))


def torch_fp32_channels_last(model: nn.Module) -> Method:
    m = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return Method("torch fp32 eager, channels_last", FP32, fn=m, size_bytes=state_dict_bytes(m),
                  prep=lambda x: x.contiguous(memory_format=torch.channels_last))


# ---------------------------------------------------------------- quanta rows
#: at most this many kept-float layers named in a row's notes (the rest counted)
NOTED_KEPT_FLOAT = 6


def quanta_rows(model: nn.Module, presets: list[tuple[str, dict]], calib: list[torch.Tensor],
                example: torch.Tensor | None = None) -> list[Method]:
    """One eager and one ``torch.compile`` row per preset, via quanta's public API.

    ``example`` (a benchmark input) drives quanta's speed check: layers whose integer kernel
    is slower than float on it stay float; the row's notes name each layer kept float with both
    timings and its input (`quanta.kept_float`)."""
    try:
        import quanta
        quantize = quanta.quantize
    except Exception as e:
        err = f"not available: {short_error(e)}"
        return [Method(f"quanta {p}{tag}", QUANTA, error=err) for p, _ in presets for tag in ("", " + compile")]
    rows = []
    for preset, kwargs in presets:
        label = f"quanta {preset}" + "".join(f" {k}={v}" for k, v in kwargs.items())

        def build(preset=preset, kwargs=kwargs, label=label) -> Method:
            bits = {k: v for k, v in kwargs.items() if k == "weight_bits"}  # a preset option, not quantize()'s
            config = quanta.preset(preset, **bits) if bits else preset
            q = quantize(copy.deepcopy(model), config, calib_data=list(calib), example=example,
                         **{k: v for k, v in kwargs.items() if k not in bits})
            q.eval()
            kept = quanta.kept_float(q)
            notes = [f"kept float: {k.describe()}" for k in kept[:NOTED_KEPT_FLOAT]]
            notes += [f"kept float: {len(kept) - NOTED_KEPT_FLOAT} more layer(s) (quanta.kept_float)"] \
                if len(kept) > NOTED_KEPT_FLOAT else []
            return Method(label, QUANTA, fn=q, size_bytes=quanta_size(q), notes=notes)

        eager = guarded(label, QUANTA, build, prefix="not available")
        rows.append(eager)
        if eager.fn is None:
            rows.append(Method(label + " + compile", QUANTA, error=eager.error))
        else:
            rows.append(guarded(label + " + compile", QUANTA, lambda e=eager: Method(
                e.name + " + compile", QUANTA, fn=compile_model(e.fn), size_bytes=e.size_bytes)))
    return rows


def _run_fitted(fit: Any, fn: Callable[[Any], Any], x: Any) -> Any:
    with fit:
        return fn(x)


def fitted_thread_rows(rows: list[Method]) -> list[Method]:
    """For each eager quanta row, one running the same model inside a reused
    `quanta.ThreadFit` (``quanta.fit_threads``' mechanism: each call on the cores free at the
    time, the caller's thread count restored after), named ``<row>, fit_threads``. Compiled rows
    get none: inductor's C++ kernels fix their OpenMP team size when they compile."""
    try:
        from quanta import ThreadFit
    except Exception as e:
        return [Method("quanta, fit_threads", QUANTA, error=f"not available: {short_error(e)}")]
    fitted = []
    for row in rows:
        if row.group != QUANTA or row.name.endswith(" + compile") or row.fn is None:
            continue
        run = functools.partial(_run_fitted, ThreadFit(), row.fn)  # one ThreadFit per row: its window spans calls
        fitted.append(Method(row.name + ", fit_threads", QUANTA, fn=run, size_bytes=row.size_bytes,
                             prep=row.prep, post=row.post))
    return fitted


def quanta_size(qmodel: nn.Module) -> int:
    try:
        from quanta.integer import storage_bytes
    except Exception:
        return state_dict_bytes(qmodel)
    return int(storage_bytes(qmodel))


def quanta_version() -> str:
    """quanta's version and whether its native CPU kernels are in use (built here if needed)."""
    try:
        import quanta
        from quanta.kernels import native
        native.ensure()
        return f"{getattr(quanta, '__version__', '?')} (native CPU kernels: {native.status()})"
    except Exception as e:
        return f"not importable ({type(e).__name__})"
