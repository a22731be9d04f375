"""The numerics of quanta's dynamic int8 recurrent ops (see `quanta.kernels.recurrent`): the
activation grid, exact integer matmuls (the gate equations after them are
`quanta.core.recurrent_gates`, shared with the simulation), input checks, and the readable
reference loops that every fast implementation is tested against."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core import QuantSpec, choose_qparams, compute_range, quantize
from ..core.recurrent_gates import GATES, MODES, check_mode, gate_step  # noqa: F401  (GATES, MODES: re-exported)

_PER = 6  # tensors per layer and direction in ``weights``

_step = gate_step  # the gate equations, shared with the simulation
Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, zp, w_codes) -> int32


def act_spec(bits: int, signed: bool, symmetric: bool, narrow: bool) -> QuantSpec:
    """The activation grid of the ops: dynamic, per tensor."""
    return QuantSpec(bits=bits, signed=signed, symmetric=symmetric, narrow_range=narrow, dynamic=True)


# ---------------------------------------------------------------------------- integer matmuls
def exact_matmul(q: torch.Tensor, zp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(q - zp) @ w^T`` exactly (float64 holds every int32 sum), as int32."""
    return ((q.double() - zp.double()) @ w.double().t()).to(torch.int32)


def int_mm_matmul(q: torch.Tensor, zp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``q @ w^T`` with ``torch._int_mm`` (int8 x int8 -> int32); zero point 0 only.

    torch 2.13's CPU ``_int_mm`` returns wrong sums when the reduction length is 1 (found by
    the module tests: an LSTM with ``input_size=1``), so a length-1 reduction is padded with
    a zero column (exact)."""
    q2 = q.reshape(-1, q.shape[-1])
    if q2.shape[1] == 1:
        q2, w = torch.nn.functional.pad(q2, (0, 1)), torch.nn.functional.pad(w, (0, 1))
    return torch._int_mm(q2, w.t()).reshape(*q.shape[:-1], w.shape[0])


def qlinear(x: torch.Tensor, w: torch.Tensor, s_w: torch.Tensor, b: torch.Tensor, spec: QuantSpec,
            matmul: Matmul = exact_matmul) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` dynamically (one range for the whole tensor), integer matmul, rescale.
    Returns ``(y, acc)``: the float32 output and the int32 sums."""
    lo, hi = compute_range(x, spec)
    s_x, z_x = choose_qparams(lo, hi, spec)
    q = quantize(x, s_x, z_x, spec)
    acc = matmul(q, z_x, w)
    return acc.float() * (s_x * s_w) + b, acc


# ---------------------------------------------------------------------------- checks
def _check(mode: str, input: torch.Tensor, hx: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
           n_cells: int, act_bits: int) -> None:
    check_mode(mode)
    n_states = 2 if mode == "LSTM" else 1
    if len(hx) != n_states:
        raise ValueError(f"{mode} needs {n_states} state tensor(s), got {len(hx)}")
    if len(weights) != _PER * n_cells:
        raise ValueError(f"expected {_PER * n_cells} weight tensors (6 per layer and direction), got {len(weights)}")
    if input.dtype != torch.float32:
        raise TypeError(f"dynamic int8 recurrent ops take float32 input, got {input.dtype}")
    if not 2 <= act_bits <= 8:
        raise ValueError(f"act_bits must be in 2..8, got {act_bits}")
    for k in range(n_cells):
        w_ih, s_ih, b_ih, w_hh, s_hh, b_hh = weights[_PER * k:_PER * (k + 1)]
        if w_ih.dtype != torch.int8 or w_hh.dtype != torch.int8:
            raise TypeError(f"weights must be int8 codes, got {w_ih.dtype} / {w_hh.dtype}")
        if s_ih.shape != (w_ih.shape[0],) or s_hh.shape != (w_hh.shape[0],):
            raise ValueError("weight scales must have one value per weight row")


# ---------------------------------------------------------------------------- reference loop
def _sequence(mode: str, input: torch.Tensor, hx: list[torch.Tensor], weights: list[torch.Tensor], num_layers: int,
              bidirectional: bool, batch_first: bool, spec: QuantSpec, matmul: Matmul) -> list[torch.Tensor]:
    n_dirs = 2 if bidirectional else 1
    _check(mode, input, hx, weights, num_layers * n_dirs, spec.bits)
    x = input.transpose(0, 1) if batch_first else input  # [T, B, I]
    finals: list[tuple[torch.Tensor, ...]] = []
    for layer in range(num_layers):
        outs = []
        for d in range(n_dirs):
            k = layer * n_dirs + d
            w_ih, s_ih, b_ih, w_hh, s_hh, b_hh = weights[_PER * k:_PER * (k + 1)]
            # The layer input: one range for the whole sequence (the simulation's layer quantizer).
            gi, _ = qlinear(x, w_ih, s_ih, b_ih, spec, matmul)
            state = tuple(s[k] for s in hx)
            steps: list[Any] = [None] * x.shape[0]
            for t in (reversed(range(x.shape[0])) if d else range(x.shape[0])):
                gh, _ = qlinear(state[0], w_hh, s_hh, b_hh, spec, matmul)  # h: one range per step
                state = _step(mode, gi[t], gh, state)
                steps[t] = state[0]
            outs.append(torch.stack(steps, 0) if steps else x.new_zeros(0, x.shape[1], w_hh.shape[1]))
            finals.append(state)
        x = outs[0] if n_dirs == 1 else torch.cat(outs, -1)
    output = x.transpose(0, 1) if batch_first else x
    return [output.contiguous()] + [torch.stack([f[j] for f in finals], 0) for j in range(len(hx))]


def _cell(mode: str, input: torch.Tensor, hx: list[torch.Tensor], weights: list[torch.Tensor], spec: QuantSpec,
          matmul: Matmul) -> list[torch.Tensor]:
    _check(mode, input, hx, weights, 1, spec.bits)
    w_ih, s_ih, b_ih, w_hh, s_hh, b_hh = weights
    gi, _ = qlinear(input, w_ih, s_ih, b_ih, spec, matmul)
    gh, _ = qlinear(hx[0], w_hh, s_hh, b_hh, spec, matmul)
    return list(_step(mode, gi, gh, tuple(hx)))


def _sequence_op(matmul):
    """The op-schema form of `_sequence` with one way of multiplying (exact or ``_int_mm``)."""
    def run(mode, input, hx, weights, num_layers, bidirectional, batch_first, act_bits, act_signed,
            act_symmetric, act_narrow):
        spec = act_spec(act_bits, act_signed, act_symmetric, act_narrow)
        return _sequence(mode, input, list(hx), list(weights), num_layers, bidirectional, batch_first, spec, matmul)
    return run


def _cell_op(matmul):
    """The op-schema form of `_cell` with one way of multiplying."""
    def run(mode, input, hx, weights, act_bits, act_signed, act_symmetric, act_narrow):
        return _cell(mode, input, list(hx), list(weights), act_spec(act_bits, act_signed, act_symmetric, act_narrow),
                     matmul)
    return run


rnn_reference, cell_reference = _sequence_op(exact_matmul), _cell_op(exact_matmul)


