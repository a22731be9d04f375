"""`QATConvBn`: a simulated convolution followed by its BatchNorm, folded in a training-safe way.

The standard recipe (Jacob et al. 2018; torch.ao's ``ConvBn2d``): the weight the quantizer sees
is the *folded* weight ``w · γ/σ`` (``σ = sqrt(running_var + eps)``), exactly what inference
will quantize; while training, the convolution's output is scaled back by ``σ/γ`` and passed
through the BatchNorm, which normalises with the batch statistics and updates its running
statistics. Once the BatchNorm is frozen (eval mode, `freeze_bn`) the output equals the folded
convolution's, and `fold` returns that convolution for good (BatchNorm gone) for
``quanta.convert``.

Shapes: a Conv2d weight ``[out, in/groups, kh, kw]`` is scaled per output channel (axis 0); the
output ``[N, out, H, W]`` per channel (axis 1).
"""

from __future__ import annotations

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class QATConvBn(nn.Module):
    """``bn(conv(x))`` with the weight fake-quantized as it will be after folding.

    ``conv``: a quanta simulated convolution (``QuantConv1d/2d/3d``, with a weight quantizer);
    ``bn``: the BatchNorm that consumed its output (same channel count, running statistics).
    """

    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        if not isinstance(conv, _CONV) or getattr(conv, "weight_quantizer", None) is None:
            raise TypeError(f"QATConvBn needs a simulated Conv1d/2d/3d with a weight quantizer, got {type(conv).__name__}")
        if not isinstance(bn, _BN) or bn.running_var is None or bn.num_features != conv.out_channels:
            raise TypeError(f"QATConvBn needs a BatchNorm with running statistics over {conv.out_channels} channels, "
                            f"got {bn!r}")
        self.conv = conv
        self.bn = bn
        self.bn_frozen = False
        # The running variance the training forward folds with, copied before the BatchNorm
        # updates its own: the backward must not read a buffer the forward modified in place
        # (torch.compile would read the updated one, silently, and the gradients would be wrong).
        self.register_buffer("folding_var", bn.running_var.detach().clone(), persistent=False)

    @torch.no_grad()
    def sync_folding_var(self) -> None:
        """Copy the running variance into `folding_var` (done eagerly before each training step)."""
        self.folding_var.copy_(self.bn.running_var)

    def freeze_bn(self) -> None:
        """Stop updating the running statistics; normalise with them from now on."""
        self.bn_frozen = True
        self.bn.eval()

    def train(self, mode: bool = True) -> QATConvBn:
        super().train(mode)
        if self.bn_frozen:
            self.bn.eval()
        return self

    def _factor(self, running_var: torch.Tensor | None = None) -> torch.Tensor:
        bn = self.bn
        std = torch.sqrt((bn.running_var if running_var is None else running_var) + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
        return gamma / std

    def folded_weight(self, factor: torch.Tensor | None = None) -> torch.Tensor:
        factor = self._factor() if factor is None else factor
        return self.conv.weight * factor.reshape([-1] + [1] * (self.conv.weight.dim() - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if getattr(conv, "weight_quantizer", None) is None:
            raise RuntimeError("QATConvBn holds a converted convolution: call quanta.finalize_qat(model) "
                               "before quanta.convert (it folds the BatchNorm for good)")
        running_var = None
        if self.bn.training:  # the BatchNorm updates running_var below: fold with a copy
            if not torch.compiler.is_compiling():  # compiled: the prepare_qat step hook syncs it
                self.sync_folding_var()
            running_var = self.folding_var
        factor = self._factor(running_var)
        if conv.input_quantizer is not None:
            x = conv.input_quantizer(x)
        weight = conv.weight_quantizer(self.folded_weight(factor))
        y = conv._conv_forward(x, weight, None)
        channel = [1, -1] + [1] * (y.dim() - 2)
        y = y / factor.reshape(channel)
        if conv.bias is not None:
            y = y + conv.bias.reshape(channel)
        y = self.bn(y)
        if conv.output_quantizer is not None:
            y = conv.output_quantizer(y)
        return y

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """The convolution with the BatchNorm (running statistics) folded into its weight and
        bias, computed with the same float32 operations as `forward`."""
        conv, bn = self.conv, self.bn
        factor = self._factor()
        bias = conv.bias if conv.bias is not None else torch.zeros_like(factor)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(factor)
        new_weight = self.folded_weight().detach().clone()
        new_bias = ((bias - bn.running_mean) * factor + beta).detach().clone()
        conv.weight = nn.Parameter(new_weight, conv.weight.requires_grad)
        conv.bias = nn.Parameter(new_bias, conv.weight.requires_grad)
        return conv
