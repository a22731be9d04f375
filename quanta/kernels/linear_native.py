"""The native int8 linear as a settled call and as a graph operator, and activations fused into
its epilogue.

An integer Linear whose first, guarded call ran the native kernels (``quantize_activation``
``native``, then ``int8_linear`` ``gemv_native`` / ``gemm_native`` / ``int_mm_native``) keeps them settled:
eagerly as `native_linear_call` (the library calls with every weight-side argument resolved
once), in compiled graphs as ``quanta_native::linear_packed`` with `compiled_linear_args` (the
same kernels in one C++ operator, csrc/linear_op.cpp). Both apply the module's fused activation
(`POST_OPS`) in the epilogue.
"""

from __future__ import annotations

import torch

from . import native
from .activation import _act_spec, _f32, _quantize_activation_native
from .linear import _int8_operand, _is_gemm_pack, _mm_rescale_native, _native_weight_args
from .post_ops import LINEAR_POST_OPS, codes_for

# ----------------------------------------------------------------- activations after a linear
#: activations an integer Linear can apply to its float output (`quanta.integer.Int8Linear`'s
#: ``post_op``), with their codes in the native epilogue (`post_ops.POST_OP_CODES`, ``csrc/post_op.h``)
POST_OPS = codes_for(LINEAR_POST_OPS)


def check_post_op(post_op: str, who: str) -> str:
    if post_op not in POST_OPS:
        raise ValueError(f"{who}: post_op must be one of {sorted(POST_OPS)}, got {post_op!r}")
    return post_op


def apply_post_op(y: torch.Tensor, post_op: str, native_ran: bool = False) -> torch.Tensor:
    """The activation ``post_op`` on a linear's float output: torch's ``relu`` / ``gelu``, or,
    after a native kernel (``native_ran``, a contiguous float32 ``y`` it owns), the native
    epilogue's own in place (so that a module's first call, which goes through the guarded
    kernels, gives what its settled calls, which fuse the activation, give). The native GELU is
    within ~1.5e-6 · max(1, |y|) of torch's (tests/kernels/test_native_activation.py)."""
    if post_op == "none":
        return y
    if native_ran and y.dtype == torch.float32 and y.is_contiguous() and native.ready():
        return native.module().apply_post_op_(y, POST_OPS[post_op])
    if post_op == "relu":
        return torch.relu(y)
    return torch.nn.functional.gelu(y, approximate="tanh" if post_op == "gelu_tanh" else "none")


#: the native `int8_linear` implementations a settled call (`native_linear_call`) can run
NATIVE_LINEAR_IMPLS = ("gemv_native", "gemm_native", "int_mm_native")
#: ``quanta_native::linear_packed``'s ``kernel`` argument for each of them
_KERNEL_CODES = {"int_mm_native": 0, "gemv_native": 1, "gemm_native": 2}


def _check_impl(impl, packed, weight, who):
    if impl not in NATIVE_LINEAR_IMPLS:
        raise ValueError(f"{who}: impl must be one of {NATIVE_LINEAR_IMPLS}, got {impl!r}")
    if impl == "gemm_native" and not _is_gemm_pack(packed, *weight.shape):
        raise ValueError(f"{who}: gemm_native needs the weight packed by quanta.kernels.linear.gemm_pack")


def native_linear_call(impl, weight, w_scale, bias, w_sum, bits, signed, symmetric, narrow_range, per_token,
                       rounding, scale=None, zero_point=None, post_op="none", packed=None):
    """`quantize_activation` (``native``) then `int8_linear` (``impl``, one of
    `NATIVE_LINEAR_IMPLS`) and `apply_post_op` (fused into the epilogue) as one callable with everything but the activations settled:
    ``run(x)`` for a row-major float32 ``[M, K]``. For a caller whose guarded calls chose exactly
    these two implementations for such inputs (integer modules keep one per input signature;
    ``packed``: `quanta.kernels.linear.gemm_pack`'s weight, for ``gemm_native``):
    the same functions, so the same numbers, without re-deriving the weight-side arguments at
    every call. The weight and the static qparams are read once, here: a module rebuilds its
    settled calls in ``pack()`` (which ``load_state_dict`` runs) after they change."""
    _check_impl(impl, packed, weight, "native_linear_call")
    w_t, w_sum32, w_scale32, bias32 = _native_weight_args(weight, w_scale, bias, w_sum)
    lib = native.module()
    spec = _act_spec(bits, signed, symmetric, narrow_range, per_token, rounding)
    qmin, qmax = spec.qmin, spec.qmax
    inv = None if scale is None else float(torch.reciprocal(_f32(scale)).reshape(()))
    zp = torch.zeros((), dtype=torch.int32) if zero_point is None else zero_point
    zp_int = int(zp.reshape(()))
    s_static, z_static = (None, None) if scale is None else (_f32(scale).reshape(-1).contiguous(),
                                                            zp.reshape(-1).to(torch.int32).contiguous())
    gemv = impl == "gemv_native"
    packed = packed if impl == "gemm_native" else None
    w_rows = w_t.t() if gemv else w_t
    act = POST_OPS[check_post_op(post_op, "native_linear_call")]

    def run(x: torch.Tensor) -> torch.Tensor:
        # `_quantize_activation_native` then `_gemv_native` / `_gemm_native` / `_mm_rescale_native`, their
        # arguments resolved once: the same library calls with the same values
        if inv is None:
            out = lib.quantize_rows(x, qmin, qmax, symmetric, signed)
            if not out:  # NaN / inf: the guarded path raises (or copes), as the first call did
                codes, s, z = _quantize_activation_native(x, scale, zero_point, bits, signed, symmetric,
                                                          narrow_range, per_token, rounding)
            else:
                codes, s, z = out[0], out[1].reshape(-1), out[2].reshape(-1)
        else:
            codes, s, z = lib.quantize_static(x, inv, zp_int, qmin, qmax, signed), s_static, z_static
        if gemv:
            return lib.int8_gemv(codes, z, w_rows, w_sum32, s, w_scale32, bias32, act)
        if packed is not None:
            if not signed:  # uint8 codes: int8_gemm's int8 operand is code - 128 on zero point - 128
                codes, z = _int8_operand(codes, z)
            return lib.int8_gemm(codes, z, s, packed, w_sum32, w_scale32, bias32, act)
        return _mm_rescale_native(codes, z, s, w_rows, w_sum32, w_scale32, bias32, act)
    return run


def compiled_linear_args(impl, weight, w_scale, bias, w_sum, bits, signed, symmetric, narrow_range, per_token,
                         rounding, scale=None, zero_point=None, post_op="none", packed=None):
    """The arguments after ``x`` of ``quanta_native::linear_packed`` (csrc/linear_op.cpp), the
    operator by which a compiled graph runs what `native_linear_call` runs eagerly (same
    arguments, same kernels, same bits), or None where it does not apply (unsigned codes: the
    operator quantizes to signed ones, as the shifted uint8 asymmetric codes are)."""
    if impl not in NATIVE_LINEAR_IMPLS or not signed or bits > 8:
        return None
    _check_impl(impl, packed, weight, "compiled_linear_args")
    w_t, w_sum32, w_scale32, bias32 = _native_weight_args(weight, w_scale, bias, w_sum)
    spec = _act_spec(bits, signed, symmetric, narrow_range, per_token, rounding)
    if scale is None:
        inv, zp, s = 0.0, 0, 1.0
    else:
        s = float(_f32(scale).reshape(()))
        inv, zp = float(torch.reciprocal(_f32(scale)).reshape(())), int(zero_point.reshape(()))
    return (packed if impl == "gemm_native" else w_t.t(), w_sum32, w_scale32, bias32, spec.qmin, spec.qmax, symmetric,
            inv, zp, s, _KERNEL_CODES[impl], POST_OPS[check_post_op(post_op, "compiled_linear_args")])


__all__ = ["NATIVE_LINEAR_IMPLS", "POST_OPS", "apply_post_op", "check_post_op", "compiled_linear_args", "native_linear_call"]
