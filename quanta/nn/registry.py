"""The float → quantized module registry (users can register their own)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from .modules import attention, functional, hf_conv1d, pooling, rnn, weighted

_REGISTRY: dict[type, type] = {}

#: float classes of other libraries, named by import path so that quanta never imports them:
#: path -> builder of the quantized class from the float class (registered on first sight)
BY_PATH: dict[str, Callable[[type], type]] = {hf_conv1d.HF_CONV1D_PATH: hf_conv1d.quant_conv1d_class}


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_loaded() -> None:
    """Register the by-path classes whose library is already imported (never imports it)."""
    for path, build in BY_PATH.items():
        module_name, _, cls_name = path.rpartition(".")
        float_cls = getattr(sys.modules.get(module_name), cls_name, None)
        if isinstance(float_cls, type) and float_cls not in _REGISTRY:
            _REGISTRY[float_cls] = build(float_cls)


def known_type_names() -> set[str]:
    """Class names a `QuantConfig.module_types` key may use without naming a class of the model:
    every registered float class and its bases, and the by-path classes."""
    _resolve_loaded()
    names = {path.rpartition(".")[2] for path in BY_PATH}
    for float_cls in _REGISTRY:
        names.update(c.__name__ for c in float_cls.__mro__)
    return names


#: the quantized classes quanta ships, in one place (the registry and the patch both use it)
BUILTIN_QUANT_CLASSES: tuple[type, ...] = (
    weighted.QuantLinear, weighted.QuantConv1d, weighted.QuantConv2d, weighted.QuantConv3d,
    weighted.QuantConvTranspose1d, weighted.QuantConvTranspose2d, weighted.QuantConvTranspose3d,
    weighted.QuantEmbedding,
    pooling.QuantAvgPool1d, pooling.QuantAvgPool2d, pooling.QuantAvgPool3d,
    pooling.QuantAdaptiveAvgPool1d, pooling.QuantAdaptiveAvgPool2d, pooling.QuantAdaptiveAvgPool3d,
    rnn.QuantLSTM, rnn.QuantLSTMCell, rnn.QuantGRU, rnn.QuantGRUCell, rnn.QuantRNN, rnn.QuantRNNCell,
    attention.QuantMultiheadAttention, attention.QuantTransformerEncoderLayer,
)


def _builtin() -> dict[type, type]:
    return {**{c.float_type: c for c in BUILTIN_QUANT_CLASSES}, functional.Add: functional.QuantAdd}


_REGISTRY.update(_builtin())


def register_quant_module(float_cls: type, quant_cls: type, replace: bool = False) -> None:
    """Map ``float_cls`` (and its subclasses without a closer entry) to ``quant_cls``.

    ``quant_cls`` needs a classmethod ``from_float(module, config)`` returning the quantized
    module (subclass `quanta.nn.QuantModule` to get one that keeps the float forward).
    """
    if not isinstance(float_cls, type) or not issubclass(float_cls, nn.Module):
        raise TypeError(f"float_cls must be an nn.Module subclass, got {float_cls!r}")
    if not callable(getattr(quant_cls, "from_float", None)):
        raise TypeError(f"{getattr(quant_cls, '__name__', quant_cls)!r} has no from_float(module, config)")
    if float_cls in _REGISTRY and not replace and _REGISTRY[float_cls] is not quant_cls:
        raise ValueError(f"{float_cls.__name__} is already mapped to {_REGISTRY[float_cls].__name__}; "
                         "pass replace=True to override")
    _REGISTRY[float_cls] = quant_cls


def unregister_quant_module(float_cls: type) -> None:
    if float_cls not in _REGISTRY:
        raise KeyError(f"{getattr(float_cls, '__name__', float_cls)} is not registered")
    del _REGISTRY[float_cls]


def reset_registry() -> None:
    """Back to the built-in mapping (drops user registrations)."""
    _REGISTRY.clear()
    _REGISTRY.update(_builtin())


def registered_types() -> dict[type, type]:
    _resolve_loaded()
    return dict(_REGISTRY)


def lookup(module_or_type: Any) -> type | None:
    """The quantized class for a module (or type): the closest registered base in its MRO."""
    cls = module_or_type if isinstance(module_or_type, type) else type(module_or_type)
    if _is_quantized(cls):
        return None
    for base in cls.__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
        build = BY_PATH.get(_path(base))
        if build is not None:
            _REGISTRY[base] = build(base)
            return _REGISTRY[base]
    return None


def _is_quantized(cls: type) -> bool:
    from .modules.base import QuantModule
    from .modules.functional import QuantOp

    return issubclass(cls, (QuantModule, QuantOp)) or cls in _REGISTRY.values()
