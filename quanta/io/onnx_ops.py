"""The two custom ops that carry quanta's quantization through ``torch.export`` into ONNX, and
their ONNX translations (`translation_table`). Their eager forms compute quanta's own numerics,
so an export model still runs in PyTorch:

- ``quanta_onnx::fake_quant(x, scale, zero_point, axis, block_size, qmin, qmax)``: an
  activation quantizer, translated to ``QuantizeLinear → DequantizeLinear`` (plus a ``Clip`` on
  the codes when the grid is narrower than int8 / uint8). The zero point's dtype (int8 / uint8)
  is the code type. ``block_size`` > 0 is ONNX's blocked form (opset 21): per-token scales
  ``[..., 1]`` are blocks of the whole last axis.
- ``quanta_onnx::dequantize(codes, scale, zero_point, axis, block_size, bits, signed)``: a
  weight, stored as an integer initializer and translated to ``DequantizeLinear`` (codes of
  <= 4 bits become INT4 / UINT4 tensors, see `onnx_export`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

#: torch.onnx's exporter (dynamo=True) implements opset 18 and later (lower targets go through a
#: version converter that cannot lower these graphs)
OPSET_MIN = 18
#: INT4 / UINT4 tensors and blocked (per-group, per-token) Quantize/DequantizeLinear
OPSET_BLOCKED = 21


def unsupported(path: str, why: str) -> ValueError:
    return ValueError(f"cannot export {path or '(root)'!r} to ONNX: {why}")


# ----------------------------------------------------------------------------- custom ops
def _expand(p: torch.Tensor, x: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """``p`` broadcast against ``x`` the way ONNX reads a scale: scalar, per axis, or blocked."""
    if p.dim() == 0:
        return p
    axis = axis % x.dim()
    if block:
        return p.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


@torch.library.custom_op("quanta_onnx::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, block_size: int,
               qmin: int, qmax: int) -> torch.Tensor:
    s = _expand(scale.float(), x, axis, block_size)
    z = _expand(zero_point.float(), x, axis, block_size)
    q = torch.clamp(torch.round(x.float() * (1.0 / s)) + z, qmin, qmax)  # quanta.core's order
    return ((q - z) * s).to(x.dtype)


@fake_quant.register_fake
def _(x, scale, zero_point, axis, block_size, qmin, qmax):  # type: ignore[no-untyped-def]
    return torch.empty_like(x)


@torch.library.custom_op("quanta_onnx::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], axis: int,  # noqa: UP045 (torch's schema inference)
               block_size: int, bits: int, signed: bool) -> torch.Tensor:
    s = _expand(scale.float(), codes, axis, block_size)
    level = codes.float() if zero_point is None else codes.float() - _expand(zero_point.float(), codes, axis,
                                                                             block_size)
    return level * s


@dequantize.register_fake
def _(codes, scale, zero_point, axis, block_size, bits, signed):  # type: ignore[no-untyped-def]
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def translation_table(opset: int) -> dict[Any, Callable[..., Any]]:
    """onnxscript translations of the two ops for ``torch.onnx.export(custom_translation_table=...)``."""
    import numpy as np
    from onnxscript import ir, values

    op = values.Opset("", opset)

    def attrs(axis: int, block_size: int) -> dict[str, int]:
        return {"axis": axis, **({"block_size": block_size} if block_size else {})}

    def fake_quant_onnx(x, scale, zero_point, axis: int, block_size: int, qmin: int, qmax: int):  # type: ignore[no-untyped-def]
        q = op.QuantizeLinear(x, scale, zero_point, **attrs(axis, block_size))
        dtype = np.int8 if qmin < 0 else np.uint8
        info = np.iinfo(dtype)
        if (qmin, qmax) != (info.min, info.max):  # narrower grid: QuantizeLinear saturates to the type
            lo = op.Constant(value=ir.tensor(np.array(qmin, dtype=dtype)))
            hi = op.Constant(value=ir.tensor(np.array(qmax, dtype=dtype)))
            q = op.Clip(q, lo, hi)
        return op.DequantizeLinear(q, scale, zero_point, **attrs(axis, block_size))

    def dequantize_onnx(codes, scale, zero_point, axis: int, block_size: int, bits: int, signed: bool):  # type: ignore[no-untyped-def]
        if bits <= 4:  # folded into an INT4 / UINT4 initializer after export
            to = ir.DataType.INT4 if signed else ir.DataType.UINT4
            codes = op.Cast(codes, to=to)
            zero_point = None if zero_point is None else op.Cast(zero_point, to=to)
        if zero_point is None:
            return op.DequantizeLinear(codes, scale, **attrs(axis, block_size))
        return op.DequantizeLinear(codes, scale, zero_point, **attrs(axis, block_size))

    return {torch.ops.quanta_onnx.fake_quant.default: fake_quant_onnx,
            torch.ops.quanta_onnx.dequantize.default: dequantize_onnx}
