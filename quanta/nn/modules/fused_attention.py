"""`ScaledDotProductAttention`: a user's ``softmax(q · kᵀ / c + mask) · v`` as one float call.

`quanta.prepare` puts it where a user block's own ``forward`` writes attention as
``matmul(q, k.transpose(-1, -2))``, a division or multiplication by a number, an optional
``+ mask``, ``softmax(dim=-1)``, an optional ``nn.Dropout`` and ``matmul(·, v)``
(`quanta.transforms.attention_rewrite`). It computes in float — nothing here is quantized —
with the native kernel of `quanta.kernels.attention_float` (within float32 rounding of the ops
it replaces), so the simulated and the integer model run the very same attention.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...kernels.attention_float import attention, reference


class ScaledDotProductAttention(nn.Module):
    """``softmax(scale · q · kᵀ + mask) · v``, with dropout on the probabilities in training."""

    def __init__(self, scale: float = 1.0, dropout_p: float = 0.0) -> None:
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
            raise ValueError(f"ScaledDotProductAttention: scale must be a finite nonzero number, got {scale!r}")
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
            raise ValueError(f"ScaledDotProductAttention: dropout_p must be in [0, 1], got {dropout_p!r}")
        self.scale, self.dropout_p = float(scale), float(dropout_p)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.dropout_p > 0:  # the user's own ops (and random stream)
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            probs = (scores if mask is None else scores + mask).softmax(dim=-1)
            return torch.matmul(nn.functional.dropout(probs, self.dropout_p, True), v)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or isinstance(q, torch.fx.Proxy) \
                or not all(isinstance(t, torch.Tensor) for t in (q, k, v, *(() if mask is None else (mask,)))):
            # exported as MatMul / Softmax / MatMul; a torch.fx trace of the model sees the same ops;
            # a mask that is a number adds as the user's `scores + mask` did
            return reference(q, k, v, mask, self.scale)
        return attention(q, k, v, mask, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}" + (f", dropout_p={self.dropout_p:g}" if self.dropout_p else "")


__all__ = ["ScaledDotProductAttention"]
