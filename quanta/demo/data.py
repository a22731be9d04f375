"""Offline data for the demo and the tests: scikit-learn's bundled digits and generated tasks."""

from __future__ import annotations

import torch


def digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits (1,797 real images shipped with the package), as
    ``(x_train, y_train, x_test, y_test)`` with ``x`` of shape ``[n, 1, 8, 8]`` scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install 'quanta[demo]'") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def sine_sequences(n: int = 2000, length: int = 24, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy sinusoids; the class is the frequency. ``x``: ``[n, length, 1]``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    t = torch.arange(length, dtype=torch.float32)
    freq = 0.15 + 0.12 * y.float()
    phase = torch.rand(n, generator=g) * 6.283
    x = torch.sin(freq[:, None] * t[None, :] + phase[:, None]) + 0.3 * torch.randn(n, length, generator=g)
    return x.unsqueeze(-1), y


def majority_tokens(n: int = 2000, length: int = 16, vocab: int = 12, classes: int = 4,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A generated language: random tokens with one of ``classes`` marker tokens planted
    more often than the others; the class is the most frequent marker."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randint(classes, vocab, (n, length), generator=g)
    noise = torch.randint(0, classes, (n, length), generator=g)
    use_noise = torch.rand(n, length, generator=g) < 0.25
    x = torch.where(use_noise, noise, x)
    plant = torch.rand(n, length, generator=g) < 0.3
    x = torch.where(plant, y[:, None].expand(-1, length), x)
    return x, y
