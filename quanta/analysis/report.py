"""`report`: one HTML file (and the same in Markdown) on where a quantized model loses accuracy,
with its PNG charts beside it (`quanta.analysis.plots`).

Contents: the layer-by-layer comparison (`quanta.compare`) as a table and an SQNR bar chart; per
quantized layer a histogram of its weights and of its input activations (the float model's; with
BatchNorm folded as the quantized model has it) with the quantizer's clipping range dashed; the
sensitivity ranking and chart when a `SensitivityReport` is given; the coverage (what runs
integer and on which kernels, what stayed float and why: `quanta.coverage`,
`quanta.conversion_report`); and, with ``latency=True``, each integer layer timed against the
float layer on the inputs it gets (the speed check's interleaved timing), else a note saying it
was not measured.
"""

from __future__ import annotations

import functools
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..integer.base import IntegerModule
from ..nn.modules.base import QuantModule
from ..transforms.convert import conversion_report
from ..transforms.coverage import coverage
from ..transforms.speed_check import _perf_counter, _time_pair
from . import plots
from .capture import ForwardFn, batches_of, capture_outputs
from .compare import OUTPUT, _reference, compare
from .sensitivity import SensitivityReport

LATENCY_ROUNDS = 15


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    images: dict[str, Path] = field(default_factory=dict)  # chart name → PNG
    notes: list[str] = field(default_factory=list)


def _range(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> tuple[float, float]:
    s, z = scale.detach().float(), zero_point.detach().float()
    return float(((qmin - z) * s).min()), float(((qmax - z) * s).max())


def clip_ranges(mod: nn.Module) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """(weight, input) clipping ranges of a simulated or integer layer; None where there is none
    (dynamic or float input, packed sub-byte weights). Per-channel weights: the widest channel."""
    w_range = a_range = None
    if isinstance(mod, QuantModule):
        q = dict(mod.quantizers())
        for key in ("weight", "input"):
            tq = q.get(key)
            w = getattr(mod, "weight", None) if key == "weight" else None
            if tq is None or not tq.is_enabled or tq.spec.dynamic or not tq.spec.has_scale \
                    or (tq.amax is None and not isinstance(w, torch.Tensor)):
                continue
            with torch.no_grad():  # (a weight quantizer without a stored range takes it from the weight)
                scale, zp = tq.qparams(None if tq.amax is not None else w)
            r = _range(scale, zp, tq.spec.qmin, tq.spec.qmax)
            w_range, a_range = (r, a_range) if key == "weight" else (w_range, r)
    elif isinstance(mod, IntegerModule):
        w, ws = getattr(mod, "weight", None), getattr(mod, "weight_scale", None)
        if isinstance(w, torch.Tensor) and w.dtype == torch.int8 and isinstance(ws, torch.Tensor):
            spec = getattr(mod, "weight_spec", None)
            qmax = spec.qmax if spec is not None else 2 ** (getattr(mod, "weight_bits", 8) - 1) - 1
            w_range = _range(ws, torch.zeros(()), -qmax, qmax)
        spec = getattr(mod, "input_spec", None) or getattr(mod, "act_spec", None)
        if spec is not None and not spec.dynamic and hasattr(mod, "input_scale"):
            a_range = _range(mod.input_scale, mod.input_zero_point, spec.qmin, spec.qmax)
    return w_range, a_range


def _latencies(reference: nn.Module, quant_model: nn.Module, inputs: dict[str, list[torch.Tensor]],
               names: list[str]) -> tuple[list[str], list[float], list[float]]:
    ref_mods, q_mods = dict(reference.named_modules()), dict(quant_model.named_modules())
    labels, f_ms, i_ms = [], [], []
    with torch.no_grad():
        for n in names:
            mod, ref = q_mods.get(n), ref_mods.get(n)  # the layer in the float reference model
            if not isinstance(mod, IntegerModule) or ref is None or not inputs.get(n):
                continue
            x = inputs[n][0]
            try:
                mod(x), ref(x)  # warm-up
                ti, tf = _time_pair(functools.partial(mod, x), functools.partial(ref, x), LATENCY_ROUNDS,
                                    _perf_counter)
            except (RuntimeError, TypeError, ValueError):
                continue
            labels.append(n)
            i_ms.append(min(ti) * 1e3)
            f_ms.append(min(tf) * 1e3)
    return labels, f_ms, i_ms


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return "-" if v is None else str(v)


def _table(head: list[str], rows: list[list[Any]], markdown: bool) -> str:
    if markdown:
        esc = [[_fmt(c).replace("|", "\\|") for c in r] for r in rows]
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in esc])
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}img{max-width:100%}")


def report(float_model: nn.Module, quant_model: nn.Module, data: Any, path: str | Path, *,
           sensitivity: SensitivityReport | None = None, latency: bool = False,
           forward_fn: ForwardFn | None = None, title: str = "quanta report") -> ReportFiles:
    """Write the report to ``path`` (an ``.html`` file; the ``.md`` and the PNGs go beside it,
    named after its stem). ``data``: a batch or batches run through both models. Neither model
    is modified. Needs matplotlib."""
    plots.pyplot()  # fail first, clearly, without matplotlib
    if sensitivity is not None and not isinstance(sensitivity, SensitivityReport):
        raise TypeError(f"sensitivity must be a SensitivityReport (quanta.sensitivity), got {type(sensitivity).__name__}")
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"path must name an .html file, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    batches = batches_of(data)
    cmp = compare(float_model, quant_model, batches, forward_fn=forward_fn)
    reference, _ = _reference(float_model, quant_model)
    names = [r.name for r in cmp.rows if r.quantized and r.name != OUTPUT]
    captured = capture_outputs(reference, batches, names, forward_fn=forward_fn, inputs=True)
    ref_mods, q_mods = dict(reference.named_modules()), dict(quant_model.named_modules())
    hists = []
    for n in names:
        w = getattr(ref_mods.get(n), "weight", None)
        w_range, a_range = clip_ranges(q_mods[n])
        acts = captured.inputs.get(n) or []
        hists.append(plots.LayerHistograms(n, w.detach() if isinstance(w, torch.Tensor) else None, w_range,
                                           torch.cat([a.flatten() for a in acts]) if acts else None, a_range))
    out = ReportFiles(path, path.with_suffix(".md"))
    stem = path.stem
    out.images["histograms"] = plots.histogram_grid(hists, path.with_name(f"{stem}_histograms.png"))
    sq = [r for r in cmp.rows if r.quantized or r.name == OUTPUT]
    out.images["sqnr"] = plots.bar_chart([r.name for r in sq], [r.sqnr_db for r in sq], path.with_name(f"{stem}_sqnr.png"),
                                         title="output SQNR per layer (higher is better)", xlabel="SQNR dB")
    if sensitivity is not None:
        out.images["sensitivity"] = plots.bar_chart(
            [r.layer for r in sensitivity.rows], [r.damage for r in sensitivity.rows],
            path.with_name(f"{stem}_sensitivity.png"), title=f"sensitivity ({sensitivity.mode}): damage to "
            f"{sensitivity.metric_name}", xlabel="damage (larger is worse)")
    if latency:
        q_inputs = capture_outputs(quant_model, batches[:1], names, forward_fn=forward_fn, inputs=True).inputs
        labels, f_ms, i_ms = _latencies(reference, quant_model, q_inputs, names)
        if labels:
            out.images["latency"] = plots.latency_chart(labels, f_ms, i_ms, path.with_name(f"{stem}_latency.png"))
        else:
            out.notes.append("per-layer latency: no integer layer could be timed")
    else:
        out.notes.append("per-layer latency not measured (pass latency=True to time each integer layer against float)")
    out.notes += cmp.notes + [f"only in the float model: {n} ({why})" for n, why in cmp.unmatched_a.items()] \
        + [f"only in the quantized model: {n} ({why})" for n, why in cmp.unmatched_b.items()]
    _write(out, title, cmp, sensitivity, coverage(quant_model), conversion_report(quant_model))
    return out


def _write(out: ReportFiles, title: str, cmp: Any, sens: SensitivityReport | None, cov: Any, lowering: list[Any]) -> None:
    sections: list[tuple[str, str | None, list[str], list[list[Any]]]] = [
        ("Layer by layer: quantized vs float", "sqnr",
         ["layer", "float", "quantized", "SQNR dB", "local dB", "cosine", "rel err", "max abs", "note"],
         [[r.name, r.kind_a, r.kind_b, r.sqnr_db, r.local_sqnr_db, r.cosine, r.rel_error, r.max_abs_error, r.note]
          for r in cmp.rows]),
        ("Weights and activations, clipping ranges dashed", "histograms", [], []),
    ]
    if sens is not None:
        sections.append(((f"Sensitivity ({sens.mode}, {sens.what}): float {_fmt(sens.float_metric)}, all quantized "
                         f"{_fmt(sens.quantized_metric)}"), "sensitivity", ["layer", "kind", sens.metric_name, "damage",
                                                                           "suggestion"],
                         [[r.layer, r.kind, r.metric, r.damage, r.suggestion] for r in sens.rows]))
    sections.append(("Coverage: what runs integer (and its kernels), what stays float and why", None,
                     ["module", "type", "status", "detail"], [[e.name, e.type, e.status, e.detail] for e in cov.entries]))
    if lowering:
        sections.append(("Conversion", None, ["layer", "simulated", "result", "detail"],
                         [[r.name, r.simulated, r.result, r.detail] for r in lowering]))
    if "latency" in out.images:
        sections.append(("Per-layer latency, float vs integer", "latency", [], []))
    md = [f"# {title}", ""] + [f"- {n}" for n in out.notes] + [""]
    ht = [(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
          f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>")]
    ht += ["<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in out.notes) + "</ul>"] if out.notes else []
    for heading, image, head, rows in sections:
        md += [f"## {heading}", ""]
        ht.append(f"<h2>{html.escape(heading)}</h2>")
        if image in out.images:
            src = out.images[image].name
            md += [f"![{image}]({src})", ""]
            ht.append(f"<img src='{html.escape(src)}' alt='{image}'>")
        if head:
            md += [_table(head, rows, True), ""]
            ht.append(_table(head, rows, False))
    ht.append("</body></html>")
    out.markdown.write_text("\n".join(md) + "\n", encoding="utf-8")
    out.html.write_text("\n".join(ht) + "\n", encoding="utf-8")
