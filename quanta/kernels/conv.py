"""``int8_conv``: convolution (1d / 2d / 3d) of 8-bit activation codes with int8 weights.

One op for every spatial rank (the rank is the input's: ``[N, C, L]``, ``[N, C, H, W]``,
``[N, C, D, H, W]``)::

    quanta::int8_conv(Tensor x, float x_scale, int x_zero_point,
                      Tensor weight, Tensor w_scale, Tensor? bias,
                      int[] stride, int[] padding, int[] dilation, int groups,
                      str post_op, float? out_scale, int out_zero_point,
                      Tensor? packed, str impl) -> Tensor

- ``x``: activation codes, ``uint8`` (asymmetric, any zero point in 0..255) or ``int8``
  (any zero point in -128..127, usually 0); ``x_hat = (x - x_zero_point) * x_scale``.
- ``weight``: int8 codes ``[O, C / groups, *kernel]``, symmetric, one scale per output channel
  (``w_scale``, float32 ``[O]``); ``bias``: float32 ``[O]`` or None (added in float).
- ``post_op``: ``"none"``, ``"relu"`` or ``"relu6"`` (``clamp(y, 0, 6)``), applied to the float
  result before any requantization.
- output: ``out_scale=None`` gives float32 ``y``; a float gives uint8 codes
  ``clamp(round_half_even(y / out_scale) + out_zero_point, 0, 255)`` (`quanta.core.quantize`),
  so consecutive integer convolutions pass uint8 activations with no float tensor between.
- ``packed``: the weight prepacked for oneDNN by :func:`prepack` (with the *same* stride,
  padding, dilation and groups); None prepacks per call (slow) or is ignored by the reference.

Reference (readable, exact): the integer accumulation ``acc = Σ (x - zp) · w`` is a float64
convolution of integer-valued tensors, exact because every partial sum is an integer of
magnitude ≤ K · 255 · 128 < 2^53 (K = C/groups · prod(kernel)); then, in float32,
``y = float32(acc) · m[o] + bias[o]`` with the per-channel multiplier ``m = float32(x_scale ·
w_scale)``; post-op; optional requantization. The ``native`` implementation
(`quanta.kernels.conv_native`) computes exactly this, bit for bit.

Fast path ``native`` (first where its guards accept: 1d / 2d, groups = 1 with C % 4 = 0, or
depthwise): quanta's direct convolution, `quanta.kernels.conv_native`, bit for bit the reference;
``auto`` passes over it to oneDNN for large outputs of short sums (``conv_native.prefer_onednn``).

Fast path ``onednn``: ``torch.ops.onednn.qconv_pointwise`` (x86 oneDNN, u8 × s8 → s32 with
VNNI). Integer accumulation is exact (int32); the float rescale is done in float32 by oneDNN,
so float outputs differ from the reference by a few float32 ulps of ``|acc · x_scale ·
w_scale| + |bias|``, and uint8 outputs differ by one code where ``y / out_scale`` lies within
those ulps of a rounding tie (measured ~1e-6 of the codes, see the tests). Activations are
given to oneDNN channels-last (``x.contiguous(memory_format=channels_last)``: free when they
already are); the output comes back channels-last (NLC / NHWC / NDHWC strides with the usual
logical ``[N, O, *spatial]`` shape). A 1d convolution runs as a 2d one of unit height (oneDNN's
1d entry fuses no relu6); oneDNN's 3d convolution fuses no post-op, so there the post-op is a
clamp of the output (exact on uint8 codes: quantization is monotone). int8 activations are shifted to uint8 exactly
(``x ^ 0x80``, zero point + 128): oneDNN's conv takes only uint8 sources.

The fast path requires exact u8 × s8 sums, which needs VNNI (or AMX) for full-range weights: without
it oneDNN computes u8 × s8 pairs with ``vpmaddubsw``, which saturates to int16 (measured on an AVX2
EPYC: 255 · ±127 pairs summed to ±32767 each). Weights within ±64 (7-bit codes) cannot saturate
(2 · 255 · 64 = 32640). `quanta.kernels.u8s8_saturation` probes the kernel once per weight bound;
without VNNI ``onednn`` runs weights within ±64 and its guard refuses wider ones, saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..core import QuantSpec, quantize
from . import conv_native
from .conv_shapes import conv_output_shape, kernel_strides
from .library import Impl, KernelOp
from .u8s8_saturation import SaturationProbe

#: the grid of uint8 outputs (and of uint8 activations): unsigned asymmetric 8-bit
UINT8_SPEC = QuantSpec(bits=8, signed=False, symmetric=False)
POST_OPS = ("none", "relu", "relu6")

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
#: largest |x - zp| · |w| of one product: 255 · 128 (int8 weights may hold -128)
_MAX_PRODUCT = 255 * 128

SCHEMA = ("(Tensor x, float x_scale, int x_zero_point, Tensor weight, Tensor w_scale, Tensor? bias, "
          "int[] stride, int[] padding, int[] dilation, int groups, str post_op, float? out_scale, "
          "int out_zero_point, Tensor? packed, str impl) -> Tensor")


# ---------------------------------------------------------------------------- argument checks
def check_args(x: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int, post_op: str, out_scale: float | None,
               out_zero_point: int) -> None:
    """Raise a clear error for inputs no implementation can run (shared by every impl)."""
    where = "quanta::int8_conv"
    if x.dim() not in _CONV:
        raise ValueError(f"{where}: x must be [N, C, L], [N, C, H, W] or [N, C, D, H, W], got shape {tuple(x.shape)}")
    d = x.dim() - 2
    if x.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"{where}: x must hold uint8 or int8 activation codes, got {x.dtype}")
    lo, hi = (0, 255) if x.dtype == torch.uint8 else (-128, 127)
    if not lo <= x_zero_point <= hi:
        raise ValueError(f"{where}: x_zero_point {x_zero_point} is outside the {x.dtype} range [{lo}, {hi}]")
    if not (x_scale > 0 and x_scale < float("inf")):
        raise ValueError(f"{where}: x_scale must be positive and finite, got {x_scale}")
    if weight.dtype != torch.int8 or weight.dim() != x.dim():
        raise TypeError(f"{where}: weight must be int8 codes [O, C / groups, *kernel] with {d} kernel dims, "
                        f"got {weight.dtype} {tuple(weight.shape)}")
    out_ch = weight.shape[0]
    if groups < 1 or x.shape[1] % groups or out_ch % groups or weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"{where}: input channels {x.shape[1]} do not fit weight {tuple(weight.shape)} "
                         f"with groups={groups}")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (out_ch,):
        raise ValueError(f"{where}: w_scale must be float32 [{out_ch}] (one per output channel), got "
                         f"{w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (out_ch,)):
        raise ValueError(f"{where}: bias must be float32 [{out_ch}] or None, got {bias.dtype} {tuple(bias.shape)}")
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != d:
            raise ValueError(f"{where}: {name} needs {d} values for a {d}d convolution, got {list(v)}")
    if any(s < 1 for s in stride) or any(p < 0 for p in padding) or any(v < 1 for v in dilation):
        raise ValueError(f"{where}: invalid stride {list(stride)} / padding {list(padding)} / "
                         f"dilation {list(dilation)}")
    if any(s <= 0 for s in conv_output_shape(x.shape, weight.shape, stride, padding, dilation)[2:]):
        raise ValueError(f"{where}: input {tuple(x.shape)} is smaller than the (dilated) kernel "
                         f"{tuple(weight.shape[2:])} with padding {list(padding)}")
    if post_op not in POST_OPS:
        raise ValueError(f"{where}: post_op must be one of {POST_OPS}, got {post_op!r}")
    if out_scale is not None:
        if not (out_scale > 0 and out_scale < float("inf")):
            raise ValueError(f"{where}: out_scale must be positive and finite, got {out_scale}")
        if not 0 <= out_zero_point <= 255:
            raise ValueError(f"{where}: out_zero_point of uint8 codes must be in [0, 255], got {out_zero_point}")


def apply_post_op(y: torch.Tensor, post_op: str) -> torch.Tensor:
    if post_op == "relu":
        return y.clamp_min(0.0)
    if post_op == "relu6":
        return y.clamp(0.0, 6.0)
    return y


# ---------------------------------------------------------------------------- reference
def accumulate(x: torch.Tensor, x_zero_point: int, weight: torch.Tensor, stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """``acc[n, o, ...] = Σ (x - zp) · w`` as a float64 tensor holding exact integers.

    Zero padding pads ``x - zp`` with 0, i.e. the codes with ``zp`` (the real value 0.0)."""
    return _CONV[x.dim()](x.double() - x_zero_point, weight.double(), None, list(stride), list(padding),
                          list(dilation), groups)


def reference(x: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
              groups: int, post_op: str, out_scale: float | None, out_zero_point: int,
              packed: torch.Tensor | None) -> torch.Tensor:
    check_args(x, x_scale, x_zero_point, weight, w_scale, bias, stride, padding, dilation, groups, post_op,
               out_scale, out_zero_point)
    acc = accumulate(x, x_zero_point, weight, stride, padding, dilation, groups)
    bshape = (1, -1) + (1,) * (x.dim() - 2)
    y = acc.float() * (x_scale * w_scale.double()).float().view(bshape)
    if bias is not None:
        y = y + bias.float().view(bshape)
    y = apply_post_op(y, post_op)
    if out_scale is not None:
        y = quantize(y, out_scale, out_zero_point, UINT8_SPEC)
    out = torch.empty_strided(y.shape, kernel_strides(y.shape), dtype=y.dtype, device=y.device)
    return out.copy_(y)


def _fake(x: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor, w_scale: torch.Tensor,
          bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
          groups: int, post_op: str, out_scale: float | None, out_zero_point: int,
          packed: torch.Tensor | None, impl: str = "auto") -> torch.Tensor:
    shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return x.new_empty_strided(shape, kernel_strides(shape), dtype=torch.float32 if out_scale is None else torch.uint8)


# ---------------------------------------------------------------------------- oneDNN
def _onednn_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """oneDNN's ``x_u8 @ w_s8.T`` as a 1x1 convolution with unit scales (the `SaturationProbe` kernel)."""
    n, ones = w.shape[0], torch.ones(w.shape[0])
    packed = torch.ops.onednn.qconv_prepack(w[:, :, None, None].contiguous(), ones, 1.0, 0, [1, 1], [0, 0], [1, 1],
                                            1, None)
    y = torch.ops.onednn.qconv_pointwise.default(
        x[:, :, None, None].contiguous(memory_format=torch.channels_last), 1.0, 0, packed, ones,
        torch.zeros(n, dtype=torch.int32), None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
    return y[:, :, 0, 0]


#: without VNNI (or AMX), oneDNN's u8 × s8 convolution saturates int16 pair sums
ONEDNN_SATURATION = SaturationProbe("oneDNN", _onednn_sums)


def _onednn_present() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_pointwise")


def _onednn_available() -> bool:
    return _onednn_present() and ONEDNN_SATURATION.exact_bound() is not None


def _onednn_limits() -> str | None:
    return ONEDNN_SATURATION.limits() if _onednn_present() else "this torch has no oneDNN qconv"


def onednn_weight_refusal(weight: torch.Tensor) -> str | None:
    """Why oneDNN's convolution does not sum these int8 weight codes exactly on this CPU, or None
    (full range with VNNI; within ±64, 7-bit codes, without)."""
    return ONEDNN_SATURATION.refusal(weight)


def _as_2d(x_or_w: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    """A 1d convolution as a 2d one with a unit height (oneDNN fuses more post-ops in 2d)."""
    return x_or_w.unsqueeze(2), [1, *stride], [0, *padding], [1, *dilation]


def prepack(weight: torch.Tensor, w_scale: torch.Tensor, x_scale: float, x_zero_point: int,
            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
            spatial: Sequence[int] | None = None) -> torch.Tensor:
    """oneDNN's blocked form of the int8 ``weight`` (an opaque mkldnn tensor) for these conv
    parameters (a 1d weight is packed as a 2d one of unit height). The activation qparams only
    steer oneDNN's choice of layout: any x_scale and zero point may be used at run time.

    ``spatial``: the input's spatial size, when known. oneDNN then picks a layout for it, which
    matters (measured, 512→512 3x3 conv on 7x7 at batch 1: 1.82 ms without the hint, 0.61 ms
    with it; a batch-1 hint serves every batch size as well as an exact one)."""
    hint = None if spatial is None else [1, weight.shape[1] * groups, *spatial]
    if weight.dim() == 3:
        weight, stride, padding, dilation = _as_2d(weight, stride, padding, dilation)
        hint = None if hint is None else [hint[0], hint[1], 1, *hint[2:]]
    return torch.ops.onednn.qconv_prepack(weight.contiguous(), w_scale.float().contiguous(), float(x_scale),
                                          int(x_zero_point), list(stride), list(padding), list(dilation),
                                          int(groups), hint)


_ZERO_POINTS: dict[int, torch.Tensor] = {}
_ATTRS = {"none": ("none", [], ""), "relu": ("relu", [], ""), "relu6": ("hardtanh", [0.0, 6.0], "")}


def _onednn_guard(x: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, post_op: str, out_scale: float | None,
                  out_zero_point: int, packed: torch.Tensor | None) -> str | None:
    if x.dtype not in (torch.uint8, torch.int8) or weight.dtype != torch.int8:
        return f"needs uint8/int8 activations and int8 weights, got {x.dtype} / {weight.dtype}"
    if x.dim() not in _CONV:
        return f"needs a 3d, 4d or 5d input, got {x.dim()}d"
    if x.numel() == 0:
        return "empty input"
    reduction = weight[0].numel() if weight.dim() else 0
    if reduction * _MAX_PRODUCT >= 2**31:
        return f"a reduction of {reduction} products may overflow oneDNN's int32 accumulator"
    # (while torch.compile traces, ``packed`` is a fake tensor that does not report its layout)
    if packed is not None and not packed.is_mkldnn and not torch.compiler.is_compiling():
        return "packed must be the mkldnn tensor made by quanta.kernels.conv.prepack"
    if post_op not in _ATTRS:
        return f"post_op {post_op!r} is not supported"
    return onednn_weight_refusal(weight)


def onednn_call(x_dim: int, x_scale: float, x_zero_point: int, weight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                groups: int, post_op: str, out_scale: float | None, out_zero_point: int,
                packed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """oneDNN's int8 convolution with everything but the uint8 codes settled: ``run(x)`` for a
    4d / 5d uint8 ``x`` (any layout; the kernel reads channels-last) and a ``post_op`` oneDNN
    fuses at that rank. Integer modules keep one per input signature, so that a call costs the
    kernel and little else; `_onednn_run` builds one per call."""
    out_ch = weight.shape[0]
    w_zp = _ZERO_POINTS.get(out_ch)
    if w_zp is None:
        w_zp = _ZERO_POINTS[out_ch] = torch.zeros(out_ch, dtype=torch.int32)
    attr, scalars, algorithm = _ATTRS[post_op]
    if out_scale is None:
        o_scale, o_zp, o_dtype = 1.0, 0, torch.float32
    else:
        o_scale, o_zp, o_dtype = float(out_scale), int(out_zero_point), torch.uint8  # uint8 codes
    args = (float(x_scale), int(x_zero_point), packed, w_scale, w_zp, bias, list(stride), list(padding),
            list(dilation), int(groups), o_scale, o_zp, o_dtype, attr, scalars, algorithm)
    op, layout = torch.ops.onednn.qconv_pointwise.default, _CHANNELS_LAST[x_dim]

    def run(x: torch.Tensor) -> torch.Tensor:
        return op(x.contiguous(memory_format=layout), *args)
    return run


def _onednn_run(x: torch.Tensor, x_scale: float, x_zero_point: int, weight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                groups: int, post_op: str, out_scale: float | None, out_zero_point: int,
                packed: torch.Tensor | None) -> torch.Tensor:
    """The ``onednn`` implementation without validating its arguments (see `validating`)."""
    if x.dtype == torch.int8:  # oneDNN takes uint8 sources: x + 128 exactly, as a bit flip
        x = torch.bitwise_xor(x.view(torch.uint8), 128)
        x_zero_point += 128
    if packed is None:
        packed = prepack(weight, w_scale, x_scale, x_zero_point, stride, padding, dilation, groups)
    one_d = x.dim() == 3
    if one_d:
        x, stride, padding, dilation = _as_2d(x, stride, padding, dilation)
    fused = post_op if x.dim() == 4 else "none"  # oneDNN's 3d conv fuses no post-op
    y = onednn_call(x.dim(), x_scale, x_zero_point, weight, w_scale, bias, stride, padding, dilation, groups,
                    fused, out_scale, out_zero_point, packed)(x)
    if fused != post_op:
        y = _post_op_after(y, post_op, out_scale, out_zero_point)
    return y.squeeze(2) if one_d else y


def _post_op_after(y: torch.Tensor, post_op: str, out_scale: float | None, out_zero_point: int) -> torch.Tensor:
    """The post-op on the output, in place. On uint8 codes this is exact: quantization is monotone,
    so ``quantize(clamp(y, a, b)) = clamp(quantize(y), quantize(a), quantize(b))``."""
    if out_scale is None:
        return y.clamp_(0.0, 6.0 if post_op == "relu6" else None)
    lo = int(quantize(torch.zeros(()), out_scale, out_zero_point, UINT8_SPEC))
    hi = int(quantize(torch.full((), 6.0), out_scale, out_zero_point, UINT8_SPEC)) if post_op == "relu6" else 255
    return y.clamp_(lo, hi)


def validating(run: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An implementation's op entry point: `check_args` (named errors for any caller), then
    ``run``, the form without validation that integer modules call with arguments they built."""
    def fn(*args: Any) -> torch.Tensor:
        check_args(*args[:13])
        return run(*args)
    fn.__name__ = f"validating_{run.__name__}"
    return fn


int8_conv = KernelOp(
    "int8_conv", SCHEMA, reference,
    impls=[Impl("native", validating(conv_native.run_native), conv_native.guard_native,
                available=conv_native.native_available, unchecked=conv_native.run_native, traceable=False,
                prefer=conv_native.prefer_onednn, limits=conv_native.native_limits),
           Impl("onednn", validating(_onednn_run), _onednn_guard, available=_onednn_available, unchecked=_onednn_run,
                limits=_onednn_limits)],
    fake=_fake,
)

__all__ = ["POST_OPS", "UINT8_SPEC", "accumulate", "apply_post_op", "check_args", "conv_output_shape",
           "int8_conv", "onednn_call", "onednn_weight_refusal", "prepack", "reference"]

