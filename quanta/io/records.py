"""Module records: what quanta did to each module of a model, as data, and how to redo it.

`describe` walks a (float, simulated or integer) model in pre-order and writes one record per
module; `rebuild` redoes the records on a float skeleton (the user's freshly built model, or one
constructed from the root record), so that ``load_state_dict`` then fills in exactly the saved
tensors. Each record's ``kind`` says how: ``"integer"`` (an integer module: its class and
constructor config), ``"quant"`` (a simulated module: its registered quantized class and
`LayerQuantConfig`), ``"quantizer"`` (a `TensorQuantizer`: descriptor and mode flags) or
``"module"`` (anything else: its class and, when they can be read back, its constructor
arguments). The kinds are registered in `quanta.io.record_kinds` (matcher, describe, check,
rebuild in one place); this module only walks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..core import QuantSpec
from ..nn.descriptor import QuantDescriptor
from . import record_rewrites  # noqa: F401  (registers the "rewritten" record kind)
from .architecture import ArchitectureError
from .record_checks import ShapeBudget, check_records
from .record_kinds import RECORD_KINDS, Describing, Rebuilding, kind_for
from .safe_file import TensorEntry


class UnsupportedModuleError(ValueError):
    """A module quanta cannot describe in a file."""


def _field_defaults(cls: type) -> dict[str, Any]:
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def compact(obj: Any) -> Any:
    """``obj`` with every QuantSpec / QuantDescriptor dict reduced to its non-default fields
    (their ``from_dict`` fills the rest back in): keeps the manifest small and readable."""
    if isinstance(obj, list):
        return [compact(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    for cls in (QuantSpec, QuantDescriptor):
        defaults = _field_defaults(cls)
        if set(obj) == set(defaults):
            return {k: v for k, v in obj.items() if k == "version" or v != defaults[k]}
    return {k: compact(v) for k, v in obj.items()}


def describe(model: nn.Module, unsupported: str = "raise") -> tuple[list[dict[str, Any]], set[str]]:
    """Records of every module, and the state-dict prefixes to leave out (modules stored as
    float when ``unsupported="float"``)."""
    if unsupported not in ("raise", "float"):
        raise ValueError(f"unsupported must be 'raise' or 'float', got {unsupported!r}")
    records: list[dict[str, Any]] = []
    ctx = Describing(unsupported)
    for path, mod in model.named_modules():
        if any(path.startswith(p) for p in ctx.skip_under):
            continue
        fields = kind_for(mod).describe(mod, path, ctx)
        if fields is not None:
            records.append({"path": path, "training": mod.training, **fields})
    records = compact(records)
    if ctx.problems:
        raise UnsupportedModuleError("quanta.save cannot describe these modules: " + "; ".join(ctx.problems) +
                                     (". Pass unsupported='float' to store unregistered simulated modules as float"
                                      if any("registered" in p for p in ctx.problems) else ""))
    return records, ctx.dropped


# ------------------------------------------------------------------------------ rebuild
def validate_records(records: Any) -> None:
    """`check_records` with the registered record kinds."""
    check_records(records, RECORD_KINDS)


def rebuild(skeleton: nn.Module | None, records: list[dict[str, Any]], trusted: Iterable[Any] | None = None,
            entries: dict[str, TensorEntry] | None = None) -> nn.Module:
    """Redo ``records`` on ``skeleton`` (None: build every module from its record). With the
    file's tensor table (``entries``), what each record is about to build is checked against it
    first (`ShapeBudget`), and any failure names the module."""
    budget = None if entries is None else ShapeBudget(entries, {r["path"] for r in records if r["kind"] == "integer"})
    ctx = Rebuilding(skeleton, skeleton, trusted, budget)
    for rec in records:
        where = rec["path"] or "(root)"
        try:
            RECORD_KINDS[rec["kind"]].rebuild(rec, ctx.get(rec["path"]), ctx)
            ctx.get(rec["path"]).train(rec.get("training", False))  # type: ignore[union-attr]
        except ArchitectureError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, RecursionError) as e:
            raise ArchitectureError(f"cannot rebuild module {where!r} from its record: {str(e)[:300]}") from e
    if ctx.root is None:
        raise ArchitectureError("the file records no modules")
    return ctx.root
