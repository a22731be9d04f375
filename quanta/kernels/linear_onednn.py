"""oneDNN's int8 linear (``onednn::qlinear_pointwise``) for `quanta.kernels.linear.int8_linear`:
its prepacked weight, the kernel call, and the probe of whether its u8 x s8 sums are exact on
this CPU (without VNNI they saturate int16 pair sums: `SaturationProbe`; weights within ±64, 7-bit
codes, stay exact there, so the implementation is available where that bound is exact and its
guard refuses wider weights: `onednn_weight_refusal`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .u8s8_saturation import SaturationProbe


def onednn_prepack(weight: torch.Tensor) -> torch.Tensor:
    """onednn's packed form of an int8 [N, K] weight (for the ``onednn`` implementation)."""
    return torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)


def _onednn_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """onednn's ``x_u8 @ w_s8.T`` with unit scales (the `SaturationProbe` kernel)."""
    n = w.shape[0]
    return torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, onednn_prepack(w), torch.ones(n),
                                              torch.zeros(n, dtype=torch.int32), None, 1.0, 0, torch.float32,
                                              "none", [], "")


#: without VNNI, onednn's u8 × s8 GEMM saturates int16 pair sums (wrong for most full-range codes)
ONEDNN_SATURATION = SaturationProbe("oneDNN", _onednn_sums)


def _onednn_present() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def onednn_available() -> bool:
    """oneDNN's qlinear is here and sums exactly for some weights (full range with VNNI, 7-bit without)."""
    return _onednn_present() and ONEDNN_SATURATION.exact_bound() is not None


def onednn_limits() -> str | None:
    if not _onednn_present():
        return "this torch has no oneDNN qlinear"
    return ONEDNN_SATURATION.limits()


def onednn_weight_refusal(weight: torch.Tensor) -> str | None:
    """Why oneDNN's sums of these int8 weight codes are not exact on this CPU, or None."""
    return ONEDNN_SATURATION.refusal(weight)


def prefer_int_mm(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    """Where oneDNN sums full-range weights exactly (VNNI, AMX) torch's ``_int_mm`` paths come
    first, as they always did; without VNNI oneDNN on 7-bit weights is the fastest exact kernel
    (float_sums and the reference are the others there)."""
    if ONEDNN_SATURATION.exact():
        return "this CPU sums full-range u8×s8 products exactly: torch's int_mm kernels are preferred"
    return None


def onednn_auto_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed ``weight`` where ``impl="auto"`` should run oneDNN for it: a CPU without VNNI
    (the full-range probe saturates) and weight codes within the bound that is exact there
    (``|code| <= 64``: 7-bit weights). None elsewhere (nothing changes where the native VNNI
    kernels or exact full-range oneDNN exist)."""
    if weight.device.type != "cpu" or weight.dtype != torch.int8 or not onednn_available() \
            or ONEDNN_SATURATION.exact() or onednn_weight_refusal(weight) is not None:
        return None
    return onednn_prepack(weight)


def int8_linear_onednn(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    zp = int(x_zp.reshape(()).item())
    if x.dtype == torch.int8:  # onednn's s8-activation path is very slow: shift to uint8
        x, zp = torch.bitwise_xor(x, -128).view(torch.uint8), zp + 128
    N = weight.shape[0]
    return torch.ops.onednn.qlinear_pointwise(
        x.contiguous(), float(x_scale.reshape(()).item()), zp, packed, w_scale.float().contiguous(),
        torch.zeros(N, dtype=torch.int32), None if bias is None else bias.float(), 1.0, 0, torch.float32,
        "none", [], "")


def onednn_linear_call(packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                       zero_point: torch.Tensor, qmin: int, qmax: int, signed: bool,
                       post_op: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The static per-tensor activation quantize (native ``quantize_static``) then
    `int8_linear_onednn` (then ``post_op`` on its float output, if given) as one callable with
    every weight-side and qparam argument resolved once: ``run(x)`` for a row-major float32
    ``[M, K]``. The same library calls with the same values as the guarded path (an integer
    module settles it after a first call chose exactly these two kernels), without its per-call
    ``.item()`` reads, float casts, zero-point buffer and spec checks (~0.1 ms per call, a third
    of a [128, 384] x [384, 384] GEMM on a 2-core AVX2 CPU)."""
    from . import native
    lib = native.module()
    inv = float(torch.reciprocal(scale.float()).reshape(()))
    zp = int(zero_point.reshape(()))
    s = float(scale.reshape(()).item())
    n = w_scale.numel()
    w_scale32, zeros = w_scale.float().contiguous(), torch.zeros(n, dtype=torch.int32)
    bias32 = None if bias is None else bias.float()
    # oneDNN takes uint8: signed codes are read shifted (x ^ 0x80, zero point + 128), as int8_linear_onednn does
    onednn_zp = zp + 128 if signed else zp
    qlinear = torch.ops.onednn.qlinear_pointwise

    def run(x: torch.Tensor) -> torch.Tensor:
        codes = lib.quantize_static(x, inv, zp, qmin, qmax, signed)
        if signed:
            codes = torch.bitwise_xor(codes, -128).view(torch.uint8)
        y = qlinear(codes, s, onednn_zp, packed, w_scale32, zeros, bias32, 1.0, 0, torch.float32, "none", [], "")
        return y if post_op is None else post_op(y)
    return run


__all__ = ["ONEDNN_SATURATION", "int8_linear_onednn", "onednn_auto_pack", "onednn_available", "onednn_limits",
           "onednn_linear_call", "onednn_prepack", "onednn_weight_refusal", "prefer_int_mm"]
