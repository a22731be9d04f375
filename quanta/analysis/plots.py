"""PNG charts for `quanta.report` (matplotlib with the Agg backend, imported only when called).

Each function writes one PNG and returns its path; the figure is closed (no window, no state
left in pyplot). Sizes: ``FIG_DPI`` dots per inch; a histogram grid is ``HIST_CELL`` inches per
panel, one row per layer, columns weights | activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

FIG_DPI = 80
HIST_CELL = (4.0, 2.2)
BINS = 80


class LayerHistograms(NamedTuple):
    name: str
    weights: torch.Tensor | None  # float weights
    weight_range: tuple[float, float] | None  # the quantizer's clipping range (widest channel)
    activations: torch.Tensor | None  # the layer's float inputs
    activation_range: tuple[float, float] | None


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a clear error naming the install command."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("quanta.report needs matplotlib for its plots: pip install matplotlib") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _hist(ax: Any, values: torch.Tensor | None, clip: tuple[float, float] | None, title: str) -> None:
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)
    if values is None or values.numel() == 0:
        ax.text(0.5, 0.5, "not captured", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        return
    data = values.detach().float().flatten()
    if data.numel() > 200_000:
        data = data[torch.randperm(data.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    ax.hist(data.numpy(), bins=BINS, color="#4c72b0", log=True)
    if clip is not None and all(math.isfinite(c) for c in clip):
        for c in clip:
            ax.axvline(c, color="#c44e52", linestyle="--", linewidth=1)
        ax.text(0.99, 0.95, f"clip [{clip[0]:.3g}, {clip[1]:.3g}]", ha="right", va="top",
                transform=ax.transAxes, fontsize=6, color="#c44e52")


def histogram_grid(layers: Sequence[LayerHistograms], path: Path) -> Path:
    """One row per layer: its weights and its input activations, clipping range dashed."""
    plt = pyplot()
    rows = max(len(layers), 1)
    fig, axes = plt.subplots(rows, 2, figsize=(2 * HIST_CELL[0], rows * HIST_CELL[1]), squeeze=False)
    try:
        for row, layer in zip(axes, layers):
            _hist(row[0], layer.weights, layer.weight_range, f"{layer.name}: weights")
            _hist(row[1], layer.activations, layer.activation_range, f"{layer.name}: input activations")
        fig.tight_layout()
        fig.savefig(path, dpi=FIG_DPI)
    finally:
        plt.close(fig)
    return path


def bar_chart(labels: Sequence[str], values: Sequence[float], path: Path, *, title: str, xlabel: str) -> Path:
    """Horizontal bars, one per label (non-finite values drawn as 0 and marked)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 0.8 + 0.3 * max(len(labels), 1)))
    try:
        shown = [v if math.isfinite(v) else 0.0 for v in values]
        ax.barh(range(len(labels)), shown, color="#55a868")
        ax.set_yticks(range(len(labels)), [f"{n}{'' if math.isfinite(v) else f' ({v})'}" for n, v in zip(labels, values)],
                      fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=FIG_DPI)
    finally:
        plt.close(fig)
    return path


def latency_chart(labels: Sequence[str], float_ms: Sequence[float], integer_ms: Sequence[float], path: Path) -> Path:
    """Per layer, float and integer time per call side by side."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 0.8 + 0.4 * max(len(labels), 1)))
    try:
        pos = range(len(labels))
        ax.barh([p - 0.2 for p in pos], float_ms, height=0.4, label="float", color="#8172b2")
        ax.barh([p + 0.2 for p in pos], integer_ms, height=0.4, label="integer", color="#ccb974")
        ax.set_yticks(list(pos), list(labels), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per call (fastest round)", fontsize=8)
        ax.set_title("per-layer latency on this machine", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=FIG_DPI)
    finally:
        plt.close(fig)
    return path
