"""Dynamic int8 recurrent ops: LSTM / GRU / RNN sequences and single cells.

Weights are int8 codes with one float32 scale per row (symmetric, zero point 0); activations
(every matmul input: the layer input, the hidden state before ``W_hh``) are quantized per call,
per tensor, on the grid ``act`` describes; every gate matmul is an integer matmul with int32
accumulation, rescaled in float32::

    q_x, s_x, z_x = quantize_dynamic(x)                        (quanta.core, the simulation's numerics)
    acc           = (q_x - z_x) @ W_codes^T                     (exact integers, int32)
    y             = acc * (s_x * s_w) + b                       (float32)

Which tensors are quantized together is the simulation's (`quanta.nn.QuantLSTM` with dynamic
activation quantizers): the input of each layer once for the whole sequence ``[T, B, I]``
(both directions read the same codes), the hidden state once per step ``[B, H]``. The gate
math is torch's, in float32 (see `_step`).

Ops (``torch.ops.quanta.*``; the last argument is ``impl``)::

    dynamic_int8_rnn(str mode, Tensor input, Tensor[] hx, Tensor[] weights, int num_layers,
                     bool bidirectional, bool batch_first, int act_bits, bool act_signed,
                     bool act_symmetric, bool act_narrow, str impl) -> Tensor[]
        mode: "LSTM" | "GRU" | "RNN_TANH" | "RNN_RELU"; input [T, B, I] (batch_first: [B, T, I]);
        hx: [h0] or [h0, c0], each [L * D, B, H]; weights: per layer and direction (l0, l0_reverse,
        l1, ...) six tensors (w_ih int8 [G*H, I], s_ih f32 [G*H], b_ih f32 [G*H], w_hh int8
        [G*H, H], s_hh, b_hh); returns [output, h_n] or [output, h_n, c_n].
    dynamic_int8_rnn_cell(str mode, Tensor input, Tensor[] hx, Tensor[] weights, int act_bits,
                          bool act_signed, bool act_symmetric, bool act_narrow, str impl) -> Tensor[]
        input [B, I]; hx [h] or [h, c], each [B, H]; weights: the six tensors; returns [h'] or [h', c'].

Implementations (the numerics and the reference loops: `quanta.kernels.recurrent_math`):
- ``reference``: the unrolled loop; integer matmuls in float64 (exact for these sizes).
- ``native``: the time loop in C++ (`quanta.kernels.recurrent_native`; AVX-512 VNNI or AVX2
  builds of the native library), any 2..8-bit grid, any batch without VNNI (up to 8 sequences
  with it): the reference's codes and integer sums, gates with SLEEF's vector expf / tanhf
  (within an ulp of ATen's); agrees to float rounding, the same bits with any thread count.
- ``int_mm``: the same loop with ``torch._int_mm`` (int8 x int8 -> int32) for signed symmetric
  activations (zero point 0): bit-identical to the reference (same codes, same integer sums,
  same float ops).
- ``fbgemm``: torch's own dynamic quantized kernels, the ones ``torch.ao.nn.quantized.dynamic``
  runs: ``torch.quantized_lstm`` / ``torch.quantized_gru`` (C++ time loop) with
  ``quantized::linear_prepack`` weights, and ``quantized::linear_dynamic`` per step for RNN
  sequences and all cells. FBGEMM quantizes each activation itself, always on the *unsigned
  asymmetric* grid: range ``[min(x, 0), max(x, 0)]`` over 255 steps (``reduce_range``: 127),
  zero point ``round(-min / scale)``; the same tensors as the simulation (whole sequence for
  the layer input on CPU, ``h`` per step). So it is accepted only when the activation grid is
  ``act_bits=8`` (or 7 = reduce_range), unsigned, asymmetric -- 8-bit only where its u8 × s8
  sums are exact, i.e. with VNNI (without it, int16 pair sums saturate: `FBGEMM_SATURATION`,
  measured on an AVX2 EPYC: gate sums off by up to 2.0); it then agrees with the reference
  to float rounding (scale and zero point are computed in double there, float32 here; rounding
  is ``nearbyint(x / s + z)`` there, ``round(x * (1 / s)) + z`` here: a code can differ by one
  on an exact tie). The default simulated grid (signed symmetric int8) runs ``int_mm``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .library import Impl, KernelOp
from .recurrent_math import (  # the numerics, re-exported (see __all__)
    _PER,
    GATES,
    MODES,
    Matmul,
    _cell_op,
    _check,
    _sequence_op,
    _step,
    act_spec,
    cell_reference,
    exact_matmul,
    int_mm_matmul,
    qlinear,
    rnn_reference,
)
from .recurrent_native import cell_native, guard_native, native_available, rnn_native
from .u8s8_saturation import SaturationProbe


# ---------------------------------------------------------------------------- int_mm
def _int_mm_available() -> bool:
    try:
        a = torch.ones(1, 8, dtype=torch.int8)
        return int(torch._int_mm(a, a.t())[0, 0]) == 8
    except Exception:
        return False


_INT_MM_OK: list[bool] = []


def int_mm_available() -> bool:
    if not _INT_MM_OK:
        _INT_MM_OK.append(_int_mm_available())
    return _INT_MM_OK[0]


def _int_mm_guard_act(act_bits: int, act_signed: bool, act_symmetric: bool) -> str | None:
    if not (act_signed and act_symmetric):
        return "int_mm needs signed symmetric activations (zero point 0)"
    if act_bits > 8:
        return "int_mm needs activations of at most 8 bits"
    return None


rnn_int_mm, cell_int_mm = _sequence_op(int_mm_matmul), _cell_op(int_mm_matmul)


# ---------------------------------------------------------------------------- fbgemm
def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _fbgemm_sums(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fbgemm's ``linear_dynamic`` on ``x`` (uint8 codes 0..255 as floats: it picks scale 1, zero
    point 0) with ``w`` at unit scales: the integer sums (the `SaturationProbe` kernel)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = torch.ops.quantized.linear_prepack(_per_channel(w, torch.ones(w.shape[0])), None)
        return torch.ops.quantized.linear_dynamic(x.float(), packed, False)


#: without VNNI, fbgemm's u8 × s8 GEMM saturates int16 pair sums of full-range 8-bit activations;
#: 7-bit ones (``reduce_range``: 2 · 127 · 128 < 2^15) stay exact, which is why torch.ao uses them on x86
FBGEMM_SATURATION = SaturationProbe("fbgemm", _fbgemm_sums)


def _fbgemm_limits() -> str | None:
    if not fbgemm_available():
        return "this torch has no fbgemm"
    why = FBGEMM_SATURATION.reason()
    return None if why is None else f"7-bit (reduce_range) activations only: {why}"


def _fbgemm_guard_act(act_bits: int, act_signed: bool, act_symmetric: bool, act_narrow: bool) -> str | None:
    if act_signed or act_symmetric or act_narrow or act_bits not in (7, 8):
        return ("fbgemm quantizes activations on the unsigned asymmetric 8-bit grid (7-bit with "
                f"reduce_range); got {act_spec(act_bits, act_signed, act_symmetric, act_narrow)}")
    if torch.backends.quantized.engine not in ("fbgemm", "x86"):
        return f"the quantized engine is {torch.backends.quantized.engine!r}, not fbgemm/x86"
    if act_bits == 8 and not FBGEMM_SATURATION.exact():
        return f"8-bit activations: {FBGEMM_SATURATION.reason()} (7-bit reduce_range ones would be exact)"
    return None


#: packed fbgemm weights, keyed by the weight tensors' identities and versions
_PACKED: dict[tuple, tuple[list[weakref.ref], Any]] = {}


def _per_channel(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._make_per_channel_quantized_tensor(
            codes, scales.double(), torch.zeros(codes.shape[0], dtype=torch.long), 0)


def prepack(weights: Sequence[torch.Tensor], mode: str, reduce_range: bool) -> list[Any]:
    """fbgemm's packed form of ``weights`` (6 per layer and direction), cached by tensor
    identity and version: a ``CellParamsBase`` per cell for LSTM/GRU sequences, else a pair of
    ``LinearPackedParamsBase`` per cell. Integer modules call it in ``pack()``."""
    seq_cells = mode in ("LSTM", "GRU")
    key = (mode, reduce_range) + tuple((id(t), t._version) for t in weights)
    hit = _PACKED.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], weights)):
        return hit[1]
    for k in [k for k, v in _PACKED.items() if any(r() is None for r in v[0])]:
        del _PACKED[k]
    packed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(len(weights) // _PER):
            w_ih, s_ih, b_ih, w_hh, s_hh, b_hh = weights[_PER * k:_PER * (k + 1)]
            p_ih = torch.ops.quantized.linear_prepack(_per_channel(w_ih, s_ih), b_ih)
            p_hh = torch.ops.quantized.linear_prepack(_per_channel(w_hh, s_hh), b_hh)
            if seq_cells:
                packed.append(torch.ops.quantized.make_quantized_cell_params_dynamic(
                    p_ih, p_hh, b_ih, b_hh, reduce_range))
            else:
                packed.append((p_ih, p_hh))
    _PACKED[key] = ([weakref.ref(t) for t in weights], packed)
    return packed


def _fb_step(mode: str, x: torch.Tensor, state: tuple[torch.Tensor, ...], p_ih: Any, p_hh: Any, rr: bool,
             gi: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    if gi is None:
        gi = torch.ops.quantized.linear_dynamic(x, p_ih, rr)
    gh = torch.ops.quantized.linear_dynamic(state[0], p_hh, rr)
    return _step(mode, gi, gh, state)


def rnn_fbgemm(mode, input, hx, weights, num_layers, bidirectional, batch_first, act_bits, act_signed,
               act_symmetric, act_narrow):
    n_dirs = 2 if bidirectional else 1
    _check(mode, input, hx, weights, num_layers * n_dirs, act_bits)
    rr = act_bits == 7
    packed = prepack(weights, mode, rr)
    if mode == "LSTM":
        out, h, c = torch.quantized_lstm(input, list(hx), packed, True, num_layers, 0.0, False, bidirectional,
                                         batch_first, dtype=torch.qint8, use_dynamic=True)
        return [out, h, c]
    if mode == "GRU":
        out, h = torch.quantized_gru(input, hx[0], packed, True, num_layers, 0.0, False, bidirectional, batch_first)
        return [out, h]
    # RNN_TANH / RNN_RELU: the input projection for the whole sequence, h per step.
    x = input.transpose(0, 1) if batch_first else input
    finals = []
    for layer in range(num_layers):
        outs = []
        for d in range(n_dirs):
            k = layer * n_dirs + d
            p_ih, p_hh = packed[k]
            gi = torch.ops.quantized.linear_dynamic(x, p_ih, rr)
            state: tuple[torch.Tensor, ...] = (hx[0][k],)
            steps: list[Any] = [None] * x.shape[0]
            for t in (reversed(range(x.shape[0])) if d else range(x.shape[0])):
                state = _fb_step(mode, x[t], state, p_ih, p_hh, rr, gi[t])
                steps[t] = state[0]
            outs.append(torch.stack(steps, 0))
            finals.append(state[0])
        x = outs[0] if n_dirs == 1 else torch.cat(outs, -1)
    output = x.transpose(0, 1) if batch_first else x
    return [output.contiguous(), torch.stack(finals, 0)]


def cell_fbgemm(mode, input, hx, weights, act_bits, act_signed, act_symmetric, act_narrow):
    _check(mode, input, hx, weights, 1, act_bits)
    rr = act_bits == 7
    p_ih, p_hh = prepack(weights, "cell", rr)[0]
    return list(_fb_step(mode, input, tuple(hx), p_ih, p_hh, rr))


# ---------------------------------------------------------------------------- guards, fakes, ops
def _rnn_guard_fbgemm(mode, input, hx, weights, num_layers, bidirectional, batch_first, act_bits, act_signed,
                      act_symmetric, act_narrow):
    return _fbgemm_guard_act(act_bits, act_signed, act_symmetric, act_narrow)


def _cell_guard_fbgemm(mode, input, hx, weights, act_bits, act_signed, act_symmetric, act_narrow):
    return _fbgemm_guard_act(act_bits, act_signed, act_symmetric, act_narrow)


def _rnn_guard_native(mode, input, hx, weights, num_layers, bidirectional, batch_first, act_bits, act_signed,
                      act_symmetric, act_narrow):
    return guard_native(input, weights, act_bits, input.shape[0 if batch_first else 1] if input.dim() == 3 else 0)


def _cell_guard_native(mode, input, hx, weights, act_bits, act_signed, act_symmetric, act_narrow):
    return guard_native(input, weights, act_bits, input.shape[0] if input.dim() == 2 else 0)


def _rnn_guard_int_mm(mode, input, hx, weights, num_layers, bidirectional, batch_first, act_bits, act_signed,
                      act_symmetric, act_narrow):
    return _int_mm_guard_act(act_bits, act_signed, act_symmetric)


def _cell_guard_int_mm(mode, input, hx, weights, act_bits, act_signed, act_symmetric, act_narrow):
    return _int_mm_guard_act(act_bits, act_signed, act_symmetric)


def _rnn_fake(mode, input, hx, weights, num_layers, bidirectional, batch_first, act_bits, act_signed,
              act_symmetric, act_narrow):
    n_dirs = 2 if bidirectional else 1
    t_dim, b_dim = (1, 0) if batch_first else (0, 1)
    h = hx[0].shape[-1]
    shape = [0, 0, h * n_dirs]
    shape[t_dim], shape[b_dim] = input.shape[t_dim], input.shape[b_dim]
    return [input.new_empty(shape)] + [s.new_empty(s.shape) for s in hx]


def _cell_fake(mode, input, hx, weights, act_bits, act_signed, act_symmetric, act_narrow):
    return [s.new_empty(s.shape) for s in hx]


_ACT = "int act_bits, bool act_signed, bool act_symmetric, bool act_narrow"

dynamic_int8_rnn = KernelOp(
    "dynamic_int8_rnn",
    f"(str mode, Tensor input, Tensor[] hx, Tensor[] weights, int num_layers, bool bidirectional, "
    f"bool batch_first, {_ACT}, str impl) -> Tensor[]",
    rnn_reference,
    impls=[Impl("native", rnn_native, _rnn_guard_native, native_available, traceable=False, graph_safe=True),
           Impl("fbgemm", rnn_fbgemm, _rnn_guard_fbgemm, fbgemm_available, limits=_fbgemm_limits),
           Impl("int_mm", rnn_int_mm, _rnn_guard_int_mm, int_mm_available)],
    fake=_rnn_fake,
)

dynamic_int8_rnn_cell = KernelOp(
    "dynamic_int8_rnn_cell",
    f"(str mode, Tensor input, Tensor[] hx, Tensor[] weights, {_ACT}, str impl) -> Tensor[]",
    cell_reference,
    impls=[Impl("native", cell_native, _cell_guard_native, native_available, traceable=False, graph_safe=True),
           Impl("fbgemm", cell_fbgemm, _cell_guard_fbgemm, fbgemm_available, limits=_fbgemm_limits),
           Impl("int_mm", cell_int_mm, _cell_guard_int_mm, int_mm_available)],
    fake=_cell_fake,
)

__all__ = [
    "FBGEMM_SATURATION", "GATES", "MODES", "Matmul", "act_spec", "cell_reference", "dynamic_int8_rnn",
    "dynamic_int8_rnn_cell", "exact_matmul", "fbgemm_available", "int_mm_matmul", "prepack", "qlinear", "rnn_reference",
]
