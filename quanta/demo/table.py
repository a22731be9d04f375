"""The demo's result rows, the machine they were measured on, and the Markdown table."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DemoRow:
    model: str              # "DocstringTransformer on stdlib docstrings"
    method: str             # "fp32", "static_int8", "static_int8 + cle, bias_correction", ...
    accuracy: float         # top-1 %, on the held-out split
    delta: float            # accuracy - fp32 accuracy, in points
    file_bytes: int         # size of the `quanta.save` file
    latency_ms: float       # median over interleaved rounds
    spread_ms: tuple[float, float]  # fastest and slowest round
    speedup: float          # fp32 median / this median
    sqnr_db: float          # SQNR of the logits against fp32 (inf for fp32 itself)
    integer_layers: str     # "integer / quantizable" layers after conversion ("" for fp32)
    weights: str            # "trained" now or "cached"
    kernels: str = ""       # the integer kernels that ran in the timed calls ("onednn×4"; "" for fp32)
    kept_float: tuple[str, ...] = ()  # `KeptFloat.describe()` of each layer the method keeps float


def kept_float_notes(model: torch.nn.Module) -> tuple[str, ...]:
    """What `DemoRow.kept_float` holds for a quantized ``model`` (`quanta.kept_float`)."""
    from ..transforms import kept_float

    return tuple(k.describe() for k in kept_float(model))


def machine_line(native_status: str) -> str:
    """``2026-12-06, AMD EPYC (2 cores; avx2 fma), torch 2.13.0, 2 threads, native kernels: ...``
    (the CPU features say which int8 kernels can run: see ``quanta doctor``)."""
    from ..kernels.build_config import cpu_features, cpu_model

    features = " ".join(cpu_features()) or "no AVX2/AVX-512"
    return (f"{datetime.date.today().isoformat()}, {cpu_model()} ({os.cpu_count()} cores; {features}), torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, native kernels: {native_status}")


def format_table(rows: list[DemoRow], machine: str = "", rounds: int = 0) -> str:
    lines = []
    if machine:
        lines += [f"Measured {machine}; latency: median of {rounds} interleaved rounds (fastest–slowest).", ""]
    lines += [("| model | method | accuracy % (Δ vs fp32) | file KiB | latency ms (spread) | speed-up "
               "| logits SQNR dB | integer layers | kernels |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sqnr = "—" if r.sqnr_db == float("inf") else f"{r.sqnr_db:.1f}"
        lines.append(f"| {r.model} | {r.method} | {r.accuracy:.2f} ({r.delta:+.2f}) | {r.file_bytes / 1024:.1f} | "
                     f"{r.latency_ms:.2f} ({r.spread_ms[0]:.2f}–{r.spread_ms[1]:.2f}) | {r.speedup:.2f}x | {sqnr} | "
                     f"{r.integer_layers or '—'} | {r.kernels or '—'} |")
    notes = [f"- {r.model}, {r.method}: kept float: {k}" for r in rows for k in r.kept_float]
    if notes:
        lines += ["", "Layers kept float (integer vs float time on their input, or why they could not be lowered):",
                  *notes]
    return "\n".join(lines)
