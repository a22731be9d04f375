"""The ONNX form of each integer module class, declared once per class by registration.

A form is a function ``(module, path) -> export part`` (`quanta.io.onnx_qdq`) registered with
``@onnx_form(Cls, ...)``; `from_integer` looks the module's class up along its MRO, so a subclass
inherits its base's form unless it registers its own (``Int8PaddedConv2d`` before
``Int8Conv2d``). A class ONNX cannot express exactly registers its one-line reason with
`onnx_refusal`. A class with neither gets the "no ONNX form" error. Adding an integer module type
adds its form here (and its entry in ``tests/integer/test_conformance.py``). Beside the form, the
parity step (`quanta.analysis.onnx_parity`) reads two per-class settings from here: ``@parity_step``
(the unit a float output is compared in: the accumulator unit ``input step × weight scale``) and
``@inexact_form`` (why a form cannot be bit-exact; the comparison then says so and tests bound
the relative difference instead)::

    @onnx_form(Int8Linear)
    def _int8_linear(mod: Int8Linear, path: str) -> Q.ExportLinear: ...
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core import QuantSpec, choose_qparams, compute_range, unpack_bits
from ..integer.add import Int8Add
from ..integer.attention import Int8MultiheadAttention
from ..integer.base import IntegerModule
from ..integer.conv import _Int8ConvNd
from ..integer.dynamic_conv import _DynamicInt8ConvNd
from ..integer.embedding import Int4Embedding, Int8Embedding
from ..integer.linear import Int8Linear
from ..integer.padded_conv import _PaddedMixin
from ..integer.recurrent import _Recurrent
from ..integer.weight_only import HalfLinear, Int4WeightOnlyLinear, Int8WeightOnlyLinear
from ..nn.tensor_quantizer import TensorQuantizer
from . import onnx_qdq as Q
from .onnx_ops import unsupported

Form = Callable[[Any, str], nn.Module]
_FORMS: dict[type, Form] = {}
#: (step tensor, where it comes from) of an integer module's output, from its input and output
Step = tuple[torch.Tensor, str]
_STEPS: dict[type, Callable[[Any, Any, torch.Tensor], Step | None]] = {}
_INEXACT: dict[type, Callable[[Any], str]] = {}


def _registrar(table: dict[type, Any], what: str, classes: tuple[type, ...]) -> Callable[[Any], Any]:
    if not classes or not all(isinstance(c, type) and issubclass(c, IntegerModule) for c in classes):
        raise TypeError(f"{what} takes IntegerModule subclasses, got {classes!r}")

    def register(fn: Any) -> Any:
        for cls in classes:
            if cls in table:
                raise ValueError(f"{cls.__name__} already has its {what} ({table[cls].__name__})")
            table[cls] = fn
        return fn

    return register


def _lookup(table: dict[type, Any], cls: type) -> Any:
    return next((table[c] for c in cls.__mro__ if c in table), None)


def onnx_form(*classes: type) -> Callable[[Form], Form]:
    """Register the decorated function as the ONNX form of ``classes`` (and their subclasses that
    register none of their own)."""
    return _registrar(_FORMS, "ONNX form", classes)


def parity_step(*classes: type) -> Callable[[Any], Any]:
    """Register ``fn(module, input, output) -> (step, how) | None``: the unit in which the parity
    step measures a float output of ``classes`` (an output grid, when there is one, comes first)."""
    return _registrar(_STEPS, "parity step", classes)


def inexact_form(*classes: type) -> Callable[[Any], Any]:
    """Register ``fn(module) -> reason``: why this module's ONNX form is not bit-exact ("" when,
    as it runs now, it is)."""
    return _registrar(_INEXACT, "inexact reason", classes)


def onnx_refusal(cls: type, reason: str) -> None:
    """Register that ``cls`` has no exact ONNX form, and why (one line, said by the export error)."""

    def refuse(mod: nn.Module, path: str) -> nn.Module:
        raise unsupported(path, f"{type(mod).__name__} {reason}")

    refuse.refusal = reason  # type: ignore[attr-defined]
    onnx_form(cls)(refuse)


def form_of(cls: type) -> Form | None:
    """The registered form of ``cls`` (along its MRO), or None."""
    return _lookup(_FORMS, cls)


def integer_step(mod: nn.Module, x: Any, y: torch.Tensor) -> Step | None:
    """The registered parity step of ``mod``'s output ``y`` for input ``x`` (None if none)."""
    fn = _lookup(_STEPS, type(mod))
    return None if fn is None else fn(mod, x, y)


def inexact_reason(mod: nn.Module) -> str:
    """Why ONNX cannot reproduce ``mod``'s numbers bit for bit ("" when it can, up to float32
    summation order)."""
    fn = _lookup(_INEXACT, type(mod))
    return "" if fn is None else fn(mod)


def refusal_of(cls: type) -> str | None:
    """The reason registered with `onnx_refusal` for ``cls`` (None when it has a form or nothing)."""
    form = form_of(cls)
    return getattr(form, "refusal", None) if form is not None else None


def from_integer(mod: IntegerModule, path: str) -> nn.Module:
    """The export form of an integer module, or a ValueError saying why there is none."""
    form = form_of(type(mod))
    if form is None:
        raise unsupported(path, f"no ONNX form for the integer module {type(mod).__name__}")
    return form(mod, path)


# ----------------------------------------------------------------------------- helpers
def per_channel(codes: torch.Tensor, scale: torch.Tensor, bits: int, path: str) -> Q.ExportWeight:
    spec = QuantSpec(bits=bits, granularity="per_channel", axis=0)
    return Q.weight_codes(codes, scale.reshape(-1), None, spec, path)


def output_form(mod: Any, path: str) -> Q.ExportQuantizer | None:
    """The export form of an integer module's output grid (``output_spec``), if it has one."""
    spec = mod.output_spec
    if spec is None:
        return None
    if spec.dynamic or not spec.has_scale:
        return Q.activation(spec, path, role="output")
    return Q.activation(spec, path, mod.output_scale, mod.output_zero_point, role="output")


def channel_view(scale: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """``scale`` (one value, or one per channel) shaped to broadcast along ``y``'s axis ``dim``."""
    if scale.numel() == 1:
        return scale.reshape(())
    shape = [1] * y.dim()
    shape[dim] = -1
    return scale.reshape(shape)


def _quantizers_exported(op: nn.Module, path: str) -> nn.Module:
    """A copy of a simulated op (the attention matmuls) with its quantizers as export parts."""
    op = copy.deepcopy(op)
    for name, child in list(op.named_children()):
        if isinstance(child, TensorQuantizer):
            setattr(op, name, Q.from_quantizer(child, f"{path}.{name}"))
    return op


# ----------------------------------------------------------------------------- forms
@onnx_form(Int8Linear)
def _int8_linear(mod: Int8Linear, path: str) -> Q.ExportLinear:
    act = mod.act_spec
    inp = Q.activation(act, path, None if act.dynamic else mod.input_scale,
                       None if act.dynamic else mod.input_zero_point, role="input")
    codes = unpack_bits(mod.weight, 4, True, mod.in_features) if mod.weight_bits <= 4 else mod.weight
    w = per_channel(codes, mod.weight_scale, mod.weight_bits, path)
    return Q.ExportLinear(w, mod.bias, inp, output_form(mod, path), mod.post_op)


@onnx_form(Int8WeightOnlyLinear)
def _int8_weight_only(mod: Any, path: str) -> Q.ExportLinear:
    """On bfloat16 activations torch's kernel (``_weight_int8pack_mm``) computes
    ``bf16((x @ codes^T) * bf16(scale))``, then adds the bias in bfloat16: the graph does the same
    (scales rounded to bfloat16, a bfloat16 cast before the bias Add, the bias rounded), which
    leaves only float32 summation order between them. Other inputs run the float32 reference
    (dequantized weights, then the matmul), the plain form."""
    from ..kernels.weight_only import int8_weight_only_linear

    bf16 = QuantSpec(format="bf16", bits=16)
    out = output_form(mod, path)
    if mod.activation != "bfloat16":
        return Q.ExportLinear(per_channel(mod.weight, mod.weight_scale, 8, path), mod.bias, None, out)
    probe = torch.zeros(1, mod.in_features, dtype=torch.bfloat16, device=mod.weight.device)
    ran = mod.impl if mod.impl != "auto" else int8_weight_only_linear.choose(
        probe, mod.weight, mod.weight_scale, mod.bias)
    inp = Q.activation(bf16, path)
    if ran != "int8pack_mm":
        return Q.ExportLinear(per_channel(mod.weight, mod.weight_scale, 8, path), mod.bias, inp, out)
    scale = mod.weight_scale.to(torch.bfloat16).float()
    bias = None if mod.bias is None else mod.bias.to(torch.bfloat16).float()
    return Q.ExportLinear(per_channel(mod.weight, scale, 8, path), bias, inp, out, product_q=Q.activation(bf16, path))


@onnx_form(Int4WeightOnlyLinear)
def _int4_weight_only(mod: Int4WeightOnlyLinear, path: str) -> Q.ExportLinear:
    spec = QuantSpec(bits=4, signed=mod.signed, symmetric=mod.symmetric, granularity="per_group",
                     group_size=mod.group_size)
    codes = unpack_bits(mod.weight, 4, mod.signed, mod.in_features)
    inp = Q.activation(QuantSpec(format="bf16", bits=16), path) if mod.activation == "bfloat16" else None
    w = Q.weight_codes(codes, mod.weight_scale, mod.weight_zero_point, spec, path)
    return Q.ExportLinear(w, mod.bias, inp, output_form(mod, path))


@onnx_form(HalfLinear)
def _half_linear(mod: HalfLinear, path: str) -> Q.ExportLinear:
    fmt = "fp16" if mod.input_dtype == torch.float16 else "bf16"
    inp = Q.activation(QuantSpec(format=fmt, bits=16), path) if mod.cast_input else None
    return Q.ExportLinear(Q.ExportWeight(mod.weight, None, None), mod.bias, inp, output_form(mod, path))


@onnx_form(_Int8ConvNd)
def _int8_conv(mod: _Int8ConvNd, path: str) -> Q.ExportConv:
    """Also ``Int8PaddedConv*`` (`quanta.integer.padded_conv`): its asymmetric part of the padding
    is a Pad by 0.0 on the float input before the QuantizeLinear, which gives the zero point's code,
    as the integer module pads its codes."""
    inp = Q.activation(mod.input_spec, path, mod.input_scale, mod.input_zero_point, role="input")
    w = Q.weight_codes(mod.weight, mod.weight_scale, None, QuantSpec(granularity="per_channel", axis=0), path)
    # uint8 hand-off (quanta.transforms.fuse): the codes are on the next conv's input grid, so
    # the next conv's own QuantizeLinear re-creates them; in float mode the output quantizer applies
    out = output_form(mod, path) if mod.output_kind == "float" else None
    extra = tuple(mod.extra_padding) if isinstance(mod, _PaddedMixin) else ()
    return Q.ExportConv(mod.dims, vars(mod), w, mod.bias, inp, out, mod.post_op, extra_padding=extra)


@onnx_form(_DynamicInt8ConvNd)
def _dynamic_conv(mod: _DynamicInt8ConvNd, path: str) -> Q.ExportConv:
    """The per-call input range computed in the graph with quanta's float32 arithmetic (as the
    dynamic Linears export), then the conv on the dequantized codes; float output."""
    inp = Q.activation(mod.input_spec, path, role="input")
    w = Q.weight_codes(mod.weight, mod.weight_scale, None, QuantSpec(granularity="per_channel", axis=0), path)
    return Q.ExportConv(mod.dims, vars(mod), w, mod.bias, inp, None)


@onnx_form(Int8Add)
def _int8_add(mod: Int8Add, path: str) -> Q.ExportAdd:
    a, b = (Q.activation(getattr(mod, f"{n}_spec"), path, getattr(mod, f"{n}_scale"),
                         getattr(mod, f"{n}_zero_point"), role=n) for n in mod.operand_names)
    return Q.ExportAdd(a, b, mod.post_op)


@onnx_form(Int8Embedding)
def _int8_embedding(mod: Int8Embedding, path: str) -> Q.ExportEmbedding:
    spec = QuantSpec(granularity="per_channel", axis=0, symmetric=mod.symmetric)
    return Q.ExportEmbedding(Q.weight_codes(mod.weight, mod.weight_scale, mod.weight_zero_point, spec, path))


@onnx_form(Int4Embedding)
def _int4_embedding(mod: Int4Embedding, path: str) -> Q.ExportEmbedding:
    spec = QuantSpec(bits=4, symmetric=mod.symmetric, granularity="per_group", group_size=mod.group_size)
    codes = unpack_bits(mod.weight, 4, True, mod.embedding_dim)
    return Q.ExportEmbedding(Q.weight_codes(codes, mod.weight_scale, mod.weight_zero_point, spec, path))


@onnx_form(Int8MultiheadAttention)
def _attention(mod: Int8MultiheadAttention, path: str) -> Q.ExportAttention:
    """The in- and out-projections as the Int8Linear forms, the attention between as float ops
    (with the attention matmuls' quantizers where the integer module applies them)."""
    return Q.ExportAttention(mod, _int8_linear(mod.in_proj, f"{path}.in_proj"),
                             _int8_linear(mod.out_proj, f"{path}.out_proj"),
                             _quantizers_exported(mod.qk_matmul, f"{path}.qk_matmul"),
                             _quantizers_exported(mod.av_matmul, f"{path}.av_matmul"))


onnx_refusal(_Recurrent, "runs fbgemm's dynamic int8 recurrence, which re-quantizes the input and hidden state at "
                         "every time step with per-call ranges; ONNX's LSTM / GRU / RNN operators take float weights "
                         "and have no place for that. Keep the layer float (QuantConfig(exclude=...)) to export the "
                         "model")


# ----------------------------------------------------------------------------- parity settings
@parity_step(_Int8ConvNd)
def _conv_step(mod: _Int8ConvNd, x: Any, y: torch.Tensor) -> Step:
    if mod.output_kind == "uint8":
        return mod.emit_scale.float(), "uint8 codes handed to the next conv"
    return mod.input_scale.float() * channel_view(mod.weight_scale, y, 1), "accumulator unit"


@parity_step(_DynamicInt8ConvNd)
def _dynamic_conv_step(mod: _DynamicInt8ConvNd, x: Any, y: torch.Tensor) -> Step | None:
    if not isinstance(x, torch.Tensor):
        return None
    xs = choose_qparams(*compute_range(x.float(), mod.input_spec), mod.input_spec)[0].float()
    return xs * channel_view(mod.weight_scale.float(), y, 1), "accumulator unit"


@parity_step(Int8Linear)
def _linear_step(mod: Int8Linear, x: Any, y: torch.Tensor) -> Step | None:
    if not isinstance(x, torch.Tensor):
        return None
    spec = mod.act_spec
    xs = choose_qparams(*compute_range(x.reshape(-1, x.shape[-1]).float(), spec), spec)[0] if spec.dynamic \
        else mod.input_scale.float()
    unit = xs.reshape(-1, 1) * mod.weight_scale.float().reshape(1, -1)
    return unit.reshape(*y.shape[:-1], -1) if unit.dim() == 2 and unit.shape[0] > 1 else unit.reshape(-1), \
        "accumulator unit"


@inexact_form(Int4WeightOnlyLinear)
def _int4_bf16_inexact(mod: Int4WeightOnlyLinear) -> str:
    """torch's int4 weight-only kernel on bfloat16 activations computes
    ``(u - 8) * bf16(scale) + bf16((8 - zp) * scale)``, a zero term rounded apart from the scale,
    which no DequantizeLinear (``(q - zp) * scale``, integer zp) expresses."""
    from ..kernels.weight_only import int4_weight_only_linear

    if mod.activation != "bfloat16":
        return ""
    probe = torch.zeros(1, mod.in_features, dtype=torch.bfloat16, device=mod.weight.device)
    ran = mod.impl if mod.impl != "auto" else int4_weight_only_linear.choose(
        probe, mod.weight, mod.weight_scale, mod.weight_zero_point, mod.group_size, mod.signed, mod.bias,
        mod._packed, mod._scales_zeros)
    if ran != "int4pack_mm":
        return ""
    return ("not bit-exact: torch's int4 kernel (bfloat16) uses bfloat16 scales and zero terms "
            "(8 - zp) * scale rounded apart; ONNX DequantizeLinear computes (q - zp) * scale")
