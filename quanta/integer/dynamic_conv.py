"""Dynamic int8 convolutions: the activation range is computed per call, then the int8 conv kernels.

What ``dynamic_int8`` does for convolutions (PyTorch's dynamic quantization leaves them float):
each call takes the input's min / max (per tensor, `quanta.core.compute_range`), chooses the
uint8 grid (`choose_qparams`), quantizes, and runs ``int8_conv`` (quanta's native conv, oneDNN or
the reference) with int8 per-output-channel weights. These are exactly the simulated dynamic
input quantizer's numerics, so the integer module and the simulation agree to float rounding of
the epilogue. No calibration data is needed. Unlike `Int8ConvNd` (static ranges) nothing is
prepacked for an input scale and no kernel call is settled: each call has its own scale.

=====================  =============================================  ==============
class                  canonical state                                kernel
=====================  =============================================  ==============
`DynamicInt8Conv1d`    weight int8 [O, C/groups, *kernel],            int8_conv on
`DynamicInt8Conv2d`    weight_scale [O], bias [O]; input grid: the    uint8 codes
`DynamicInt8Conv3d`    dynamic spec (scale / zero point per call)
=====================  =============================================  ==============
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import QuantSpec, choose_qparams, compute_range, quantize
from ..kernels.conv import int8_conv
from ..nn.modules.weighted import QuantConv1d, QuantConv2d, QuantConv3d
from .base import IntegerModule
from .conv_specs import (
    DEFAULT_WEIGHT_SPEC,
    conv_lowering_problem,
    copy_conv_weights,
    padding_of,
    weight_spec_problem,
)
from .validate import flag, geometry, groups_divide, positive_int

#: the per-call input grid of the ``dynamic_int8`` preset
DYNAMIC_INPUT_SPEC = QuantSpec(bits=8, signed=False, symmetric=False, dynamic=True)


def _dynamic_input_problem(spec: QuantSpec) -> str | None:
    if not spec.dynamic:
        return "input range is static (Int8Conv takes it)"
    if spec.format.value != "int" or spec.bits != 8 or spec.granularity.value != "per_tensor":
        return f"dynamic input spec {spec} is not an 8-bit per-tensor integer grid"
    if spec.rounding.value != "half_even":
        return f"dynamic input spec {spec} rounds {spec.rounding.value} (the kernels round half to even)"
    return None


class _DynamicInt8ConvNd(IntegerModule):
    dims: ClassVar[int]
    simulated_type: ClassVar[type]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True, *,
                 input_spec: QuantSpec | None = None, weight_spec: QuantSpec | None = None) -> None:
        super().__init__()
        n, name = self.dims, type(self).__name__
        self.in_channels = in_channels = positive_int(name, "in_channels", in_channels)
        self.out_channels = out_channels = positive_int(name, "out_channels", out_channels)
        self.groups = groups_divide(name, groups, in_channels=in_channels, out_channels=out_channels)
        self.kernel_size, self.stride, self.padding, self.dilation = geometry(name, n, kernel_size, stride, padding,
                                                                              dilation)
        bias = flag(name, "bias", bias)
        self.input_spec = DYNAMIC_INPUT_SPEC if input_spec is None else input_spec
        self.weight_spec = DEFAULT_WEIGHT_SPEC if weight_spec is None else weight_spec
        problem = _dynamic_input_problem(self.input_spec) or weight_spec_problem(self.weight_spec)
        if problem:
            raise ValueError(f"{name}: {problem}")
        self.register_buffer("weight", torch.zeros(out_channels, in_channels // groups, *self.kernel_size,
                                                   dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    @classmethod
    def accepts(cls, sim: nn.Module) -> str | None:
        """None if ``sim`` (a simulated conv with a dynamic input quantizer) lowers to this class."""
        problem = conv_lowering_problem(sim, cls.simulated_type, cls.dims)
        if problem:
            return problem
        iq, wq, oq = sim.input_quantizer, sim.weight_quantizer, sim.output_quantizer
        if iq is None or not iq.quantizing:
            return "its input quantizer is off"
        problem = _dynamic_input_problem(iq.spec)
        if problem:
            return problem
        if wq is None or not wq.quantizing:
            return "its weight quantizer is off (float weights)"
        problem = weight_spec_problem(wq.spec)
        if problem:
            return problem
        if oq is not None and oq.is_enabled:
            return "an output quantizer (dynamic convolutions return float)"
        return None

    @classmethod
    def from_simulated(cls, sim: nn.Module) -> _DynamicInt8ConvNd:
        cls.check_lowerable(sim)
        pad = padding_of(sim, cls.dims)
        assert not isinstance(pad, str)
        mod = cls(sim.in_channels, sim.out_channels, sim.kernel_size, sim.stride, pad, sim.dilation, sim.groups,
                  bias=sim.bias is not None, input_spec=sim.input_quantizer.spec,
                  weight_spec=sim.weight_quantizer.spec)
        copy_conv_weights(mod, sim)
        return mod.to(sim.weight.device)

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "input_spec": self.input_spec.to_dict(), "weight_spec": self.weight_spec.to_dict()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        self.check_input(x)
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"{name} expects [N, {self.in_channels}, <{self.dims} spatial dims>], "
                             f"got shape {tuple(x.shape)}")
        spec = self.input_spec
        xf = x if x.dtype == torch.float32 else x.float()
        scale, zp = choose_qparams(*compute_range(xf, spec), spec)  # the simulation's numbers, per call
        codes = quantize(xf, scale, zp, spec)
        offset = 128 if spec.signed else 0  # the kernels take uint8 codes: signed codes + 128
        codes = (codes.to(torch.int16) + offset).to(torch.uint8) if offset else codes.to(torch.uint8)
        args = (codes, float(scale), int(zp) + offset, self.weight, self.weight_scale, self.bias, self.stride,
                self.padding, self.dilation, self.groups, "none", None, 0, None)
        y = self.binding.run(int8_conv, (codes.device, codes.shape), *args, preferred=self.impl)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, input={self.input_spec} (per call), "
                f"weight={self.weight_spec}, kernel=int8_conv[{self.impl}]")


class DynamicInt8Conv1d(_DynamicInt8ConvNd):
    dims = 1
    simulated_type = QuantConv1d


class DynamicInt8Conv2d(_DynamicInt8ConvNd):
    dims = 2
    simulated_type = QuantConv2d


class DynamicInt8Conv3d(_DynamicInt8ConvNd):
    dims = 3
    simulated_type = QuantConv3d


__all__ = ["DYNAMIC_INPUT_SPEC", "DynamicInt8Conv1d", "DynamicInt8Conv2d", "DynamicInt8Conv3d"]
