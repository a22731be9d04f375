"""Helpers shared by the analysis tests (fixtures: conftest.py)."""

from __future__ import annotations

import torch

FRAGILE = "features.3"  # the layer conftest.fragile_cnn makes fragile


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
