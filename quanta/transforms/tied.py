"""Tied weights stay tied through `convert`.

A language model often ties its output layer to its token embedding (GPT-2's ``lm_head.weight``
*is* ``transformer.wte.weight``). Lowering the Linear alone would store the table twice: float
in the embedding, int8 codes in the Linear (a file larger than the float model's share of it
suggests). Where the integer Linear holds int8 codes with one scale per row (``Int8Linear``,
``Int8WeightOnlyLinear``), a float ``nn.Embedding`` of the same table becomes an
``Int8Embedding`` that holds *the same* code and scale tensors: one table in memory and in the
file, and both layers compute with the same quantized weight, as they computed with the same
float one. Where the codes cannot be shared (int4 groups, a different grid), the report says
that the tie is broken and the table is stored twice.

    groups = tied_groups(model)            # before lowering: [("transformer.wte", "lm_head"), ...]
    ...lower...
    report += retie(model, groups)          # after lowering (and the speed check)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..integer.base import IntegerModule
from ..integer.embedding import Int8Embedding

__all__ = ["retie", "shared_int8_rows", "tied_groups"]


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


def _plain_embedding(module: nn.Module, shape: torch.Size) -> bool:
    return (type(module) is nn.Embedding and module.max_norm is None and tuple(module.weight.shape) == tuple(shape))


def retie(model: nn.Module, groups: list[tuple[str, ...]]) -> list[Any]:
    """Make each tied group share one integer table where it can; returns report entries
    (`convert.Lowering`) for what changed and for ties that had to be broken."""
    from .convert import Lowering  # (convert imports this module)

    entries: list[Any] = []
    for names in groups:
        modules = {n: _get(model, n) for n in names}
        if any(m is None for m in modules.values()):
            continue  # (a name no longer there: lowered into a container's place)
        source = next(((n, rows) for n, m in modules.items() if (rows := shared_int8_rows(m)) is not None), None)
        integer = [n for n, m in modules.items() if isinstance(m, IntegerModule)]
        if not integer:
            continue  # all float: still one Parameter
        if source is None:
            entries.append(Lowering(integer[0], type(modules[integer[0]]).__name__, type(modules[integer[0]]).__name__,
                                    f"weight tied to {', '.join(n for n in names if n != integer[0])}: its codes "
                                    "cannot be shared (not int8 with one scale per row), so the tie is broken "
                                    "and the table is stored twice"))
            continue
        src_name, (codes, scale) = source
        for name, module in modules.items():
            if name == src_name:
                continue
            if _plain_embedding(module, codes.shape):
                emb = Int8Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, symmetric=True)
                emb.impl = modules[src_name].impl
                emb.train(module.training)
                emb._buffers["weight"], emb._buffers["weight_scale"] = codes, scale
                _set(model, name, emb)
                entries.append(Lowering(name, type(module).__name__, "Int8Embedding",
                                        f"tied to {src_name}: shares its int8 codes and per-row scales "
                                        "(one table, stored once)"))
            elif (other := shared_int8_rows(module)) is not None and torch.equal(other[0], codes) \
                    and torch.equal(other[1], scale):
                module._buffers["weight"], module._buffers["weight_scale"] = codes, scale
                module.pack()
            else:
                entries.append(Lowering(name, type(module).__name__, type(module).__name__,
                                        f"weight tied to {src_name}, whose int8 codes it cannot share: the tie is "
                                        "broken and the table is stored twice"))
    return entries


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
