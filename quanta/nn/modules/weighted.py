"""Quantized Linear, convolutions, transposed convolutions and Embedding.

Each is the float class with the `QuantModule` mixin in front: parameters keep their names
(``weight``, ``bias``), so a float ``state_dict`` loads into them unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantModule


class QuantLinear(QuantModule, nn.Linear):
    float_type = nn.Linear

    def forward_with(self, weights: dict[str, torch.Tensor], x: Any) -> Any:
        return F.linear(x, weights["weight"], self.bias)


class _ConvForward:
    def forward_with(self, weights: dict[str, torch.Tensor], x: Any) -> Any:
        return self._conv_forward(x, weights["weight"], self.bias)  # type: ignore[attr-defined]


class QuantConv1d(_ConvForward, QuantModule, nn.Conv1d):
    float_type = nn.Conv1d


class QuantConv2d(_ConvForward, QuantModule, nn.Conv2d):
    float_type = nn.Conv2d


class QuantConv3d(_ConvForward, QuantModule, nn.Conv3d):
    float_type = nn.Conv3d


class _TransposedAxes:
    # ConvTranspose weights are [in, out / groups, *kernel]: channels out on axis 1.
    weight_channel_axis = 1
    weight_reduce_axis = 0


class QuantConvTranspose1d(_TransposedAxes, QuantModule, nn.ConvTranspose1d):
    float_type = nn.ConvTranspose1d


class QuantConvTranspose2d(_TransposedAxes, QuantModule, nn.ConvTranspose2d):
    float_type = nn.ConvTranspose2d


class QuantConvTranspose3d(_TransposedAxes, QuantModule, nn.ConvTranspose3d):
    float_type = nn.ConvTranspose3d


class QuantEmbedding(QuantModule, nn.Embedding):
    """Embedding with a quantized table (one scale per row by default); indices are not quantized."""

    float_type = nn.Embedding
    quantize_input = False

    def forward_with(self, weights: dict[str, torch.Tensor], x: Any) -> Any:
        return F.embedding(x, weights["weight"], self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)
