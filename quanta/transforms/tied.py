"""Tied weights stay tied through `prepare` and `convert`.

A language model often ties its output layer to its token embedding (GPT-2's ``lm_head.weight``
*is* ``transformer.wte.weight``). Quantizing the Linear alone would store the table twice: float
in the embedding, int8 codes in the Linear. Where the Linear's weight is int8 with one scale per
row, `prepare` gives the tied float ``nn.Embedding`` the same weight quantizer
(`quantize_tied_tables`: the simulation computes what the integer model will), and after
lowering `retie` makes the ``Int8Embedding`` and the integer Linear hold *the same* code and
scale tensors: one table in memory and in the file, both layers computing with the same
quantized weight as they computed with the same float one. Where the codes cannot be shared
(int4 groups, an embedding excluded by name, a layer the speed check kept float), the report
says the tie is broken and the table is stored twice.

    quantize_tied_tables(sim, decisions)   # in prepare, after the module swap
    groups = tied_groups(model)            # in convert, before lowering: [("transformer.wte", "lm_head")]
    report += retie(model, groups)         # after lowering and the speed check
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core import Format, Granularity, Rounding
from ..integer.base import IntegerModule
from ..nn.modules.base import QuantModule

__all__ = ["quantize_tied_tables", "retie", "shared_int8_rows", "tied_groups"]


def tied_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Names of the modules that hold one ``weight`` Parameter together (two or more each)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight")
        if isinstance(w, nn.Parameter) and name not in holders.setdefault(id(w), []):
            holders[id(w)].append(name)
    return [tuple(names) for names in holders.values() if len(names) > 1]


def shared_int8_rows(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(codes int8 [N, D], scale f32 [N])`` of an integer module whose weight an
    ``Int8Embedding`` can read as it is (symmetric int8, one scale per row), else None."""
    if not isinstance(module, IntegerModule):
        return None
    w, s = module._buffers.get("weight"), module._buffers.get("weight_scale")
    if w is None or s is None or w.dtype != torch.int8 or w.dim() != 2 or s.shape != (w.shape[0],):
        return None
    if module._buffers.get("weight_zero_point") is not None or getattr(module, "weight_bits", 8) != 8:
        return None
    return w, s


def quantize_tied_tables(model: nn.Module, decisions: dict[str, str]) -> None:
    """In a prepared model: a float ``nn.Embedding`` tied to a quantized layer whose weight is
    int8 with one scale per row (or per tensor) gets that layer's weight quantizer
    (`QuantEmbedding`), so the simulation computes what the integer model will: one quantized
    table for both. An embedding the user excluded by name stays float (`retie` then reports the
    broken tie)."""
    from ..nn.modules.weighted import QuantEmbedding
    from .config import LayerQuantConfig

    for names in tied_groups(model):
        mods = {n: _get(model, n) for n in names}
        source = next((n for n, m in mods.items() if isinstance(m, QuantModule) and _row_int8(m)), None)
        if source is None:
            continue
        for name, module in mods.items():
            if type(module) is not nn.Embedding or module.max_norm is not None \
                    or not decisions.get(name, "type:").startswith("type:"):
                continue
            cfg = LayerQuantConfig(input=None, weight=mods[source].quant_config.weight, output=None)
            _set(model, name, QuantEmbedding.from_float(module, cfg))
            decisions[name] = f"tied to {source}: quantized with its weight quantizer"


def _row_int8(module: nn.Module) -> bool:
    wq = getattr(module, "weight_quantizer", None)
    if wq is None or not wq.is_enabled or module._parameters.get("weight") is None:
        return False
    s = wq.spec
    rows = s.granularity is Granularity.PER_TENSOR or (s.granularity is Granularity.PER_CHANNEL and s.axis == 0)
    return s.format is Format.INT and s.signed and s.symmetric and s.bits <= 8 and rows \
        and s.rounding is not Rounding.STOCHASTIC and module.weight.dim() == 2


def retie(model: nn.Module, groups: list[tuple[str, ...]]) -> list[Any]:
    """After lowering: integer modules of one tied group hold one code and one scale tensor
    where their codes are equal (what `quantize_tied_tables` arranges); returns report entries
    (`convert.Lowering`) for ties that had to be broken."""
    from .convert import Lowering  # (convert imports this module)

    entries: list[Any] = []
    for names in groups:
        modules = {n: _get(model, n) for n in names}
        if any(m is None for m in modules.values()) or not any(isinstance(m, IntegerModule) for m in modules.values()):
            continue  # (a name no longer there, lowered into a container's place; or all float: one Parameter)
        rows = {n: r for n, m in modules.items() if (r := shared_int8_rows(m)) is not None}
        first = next(iter(rows), None)
        sharing = [modules[n] for n, r in rows.items()
                   if torch.equal(r[0], rows[first][0]) and torch.equal(r[1], rows[first][1])]
        if len(sharing) > 1:
            _share(sharing, *rows[first])
        else:
            sharing = []
        for name, module in modules.items():
            if module not in sharing:
                others = ", ".join(n for n in names if n != name)
                entries.append(Lowering(name, type(module).__name__, type(module).__name__,
                                        f"weight tied to {others}, whose quantized weight it cannot share: the tie "
                                        "is broken and the table is stored twice"))
    return entries


def _share(holders: list[nn.Module], codes: torch.Tensor, scale: torch.Tensor) -> None:
    """One code and one scale tensor for all ``holders``; a holder's pack() may re-home the codes
    (huge pages), and then all hold the re-homed tensor."""
    for m in holders:
        m._buffers["weight"], m._buffers["weight_scale"] = codes, scale
    for m in holders:
        m.pack()
        if m._buffers["weight"] is not codes:
            codes = m._buffers["weight"]
            for other in holders:
                other._buffers["weight"] = codes


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
