"""Quantized LSTM, GRU and RNN (multi-layer, bidirectional, packed sequences, LSTM projections).

Parameters keep torch's names (``weight_ih_l0``, ``bias_hh_l1_reverse``, ``weight_hr_l0``...),
so a float ``state_dict`` loads unchanged. When no quantizer is active, ``forward`` is the float
class's own (cuDNN/oneDNN kernels, bit-identical outputs). Otherwise an unrolled Python
implementation of torch's equations runs, with for each layer ``l`` and direction::

    gi      = quant_in[l](x) @ fq(W_ih)^T + b_ih                 (whole sequence at once)
    gates_t = gi_t + quant_hidden[l, dir](h_{t-1}) @ fq(W_hh)^T + b_hh
    LSTM:  i, f, g, o = gates;  c_t = σ(f)·c_{t-1} + σ(i)·tanh(g);  h_t = σ(o)·tanh(c_t)
           (proj_size: h_t = quant_proj[l, dir](h_t) @ fq(W_hr)^T)
    GRU:   r = σ(gi_r + gh_r);  z = σ(gi_z + gh_z);  n = tanh(gi_n + r·gh_n)   (gh_n has b_hn)
           h_t = (1 − z)·n + z·h_{t-1}          (float h_{t-1}: only matmul inputs are quantized)
    RNN:   h_t = tanh / relu(gates_t)

The layer input is quantized once per layer (both directions read the same codes); the hidden
state before every ``W_hh`` matmul by a quantizer per layer and direction. Dropout between
layers (training) is applied as torch does, so with the same seed the float and unrolled
paths agree. The output quantizer, if configured, applies to the output sequence (not to the
returned final states). See ``rnn_cells.py`` for the class layout shared with the cells.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..tensor_quantizer import TensorQuantizer
from .base import LayerQuantConfig
from .rnn_cells import (
    QuantGRUCell,
    QuantLSTMCell,
    QuantRNNCell,
    State,
    Step,
    _identity,
    _QuantRecurrent,
    make_step,
)

__all__ = ["QuantGRU", "QuantGRUCell", "QuantLSTM", "QuantLSTMCell", "QuantRNN", "QuantRNNCell"]


def _run_direction(step: Step, gi: Sequence[torch.Tensor], state0: State, batch_sizes: Sequence[int],
                   reverse: bool) -> tuple[list[torch.Tensor], State]:
    """Run ``step`` over time; step ``t`` sees the first ``batch_sizes[t]`` sequences (packed
    sequences sort them by decreasing length; padded input has all sizes equal).

    Forward: a sequence that has ended keeps its last state. Reverse: a sequence enters at
    its own last step, starting from its initial state. Returns the per-step outputs ``h_t``
    (``[batch_sizes[t], H]``) and the final state of every sequence.
    """
    outs: list[Any] = [None] * len(gi)
    if not reverse:
        state = state0
        for t, bs in enumerate(batch_sizes):
            new = step(gi[t], tuple(s[:bs] for s in state) if bs < state[0].shape[0] else state)
            outs[t] = new[0]
            state = new if bs == state[0].shape[0] else tuple(
                torch.cat([n, s[bs:]]) for n, s in zip(new, state))
        return outs, state
    state = tuple(s[:0] for s in state0)
    for t in reversed(range(len(batch_sizes))):
        bs, have = batch_sizes[t], state[0].shape[0]
        if bs > have:
            state = tuple(torch.cat([s, s0[have:bs]]) for s, s0 in zip(state, state0))
        state = step(gi[t], state)
        outs[t] = state[0]
    return outs, state


class _SeqKernel:
    """The float class's forward when no quantizer is active (and ``force_unrolled`` is off),
    else the unrolled quantized implementation."""

    force_unrolled: bool = False  # run the Python implementation even with quantizers inactive

    def forward(self, input: Any, hx: Any = None) -> Any:
        if not (self.force_unrolled or self.any_quantizer_active()):  # type: ignore[attr-defined]
            return super().forward(input, hx)  # type: ignore[misc]
        return self._unrolled_forward(input, hx)  # type: ignore[attr-defined]


class _QuantRNNBase(_QuantRecurrent):
    """Quantizers: ``layer_input_quantizers[l]``, ``hidden_quantizers[l * D + d]``,
    ``proj_quantizers[l * D + d]`` (LSTM with ``proj_size``) from ``config.input``; one
    ``weight_quantizer``; optional ``output_quantizer``. ``input_quantizer`` is always None
    (layer 0's input quantizer is ``layer_input_quantizers[0]``)."""

    _kernel = _SeqKernel
    quantize_input = False
    layer_input_quantizers: nn.ModuleList
    hidden_quantizers: nn.ModuleList
    proj_quantizers: nn.ModuleList

    # ------------------------------------------------------------------ quantizers
    @property
    def _num_directions(self) -> int:
        return 2 if self.bidirectional else 1  # type: ignore[attr-defined]

    def _tag(self, index: int) -> str:
        layer, direction = divmod(index, self._num_directions)
        return f"l{layer}" + ("_reverse" if direction else "")

    def init_quantizers(self, config: LayerQuantConfig) -> None:
        # Per instance: the names depend on num_layers, bidirectional and proj_size.
        self.weight_names = tuple(n for n in self._flat_weights_names  # type: ignore[attr-defined]
                                  if n.startswith("weight_"))
        super().init_quantizers(config)
        n_layers, n_dirs = self.num_layers, self._num_directions  # type: ignore[attr-defined]

        def make(count: int) -> nn.ModuleList:
            return nn.ModuleList(TensorQuantizer(config.input) for _ in range(count if config.input else 0))

        self.layer_input_quantizers = make(n_layers)
        self.hidden_quantizers = make(n_layers * n_dirs)
        self.proj_quantizers = make(n_layers * n_dirs if getattr(self, "proj_size", 0) else 0)
        self._init_learned_weight_range()

    def quantizers(self) -> Iterator[tuple[str, TensorQuantizer]]:
        n_dirs = self._num_directions
        for layer, q in enumerate(self.layer_input_quantizers):
            yield f"input[l{layer}]", q  # type: ignore[misc]
            for i in range(layer * n_dirs, (layer + 1) * n_dirs):
                if i < len(self.hidden_quantizers):
                    yield f"hidden[{self._tag(i)}]", self.hidden_quantizers[i]  # type: ignore[misc]
                if i < len(self.proj_quantizers):
                    yield f"proj_input[{self._tag(i)}]", self.proj_quantizers[i]  # type: ignore[misc]
        for kind in ("weight", "output"):
            q = getattr(self, f"{kind}_quantizer", None)
            if q is not None:
                yield kind, q

    @staticmethod
    def _get(qs: nn.ModuleList, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return qs[i] if i < len(qs) else _identity

    # ------------------------------------------------------------------ unrolled forward
    def _unrolled_forward(self, input: Any, hx: Any = None) -> Any:
        mod: Any = self
        is_lstm = mod.mode == "LSTM"
        n_layers, n_dirs = mod.num_layers, self._num_directions
        h_size = mod.proj_size if is_lstm and mod.proj_size > 0 else mod.hidden_size
        packed = isinstance(input, PackedSequence)
        is_batched, batch_dim = True, 0 if mod.batch_first else 1
        if packed:
            x, sizes_t, sorted_indices, unsorted_indices = input
            batch_sizes = [int(b) for b in sizes_t]
            if hx is not None:
                hx = mod.permute_hidden(hx, sorted_indices)
        else:
            sizes_t = sorted_indices = unsorted_indices = None
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                got = f"{input.dim()}D tensor" if isinstance(input, torch.Tensor) else type(input).__name__
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {got} instead")
            is_batched = input.dim() == 3
            want = 3 if is_batched else 2
            states = (hx if is_lstm else (hx,)) if hx is not None else ()
            if any(s.dim() != want for s in states):
                raise RuntimeError(f"For {'batched 3-D' if is_batched else 'unbatched 2-D'} input, hx should "
                                   f"also be {want}-D but got {[s.dim() for s in states]}-D tensor(s)")
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    hx = tuple(s.unsqueeze(1) for s in hx) if is_lstm else hx.unsqueeze(1)
            x = input.transpose(0, 1) if mod.batch_first else input  # time-major [T, B, I]
            batch_sizes = [x.shape[1]] * x.shape[0]
        if hx is None:
            n_batch = batch_sizes[0] if batch_sizes else 0
            zeros = x.new_zeros(n_layers * n_dirs, n_batch, h_size)
            hx = (zeros, x.new_zeros(n_layers * n_dirs, n_batch, mod.hidden_size)) if is_lstm else zeros
        mod.check_forward_args(x if packed else input, hx, sizes_t)
        states0 = tuple(hx) if is_lstm else (hx,)

        layer_x, finals = x, []
        for layer in range(n_layers):
            xq = self._get(self.layer_input_quantizers, layer)(layer_x)
            outs = []
            for d in range(n_dirs):
                index, sfx = layer * n_dirs + d, f"_l{layer}" + ("_reverse" if d else "")
                bias = (lambda n, sfx=sfx: getattr(self, n + sfx)) if mod.bias else (lambda n: None)
                gi = F.linear(xq, getattr(self, "weight_ih" + sfx), bias("bias_ih"))
                step = make_step(mod.mode, getattr(self, "weight_hh" + sfx), bias("bias_hh"),
                                 self._get(self.hidden_quantizers, index),
                                 getattr(self, "weight_hr" + sfx) if h_size != mod.hidden_size else None,
                                 self._get(self.proj_quantizers, index))
                steps, final = _run_direction(step, gi.split(batch_sizes) if packed else gi.unbind(0),
                                              tuple(s[index] for s in states0), batch_sizes, reverse=d == 1)
                outs.append(torch.cat(steps, 0) if packed else torch.stack(steps, 0))
                finals.append(final)
            layer_x = outs[0] if n_dirs == 1 else torch.cat(outs, -1)
            if mod.dropout and mod.training and layer < n_layers - 1:
                layer_x = F.dropout(layer_x, mod.dropout, True)

        output = layer_x if self.output_quantizer is None else self.output_quantizer(layer_x)
        hidden: Any = tuple(torch.stack([f[k] for f in finals], 0) for k in range(len(states0)))
        hidden = hidden if is_lstm else hidden[0]
        if packed:
            return (PackedSequence(output, sizes_t, sorted_indices, unsorted_indices),
                    mod.permute_hidden(hidden, unsorted_indices))
        if mod.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = tuple(s.squeeze(1) for s in hidden) if is_lstm else hidden.squeeze(1)
        return output, hidden


class QuantRNN(_QuantRNNBase, _SeqKernel, nn.RNN):
    float_type = nn.RNN


class QuantLSTM(_QuantRNNBase, _SeqKernel, nn.LSTM):
    float_type = nn.LSTM


class QuantGRU(_QuantRNNBase, _SeqKernel, nn.GRU):
    float_type = nn.GRU
