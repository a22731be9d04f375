"""Weight-only integer Linear modules (int8, int4 per group) and half-precision weights.

See `quanta.integer.linear` for the table of canonical state and kernels."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..core import Format, Granularity, QuantSpec, pack_bits, quantize
from ..kernels.linear import streaming_copy
from ..kernels.weight_only import int4_weight_only_linear, int4pack_for_cpu, int8_weight_only_linear
from .base import dtype_name
from .linear_common import (
    _active,
    _bias_of,
    _check_activation,
    _common_reason,
    _int_weight_reason,
    _LinearBase,
    _output_spec_of,
    _per_channel_weight,
    _weight_only_activation,
    _weight_only_reason,
)
from .validate import flag, positive_int


# ----------------------------------------------------------------------------- weight-only int8
class Int8WeightOnlyLinear(_LinearBase):
    """Float activations x int8 weights (one scale per output channel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 output_spec: QuantSpec | None = None, activation: str = "float32") -> None:
        super().__init__()
        self._init_linear(in_features, out_features, bias)
        self.activation = _check_activation(activation)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self._init_output(output_spec, out_features)

    _RUNTIME = ("_homed",)

    def pack(self) -> None:
        # a large weight is streamed from memory at every decoding call: the buffer itself is
        # re-homed in huge-page memory (`streaming_copy`; same values, one copy), as Int8Linear's
        w = self.weight
        if w.data_ptr() != self.__dict__.get("_homed"):
            self._buffers["weight"] = streaming_copy(w.contiguous())
            self._homed = self._buffers["weight"].data_ptr()
        super().pack()

    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        reason = _weight_only_reason(sim, ": use Int8Linear")
        if reason:
            return reason
        spec = sim.weight_quantizer.spec
        if spec.bits <= 4 and spec.granularity is Granularity.PER_GROUP:
            return "per-group 4-bit weights: use Int4WeightOnlyLinear"
        return _int_weight_reason(spec)

    @classmethod
    def from_simulated(cls, sim: Any) -> Int8WeightOnlyLinear:
        cls.check_lowerable(sim)
        mod = cls(sim.in_features, sim.out_features, sim.bias is not None, output_spec=_output_spec_of(sim),
                  activation=_weight_only_activation(sim)[0] or "float32")
        codes, scale = _per_channel_weight(sim)
        mod.weight.copy_(codes)
        mod.weight_scale.copy_(scale)
        if sim.bias is not None:
            mod.bias.copy_(_bias_of(sim))
        mod._copy_output(sim)
        return mod.to(sim.weight.device)

    def config(self) -> dict[str, Any]:
        return self._linear_config(activation=self.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._check(x)
        if self.activation == "bfloat16":
            x2 = x2.to(torch.bfloat16)
        y = self._run(int8_weight_only_linear, x2, self.weight, self.weight_scale, self.bias)
        return self._finish(y, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=int8 per_channel, act={self.activation}, kernel=int8_weight_only_linear[{self.impl}]"
                f"{self._output_repr()}")


# ----------------------------------------------------------------------------- weight-only int4
class Int4WeightOnlyLinear(_LinearBase):
    """Float activations x int4 weights, one scale (and zero point) per ``group_size`` inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 128,
                 symmetric: bool = True, signed: bool = True, output_spec: QuantSpec | None = None,
                 activation: str = "float32") -> None:
        super().__init__()
        self._init_linear(in_features, out_features, bias)
        self.activation = _check_activation(activation)
        owner = "Int4WeightOnlyLinear"
        if positive_int(owner, "group_size", group_size) > in_features or in_features % group_size:
            raise ValueError(f"{owner}: group_size {group_size} must divide in_features {in_features}")
        self.group_size = group_size
        self.symmetric, self.signed = flag(owner, "symmetric", symmetric), flag(owner, "signed", signed)
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups))
        if symmetric:
            self.weight_zero_point = None
        else:
            self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.int8))
        self._init_output(output_spec, out_features)

    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        reason = _weight_only_reason(sim)
        if reason:
            return reason
        spec = sim.weight_quantizer.spec
        if spec.format is not Format.INT or spec.bits > 4 or spec.bits < 2:
            return f"weights {spec} (Int4WeightOnlyLinear needs 2..4-bit integers)"
        if spec.granularity is not Granularity.PER_GROUP or spec.group_axis not in (1, -1):
            return f"weight granularity {spec} (per_group along in_features only)"
        return None

    @classmethod
    def from_simulated(cls, sim: Any) -> Int4WeightOnlyLinear:
        cls.check_lowerable(sim)
        wq = sim.weight_quantizer
        spec = wq.spec
        mod = cls(sim.in_features, sim.out_features, sim.bias is not None, group_size=spec.group_size,
                  symmetric=spec.symmetric, signed=spec.signed, output_spec=_output_spec_of(sim),
                  activation=_weight_only_activation(sim)[0] or "float32")
        w = sim.weight.detach()
        scale, zp = wq.qparams(w)
        codes = quantize(w, scale, zp, spec)
        mod.weight.copy_(pack_bits(codes, 4, spec.signed))
        mod.weight_scale.copy_(scale)
        if not spec.symmetric:
            mod.weight_zero_point.copy_(zp.to(torch.int8))
        if sim.bias is not None:
            mod.bias.copy_(_bias_of(sim))
        mod._copy_output(sim)
        return mod.to(w.device)  # (`_apply`: pack)

    def config(self) -> dict[str, Any]:
        return self._linear_config(group_size=self.group_size, symmetric=self.symmetric, signed=self.signed,
                                   activation=self.activation)

    _RUNTIME = ("_packed", "_scales_zeros")

    def build_packed(self) -> None:
        self._packed = self._scales_zeros = None
        if self.weight.device.type == "cpu" and self.impl in ("auto", "int4pack_mm") and \
                hasattr(torch, "_convert_weight_to_int4pack_for_cpu") and self.out_features % 16 == 0:
            packed, self._scales_zeros = int4pack_for_cpu(
                self.weight, self.weight_scale, self.weight_zero_point, self.group_size, self.signed,
                self.in_features)
            self._packed = streaming_copy(packed)  # (streamed at every decoding call: huge pages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._check(x, (torch.float32, torch.bfloat16))
        if self._stale:
            self.ensure_packed()
        if self.activation == "bfloat16":
            x2 = x2.to(torch.bfloat16)
        y = self._run(int4_weight_only_linear, x2, self.weight, self.weight_scale, self.weight_zero_point,
                      self.group_size, self.signed, self.bias, self._packed, self._scales_zeros)
        return self._finish(y, x)

    def extra_repr(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=int4 {sym} per_group(g={self.group_size}), act={self.activation}, "
                f"kernel=int4_weight_only_linear[{self.impl}]{self._output_repr()}")


# ----------------------------------------------------------------------------- fp16 / bf16
class HalfLinear(_LinearBase):
    """Weights stored in float16 / bfloat16 (the ``fp16`` / ``bf16`` presets).

    The weight is upcast to float32 per call and multiplied in float32, which is exactly what the
    simulated module computes (``F.linear(x̂, ŵ)`` with ``ŵ = w.to(half).float()``); inputs are cast
    through the half format first when the simulated input quantizer is a cast.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.bfloat16, cast_input: bool = False,
                 output_spec: QuantSpec | None = None, input_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._init_linear(in_features, out_features, bias)
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"HalfLinear: dtype must be float16 or bfloat16, got {dtype}")
        if input_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"HalfLinear: input_dtype must be float16, bfloat16 or None, got {input_dtype}")
        self.half_dtype, self.cast_input = dtype, flag("HalfLinear", "cast_input", cast_input)
        #: the format inputs are cast through (defaults to the weight's)
        self.input_dtype = dtype if input_dtype is None else input_dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype))
        self._init_output(output_spec, out_features)

    @classmethod
    def _dtype_of(cls, spec: QuantSpec) -> torch.dtype | None:
        return {Format.FP16: torch.float16, Format.BF16: torch.bfloat16}.get(spec.format)

    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        reason = _common_reason(sim)
        if reason:
            return reason
        dt = cls._dtype_of(sim.weight_quantizer.spec)
        if dt is None:
            return f"weights {sim.weight_quantizer.spec} (HalfLinear needs fp16 / bf16)"
        iq = sim.input_quantizer
        if _active(iq) and cls._dtype_of(iq.spec) is None:
            return f"activations {iq.spec} (HalfLinear takes float or fp16/bf16-cast activations)"
        return None

    @classmethod
    def from_simulated(cls, sim: Any) -> HalfLinear:
        cls.check_lowerable(sim)
        dt = cls._dtype_of(sim.weight_quantizer.spec)
        iq = sim.input_quantizer
        mod = cls(sim.in_features, sim.out_features, sim.bias is not None, dtype=dt,
                  cast_input=_active(iq), output_spec=_output_spec_of(sim),
                  input_dtype=cls._dtype_of(iq.spec) if _active(iq) else None)
        m = torch.finfo(dt).max
        mod.weight.copy_(sim.weight.detach().float().clamp(-m, m).to(dt))
        if sim.bias is not None:
            mod.bias.copy_(_bias_of(sim))
        mod._copy_output(sim)
        return mod.to(sim.weight.device)

    def config(self) -> dict[str, Any]:
        return self._linear_config(dtype=dtype_name(self.half_dtype), cast_input=self.cast_input,
                                   input_dtype=dtype_name(self.input_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._check(x)
        xf = x2.float()
        if self.cast_input:  # the simulated cast: saturate to the format's max, round, back
            dt = self.input_dtype
            m = torch.finfo(dt).max
            xf = xf.clamp(-m, m).to(dt).float()
        self.binding.record("float32_upcast")
        y = F.linear(xf, self.weight.float(), self.bias)
        return self._finish(y, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.half_dtype}, cast_input={self.cast_input}, kernel=F.linear(float32 upcast)"
                f"{self._output_repr()}")


__all__ = ["HalfLinear", "Int4WeightOnlyLinear", "Int8WeightOnlyLinear"]
