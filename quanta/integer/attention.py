"""``Int8MultiheadAttention``: `nn.MultiheadAttention` with its in- and out-projections on the
integer Linear kernels.

Lowered from a calibrated `QuantMultiheadAttention` used as self-attention (``nn.Transformer*``
layers call ``self_attn(x, x, x)``: its key/value input quantizers saw no data)::

    m = Int8MultiheadAttention.from_simulated(sim_mha)
    out, weights = m(x, x, x, key_padding_mask=mask, need_weights=False)

``in_proj`` is one `Int8Linear` ``[E → 3E]`` (the packed q/k/v weight, one scale per row, on the
attention's input grid), ``out_proj`` an `Int8Linear` ``[E → E]``; between them the attention
runs in float exactly as the simulation does (the same `mha_forward`, the simulated
``qk_matmul`` / ``av_matmul`` quantizers applied where enabled), so masks, ``batch_first``,
unbatched inputs and ``need_weights`` behave as torch's. Cross-attention (``key is not query``)
runs when the in-projection's input grid is dynamic (each input is quantized on its own at each
call, as the simulation's key / value quantizers of the same spec do; see `packed_projection`);
with a static grid it is refused with a clear error: the in-projection was calibrated on the
query only.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core import Format, Granularity, Rounding
from ..nn.descriptor import QuantDescriptor
from ..nn.modules.attention import QuantMultiheadAttention, mha_forward
from ..nn.modules.functional import QuantMatMul
from ..nn.modules.weighted import QuantLinear
from ..nn.tensor_quantizer import TensorQuantizer
from .base import IntegerModule
from .linear import Int8Linear


def _in_proj_view(sim: QuantMultiheadAttention) -> QuantLinear:
    """The packed in-projection as a simulated Linear ``[E → 3E]`` sharing ``sim``'s weight,
    bias and input / weight quantizers (what `Int8Linear` lowers)."""
    lin = nn.Linear(sim.embed_dim, 3 * sim.embed_dim, bias=sim.in_proj_bias is not None,
                    device=sim.in_proj_weight.device, dtype=sim.in_proj_weight.dtype)
    lin.weight = sim.in_proj_weight
    if sim.in_proj_bias is not None:
        lin.bias = sim.in_proj_bias
    view = QuantLinear.from_float(lin, sim.quant_config)
    view.input_quantizer, view.weight_quantizer, view.output_quantizer = (
        sim.input_quantizer, sim.weight_quantizer, None)
    return view


class FrozenFakeQuant:
    """A calibrated static per-tensor integer `TensorQuantizer`'s fake quantization of float32
    tensors as five in-place tensor ops: ``round(x · (1/s)) + z``, clamped, ``- z``, ``· s`` —
    the operations `quanta.core.fake_quantize` performs for that spec (the same float32 values,
    bit for bit), without its per-call validation, layout and autograd machinery (~50 µs a call,
    four calls per attention). Anything else (another mode, dtype, an input needing gradients,
    a quantizer not of that kind) is handed to the quantizer itself."""

    def __init__(self, quantizer: TensorQuantizer) -> None:
        self.quantizer = quantizer
        spec = quantizer.spec
        self.eligible = (spec.format is Format.INT and spec.granularity is Granularity.PER_TENSOR and spec.bits > 1
                         and not spec.dynamic and spec.rounding is Rounding.HALF_EVEN and quantizer.desc.fake_quant
                         and not quantizer.track_tensor)
        self.qmin, self.qmax = (spec.qmin, spec.qmax) if spec.format is Format.INT else (0, 0)
        self._key: Any = None

    def _params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(1/s, z, s)`` as float32 0-d tensors, computed as `fake_quantize` computes them."""
        q = self.quantizer
        s, zp = q.qparams()
        if self._key is None or self._key[0] is not s or self._key[1] is not zp:
            sf = s.float().reshape(())
            self._key = (s, zp, 1.0 / sf, torch.round(zp.float()).reshape(()), sf)
        return self._key[2], self._key[3], self._key[4]

    def fast(self, x: torch.Tensor) -> bool:
        """Whether ``x`` takes the frozen ops (else the quantizer runs, or, disabled, passes it)."""
        q = self.quantizer
        return (self.eligible and q.mode == "quantize" and q.amax is not None
                and not isinstance(q.amax, nn.Parameter) and x.dtype == torch.float32
                and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast(x):
            return self.quantizer(x) if self.quantizer.is_enabled else x
        inv, z, s = self._params()
        return torch.mul(x, inv).round_().add_(z).clamp_(self.qmin, self.qmax).sub_(z).mul_(s)


class FrozenAttentionQuant:
    """The four operand quantizers of an attention's two matmuls as `FrozenFakeQuant`: per
    operand (`matmuls`), or, where q, k and v all take the frozen ops, q / k / v fake-quantized in
    one pass over the packed in-projection's ``[..., 3E]`` output (`qkv`: the same element-wise
    float32 ops with each third's scale, zero point and clamp bounds broadcast along the last
    dim — the same bits as three passes over the split, reshaped operands, in five ops instead of
    fifteen)."""

    def __init__(self, qk: QuantMatMul, av: QuantMatMul, embed_dim: int) -> None:
        self.q, self.k, self.p, self.v = (None if t is None else FrozenFakeQuant(t) for t in (
            qk.input_quantizer, qk.other_quantizer, av.input_quantizer, av.other_quantizer))
        self.embed_dim = embed_dim
        self.matmuls = (_frozen_matmul(self.q, self.k), _frozen_matmul(self.p, self.v))
        #: the matmuls after `qkv`: q, k, v are on their grids already
        self.matmuls_after_qkv = (torch.matmul, _frozen_matmul(self.p, None))
        self._key: Any = None

    def fused(self, x: torch.Tensor) -> bool:
        """Whether the in-projection output of ``x`` (float32 like it) takes `qkv`."""
        return all(f is not None and f.fast(x) for f in (self.q, self.k, self.v))

    def qkv(self, y: torch.Tensor) -> torch.Tensor:
        params = [f._params() for f in (self.q, self.k, self.v)]
        if self._key is None or any(a is not b for a, b in zip(self._key[0], (p[0] for p in params))):
            e = self.embed_dim

            def row(values: list[Any]) -> torch.Tensor:
                return torch.cat([torch.as_tensor(v, dtype=torch.float32).reshape(1).expand(e) for v in values])
            lo = row([f.qmin for f in (self.q, self.k, self.v)])
            hi = row([f.qmax for f in (self.q, self.k, self.v)])
            self._key = ([p[0] for p in params], row([p[0] for p in params]), row([p[1] for p in params]), lo, hi,
                         row([p[2] for p in params]))
        _, inv, z, lo, hi, s = self._key
        return torch.mul(y, inv).round_().add_(z).clamp_(lo, hi).sub_(z).mul_(s)


def _frozen_matmul(qa: FrozenFakeQuant | None, qb: FrozenFakeQuant | None
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``matmul(quant(a), quant(b))`` (a `QuantMatMul`'s forward) with `FrozenFakeQuant` quantizers."""

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a if qa is None else qa(a), b if qb is None else qb(b))
    return matmul


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def packed_projection(in_proj: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, same_k: bool,
                      same_v: bool, per_call_grid: bool, owner: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)`` from the packed ``[E → 3E]`` in-projection (an integer Linear or its ONNX
    export form). Self-attention (``key`` is ``query``, ``value`` is ``key``, or equal to them):
    one call, split in three.
    Otherwise only when ``per_call_grid`` (the projection's input range is taken per call or per
    token): a distinct key / value input then goes through the projection on its own and its
    part of the result is kept, which is what the simulation computes (its key / value
    quantizers have the projection's input spec); it costs a full projection per distinct input."""
    # equal values count as the same input (a caller that copies its arguments, e.g. the speed
    # check replaying recorded calls): the projection depends on the values only
    same_k = same_k or _same_values(key, query)
    same_v = same_v or _same_values(value, key)
    q, k, v = in_proj(query).chunk(3, dim=-1)
    if same_k and same_v:
        return q, k, v
    if not per_call_grid:
        raise ValueError(f"{owner} was lowered from self-attention with a calibrated (static) input grid: call it "
                         "with key and value being the query tensor itself (m(x, x, x))")
    if not same_k:
        _, k, v = in_proj(key).chunk(3, dim=-1)
    if not same_v:
        v = in_proj(value).chunk(3, dim=-1)[2]
    return q, k, v


class Int8MultiheadAttention(IntegerModule):
    """Self-attention with integer in/out projections (see the module docstring)."""

    output_quantizer = None  # (mha_forward reads it; a class attribute, not Module.__getattr__'s slow miss)

    simulated_type = QuantMultiheadAttention
    _RUNTIME = ("_frozen",)  # (closures over this module's quantizers: a copy builds its own)

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = False, *,
                 matmul_descs: Sequence[dict[str, Any] | QuantDescriptor | None] = (None,) * 4,
                 in_proj: Int8Linear | None = None, out_proj: Int8Linear | None = None,
                 qk_matmul: QuantMatMul | None = None, av_matmul: QuantMatMul | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, v in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")
        if embed_dim % num_heads:
            raise ValueError(f"{name}: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.batch_first = bool(batch_first)
        self.in_proj = in_proj if in_proj is not None else Int8Linear(embed_dim, 3 * embed_dim, bias)
        self.out_proj = out_proj if out_proj is not None else Int8Linear(embed_dim, embed_dim, bias)
        if not isinstance(matmul_descs, (tuple, list)) or len(matmul_descs) != 4:
            raise ValueError(f"{name}: matmul_descs must be 4 descriptors (q, k, probabilities, v) or None")
        qk_in, qk_other, av_in, av_other = (QuantDescriptor.from_dict(d) if isinstance(d, dict) else d
                                            for d in matmul_descs)
        # (the simulated attention matmuls' quantizers: applied in float, as the simulation does)
        self.qk_matmul = qk_matmul if qk_matmul is not None else QuantMatMul(qk_in, qk_other)
        self.av_matmul = av_matmul if av_matmul is not None else QuantMatMul(av_in, av_other)
        # what mha_forward reads besides the children (eval-time attention: no dropout)
        self.bias_k = self.bias_v = None
        self.add_zero_attn, self.dropout = False, 0.0

    @classmethod
    def accepts(cls, sim: nn.Module) -> str | None:
        if not isinstance(sim, QuantMultiheadAttention):
            return f"{type(sim).__name__} is not a QuantMultiheadAttention"
        if not sim._qkv_same_embed_dim:
            return "separate q/k/v projection weights (kdim / vdim differ from embed_dim)"
        if sim.bias_k is not None or sim.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported by the integer attention"
        if sim.training and sim.dropout > 0:
            return "attention dropout in training mode"
        iq = sim.input_quantizer
        for kind in ("key_input", "value_input"):
            q = getattr(sim, f"{kind}_quantizer", None)
            if q is None or not q.is_enabled:
                continue
            if q.spec.dynamic:  # cross-attention runs through the in-projection (packed_projection)
                if iq is None or q.spec != iq.spec:
                    return f"its {kind} grid differs from its input grid (the packed in-projection has one)"
            elif not q.needs_calibration:
                return "used as cross-attention (its key/value inputs were calibrated): only self-attention lowers"
        reason = Int8Linear.accepts(_in_proj_view(sim))
        if reason:
            return f"in_proj: {reason}"
        if not isinstance(sim.out_proj, QuantLinear):
            return "its out_proj is not quantized"
        reason = Int8Linear.accepts(sim.out_proj)
        return f"out_proj: {reason}" if reason else None

    @classmethod
    def from_simulated(cls, sim: nn.Module) -> Int8MultiheadAttention:
        cls.check_lowerable(sim)
        mod = cls(sim.embed_dim, sim.num_heads, sim.in_proj_bias is not None, sim.batch_first,
                  in_proj=Int8Linear.from_simulated(_in_proj_view(sim)),
                  out_proj=Int8Linear.from_simulated(sim.out_proj),
                  qk_matmul=copy.deepcopy(sim.qk_matmul), av_matmul=copy.deepcopy(sim.av_matmul))
        mod.train(sim.training)
        return mod

    def config(self) -> dict[str, Any]:
        """The constructor's arguments; the children (``in_proj``, ``out_proj``, the matmul
        quantizers) are saved and rebuilt by their own records."""
        descs = [None if q is None else q.desc.to_dict() for m in (self.qk_matmul, self.av_matmul)
                 for q in (m.input_quantizer, m.other_quantizer)]
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads, "bias": self.in_proj.bias is not None,
                "batch_first": self.batch_first, "matmul_descs": descs}

    def pack(self) -> None:
        for child in (self.in_proj, self.out_proj):
            child.impl = self.impl
            child.pack()
        self._frozen = FrozenAttentionQuant(self.qk_matmul, self.av_matmul, self.embed_dim)
        super().pack()

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, same_k: bool,
                 same_v: bool, fake_quant: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v)``; with ``fake_quant``, each projection output ``[..., 3E]`` goes through it
        (`FrozenAttentionQuant.qkv`)."""
        proj = self.in_proj if fake_quant is None else (lambda t: fake_quant(self.in_proj(t)))
        return packed_projection(proj, query, key, value, same_k, same_v, self.in_proj.act_spec.dynamic,
                                 type(self).__name__)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(query, torch.Tensor) or query.dim() not in (2, 3) or query.shape[-1] != self.embed_dim:
            got = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
            raise ValueError(f"{type(self).__name__} expects [L, E] or a batched [*, *, E] input with E="
                             f"{self.embed_dim}, got {got}")
        frozen = self.__dict__.get("_frozen")
        if frozen is None:
            self._frozen = frozen = FrozenAttentionQuant(self.qk_matmul, self.av_matmul, self.embed_dim)
        if frozen.fused(query):  # q, k, v fake-quantized in one pass over the in-projection's output
            return mha_forward(self, functools.partial(self._project, fake_quant=frozen.qkv), query, key, value,
                               key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
                               frozen.matmuls_after_qkv)
        return mha_forward(self, self._project, query, key, value, key_padding_mask, need_weights, attn_mask,
                           average_attn_weights, is_causal, frozen.matmuls)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


__all__ = ["Int8MultiheadAttention", "packed_projection"]
