"""Integer-execution Linear modules, lowered from a calibrated simulated `QuantLinear`.

=======================  ==========================================  =========================
class                    canonical state (what a file holds)         kernel (CPU fast path)
=======================  ==========================================  =========================
`Int8Linear`             weight int8 [N, K] (uint8 [N, K/2] packed   int8_linear: torch._int_mm
                         int4 for w4a8), weight_scale [N], bias,     + float32 rescale;
                         input_scale / input_zero_point (static)     activations quantized by
                                                                     quantize_activation (fused)
`Int8WeightOnlyLinear`   weight int8 [N, K], weight_scale [N], bias  torch._weight_int8pack_mm
`Int4WeightOnlyLinear`   weight uint8 [N, K/2], weight_scale         torch._weight_int4pack_mm_for_cpu
                         [N, K/g], weight_zero_point int8 [N, K/g]
                         (asymmetric only), bias
`HalfLinear`             weight fp16/bf16 [N, K], bias               F.linear on the upcast weight
=======================  ==========================================  =========================

Every module applies the simulated module's output quantizer (fake-quantize with its qparams)
when it was enabled, so numbers match the simulation. ``forward`` takes float ``[..., K]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..core import Format, Granularity, QuantSpec, compute_range, choose_qparams, fake_quantize, pack_bits, quantize, unpack_bits
from ..kernels.linear import (
    int4_spec, int4pack_for_cpu, int4_weight_only_linear, int8_linear, int8_weight_only_linear,
    onednn_prepack, quantize_activation_spec, weight_sum,
)
from ..nn.modules.weighted import QuantLinear
from .base import IntegerModule

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- shared pieces
def _active(q: Any) -> bool:
    return q is not None and q.is_enabled


def _common_reason(sim: Any) -> str | None:
    if not isinstance(sim, QuantLinear):
        return f"expects a QuantLinear, got {type(sim).__name__}"
    for kind, q in sim.quantizers():
        if q.is_enabled and q.mode != "quantize":
            return f"{kind} quantizer is in mode {q.mode!r} (finish calibration first)"
        if q.needs_calibration:
            return f"{kind} quantizer has no range: calibrate the model first"
    oq = sim.output_quantizer
    if _active(oq) and oq.spec.granularity not in (Granularity.PER_TENSOR, Granularity.PER_TOKEN):
        return f"output quantizer granularity {oq.spec.granularity.value!r} (per_tensor / per_token only)"
    return None


def _check_activation(activation: str) -> str:
    if activation not in ("float32", "bfloat16"):
        raise ValueError(f"activation must be 'float32' or 'bfloat16', got {activation!r}")
    return activation


def _weight_only_activation(sim: Any) -> tuple[str | None, str | None]:
    """``(activation dtype name, None)`` for a weight-only lowering, or ``(None, reason)``.

    Weight-only layers take float activations; a simulated input quantizer that is a plain
    bfloat16 cast means the kernel runs on bfloat16 activations (torch's CPU weight-only kernels
    are fast only there), which is then exactly what the simulation specifies."""
    q = sim.input_quantizer
    if not _active(q):
        return "float32", None
    if q.spec.format is Format.BF16:
        return "bfloat16", None
    return None, f"input quantizer {q.spec} (weight-only layers take float32 or bfloat16 activations)"


def _int_weight_reason(spec: QuantSpec, max_bits: int = 8) -> str | None:
    if spec.format is not Format.INT or not spec.signed or not spec.symmetric:
        return f"weights must be signed symmetric integers, got {spec}"
    if spec.bits > max_bits:
        return f"weights of {spec.bits} bits (at most {max_bits})"
    if spec.granularity not in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL) or \
            (spec.granularity is Granularity.PER_CHANNEL and spec.axis not in (0, -2)):
        return f"weight granularity {spec} (per output channel or per tensor only)"
    return None


def _per_channel_weight(sim: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [N, K] and scales [N] of the simulated weight (quanta.core numerics)."""
    wq = sim.weight_quantizer
    w = sim.weight.detach()
    scale, zp = wq.qparams(w)
    codes = quantize(w, scale, zp, wq.spec).to(torch.int8)
    return codes, scale.float().reshape(-1).expand(w.shape[0]).clone()


class _OutputQuant:
    """The simulated output quantizer, applied to the float output (static or dynamic)."""

    def _init_output(self, spec: QuantSpec | None, out_features: int) -> None:
        self.output_spec = spec
        if spec is not None and not spec.dynamic:
            self.register_buffer("output_scale", torch.ones(()))
            self.register_buffer("output_zero_point", torch.zeros((), dtype=torch.int32))

    def _copy_output(self, sim: Any) -> None:
        if self.output_spec is not None and not self.output_spec.dynamic:
            s, z = sim.output_quantizer.qparams()
            self.output_scale.copy_(s.reshape(()))
            self.output_zero_point.copy_(z.reshape(()))

    def _apply_output(self, y: torch.Tensor) -> torch.Tensor:
        spec = self.output_spec
        if spec is None:
            return y
        if spec.dynamic:
            s, z = choose_qparams(*compute_range(y, spec), spec)
        else:
            s, z = self.output_scale, self.output_zero_point
        return fake_quantize(y, s, z, spec)

    def _output_repr(self) -> str:
        return "" if self.output_spec is None else f", output={self.output_spec}"


def _output_spec_of(sim: Any) -> QuantSpec | None:
    return sim.output_quantizer.spec if _active(sim.output_quantizer) else None


def _bias_of(sim: Any) -> torch.Tensor | None:
    return None if sim.bias is None else sim.bias.detach().float()


class _LinearBase(_OutputQuant, IntegerModule):
    in_features: int
    out_features: int

    def _init_linear(self, in_features: int, out_features: int, bias: bool) -> None:
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    def _check(self, x: Any, dtypes: tuple[torch.dtype, ...] = _FLOATS) -> torch.Tensor:
        self.check_input(x, dtypes)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects inputs [..., {self.in_features}], "
                             f"got shape {tuple(x.shape)}")
        return x.reshape(-1, self.in_features)

    def _run(self, op: Any, *args: Any) -> torch.Tensor:
        impl = op.choose(*args) if self.impl == "auto" else self.impl
        self.record(impl)
        return op(*args, impl=impl)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = self._apply_output(y.float()).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def set_impl(self, impl: str) -> None:
        """Prefer a kernel ("auto", "reference" or an implementation name) and repack for it."""
        self.impl = impl
        self.pack()


# ----------------------------------------------------------------------------- int8 x int8
class Int8Linear(_LinearBase):
    """int8 weights (per output channel) x int8/uint8 activations, exact int32 accumulation.

    Activations: static per-tensor (``input_scale`` / ``input_zero_point`` from calibration) or
    dynamic per-tensor / per-token (``act_spec.dynamic``), symmetric or asymmetric, signed or
    unsigned. Weights of <= 4 bits (w4a8) are stored packed two per byte and unpacked to int8
    codes in ``pack()``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 act_spec: QuantSpec | None = None, weight_bits: int = 8,
                 output_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self._init_linear(in_features, out_features, bias)
        act_spec = QuantSpec(granularity="per_token") if act_spec is None else act_spec
        if act_spec.format is not Format.INT or act_spec.bits > 8 or act_spec.granularity not in (
                Granularity.PER_TENSOR, Granularity.PER_TOKEN):
            raise ValueError(f"Int8Linear: activations must be <= 8-bit integers, per tensor or per token; "
                             f"got {act_spec}")
        if not 2 <= weight_bits <= 8:
            raise ValueError(f"Int8Linear: weight_bits must be in 2..8, got {weight_bits}")
        self.act_spec, self.weight_bits = act_spec, int(weight_bits)
        if self.weight_bits <= 4:
            self.register_buffer("weight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        if not act_spec.dynamic:
            self.register_buffer("input_scale", torch.ones(()))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))
        self._init_output(output_spec, out_features)
        self.pack()

    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        reason = _common_reason(sim)
        if reason:
            return reason
        if not _active(sim.weight_quantizer):
            return "weight quantizer disabled (keep the layer in float)"
        reason = _int_weight_reason(sim.weight_quantizer.spec)
        if reason:
            return reason
        iq = sim.input_quantizer
        if not _active(iq):
            return "input quantizer disabled: use a weight-only module"
        spec = iq.spec
        if spec.format is not Format.INT or spec.bits > 8:
            return f"activations {spec} (Int8Linear needs <= 8-bit integers)"
        if spec.granularity not in (Granularity.PER_TENSOR, Granularity.PER_TOKEN):
            return f"activation granularity {spec.granularity.value!r} (per_tensor / per_token only)"
        if spec.bits == 1:
            return "1-bit activations"
        return None

    @classmethod
    def from_simulated(cls, sim: Any) -> "Int8Linear":
        reason = cls.accepts(sim)
        if reason:
            raise ValueError(f"Int8Linear cannot lower this {type(sim).__name__}: {reason}")
        mod = cls(sim.in_features, sim.out_features, sim.bias is not None, act_spec=sim.input_quantizer.spec,
                  weight_bits=max(sim.weight_quantizer.spec.bits, 2), output_spec=_output_spec_of(sim))
        codes, scale = _per_channel_weight(sim)
        mod.weight.copy_(pack_bits(codes, 4) if mod.weight_bits <= 4 else codes)
        mod.weight_scale.copy_(scale)
        if sim.bias is not None:
            mod.bias.copy_(_bias_of(sim))
        if not mod.act_spec.dynamic:
            s, z = sim.input_quantizer.qparams()
            mod.input_scale.copy_(s.reshape(()))
            mod.input_zero_point.copy_(z.reshape(()))
        mod._copy_output(sim)
        mod.to(sim.weight.device)
        mod.pack()
        return mod

    def pack(self) -> None:
        w = self.weight
        self._w8 = unpack_bits(w, 4, True, self.in_features) if self.weight_bits <= 4 else w.contiguous()
        self._w_sum = weight_sum(self._w8)
        self._packed = onednn_prepack(self._w8) if self.impl == "onednn" else None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(device) keeps the runtime form in step
        out = super()._apply(fn, recurse)
        self.pack()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._check(x)
        static = not self.act_spec.dynamic
        codes, s, z = quantize_activation_spec(x2, self.act_spec, self.input_scale if static else None,
                                               self.input_zero_point if static else None)
        y = self._run(int8_linear, codes, s, z, self._w8, self.weight_scale, self.bias, self._w_sum, self._packed)
        return self._finish(y, x)

    def extra_repr(self) -> str:
        act = "static" if not self.act_spec.dynamic else "dynamic"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=int{self.weight_bits} per_channel, act={self.act_spec} ({act}), "
                f"kernel=int8_linear[{self.impl}]{self._output_repr()}")


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

    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        reason = _common_reason(sim)
        if reason:
            return reason
        act, why = _weight_only_activation(sim)
        if act is None:
            return f"{why}: use Int8Linear"
        if not _active(sim.weight_quantizer):
            return "weight quantizer disabled (keep the layer in float)"
        spec = sim.weight_quantizer.spec
        if spec.bits <= 4 and spec.granularity is Granularity.PER_GROUP:
            return "per-group 4-bit weights: use Int4WeightOnlyLinear"
        return _int_weight_reason(spec)

    @classmethod
    def from_simulated(cls, sim: Any) -> "Int8WeightOnlyLinear":
        reason = cls.accepts(sim)
        if reason:
            raise ValueError(f"Int8WeightOnlyLinear cannot lower this {type(sim).__name__}: {reason}")
        mod = cls(sim.in_features, sim.out_features, sim.bias is not None, output_spec=_output_spec_of(sim),
                  activation=_weight_only_activation(sim)[0] or "float32")
        codes, scale = _per_channel_weight(sim)
        mod.weight.copy_(codes)
        mod.weight_scale.copy_(scale)
        if sim.bias is not None:
            mod.bias.copy_(_bias_of(sim))
        mod._copy_output(sim)
        return mod.to(sim.weight.device)

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
        if group_size < 1 or in_features % group_size:
            raise ValueError(f"Int4WeightOnlyLinear: group_size {group_size} must divide in_features {in_features}")
        self.group_size, self.symmetric, self.signed = int(group_size), bool(symmetric), bool(signed)
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, groups))
        if symmetric:
            self.weight_zero_point = None
        else:
            self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.int8))
        self._init_output(output_spec, out_features)
        self.pack()

    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        reason = _common_reason(sim)
        if reason:
            return reason
        act, why = _weight_only_activation(sim)
        if act is None:
            return why
        if not _active(sim.weight_quantizer):
            return "weight quantizer disabled (keep the layer in float)"
        spec = sim.weight_quantizer.spec
        if spec.format is not Format.INT or spec.bits > 4 or spec.bits < 2:
            return f"weights {spec} (Int4WeightOnlyLinear needs 2..4-bit integers)"
        if spec.granularity is not Granularity.PER_GROUP or spec.group_axis not in (1, -1):
            return f"weight granularity {spec} (per_group along in_features only)"
        return None

    @classmethod
    def from_simulated(cls, sim: Any) -> "Int4WeightOnlyLinear":
        reason = cls.accepts(sim)
        if reason:
            raise ValueError(f"Int4WeightOnlyLinear cannot lower this {type(sim).__name__}: {reason}")
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
        mod.to(w.device)
        mod.pack()
        return mod

    def pack(self) -> None:
        self._packed = self._scales_zeros = None
        if self.weight.device.type == "cpu" and self.impl in ("auto", "int4pack_mm") and \
                hasattr(torch, "_convert_weight_to_int4pack_for_cpu") and self.out_features % 16 == 0:
            self._packed, self._scales_zeros = int4pack_for_cpu(
                self.weight, self.weight_scale, self.weight_zero_point, self.group_size, self.signed,
                self.in_features)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)
        self.pack()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._check(x, (torch.float32, torch.bfloat16))
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
                 output_spec: QuantSpec | None = None) -> None:
        super().__init__()
        self._init_linear(in_features, out_features, bias)
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"HalfLinear: dtype must be float16 or bfloat16, got {dtype}")
        self.half_dtype, self.cast_input = dtype, bool(cast_input)
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
        if not _active(sim.weight_quantizer):
            return "weight quantizer disabled (keep the layer in float)"
        dt = cls._dtype_of(sim.weight_quantizer.spec)
        if dt is None:
            return f"weights {sim.weight_quantizer.spec} (HalfLinear needs fp16 / bf16)"
        iq = sim.input_quantizer
        if _active(iq) and cls._dtype_of(iq.spec) is None:
            return f"activations {iq.spec} (HalfLinear takes float or fp16/bf16-cast activations)"
        return None

    @classmethod
    def from_simulated(cls, sim: Any) -> "HalfLinear":
        reason = cls.accepts(sim)
        if reason:
            raise ValueError(f"HalfLinear cannot lower this {type(sim).__name__}: {reason}")
        dt = cls._dtype_of(sim.weight_quantizer.spec)
        iq = sim.input_quantizer
        mod = cls(sim.in_features, sim.out_features, sim.bias is not None, dtype=dt,
                  cast_input=_active(iq), output_spec=_output_spec_of(sim))
        if _active(iq) and cls._dtype_of(iq.spec) != dt:
            mod.input_dtype = cls._dtype_of(iq.spec)
        m = torch.finfo(dt).max
        mod.weight.copy_(sim.weight.detach().float().clamp(-m, m).to(dt))
        if sim.bias is not None:
            mod.bias.copy_(_bias_of(sim))
        mod._copy_output(sim)
        return mod.to(sim.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._check(x)
        xf = x2.float()
        if self.cast_input:  # the simulated cast: saturate to the format's max, round, back
            dt = getattr(self, "input_dtype", self.half_dtype)
            m = torch.finfo(dt).max
            xf = xf.clamp(-m, m).to(dt).float()
        self.record("float32_upcast")
        y = F.linear(xf, self.weight.float(), self.bias)
        return self._finish(y, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.half_dtype}, cast_input={self.cast_input}, kernel=F.linear(float32 upcast)"
                f"{self._output_repr()}")


__all__ = ["HalfLinear", "Int4WeightOnlyLinear", "Int8Linear", "Int8WeightOnlyLinear"]
