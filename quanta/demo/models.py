"""Small real models for the demo and the tests (trained in seconds on a CPU)."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU ×2, average pool, linear head for 8×8 digit images."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width  # constructor arguments kept: quanta.save records them
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class SequenceLSTM(nn.Module):
    """Two-layer LSTM classifier reading ``[batch, time, features]``."""

    def __init__(self, features: int = 1, hidden: int = 32, classes: int = 4):
        super().__init__()
        self.features, self.hidden, self.classes = features, hidden, classes
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    """Embedding, one transformer encoder layer, mean pooling, linear head."""

    def __init__(self, vocab: int = 12, dim: int = 32, heads: int = 4, classes: int = 4, length: int = 16):
        super().__init__()
        self.vocab, self.dim, self.heads, self.classes, self.length = vocab, dim, heads, classes, length
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.encoder(h).mean(dim=1))


class DocstringTransformer(nn.Module):
    """A transformer text classifier of realistic width: word embedding plus learned positions, ``layers`` `nn.TransformerEncoderLayer` blocks (``dim`` wide, 4×``dim`` MLP),
    mean pooling over the non-padding bytes, linear head. Input: ``[batch, length]`` token ids
    (0 = padding)."""

    def __init__(self, vocab: int = 4096, classes: int = 12, dim: int = 256, layers: int = 2, heads: int = 4,
                 length: int = 32):
        super().__init__()
        self.vocab, self.classes, self.dim, self.layers, self.heads, self.length = vocab, classes, dim, layers, heads, length
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.pos[:, : tokens.shape[1]])
        keep = (tokens != 0).unsqueeze(-1).to(h.dtype)
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.head(self.norm(pooled))
