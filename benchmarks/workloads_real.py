"""Benchmark models built the way users' models are written (random weights, no downloads).

- ``TFMobileNet``: a MobileNetV2-shaped network as it looks once ported from TensorFlow: every
  conv is an ``nn.Conv2d`` subclass whose ``forward`` applies TF "same" padding itself (static,
  asymmetric for stride 2: ``(0, 1, 0, 1)`` for a 3x3 conv on an even input) and calls
  ``F.conv2d`` with padding ``(0, 0)`` (as timm's ``conv2d_same`` writes it; torch.ao FX rejects an
  int there) — one class pads with an ``nn.ZeroPad2d`` module, the other with ``F.pad`` (both
  styles are common in ports and in timm's ``Conv2dSame``) —, BatchNorm with
  TF's eps 1e-3, ReLU6, residual adds written as ``x + y`` in ``forward``, global average pool
  and a 1001-class classifier (TF's ImageNet head).
- ``SentenceEncoder``: a MiniLM / BERT-mini-shaped sentence-embedding encoder: embedding
  LayerNorm, ``layers`` post-LN BERT layers (HF-style attention: ``nn.Linear`` query / key /
  value, matmul, softmax), mean pooling and L2 normalisation like sentence-transformers.
- ``SpeechEncoder``: a wav2vec2 / Whisper-style front end: two strided ``nn.Conv1d`` + GELU over
  log-mel-like ``[B, 80, T]`` frames, then PyTorch's own ``nn.TransformerEncoderLayer`` blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from workloads import BertLayer, MobileNetV2


def tf_same_padding(kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TF "SAME" padding of a square conv on an input whose size is a multiple of ``stride``,
    in ``F.pad`` order (left, right, top, bottom): the odd pixel goes after (right / bottom)."""
    total = max(kernel - stride, 0)
    before, after = total // 2, total - total // 2
    return (before, after, before, after)


class Conv2dSamePad(nn.Conv2d):
    """TF-ported conv: static "same" padding with an ``nn.ZeroPad2d``, then ``F.conv2d``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=bias)
        self.pad = nn.ZeroPad2d(tf_same_padding(kernel, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class Conv2dSameFunctional(nn.Conv2d):
    """TF-ported conv: static "same" padding with ``F.pad`` in ``forward``, then ``F.conv2d``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=bias)
        self.same = tf_same_padding(kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.same), self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class TFConvBNReLU6(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        conv_cls = Conv2dSameFunctional if groups > 1 else Conv2dSamePad  # depthwise: F.pad; others: ZeroPad2d
        super().__init__(conv_cls(cin, cout, k, stride, groups), nn.BatchNorm2d(cout, eps=1e-3),
                         *([nn.ReLU6()] if act else []))


class TFInvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [TFConvBNReLU6(cin, hidden, 1)] if expand != 1 else []
        layers += [TFConvBNReLU6(hidden, hidden, 3, stride, groups=hidden), TFConvBNReLU6(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)  # a plain add, as ports write it


class TFMobileNet(nn.Module):
    """MobileNetV2 (width 1.0) as a TF port: 52 ``Conv2d`` subclasses, 1001 classes."""

    def __init__(self, num_classes: int = 1001) -> None:
        super().__init__()
        layers, cin = [TFConvBNReLU6(3, 32, 3, 2)], 32
        for t, c, n, s in MobileNetV2.SETTINGS:
            for i in range(n):
                layers.append(TFInvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(TFConvBNReLU6(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SentenceEncoder(nn.Module):
    """Embedded tokens ``[B, S, hidden]`` -> L2-normalised sentence embeddings ``[B, hidden]``."""

    def __init__(self, layers: int = 6, hidden: int = 384, heads: int = 12, ffn: int = 1536) -> None:
        super().__init__()
        self.embed_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x)
        return F.normalize(x.mean(dim=1), dim=-1)


class SpeechEncoder(nn.Module):
    """Log-mel frames ``[B, n_mels, T]`` -> ``[B, T / 4, d_model]`` hidden states."""

    def __init__(self, n_mels: int = 80, d_model: int = 256, heads: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d_model, 3, stride=2, padding=1)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv1d(d_model, d_model, 3, stride=2, padding=1)
        self.act2 = nn.GELU()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d_model=d_model, nhead=heads, batch_first=True)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x)))).transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)
