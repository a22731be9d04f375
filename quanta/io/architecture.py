"""How a module is constructed: recorded as data at save, rebuilt at load through an allow-list.

A record names a class by import path (``"torch.nn.modules.conv:Conv2d"``) and its constructor
keyword arguments as JSON values. Rebuilding by import path is a way to run code (a record
could name ``os:system``), so `import_class` imports only modules under the allow-list
(``torch.nn``, ``quanta``) or what the caller trusts, and only returns ``nn.Module`` classes.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..integer.base import IntegerModule
from ..integer.validate import check_geometry_kwargs
from ..nn.modules.base import QuantModule
from ..nn.modules.base import float_class_of as float_class
from .safe_file import QuantaFileError

#: import paths loading may always import (prefixes end with a dot or name a whole module)
ALLOWED_MODULES = ("torch.nn", "quanta")

_SKIP_PARAMS = ("device", "dtype")


class ArchitectureError(QuantaFileError):
    """The file's architecture cannot be rebuilt (missing arguments, a class not allowed...)."""


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_jsonable(v) for v in value)
    return False


def _signature_params(cls: type) -> list[inspect.Parameter] | None:
    """Named constructor parameters; for ``__init__(*args, **kwargs)`` (``nn.LSTM``) those of the
    first class up the MRO that names them. None when no class does."""
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        try:
            params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]
        except (TypeError, ValueError):
            return None
        named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if named:
            if klass is not cls:  # a var-args subclass fixes some (nn.LSTM passes mode itself)
                named = [p for p in named if p.name != "mode"]
            return named
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            return []
    return []  # only *args/**kwargs all the way up (nn.Identity): nothing to pass


def infer_kwargs(module: nn.Module, cls: type | None = None) -> tuple[dict[str, Any] | None, str]:
    """Constructor keyword arguments of ``cls`` (default: `float_class`) read back from the
    module's attributes of the same names (``nn.Conv2d.in_channels``...). Returns
    ``(kwargs, "")`` or ``(None, why)``. Tensors standing for a boolean flag (``bias``) count as
    ``True``, ``None`` as ``False``."""
    cls = float_class(module) if cls is None else cls
    params = _signature_params(cls)
    if params is None:
        return None, f"{cls.__qualname__}.__init__ has no readable signature"
    kwargs: dict[str, Any] = {}
    for p in params:
        if p.name in _SKIP_PARAMS:
            continue
        has = p.name in module.__dict__ or hasattr(module, p.name)
        value = getattr(module, p.name, None) if has else None
        if has and isinstance(p.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None  # bias=True / False, stored as a tensor or None
        if has and _jsonable(value):
            kwargs[p.name] = list(value) if isinstance(value, tuple) else value
        elif has and p.default is not inspect.Parameter.empty and value is p.default:
            continue
        elif p.default is inspect.Parameter.empty:
            return None, f"{cls.__qualname__}.__init__ argument {p.name!r} is not stored on the module"
        elif has and p.name in module.__dict__ and not isinstance(value, (nn.Module, torch.Tensor)):
            return None, f"{cls.__qualname__}.__init__ argument {p.name!r} holds a {type(value).__name__}"
    return kwargs, ""


def _allowed(module_name: str, trusted: Iterable[str]) -> bool:
    for prefix in (*ALLOWED_MODULES, *trusted):
        prefix = prefix.rstrip(".")
        if module_name == prefix or module_name.startswith(prefix + "."):
            return True
    return False


def normalize_trusted(trusted: Iterable[Any] | None) -> tuple[dict[str, type], tuple[str, ...]]:
    """``trusted=`` entries: classes (exact) or module-path prefixes (strings)."""
    classes: dict[str, type] = {}
    prefixes: list[str] = []
    for t in trusted or ():
        if isinstance(t, type):
            classes[class_path(t)] = t
        elif isinstance(t, str) and t:
            prefixes.append(t)
        else:
            raise TypeError(f"trusted= takes classes or module-path strings, got {t!r}")
    return classes, tuple(prefixes)


def import_class(path: str, trusted: Iterable[Any] | None = None) -> type:
    """The ``nn.Module`` class at ``"module:QualName"``, imported only if allowed."""
    classes, prefixes = normalize_trusted(trusted)
    if not isinstance(path, str) or path.count(":") != 1:
        raise ArchitectureError(f"malformed class path {str(path)[:100]!r} (expected 'package.module:Class')")
    if path in classes:
        return classes[path]
    module_name, qualname = path.split(":")
    if not _allowed(module_name, prefixes):
        raise ArchitectureError(
            f"refusing to import {path!r}: loading imports only torch.nn and quanta classes. If you trust "
            f"this file, pass trusted=[{qualname.split('.')[-1]}] (the class) or trusted=[{module_name!r}] "
            "to quanta.load, or pass model= (a freshly built float model or a factory)")
    if not all(part.isidentifier() for part in (*module_name.split("."), *qualname.split("."))):
        raise ArchitectureError(f"malformed class path {path!r} (expected 'package.module:Class')")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # an allowed module failing to import: say which
        raise ArchitectureError(f"cannot import {path!r}: {e}") from e
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ArchitectureError(f"{path!r} is not an nn.Module class; refusing to call it")
    if obj.__module__ != module_name or obj.__qualname__ != qualname:
        # reached through another module's attributes (torch.nn:modules.module.torch.jit.ScriptModule):
        # only a class defined where the path says counts as allowed
        raise ArchitectureError(f"refusing to import {path!r}: it resolves to {class_path(obj)}, which is not "
                                "defined at that path")
    if issubclass(obj, (QuantModule, IntegerModule)):
        raise ArchitectureError(f"{path!r} is a quantized class; a record's class must be the float one")
    return obj


def construct(path: str, kwargs: dict[str, Any] | None, where: str, trusted: Iterable[Any] | None = None,
              why: str = "", meta: bool = False) -> nn.Module:
    """``path(**kwargs)`` behind the allow-list, its geometry arguments range-checked; ``meta``:
    on the meta device (shapes only, no memory)."""
    if kwargs is None:
        raise ArchitectureError(f"the file does not record how to construct {where!r} ({path}"
                                f"{': ' + why if why else ''}); pass model= (a freshly built float model or a "
                                "factory)")
    if not isinstance(kwargs, dict):
        raise ArchitectureError(f"constructor arguments of {where!r} must be a mapping, got {type(kwargs).__name__}")
    if not all(isinstance(k, str) and k.isidentifier() for k in kwargs) or not _jsonable(list(kwargs.values())):
        raise ArchitectureError(f"constructor arguments of {where!r} must be named JSON values")
    cls = import_class(path, trusted)
    try:
        check_geometry_kwargs(f"module {where!r} ({path})", kwargs)
    except (TypeError, ValueError) as e:
        raise ArchitectureError(str(e)) from e
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        if meta:
            with torch.device("meta"):
                return cls(**args)
        return cls(**args)
    except Exception as e:
        raise ArchitectureError(f"constructing {where!r} as {path}({str(kwargs)[:200]}) failed: {e}") from e
