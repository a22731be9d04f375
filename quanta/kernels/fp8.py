"""fp8 linear on CUDA (``torch._scaled_mm`` behind a capability check), with a readable
reference (dequantize both, float32 matmul) that runs anywhere."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .library import Impl, KernelOp
from .linear import _cuda_capability_at_least


def _fp8_ref(x, x_scale, weight, w_scale, bias):
    """Dequantize both (``code · scale``) and matmul in float32."""
    xs = x.float() * x_scale.float().reshape(-1, 1)
    ws = weight.float() * w_scale.float().reshape(-1, 1)
    return F.linear(xs, ws, None if bias is None else bias.float())


def _guard_scaled_mm(x, x_scale, weight, w_scale, bias):
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    if x.dtype not in fp8 or weight.dtype not in fp8 or x.dim() != 2 or weight.dim() != 2:
        return "x and weight must be 2-D float8"
    if x_scale.numel() != 1 or w_scale.numel() != 1:
        return "per-tensor scales only (rowwise scaling needs bfloat16 output)"
    K, N = x.shape[1], weight.shape[0]
    if K % 16 or N % 16:
        return f"_scaled_mm needs K % 16 == 0 and N % 16 == 0; got K={K} N={N}"
    return None


def _fp8_scaled_mm(x, x_scale, weight, w_scale, bias):
    y = torch._scaled_mm(x.contiguous(), weight.contiguous().t(), scale_a=x_scale.float().reshape(()),
                         scale_b=w_scale.float().reshape(()), out_dtype=torch.float32)
    return y if bias is None else y + bias.float()


def _fp8_fake(x, x_scale, weight, w_scale, bias):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


fp8_linear = KernelOp(
    "fp8_linear",
    "(Tensor x, Tensor x_scale, Tensor weight, Tensor w_scale, Tensor? bias, str impl) -> Tensor",
    reference=_fp8_ref,
    impls=[Impl("scaled_mm", _fp8_scaled_mm, _guard_scaled_mm,
                available=lambda: _cuda_capability_at_least(8, 9), devices=("cuda",))],
    fake=_fp8_fake,
)


__all__: list[Any] = ["fp8_linear"]
