"""Bit packing of sub-byte integer codes into uint8 storage.

Codes are packed along the last axis, first element in the lowest bits of each byte
(the order ONNX uses for int4). Signed codes are stored in two's complement (int4 -1 -> 0xF);
1-bit signed (binary) codes {-1, +1} are stored as {0, 1}. A last axis whose length is not a
multiple of ``8 // bits`` is zero-padded; pass the original length to `unpack_bits`.
"""

from __future__ import annotations

import torch

from .spec import qrange

_PACKABLE = (1, 2, 4)


def _check_bits(bits: int) -> None:
    if bits not in _PACKABLE:
        raise ValueError(f"packing supports bits in {_PACKABLE}, got {bits}")


def pack_bits(q: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Pack integer codes of width ``bits`` into ``uint8`` along the last axis."""
    _check_bits(bits)
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"pack_bits expects an integer tensor, got {q.dtype}")
    if q.dim() == 0:
        raise ValueError("pack_bits needs a tensor with at least one dimension")
    qmin, qmax = qrange(bits, signed)
    qi = q.to(torch.int32)
    if bits == 1 and signed:
        if bool(((qi != -1) & (qi != 1)).any()):
            raise ValueError("1-bit signed (binary) codes must be -1 or +1")
        codes = (qi > 0).to(torch.int32)
    else:
        if q.numel() and (int(qi.min()) < qmin or int(qi.max()) > qmax):
            raise ValueError(
                f"codes out of the {'signed' if signed else 'unsigned'} {bits}-bit range "
                f"[{qmin}, {qmax}]: found [{int(qi.min())}, {int(qi.max())}]"
            )
        codes = qi & ((1 << bits) - 1)
    per = 8 // bits
    n = q.shape[-1]
    pad = (-n) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    return (codes << shifts).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, signed: bool = True, length: int | None = None) -> torch.Tensor:
    """Inverse of `pack_bits`: int8 codes (int16 never needed) of the last-axis ``length``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8 storage, got {packed.dtype}")
    per = 8 // bits
    full = packed.shape[-1] * per
    length = full if length is None else length
    if not full - per < length <= full:
        raise ValueError(f"length {length} does not match {packed.shape[-1]} packed bytes of {bits}-bit codes")
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*packed.shape[:-1], full)[..., :length]
    if signed:
        if bits == 1:
            codes = codes * 2 - 1
        else:
            codes = torch.where(codes >= (1 << (bits - 1)), codes - (1 << bits), codes)
    return codes.to(torch.int8 if signed else torch.uint8)
