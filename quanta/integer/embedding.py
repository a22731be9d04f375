"""Integer embeddings: ``Int8Embedding`` (one scale per row) and ``Int4Embedding`` (one scale
per group of ``group_size`` along the embedding dim, codes bit-packed two per byte).

Canonical state::

    Int8Embedding: weight int8 [num, dim], weight_scale f32 [num], weight_zero_point int32 [num]
                   (asymmetric only)
    Int4Embedding: weight uint8 [num, ceil(dim / 2)] (`quanta.core.pack_bits`, signed int4),
                   weight_scale f32 [num, dim / group_size], weight_zero_point int8 [num, dim / group_size]
                   (asymmetric only)

A lookup gathers the codes of the looked-up rows and dequantizes only those rows
(`quanta.kernels.embedding`); the values equal the simulated ``QuantEmbedding`` exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import Format, Granularity, Rounding, normalize_axis, pack_bits, quantize
from ..kernels import embedding as K
from ..nn.modules.weighted import QuantEmbedding
from .base import IntegerModule
from .validate import flag, int_at_least, positive_int

__all__ = ["Int4Embedding", "Int8Embedding"]


def _common_problem(sim: Any) -> str | None:
    if not isinstance(sim, QuantEmbedding):
        return f"expects a QuantEmbedding, got {type(sim).__name__}"
    if sim.max_norm is not None:
        return "max_norm renormalizes the table during lookup; not supported"
    wq = sim.weight_quantizer
    if wq is None or not wq.quantizing:
        return "its weight is not quantized (no enabled weight_quantizer)"
    s = wq.spec
    if s.format is not Format.INT or not s.signed:
        return f"the weight must be signed integers, got {s}"
    if s.rounding is Rounding.STOCHASTIC:
        return "stochastic weight rounding cannot be lowered"
    return None


class _IntEmbedding(IntegerModule):
    simulated_type = QuantEmbedding

    def _init_common(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None,
                     symmetric: bool) -> None:
        owner = type(self).__name__
        self.num_embeddings = positive_int(owner, "num_embeddings", num_embeddings)
        self.embedding_dim = positive_int(owner, "embedding_dim", embedding_dim)
        if padding_idx is not None:
            int_at_least(owner, "padding_idx", padding_idx, -num_embeddings)
            if padding_idx >= num_embeddings:
                raise ValueError(f"{owner}: padding_idx must be below num_embeddings {num_embeddings}, "
                                 f"got {padding_idx}")
        self.padding_idx = padding_idx  # kept for the repr / parity; lookups are inference only
        self.symmetric = flag(owner, "symmetric", symmetric)

    def _register_table(self, codes: torch.Tensor, qparam_shape: tuple[int, ...], zp_dtype: torch.dtype) -> None:
        """The canonical buffers: ``weight`` codes, float32 ``weight_scale`` and (asymmetric only)
        ``weight_zero_point`` of ``qparam_shape``."""
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", torch.ones(qparam_shape))
        self.register_buffer("weight_zero_point",
                             None if self.symmetric else torch.zeros(qparam_shape, dtype=zp_dtype))

    def _lookup_check(self, input: Any) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor of indices, got {type(input).__name__}")
        self.check_input(input, (torch.int64, torch.int32))

    def _run(self, op: K.KernelOp, indices: torch.Tensor, *args: Any) -> torch.Tensor:
        """``op(indices, *args)`` through the module's binding (the guards' choice per index dtype and
        device; the table is fixed)."""
        return self.binding.run(op, (indices.dtype, indices.device), indices, *args, preferred=self.impl)


class Int8Embedding(_IntEmbedding):
    """``nn.Embedding`` with an int8 table and one float32 scale per row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 symmetric: bool = True) -> None:
        super().__init__()
        self._init_common(num_embeddings, embedding_dim, padding_idx, symmetric)
        self._register_table(torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8), (num_embeddings,),
                             torch.int32)

    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        problem = _common_problem(sim)
        if problem:
            return problem
        s = sim.weight_quantizer.spec
        if s.bits > 8:
            return f"the weight must have at most 8 bits, got {s.bits}"
        if not (s.granularity is Granularity.PER_TENSOR or s.granularity is Granularity.PER_CHANNEL and s.axis == 0):
            return f"Int8Embedding needs one scale per row (per_channel axis=0) or per tensor, got {s}"
        return None

    @classmethod
    def from_simulated(cls, sim: Any) -> Int8Embedding:
        cls.check_lowerable(sim)
        wq, w = sim.weight_quantizer, sim.weight.detach()
        scale, zp = wq.qparams(w)
        new = cls(sim.num_embeddings, sim.embedding_dim, sim.padding_idx, symmetric=wq.spec.symmetric).to(w.device)
        rows = w.shape[0]
        with torch.no_grad():
            new.weight.copy_(quantize(w, scale, zp, wq.spec).to(torch.int8))
            new.weight_scale.copy_(scale.float().reshape(-1).expand(rows))
            if new.weight_zero_point is not None:
                new.weight_zero_point.copy_(zp.to(torch.int32).reshape(-1).expand(rows))
        return new

    def config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx, "symmetric": self.symmetric}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._lookup_check(input)
        return self._run(K.int8_embedding, input, self.weight, self.weight_scale, self.weight_zero_point)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s + (", int8 per-row" + ("" if self.symmetric else " asymmetric"))


class Int4Embedding(_IntEmbedding):
    """``nn.Embedding`` with a signed int4 table (two codes per byte) and one float32 scale per
    ``group_size`` values of each row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = 32,
                 padding_idx: int | None = None, symmetric: bool = True) -> None:
        super().__init__()
        self._init_common(num_embeddings, embedding_dim, padding_idx, symmetric)
        if positive_int("Int4Embedding", "group_size", group_size) > embedding_dim or embedding_dim % group_size:
            raise ValueError(f"Int4Embedding: group_size {group_size} does not divide embedding_dim {embedding_dim}")
        self.group_size = group_size
        groups = embedding_dim // group_size
        self._register_table(torch.zeros(num_embeddings, (embedding_dim + 1) // 2, dtype=torch.uint8),
                             (num_embeddings, groups), torch.int8)

    @classmethod
    def accepts(cls, sim: Any) -> str | None:
        problem = _common_problem(sim)
        if problem:
            return problem
        s = sim.weight_quantizer.spec
        if s.bits > 4:
            return f"Int4Embedding needs a weight of at most 4 bits, got {s.bits}"
        per_group = s.granularity is Granularity.PER_GROUP and normalize_axis(s.group_axis, 2) == 1
        per_row = s.granularity is Granularity.PER_CHANNEL and s.axis == 0
        if not (per_group or per_row or s.granularity is Granularity.PER_TENSOR):
            return f"Int4Embedding needs groups along the embedding dim (group_axis=1), per row, or per tensor; got {s}"
        return None

    @classmethod
    def from_simulated(cls, sim: Any) -> Int4Embedding:
        cls.check_lowerable(sim)
        wq, w = sim.weight_quantizer, sim.weight.detach()
        s = wq.spec
        scale, zp = wq.qparams(w)
        rows, dim = w.shape
        g = s.group_size if s.granularity is Granularity.PER_GROUP else dim
        new = cls(rows, dim, g, sim.padding_idx, symmetric=s.symmetric).to(w.device)
        groups = dim // g
        with torch.no_grad():
            new.weight.copy_(pack_bits(quantize(w, scale, zp, s), 4, signed=True))
            new.weight_scale.copy_(scale.float().reshape(-1, 1).expand(rows, groups) if scale.numel() in (1, rows)
                                   and groups * rows != scale.numel() else scale.float().reshape(rows, groups))
            if new.weight_zero_point is not None:
                z = zp.to(torch.int8)
                new.weight_zero_point.copy_(z.reshape(-1, 1).expand(rows, groups) if z.numel() != rows * groups
                                            else z.reshape(rows, groups))
        return new

    def config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "group_size": self.group_size, "padding_idx": self.padding_idx, "symmetric": self.symmetric}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._lookup_check(input)
        return self._run(K.int4_embedding, input, self.weight, self.weight_scale, self.weight_zero_point,
                         self.embedding_dim)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s + (", int4" + ("" if self.symmetric else " asymmetric"))
