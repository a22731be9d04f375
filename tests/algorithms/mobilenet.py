"""A MobileNetV2-style network (inverted residual blocks: 1×1 expand, 3×3 depthwise, 1×1
project, BatchNorm after each conv) for the algorithm tests, trained on digits upsampled to 16×16."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: type) -> None:
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(conv_bn(cin, hidden, 1, act=act),
                                   conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act),
                                   conv_bn(hidden, cout, 1, act=None))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class TinyMobileNetV2(nn.Module):
    def __init__(self, act: type = nn.ReLU, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 16, 3, act=act),
            InvertedResidual(16, 16, 1, 2, act),
            InvertedResidual(16, 24, 2, 4, act),
            InvertedResidual(24, 24, 1, 4, act),
            conv_bn(24, 64, 1, act=act),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)


@torch.no_grad()
def spread_channel_ranges(model: TinyMobileNetV2, spread: float = 30.0, seed: int = 0) -> TinyMobileNetV2:
    """Reparametrise a trained model, in place and exactly (ReLU is positively homogeneous): in
    each block, BatchNorm channel ``i`` (γ, β) of the expand and depthwise stages × ``k_i``, the
    next conv's input channel ``i`` ÷ ``k_i``, ``k`` log-uniform in [1/spread, spread]. The float
    function is unchanged; the per-channel weight ranges then differ by ~``spread²``× as in
    pretrained MobileNetV2 (whose depthwise ranges span two orders of magnitude, Nagel et al.
    2019, fig. 2), which a 10-epoch run on digits does not reach by itself."""
    g = torch.Generator().manual_seed(seed)
    for block in model.features:
        if not isinstance(block, InvertedResidual):
            continue
        stages = list(block.block)
        for stage, nxt in itertools.pairwise(stages):
            bn, conv = stage[1], nxt[0]
            k = torch.exp((torch.rand(bn.num_features, generator=g) * 2 - 1) * torch.log(torch.tensor(spread)))
            bn.weight.mul_(k)
            bn.bias.mul_(k)
            if conv.groups == 1:
                conv.weight.div_(k.reshape(1, -1, 1, 1))
            else:
                conv.weight.div_(k.reshape(-1, 1, 1, 1))
    return model
