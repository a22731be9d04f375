"""The kinds of module record a quanta file holds, each declared once by registration.

A `RecordKind` is one kind's four parts: ``matches`` (is this module of the kind), ``describe``
(the record's fields), ``check`` (validate a record's fields before anything is imported or
built) and ``rebuild`` (redo the record on the model being loaded). `kind_for` finds a module's
kind: the first registered kind that matches, else the catch-all ``"module"`` (a float module:
class and constructor arguments). `quanta.io.records` walks models and records through this
table only, so a new integer module type needs no edit there: its class and ``config()`` are
read through `quanta.integer.lowering_classes()`. What quanta's transforms may put in a float
module's place (a folded BatchNorm's ``Identity``, a ``QuantAdd`` for an ``Add``, a codes
max-pool) is declared here too, with `register_transform_result`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..integer import lowering_classes
from ..integer.base import IntegerModule
from ..integer.pooling import CODES_POOL
from ..nn.descriptor import QuantDescriptor
from ..nn.modules.base import _DYNAMIC_CLASSES, LayerQuantConfig, QuantModule
from ..nn.modules.functional import Add, QuantAdd
from ..nn.modules.fused import FusedActivation
from ..nn.registry import registered_types
from ..nn.tensor_quantizer import TensorQuantizer
from .architecture import ArchitectureError, class_path, construct, float_class, infer_kwargs
from .record_checks import (
    RESTORED_ATTRS,
    ShapeBudget,
    impl_names,
    integer_record,
    need,
    optional_dict,
    restore_attrs,
)


@dataclass
class Describing:
    """What `describe`'s walk shares with the kinds: the option, and what they collect."""

    unsupported: str  # "raise" or "float" (store unregistered simulated modules as float)
    problems: list[str] = field(default_factory=list)  # modules that cannot be described
    dropped: set[str] = field(default_factory=set)  # state-dict prefixes left out of the file
    skip_under: list[str] = field(default_factory=list)  # module paths whose subtrees are not described


@dataclass
class Rebuilding:
    """What `rebuild`'s walk shares with the kinds: the model being built and the file's checks."""

    root: nn.Module | None
    skeleton: nn.Module | None
    trusted: Iterable[Any] | None
    budget: ShapeBudget | None
    constructed: set[str] = field(default_factory=set)  # paths of modules built from their records

    def get(self, path: str) -> nn.Module | None:
        return module_at(self.root, path)

    def place(self, path: str, new: nn.Module) -> None:
        self.root = place(self.root, path, new)

    def build(self, rec: dict[str, Any], cls_path: str) -> nn.Module:
        """The module of class ``cls_path`` constructed from the record's kwargs (checked against
        the file's tensors on the meta device first)."""
        path = rec["path"]
        args = (cls_path, rec.get("kwargs"), path or "(root)", self.trusted, rec.get("kwargs_missing", ""))
        if self.budget is not None:
            self.budget.construct(lambda meta: construct(*args, meta=meta), path, path or "(root)")
        return construct(*args)


@dataclass(frozen=True)
class RecordKind:
    name: str
    #: is ``module`` of this kind (the catch-all "module" kind matches everything)
    matches: Callable[[nn.Module], bool]
    #: ``(module, path, ctx) -> fields`` (``kind`` included: a kind may store a module as another
    #: kind), or None to leave the module out (its problem added to ``ctx.problems``)
    describe: Callable[[nn.Module, str, Describing], dict[str, Any] | None]
    #: ``(record, where)``: raise ``ValueError`` naming the field; never imports or constructs
    check: Callable[[dict[str, Any], str], None]
    #: ``(record, current module at its path or None, ctx)``: redo the record (``ctx.place``)
    rebuild: Callable[[dict[str, Any], nn.Module | None, Rebuilding], None]


#: every kind by name, in the order `kind_for` tries them; "module" (the catch-all) is last
RECORD_KINDS: dict[str, RecordKind] = {}


def register_record_kind(kind: RecordKind) -> RecordKind:
    """Add ``kind`` (tried before the catch-all "module" kind)."""
    if kind.name in RECORD_KINDS:
        raise ValueError(f"record kind {kind.name!r} is registered already")
    fallback = RECORD_KINDS.pop("module", None)
    RECORD_KINDS[kind.name] = kind
    if fallback is not None:
        RECORD_KINDS["module"] = fallback
    return kind


def kind_for(module: nn.Module) -> RecordKind:
    return next(k for k in RECORD_KINDS.values() if k.matches(module))


# ------------------------------------------------------------------------------ shared helpers
def module_at(root: nn.Module | None, path: str) -> nn.Module | None:
    if root is None:
        return None
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def place(root: nn.Module | None, path: str, new: nn.Module) -> nn.Module:
    """``root`` with ``new`` at ``path`` (``new`` itself for the root)."""
    if not path:
        return new
    if root is None:
        raise ArchitectureError(f"cannot place {path!r}: the model has no root")
    parent_path, _, leaf = path.rpartition(".")
    parent = module_at(root, parent_path)
    if parent is None:
        raise ArchitectureError(f"cannot place {path!r}: the model has no module {parent_path!r}")
    setattr(parent, leaf, new) if hasattr(parent, leaf) else parent.add_module(leaf, new)
    return root


@functools.cache
def integer_classes() -> dict[str, type]:
    return {c.__name__: c for c in lowering_classes()}


def quant_classes() -> dict[str, type]:
    return {c.__name__: c for c in registered_types().values()}


def registered_quant_class(module: nn.Module) -> type | None:
    """The registered quantized class ``module`` is an instance of: exactly, or through the
    wrapper class quanta made for a user's float subclass. A user's own subclass of a quantized
    class (its forward could differ) is not describable."""
    known = set(registered_types().values())
    cls = type(module)
    if cls in known:
        return cls
    for (qcls, _float), dyn in _DYNAMIC_CLASSES.items():
        if dyn is cls and qcls in known:
            return qcls
    return None


# ------------------------------------------------------------------------------ transform results
#: recorded class path → the float classes it may stand in for on the user's skeleton (None: any)
TRANSFORM_RESULTS: dict[str, tuple[type, ...] | None] = {}


def register_transform_result(result: type, replaces: type | tuple[type, ...] | None = None) -> None:
    """Say that quanta's transforms put a ``result`` (recorded as a "module") in the place of a
    ``replaces`` float module (None: of any module), so that loading onto the user's float model
    rebuilds it there instead of refusing a different architecture."""
    TRANSFORM_RESULTS[class_path(result)] = replaces if replaces is None or isinstance(replaces, tuple) \
        else (replaces,)


register_transform_result(nn.Identity)  # a BatchNorm folded away, an activation fused into a kernel
register_transform_result(FusedActivation)  # (where the fused activation was)
register_transform_result(QuantAdd, Add)  # what prepare makes of an Add
for _float_pool, _codes_pool in CODES_POOL.items():  # a max-pool on a uint8 path (quanta.transforms.fuse)
    register_transform_result(_codes_pool, _float_pool)


def _replaceable(current: nn.Module, recorded: str) -> bool:
    if recorded not in TRANSFORM_RESULTS:
        return False
    replaces = TRANSFORM_RESULTS[recorded]
    return replaces is None or isinstance(current, replaces)


# Shape attributes an integer record must share with the float module it replaces.
_SHAPE_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "groups",
                "num_embeddings", "embedding_dim", "input_size", "hidden_size", "num_layers", "bidirectional")


def _check_shape_attrs(current: nn.Module, config: dict[str, Any], where: str, cls: str) -> None:
    """An integer record replacing a float module must have that module's shape."""
    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, (tuple, list)) else v

    for name in _SHAPE_ATTRS:
        if name in config and hasattr(current, name):
            mine, theirs = getattr(current, name), config[name]
            if norm(mine) != norm(theirs):
                raise ArchitectureError(f"module {where!r} has {name}={mine!r} in the model, but the file's {cls} "
                                        f"has {name}={theirs!r}: is this the same architecture?")


# ------------------------------------------------------------------------------ "integer"
def _describe_integer(mod: nn.Module, path: str, ctx: Describing) -> dict[str, Any] | None:
    if integer_classes().get(type(mod).__name__) is not type(mod):
        ctx.problems.append(f"{path or '(root)'!r} ({type(mod).__name__}: not one of quanta's integer classes)")
        return None
    return {"kind": "integer", "cls": type(mod).__name__, "config": mod.config(), "impl": mod.impl}


def _check_integer(rec: dict[str, Any], where: str) -> None:
    integer = integer_classes()
    if not isinstance(rec.get("cls"), str) or rec["cls"] not in integer:
        raise ValueError(f"module {where!r} is an unknown integer module kind {str(rec.get('cls'))[:40]!r}; "
                         f"this quanta knows {sorted(integer)}")
    need(isinstance(rec.get("config"), dict), where, "'config' must be an object")
    impl = rec.get("impl", "auto")
    need(isinstance(impl, str) and impl in impl_names(), where,
         f"'impl' {str(impl)[:40]!r} is not a kernel implementation ({sorted(impl_names())})")


def _rebuild_integer(rec: dict[str, Any], current: nn.Module | None, ctx: Rebuilding) -> None:
    path, where, cls = rec["path"], rec["path"] or "(root)", integer_classes()[rec["cls"]]
    if current is not None:
        _check_shape_attrs(current, rec["config"], where, rec["cls"])
    if ctx.budget is not None:
        ctx.budget.integer(cls, rec["config"], path, where)
    ctx.place(path, integer_record(rec, cls))


# ------------------------------------------------------------------------------ "quant"
def _describe_quant(mod: nn.Module, path: str, ctx: Describing) -> dict[str, Any] | None:
    qcls = registered_quant_class(mod)
    if qcls is not None and hasattr(mod, "quant_config"):
        kwargs, why = infer_kwargs(mod)
        rec = {"kind": "quant", "cls": qcls.__name__, "float_cls": class_path(float_class(mod)), "kwargs": kwargs,
               "layer_config": mod.quant_config.to_dict()}
        return rec if kwargs is not None else rec | {"kwargs_missing": why}
    if ctx.unsupported != "float":
        ctx.problems.append(f"{path or '(root)'!r} ({type(mod).__name__}: its quantized class is not registered; "
                            "quanta.nn.register_quant_module it)")
        return None
    warnings.warn(f"quanta.save: {path or '(root)'} ({type(mod).__name__}) is not a registered "
                  "quantized class; storing it as float", UserWarning, stacklevel=4)
    prefix = f"{path}." if path else ""
    ctx.dropped.update(f"{prefix}{n}" for n, _ in mod.named_children())
    ctx.skip_under += [f"{prefix}{n}" for n, _ in mod.named_children()]
    kwargs, _why = infer_kwargs(mod)
    return {"kind": "module", "cls": class_path(float_class(mod)), "kwargs": kwargs}


def _check_quant(rec: dict[str, Any], where: str) -> None:
    if not isinstance(rec.get("cls"), str) or rec["cls"] not in quant_classes():
        raise ValueError(f"module {where!r} is an unknown simulated module kind {str(rec.get('cls'))[:40]!r}; "
                         "register it with quanta.nn.register_quant_module before loading")
    need(isinstance(rec.get("float_cls"), str), where, "'float_cls' must be a string")
    need(optional_dict(rec.get("kwargs")), where, "'kwargs' must be an object or null")
    need(isinstance(rec.get("layer_config"), dict), where, "'layer_config' must be an object")
    need(isinstance(rec.get("kwargs_missing", ""), str), where, "'kwargs_missing' must be a string")


def _rebuild_quant(rec: dict[str, Any], current: nn.Module | None, ctx: Rebuilding) -> None:
    path, where, qcls = rec["path"], rec["path"] or "(root)", quant_classes()[rec["cls"]]
    if isinstance(current, QuantModule):  # the skeleton was built quantized already
        if registered_quant_class(current) is not qcls:
            raise ArchitectureError(f"module {where!r} is a {type(current).__name__} in the model, "
                                    f"but the file holds a {rec['cls']}")
        current.init_quantizers(LayerQuantConfig.from_dict(rec["layer_config"]))
        return
    if current is None:
        current = ctx.build(rec, rec["float_cls"])
    elif class_path(type(current)) != rec["float_cls"]:
        raise ArchitectureError(f"module {where!r} is a {type(current).__name__} in the model, but the "
                                f"file holds a quantized {rec['float_cls'].split(':')[-1]}: is this the same "
                                "architecture?")
    try:
        new = qcls.from_float(current, LayerQuantConfig.from_dict(rec["layer_config"]))
    except (TypeError, ValueError) as e:
        raise ArchitectureError(f"cannot rebuild simulated module {where!r}: {e}") from e
    ctx.place(path, new)


# ------------------------------------------------------------------------------ "quantizer"
def _describe_quantizer(mod: nn.Module, path: str, ctx: Describing) -> dict[str, Any]:
    if mod._if_calib:
        warnings.warn(f"quanta.save: quantizer {path!r} is still calibrating; its calibrator state is "
                      "not saved (finish calibration first)", UserWarning, stacklevel=4)
    return {"kind": "quantizer", "desc": mod.desc.to_dict(), "disabled": mod._disabled, "quant": mod._if_quant,
            "name": mod.name}


def _check_quantizer(rec: dict[str, Any], where: str) -> None:
    need(isinstance(rec.get("desc"), dict), where, "'desc' must be an object")
    for key in ("disabled", "quant"):
        need(isinstance(rec.get(key), bool), where, f"{key!r} must be true or false")
    need(isinstance(rec.get("name"), (str, type(None))), where, "'name' must be a string or null")


def _rebuild_quantizer(rec: dict[str, Any], current: nn.Module | None, ctx: Rebuilding) -> None:
    path, where = rec["path"], rec["path"] or "(root)"
    if not isinstance(current, TensorQuantizer):
        raise ArchitectureError(f"the file has a quantizer at {where!r}; the model has "
                                f"{'nothing' if current is None else type(current).__name__} there")
    desc = QuantDescriptor.from_dict(rec["desc"])
    if current.desc != desc and path.rpartition(".")[0] in ctx.constructed:
        # its owner was built here from its class alone (e.g. a QuantAdd, whose descriptors
        # are no constructor attributes): the file's descriptor is the one it had
        ctx.place(path, TensorQuantizer(desc))
        current = ctx.get(path)
    if current.desc != desc:
        raise ArchitectureError(f"quantizer {where!r}: the model's descriptor {current.desc} differs from "
                                f"the file's {desc}")
    current._disabled, current._if_quant, current._if_calib = rec["disabled"], rec["quant"], False
    current.name = rec.get("name")


# ------------------------------------------------------------------------------ "module" (the catch-all)
def _describe_module(mod: nn.Module, path: str, ctx: Describing) -> dict[str, Any]:
    kwargs, why = infer_kwargs(mod, type(mod))
    rec: dict[str, Any] = {"kind": "module", "cls": class_path(type(mod)), "kwargs": kwargs}
    if kwargs is None:
        rec["kwargs_missing"] = why
    attrs = next(({n: getattr(mod, n) for n in sorted(names)} for cls, names in RESTORED_ATTRS.items()
                  if isinstance(mod, cls)), {})
    if attrs:
        rec["attrs"] = attrs
    return rec


def _check_module(rec: dict[str, Any], where: str) -> None:
    need(isinstance(rec.get("cls"), str), where, "'cls' must be a string")
    need(optional_dict(rec.get("kwargs")), where, "'kwargs' must be an object or null")
    attrs = rec.get("attrs", {})
    need(isinstance(attrs, dict), where, "'attrs' must be an object")
    allowed = {n: t for names in RESTORED_ATTRS.values() for n, t in names.items()}
    for name, value in attrs.items():
        need(name in allowed and isinstance(value, allowed[name]), where,
             f"attrs may only restore {sorted(allowed)} (of their types), got {name!r}={str(value)[:40]}")
    need(isinstance(rec.get("kwargs_missing", ""), str), where, "'kwargs_missing' must be a string")


def _rebuild_module(rec: dict[str, Any], current: nn.Module | None, ctx: Rebuilding) -> None:
    path, where = rec["path"], rec["path"] or "(root)"
    if current is None or class_path(type(current)) != rec["cls"]:
        if current is not None and ctx.skeleton is not None and not _replaceable(current, rec["cls"]):
            raise ArchitectureError(f"module {where!r} is a {type(current).__name__} in the model, but the "
                                    f"file holds a {rec['cls'].split(':')[-1]}: is this the same architecture?")
        ctx.place(path, ctx.build(rec, rec["cls"]))
        current = ctx.get(path)
        ctx.constructed.add(path)
    restore_attrs(current, rec.get("attrs", {}), where)


register_record_kind(RecordKind("module", lambda m: True, _describe_module, _check_module, _rebuild_module))
register_record_kind(RecordKind("integer", lambda m: isinstance(m, IntegerModule), _describe_integer,
                                _check_integer, _rebuild_integer))
register_record_kind(RecordKind("quant", lambda m: isinstance(m, QuantModule), _describe_quant, _check_quant,
                                _rebuild_quant))
register_record_kind(RecordKind("quantizer", lambda m: isinstance(m, TensorQuantizer), _describe_quantizer,
                                _check_quantizer, _rebuild_quantizer))
