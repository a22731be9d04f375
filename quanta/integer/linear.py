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

import functools
from typing import Any

import torch

from ..core import Format, Granularity, QuantSpec, pack_bits, unpack_bits
from ..kernels.activation import quantize_activation
from ..kernels.graph_ops import SettledGraphCall, settled_call
from ..kernels.linear import GEMV_MAX_ROWS, gemm_pack, int8_linear, onednn_prepack, streaming_copy, weight_sum
from ..kernels.linear_avx2 import avx2_auto_pack, avx2_linear_call
from ..kernels.linear_native import (
    NATIVE_LINEAR_IMPLS,
    POST_OPS,
    apply_post_op,
    check_post_op,
    compiled_linear_args,
    native_linear_call,
)
from ..kernels.linear_onednn import onednn_auto_pack, onednn_linear_call
from ..kernels.u8s8_saturation import weight_code_max
from .linear_common import (
    _active,
    _bias_of,
    _common_reason,
    _int_weight_reason,
    _LinearBase,
    _output_spec_of,
    _per_channel_weight,
)
from .validate import bits_in, one_of


# ----------------------------------------------------------------------------- int8 x int8
class Int8Linear(_LinearBase):
    """int8 weights (per output channel) x int8/uint8 activations, exact int32 accumulation.

    Activations: static per-tensor (``input_scale`` / ``input_zero_point`` from calibration) or
    dynamic per-tensor / per-token (``act_spec.dynamic``), symmetric or asymmetric, signed or
    unsigned. Weights of <= 4 bits (w4a8) are stored bit-packed two per byte and unpacked to int8
    codes in ``pack()``.

    ``post_op`` (``"relu"``, ``"gelu"``, ``"gelu_tanh"``; set by `quanta.transforms.fuse` when
    the model applies that activation module to this layer's output and nothing else reads it)
    is applied to the float output, inside the native kernel's epilogue where that runs.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 act_spec: QuantSpec | None = None, weight_bits: int = 8,
                 output_spec: QuantSpec | None = None, post_op: str = "none") -> None:
        super().__init__()
        self._init_linear(in_features, out_features, bias)
        act_spec = QuantSpec(granularity="per_token") if act_spec is None else act_spec
        if not isinstance(act_spec, QuantSpec):
            raise TypeError(f"Int8Linear: act_spec must be a QuantSpec or None, got {type(act_spec).__name__}")
        if act_spec.format is not Format.INT or act_spec.bits > 8 or act_spec.granularity not in (
                Granularity.PER_TENSOR, Granularity.PER_TOKEN):
            raise ValueError(f"Int8Linear: activations must be <= 8-bit integers, per tensor or per token; "
                             f"got {act_spec}")
        self.act_spec, self.weight_bits = act_spec, bits_in("Int8Linear", "weight_bits", weight_bits, 2, 8)
        one_of("Int8Linear", "post_op", post_op, POST_OPS)
        if self.weight_bits <= 4:
            self.register_buffer("weight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        if not act_spec.dynamic:
            self.register_buffer("input_scale", torch.ones(()))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))
        self._init_output(output_spec, out_features)
        self.post_op = "none"
        self.set_post_op(post_op)  # (the runtime form is built by the first call: IntegerModule.pack)

    def set_post_op(self, post_op: str) -> Int8Linear:
        """Fuse the activation ``post_op`` (``"none"`` to unfuse) into this layer's output. Only
        for a float output: a layer with an output quantizer keeps its activations separate."""
        check_post_op(post_op, type(self).__name__)
        if post_op != "none" and self.output_spec is not None:
            raise ValueError(f"{type(self).__name__}: cannot fuse {post_op!r} after an output quantizer "
                             f"({self.output_spec}); the activation would run after quantization")
        self.post_op = post_op
        self.forget_settled()  # settled calls carry the activation (the packed weight does not)
        return self

    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        reason = _common_reason(sim)
        if reason:
            return reason
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
    def from_simulated(cls, sim: Any) -> Int8Linear:
        cls.check_lowerable(sim)
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
        return mod.to(sim.weight.device)  # (`_apply`: pack)

    _RUNTIME = ("_packed", "_homed", "_gemm_unpackable", "_w8", "_w_sum")

    def config(self) -> dict[str, Any]:
        return self._linear_config(act_spec=self.act_spec.to_dict(), weight_bits=self.weight_bits,
                                   post_op=self.post_op)

    def pack(self) -> None:
        # the int8 weight buffer itself is re-homed at once (same values, one copy in memory): a
        # holder of a tied weight re-points its buffer at the re-homed tensor after this
        w = self.weight
        if self.weight_bits > 4 and w.data_ptr() != self.__dict__.get("_homed"):
            self._buffers["weight"] = streaming_copy(w.contiguous())
            self._homed = self._buffers["weight"].data_ptr()
        super().pack()

    @property
    def weight_code_max(self) -> int:
        """The largest |weight code|: within ±64 (7-bit weights) oneDNN's u8×s8 sums are exact even
        without VNNI, so ``impl="auto"`` packs for and runs oneDNN there (`onednn_auto_pack`)."""
        if self._stale:
            self.ensure_packed()
        return weight_code_max(self._w8)  # (remembered on the tensor)

    def build_packed(self) -> None:
        w = self.weight
        self._w8 = streaming_copy(unpack_bits(w, 4, True, self.in_features)) if self.weight_bits <= 4 else w
        self._w_sum = weight_sum(self._w8)
        if self.impl == "onednn":
            self._packed = onednn_prepack(self._w8)
        else:  # (gemm_pack: _packed_for)
            # 7-bit weights on AVX2 without VNNI: the exact avx2_gemm (the reference's bits), else oneDNN
            self._packed = avx2_auto_pack(self._w8) if self.impl in ("auto", "avx2_gemm") else None
            per_tensor = self.act_spec.granularity is Granularity.PER_TENSOR  # (oneDNN takes one activation scale)
            if self._packed is None and self.impl == "auto" and per_tensor:
                self._packed = onednn_auto_pack(self._w8)
        onednn = self._packed is not None and self._packed.is_mkldnn
        self._gemm_unpackable = False
        # uint8 asymmetric codes are computed shifted to signed (code - 128, zero point - 128):
        # the same grid and sums, but float -> int8 is ~5x cheaper than float -> uint8 on CPU and
        # torch._int_mm then needs no shift (onednn, which wants uint8, keeps the unsigned codes)
        spec = self.act_spec
        shifted = spec.bits == 8 and not spec.signed and not spec.symmetric and not onednn
        self._codes_spec = cs = spec.replace(signed=True) if shifted else spec
        # quantize_activation's arguments after (x, scale, zero_point), read once here
        self._q_args = (cs.bits, cs.signed, cs.symmetric, cs.narrow_range, cs.granularity is Granularity.PER_TOKEN,
                        cs.rounding.value)
        self._codes_zp = None
        if not spec.dynamic:
            zp = self.input_zero_point
            self._codes_zp = zp - 128 if shifted else zp

    def _packed_for(self, rows: int) -> torch.Tensor | None:
        """``int8_linear``'s ``packed`` argument: onednn's prepacked weight (``impl="onednn"``),
        else, from the first call of more rows than the gemv takes (any call, with
        ``impl="gemm_native"``), the weight packed for ``gemm_native`` (`gemm_pack`: one more
        byte per weight, built only for layers that see such calls; None where that kernel
        cannot run)."""
        if self._packed is None and (self.impl == "gemm_native" or self.impl == "auto" and rows > GEMV_MAX_ROWS) \
                and not self.__dict__.get("_gemm_unpackable", False):
            self._packed = gemm_pack(self._w8)
            self._gemm_unpackable = self._packed is None
        return self._packed

    def _signature(self, x2: torch.Tensor) -> tuple[Any, ...]:
        """What the guards read (the rest is fixed per module): dtype, device, row-major layout,
        row count. With those settled by a first call, a call is one lookup and the kernels."""
        rows = x2.shape[0]
        return (x2.dtype, x2.device, x2.stride() == (self.in_features, 1), rows if rows <= 32 else 33)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        calls = self.binding.calls
        if calls and isinstance(x, torch.Tensor) and x.dim() and x.shape[-1] == self.in_features \
                and not torch.compiler.is_compiling():
            # (a settled signature has passed `_check`: its dtype and device are valid)
            x2 = x.reshape(-1, self.in_features)
            settled = calls.get(self._signature(x2))
            if settled is not None:
                self.kernel_counts[settled[0]] += 1
                return self._finish(settled[1](x2), x)
        x2 = self._check(x)
        if self._stale:
            self.ensure_packed()
        binding, sig = self.binding, self._signature(x2)
        if torch.compiler.is_compiling():
            arguments = binding.compiled.get(sig)
            if isinstance(arguments, SettledGraphCall):  # (oneDNN, or codes linear_packed does not take)
                return self._finish(settled_call(x2, arguments), x)  # the eager call itself, one graph node
            if arguments is not None:  # eager calls settled on the native kernels: the graph calls them too
                return self._finish(torch.ops.quanta_native.linear_packed.default(x2, *arguments), x)
        static = not self.act_spec.dynamic
        s_in, z_in = (self.input_scale, self._codes_zp) if static else (None, None)
        q_impl, checked = "auto", False  # (a preferred int8_linear kernel says nothing about this op)
        if self.impl == "auto":
            q_impl, checked = binding.choose(quantize_activation, sig[:3], x2, s_in, z_in, *self._q_args)
        codes, s, z = quantize_activation(x2, s_in, z_in, *self._q_args, impl=q_impl, checked=checked)
        args = (codes, s, z, self._w8, self.weight_scale, self.bias, self._w_sum, self._packed_for(x2.shape[0]))
        mm_impl, mm_checked = binding.choose(int8_linear, self._run_key(*args), *args, preferred=self.impl)
        y = int8_linear(*args, impl=binding.record(mm_impl), checked=mm_checked)
        compiling = torch.compiler.is_compiling()
        y = apply_post_op(y, self.post_op, native_ran=mm_impl in NATIVE_LINEAR_IMPLS and not compiling)
        if q_impl == "native" and mm_impl in NATIVE_LINEAR_IMPLS and checked and mm_checked and not compiling:
            # settled: later calls of this signature are one lookup and these kernels, eager or compiled
            settled = (mm_impl, self._w8, self.weight_scale, self.bias, self._w_sum, *self._q_args, s_in, z_in)
            binding.settle(sig, mm_impl, native_linear_call(*settled, post_op=self.post_op, packed=args[7]),
                           compiled_linear_args(*settled, post_op=self.post_op, packed=args[7]),
                           fake=_fake_rows(self.out_features))
        elif q_impl == "native" and mm_impl == "avx2_gemm" and checked and mm_checked and not compiling:
            # settled on avx2_gemm (7-bit weights without VNNI): static activations quantized inside the
            # GEMM (the same codes as quantize_static's), dynamic ones by the guarded kernel first chosen
            cs, q_args = self._codes_spec, self._q_args
            rows = None if static else functools.partial(_quantize_dynamic, q_args=q_args)
            binding.settle(sig, mm_impl, avx2_linear_call(args[7], self._w_sum, self.weight_scale, self.bias, s_in,
                                                          z_in, cs.qmin, cs.qmax, rows, self.post_op),
                           fake=_fake_rows(self.out_features))
        elif q_impl == "native" and mm_impl == "onednn" and static and checked and mm_checked and not compiling:
            # settled on oneDNN (7-bit weights without VNNI): later eager calls skip the guards and the
            # per-call argument preparation; the same two library calls, the same post-op
            post = None if self.post_op == "none" else functools.partial(apply_post_op, post_op=self.post_op)
            cs = self._codes_spec
            binding.settle(sig, mm_impl, onednn_linear_call(args[7], self.weight_scale, self.bias, s_in, z_in,
                                                            cs.qmin, cs.qmax, cs.signed, post),
                           fake=_fake_rows(self.out_features))
        return self._finish(y, x)

    def extra_repr(self) -> str:
        act = "static" if not self.act_spec.dynamic else "dynamic"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=int{self.weight_bits} per_channel, act={self.act_spec} ({act}), "
                f"kernel=int8_linear[{self.impl}]{self._output_repr()}"
                + ("" if self.post_op == "none" else f", post_op={self.post_op}"))


def _quantize_dynamic(x: torch.Tensor, q_args: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The native dynamic activation quantization a settled call's first call ran (per tensor / token)."""
    return quantize_activation(x, None, None, *q_args, impl="native", checked=True)


def _fake_rows(n: int):
    """A settled call's output for graphs (`Binding.settle`'s ``fake``): float32 ``[M, n]`` (holds
    no module: the graph-call table must not keep the weights alive)."""
    return lambda x2: x2.new_empty((x2.shape[0], n), dtype=torch.float32)


__all__ = ["Int8Linear"]
