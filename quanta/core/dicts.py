"""Reading configs back from dicts: the one check every ``from_dict`` runs first."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any


def field_names(cls: type) -> tuple[str, ...]:
    """The dataclass ``cls``'s field names, in declaration order (what its ``to_dict`` writes)."""
    return tuple(f.name for f in dataclasses.fields(cls))


def check_keys(cls_name: str, data: Any, known: Iterable[str]) -> Mapping[str, Any]:
    """``data`` if it is a mapping holding only ``known`` keys; else a one-line error naming
    ``cls_name.from_dict`` and the problem (``TypeError`` for a non-mapping, ``ValueError`` listing
    the unknown keys and the known ones)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls_name}.from_dict expects a dict, got {type(data).__name__}")
    known = set(known)
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ValueError(f"{cls_name}.from_dict: unknown field(s) {unknown}; known: {sorted(known)}")
    return data
