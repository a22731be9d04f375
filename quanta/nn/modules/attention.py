"""Quantized multi-head attention and transformer encoder layer, quantized end to end.

`QuantMultiheadAttention` quantizes the q/k/v projection inputs and weights, both attention
matmuls (``Q·Kᵀ`` through ``qk_matmul``, ``softmax·V`` through ``av_matmul``; probabilities
on an unsigned grid) and the output projection (``out_proj`` is swapped like any Linear).
With every quantizer off, both classes call torch's own forward, so outputs equal float exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..tensor_quantizer import TensorQuantizer
from .base import LayerQuantConfig, QuantModule
from .functional import QuantAdd, QuantMatMul


def _active(module: nn.Module) -> bool:
    """True when torch's own (possibly fused) forward would not compute what this module
    should: a quantizer inside is active, or a child was lowered to an integer module
    (``is_integer_module``; torch's fast path would read float weights it does not have)."""
    return any((isinstance(m, TensorQuantizer) and m.active)
               or getattr(m, "is_integer_module", False) for m in module.modules())


class QuantMultiheadAttention(QuantModule, nn.MultiheadAttention):
    float_type = nn.MultiheadAttention

    @property
    def weight_names(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._qkv_same_embed_dim:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")

    def init_quantizers(self, config: LayerQuantConfig) -> None:
        super().init_quantizers(config)
        act = config.input
        self.key_input_quantizer = None if act is None else TensorQuantizer(act)
        self.value_input_quantizer = None if act is None else TensorQuantizer(act)
        probs = None if act is None else act.replace(unsigned=True, symmetric=True)
        self.qk_matmul = QuantMatMul(act, act)
        self.av_matmul = QuantMatMul(probs, act)

    def quantizers(self):
        yield from super().quantizers()
        for kind in ("key_input", "value_input"):
            q = getattr(self, f"{kind}_quantizer", None)
            if q is not None:
                yield kind, q

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not _active(self):
            return nn.MultiheadAttention.forward(
                self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        return mha_forward(self, self._project, query, key, value, key_padding_mask, need_weights, attn_mask,
                           average_attn_weights, is_causal)

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, same_k: bool,
                 same_v: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v)`` in-projections of the (sequence-first) inputs, quantized."""
        xq = query if self.input_quantizer is None else self.input_quantizer(query)
        xk = xq if same_k else (key if self.key_input_quantizer is None else self.key_input_quantizer(key))
        xv = xk if same_v else (value if self.value_input_quantizer is None else self.value_input_quantizer(value))
        fq = self.fake_quantized_weights()  # never written to the module: concurrent calls stay safe
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = fq.get("in_proj_weight", self.in_proj_weight).chunk(3)
        else:
            w_q, w_k, w_v = (fq.get(n, getattr(self, n)) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return F.linear(xq, w_q, b_q), F.linear(xk, w_k, b_k), F.linear(xv, w_v, b_v)


Projection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, bool],
                      tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
MatMul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mha_forward(mod: Any, project: Projection, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None, need_weights: bool, attn_mask: torch.Tensor | None,
                average_attn_weights: bool, is_causal: bool,
                matmuls: tuple[MatMul, MatMul] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`nn.MultiheadAttention`'s forward with the in-projection done by ``project(query, key,
    value, key_is_query, value_is_key)`` (simulated or integer) and the attention matmuls by
    ``mod.qk_matmul`` / ``mod.av_matmul`` (or ``matmuls``, two callables computing what they
    compute); ``mod.out_proj`` then ``mod.output_quantizer`` (if any). Shared by
    `QuantMultiheadAttention` and the integer `Int8MultiheadAttention`."""
    self = mod
    qk_matmul, av_matmul = (self.qk_matmul, self.av_matmul) if matmuls is None else matmuls
    same_k, same_v = key is query, value is key
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif self.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    tgt_len, bsz, embed = query.shape
    heads, hd = self.num_heads, self.head_dim

    q, k, v = project(query, key, value, same_k, same_v)

    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                  other_name="", target_type=q.dtype, check_other=False)
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=None, other_name="", target_type=q.dtype)
    if is_causal and attn_mask is None:
        src = key.shape[0] + (1 if self.bias_k is not None else 0) + (1 if self.add_zero_attn else 0)
        attn_mask = torch.triu(torch.full((tgt_len, src), float("-inf"), device=q.device), 1)
    if self.bias_k is not None and self.bias_v is not None:
        k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q = q.reshape(tgt_len, bsz * heads, hd).transpose(0, 1)
    k = k.reshape(k.shape[0], bsz * heads, hd).transpose(0, 1)
    v = v.reshape(v.shape[0], bsz * heads, hd).transpose(0, 1)
    if self.add_zero_attn:
        k = torch.cat([k, k.new_zeros(bsz * heads, 1, hd)], dim=1)
        v = torch.cat([v, v.new_zeros(bsz * heads, 1, hd)], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    src_len = k.shape[1]

    scores = qk_matmul(q, k.transpose(1, 2)) * (1.0 / math.sqrt(hd))
    if attn_mask is not None:
        scores = scores + (attn_mask.unsqueeze(0) if attn_mask.dim() == 2 else attn_mask)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
        scores = scores + kpm.reshape(bsz * heads, 1, src_len)
    probs = torch.softmax(scores, dim=-1)
    if self.training and self.dropout > 0:
        probs = F.dropout(probs, p=self.dropout)
    out = av_matmul(probs, v)
    out = out.transpose(0, 1).reshape(tgt_len * bsz, embed)
    out = self.out_proj(out).view(tgt_len, bsz, embed)
    if getattr(self, "output_quantizer", None) is not None:
        out = self.output_quantizer(out)
    weights: torch.Tensor | None = None
    if need_weights:
        weights = probs.view(bsz, heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    if not batched:
        out = out.squeeze(1)
    elif self.batch_first:
        out = out.transpose(0, 1)
    return out, weights


class QuantTransformerEncoderLayer(QuantModule, nn.TransformerEncoderLayer):
    """Encoder layer whose residual additions are quantized (``sa_add``, ``ff_add``).

    It also keeps torch's fused inference fast path (which would bypass every quantizer) out
    of the way while any quantizer inside is active.
    """

    float_type = nn.TransformerEncoderLayer
    weight_names = ()
    quantize_input = False

    def init_quantizers(self, config: LayerQuantConfig) -> None:
        super().init_quantizers(dataclasses.replace(config, weight=None))
        self.sa_add = QuantAdd(config.input)
        self.ff_add = QuantAdd(config.input)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> Any:
        if not _active(self):
            return nn.TransformerEncoderLayer.forward(self, src, src_mask, src_key_padding_mask, is_causal)
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=F._none_or_dtype(src_mask),
            other_name="src_mask", target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = self.sa_add(x, self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.ff_add(x, self._ff_block(self.norm2(x)))
        else:
            x = self.norm1(self.sa_add(x, self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal)))
            x = self.norm2(self.ff_add(x, self._ff_block(x)))
        if self.output_quantizer is not None:
            x = self.output_quantizer(x)
        return x
