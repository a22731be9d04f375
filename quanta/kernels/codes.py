"""Ops on 8-bit activation codes, the hand-off between integer layers: defined once each with a
readable reference in plain torch and a guarded native implementation (``quanta.kernels.native``).

    quantize_codes(x float, inv, zero_point, qmin, qmax, signed, channels_last) -> codes
        clamp(round_half_even(x · inv) + zero_point, qmin, qmax) in float32, as int8 (signed) or
        uint8; ``inv`` is the float32 reciprocal of the scale (what `quanta.core.quantize`
        multiplies by). Codes keep x's memory order, or with ``channels_last`` (4-D x) come out
        channels-last: [N, C, H, W] float -> [N, C, H, W] codes of strides (HWC, 1, WC, C).
    add_codes(a u8, sa, za, b u8, sb, zb, post_op, out_inv, out_zp, qmin, qmax) -> y
        y = (a - za) · sa + (b - zb) · sb in float32, then post_op ("none" / "relu" / "relu6"),
        then float32 y (``out_inv`` None) or uint8 quantize_codes(y, out_inv, out_zp, qmin, qmax).
    max_pool2d_codes(x 8-bit [N, C, H, W], kernel, stride, padding, dilation, ceil_mode) -> codes
        max pooling on codes (it commutes with the monotone quantization), same dtype as x.

The channels-last variant of quantize_codes is an argument, not a second op: the values are one
idea (the same reference computes them) and only the output's memory order differs, which the
caller must fix (a fake kernel states it from the arguments; an implementation choice could not).
Its native implementation writes channels-last codes from NCHW floats in one pass.

Under torch.compile the ops are traced (``traceable``): a native choice made by an eager call
puts the native library's graph operator (``quanta_native::quantize_static`` ...) in the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import native
from .library import Impl, KernelOp
from .post_ops import CLAMP_POST_OPS, codes_for

_POST = codes_for(CLAMP_POST_OPS)  # the native add_codes' post-op codes (csrc/post_op.h)


def dense(x: torch.Tensor) -> bool:
    """Contiguous, or channels-last: the layouts a one-pass kernel walks in memory order."""
    if x.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt is not None and x.is_contiguous(memory_format=fmt)


def _native_impl(fn: Callable[..., Any], guard: Callable[..., str | None]) -> Impl:
    """The native implementation of a codes op: available while the native library is loaded,
    asked at every call, traced ones included (`native.ready` is a dictionary lookup that
    torch.compile turns into a guard), so a graph compiled before any eager call still names the
    native operators."""
    return Impl("native", fn, guard, available=native.ready, traceable=False, graph_safe=True,
                available_while_tracing=True)


def _lib() -> Any:
    """The native functions: the graph operators while torch.compile traces (a graph calls C++
    directly), the Python bindings in eager calls (no dispatcher boxing)."""
    return torch.ops.quanta_native if torch.compiler.is_compiling() else native.module()


# ---------------------------------------------------------------------------- quantize_codes
def _check_code_range(op: str, qmin: int, qmax: int, signed: bool) -> None:
    lo, hi = (-128, 127) if signed else (0, 255)
    if not lo <= qmin <= qmax <= hi:
        raise ValueError(f"quanta::{op}: [qmin, qmax] = [{qmin}, {qmax}] must lie in [{lo}, {hi}] for "
                         f"{'int8' if signed else 'uint8'} codes")


def _quantize_codes_ref(x: torch.Tensor, inv: float, zero_point: int, qmin: int, qmax: int, signed: bool,
                        channels_last: bool) -> torch.Tensor:
    """The readable definition: ``clamp(round_half_even(x · inv) + zero_point, qmin, qmax)`` in
    float32 (``inv`` taken as float32), then int8 / uint8."""
    _check_code_range("quantize_codes", qmin, qmax, signed)
    if channels_last and x.dim() != 4:
        raise ValueError(f"quanta::quantize_codes: channels_last needs a 4-D input, got {x.dim()}-D")
    xf = x.detach()
    q = torch.mul(xf if xf.dtype == torch.float32 else xf.float(), inv).round_()
    if zero_point:
        q.add_(zero_point)
    codes = q.clamp_(qmin, qmax).to(torch.int8 if signed else torch.uint8)
    return codes.contiguous(memory_format=torch.channels_last) if channels_last else codes


def _guard_quantize_codes(x, inv, zero_point, qmin, qmax, signed, channels_last) -> str | None:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return f"x is {x.dtype} on {x.device.type} (native: float32 on the CPU)"
    if not dense(x):
        return f"x of strides {tuple(x.stride())} is neither contiguous nor channels-last"
    if not (-128 if signed else 0) <= qmin <= qmax <= (127 if signed else 255):
        return f"[qmin, qmax] = [{qmin}, {qmax}] outside the {'int8' if signed else 'uint8'} range"
    if channels_last and (x.dim() != 4 or signed):
        return "channels-last codes of a tensor that is not 4-D, or signed (native: uint8 [N, C, H, W])"
    return None


def _quantize_codes_native(x, inv, zero_point, qmin, qmax, signed, channels_last):
    lib = _lib()
    if channels_last and not x.is_contiguous(memory_format=torch.channels_last):  # NCHW -> channels-last
        return lib.quantize_to_channels_last(x, inv, zero_point, qmin, qmax)
    return lib.quantize_static(x, inv, zero_point, qmin, qmax, signed)  # (codes in x's memory order)


quantize_codes = KernelOp(
    "quantize_codes",
    "(Tensor x, float inv, int zero_point, int qmin, int qmax, bool signed, bool channels_last, str impl) -> Tensor",
    reference=_quantize_codes_ref,
    impls=[_native_impl(_quantize_codes_native, _guard_quantize_codes)],
    fake=_quantize_codes_ref,  # (plain torch: run on fake tensors it states shape, dtype and strides)
    traceable=True,
)


# ---------------------------------------------------------------------------- add_codes
def _check_add(a: torch.Tensor, b: torch.Tensor, post_op: str, out_inv: float | None, qmin: int, qmax: int) -> None:
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise TypeError(f"quanta::add_codes: needs uint8 codes, got {a.dtype} and {b.dtype}")
    if post_op not in _POST:
        raise ValueError(f"quanta::add_codes: post_op must be one of {sorted(_POST)}, got {post_op!r}")
    if out_inv is not None:
        if not out_inv > 0:
            raise ValueError(f"quanta::add_codes: out_inv must be positive (or None for float output), got {out_inv}")
        _check_code_range("add_codes", qmin, qmax, False)


def _add_codes_ref(a, sa, za, b, sb, zb, post_op, out_inv, out_zp, qmin, qmax):
    """The readable definition, the simulation's own float32 operations per element."""
    _check_add(a, b, post_op, out_inv, qmin, qmax)
    y = (a.float() - za) * sa
    y = y + (b.float() - zb) * sb
    if post_op != "none":
        y = y.clamp_(0.0, 6.0 if post_op == "relu6" else None)
    if out_inv is None:
        return y
    return _quantize_codes_ref(y, out_inv, out_zp, qmin, qmax, False, False)


def _guard_add_codes(a, sa, za, b, sb, zb, post_op, out_inv, out_zp, qmin, qmax) -> str | None:
    if a.device.type != "cpu" or b.device.type != "cpu":
        return "codes not on the CPU"
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        return f"codes of dtype {a.dtype} / {b.dtype} (native: uint8)"
    if a.shape != b.shape or a.stride() != b.stride() or not dense(a):
        return "operands of different shapes or memory orders, or not dense (native: one dense layout)"
    if post_op not in _POST:
        return f"post_op {post_op!r}"
    if out_inv is not None and not (out_inv > 0 and 0 <= qmin <= qmax <= 255):
        return f"uint8 output grid inv={out_inv}, [qmin, qmax] = [{qmin}, {qmax}]"
    return None


def _add_codes_native(a, sa, za, b, sb, zb, post_op, out_inv, out_zp, qmin, qmax):
    return _lib().add_codes(a, sa, za, b, sb, zb, _POST[post_op], 0.0 if out_inv is None else out_inv, out_zp,
                            qmin, qmax)


add_codes = KernelOp(
    "add_codes",
    "(Tensor a, float sa, int za, Tensor b, float sb, int zb, str post_op, float? out_inv, int out_zp, int qmin, "
    "int qmax, str impl) -> Tensor",
    reference=_add_codes_ref,
    impls=[_native_impl(_add_codes_native, _guard_add_codes)],
    fake=_add_codes_ref,
    traceable=True,
)


# ---------------------------------------------------------------------------- max_pool2d_codes
def pool_widened(x: torch.Tensor, pool: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``pool`` of 8-bit codes run on them widened (int32; float32 for 3-D inputs, whose 1d
    pooling has no integer kernel) and narrowed back: exact, and free of torch's 8-bit max-pool
    limits (channels-last uint8 fails once H · W exceeds 255; contiguous is a scalar loop).
    A window wholly in the padding (dilated pooling) pools to the lowest value of the wide type
    (-inf, int32 min); it is clamped to the lowest code of x's dtype (-128 int8, 0 uint8), what
    quantizing the float max-pool's -inf gives, where a plain narrowing would wrap it to 0."""
    wide = x.float() if x.dim() == 3 else x.to(torch.int32)
    lowest, highest = torch.iinfo(x.dtype).min, torch.iinfo(x.dtype).max
    return pool(wide).clamp_(lowest, highest).to(x.dtype)


def _max_pool2d_codes_ref(x, kernel, stride, padding, dilation, ceil_mode):
    if x.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"quanta::max_pool2d_codes: needs 8-bit codes, got {x.dtype}")
    out = pool_widened(x, lambda w: F.max_pool2d(w, list(kernel), list(stride), list(padding), list(dilation),
                                                 ceil_mode))
    # channels-last codes pool into channels-last codes, as the native kernel writes them, also where
    # the layout is ambiguous (a 1x1 image is contiguous both ways and torch would pick NCHW)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _guard_max_pool2d_codes(x, kernel, stride, padding, dilation, ceil_mode) -> str | None:
    if x.device.type != "cpu" or x.dtype != torch.uint8 or x.dim() != 4 or \
            not x.is_contiguous(memory_format=torch.channels_last):
        return f"x {x.dtype} {x.dim()}-D on {x.device.type} (native: channels-last uint8 [N, C, H, W] on the CPU)"
    if ceil_mode:
        return "ceil_mode"
    if not all(len(v) == 2 for v in (kernel, stride, padding, dilation)) or \
            not all(v > 0 for v in (*kernel, *stride, *dilation)) or \
            not all(0 <= p <= k // 2 for p, k in zip(padding, kernel)):
        return f"kernel {kernel}, stride {stride}, padding {padding}, dilation {dilation} (2 values each, padding " \
               "at most half the kernel)"
    for size, k, p, d in zip(x.shape[2:], kernel, padding, dilation):
        if size + 2 * p - d * (k - 1) - 1 < 0:
            return "an empty output"
    return None


def _max_pool2d_codes_native(x, kernel, stride, padding, dilation, ceil_mode):
    return _lib().max_pool2d_codes(x, list(kernel), list(stride), list(padding), list(dilation))


max_pool2d_codes = KernelOp(
    "max_pool2d_codes",
    "(Tensor x, int[] kernel, int[] stride, int[] padding, int[] dilation, bool ceil_mode, str impl) -> Tensor",
    reference=_max_pool2d_codes_ref,
    impls=[_native_impl(_max_pool2d_codes_native, _guard_max_pool2d_codes)],
    fake=_max_pool2d_codes_ref,
    traceable=True,
)


# ---------------------------------------------------------------------------- settled eager calls
# What a module's binding holds per input signature (`quanta.kernels.binding`): the op with every
# argument but the activations settled, for the implementation the guards chose for a first input
# of that signature (dtype, device, shape, strides). An eager call is then the kernel alone.
def quantize_codes_call(impl: str, x: torch.Tensor, inv: float, zero_point: int, qmin: int, qmax: int,
                        signed: bool, channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """`quantize_codes` settled for inputs of ``x``'s signature."""
    if impl == "reference":
        return lambda t: _quantize_codes_ref(t, inv, zero_point, qmin, qmax, signed, channels_last)
    _settled_impl(quantize_codes, impl)
    lib = native.module()
    if channels_last and not x.is_contiguous(memory_format=torch.channels_last):
        to_channels_last = lib.quantize_to_channels_last
        return lambda t: to_channels_last(t, inv, zero_point, qmin, qmax)
    static = lib.quantize_static
    return lambda t: static(t, inv, zero_point, qmin, qmax, signed)


def add_codes_call(impl: str, sa: float, za: int, sb: float, zb: int, post_op: str, out_inv: float | None,
                   out_zp: int, qmin: int, qmax: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`add_codes` settled for operands of one signature."""
    if impl == "reference":
        return lambda a, b: _add_codes_ref(a, sa, za, b, sb, zb, post_op, out_inv, out_zp, qmin, qmax)
    _settled_impl(add_codes, impl)
    add, code, inv = native.module().add_codes, _POST[post_op], 0.0 if out_inv is None else out_inv
    return lambda a, b: add(a, sa, za, b, sb, zb, code, inv, out_zp, qmin, qmax)


def max_pool2d_codes_call(impl: str, kernel: list[int], stride: list[int], padding: list[int],
                          dilation: list[int], ceil_mode: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """`max_pool2d_codes` settled for inputs of one signature."""
    if impl == "reference":
        return lambda x: _max_pool2d_codes_ref(x, kernel, stride, padding, dilation, ceil_mode)
    _settled_impl(max_pool2d_codes, impl)
    pool = native.module().max_pool2d_codes
    return lambda x: pool(x, kernel, stride, padding, dilation)


def _settled_impl(op: KernelOp, impl: str) -> None:
    if impl != "native":
        raise ValueError(f"quanta::{op.name}: unknown implementation {impl!r}; choose 'reference' or 'native'")


__all__ = ["add_codes", "add_codes_call", "dense", "max_pool2d_codes", "max_pool2d_codes_call", "pool_widened",
           "quantize_codes", "quantize_codes_call"]
