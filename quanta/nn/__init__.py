"""Simulation layer: `TensorQuantizer`, `QuantDescriptor`, quantized modules, the registry."""

from .descriptor import (
    QUANT_DESC_8BIT_PER_TENSOR,
    QUANT_DESC_8BIT_WEIGHT_PER_CHANNEL,
    QuantDescriptor,
)
from .modules import *  # noqa: F403
from .modules import __all__ as _modules_all
from .registry import lookup, register_quant_module, registered_types, reset_registry, unregister_quant_module
from .tensor_quantizer import TensorQuantizer

__all__ = [
    "QUANT_DESC_8BIT_PER_TENSOR", "QUANT_DESC_8BIT_WEIGHT_PER_CHANNEL", "QuantDescriptor",
    "TensorQuantizer", "lookup", "register_quant_module", "registered_types", "reset_registry",
    "unregister_quant_module",
]
__all__.extend(_modules_all)
