"""Module records: what quanta did to each module of a model, as data, and how to redo it.

`describe` walks a (float, simulated or integer) model in pre-order and writes one record per
module: ``kind`` is ``"integer"`` (an integer module: its class and constructor config),
``"quant"`` (a simulated module: its registered quantized class and `LayerQuantConfig`),
``"quantizer"`` (a `TensorQuantizer`: descriptor and mode flags) or ``"module"`` (anything else:
its class and, when they can be read back, its constructor arguments). `rebuild` redoes the
records on a float skeleton (the user's freshly built model, or one constructed from the root
record), so that ``load_state_dict`` then fills in exactly the saved tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..integer import lowering_classes
from ..integer.base import IntegerModule
from ..nn.descriptor import QuantDescriptor
from ..nn.modules.base import LayerQuantConfig, QuantModule
from ..nn.registry import registered_types
from ..nn.tensor_quantizer import TensorQuantizer
from .architecture import ArchitectureError, class_path, construct, float_class, infer_kwargs
from .record_checks import RESTORED_ATTRS, ShapeBudget, check_records, integer_record, restore_attrs
from .safe_file import TensorEntry


class UnsupportedModuleError(ValueError):
    """A module quanta cannot describe in a file."""


def _field_defaults(cls: type) -> dict[str, Any]:
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def compact(obj: Any) -> Any:
    """``obj`` with every QuantSpec / QuantDescriptor dict reduced to its non-default fields
    (their ``from_dict`` fills the rest back in): keeps the manifest small and readable."""
    from ..core import QuantSpec

    if isinstance(obj, list):
        return [compact(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    for cls in (QuantSpec, QuantDescriptor):
        defaults = _field_defaults(cls)
        if set(obj) == set(defaults):
            return {k: v for k, v in obj.items() if k == "version" or v != defaults[k]}
    return {k: compact(v) for k, v in obj.items()}


def integer_classes() -> dict[str, type]:
    return {c.__name__: c for c in lowering_classes()}


def quant_classes() -> dict[str, type]:
    return {c.__name__: c for c in registered_types().values()}


def _registered_quant_class(module: nn.Module) -> type | None:
    """The registered quantized class ``module`` is an instance of: exactly, or through the
    wrapper class quanta made for a user's float subclass. A user's own subclass of a quantized
    class (its forward could differ) is not describable."""
    from ..nn.modules.base import _DYNAMIC_CLASSES

    known = set(registered_types().values())
    cls = type(module)
    if cls in known:
        return cls
    for (qcls, _float), dyn in _DYNAMIC_CLASSES.items():
        if dyn is cls and qcls in known:
            return qcls
    return None


def _attrs(module: nn.Module) -> dict[str, Any]:
    for cls, names in RESTORED_ATTRS.items():
        if isinstance(module, cls):
            return {n: getattr(module, n) for n in sorted(names)}
    return {}


def describe(model: nn.Module, unsupported: str = "raise") -> tuple[list[dict[str, Any]], set[str]]:
    """Records of every module, and the state-dict prefixes to leave out (modules stored as
    float when ``unsupported="float"``)."""
    if unsupported not in ("raise", "float"):
        raise ValueError(f"unsupported must be 'raise' or 'float', got {unsupported!r}")
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    dropped: set[str] = set()
    integer = integer_classes()
    skip_under: list[str] = []
    for path, mod in model.named_modules():
        if any(path.startswith(p) for p in skip_under):
            continue
        rec: dict[str, Any] = {"path": path, "training": mod.training}
        if isinstance(mod, IntegerModule):
            if integer.get(type(mod).__name__) is not type(mod):
                problems.append(f"{path or '(root)'!r} ({type(mod).__name__}: not one of quanta's integer classes)")
                continue
            rec.update(kind="integer", cls=type(mod).__name__, config=mod.config(), impl=mod.impl)
        elif isinstance(mod, QuantModule):
            qcls = _registered_quant_class(mod)
            if qcls is None or not hasattr(mod, "quant_config"):
                if unsupported == "float":
                    warnings.warn(f"quanta.save: {path or '(root)'} ({type(mod).__name__}) is not a registered "
                                  "quantized class; storing it as float", UserWarning, stacklevel=3)
                    prefix = f"{path}." if path else ""
                    dropped.update(f"{prefix}{n}" for n, _ in mod.named_children())
                    skip_under += [f"{prefix}{n}" for n, _ in mod.named_children()]
                    kwargs, why = infer_kwargs(mod)
                    rec.update(kind="module", cls=class_path(float_class(mod)), kwargs=kwargs)
                    records.append(rec)
                    continue
                problems.append(f"{path or '(root)'!r} ({type(mod).__name__}: its quantized class is not registered; "
                                "quanta.nn.register_quant_module it)")
                continue
            kwargs, why = infer_kwargs(mod)
            rec.update(kind="quant", cls=qcls.__name__, float_cls=class_path(float_class(mod)), kwargs=kwargs,
                       layer_config=mod.quant_config.to_dict())
            if kwargs is None:
                rec["kwargs_missing"] = why
        elif isinstance(mod, TensorQuantizer):
            if mod._if_calib:
                warnings.warn(f"quanta.save: quantizer {path!r} is still calibrating; its calibrator state is "
                              "not saved (finish calibration first)", UserWarning, stacklevel=3)
            rec.update(kind="quantizer", desc=mod.desc.to_dict(), disabled=mod._disabled, quant=mod._if_quant,
                       name=mod.name)
        else:
            kwargs, why = infer_kwargs(mod, type(mod))
            rec.update(kind="module", cls=class_path(type(mod)), kwargs=kwargs)
            if kwargs is None:
                rec["kwargs_missing"] = why
            attrs = _attrs(mod)
            if attrs:
                rec["attrs"] = attrs
        records.append(rec)
    records = compact(records)
    if problems:
        raise UnsupportedModuleError("quanta.save cannot describe these modules: " + "; ".join(problems) +
                                     (". Pass unsupported='float' to store unregistered simulated modules as float"
                                      if any("registered" in p for p in problems) else ""))
    return records, dropped


# ------------------------------------------------------------------------------ rebuild
def _get(root: nn.Module | None, path: str) -> nn.Module | None:
    if root is None:
        return None
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _set(root: nn.Module | None, path: str, new: nn.Module) -> nn.Module:
    if not path:
        return new
    if root is None:
        raise ArchitectureError(f"cannot place {path!r}: the model has no root")
    parent_path, _, leaf = path.rpartition(".")
    parent = _get(root, parent_path)
    if parent is None:
        raise ArchitectureError(f"cannot place {path!r}: the model has no module {parent_path!r}")
    setattr(parent, leaf, new) if hasattr(parent, leaf) else parent.add_module(leaf, new)
    return root


def validate_records(records: Any) -> None:
    """`check_records` with this quanta's integer and simulated classes."""
    check_records(records, integer_classes(), quant_classes())


def rebuild(skeleton: nn.Module | None, records: list[dict[str, Any]], trusted: Iterable[Any] | None = None,
            entries: dict[str, TensorEntry] | None = None) -> nn.Module:
    """Redo ``records`` on ``skeleton`` (None: build every module from its record). With the
    file's tensor table (``entries``), what each record is about to build is checked against it
    first (`ShapeBudget`), and any failure names the module."""
    budget = None if entries is None else ShapeBudget(entries, {r["path"] for r in records if r["kind"] == "integer"})
    root = skeleton
    constructed: set[str] = set()  # paths of modules built here from their records
    for rec in records:
        where = rec["path"] or "(root)"
        try:
            root = _rebuild_one(root, rec, skeleton, trusted, budget, constructed)
        except ArchitectureError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, RecursionError) as e:
            raise ArchitectureError(f"cannot rebuild module {where!r} from its record: {str(e)[:300]}") from e
    if root is None:
        raise ArchitectureError("the file records no modules")
    return root


def _rebuild_one(root: nn.Module | None, rec: dict[str, Any], skeleton: nn.Module | None, trusted: Iterable[Any] | None,
                 budget: ShapeBudget | None, constructed: set[str]) -> nn.Module | None:
    integer, quant = integer_classes(), quant_classes()
    path, kind = rec["path"], rec["kind"]
    where = path or "(root)"

    def build(cls_path: str) -> nn.Module:
        args = (cls_path, rec.get("kwargs"), where, trusted, rec.get("kwargs_missing", ""))
        if budget is not None:
            budget.construct(lambda meta: construct(*args, meta=meta), path, where)
        return construct(*args)

    current = _get(root, path)
    if kind == "integer":
        if current is not None:
            _check_shape_attrs(current, rec["config"], where, rec["cls"])
        if budget is not None:
            budget.integer(integer[rec["cls"]], rec["config"], path, where)
        root = _set(root, path, integer_record(rec, integer[rec["cls"]]))
    elif kind == "quant":
        qcls = quant[rec["cls"]]
        if isinstance(current, QuantModule):  # the skeleton was built quantized already
            if _registered_quant_class(current) is not qcls:
                raise ArchitectureError(f"module {where!r} is a {type(current).__name__} in the model, "
                                        f"but the file holds a {rec['cls']}")
            current.init_quantizers(LayerQuantConfig.from_dict(rec["layer_config"]))
            current.train(rec.get("training", False))
            return root
        if current is None:
            current = build(rec["float_cls"])
        elif class_path(type(current)) != rec["float_cls"]:
            raise ArchitectureError(f"module {where!r} is a {type(current).__name__} in the model, but the "
                                    f"file holds a quantized {rec['float_cls'].split(':')[-1]}: is this the same "
                                    "architecture?")
        try:
            new = qcls.from_float(current, LayerQuantConfig.from_dict(rec["layer_config"]))
        except (TypeError, ValueError) as e:
            raise ArchitectureError(f"cannot rebuild simulated module {where!r}: {e}") from e
        root = _set(root, path, new)
    elif kind == "quantizer":
        if not isinstance(current, TensorQuantizer):
            raise ArchitectureError(f"the file has a quantizer at {where!r}; the model has "
                                    f"{'nothing' if current is None else type(current).__name__} there")
        desc = QuantDescriptor.from_dict(rec["desc"])
        if current.desc != desc and path.rpartition(".")[0] in constructed:
            # its owner was built here from its class alone (e.g. a QuantAdd, whose descriptors
            # are no constructor attributes): the file's descriptor is the one it had
            root = _set(root, path, TensorQuantizer(desc))
            current = _get(root, path)
        if current.desc != desc:
            raise ArchitectureError(f"quantizer {where!r}: the model's descriptor {current.desc} differs from "
                                    f"the file's {desc}")
        current._disabled, current._if_quant, current._if_calib = rec["disabled"], rec["quant"], False
        current.name = rec.get("name")
    else:
        if current is None or class_path(type(current)) != rec["cls"]:
            if current is not None and skeleton is not None and not _replaceable(current, rec["cls"]):
                raise ArchitectureError(f"module {where!r} is a {type(current).__name__} in the model, but the "
                                        f"file holds a {rec['cls'].split(':')[-1]}: is this the same architecture?")
            root = _set(root, path, build(rec["cls"]))
            current = _get(root, path)
            constructed.add(path)
        restore_attrs(current, rec.get("attrs", {}), where)
    _get(root, path).train(rec.get("training", False))  # type: ignore[union-attr]
    return root


# Transforms replace a float module only by these (BatchNorm folded → Identity, ReLU6 fused
# into a conv → Identity): any other class difference means a different architecture.
_TRANSFORM_RESULTS = ("torch.nn.modules.linear:Identity", "quanta.nn.modules.fused:FusedActivation")
_SHAPE_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "groups",
                "num_embeddings", "embedding_dim", "input_size", "hidden_size", "num_layers", "bidirectional")


def _replaceable(current: nn.Module, recorded: str) -> bool:
    from ..integer.pooling import CODES_POOL
    from ..nn.modules.functional import Add, QuantAdd
    if isinstance(current, Add) and recorded == class_path(QuantAdd):  # what prepare made of it
        return True
    codes_pool_cls = CODES_POOL.get(type(current))  # a max-pool on a uint8 path (quanta.transforms.fuse)
    if codes_pool_cls is not None and recorded == class_path(codes_pool_cls):
        return True
    return recorded in _TRANSFORM_RESULTS


def _check_shape_attrs(current: nn.Module, config: dict[str, Any], where: str, cls: str) -> None:
    """An integer record replacing a float module must have that module's shape."""
    for name in _SHAPE_ATTRS:
        if name in config and hasattr(current, name):
            mine, theirs = getattr(current, name), config[name]
            norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v
            if norm(mine) != norm(theirs):
                raise ArchitectureError(f"module {where!r} has {name}={mine!r} in the model, but the file's {cls} "
                                        f"has {name}={theirs!r}: is this the same architecture?")
