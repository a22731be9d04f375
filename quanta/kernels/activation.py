"""Activation quantization for the integer kernels: ``quantize_activation``, defined once with a
readable reference (quanta.core itself) and guarded fast implementations (one native pass;
a few fused tensor operations).

    quantize_activation  x [M, K] float -> codes [M, K] int8/uint8, scale [] or [M, 1], zero_point (same)
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import QuantSpec, quantize, quantize_tensor
from ..core.qparams import check_finite
from . import native
from .codes import quantize_codes
from .library import Impl, KernelOp

_TINY = torch.finfo(torch.float32).tiny


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t.float()`` without a dispatched no-op call when it is float32 already (a small
    layer's call is mostly such per-op overhead)."""
    return t if t.dtype == torch.float32 else t.float()


def _act_spec(bits: int, signed: bool, symmetric: bool, narrow_range: bool, per_token: bool,
              rounding: str) -> QuantSpec:
    return QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow_range,
                     granularity="per_token" if per_token else "per_tensor", rounding=rounding,
                     dynamic=per_token)


def _quantize_activation_ref(x, scale, zero_point, bits, signed, symmetric, narrow_range, per_token,
                             rounding):
    """quanta.core itself: `quantize` with the given (static) qparams, or `quantize_tensor`."""
    spec = _act_spec(bits, signed, symmetric, narrow_range, per_token, rounding)
    if scale is not None:
        zp = torch.zeros((), dtype=torch.int32, device=x.device) if zero_point is None else zero_point
        return quantize(x, scale, zp, spec), scale.clone(), zp.clone()
    q = quantize_tensor(x, spec)
    return q.q, q.scale, q.zero_point


def _quantize_activation_fused(x, scale, zero_point, bits, signed, symmetric, narrow_range, per_token,
                               rounding):
    """The same arithmetic as quanta.core (``choose_qparams`` then ``round(x * (1/s)) + zp``,
    clamp), written as a few tensor ops without its per-call validation and layout machinery."""
    spec = _act_spec(bits, signed, symmetric, narrow_range, per_token, rounding)
    qmin, qmax = spec.qmin, spec.qmax
    # Codes carry no gradient: detached, the in-place steps below never touch a tensor autograd
    # saved (an input that requires grad, traced by torch.compile, failed on amax's output).
    xf = _f32(x.detach())
    if scale is not None:
        s = _f32(scale)
        z = zero_point
    elif symmetric:
        amax = xf.abs().amax(dim=-1, keepdim=True) if per_token else xf.abs().amax()
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(amax).all()):
            check_finite(x)
        s = torch.where(amax > 0, (amax / float(qmax)).clamp_min(_TINY), torch.ones_like(amax))
        z = None
    else:
        # (amin + amax: torch 2.13's CPU aminmax over the last dim is ~10x slower than both)
        lo = (xf.amin(dim=-1, keepdim=True) if per_token else xf.amin()).clamp_max_(0.0)
        hi = (xf.amax(dim=-1, keepdim=True) if per_token else xf.amax()).clamp_min_(0.0)
        width = hi - lo
        steps = float(qmax - qmin)
        if torch.compiler.is_compiling():  # no data-dependent branch in a graph (no NaN check)
            raw = torch.where(torch.isinf(width), hi / steps - lo / steps, width / steps)
        elif bool(torch.isfinite(width).all()):  # the usual case, one check
            raw = width / steps
        else:  # NaN / inf input (raises), or a finite range whose width overflows float32
            check_finite(x)
            raw = torch.where(torch.isinf(width), hi / steps - lo / steps, width / steps)
        s = raw.clamp_min_(_TINY).masked_fill_(width <= 0, 1.0)
        zf = torch.round(lo / s).neg_()  # qmin - round(lo / s), kept in float for the add below
        if qmin:
            zf.add_(qmin)
        z = zf.clamp_(qmin, qmax)
    q = torch.mul(xf, torch.reciprocal(s)).round_()  # in place from here: one M x K buffer in all
    if z is not None:
        q.add_(z)  # (float + float: no per-element int32 promotion)
        if z.dtype != torch.int32:
            z = z.to(torch.int32)
    codes = q.clamp_(qmin, qmax).to(torch.int8 if signed else torch.uint8)
    if z is None:
        z = torch.zeros(s.shape, dtype=torch.int32, device=x.device)
    return codes, (s.clone() if scale is not None else s), (z.clone() if scale is not None else z)


def _quantize_activation_native(x, scale, zero_point, bits, signed, symmetric, narrow_range, per_token,
                                rounding):
    """`_quantize_activation_fused` in one pass per row (``quanta.kernels.native``); rows with
    NaN / inf (or a range overflowing float32) go to the fused path, which raises or copes.
    Static qparams: `quanta.kernels.codes.quantize_codes` (native; this guard checked its
    arguments: row-major float32 on the CPU, 2..8-bit codes), the one static quantize."""
    spec = _act_spec(bits, signed, symmetric, narrow_range, per_token, rounding)
    if scale is None:
        out = native.module().quantize_rows(x, spec.qmin, spec.qmax, symmetric, signed)
        if out:
            return out[0], out[1], out[2]
        return _quantize_activation_fused(x, scale, zero_point, bits, signed, symmetric, narrow_range, per_token,
                                          rounding)
    zp = torch.zeros((), dtype=torch.int32) if zero_point is None else zero_point
    codes = quantize_codes(x, float(torch.reciprocal(_f32(scale)).reshape(())), int(zp.reshape(())),
                           spec.qmin, spec.qmax, signed, False, impl="native", checked=True)
    return codes, scale.clone(), zp.clone()


def _guard_quantize_native(x, scale, zero_point, bits, signed, symmetric, narrow_range, per_token, rounding):
    reason = _guard_quantize_activation(x, scale, zero_point, bits, signed, symmetric, narrow_range, per_token,
                                        rounding)
    if reason is not None:
        return reason
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride() != (x.shape[1], 1):
        return f"x {x.dtype} of strides {tuple(x.stride())} (native path: row-major float32 [M, K])"
    if scale is None and not per_token:
        return "dynamic per-tensor (native path: per token, or static)"
    if scale is not None and (scale.numel() != 1 or (zero_point is not None and zero_point.numel() != 1)):
        return "static qparams that are not one scale / zero point"
    return None


def _guard_quantize_activation(x, scale, zero_point, bits, signed, symmetric, narrow_range, per_token,
                               rounding):
    if rounding != "half_even":
        return f"rounding {rounding!r} (fused path rounds half to even)"
    if not 2 <= bits <= 8:
        return f"{bits} bits (fused path: 2..8)"
    if scale is not None and per_token:
        return "static per-token qparams"
    return None


def _quantize_activation_fake(x, scale, zero_point, bits, signed, symmetric, narrow_range, per_token,
                              rounding):
    shape = (*x.shape[:-1], 1) if per_token else ()
    return (x.new_empty(x.shape, dtype=torch.int8 if signed else torch.uint8),
            x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int32))


quantize_activation = KernelOp(
    "quantize_activation",
    "(Tensor x, Tensor? scale, Tensor? zero_point, int bits, bool signed, bool symmetric, "
    "bool narrow_range, bool per_token, str rounding, str impl) -> (Tensor, Tensor, Tensor)",
    reference=_quantize_activation_ref,
    impls=[Impl("native", _quantize_activation_native, _guard_quantize_native, available=native.ready,
                traceable=False),
           Impl("fused", _quantize_activation_fused, _guard_quantize_activation, devices=("cpu", "cuda"))],
    fake=_quantize_activation_fake,
    traceable=True,
)


def quantize_activation_spec(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                             zero_point: torch.Tensor | None = None, impl: str = "auto"):
    """`quantize_activation` for a `QuantSpec` (per_tensor or per_token INT)."""
    return quantize_activation(x, scale, zero_point, spec.bits, spec.signed, spec.symmetric,
                               spec.narrow_range, spec.granularity.value == "per_token",
                               spec.rounding.value, impl=impl)



__all__: list[Any] = ["quantize_activation", "quantize_activation_spec"]
