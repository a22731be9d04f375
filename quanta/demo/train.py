"""A minimal training loop and accuracy metric for the demo models."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 10,
                     lr: float = 3e-3, batch_size: int = 64, seed: int = 0,
                     on_epoch: Callable[[int], None] | None = None) -> nn.Module:
    """Adam + cross-entropy, shuffled mini-batches; returns the model in eval mode.
    ``on_epoch(epoch)`` is called after each epoch (progress)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    return 100.0 * correct / len(y)
