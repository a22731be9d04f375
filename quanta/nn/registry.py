"""The float → quantized module registry (users can register their own)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .modules import attention, functional, pooling, rnn, weighted

_REGISTRY: dict[type, type] = {}


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
    return dict(_REGISTRY)


def lookup(module_or_type: Any) -> type | None:
    """The quantized class for a module (or type): the closest registered base in its MRO."""
    cls = module_or_type if isinstance(module_or_type, type) else type(module_or_type)
    if _is_quantized(cls):
        return None
    for base in cls.__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
    return None


def _is_quantized(cls: type) -> bool:
    from .modules.base import QuantModule
    from .modules.functional import QuantOp

    return issubclass(cls, (QuantModule, QuantOp)) or cls in _REGISTRY.values()
