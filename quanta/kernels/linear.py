"""Integer linear kernels: int8 x int8 (static or dynamic activations), defined once with a
readable reference and guarded fast implementations (activation quantization:
`quanta.kernels.activation`; weight-only int8 / int4: `quanta.kernels.weight_only`; fp8 on
CUDA: `quanta.kernels.fp8`).

Shapes (``x`` is always 2-D here; modules flatten the leading dims into ``M``)::

    quantize_activation  x [M, K] float                      -> codes [M, K] int8/uint8,
                                                               scale [] or [M, 1], zero_point (same)
    int8_linear          x [M, K] int8/uint8, w [N, K] int8  -> y [M, N] float32
    fp8_linear           x [M, K] fp8, w [N, K] fp8          -> y [M, N] float32

Numerics of ``int8_linear``: ``acc[m, n] = Σ_k (x[m, k] - x_zp[m]) · w[n, k]`` exactly (int64 in
the reference, int32 in the fast paths, exact under the guard on K), then the ONE rescale
``y = float32(acc) · x_scale[m] · w_scale[n] + bias[n]``, evaluated left to right in float32
(`_rescale`), shared by the reference and the ``int_mm`` paths, which are therefore bit-identical.
onednn's ``qlinear_pointwise`` applies the scales inside the kernel: same int32 sums, float
result within a few ulps (see ``ONEDNN_ULP_BOUND``).

torch 2.13 CPU quirks found while probing (each is a guard below, with a test):
- ``torch._int_mm`` returns garbage when K == 1 (any M), and when ``x`` is [1, K] with strides
  (1, 1) (which ``is_contiguous()`` accepts); the fast path requires K >= 2 and passes ``x`` with
  strides exactly (K, 1).
- ``onednn::qlinear_pointwise`` with int8 (signed) activations takes a path ~100-1000x slower
  than fp32 ``F.linear``; int8 codes are shifted to uint8 (``x ^ 0x80``, zero point + 128) first.
"""

from __future__ import annotations

from typing import Any

import torch

from . import linear_onednn, native
from .activation import _f32
from .conv_native import pack_weight
from .gemv_rows import GEMV_MAX_ROWS, gemv_isa, gemv_max_rows
from .library import Impl, KernelOp
from .linear_avx2 import avx2_gemm_available, guard_avx2, int8_linear_avx2, is_avx2_pack
from .linear_onednn import ONEDNN_SATURATION, int8_linear_onednn, onednn_available, onednn_limits, onednn_prepack
from .u8s8_saturation import cpu_vnni_features

#: largest K for which every int32 partial sum of int8 (or uint8 - zp) x int8 products is exact
INT32_EXACT_MAX_K = (2**31 - 1) // (255 * 128)
#: measured: onednn's in-kernel rescale differs from `_rescale` by at most this many ulps of |y|
#: (plus the same in ulps of |bias|); 0 for the int_mm paths
ONEDNN_ULP_BOUND = 4


# ===================================================================== int8 x int8
def _check_int8_linear(x, x_scale, x_zp, weight, w_scale, bias):
    if x.dtype not in (torch.int8, torch.uint8) or x.dim() != 2:
        raise TypeError(f"int8_linear: x must be 2-D int8/uint8 codes, got {x.dtype} {tuple(x.shape)}")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise TypeError(f"int8_linear: weight must be 2-D int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"int8_linear: x has K={K} but weight is {tuple(weight.shape)}")
    if x_scale.numel() not in (1, M) or x_zp.numel() not in (1, M):
        raise ValueError(f"int8_linear: x_scale / x_zero_point need 1 or M={M} values, got "
                         f"{x_scale.numel()} / {x_zp.numel()}")
    if w_scale.numel() != N:
        raise ValueError(f"int8_linear: w_scale needs N={N} values, got {w_scale.numel()}")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"int8_linear: bias needs N={N} values, got {bias.numel()}")


def _rescale(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    """``float32(acc) · x_scale[m] · w_scale[n] (+ bias[n])``, left to right, in float32.

    A contiguous int32 ``acc`` (the fast paths') is converted in its own memory: a fresh
    [M, N] float32 buffer costs page faults that, at BERT batch 8 ([1024, 3072]), take ~0.6 ms
    of a ~8 ms linear. Same values either way (an element-wise cast)."""
    if acc.dtype == torch.int32 and acc.is_contiguous():
        y = acc.view(torch.float32)
        y.copy_(acc)
    else:
        y = acc.to(torch.float32)
    y.mul_(_f32(x_scale if x_scale.dim() == 2 or x_scale.numel() == 1 else x_scale.reshape(-1, 1)))
    y.mul_(_f32(w_scale if w_scale.dim() == 1 else w_scale.reshape(-1)))
    if bias is not None:
        y.add_(_f32(bias))
    return y


def _int8_linear_ref(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    """``Σ_k (x - x_zp) · w`` in int64, then `_rescale`."""
    _check_int8_linear(x, x_scale, x_zp, weight, w_scale, bias)
    centered = x.to(torch.int64) - x_zp.reshape(-1, 1).to(torch.int64)
    acc = centered @ weight.to(torch.int64).t()
    return _rescale(acc, x_scale, w_scale, bias)


def weight_sum(weight: torch.Tensor) -> torch.Tensor:
    """``Σ_k w[n, k]`` as int32 [N] (the zero-point correction term)."""
    return weight.sum(dim=1, dtype=torch.int32)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """Row-major with exactly the strides ``(cols, 1)``: ``contiguous()`` keeps a [1, K] tensor of
    strides (1, 1) as is, which torch 2.13's CPU ``_int_mm`` then reads wrongly."""
    return t if t.stride() == (t.shape[1], 1) else t.clone(memory_format=torch.contiguous_format)


def _int8_operand(x: torch.Tensor, x_zp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_int_mm``'s int8 operand and its int32 zero points ``[1]`` / ``[M]``: uint8 codes
    become ``x - 128`` (``x ^ 0x80`` read as int8) with zero points ``zp - 128``, the same sums."""
    zp = x_zp.reshape(-1)
    if zp.dtype != torch.int32:
        zp = zp.to(torch.int32)
    if x.dtype == torch.uint8:
        x = torch.bitwise_xor(x, 128).view(torch.int8)
        zp = zp - 128
    return x, zp


def _int_mm_acc(x, x_zp, weight, w_sum, swapped: bool = False) -> torch.Tensor:
    """Exact int32 ``Σ_k (x - zp) w`` with ``torch._int_mm`` (int8 x int8 only): uint8 codes are
    shifted by -128 (``x ^ 0x80`` read as int8), the zero point is applied as ``zp' · Σ_k w``.
    ``swapped``: computed as ``(W · Xᵀ)ᵀ`` (same sums; see `SWAP_MAX_ROWS`)."""
    x, zp = _int8_operand(x, x_zp)
    if swapped:
        acc = torch._int_mm(_dense(weight), _dense(x).t()).t().contiguous()
    else:
        acc = torch._int_mm(_dense(x), _dense(weight).t())
    # (per-token zero points are practically never all 0: correct without asking)
    if x.device.type != "cpu" or torch.compiler.is_compiling() or zp.numel() > 1 or bool(zp.any()):
        ws = weight_sum(weight) if w_sum is None else w_sum
        if ws.dtype != torch.int32:
            ws = ws.to(torch.int32)
        if zp.numel() == 1:
            acc.sub_(zp.reshape(()) * ws)
        else:  # acc -= zp ⊗ Σw, in place (exact int32, no M x N temporary)
            acc.addr_(zp, ws, alpha=-1)
    return acc


def _mm_rescale_native(x, x_zp, x_scale, w_t, w_sum, w_scale, bias, post_op=0):
    """``torch._int_mm(x, w_t)``, then the zero-point correction and `_rescale` in one pass (and
    the activation code ``post_op``, `quanta.kernels.linear_native.POST_OPS`); ``w_sum`` int32, ``w_scale`` / ``bias`` float32, all
    contiguous."""
    x, zp = _int8_operand(x, x_zp)
    acc = torch._int_mm(_dense(x), w_t)
    return native.module().rescale_rows(acc, zp.contiguous(), w_sum, _f32(x_scale).reshape(-1).contiguous(),
                                        w_scale, bias, post_op)


def _native_weight_args(weight, w_scale, bias, w_sum):
    """The weight-side arguments of `_mm_rescale_native`, in the layouts it takes."""
    ws = (weight_sum(weight) if w_sum is None else w_sum).to(torch.int32).contiguous()
    return (_dense(weight).t(), ws, _f32(w_scale).reshape(-1).contiguous(),
            None if bias is None else _f32(bias).contiguous())


def _int8_linear_int_mm_native(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    """``torch._int_mm``, then the zero-point correction and `_rescale` in one pass
    (``quanta.kernels.native``): the same int32 sums and float32 operations as ``int_mm``."""
    return _mm_rescale_native(x, x_zp, x_scale, *_native_weight_args(weight, w_scale, bias, w_sum))


#: weights of at least this many bytes are re-homed by `streaming_copy` (one huge page)
HUGE_PAGE_BYTES = 2 << 20


def streaming_copy(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (CPU, >= 2 MiB) in memory advised for transparent huge pages (the native
    ``huge_page_copy``): the same values; a weight streamed from DRAM at every call, as at
    decoding shapes, then pays far fewer TLB misses (measured, 4 x 4096² int8 at one row:
    2.8 -> 2.2 ms). Anything else, or without the native library: ``weight`` itself."""
    if weight.device.type != "cpu" or weight.numel() * weight.element_size() < HUGE_PAGE_BYTES or not native.ready():
        return weight
    if getattr(weight, "_quanta_homed", None) == weight.data_ptr():  # already there (a tied table
        return weight                                                 # re-homed by its other holder)
    homed = native.module().huge_page_copy(weight)
    homed._quanta_homed = homed.data_ptr()  # (a copy of it, at another address, is re-homed again)
    return homed


def _gemv_native(x, x_zp, x_scale, w, w_sum, w_scale, bias):
    """``int8_gemv`` (``quanta.kernels.native``, AVX-512 VNNI or AVX2): the same int32 sums as
    ``torch._int_mm`` and the same epilogue as ``rescale_rows``; ``w`` row-major [N, K]."""
    zp = x_zp.reshape(-1)
    return native.module().int8_gemv(_dense(x), zp if zp.dtype == torch.int32 else zp.to(torch.int32), w, w_sum,
                                     _f32(x_scale).reshape(-1).contiguous(), w_scale, bias)


def _int8_linear_gemv_native(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    w_t, *rest = _native_weight_args(weight, w_scale, bias, w_sum)
    return _gemv_native(x, x_zp, x_scale, w_t.t(), *rest)


def gemm_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The int8 ``[N, K]`` weight in the layout ``gemm_native`` reads (a dense 1x1 convolution's
    for `quanta.kernels.conv_native`'s VNNI loop: ``[N/16, 1, K/4, 16, 4]``, zero rows padding N),
    or None where ``gemm_native`` cannot run (no native VNNI build, a CUDA weight, K % 4 != 0).
    A runtime copy beside the canonical weight (as large: one byte per weight)."""
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.shape[1] % 4 or not native.ready() \
            or not native.module().gemv_has_vnni():
        return None
    n, k = weight.shape
    return pack_weight(weight.reshape(n, k, 1, 1), "dense")


def _is_gemm_pack(packed: Any, n: int, k: int) -> bool:
    return (isinstance(packed, torch.Tensor) and packed.dtype == torch.int8 and packed.layout == torch.strided
            and packed.shape == (-(-n // 16), 1, k // 4, 16, 4))


def _guard_vnni_common(x, x_scale, x_zp, weight, w_scale, bias) -> str | None:
    """What the native VNNI kernels (gemv, GEMM) need beyond the int8 checks: a VNNI build."""
    reason = _guard_int8_common(x, x_scale, x_zp, weight, w_scale, bias)
    if reason is None and not native.module().gemv_has_vnni():
        return "the native library was built without AVX-512 VNNI"
    return reason


def _gemm_pack_reason(weight: torch.Tensor, packed: Any) -> str | None:
    """Why the GEMM cannot run this (checked int8) weight with ``packed``, or None."""
    n, k = weight.shape
    if k % 4:
        return f"K={k} is not a multiple of 4 (the VNNI loop reads 4 codes at a time)"
    if not _is_gemm_pack(packed, n, k):
        return "no weight packed for it (gemm_pack, built by the module on its first call of > 8 rows)"
    return None


def _guard_gemm_native(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    return _guard_vnni_common(x, x_scale, x_zp, weight, w_scale, bias) or _gemm_pack_reason(weight, packed)


def _gemm_native(x, x_zp, x_scale, wpack, w_sum, w_scale, bias, post_op=0):
    """``int8_gemm`` (``quanta.kernels.native``): the dense VNNI loop with ``rescale_rows``'
    epilogue (and the activation ``post_op``) applied in registers; int8 codes, ``w_sum`` int32,
    ``w_scale`` / ``bias`` float32, all contiguous."""
    x, zp = _int8_operand(x, x_zp)
    return native.module().int8_gemm(_dense(x), zp.contiguous(), _f32(x_scale).reshape(-1).contiguous(), wpack,
                                     w_sum, w_scale, bias, post_op)


def _int8_linear_gemm_native(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    """The same int32 sums (exact) and float32 operations as ``int_mm_native``, in one kernel."""
    _, *rest = _native_weight_args(weight, w_scale, bias, w_sum)
    return _gemm_native(x, x_zp, x_scale, packed, *rest)


def _guard_gemv_native(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    reason = _guard_int8_common(x, x_scale, x_zp, weight, w_scale, bias)
    if reason is not None:
        return reason
    M, N, K = x.shape[0], weight.shape[0], x.shape[1]
    fast_gemm = isinstance(packed, torch.Tensor) and (packed.is_mkldnn or is_avx2_pack(packed, N, K))  # (7-bit)
    limit = gemv_max_rows(N, K, onednn_packed=fast_gemm)
    if limit == 0:
        return "the native library was built without AVX-512 VNNI or AVX2 (its gemv would be a plain loop)"
    if M > limit:
        return f"M={M} rows (gemv pays off up to {limit} rows for N*K={N * K} on {gemv_isa()})"
    return None


def _int8_linear_int_mm(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    return _rescale(_int_mm_acc(x, x_zp, weight, w_sum), x_scale, w_scale, bias)


def _int8_linear_int_mm_swapped(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    return _rescale(_int_mm_acc(x, x_zp, weight, w_sum, swapped=True), x_scale, w_scale, bias)


#: torch 2.13's CPU ``_int_mm(x, wᵀ)`` is slow for a few rows and a large weight (measured,
#: K = N = 4096: M = 1 0.23 ms, M = 2..16 3.3-3.8 ms, M = 32 4.5 ms); with the operands swapped,
#: ``(W · Xᵀ)ᵀ``, the same sums take 1.3-1.5 ms (M = 2..16) and 2.1 ms (M = 32). At BERT shapes
#: (weights of 768 x 768 / 3072) and M = 1 the two orders cost the same.
SWAP_MAX_ROWS = 32
SWAP_MIN_WEIGHT = 2**22  # N * K


def _guard_int_mm_swapped(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    reason = _guard_int_mm_cpu(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed)
    if reason is not None:
        return reason
    M, N, K = x.shape[0], weight.shape[0], x.shape[1]
    if not 2 <= M <= SWAP_MAX_ROWS or N * K < SWAP_MIN_WEIGHT:
        return f"M={M}, N*K={N * K} (the swapped order pays off for 2 <= M <= {SWAP_MAX_ROWS}, N*K >= 2^22)"
    return None


def _guard_int8_common(x, x_scale, x_zp, weight, w_scale, bias) -> str | None:
    try:
        _check_int8_linear(x, x_scale, x_zp, weight, w_scale, bias)
    except (TypeError, ValueError) as e:
        return str(e)
    if x.shape[1] > INT32_EXACT_MAX_K:
        return f"K={x.shape[1]} > {INT32_EXACT_MAX_K}: int32 sums could overflow"
    return None


def _guard_int_mm_cpu(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    reason = _guard_int8_common(x, x_scale, x_zp, weight, w_scale, bias)
    if reason is None and x.shape[1] < 2:
        return "K=1 (torch 2.13 CPU _int_mm returns wrong sums for K == 1)"
    return reason


#: float32 sums of int8 products (|p| <= 128 * 128) are exact in any order for up to 2^24 / 2^14 terms
FLOAT_EXACT_K = 2**24 // (128 * 128)


def _int8_linear_float_sums(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    """``_int_mm``'s exact int32 sums by float32 GEMMs on the codes, in chunks of `FLOAT_EXACT_K`
    along K added in int32: for CPUs without VNNI, where torch's CPU ``_int_mm`` is ~20x slower
    than float32 (AVX2 EPYC: [2048, 256] x [1024, 256] 940 ms) and oneDNN / fbgemm saturate."""
    xi, zp = _int8_operand(x, x_zp)
    xf, wf = xi.to(torch.float32), weight.to(torch.float32)
    K = xf.shape[1]
    acc = None
    for k in range(0, K, FLOAT_EXACT_K):
        part = (xf[:, k:k + FLOAT_EXACT_K] @ wf[:, k:k + FLOAT_EXACT_K].t()).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    ws = weight_sum(weight) if w_sum is None else w_sum.to(torch.int32)
    acc.sub_(zp.reshape(()) * ws) if zp.numel() == 1 else acc.addr_(zp, ws, alpha=-1)
    return _rescale(acc, x_scale, w_scale, bias)


def _guard_float_sums(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    reason = _guard_int8_common(x, x_scale, x_zp, weight, w_scale, bias)
    if reason is None and x.device.type != "cpu":
        return "CPU only"
    if reason is None and not torch.compiler.is_compiling() and torch.get_float32_matmul_precision() != "highest":
        return (f"torch.get_float32_matmul_precision() is {torch.get_float32_matmul_precision()!r}: float32 "
                "GEMMs may round (bf16 / tf32), so their sums of codes would not be exact")
    return reason


def _float_sums_available() -> bool:  # (without VNNI, the fastest exact int8 sums on this CPU)
    return not cpu_vnni_features()


def _guard_int_mm_cuda(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    reason = _guard_int8_common(x, x_scale, x_zp, weight, w_scale, bias)
    if reason is not None:
        return reason
    M, K = x.shape
    N = weight.shape[0]
    if M <= 16 or K % 8 or N % 8:
        return f"cuBLAS int8 needs M > 16, K % 8 == 0, N % 8 == 0; got M={M} K={K} N={N}"
    return None


def _cuda_capability_at_least(major: int, minor: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (major, minor)


def _guard_onednn(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    reason = _guard_int8_common(x, x_scale, x_zp, weight, w_scale, bias)
    if reason is not None:
        return reason
    if packed is None or not packed.is_mkldnn:
        return "no onednn-prepacked weight (build it with onednn_prepack in the module's pack())"
    if x_scale.numel() != 1 or x_zp.numel() != 1:
        return "per-token activation scales (onednn qlinear takes one activation scale)"
    return linear_onednn.onednn_weight_refusal(weight)  # (without VNNI: exact only for weights within ±64)


def _int8_linear_fake(x, x_scale, x_zp, weight, w_scale, bias, w_sum, packed):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


int8_linear = KernelOp(
    "int8_linear",
    "(Tensor x, Tensor x_scale, Tensor x_zero_point, Tensor weight, Tensor w_scale, Tensor? bias, "
    "Tensor? w_sum, Tensor? packed, str impl) -> Tensor",
    reference=_int8_linear_ref,
    impls=[
        Impl("gemv_native", _int8_linear_gemv_native, _guard_gemv_native,
             available=lambda: native.ready(), traceable=False),
        Impl("gemm_native", _int8_linear_gemm_native, _guard_gemm_native,
             available=lambda: native.ready(), traceable=False),
        Impl("avx2_gemm", int8_linear_avx2, guard_avx2, available=avx2_gemm_available, traceable=False),
        Impl("onednn", int8_linear_onednn, _guard_onednn, available=onednn_available, limits=onednn_limits,
             prefer=linear_onednn.prefer_int_mm, traceable=False),  # (inductor needs its packed weight frozen)
        Impl("float_sums", _int8_linear_float_sums, _guard_float_sums, available=_float_sums_available),
        Impl("int_mm_swapped", _int8_linear_int_mm_swapped, _guard_int_mm_swapped,
             available=lambda: hasattr(torch, "_int_mm")),
        Impl("int_mm_native", _int8_linear_int_mm_native, _guard_int_mm_cpu,
             available=lambda: native.ready() and hasattr(torch, "_int_mm"), traceable=False),
        Impl("int_mm", _int8_linear_int_mm, _guard_int_mm_cpu, available=lambda: hasattr(torch, "_int_mm")),
        Impl("cuda_int_mm", _int8_linear_int_mm, _guard_int_mm_cuda,
             available=lambda: _cuda_capability_at_least(8, 0), devices=("cuda",)),
    ],
    fake=_int8_linear_fake,
    traceable=True,
)


__all__: list[Any] = [
    "FLOAT_EXACT_K", "GEMV_MAX_ROWS", "HUGE_PAGE_BYTES", "INT32_EXACT_MAX_K", "ONEDNN_SATURATION", "ONEDNN_ULP_BOUND",
    "gemm_pack", "int8_linear", "onednn_prepack", "streaming_copy", "weight_sum",
]
