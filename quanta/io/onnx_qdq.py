"""Export-only modules: quanta's numbers written with the custom ops of `onnx_ops` (which
``torch.onnx`` turns into QuantizeLinear / DequantizeLinear), and the builders that make them
from quanta's quantizers (`onnx_forms` builds whole integer layers from them).

Builders raise ``ValueError`` naming the module path and what ONNX cannot express.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import Format, Granularity, QuantSpec, Rounding, normalize_axis, quantize
from ..integer.attention import packed_projection
from ..nn.modules.attention import mha_forward
from ..nn.tensor_quantizer import TensorQuantizer
from .onnx_ops import OPSET_BLOCKED, OPSET_MIN, unsupported

_TINY = torch.finfo(torch.float32).tiny
_HALF = {Format.FP16: torch.float16, Format.BF16: torch.bfloat16}


# ----------------------------------------------------------------------------- export modules
class _ExportPart(nn.Module):
    #: read by quanta.nn's attention and encoder layer (as for integer modules): run quanta's
    #: quantized Python path, never torch's fused float fast path
    is_integer_module = True
    is_enabled = True
    #: (lowest opset, what needs it)
    requirement: tuple[int, str] = (OPSET_MIN, "")
    form: str = ""


class ExportQuantizer(_ExportPart):
    """An activation quantizer: a static or dynamic integer grid (Q → DQ) or a half-precision cast."""

    def __init__(self, spec: QuantSpec, scale: torch.Tensor | None = None,
                 zero_point: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.half = _HALF.get(spec.format)
        self.dynamic = spec.dynamic
        self.per_token = spec.granularity is Granularity.PER_TOKEN
        self.axis = 0
        if self.half is None and not self.dynamic:
            assert scale is not None and zero_point is not None
            self.register_buffer("scale", scale.detach().float().clone())
            self.register_buffer("zero_point", zero_point.detach().to(_code_dtype(spec)).reshape(scale.shape).clone())
            if spec.granularity is Granularity.PER_CHANNEL:
                assert spec.axis is not None
                self.axis = spec.axis
        if self.per_token:
            self.requirement = (OPSET_BLOCKED, "per-token activations (blocked QuantizeLinear)")
        kind = "dynamic" if self.dynamic else "static"
        self.form = f"cast to {spec.format.value}" if self.half is not None else f"{_grid(spec)} {kind}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.half is not None:  # quanta's cast: saturate to the format's max, round, back
            m = float(torch.finfo(self.half).max)
            return x.clamp(-m, m).to(self.half).to(x.dtype)
        spec = self.spec
        if not self.dynamic:
            return torch.ops.quanta_onnx.fake_quant(x, self.scale, self.zero_point, self.axis, 0, spec.qmin, spec.qmax)
        if self.per_token and x.dim() > 2:
            # on a 2-D [tokens, K] view (a Reshape between the DequantizeLinear and a 3-D MatMul):
            # ONNX Runtime 1.31 fuses a per-token DequantizeLinear feeding a 3-D MatMul into
            # MatMulIntegerToFloat, which rejects per-row zero points (attention's matmuls)
            return self(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        scale, zp = self._dynamic_qparams(x)
        axis, block = (x.dim() - 1, int(x.shape[-1])) if self.per_token else (0, 0)
        return torch.ops.quanta_onnx.fake_quant(x, scale, zp, axis, block, spec.qmin, spec.qmax)

    def _dynamic_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`quanta.core.choose_qparams` of the per-call range, as graph ops (same float32 arithmetic)."""
        spec, xf = self.spec, x.float()
        if not self.per_token:  # one range over the whole tensor (ONNX's ReduceMin/Max take the flat axis)
            xf = xf.reshape(-1)
        kw: dict[str, Any] = {"dim": -1, "keepdim": self.per_token}
        if spec.symmetric:
            amax = xf.abs().amax(**kw)
            scale = torch.where(amax > 0, (amax / float(spec.qmax)).clamp_min(_TINY), torch.ones_like(amax))
            return scale, torch.zeros_like(scale).to(_code_dtype(spec))
        lo, hi = xf.amin(**kw).clamp_max(0.0), xf.amax(**kw).clamp_min(0.0)
        width = hi - lo
        scale = torch.where(width > 0, (width / float(spec.qmax - spec.qmin)).clamp_min(_TINY), torch.ones_like(width))
        zp = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
        return scale, zp.to(_code_dtype(spec))


class ExportWeight(_ExportPart):
    """Integer codes kept as an initializer, dequantized in the graph (or a float / half weight).

    Called like a weight quantizer (``wq(w)``) it ignores ``w`` and returns the dequantized codes."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                 axis: int = 0, block_size: int = 0, bits: int = 8) -> None:
        super().__init__()
        self.register_buffer("codes", codes.detach().clone())
        self.half = codes.is_floating_point()
        self.axis, self.block_size, self.bits = axis, block_size, bits
        self.signed = codes.dtype != torch.uint8
        if self.half:  # fp16 / bf16 (or float32, an unquantized weight)
            self.form = f"{str(codes.dtype).replace('torch.', '')} initializer"
            return
        assert scale is not None
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", None if zero_point is None else zero_point.to(codes.dtype).clone())
        what = "per tensor" if scale.dim() == 0 else (f"per group of {block_size} (axis {axis})" if block_size
                                                      else f"per channel (axis {axis})")
        kind = ("int" if self.signed else "uint") + ("4" if bits <= 4 else "8")
        self.form = f"{kind} initializer {what}{'' if zero_point is None else ' asymmetric'}"
        if bits <= 4 or block_size:
            self.requirement = (OPSET_BLOCKED, "int4 weights (INT4 tensors)" if bits <= 4 else
                                "per-group weights (blocked DequantizeLinear)")

    def forward(self, *_: Any) -> torch.Tensor:
        if self.half:
            return self.codes.float()
        return torch.ops.quanta_onnx.dequantize(self.codes, self.scale, self.zero_point, self.axis, self.block_size,
                                                self.bits, self.signed)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    # A separate Add, not the bias input of Gemm / Conv: ONNX Runtime's default WeightBiasQuantization
    # pass rounds such a float bias onto the int32 grid x_scale * w_scale, which quanta does not do
    # (measured: 2% of the digits CNN's outputs one step off).
    if bias is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y + bias.reshape(shape)


class ExportLinear(_ExportPart):
    def __init__(self, weight: ExportWeight, bias: torch.Tensor | None, input_q: nn.Module | None,
                 output_q: nn.Module | None, post_op: str = "none", product_q: nn.Module | None = None) -> None:
        super().__init__()
        self.input_quantizer, self.weight_quantizer, self.output_quantizer = input_q, weight, output_q
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.post_op = post_op  # a fused activation (quanta.integer.Int8Linear.post_op): Relu / Gelu
        # the kernel rounds x @ w before adding the bias (torch's bf16 weight-only int8 kernel)
        self.product_quantizer = product_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On a 2-D [tokens, K] view, as quanta's integer Linear computes (and a Gemm in ONNX):
        # ONNX Runtime 1.31 fuses a per-token DequantizeLinear feeding a 3-D MatMul into
        # MatMulIntegerToFloat (which rejects per-row zero points), and a DequantizeLinear'd weight
        # under a 3-D MatMul into MatMulNBits (which quantizes activations itself).
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = F.linear(x, self.weight_quantizer())
        y = _add_bias(y if self.product_quantizer is None else self.product_quantizer(y), self.bias, -1)
        if self.post_op == "relu":
            y = torch.relu(y)
        elif self.post_op in ("gelu", "gelu_tanh"):
            y = F.gelu(y, approximate="tanh" if self.post_op == "gelu_tanh" else "none")
        y = y if self.output_quantizer is None else self.output_quantizer(y)
        return y.reshape(*shape[:-1], y.shape[-1])


class ExportConv(_ExportPart):
    """A convolution on dequantized codes. ``extra_padding`` (``F.pad`` order) pads the float
    input with 0.0 before its QuantizeLinear, which gives the zero point's code: the same codes
    as `quanta.integer.padded_conv` padding uint8 codes with the zero point."""

    def __init__(self, dims: int, conv: dict[str, Any], weight: ExportWeight, bias: torch.Tensor | None,
                 input_q: nn.Module | None, output_q: nn.Module | None, post_op: str = "none",
                 extra_padding: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.input_quantizer, self.weight_quantizer, self.output_quantizer = input_q, weight, output_q
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        self.kwargs = {k: conv[k] for k in ("stride", "padding", "dilation", "groups")}
        self.post_op = post_op
        self.extra_padding = tuple(extra_padding) if any(extra_padding) else ()
        if self.extra_padding:
            self.form = f"Pad {list(self.extra_padding)} by 0.0, then the conv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra_padding:
            x = F.pad(x, self.extra_padding)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = _add_bias(self.conv(x, self.weight_quantizer(), None, **self.kwargs), self.bias, 1)
        if self.post_op == "relu":
            y = torch.relu(y)
        elif self.post_op == "relu6":
            y = torch.clamp(y, 0.0, 6.0)
        return y if self.output_quantizer is None else self.output_quantizer(y)


class ExportAdd(_ExportPart):
    """An integer residual addition: each operand through its Q→DQ pair, the sum, the fused
    activation; a uint8 hand-off is re-created by the consumers' own QuantizeLinear."""

    def __init__(self, input_q: nn.Module, other_q: nn.Module, post_op: str = "none") -> None:
        super().__init__()
        self.input_quantizer, self.other_quantizer, self.post_op = input_q, other_q, post_op

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = self.input_quantizer(a) + self.other_quantizer(b)
        if self.post_op == "relu":
            y = torch.relu(y)
        elif self.post_op == "relu6":
            y = torch.clamp(y, 0.0, 6.0)
        return y


class ExportAttention(_ExportPart):
    """`quanta.integer.Int8MultiheadAttention` for export: its in- and out-projections as QDQ
    Linears (``in_proj``, ``out_proj``), the attention between as float ops with the simulated
    matmul quantizers (as export parts) where the integer module applies them; the same
    `mha_forward` the integer module runs."""

    def __init__(self, attn: Any, in_proj: nn.Module, out_proj: nn.Module, qk_matmul: nn.Module,
                 av_matmul: nn.Module) -> None:
        super().__init__()
        for name in ("embed_dim", "num_heads", "head_dim", "batch_first"):
            setattr(self, name, getattr(attn, name))
        self.per_call_grid = bool(attn.in_proj.act_spec.dynamic)
        self.in_proj, self.out_proj, self.qk_matmul, self.av_matmul = in_proj, out_proj, qk_matmul, av_matmul
        self.bias_k = self.bias_v = None
        self.add_zero_attn, self.dropout = False, 0.0

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, same_k: bool,
                 same_v: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return packed_projection(self.in_proj, query, key, value, same_k, same_v, self.per_call_grid,
                                 type(self).__name__)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return mha_forward(self, self._project, query, key, value, key_padding_mask, need_weights, attn_mask,
                           average_attn_weights, is_causal)


class ExportEmbedding(_ExportPart):
    def __init__(self, weight: ExportWeight) -> None:
        super().__init__()
        self.weight_quantizer = weight

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.weight_quantizer())


# ----------------------------------------------------------------------------- builders
def _code_dtype(spec: QuantSpec) -> torch.dtype:
    return torch.int8 if spec.signed else torch.uint8


def _grid(spec: QuantSpec) -> str:
    g = spec.granularity.value.replace("_", "-")
    return f"{'int' if spec.signed else 'uint'}{spec.bits} {g}{'' if spec.symmetric else ' asymmetric'}"


def _activation_problem(spec: QuantSpec) -> str | None:
    if spec.format in _HALF:
        return None
    if spec.format is not Format.INT:
        return (f"{spec.format.value} activations have no QuantizeLinear form here (exported: integer grids of "
                "2..8 bits, fp16 / bf16 casts)")
    if not 2 <= spec.bits <= 8:
        return f"{spec.bits}-bit activations (QuantizeLinear codes here are int8 / uint8: 2..8 bits)"
    if spec.rounding is not Rounding.HALF_EVEN:
        return f"activations round {spec.rounding.value!r}; QuantizeLinear rounds half to even"
    g = spec.granularity
    if spec.dynamic and g not in (Granularity.PER_TENSOR, Granularity.PER_TOKEN):
        return f"dynamic {g.value} activations (dynamic export covers per-tensor and per-token ranges)"
    if not spec.dynamic and g not in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL, Granularity.GLOBAL):
        return f"static {g.value} activations (QuantizeLinear here: per tensor or per channel)"
    return None


def activation(spec: QuantSpec, path: str, scale: torch.Tensor | None = None,
               zero_point: torch.Tensor | None = None, role: str = "") -> ExportQuantizer:
    """An `ExportQuantizer` for ``spec`` (static when ``scale`` is given), or why there is none."""
    problem = _activation_problem(spec)
    if problem:
        raise unsupported(path, f"{role}: {problem}" if role else problem)
    return ExportQuantizer(spec, scale, zero_point)


class Uncalibrated(_ExportPart):
    """Stands for a quantizer without a range; raises if the model calls it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise unsupported(self.path, "quantizer has no range: calibrate the model (quanta.calibrate) first")


def from_quantizer(tq: TensorQuantizer, path: str) -> _ExportPart | None:
    """The export form of an activation quantizer (None when it is off)."""
    if tq.mode == "disabled":
        return None
    if tq.mode != "quantize":
        raise unsupported(path, f"quantizer is in mode {tq.mode!r}; finish calibration (quanta.calibrate) first")
    if not tq.desc.fake_quant:
        raise unsupported(path, "quantizer returns integer codes (fake_quant=False), not values")
    spec = tq.spec
    if spec.format in _HALF or spec.dynamic:
        return activation(spec, path)
    if tq.needs_calibration:  # fine while nothing calls it (the key quantizer of self-attention)
        return Uncalibrated(path)
    problem = _activation_problem(spec)
    if problem:
        raise unsupported(path, problem)
    scale, zp = tq.qparams()
    return ExportQuantizer(spec, scale, zp)


def weight_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec,
                 path: str) -> ExportWeight:
    """An `ExportWeight` from quanta codes and compact qparams under ``spec``."""
    if spec.format is not Format.INT or not 2 <= spec.bits <= 8:
        raise unsupported(path, f"weights {spec} (exported: 2..8-bit integer codes, fp16 / bf16)")
    g = spec.granularity
    axis, block = 0, 0
    if g is Granularity.PER_CHANNEL:
        assert spec.axis is not None
        axis = normalize_axis(spec.axis, codes.dim())
    elif g is Granularity.PER_GROUP:
        assert spec.group_size is not None
        axis, block = normalize_axis(spec.group_axis, codes.dim()), spec.group_size
    elif g not in (Granularity.PER_TENSOR, Granularity.GLOBAL):
        raise unsupported(path, f"{g.value} weights have no DequantizeLinear form")
    scale = scale.float().reshape(()) if scale.numel() == 1 and g is not Granularity.PER_GROUP else scale.float()
    zp = None if spec.symmetric or zero_point is None else zero_point.reshape(scale.shape)
    return ExportWeight(codes.to(_code_dtype(spec)), scale, zp, axis, block, spec.bits)


def from_weight_quantizer(wq: TensorQuantizer, w: torch.Tensor, path: str) -> ExportWeight | None:
    if wq.mode == "disabled":
        return None
    if wq.mode != "quantize" or not wq.desc.fake_quant:
        raise unsupported(path, f"weight quantizer in mode {wq.mode!r} (fake_quant={wq.desc.fake_quant})")
    spec = wq.spec
    if spec.format in _HALF:
        m = float(torch.finfo(_HALF[spec.format]).max)
        return ExportWeight(w.detach().float().clamp(-m, m).to(_HALF[spec.format]), None, None)
    if spec.rounding is Rounding.STOCHASTIC:
        raise unsupported(path, "stochastic weight rounding draws new codes every call; there are no fixed codes")
    if spec.dynamic:
        raise unsupported(path, f"dynamic weight quantizer {spec}")
    scale, zp = wq.qparams(w.detach())
    return weight_codes(quantize(w.detach().float(), scale, zp, spec), scale, zp, spec, path)
