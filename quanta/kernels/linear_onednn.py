"""oneDNN's int8 linear (``onednn::qlinear_pointwise``) for `quanta.kernels.linear.int8_linear`:
its prepacked weight, the kernel call, and the probe of whether its u8 x s8 sums are exact on
this CPU (without VNNI they saturate int16 pair sums: `SaturationProbe`)."""

from __future__ import annotations

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


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
            and ONEDNN_SATURATION.exact())


def onednn_limits() -> str | None:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
        return "this torch has no oneDNN qlinear"
    return ONEDNN_SATURATION.reason()


def int8_linear_onednn(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    zp = int(x_zp.reshape(()).item())
    if x.dtype == torch.int8:  # onednn's s8-activation path is very slow: shift to uint8
        x, zp = torch.bitwise_xor(x, -128).view(torch.uint8), zp + 128
    N = weight.shape[0]
    return torch.ops.onednn.qlinear_pointwise(
        x.contiguous(), float(x_scale.reshape(()).item()), zp, packed, w_scale.float().contiguous(),
        torch.zeros(N, dtype=torch.int32), None if bias is None else bias.float(), 1.0, 0, torch.float32,
        "none", [], "")


__all__ = ["ONEDNN_SATURATION", "int8_linear_onednn", "onednn_available", "onednn_limits", "onednn_prepack"]
