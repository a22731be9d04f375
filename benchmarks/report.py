"""Markdown tables of benchmark results, with the machine and versions they were measured on."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
from dataclasses import dataclass

import torch
from methods import FP32, PEER, QUANTA, quanta_version
from peers_openvino import openvino_version


@dataclass
class Row:
    method: str
    group: str
    median_ms: float | None = None
    rounds: int = 0
    size_bytes: int | None = None
    sqnr_db: float | None = None
    status: str = ""  # "" when measured, else "failed: ..." / "not available: ..."


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except (OSError, StopIteration):
        return ""
    keep = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "avx_vnni"]
    return ", ".join(k for k in keep if k in flags)


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return "not installed"


def header(threads: int, quick: bool, extra: list[str] | None = None) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# quanta benchmarks" + (" (QUICK smoke run: shrunk models, few repeats; not for quoting)" if quick else ""),
        "",
        f"- date: {now}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores; {cpu_flags()})",
        f"- threads: torch.set_num_threads({threads}); ONNX Runtime intra_op_num_threads={threads}; OpenVINO "
        f"INFERENCE_NUM_THREADS={threads}, PERFORMANCE_HINT=LATENCY, NUM_STREAMS=1",
        (f"- python {platform.python_version()}, torch {torch.__version__}, torchao {_version('torchao')}, "
         f"onnxruntime {_version('onnxruntime')}, onnx {_version('onnx')}, {openvino_version()}, "
         f"quanta {quanta_version()}"),
        "- timing: warm-up 2 calls (compile excluded), then interleaved repeats (each round in a seeded shuffled order), median; "
        "torch.inference_mode; inductor freezing on for every `+ compile` row",
        "- ratio vs fp32 = fp32 eager ms / method ms (>1 is faster); ratio vs best peer = best peer ms / "
        "method ms, best peer = fastest row that is neither fp32 nor quanta",
        "- size: state_dict tensor bytes (quantized/packed tensors by stored components; "
        "quanta: `quanta.integer.storage_bytes` if present); ONNX: file size",
        "- SQNR: 10·log10(‖y‖² / ‖y − ŷ‖²) of the method's output vs fp32 eager on the timed input "
        "(random weights: measures numerics, not task accuracy)",
    ]
    lines += [f"- {e}" for e in (extra or [])]
    return "\n".join(lines) + "\n"


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _fmt_size(b: int | None) -> str:
    if b is None:
        return "—"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def _fmt_sqnr(v: float | None) -> str:
    if v is None:
        return "—"
    return "exact" if math.isinf(v) else f"{v:.1f}"


def table(title: str, notes: str, rows: list[Row], idle: dict[str, float] | None = None) -> str:
    """One Markdown table; with ``idle`` (method → idle median ms) a `× idle` column: this
    table's median over the idle one (the --busy tables)."""
    fp32 = next((r.median_ms for r in rows if r.group == FP32 and r.median_ms), None)
    peers = [r.median_ms for r in rows if r.group == PEER and r.median_ms]
    best_peer = min(peers) if peers else None
    out = [f"### {title}", "", notes, "",
           "| method | median ms | vs fp32 | vs best peer | size | SQNR dB | rounds |" + (" × idle |" if idle else ""),
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if idle else "")]
    for r in rows:
        name = f"**{r.method}**" if r.group == QUANTA else r.method
        if r.status:
            out.append(f"| {name} | {r.status.replace('|', '/')} | | | {_fmt_size(r.size_bytes)} | | |"
                       + (" |" if idle else ""))
            continue
        vs_fp = f"{fp32 / r.median_ms:.2f}×" if fp32 and r.median_ms else "—"
        vs_peer = f"{best_peer / r.median_ms:.2f}×" if best_peer and r.median_ms else "—"
        out.append(f"| {name} | {_fmt_ms(r.median_ms)} | {vs_fp} | {vs_peer} | {_fmt_size(r.size_bytes)} "
                   f"| {_fmt_sqnr(r.sqnr_db)} | {r.rounds} |"
                   + (f" {r.median_ms / idle[r.method]:.2f}× |" if idle and r.method in idle and r.median_ms
                      else " — |" if idle else ""))
    return "\n".join(out) + "\n"
