"""Trained CNNs on real data for the accuracy table (`accuracy.py`): a MobileNetV2-style network
(inverted residuals: 1×1 expand, 3×3 depthwise, 1×1 project, BatchNorm, ReLU6) and a ResNet-style
one (BasicBlocks with residual additions), trained with a fixed seed on scikit-learn's digits
(8×8 upsampled to 16×16) and on Fashion-MNIST (28×28) where the Debian package is installed.
Trained weights are cached (``quanta.demo.cache.load_or_train``), keyed by model, data and recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quanta import demo
from quanta.demo.cache import load_or_train
from quanta.demo.data import FASHION_MNIST_DIR
from quanta.kernels.build import cache_root

#: where Debian's ``dataset-fashion-mnist`` puts the files (the package installs them under
#: /usr/share/datasets/fashion-mnist; quanta.demo.data looks in its own default first)
FASHION_DIRS = (FASHION_MNIST_DIR,)


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        stages = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        stages += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*stages)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV2Small(nn.Module):
    """MobileNetV2's layout at a small width: stem, 6 inverted residual blocks (expansion 1 then 4,
    as in the paper's first stages), a 1×1 conv to 128 channels, global pooling, a Linear head."""

    def __init__(self, classes: int = 10, stem_stride: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 16, 3, stem_stride),
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 2, 4), InvertedResidual(32, 32, 1, 4),
            conv_bn(32, 128, 1),
        )
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu_out(y + (x if self.downsample is None else self.downsample(x)))


class ResNetSmall(nn.Module):
    """ResNet-18's layout at a small width: stem conv, 3 stages of 2 BasicBlocks (16, 32, 64
    channels, stride 2 between stages, 1×1 projection shortcuts), global pooling, a Linear head."""

    def __init__(self, classes: int = 10, stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 16, 1),
                                    BasicBlock(16, 32, 2), BasicBlock(32, 32, 1),
                                    BasicBlock(32, 64, 2), BasicBlock(64, 64, 1))
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


ARCHITECTURES = {"mobilenet_v2": MobileNetV2Small, "resnet": ResNetSmall}


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    stem_stride: int  # 2 on 28×28 images (the feature maps of the 16×16 digits at stride 1)
    epochs: int


def digits16(quick: bool = False) -> Dataset:
    x_train, y_train, x_test, y_test = demo.digits(seed=0)
    up = lambda x: F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return Dataset("digits 16×16", up(x_train), y_train, up(x_test), y_test, 1, 3 if quick else 8)


def fashion(root: str | None = None, train_images: int = 6000, test_images: int = 2000) -> Dataset | None:
    """Fashion-MNIST (first ``train_images`` training images, first ``test_images`` test images),
    or None when not installed."""
    for d in ([root] if root else FASHION_DIRS):
        if d and os.path.isdir(d):
            data = demo.fashion_mnist(root=d, train_images=train_images)
            if data is not None:
                x_train, y_train, x_test, y_test = data
                return Dataset("Fashion-MNIST 28×28", x_train, y_train, x_test[:test_images], y_test[:test_images], 2, 4)
    return None


def trained(arch: str, data: Dataset, seed: int = 0, log=print, cache_dir: str | None = None) -> tuple[nn.Module, bool]:
    """``(model trained on data.x_train with Adam, lr 3e-3, batch 64, seed; cached?)``; weights cached
    in ``cache_dir`` (default: quanta's cache folder / bench_accuracy)."""
    init = {"classes": 10, "stem_stride": data.stem_stride}
    torch.manual_seed(seed)  # the initial weights
    model = ARCHITECTURES[arch](**init)
    recipe = {"epochs": data.epochs, "lr": 3e-3, "batch_size": 64, "seed": seed, "arch": arch}

    def train(m: nn.Module) -> nn.Module:
        torch.manual_seed(seed)
        return demo.train_classifier(m, data.x_train, data.y_train, epochs=data.epochs, lr=3e-3, seed=seed)

    return load_or_train(model, init, (data.x_train, data.y_train), recipe, train, log,
                         cache_dir=Path(cache_dir) if cache_dir else cache_root() / "bench_accuracy")
