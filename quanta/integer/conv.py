"""Integer convolutions: ``Int8Conv1d``, ``Int8Conv2d``, ``Int8Conv3d``.

Each holds int8 weight codes (one scale per output channel) and the input's per-tensor grid,
and runs ``quanta::int8_conv`` (oneDNN on x86, else the exact reference).

Interfaces::

    m = Int8Conv2d.from_simulated(sim)        # sim: a calibrated quanta QuantConv2d
    y = m(x_float)                            # float32 [N, O, H', W'] (channels-last strides)
    m.set_output("uint8", *nxt.input_code_qparams(), post_op="relu")
    codes = m(x_float)                        # uint8 codes on nxt's input grid, ReLU fused
    y2 = nxt(codes)                           # uint8 input: taken as codes on nxt's own grid

Activation codes travel as **uint8** ("kernel codes"): for an unsigned input spec these are the
spec's own codes; for a signed 8-bit spec they are ``code + 128`` with zero point ``zp + 128``
(oneDNN's convolution takes only unsigned sources). `input_code_qparams` says which grid a
module expects; an int8 tensor is also accepted by a module whose input spec is signed.

Float inputs are quantized with the input qparams by `quanta.kernels.codes.quantize_codes`:
``clamp(round_half_even(x · (1/scale)) + zp, qmin, qmax)`` with the reciprocal taken in float32,
the same numbers as `quanta.core.quantize` (tests check equality); 4-D inputs give channels-last
codes (one native pass from NCHW floats).

Outputs come back in oneDNN's channels-last strides (logical shape ``[N, O, *spatial]``): a
following integer conv wants exactly that, and a copy to contiguous NCHW would cost about half
the time of the int8 convolution itself. Call ``.contiguous()`` where a contiguous tensor is needed.

Canonical state (``state_dict``): ``weight`` (int8 ``[O, C/groups, *k]``), ``weight_scale``
(float32 ``[O]``), ``bias`` (float32 ``[O]``, if any), ``input_scale`` / ``input_zero_point``
(the spec's own codes), ``output_scale`` / ``output_zero_point`` (the simulated output
quantizer's, used in float-output mode when ``output_spec`` is given), ``emit_scale`` /
``emit_zero_point`` (the uint8 grid of ``set_output("uint8", ...)``). ``build_packed()`` builds
the oneDNN prepacked weight and Python-number copies of the qparams, once (`IntegerModule.pack`);
``binding`` holds the settled kernels per input signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import QuantSpec, fake_quantize
from ..kernels.codes import dense, quantize_codes, quantize_codes_call
from ..kernels.conv import int8_conv, onednn_weight_refusal, prepack
from ..kernels.u8s8_saturation import weight_code_max
from ..nn.modules.weighted import QuantConv1d, QuantConv2d, QuantConv3d
from .base import IntegerModule
from .conv_graph import run_conv_graph_entry, settled_conv_call
from .conv_specs import (
    DEFAULT_INPUT_SPEC,
    DEFAULT_WEIGHT_SPEC,
    OUTPUT_KINDS,
    check_output_mode,
    conv_lowering_problem,
    copy_conv_weights,
    emit_grid,
    input_spec_problem,
    output_spec_problem,
    padding_of,
    weight_spec_problem,
)
from .validate import flag, geometry, groups_divide, positive_int


class _Int8ConvNd(IntegerModule):
    dims: ClassVar[int]
    simulated_type: ClassVar[type]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True, *,
                 input_spec: QuantSpec = DEFAULT_INPUT_SPEC, weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
                 output_spec: QuantSpec | None = None, output: str = "float", post_op: str = "none") -> None:
        super().__init__()
        n = self.dims
        name = type(self).__name__
        in_channels, out_channels = positive_int(name, "in_channels", in_channels), positive_int(
            name, "out_channels", out_channels)
        groups = groups_divide(name, groups, in_channels=in_channels, out_channels=out_channels)
        bias = flag(name, "bias", bias)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = geometry(name, n, kernel_size, stride, padding,
                                                                              dilation)
        for arg, spec, check in (("input_spec", input_spec, input_spec_problem),
                                 ("weight_spec", weight_spec, weight_spec_problem)):
            if not isinstance(spec, QuantSpec):
                raise TypeError(f"{name}: {arg} must be a QuantSpec, got {type(spec).__name__}")
            problem = check(spec)
            if problem:
                raise ValueError(f"{name}: {arg}: {problem}")
        if output_spec is not None:
            if not isinstance(output_spec, QuantSpec):
                raise TypeError(f"{name}: output_spec must be a QuantSpec or None, got {type(output_spec).__name__}")
            problem = output_spec_problem(output_spec)
            if problem:
                raise ValueError(f"{name}: output_spec: {problem}")
        self.input_spec, self.weight_spec, self.output_spec = input_spec, weight_spec, output_spec
        self.register_buffer("weight", torch.zeros(out_channels, in_channels // groups, *self.kernel_size,
                                                   dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("output_scale", torch.tensor(1.0))
        self.register_buffer("output_zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("emit_scale", torch.tensor(1.0))
        self.register_buffer("emit_zero_point", torch.tensor(0, dtype=torch.int32))
        self.output_kind = "float"
        self.post_op = "none"
        self._set_output_mode(output, post_op)  # (the runtime form is built once, when first needed)

    # ------------------------------------------------------------------ construction
    @classmethod
    def accepts(cls, sim: nn.Module) -> str | None:
        """None if ``sim`` can be lowered to this class, else why not."""
        problem = conv_lowering_problem(sim, cls.simulated_type, cls.dims)
        if problem:
            return problem
        iq, wq, oq = sim.input_quantizer, sim.weight_quantizer, sim.output_quantizer
        if iq is None or not iq.quantizing:
            return "its input quantizer is off: there is no activation grid to compute on"
        problem = input_spec_problem(iq.spec)
        if problem:
            return problem
        if iq.amax is None:
            return "its input quantizer has no range: calibrate first"
        if wq is None or not wq.quantizing:
            return "its weight quantizer is off (float weights)"
        problem = weight_spec_problem(wq.spec)
        if problem:
            return problem
        if oq is not None and oq.quantizing:
            problem = output_spec_problem(oq.spec)
            if problem:
                return problem
            if oq.amax is None:
                return "its output quantizer has no range: calibrate first"
        return None

    @classmethod
    def from_simulated(cls, sim: nn.Module) -> _Int8ConvNd:
        """The integer module computing what the calibrated simulated conv ``sim`` computes."""
        cls.check_lowerable(sim)
        oq = sim.output_quantizer
        out_on = oq is not None and oq.quantizing
        pad = padding_of(sim, cls.dims)
        assert not isinstance(pad, str)
        mod = cls(sim.in_channels, sim.out_channels, sim.kernel_size, sim.stride, pad, sim.dilation, sim.groups,
                  bias=sim.bias is not None, input_spec=sim.input_quantizer.spec,
                  weight_spec=sim.weight_quantizer.spec, output_spec=oq.spec if out_on else None)
        copy_conv_weights(mod, sim)
        with torch.no_grad():
            xs, xzp = sim.input_quantizer.qparams()
            mod.input_scale.copy_(xs.reshape(()))
            mod.input_zero_point.copy_(xzp.reshape(()))
            if out_on:
                os_, ozp = oq.qparams()
                mod.output_scale.copy_(os_.reshape(()))
                mod.output_zero_point.copy_(ozp.reshape(()))
        return mod.to(sim.weight.device)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (specs as dicts): enough to rebuild an empty module that
        ``load_state_dict`` then fills."""
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
            "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
            "input_spec": self.input_spec.to_dict(), "weight_spec": self.weight_spec.to_dict(),
            "output_spec": None if self.output_spec is None else self.output_spec.to_dict(),
            "output": self.output_kind, "post_op": self.post_op,
        }

    # ------------------------------------------------------------------ runtime state
    _RUNTIME = ("_packed", "_packed_for")
    _SETTLED_LIMIT = 8  # settled input signatures per module (memory stays bounded)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(device): the runtime form follows
        out = super()._apply(fn, recurse)
        self.pack()
        return out

    def build_packed(self) -> None:
        """Python-number qparams and the oneDNN prepacked weight, from the canonical buffers."""
        offset = 128 if self.input_spec.signed else 0  # kernel codes are uint8: signed codes + 128
        self._x_scale = float(self.input_scale)
        self._x_inv = float(1.0 / self.input_scale.float())  # float32 reciprocal, as quanta.core does
        self._x_zp = int(self.input_zero_point) + offset
        self._x_lo, self._x_hi = self.input_spec.qmin + offset, self.input_spec.qmax + offset
        self._x_codes = (self._x_inv, self._x_zp, self._x_lo, self._x_hi, False)  # quantize_codes' grid
        self._emit = (float(self.emit_scale), int(self.emit_zero_point))
        self._packed: torch.Tensor | None = None
        self._packed_for: dict[tuple[int, ...], torch.Tensor] = {}  # per input spatial size (oneDNN's hint)
        #: the largest |weight code|: oneDNN sums weights within ±64 (7-bit) exactly even without VNNI
        self.weight_code_max = weight_code_max(self.weight)
        if self.weight.device.type == "cpu" and "onednn" in int8_conv.available_impls() and self.impl != "reference" \
                and onednn_weight_refusal(self.weight) is None:
            self._packed = prepack(self.weight, self.weight_scale, self._x_scale, self._x_zp, self.stride,
                                   self.padding, self.dilation, self.groups)

    def _packed_weight(self, spatial: tuple[int, ...]) -> torch.Tensor | None:
        """The prepacked weight laid out for inputs of this spatial size (packed on the first
        eager call; torch.compile uses it when an eager call has made it, else the size-agnostic
        one)."""
        if self._packed is None:
            return None
        if torch.compiler.is_compiling():  # read, never insert, while tracing
            return self._packed_for.get(spatial, self._packed)
        packed = self._packed_for.get(spatial)
        if packed is None:
            if len(self._packed_for) >= 8:  # many sizes seen: keep memory bounded
                return self._packed
            packed = self._packed_for[spatial] = prepack(
                self.weight, self.weight_scale, self._x_scale, self._x_zp, self.stride, self.padding,
                self.dilation, self.groups, spatial)
        return packed

    def input_code_qparams(self) -> tuple[float, int]:
        """``(scale, zero_point)`` of the uint8 codes this module takes as input: what a previous
        module's ``set_output("uint8", scale, zero_point)`` should emit."""
        if self._stale:
            self.ensure_packed()
        return self._x_scale, self._x_zp

    def set_output(self, kind: str = "float", scale: float | torch.Tensor | None = None,
                   zero_point: int | torch.Tensor | None = None, post_op: str = "none") -> _Int8ConvNd:
        """Choose what forward returns: ``"float"`` (float32; the simulated output quantizer, if
        any, applied) or ``"uint8"`` codes ``clamp(round(y / scale) + zero_point, 0, 255)``; and
        a fused ``post_op`` (``"none"``, ``"relu"``, ``"relu6"``) applied to ``y`` first.

        In uint8 mode the module's own output quantizer is not applied: ``y`` is rounded once,
        onto the given grid (normally the next module's `input_code_qparams`)."""
        grid = emit_grid(self, kind, scale, zero_point)
        if grid is not None:
            self.emit_scale.fill_(grid[0])
            self.emit_zero_point.fill_(grid[1])
        self._set_output_mode(kind, post_op)
        self._emit = (float(self.emit_scale), int(self.emit_zero_point))
        return self

    def _set_output_mode(self, kind: str, post_op: str) -> None:
        check_output_mode(self, kind, post_op)
        self.output_kind, self.post_op = kind, post_op
        self.forget_settled()  # (settled calls carry the output grid and post-op; the packed weight does not)

    # ------------------------------------------------------------------ forward
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 kernel codes of a float input, `quanta.kernels.codes.quantize_codes` (same numbers
        as `quanta.core.quantize`; 4-D inputs give channels-last codes, what the kernels read)."""
        if self._stale:
            self.ensure_packed()
        impl, checked, args = self._input_codes(x)
        return quantize_codes(*args, impl=impl, checked=checked)

    def _input_codes(self, x: torch.Tensor) -> tuple[str, bool, tuple[Any, ...]]:
        """`quantize_codes`' ``(implementation, checked, arguments)`` for the float input ``x``: the
        guards' choice per input signature (the reference where the module's ``impl`` is)."""
        args = (x, *self._x_codes, x.dim() == 4)
        preferred = "reference" if self.impl == "reference" else "auto"  # (a conv kernel's name is not its)
        impl, checked = self.binding.choose(quantize_codes, (x.dtype, x.device, x.dim(), dense(x)), *args,
                                            preferred=preferred)
        return impl, checked, args

    def _signature(self, x: torch.Tensor) -> tuple[Any, ...]:
        return (x.dtype, x.device, x.shape, x.stride(), self.impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # (first: a graph reads, and guards on, no eager-only state)
            return self._graph_forward(x)
        calls = self.binding.calls  # the common eager call, once a first call settled its kernels: one lookup
        settled = calls.get(self._signature(x)) if calls and isinstance(x, torch.Tensor) else None
        if settled is not None:
            self.kernel_counts[settled[0]] += 1
            return self._output(settled[1](x))
        return self._forward(x)

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Traced: eager's settled kernels, from the binding's entry alone (`_settle`; guards: it, not ~60 attributes)."""
        settled = self.binding.compiled.get(self._signature(x)) if isinstance(x, torch.Tensor) else None
        if settled is None:
            return self._forward(x)
        return self._output(run_conv_graph_entry(settled, x))  # (what `_settle` filed)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} expects a tensor, got {type(x).__name__}")
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            layout = ["N", "C", "L"] if self.dims == 1 else ["N", "C", "H", "W"] if self.dims == 2 else \
                ["N", "C", "D", "H", "W"]
            raise ValueError(f"{name} expects [{', '.join(layout)}] with C={self.in_channels}, got shape "
                             f"{tuple(x.shape)}")
        if self._stale:
            self.ensure_packed()
        codes_impl = None
        if x.dtype == torch.uint8:
            codes, zp = x, self._x_zp
        elif x.dtype == torch.int8:
            if not self.input_spec.signed:
                raise TypeError(f"{name} has an unsigned input grid: pass uint8 codes or a float tensor, "
                                "not int8")
            codes, zp = x, self._x_zp - 128
        elif x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            codes_impl, codes_checked, codes_args = self._input_codes(x)
            codes, zp = quantize_codes(*codes_args, impl=codes_impl, checked=codes_checked), self._x_zp
        else:
            raise TypeError(f"{name} expects a float tensor or uint8 activation codes"
                            f"{' (or int8)' if self.input_spec.signed else ''}, got {x.dtype}")
        if x.device != self.weight.device:
            raise ValueError(f"{name} holds its weights on {self.weight.device} but got an input on {x.device}")
        out_scale, out_zp = self._emit if self.output_kind == "uint8" else (None, 0)
        args = (codes, self._x_scale, zp, self.weight, self.weight_scale, self.bias, self.stride, self.padding,
                self.dilation, self.groups, self.post_op, out_scale, out_zp,
                self._packed_weight(tuple(codes.shape[2:])))
        binding, sig = self.binding, self._signature(x)
        key = (codes.dtype, codes.device, codes.shape, args[-1] is None, self.post_op, out_scale is None)
        impl, checked = binding.choose(int8_conv, key, *args, preferred=self.impl)
        y = int8_conv(*args, impl=binding.record(impl), checked=checked)
        if checked and codes.dtype == torch.uint8 and not torch.compiler.is_compiling():
            self._settle(sig, impl, args, (codes_impl, *codes_args) if codes_impl else None)
        return self._output(y)

    def _settle(self, sig: tuple[Any, ...], impl: str, args: tuple[Any, ...], codes: tuple[Any, ...] | None) -> None:
        """Settle the kernel for this input signature (the shape steers the choice): later eager calls
        are one lookup and the kernels; graphs call them from their graph entry (`conv_graph`: the
        tensors, the constants held once; `_graph_forward`). ``codes``: a float input's
        ``(implementation, x, *quantize_codes arguments)``."""
        quantize = None if codes is None else (codes[0], *codes[2:])  # (what graphs keep: not the input)
        settled = settled_conv_call(impl, args, quantize, self.post_op)
        if settled is None:
            return
        call, compiled = settled
        if quantize is not None:  # a float input: its settled quantization, then the kernel
            call = _after_quantizing(call, quantize_codes_call(*codes))
        self.binding.settle(sig, impl, call, compiled)

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        if self.output_kind == "float" and self.output_spec is not None:
            y = fake_quantize(y, self.output_scale, self.output_zero_point, self.output_spec)
        return y

    def extra_repr(self) -> str:  # (from the canonical buffers: a repr builds nothing)
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}",
                 f"stride={self.stride}"]
        if any(self.padding):
            parts.append(f"padding={self.padding}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.bias is None:
            parts.append("bias=False")
        parts.append(f"input={self.input_spec} scale={float(self.input_scale):.4g} zp={int(self.input_zero_point)}")
        parts.append(f"weight={self.weight_spec}")
        if self.output_kind == "uint8":
            parts.append(f"output=uint8 scale={float(self.emit_scale):.4g} zp={int(self.emit_zero_point)}")
        elif self.output_spec is not None:
            parts.append(f"output=float fake-quantized {self.output_spec} scale={float(self.output_scale):.4g}")
        if self.post_op != "none":
            parts.append(f"post_op={self.post_op}")
        return ", ".join(parts)


def _after_quantizing(call: Any, quantize: Any) -> Any:
    """A settled kernel ``call`` on uint8 codes as a call on the float input (its settled quantization first)."""
    return lambda x: call(quantize(x))


class Int8Conv1d(_Int8ConvNd):
    """Integer `torch.nn.Conv1d` (see the module docstring)."""

    dims = 1
    simulated_type = QuantConv1d


class Int8Conv2d(_Int8ConvNd):
    """Integer `torch.nn.Conv2d` (see the module docstring)."""

    dims = 2
    simulated_type = QuantConv2d


class Int8Conv3d(_Int8ConvNd):
    """Integer `torch.nn.Conv3d` (see the module docstring)."""

    dims = 3
    simulated_type = QuantConv3d


__all__ = ["DEFAULT_INPUT_SPEC", "DEFAULT_WEIGHT_SPEC", "OUTPUT_KINDS", "Int8Conv1d", "Int8Conv2d", "Int8Conv3d"]
