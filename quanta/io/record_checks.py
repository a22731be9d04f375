"""What `load` checks about a file's module records before building anything from them.

Two stages: `check_records` validates every record's paths and, through its registered kind's
``check`` (`quanta.io.record_kinds`), its fields (types, known classes, kernel names, the float
attributes a record may restore) without importing or constructing;
`ShapeBudget` then checks, while `rebuild` walks the records, that each module a record is
about to build implies the parameter shapes the file's tensor table holds — on the meta
device, before any real allocation — so that the memory a load uses is bounded by the
tensors the file really holds, not by numbers in its manifest.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..integer.base import IntegerModule
from .architecture import ArchitectureError
from .safe_file import QuantaFileError, TensorEntry

if TYPE_CHECKING:  # (annotations only: io must not import transforms at run time)
    from ..transforms.config import QuantConfig
    from ..transforms.convert import Lowering

#: float-module attributes quanta's transforms change and a rebuild must restore: class, name, type
RESTORED_ATTRS: dict[type, dict[str, type]] = {nn.TransformerEncoder: {"use_nested_tensor": bool}}
#: the float bytes a stored byte may stand for while a model is rebuilt (int4 codes: 2 per byte,
#: rebuilt from float32 modules) plus a floor for small files
FLOAT_PER_STORED_BYTE = 8
BUDGET_FLOOR = 16 * 2**20


@functools.cache
def impl_names() -> frozenset[str]:
    """Every kernel implementation name an integer module's ``impl`` may prefer."""
    from ..kernels import (
        activation,
        conv,
        embedding,
        fp8,
        linear,
        recurrent,
        weight_only,
    )
    from ..kernels.library import KernelOp

    names = {"auto", "reference"}
    for mod in (activation, conv, embedding, fp8, linear, recurrent, weight_only):
        for op in vars(mod).values():
            if isinstance(op, KernelOp):
                names.update(i.name for i in op.impls)
    return frozenset(names)


def need(cond: bool, where: str, what: str) -> None:
    """A ``ValueError`` naming the module and what is wrong with its record, unless ``cond``."""
    if not cond:
        raise ValueError(f"module {where!r}: {what}")


def optional_dict(v: Any) -> bool:
    return v is None or isinstance(v, dict)


class _Checks(Protocol):
    def check(self, rec: dict[str, Any], where: str) -> None: ...


def check_records(records: Any, kinds: Mapping[str, _Checks]) -> None:
    """Refuse malformed records before anything is imported or built (``ValueError`` naming the
    module and the field): the paths here, the fields by each record's kind (``kinds``: name →
    its registered `RecordKind`)."""
    if not isinstance(records, list) or not records:
        raise ValueError("manifest 'modules' must be a non-empty list")
    seen: set[str] = set()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
            raise ValueError(f"module record {i} is malformed (no 'path' string)")
        path = rec["path"]
        where = path or "(root)"
        need(path not in seen, where, "recorded twice")
        need((i == 0) == (path == ""), where, "the first record must be the root ('') and only the first")
        need(path == "" or all(path.split(".")), where, "'path' has an empty part")
        seen.add(path)
        kind = rec.get("kind")
        if not isinstance(kind, str) or kind not in kinds:
            raise ValueError(f"module {where!r} has an unknown kind {str(kind)[:40]!r} (this quanta knows "
                             f"{tuple(kinds)}); was the file written by a newer quanta?")
        need(isinstance(rec.get("training", False), bool), where, "'training' must be true or false")
        kinds[kind].check(rec, where)


def checked_manifest(manifest: dict[str, Any], source: str) -> tuple[QuantConfig | None, list[Lowering]]:
    """The records, config and conversion report validated (a `QuantaFileError` naming the field);
    returns the config and the report."""
    from ..transforms.config import QuantConfig
    from ..transforms.convert import Lowering
    from .records import validate_records

    field = "modules"
    try:
        validate_records(manifest["modules"])
        field = "architecture"
        if not isinstance(manifest.get("architecture", {}), dict):
            raise TypeError("must be an object")
        field = "config"
        config = None if manifest.get("config") is None else QuantConfig.from_dict(manifest["config"])
        field = "conversion"
        rows = manifest.get("conversion") or []
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise TypeError("must be a list of objects")
        report = [Lowering(**r) for r in rows]
        if not all(isinstance(v, str) for r in report for v in dataclasses.astuple(r)):
            raise TypeError("every field must be a string")
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise QuantaFileError(f"{source}: manifest {field!r}: {str(e)[:300]}") from e
    return config, report


def restore_attrs(module: nn.Module, attrs: dict[str, Any], where: str) -> None:
    """Set the float attributes a record restores, only on the classes that have them."""
    for name, value in attrs.items():
        if not any(isinstance(module, cls) and name in names for cls, names in RESTORED_ATTRS.items()):
            raise ArchitectureError(f"module {where!r} ({type(module).__name__}) has no restorable attribute {name!r}")
        setattr(module, name, value)


@functools.cache
def _shape_only(cls: type) -> type:
    """``cls`` whose ``pack()`` does nothing: constructed on the meta device it allocates nothing."""
    return type(cls.__name__, (cls,), {"pack": lambda self: None, "__module__": cls.__module__})


def _compatible(a: torch.dtype, b: torch.dtype) -> bool:
    return a == b or (a.is_floating_point and b.is_floating_point)


class ShapeBudget:
    """Checks, record by record, that what is about to be built fits the file's tensor table."""

    def __init__(self, entries: dict[str, TensorEntry], integer_paths: set[str]) -> None:
        self.entries = entries
        self.replaced = integer_paths  # their float modules' tensors are not in the file
        stored = sum(e.end - e.start for e in entries.values())
        self.left = FLOAT_PER_STORED_BYTE * stored + BUDGET_FLOOR

    def _key(self, path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

    def integer(self, cls: type, config: dict[str, Any], path: str, where: str) -> None:
        """The integer module ``cls.from_config(config)`` holds exactly the file's tensors at ``path``."""
        with torch.device("meta"):
            shape_only = _shape_only(cls).from_config(config)
        for name, t in shape_only.state_dict().items():
            key = self._key(path, name)
            have = self.entries.get(key)
            if have is None:
                raise ArchitectureError(f"module {where!r}: its {cls.__name__} record implies tensor {key!r} "
                                        f"{list(t.shape)}, which the file does not hold")
            if tuple(t.shape) != have.shape or not _compatible(t.dtype, have.dtype):
                raise ArchitectureError(f"module {where!r}: its {cls.__name__} record implies {key!r} "
                                        f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}, the file holds "
                                        f"{have.dtype_name}{list(have.shape)}")

    def construct(self, build: Callable[[bool], nn.Module], path: str, where: str) -> None:
        """A float module ``build(meta=True)`` fits the budget, and its tensors that the file
        holds (outside integer replacements) have the file's shapes."""
        try:
            shape_only = build(True)
        except ArchitectureError:
            return  # this constructor cannot run on the meta device: the real build says why it fails
        total = 0
        for name, t in [*shape_only.named_parameters(), *shape_only.named_buffers()]:
            total += t.numel() * t.element_size()
            key = self._key(path, name)
            owner = key.rpartition(".")[0]
            if any(owner == p or owner.startswith(p + ".") for p in self.replaced):
                continue
            have = self.entries.get(key)
            if have is not None and tuple(t.shape) != have.shape:
                raise ArchitectureError(f"module {where!r}: its recorded constructor arguments imply {key!r} "
                                        f"{list(t.shape)}, the file holds {list(have.shape)}")
        if total > self.left:
            raise ArchitectureError(f"module {where!r}: its recorded constructor arguments imply {total:,} bytes of "
                                    "tensors, more than the file's tensors can stand for: the file was altered")
        self.left -= total


def integer_record(rec: dict[str, Any], cls: type) -> IntegerModule:
    """The empty integer module of a validated record (errors name the module)."""
    new = cls.from_config(rec["config"])
    new.impl = rec.get("impl", "auto")
    return new
