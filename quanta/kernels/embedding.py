"""Quantized embedding lookups: gather the looked-up rows' codes, dequantize only those rows.

Ops (``torch.ops.quanta.*``; the last argument is ``impl``)::

    int8_embedding(Tensor indices, Tensor codes, Tensor scale, Tensor? zero_point, str impl) -> Tensor
        codes int8 [num, dim]; scale f32 [num] (one per row); zero_point int32 [num] or None
        (symmetric); out[..., :] = (codes[i] - zp[i]) * scale[i], shape [*indices.shape, dim].
    int4_embedding(Tensor indices, Tensor packed, Tensor scale, Tensor? zero_point, int dim, str impl) -> Tensor
        packed uint8 [num, ceil(dim / 2)]: signed int4 codes bit-packed two per byte (`quanta.core.pack_bits`,
        first code in the low nibble); scale f32 [num, dim / group]; zero_point int8 [num, dim / group]
        or None; each code is dequantized with its group's scale: (q - zp) * scale.

The reference is the implementation: it computes exactly the simulation's values
(``level * scale`` in float32, like `quanta.core.dequantize`). torch's
``quantized::embedding_byte`` / ``embedding_4bit`` store uint8 codes with a float scale and bias
per row and compute ``u * scale + bias``, which rounds differently from ``(q - zp) * scale``
(not bit-exact), so they are not used.
"""

from __future__ import annotations

import torch

from ..core import unpack_bits
from .library import KernelOp


def _check_indices(indices: torch.Tensor, num: int) -> None:
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"embedding indices must be int64 or int32, got {indices.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num):
        raise IndexError(f"embedding index out of range [0, {num}): found [{int(indices.min())}, "
                         f"{int(indices.max())}]")


def int8_embedding_reference(indices: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                             zero_point: torch.Tensor | None) -> torch.Tensor:
    _check_indices(indices, codes.shape[0])
    flat = indices.reshape(-1)
    level = codes.index_select(0, flat).float()
    if zero_point is not None:
        level = level - zero_point.index_select(0, flat).float().unsqueeze(-1)
    out = level * scale.index_select(0, flat).unsqueeze(-1)
    return out.reshape(*indices.shape, codes.shape[1])


def int4_embedding_reference(indices: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                             zero_point: torch.Tensor | None, dim: int) -> torch.Tensor:
    _check_indices(indices, packed.shape[0])
    flat = indices.reshape(-1)
    groups = scale.shape[1]
    if dim % groups:
        raise ValueError(f"{groups} groups do not divide the embedding dim {dim}")
    q = unpack_bits(packed.index_select(0, flat), 4, signed=True, length=dim).float()
    q = q.reshape(flat.numel(), groups, dim // groups)
    if zero_point is not None:
        q = q - zero_point.index_select(0, flat).float().unsqueeze(-1)
    out = q * scale.index_select(0, flat).unsqueeze(-1)
    return out.reshape(*indices.shape, dim)


def _fake8(indices, codes, scale, zero_point):
    return codes.new_empty(*indices.shape, codes.shape[1], dtype=torch.float32)


def _fake4(indices, packed, scale, zero_point, dim):
    return packed.new_empty(*indices.shape, dim, dtype=torch.float32)


int8_embedding = KernelOp(
    "int8_embedding", "(Tensor indices, Tensor codes, Tensor scale, Tensor? zero_point, str impl) -> Tensor",
    int8_embedding_reference, fake=_fake8)

int4_embedding = KernelOp(
    "int4_embedding",
    "(Tensor indices, Tensor packed, Tensor scale, Tensor? zero_point, int dim, str impl) -> Tensor",
    int4_embedding_reference, fake=_fake4)
