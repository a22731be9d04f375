"""The ``native`` implementation of the dynamic int8 recurrent ops: the time loop in C++
(``csrc/recurrent.cpp``, through `quanta.kernels.native`).

Per layer, as the reference (`quanta.kernels.recurrent_math._sequence`) does it: the layer input
is quantized once for the whole sequence (``quantize_rows`` over one row holding every element),
its int32 sums with ``W_ih`` come from one GEMM-shaped call, and the rescale ``float32(acc) *
(s_x * s_ih) + b_ih`` is the reference's own float32 expression. Then per step, in C++ with no
ATen call and one barrier: the hidden state is quantized per tensor, multiplied by ``W_hh`` with
exact int32 sums, rescaled, and the gate equations evaluated with SLEEF's expf / tanhf (torch's
vector routines, within 1 ulp; 16 lanes with AVX-512, 8 with AVX2). Same codes, same integer sums,
same float32 operations as the reference except that ATen's sigmoid / tanh may round an ulp
differently: the outputs agree to float rounding, plus a rare one-code flip of a requantized h (the
kernel tests bound both); the thread count changes no bit.

Integer sums by build: AVX-512 VNNI ``vpdpbusd`` (the gemv; the input projection by
``torch._int_mm``); AVX2 without VNNI: the int16-widening ``vpmaddwd`` gemv (exact for full 8-bit
weights), which also takes the input projection up to `INPUT_GEMV_MAX_ROWS` rows (``float_sums``
beyond). On AVX2 the time loop reads W_hh re-laid out 4 rows per pass (`int8_pack_rows4`: one stream
gives 4 rows' sums and one transpose-add replaces 4 horizontal sums; the same int32 sums). Without VNNI
every batch runs natively (`native_max_batch`). The row sums of each weight (the zero-point term) and
its packed copy are computed once per weight version (`_derived`), not per call.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from . import native
from .gemv_rows import GEMV_MAX_ROWS, gemv_isa
from .linear import INT32_EXACT_MAX_K, _dense, _int8_linear_float_sums, _int8_operand
from .recurrent_math import _PER, _check, act_spec, exact_matmul, qlinear

_ONE = torch.ones(1)  # (rescale_rows' x_scale: the scales are applied as one per-channel product)
#: without VNNI, the input projection (T * B rows at once) runs the AVX2 gemv up to this many rows, else
#: float_sums: measured (benchmark LSTM layer, [64, 512] x [2048, 512], min of 30): gemv 1.47 / 1.20 ms,
#: float_sums 6.84 / 2.17 ms (1 / 2 threads); the gemv still beat float_sums at 512 rows (3072 x 768:
#: 32.0 vs 99.7 ms, 768²: 11.6 vs 13.1 ms, 2 threads, benchmarks/gemv_avx2.py). W_ih stays in its plain
#: layout: int8_gemv on int8_pack_rows4(W_ih) measured level here (64 x 2048 x 512, 1 thread, interleaved
#: on the shared machine: median 1.38 / 1.86 vs 1.46 / 1.24 ms), not worth a second copy of the weight.
INPUT_GEMV_MAX_ROWS = 512


#: on AVX-512 VNNI, the sequences up to which the native loop runs: each step multiplies ``batch`` rows by
#: ``W_hh`` with the streaming gemv, which loses to fbgemm's GEMM beyond that (measured, LSTM 512: batch 8
#: 3.1 vs 3.6 ms, batch 16 10.0 vs 6.1 ms). Without VNNI (AVX2) there is no exact fbgemm for 8-bit
#: activations (the next implementation is the Python ``int_mm`` loop, ~60x slower than fp32 here) and
#: the loop reads each weight block once per step for all rows: every batch runs natively.
VNNI_MAX_BATCH = GEMV_MAX_ROWS

#: per (what, weight tensor id, version): (the tensor, what was derived from it)
_DERIVED: dict[tuple[str, int, int], tuple[weakref.ref, torch.Tensor]] = {}


def _derived(what: str, w: torch.Tensor) -> torch.Tensor:
    """``native.module().<what>(w)`` for the contiguous int8 weight ``w``, cached per tensor version (an
    in-place change of the weight is noticed)."""
    key = (what, id(w), w._version)
    hit = _DERIVED.get(key)
    if hit is not None and hit[0]() is w:
        return hit[1]
    for k in [k for k, v in _DERIVED.items() if v[0]() is None]:
        del _DERIVED[k]
    out = getattr(native.module(), what)(w)
    _DERIVED[key] = (weakref.ref(w), out)
    return out


def _row_sums(w: torch.Tensor) -> torch.Tensor:
    """The int32 row sums of the contiguous int8 weight ``w`` (the zero-point term of the exact sums)."""
    return _derived("int8_row_sums", w)


def _packed_rows4(w: torch.Tensor) -> torch.Tensor | None:
    """``W_hh`` re-laid out for the AVX2 loop's gemv (4 rows per pass, `int8_pack_rows4`), None on other
    builds (the VNNI loop reads the plain weight)."""
    return _derived("int8_pack_rows4", w) if gemv_isa() == "avx2" else None


def native_max_batch() -> int | None:
    """Sequences up to which the native loop runs on this build (None: any number)."""
    return VNNI_MAX_BATCH if gemv_isa() == "avx512_vnni" else None


def native_available() -> bool:
    return gemv_isa() != "none" and bool(native.module().rnn_layer_available())


def _input_projection(x: torch.Tensor, codes: torch.Tensor, s_x: torch.Tensor, z_x: torch.Tensor,
                      w_ih: torch.Tensor, s_ih: torch.Tensor, b_ih: torch.Tensor) -> torch.Tensor:
    """``qlinear``'s output for the whole sequence from codes already made: [T, B, G*H]."""
    q2 = codes.reshape(-1, x.shape[-1])
    if q2.shape[1] < 2:  # (torch 2.13's CPU _int_mm is wrong for K == 1)
        acc = exact_matmul(q2, z_x, w_ih)
        return (acc.float() * (s_x * s_ih) + b_ih).reshape(*x.shape[:-1], w_ih.shape[0])
    w = w_ih.contiguous()
    if gemv_isa() == "avx2" and q2.shape[0] <= INPUT_GEMV_MAX_ROWS:
        # the native gemv's exact sums and rescale_rows' epilogue with an x_scale of 1: float32(acc) * 1 *
        # (s_x * s_ih) + b_ih, the reference's arithmetic (times 1 is exact)
        y = native.module().int8_gemv(_dense(q2), z_x.reshape(-1).to(torch.int32).contiguous(), w, _row_sums(w), _ONE,
                                      (s_x * s_ih).float().contiguous(), b_ih.float().contiguous())
        return y.reshape(*x.shape[:-1], w_ih.shape[0])
    if gemv_isa() != "avx512_vnni" and torch.get_float32_matmul_precision() == "highest":
        # the same int32 sums by float32 GEMMs on the codes, and `_rescale`'s float32(acc) * 1 * (s_x * s_ih)
        # + b_ih: the reference's arithmetic (times 1 is exact)
        y = _int8_linear_float_sums(q2, _ONE, z_x.reshape(-1), w, (s_x * s_ih).float(), b_ih.float(), None, None)
        return y.reshape(*x.shape[:-1], w_ih.shape[0])
    x8, zp = _int8_operand(q2, z_x.reshape(-1))
    acc = torch._int_mm(_dense(x8), w.t())
    # the zero-point correction and float32(acc) * (s_x * s_ih) + b_ih in one pass: rescale_rows with
    # an x_scale of 1 (exact) and (s_x * s_ih) as the per-channel scale is the reference's arithmetic
    y = native.module().rescale_rows(acc, zp.contiguous(), _row_sums(w), _ONE,
                                     (s_x * s_ih).float().contiguous(), b_ih.float().contiguous())
    return y.reshape(*x.shape[:-1], w_ih.shape[0])


def _quantize_sequence(x: torch.Tensor, spec: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Codes, scale and zero point of ``x`` on one range (the reference's `qlinear` quantization),
    or None when ``x`` holds NaN / inf (the caller takes the reference path, which raises)."""
    out = native.module().quantize_rows(x.reshape(1, -1).contiguous(), spec.qmin, spec.qmax, spec.symmetric,
                                        spec.signed)
    return (out[0], out[1].reshape(()), out[2].reshape(())) if out else None


def _layer(mode: str, x: torch.Tensor, q: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
           state: list[torch.Tensor], cell: list[torch.Tensor], spec: Any, reverse: bool) -> list[torch.Tensor]:
    w_ih, s_ih, b_ih, w_hh, s_hh, b_hh = cell
    gi = qlinear(x, w_ih, s_ih, b_ih, spec)[0] if q is None else _input_projection(x, *q, w_ih, s_ih, b_ih)
    w_hh = w_hh.contiguous()
    return native.module().rnn_layer(
        mode, gi.contiguous(), [s.float().contiguous() for s in state], w_hh, s_hh.float().contiguous(),
        b_hh.float().contiguous(), _row_sums(w_hh), spec.qmin, spec.qmax, spec.symmetric, spec.signed, reverse,
        _packed_rows4(w_hh))


def rnn_native(mode, input, hx, weights, num_layers, bidirectional, batch_first, act_bits, act_signed,
               act_symmetric, act_narrow):
    n_dirs = 2 if bidirectional else 1
    _check(mode, input, hx, weights, num_layers * n_dirs, act_bits)
    spec = act_spec(act_bits, act_signed, act_symmetric, act_narrow)
    x = input.transpose(0, 1) if batch_first else input  # [T, B, I]
    finals = []
    for layer in range(num_layers):
        q = _quantize_sequence(x, spec)  # both directions read the same codes
        outs = []
        for d in range(n_dirs):
            k = layer * n_dirs + d
            out, *final = _layer(mode, x, q, [s[k] for s in hx], list(weights[_PER * k:_PER * (k + 1)]), spec, d == 1)
            outs.append(out)
            finals.append(final)
        x = outs[0] if n_dirs == 1 else torch.cat(outs, -1)
    output = x.transpose(0, 1) if batch_first else x
    return [output.contiguous()] + [torch.stack([f[j] for f in finals], 0) for j in range(len(hx))]


def cell_native(mode, input, hx, weights, act_bits, act_signed, act_symmetric, act_narrow):
    """A cell is a one-step sequence: the same quantizations and operations as the reference."""
    _check(mode, input, hx, weights, 1, act_bits)
    spec = act_spec(act_bits, act_signed, act_symmetric, act_narrow)
    x = input[None]  # [1, B, I]
    out, *final = _layer(mode, x, _quantize_sequence(x, spec), list(hx), list(weights), spec, False)
    return final


def guard_native(input: torch.Tensor, weights: Any, act_bits: int, batch: int) -> str | None:
    """Shared by the sequence and cell ops: what the C++ loop needs beyond the op's own checks
    (`native_max_batch` sequences at most)."""
    limit = native_max_batch()
    if limit is not None and batch > limit:
        return f"batch {batch} > {limit} (with VNNI the native loop's gemv pays off for a few sequences)"
    if input.dtype != torch.float32 or input.device.type != "cpu":
        return f"input {input.dtype} on {input.device} (native path: float32 on CPU)"
    if input.numel() == 0:
        return "empty input"
    if not 2 <= act_bits <= 8:
        return f"{act_bits}-bit activations (native path: 2..8)"
    widest = max(w.shape[1] for i, w in enumerate(weights) if i % _PER in (0, 3))
    if widest > INT32_EXACT_MAX_K:
        return f"reduction length {widest} > {INT32_EXACT_MAX_K}: int32 sums could overflow"
    return None
