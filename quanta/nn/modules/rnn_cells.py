"""Quantized recurrent cells, and the mixin that every quantized recurrent module shares.

A recurrent module has two matmul inputs per step: the input ``x_t`` (against ``W_ih``) and
the previous hidden state ``h_{t-1}`` (against ``W_hh``). Both are fake-quantized by
activation quantizers built from ``LayerQuantConfig.input``; all weight tensors share one
``weight_quantizer`` (per output row by default: ``axis=0``, the gate units), which keeps a
range per tensor. Only matmul inputs are quantized: biases, gate activations, the LSTM cell
state ``c`` and the ``h_{t-1}`` in GRU's blend ``(1 - z) n + z h`` stay in float. Cells and
sequence modules share one step function (`make_step`), so a loop of quantized cells equals
the one-layer quantized module.

Class layout (here for ``QuantLSTMCell``; the sequence modules in ``rnn.py`` are alike)::

    QuantLSTMCell -> _QuantRecurrent -> QuantModule -> _CellKernel -> nn.LSTMCell

``_QuantRecurrent.forward`` shadows the weights by their fake-quantized values and calls the
next ``forward`` after the mixin: a user subclass's own ``forward`` when there is one, then
the kernel. For a user subclass ``MyCell(nn.LSTMCell)`` the quantized class is
``(QuantLSTMCell, MyCell, _CellKernel)``, whose MRO puts ``MyCell`` *before* the kernel, so
the user's ``forward`` runs and its ``super().forward`` reaches the quantized kernel.
When no quantizer is active the kernel calls the float class's ``forward`` unchanged (torch's
kernels, bit-identical to float); otherwise it runs `make_step` on the shadowed weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.recurrent_gates import State, check_mode, gate_step
from ..tensor_quantizer import TensorQuantizer
from .base import LayerQuantConfig, QuantModule

__all__ = ["QuantGRUCell", "QuantLSTMCell", "QuantRNNCell"]

_RECURRENT_CLASSES: dict[tuple[type, type], type] = {}


class _QuantRecurrent(QuantModule):
    """Shared by the quantized cells and sequence modules (see the module docstring)."""

    _kernel: ClassVar[type]  # placed right before the float class in the MRO
    weight_channel_axis = 0  # rows of W_ih / W_hh / W_hr: gate (or projection) units
    weight_reduce_axis = 1

    @classmethod
    def quant_class_for(cls, float_cls: type) -> type:
        """``cls`` for the exact float type; for a user subclass, a class whose MRO runs the
        subclass's ``forward`` first and reaches the quantized kernel through its ``super()``."""
        if float_cls is cls.float_type:
            return cls
        key = (cls, float_cls)
        if key not in _RECURRENT_CLASSES:
            _RECURRENT_CLASSES[key] = type(
                f"Quant{float_cls.__name__}", (cls, float_cls, cls._kernel),
                {"__module__": float_cls.__module__, "__doc__": float_cls.__doc__})
        return _RECURRENT_CLASSES[key]

    def _init_learned_weight_range(self) -> None:
        """``weight_quantizer`` is shared by all weight tensors: a learned range starts at the
        widest range over them (the base class starts it from the first tensor only)."""
        wq = self.weight_quantizer
        if wq is None or not wq.desc.learn_amax or wq.spec.dynamic:
            return
        ranges = [wq.range_of(self._parameters[n]) for n in self.weight_names]  # type: ignore[attr-defined]
        shapes = {tuple(r[1].shape) for r in ranges}
        if len(shapes) > 1:
            raise ValueError(
                f"{type(self).__name__}: LayerQuantConfig.weight.learn_amax needs one range shape for all "
                f"weight tensors {list(self.weight_names)}, got {sorted(shapes)} (per-channel with "
                "proj_size); use a per-tensor or non-learned weight descriptor")
        lo = torch.stack([r[0] for r in ranges]).amin(0)
        hi = torch.stack([r[1] for r in ranges]).amax(0)
        wq.set_range(lo, hi)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.quantized_weights():
            # The next forward after the mixin: a user subclass's forward, else the kernel.
            return super(QuantModule, self).forward(*args, **kwargs)  # type: ignore[misc]


Step = Callable[[torch.Tensor, State], State]  # (input projection gi_t, state) -> new state


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def make_step(mode: str, w_hh: torch.Tensor, b_hh: torch.Tensor | None,
              hidden_q: Callable[[torch.Tensor], torch.Tensor] = _identity,
              w_hr: torch.Tensor | None = None,
              proj_q: Callable[[torch.Tensor], torch.Tensor] = _identity) -> Step:
    """One recurrent step given the input projection ``gi = x W_ih^T + b_ih``: torch's equations
    (`quanta.core.recurrent_gates.gate_step`, which the integer ops share) with only the matmul
    inputs quantized (``hidden_q(h)``, ``proj_q``); ``mode`` is RNNBase's (``LSTM``, ``GRU``,
    ``RNN_TANH``, ``RNN_RELU``)."""
    check_mode(mode)

    def step(gi: torch.Tensor, state: State) -> State:
        new = gate_step(mode, gi, F.linear(hidden_q(state[0]), w_hh, b_hh), state)
        if w_hr is None:
            return new
        return (F.linear(proj_q(new[0]), w_hr),) + new[1:]  # LSTM's projection of h
    return step


_CELL_MODES = {"LSTMCell": "LSTM", "GRUCell": "GRU"}


class _CellKernel:
    """One quantized step (``make_step``) on the shadowed (fake-quantized) weights; the float
    class's own forward when no quantizer is active."""

    input_quantizer: TensorQuantizer | None
    hidden_quantizer: TensorQuantizer | None
    output_quantizer: TensorQuantizer | None
    force_unrolled: bool = False  # the Python step even with quantizers inactive

    def forward(self, input: torch.Tensor, hx: Any = None) -> Any:
        if not (self.force_unrolled or self.any_quantizer_active()):  # type: ignore[attr-defined]
            return super().forward(input, hx)  # type: ignore[misc]
        mod: Any = self
        float_name = mod.float_type.__name__
        is_lstm = float_name == "LSTMCell"
        states = () if hx is None else (tuple(hx) if is_lstm else (hx,))
        if input.dim() not in (1, 2) or any(s.dim() not in (1, 2) for s in states):
            raise ValueError(f"{float_name}: Expected input and hidden to be 1D or 2D, got "
                             f"{input.dim()}D and {[s.dim() for s in states]}D")
        if not states:  # zeros are exact on every grid; they still pass the hidden quantizer
            zeros = input.new_zeros(*input.shape[:-1], mod.hidden_size)
            states = (zeros, zeros) if is_lstm else (zeros,)
        mode = _CELL_MODES.get(float_name) or ("RNN_RELU" if mod.nonlinearity == "relu" else "RNN_TANH")
        if mode.startswith("RNN") and mod.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {mod.nonlinearity}")
        x = input if self.input_quantizer is None else self.input_quantizer(input)
        step = make_step(mode, mod.weight_hh, mod.bias_hh if mod.bias else None,
                         _identity if self.hidden_quantizer is None else self.hidden_quantizer)
        out = step(F.linear(x, mod.weight_ih, mod.bias_ih if mod.bias else None), states)
        if self.output_quantizer is not None:
            out = (self.output_quantizer(out[0]),) + out[1:]
        return out if is_lstm else out[0]


class _QuantCell(_QuantRecurrent):
    """Quantizers: ``input_quantizer`` (x), ``hidden_quantizer`` (h), ``weight_quantizer``
    (``weight_ih``, ``weight_hh``), optional ``output_quantizer`` (h')."""

    _kernel = _CellKernel
    weight_names = ("weight_ih", "weight_hh")
    hidden_quantizer: TensorQuantizer | None

    def init_quantizers(self, config: LayerQuantConfig) -> None:
        super().init_quantizers(config)
        self.hidden_quantizer = TensorQuantizer(config.input) if config.input is not None else None
        self._init_learned_weight_range()

    def quantizers(self) -> Iterator[tuple[str, TensorQuantizer]]:
        for kind, q in (("input", self.input_quantizer), ("hidden", self.hidden_quantizer),
                        ("weight", self.weight_quantizer), ("output", self.output_quantizer)):
            if q is not None:
                yield kind, q


class QuantRNNCell(_QuantCell, _CellKernel, nn.RNNCell):
    float_type = nn.RNNCell


class QuantLSTMCell(_QuantCell, _CellKernel, nn.LSTMCell):
    float_type = nn.LSTMCell


class QuantGRUCell(_QuantCell, _CellKernel, nn.GRUCell):
    float_type = nn.GRUCell
