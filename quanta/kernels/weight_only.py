"""Weight-only linear kernels: float activations x int8 / int4 weights, each defined once with a
readable reference (dequantize with quanta.core, then a float32 matmul) and torch's CPU
weight-only kernels behind guards.

Shapes::

    int8_weight_only_linear x [M, K] float, w [N, K] int8, scale [N]      -> y [M, N] (x's dtype)
    int4_weight_only_linear x [M, K] float, w [N, K/2] uint8 (two int4 codes a byte,
                                        quanta.core.pack_bits order), scales [N, K/g]
                                                                       -> y [M, N] (x's dtype)

torch 2.13 quirks (each a guard, with a test): ``_weight_int8pack_mm`` /
``_weight_int4pack_mm_for_cpu`` need ``x`` contiguous and scales in ``x``'s dtype; bfloat16
``x`` with K % 16 != 0 crashes the int8 kernel; the int4 kernel needs N % 16 == 0 and group
sizes 32, 64, 128 or 256; float32 ``x`` takes a slow path above a few rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import QuantSpec, dequantize, unpack_bits
from .library import Impl, KernelOp

INT4_GROUP_SIZES = (32, 64, 128, 256)


# ===================================================================== weight-only int8
def _check_wo(x, weight, what):
    if not x.is_floating_point() or x.dim() != 2:
        raise TypeError(f"{what}: x must be a 2-D float tensor, got {x.dtype} {tuple(x.shape)}")


def _int8_wo_ref(x, weight, w_scale, bias):
    """Dequantize with quanta.core, then a float32 matmul."""
    _check_wo(x, weight, "int8_weight_only_linear")
    spec = QuantSpec(bits=8, granularity="per_channel", axis=0)
    w = dequantize(weight, w_scale.reshape(-1), 0, spec)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


#: torch 2.13's CPU weight-only kernels are fast for bfloat16 activations only; with float32 they
#: run a slow path (measured, 1 thread: [128,768]x[768,3072] int8 430 ms, int4 790 ms vs 17 / 25 ms
#: for the dequantize-and-matmul reference; at M=1 they still beat the reference).
WEIGHT_ONLY_FP32_MAX_ROWS = 8


def _fp32_rows_reason(x):
    if x.dtype == torch.float32 and x.shape[0] > WEIGHT_ONLY_FP32_MAX_ROWS:
        return (f"float32 x with M={x.shape[0]} > {WEIGHT_ONLY_FP32_MAX_ROWS} rows (torch's float32 "
                "weight-only path is slower than the reference there; bfloat16 x is fast)")
    return None


def _guard_int8pack(x, weight, w_scale, bias):
    if x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2:
        return f"x {x.dtype} {x.dim()}-D (needs 2-D float32 / bfloat16)"
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        return f"weight {weight.dtype} {tuple(weight.shape)} does not fit x {tuple(x.shape)}"
    if w_scale.numel() != weight.shape[0]:
        return "w_scale needs one value per output channel"
    if x.dtype == torch.bfloat16 and x.shape[1] % 16:
        return f"bfloat16 x with K={x.shape[1]} not a multiple of 16 (torch 2.13 crashes or returns NaN)"
    return _fp32_rows_reason(x)


def _int8_wo_int8pack(x, weight, w_scale, bias):
    y = torch._weight_int8pack_mm(x.contiguous(), weight.contiguous(), w_scale.reshape(-1).to(x.dtype))
    return y if bias is None else y + bias.to(x.dtype)


def _wo_fake(x, weight, *rest):
    return x.new_empty((x.shape[0], weight.shape[0]))


int8_weight_only_linear = KernelOp(
    "int8_weight_only_linear",
    "(Tensor x, Tensor weight, Tensor w_scale, Tensor? bias, str impl) -> Tensor",
    reference=_int8_wo_ref,
    impls=[Impl("int8pack_mm", _int8_wo_int8pack, _guard_int8pack,
                available=lambda: hasattr(torch, "_weight_int8pack_mm"))],
    fake=_wo_fake,
)


# ===================================================================== weight-only int4
def int4_spec(group_size: int, symmetric: bool, signed: bool) -> QuantSpec:
    return QuantSpec(bits=4, signed=signed, symmetric=symmetric, granularity="per_group",
                     group_size=group_size, group_axis=-1)


def int4pack_for_cpu(weight: torch.Tensor, w_scale: torch.Tensor, w_zero_point: torch.Tensor | None,
                     group_size: int, signed: bool, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, scales_and_zeros)`` for ``torch._weight_int4pack_mm_for_cpu`` from canonical storage.

    The kernel computes ``ŵ = (u - 8) · s + zero`` with ``u`` in 0..15; quanta's ``ŵ = (c - zp) · s``
    maps to ``u = c + off`` (``off`` = 8 for signed codes, 0 for unsigned) and
    ``zero = (8 - off - zp) · s`` (exactly 0 for symmetric signed weights).
    """
    codes = unpack_bits(weight, 4, signed, length=in_features).to(torch.int32)
    off = 8 if signed else 0
    packed = torch._convert_weight_to_int4pack_for_cpu((codes + off).contiguous(), 1)
    s = w_scale.float()
    zp = torch.zeros_like(s) if w_zero_point is None else w_zero_point.float()
    zero = (8 - off - zp) * s
    return packed, torch.stack([s.t(), zero.t()], dim=-1).contiguous()


def _int4_wo_ref(x, weight, w_scale, w_zero_point, group_size, signed, bias, packed, scales_zeros):
    """Unpack and dequantize with quanta.core, then a float32 matmul."""
    _check_wo(x, weight, "int4_weight_only_linear")
    K = x.shape[1]
    codes = unpack_bits(weight, 4, signed, length=K)
    spec = int4_spec(group_size, w_zero_point is None, signed)
    w = dequantize(codes, w_scale, w_zero_point, spec)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def _guard_int4pack(x, weight, w_scale, w_zero_point, group_size, signed, bias, packed, scales_zeros):
    if x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2:
        return f"x {x.dtype} {x.dim()}-D (needs 2-D float32 / bfloat16)"
    if packed is None or scales_zeros is None:
        return "no prepacked weight (build it with int4pack_for_cpu in the module's pack())"
    N, K = weight.shape[0], x.shape[1]
    if group_size not in INT4_GROUP_SIZES or K % group_size:
        return f"group_size {group_size} (needs one of {INT4_GROUP_SIZES} dividing K={K})"
    if N % 16:
        return f"N={N} is not a multiple of 16"
    return _fp32_rows_reason(x)


def _int4_wo_int4pack(x, weight, w_scale, w_zero_point, group_size, signed, bias, packed, scales_zeros):
    y = torch._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scales_zeros.to(x.dtype))
    return y if bias is None else y + bias.to(x.dtype)


int4_weight_only_linear = KernelOp(
    "int4_weight_only_linear",
    "(Tensor x, Tensor weight, Tensor w_scale, Tensor? w_zero_point, int group_size, bool signed, "
    "Tensor? bias, Tensor? packed, Tensor? scales_zeros, str impl) -> Tensor",
    reference=_int4_wo_ref,
    impls=[Impl("int4pack_mm", _int4_wo_int4pack, _guard_int4pack,
                available=lambda: hasattr(torch, "_weight_int4pack_mm_for_cpu"))],
    fake=_wo_fake,
)


__all__ = ["INT4_GROUP_SIZES", "WEIGHT_ONLY_FP32_MAX_ROWS", "int4_spec", "int4_weight_only_linear",
           "int4pack_for_cpu", "int8_weight_only_linear"]
