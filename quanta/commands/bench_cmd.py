"""`quanta bench`: latency and size of a quantized model against its fp32 model, on this machine.

Latency: the two models run in interleaved rounds (fp32, quantized, fp32, ...), each round a
fixed number of calls sized to last about 20 ms; the median per-call time over the rounds is
reported with the fastest and slowest round, so that drift of the machine hits both models alike.
Size: bytes of parameters and persistent buffers (`quanta.storage_bytes`: what a file holds).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import statistics
import time
from typing import Any

import torch
from torch import nn

from ..integer import storage_bytes
from ..io import load
from .errors import CommandError
from .quantize_cmd import ConfigChoice, integer_layers, quantize_model
from .sources import example_input, load_spec, spec_factory


@dataclasses.dataclass(frozen=True)
class BenchJob:
    """``target``: a file written by `quanta.save` (then ``model`` is the float model's spec) or a
    model spec (quantized here with ``config``, as `quanta quantize` would with the same input:
    layers whose integer kernel is slower than float on it stay float)."""

    target: str
    model: str | None = None
    input_shape: str | None = None
    config: ConfigChoice = dataclasses.field(default_factory=ConfigChoice)
    rounds: int = 10
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.rounds < 3:
            raise CommandError(f"--rounds must be at least 3 (a median needs several), got {self.rounds}")
        if self.threads is not None and self.threads <= 0:
            raise CommandError(f"--threads must be positive, got {self.threads}")
        if self.is_file and self.model is None:
            raise CommandError(f"{self.target}: benchmarking a file needs --model SPEC (its fp32 model)")

    @property
    def is_file(self) -> bool:
        return self.target.endswith(".safetensors")


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    fastest_ms: float
    slowest_ms: float


@dataclasses.dataclass(frozen=True)
class BenchResult:
    input: str
    rounds: int
    calls_per_round: int
    threads: int
    fp32: Timing
    quantized: Timing
    fp32_bytes: int
    quantized_bytes: int
    integer_layers: int
    quantized_layers: int

    def __str__(self) -> str:
        def row(name: str, t: Timing, size: int) -> str:
            return (f"{name:<10} latency {t.median_ms:9.3f} ms (rounds {t.fastest_ms:.3f}-{t.slowest_ms:.3f})"
                    f"   size {size:>12,} bytes")

        return "\n".join([
            (f"input {self.input}; {self.rounds} interleaved rounds of {self.calls_per_round} calls; "
             f"{self.threads} threads"),
            row("fp32", self.fp32, self.fp32_bytes),
            row("quantized", self.quantized, self.quantized_bytes),
            (f"speed-up {self.fp32.median_ms / self.quantized.median_ms:.2f}x   "
             f"size {self.quantized_bytes / self.fp32_bytes:.2f}x of fp32   "
             f"{self.integer_layers} of {self.quantized_layers} quantized layers on integer kernels"),
        ])


def run_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch as `quanta.calibrate` does: a tensor, ``(inputs, targets)`` or
    a dict of keyword arguments."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _describe(batch: Any) -> str:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__


def _rounds(models: list[nn.Module], batch: Any, rounds: int) -> tuple[int, list[list[float]]]:
    with torch.inference_mode():
        for m in models:  # warm up (integer kernels settle on their first call per input signature)
            for _ in range(3):
                run_model(m, batch)
        start = time.perf_counter()
        run_model(models[0], batch)
        calls = max(1, math.ceil(0.02 / max(time.perf_counter() - start, 1e-6)))
        times: list[list[float]] = [[] for _ in models]
        for _ in range(rounds):
            for m, out in zip(models, times):
                start = time.perf_counter()
                for _ in range(calls):
                    run_model(m, batch)
                out.append((time.perf_counter() - start) / calls * 1e3)
    return calls, times


def bench(job: BenchJob) -> BenchResult:
    """Measure the job's quantized model against its fp32 model (with ``job.threads`` torch
    threads for the speed check and the timing; the process's setting is restored after)."""
    if job.is_file and not pathlib.Path(job.target).is_file():
        raise CommandError(f"{job.target}: no such file")
    threads = torch.get_num_threads()
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    try:
        return _bench(job)
    finally:
        torch.set_num_threads(threads)


def _bench(job: BenchJob) -> BenchResult:
    float_model, calib = load_spec(job.model if job.is_file else job.target)  # type: ignore[arg-type]
    batch = example_input(job.input_shape, calib, "quanta bench", float_model)
    if job.is_file:
        quantized = load(job.target, model=spec_factory(job.model))  # type: ignore[arg-type]
    else:
        quantized = quantize_model(float_model, job.config.resolve(), calib, progress=False, example=batch)
    try:
        calls, (fp32, quant) = _rounds([float_model.eval(), quantized.eval()], batch, job.rounds)
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:  # (an exported program's guard)
        raise CommandError(f"the model does not run on input {_describe(batch)}: {str(e).splitlines()[0]}") from e
    timing = lambda ts: Timing(statistics.median(ts), min(ts), max(ts))
    return BenchResult(_describe(batch), job.rounds, calls, torch.get_num_threads(), timing(fp32), timing(quant),
                       storage_bytes(float_model), storage_bytes(quantized), *integer_layers(quantized))
