"""Dynamic int8 LSTM / GRU / RNN and their cells (`quanta.kernels.recurrent`).

Canonical state (``state_dict``), per layer and direction with torch's parameter names::

    weight_ih_l0          int8  [G*H, I]   codes (symmetric, zero point 0)
    weight_ih_l0_scale    f32   [G*H]      one scale per row (gate unit)
    bias_ih_l0            f32   [G*H]      (only with bias=True)
    weight_hh_l0, weight_hh_l0_scale, bias_hh_l0, ..._reverse, ..._l1 ...

Cells use ``weight_ih``, ``weight_ih_scale``, ``bias_ih``, ... Activations are quantized per
call on the grid ``act_spec`` (a dynamic per-tensor `QuantSpec`, the simulated quantizers' spec).
Inference only: no dropout, no projections (``proj_size``), no PackedSequence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..core import Format, Granularity, QuantSpec, Rounding, quantize
from ..kernels import recurrent as K
from ..kernels.recurrent_native import native_max_batch
from ..nn.modules.rnn import QuantGRU, QuantGRUCell, QuantLSTM, QuantLSTMCell, QuantRNN, QuantRNNCell
from .base import IntegerModule
from .validate import flag, one_of, positive_int

__all__ = ["DynamicInt8GRU", "DynamicInt8GRUCell", "DynamicInt8LSTM", "DynamicInt8LSTMCell", "DynamicInt8RNN",
           "DynamicInt8RNNCell"]

#: the grid of ``QuantDescriptor(dynamic=True)``: signed symmetric int8, per tensor
DEFAULT_ACT_SPEC = QuantSpec(bits=8, signed=True, symmetric=True, dynamic=True)


def check_act_spec(spec: QuantSpec) -> str | None:
    if not isinstance(spec, QuantSpec):
        return f"act_spec must be a QuantSpec, got {type(spec).__name__}"
    if spec.format is not Format.INT or not 2 <= spec.bits <= 8:
        return f"activations must be integers of 2..8 bits, got {spec}"
    if spec.granularity is not Granularity.PER_TENSOR:
        return f"activations must be quantized per tensor, got {spec.granularity.value}"
    if not spec.dynamic:
        return ("static activation quantizers are not supported by the dynamic kernel (use "
                "QuantDescriptor(dynamic=True) for the recurrent layers)")
    if spec.rounding is not Rounding.HALF_EVEN:
        return f"activation rounding must be half_even, got {spec.rounding.value}"
    return None


def _weight_problem(sim: Any) -> str | None:
    wq = sim.weight_quantizer
    if wq is None or not wq.quantizing:
        return "its weights are not quantized (no enabled weight_quantizer)"
    s = wq.spec
    if s.format is not Format.INT or s.bits > 8 or not s.signed or not s.symmetric:
        return f"weights must be signed symmetric integers of at most 8 bits, got {s}"
    if s.granularity is Granularity.PER_CHANNEL and s.axis != 0 or \
            s.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_TENSOR):
        return f"weights must be quantized per row (per_channel axis=0) or per tensor, got {s}"
    if s.rounding is Rounding.STOCHASTIC:
        return "stochastic weight rounding cannot be lowered"
    return None


def _act_problem(quantizers: list[Any]) -> tuple[str | None, QuantSpec | None]:
    if not quantizers or any(q is None for q in quantizers):
        return "its activations are not quantized (missing input/hidden quantizers)", None
    if any(not q.quantizing for q in quantizers):
        return "some activation quantizers are disabled", None
    specs = {q.spec for q in quantizers}
    if len(specs) > 1:
        return f"activation quantizers differ: {sorted(map(str, specs))}", None
    spec = specs.pop()
    return check_act_spec(spec), spec


def _codes(sim: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and per-row scales of ``sim``'s weight ``name`` (the simulation's qparams)."""
    w = getattr(sim, name).detach()
    wq = sim.weight_quantizer
    scale, zp = wq.qparams(w)
    q = quantize(w, scale, zp, wq.spec).to(torch.int8)
    return q, scale.float().expand(w.shape[0]).contiguous() if scale.numel() == 1 else scale.float().reshape(-1)


class _Recurrent(IntegerModule):
    mode: str
    _gates: int

    def _init_common(self, input_size: int, hidden_size: int, bias: bool, act_spec: QuantSpec | None) -> None:
        owner = type(self).__name__
        input_size, hidden_size = positive_int(owner, "input_size", input_size), positive_int(
            owner, "hidden_size", hidden_size)
        bias = flag(owner, "bias", bias)
        act_spec = DEFAULT_ACT_SPEC if act_spec is None else act_spec
        problem = check_act_spec(act_spec)
        if problem:
            raise ValueError(f"{type(self).__name__}: {problem}")
        self.input_size, self.hidden_size, self.bias, self.act_spec = input_size, hidden_size, bias, act_spec

    def _register(self, sfx: str, in_features: int) -> None:
        rows = self._gates * self.hidden_size
        for kind, cols in (("ih", in_features), ("hh", self.hidden_size)):
            self.register_buffer(f"weight_{kind}{sfx}", torch.zeros(rows, cols, dtype=torch.int8))
            self.register_buffer(f"weight_{kind}{sfx}_scale", torch.ones(rows))
            if self.bias:
                self.register_buffer(f"bias_{kind}{sfx}", torch.zeros(rows))

    def _weights_of(self, sfx: str) -> list[torch.Tensor]:
        out = []
        for kind in ("ih", "hh"):
            w = getattr(self, f"weight_{kind}{sfx}")
            b = getattr(self, f"bias_{kind}{sfx}") if self.bias else self._zero_bias
            out += [w, getattr(self, f"weight_{kind}{sfx}_scale"), b]
        return out

    def _act_args(self) -> tuple[int, bool, bool, bool]:
        s = self.act_spec
        return s.bits, s.signed, s.symmetric, s.narrow_range

    _RUNTIME = ("_weights", "_zero_bias")

    def build_packed(self) -> None:
        self._zero_bias = torch.zeros(self._gates * self.hidden_size, device=self._device())
        self._weights = [t for sfx in self._suffixes() for t in self._weights_of(sfx)]
        bits, signed, sym, narrow = self._act_args()
        if K.fbgemm_available() and K._fbgemm_guard_act(bits, signed, sym, narrow) is None \
                and self._device().type == "cpu":
            K.prepack(self._weights, self.mode if self._is_sequence else "cell", bits == 7)

    _is_sequence = False

    def _device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def _load_sim(self, sim: Any) -> None:
        with torch.no_grad():
            for sfx in self._suffixes():
                for kind in ("ih", "hh"):
                    q, s = _codes(sim, f"weight_{kind}{sfx}")
                    getattr(self, f"weight_{kind}{sfx}").copy_(q)
                    getattr(self, f"weight_{kind}{sfx}_scale").copy_(s)
                    if self.bias:
                        getattr(self, f"bias_{kind}{sfx}").copy_(getattr(sim, f"bias_{kind}{sfx}").detach().float())
        self.pack()

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(device): the kernels' weights follow
        out = super()._apply(fn, recurse)
        self.pack()
        return out

    def _run(self, op: K.KernelOp, input: torch.Tensor, batch: int, *args: Any) -> list[torch.Tensor]:
        """``op(mode, input, *args)`` through the module's binding: the guards read the input's
        dtype, device, emptiness and ``batch`` (within the native loop's limit or not), the rest is fixed."""
        limit = native_max_batch()
        key = (input.dtype, input.device, input.numel() == 0, limit is None or batch <= limit)
        return self.binding.run(op, key, self.mode, input, *args, preferred=self.impl)

    def _check_state(self, hx: Any, want_shape: tuple[int, ...], x: torch.Tensor) -> list[torch.Tensor]:
        n = 2 if self.mode == "LSTM" else 1
        if hx is None:
            return [x.new_zeros(want_shape) for _ in range(n)]
        states = list(hx) if self.mode == "LSTM" else [hx]
        if self.mode == "LSTM" and (not isinstance(hx, (tuple, list)) or len(states) != 2):
            raise TypeError(f"{type(self).__name__}: hx must be a tuple (h_0, c_0)")
        for s in states:
            self.check_input(s, (torch.float32,))
            if tuple(s.shape) != want_shape:
                raise ValueError(f"{type(self).__name__}: expected hidden state of shape {want_shape}, "
                                 f"got {tuple(s.shape)}")
        return [s.contiguous() for s in states]


class _DynamicInt8RNNBase(_Recurrent):
    _is_sequence = True

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, bidirectional: bool = False, act_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self._init_common(input_size, hidden_size, bias, act_spec)
        owner = type(self).__name__
        self.num_layers = positive_int(owner, "num_layers", num_layers)
        self.batch_first, self.bidirectional = flag(owner, "batch_first", batch_first), flag(
            owner, "bidirectional", bidirectional)
        n_dirs = 2 if bidirectional else 1
        for layer in range(num_layers):
            for d in range(n_dirs):
                self._register(f"_l{layer}" + ("_reverse" if d else ""),
                               input_size if layer == 0 else hidden_size * n_dirs)
        self.pack()

    def _suffixes(self) -> list[str]:
        return [f"_l{layer}" + ("_reverse" if d else "") for layer in range(self.num_layers)
                for d in range(2 if self.bidirectional else 1)]

    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        if not isinstance(sim, cls.simulated_type):
            return f"{cls.__name__} lowers {cls.simulated_type.__name__}, got {type(sim).__name__}"
        if getattr(sim, "proj_size", 0):
            return "LSTM projections (proj_size > 0) are not supported"
        if sim.output_quantizer is not None:
            return "an output quantizer is not supported by the dynamic kernel"
        problem = _weight_problem(sim)
        if problem:
            return problem
        return _act_problem(list(sim.layer_input_quantizers) + list(sim.hidden_quantizers))[0]

    @classmethod
    def _extra_kwargs(cls, sim: Any) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "bias": self.bias, "batch_first": self.batch_first, "bidirectional": self.bidirectional,
                "act_spec": self.act_spec.to_dict(), **self._extra_kwargs(self)}

    @classmethod
    def from_simulated(cls, sim: Any) -> _DynamicInt8RNNBase:
        cls.check_lowerable(sim)
        spec = _act_problem(list(sim.layer_input_quantizers) + list(sim.hidden_quantizers))[1]
        new = cls(sim.input_size, sim.hidden_size, sim.num_layers, sim.bias, sim.batch_first, sim.bidirectional,
                  act_spec=spec, **cls._extra_kwargs(sim))
        new.to(next(sim.parameters()).device)
        new._load_sim(sim)
        return new

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s + f", act=[{self.act_spec}], weight=int8 per-row"

    def forward(self, input: Any, hx: Any = None) -> Any:
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            raise TypeError(f"{name} does not support PackedSequence input; pad the batch "
                            "(torch.nn.utils.rnn.pad_packed_sequence) or run the simulated module")
        self.check_input(input, (torch.float32,))
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: expected a 2-D (unbatched) or 3-D input, got {input.dim()}-D")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{name}: expected input with {self.input_size} features, got {input.shape[-1]}")
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = tuple(s.unsqueeze(1) for s in hx) if self.mode == "LSTM" else hx.unsqueeze(1)
        b = input.shape[0 if self.batch_first else 1]
        n = self.num_layers * (2 if self.bidirectional else 1)
        states = self._check_state(hx, (n, b, self.hidden_size), input)
        if self._stale:
            self.ensure_packed()
        out = self._run(K.dynamic_int8_rnn, input.contiguous(), b, states, self._weights, self.num_layers,
                        self.bidirectional, self.batch_first, *self._act_args())
        output, finals = out[0], out[1:]
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            finals = [f.squeeze(1) for f in finals]
        return output, (tuple(finals) if self.mode == "LSTM" else finals[0])


class DynamicInt8LSTM(_DynamicInt8RNNBase):
    """``nn.LSTM`` with int8 weights and dynamically quantized activations (inference)."""

    mode, _gates, simulated_type = "LSTM", 4, QuantLSTM


class DynamicInt8GRU(_DynamicInt8RNNBase):
    """``nn.GRU`` with int8 weights and dynamically quantized activations (inference)."""

    mode, _gates, simulated_type = "GRU", 3, QuantGRU


class DynamicInt8RNN(_DynamicInt8RNNBase):
    """``nn.RNN`` (tanh or relu) with int8 weights and dynamically quantized activations."""

    _gates, simulated_type = 1, QuantRNN

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, bidirectional: bool = False, act_spec: QuantSpec | None = None,
                 nonlinearity: str = "tanh") -> None:
        one_of("DynamicInt8RNN", "nonlinearity", nonlinearity, ("tanh", "relu"))
        self.nonlinearity = nonlinearity
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, bidirectional, act_spec)

    @classmethod
    def _extra_kwargs(cls, sim: Any) -> dict[str, Any]:
        return {"nonlinearity": sim.nonlinearity}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nonlinearity={self.nonlinearity!r}"


class _DynamicInt8CellBase(_Recurrent):
    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, act_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self._init_common(input_size, hidden_size, bias, act_spec)
        self._register("", input_size)
        self.pack()

    def _suffixes(self) -> list[str]:
        return [""]

    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        if not isinstance(sim, cls.simulated_type):
            return f"{cls.__name__} lowers {cls.simulated_type.__name__}, got {type(sim).__name__}"
        if sim.output_quantizer is not None:
            return "an output quantizer is not supported by the dynamic kernel"
        problem = _weight_problem(sim)
        if problem:
            return problem
        return _act_problem([sim.input_quantizer, sim.hidden_quantizer])[0]

    @classmethod
    def _extra_kwargs(cls, sim: Any) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size, "bias": self.bias,
                "act_spec": self.act_spec.to_dict(), **self._extra_kwargs(self)}

    @classmethod
    def from_simulated(cls, sim: Any) -> _DynamicInt8CellBase:
        cls.check_lowerable(sim)
        spec = _act_problem([sim.input_quantizer, sim.hidden_quantizer])[1]
        new = cls(sim.input_size, sim.hidden_size, sim.bias, act_spec=spec, **cls._extra_kwargs(sim))
        new.to(next(sim.parameters()).device)
        new._load_sim(sim)
        return new

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")
        return s + f", act=[{self.act_spec}], weight=int8 per-row"

    def forward(self, input: torch.Tensor, hx: Any = None) -> Any:
        name = type(self).__name__
        self.check_input(input, (torch.float32,))
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: expected a 1-D (unbatched) or 2-D input, got {input.dim()}-D")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{name}: expected input with {self.input_size} features, got {input.shape[-1]}")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = tuple(s.unsqueeze(0) for s in hx) if self.mode == "LSTM" else hx.unsqueeze(0)
        states = self._check_state(hx, (input.shape[0], self.hidden_size), input)
        if self._stale:
            self.ensure_packed()
        out = self._run(K.dynamic_int8_rnn_cell, input.contiguous(), input.shape[0], states, self._weights,
                        *self._act_args())
        if not batched:
            out = [o.squeeze(0) for o in out]
        return tuple(out) if self.mode == "LSTM" else out[0]


class DynamicInt8LSTMCell(_DynamicInt8CellBase):
    """``nn.LSTMCell`` with int8 weights and dynamically quantized activations; returns ``(h', c')``."""

    mode, _gates, simulated_type = "LSTM", 4, QuantLSTMCell


class DynamicInt8GRUCell(_DynamicInt8CellBase):
    mode, _gates, simulated_type = "GRU", 3, QuantGRUCell


class DynamicInt8RNNCell(_DynamicInt8CellBase):
    _gates, simulated_type = 1, QuantRNNCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, act_spec: QuantSpec | None = None,
                 nonlinearity: str = "tanh") -> None:
        one_of("DynamicInt8RNNCell", "nonlinearity", nonlinearity, ("tanh", "relu"))
        self.nonlinearity = nonlinearity
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(input_size, hidden_size, bias, act_spec)

    @classmethod
    def _extra_kwargs(cls, sim: Any) -> dict[str, Any]:
        return {"nonlinearity": sim.nonlinearity}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nonlinearity={self.nonlinearity!r}"


_ = nn  # re-exported type hints only
