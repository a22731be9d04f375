"""Average pools with a quantized input (the output stays on the input's grid up to rounding)."""

from __future__ import annotations

from torch import nn

from .base import QuantModule


class _Pool(QuantModule):
    weight_names = ()
    weight_channel_axis = None


class QuantAvgPool1d(_Pool, nn.AvgPool1d):
    float_type = nn.AvgPool1d


class QuantAvgPool2d(_Pool, nn.AvgPool2d):
    float_type = nn.AvgPool2d


class QuantAvgPool3d(_Pool, nn.AvgPool3d):
    float_type = nn.AvgPool3d


class QuantAdaptiveAvgPool1d(_Pool, nn.AdaptiveAvgPool1d):
    float_type = nn.AdaptiveAvgPool1d


class QuantAdaptiveAvgPool2d(_Pool, nn.AdaptiveAvgPool2d):
    float_type = nn.AdaptiveAvgPool2d


class QuantAdaptiveAvgPool3d(_Pool, nn.AdaptiveAvgPool3d):
    float_type = nn.AdaptiveAvgPool3d
