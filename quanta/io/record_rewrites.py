"""The record kind of a module whose ``forward`` quanta rewrote: residual additions made
`quanta.nn.Add` children, attention chains `quanta.nn.ScaledDotProductAttention` children
(`quanta.transforms.residual_adds`).

Such a module keeps its class, so it is recorded like any float module (class and constructor
arguments) plus ``residual_adds``: the fingerprint of its traced ``forward``, which additions
became which children and which attention chains which `ScaledDotProductAttention` children
(``attention``; absent in files written before it). Loading rebuilds the module, then redoes the same deterministic rewrite
on it (no code comes from the file: the forward is traced again from the module's own class);
the children records that follow put the file's ``QuantAdd`` / ``Int8Add`` in place of the new
``Add`` modules. A module whose class's forward no longer traces to the recorded fingerprint is
refused with a one-line error.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..transforms.residual_adds import MARK, redo_residual_adds
from .architecture import ArchitectureError
from .record_checks import need
from .record_kinds import (
    Describing,
    Rebuilding,
    RecordKind,
    _check_module,
    _describe_module,
    _rebuild_module,
    register_record_kind,
)


def _describe(mod: nn.Module, path: str, ctx: Describing) -> dict[str, Any]:
    recorded = getattr(mod, MARK)
    pairs = {key: [[int(i), str(n)] for i, n in recorded.get(key, [])] for key in ("adds", "attention")}
    return _describe_module(mod, path, ctx) | {"kind": "rewritten",
                                                "residual_adds": {"fingerprint": recorded["fingerprint"], **pairs}}


def _check(rec: dict[str, Any], where: str) -> None:
    _check_module(rec, where)
    adds = rec.get("residual_adds")
    need(isinstance(adds, dict) and {"fingerprint", "adds"} <= set(adds) <= {"fingerprint", "adds", "attention"},
         where, "'residual_adds' must be an object with 'fingerprint', 'adds' and optionally 'attention'")


def _rebuild(rec: dict[str, Any], current: nn.Module | None, ctx: Rebuilding) -> None:
    _rebuild_module(rec, current, ctx)
    where = rec["path"] or "(root)"
    try:
        redo_residual_adds(ctx.get(rec["path"]), rec["residual_adds"], where)  # type: ignore[arg-type]
    except ValueError as e:
        raise ArchitectureError(f"quanta.load: {e}") from e


register_record_kind(RecordKind("rewritten", lambda m: MARK in m.__dict__, _describe, _check, _rebuild))
