"""The AVX2 int8 linear for 7-bit weights (``avx2_gemm``, csrc/linear_avx2.cpp) for
`quanta.kernels.linear.int8_linear`: its weight packing, its guard, the kernel call, and the
settled call with the static activation quantization fused into the GEMM.

On a CPU with AVX2 but no VNNI, ``vpmaddubsw`` pair sums of uint8 x int8 products are exact for
weight codes within ±64 (2 · 255 · 64 = 32640 < 2^15). There this kernel computes the exact int32
sums and then the reference's float32 epilogue, ``float32(acc) · x_scale[m] · w_scale[n] +
bias[n]`` left to right (``rescale_rows``' arithmetic), so its output is the reference's bit for
bit (oneDNN's qlinear, the kernel it replaces there, rescales in-kernel: within a few ulps).

Shapes: weight int8 ``[N, K]`` -> packed int8 ``[ceil(N/16), ceil(K/4), 16, 4]`` (zero rows and
columns padding N and K): block ``b`` holds output channels ``16 b .. 16 b + 15``, each step of 4
input channels 64 bytes ``[channel][k]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import native
from .post_ops import LINEAR_POST_OPS, POST_OP_CODES
from .u8s8_saturation import weight_code_max

#: the largest |weight code| whose u8 x s8 pair sums stay within int16 (2 · 255 · 64 = 32640)
AVX2_WEIGHT_BOUND = 64


def avx2_gemm_available() -> bool:
    """The native library is built, for AVX2 without AVX-512 VNNI (elsewhere the VNNI kernels run)."""
    return native.ready() and bool(native.module().linear_avx2_available())


def avx2_pack(weight: torch.Tensor) -> torch.Tensor:
    """The int8 ``[N, K]`` weight in ``avx2_gemm``'s layout ``[N/16, K/4, 16, 4]`` (zero padded)."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise TypeError(f"avx2_pack: weight must be 2-D int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    nb, kb = -(-n // 16), -(-k // 4)
    padded = torch.zeros(nb * 16, kb * 4, dtype=torch.int8, device=weight.device)
    padded[:n, :k] = weight
    return padded.reshape(nb, 16, kb, 4).permute(0, 2, 1, 3).contiguous()


def is_avx2_pack(packed: Any, n: int, k: int) -> bool:
    return (isinstance(packed, torch.Tensor) and packed.dtype == torch.int8 and packed.layout == torch.strided
            and packed.shape == (-(-n // 16), -(-k // 4), 16, 4))


def avx2_weight_refusal(weight: torch.Tensor) -> str | None:
    """Why ``avx2_gemm``'s sums of these weight codes would not be exact, or None."""
    peak = weight_code_max(weight)
    if peak < 0 or peak > AVX2_WEIGHT_BOUND:
        return (f"weight codes up to |{peak}| (the AVX2 u8 x s8 sums are exact within ±{AVX2_WEIGHT_BOUND}: "
                "7-bit weights)" if peak >= 0 else "weight codes not measured (traced before an eager call)")
    return None


def avx2_auto_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """`avx2_pack`'s weight where ``impl="auto"`` should run ``avx2_gemm`` for it (a CPU weight of
    7-bit codes, this build AVX2 without VNNI), else None."""
    if weight.device.type != "cpu" or weight.dtype != torch.int8 or weight.dim() != 2 or not avx2_gemm_available() \
            or avx2_weight_refusal(weight) is not None:
        return None
    return avx2_pack(weight)


def _epilogue_args(x_scale, x_zp, w_scale, bias, w_sum, weight):
    ws = (weight.sum(dim=1, dtype=torch.int32) if w_sum is None else w_sum).to(torch.int32).contiguous()
    return (x_zp.reshape(-1).to(torch.int32).contiguous(), x_scale.reshape(-1).float().contiguous(), ws,
            w_scale.reshape(-1).float().contiguous(), None if bias is None else bias.reshape(-1).float().contiguous())


def int8_linear_avx2(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    """``int8_linear``'s ``avx2_gemm``: the exact sums and the reference's rescale, one kernel."""
    zp, xs, ws, wsc, b = _epilogue_args(x_scale, x_zp, w_scale, bias, w_sum, weight)
    xd = x if x.stride() == (x.shape[1], 1) else x.clone(memory_format=torch.contiguous_format)
    return native.module().int8_linear_avx2(xd, zp, xs, packed, ws, wsc, b)


def guard_avx2(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    """Why ``avx2_gemm`` cannot run these arguments, or None."""
    from .linear import _guard_int8_common  # (int8_linear's shared checks; that module imports this one)
    reason = _guard_int8_common(x, x_scale, x_zp, weight, w_scale, bias)
    if reason is not None:
        return reason
    if x.device.type != "cpu":
        return "CPU only"
    if not is_avx2_pack(packed, *weight.shape):
        return "no weight packed for it (avx2_pack, built by the module's pack() for 7-bit weights)"
    return avx2_weight_refusal(weight)


def avx2_linear_call(packed: torch.Tensor, w_sum: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     scale: torch.Tensor | None, zero_point: torch.Tensor | None, qmin: int, qmax: int,
                     quantize_rows: Callable[[torch.Tensor], tuple] | None = None,
                     post_op: str = "none") -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation quantization then ``avx2_gemm`` then the activation ``post_op`` as one
    callable with every weight-side argument resolved once: ``run(x)`` for a row-major float32
    ``[M, K]``. Static per-tensor qparams (``scale`` / ``zero_point``): the quantization is fused
    into the GEMM's first pass (``quantized_linear_avx2``: quantize_static's codes, never written
    as a tensor). ``"relu"`` runs inside the kernel, on each output tile while it is in L1 (the
    same bits as ``torch.relu``); GELU is torch's, after it (the reference's bits: the native GELU
    is within ~2e-7 of it, not equal). Dynamic ones: ``quantize_rows(x)`` gives ``(codes, scale, zero_point)`` (the
    module's guarded quantization, as its first call ran it), then the kernel on those codes."""
    if post_op not in LINEAR_POST_OPS:
        raise ValueError(f"avx2_linear_call: post_op must be one of {LINEAR_POST_OPS}, got {post_op!r}")
    code = POST_OP_CODES["relu"] if post_op == "relu" else POST_OP_CODES["none"]
    after = None if post_op in ("none", "relu") else torch.ops.aten.gelu_  # (in place: the kernel's own output)
    approximate = "tanh" if post_op == "gelu_tanh" else "none"
    lib = native.module()
    ws, wsc = w_sum.to(torch.int32).contiguous(), w_scale.reshape(-1).float().contiguous()
    b = None if bias is None else bias.reshape(-1).float().contiguous()
    if scale is not None:
        inv = float(torch.reciprocal(scale.float()).reshape(()))
        zp = int(zero_point.reshape(()))
        s = scale.float().reshape(1).contiguous().clone()
        fused = lib.quantized_linear_avx2

        def run(x: torch.Tensor) -> torch.Tensor:
            y = fused(x, inv, zp, qmin, qmax, s, packed, ws, wsc, b, code)
            return y if after is None else after(y, approximate=approximate)
        return run
    if quantize_rows is None:
        raise ValueError("avx2_linear_call: dynamic activations need quantize_rows")
    kernel = lib.int8_linear_avx2

    def run_dynamic(x: torch.Tensor) -> torch.Tensor:
        codes, xs, xz = quantize_rows(x)
        y = kernel(codes, xz.reshape(-1).to(torch.int32).contiguous(), xs.reshape(-1).float().contiguous(),
                   packed, ws, wsc, b, code)
        return y if after is None else after(y, approximate=approximate)
    return run_dynamic


__all__ = ["AVX2_WEIGHT_BOUND", "avx2_auto_pack", "avx2_gemm_available", "avx2_linear_call", "avx2_pack",
           "avx2_weight_refusal", "guard_avx2", "int8_linear_avx2", "is_avx2_pack"]
