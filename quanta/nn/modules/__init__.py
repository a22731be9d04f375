"""Quantized (simulation) modules."""

from .attention import QuantMultiheadAttention, QuantTransformerEncoderLayer
from .base import LayerQuantConfig, QuantModule
from .functional import Add, QuantAdd, QuantBMM, QuantCat, QuantMatMul, QuantOp
from .fused_attention import ScaledDotProductAttention
from .pooling import (
    QuantAdaptiveAvgPool1d,
    QuantAdaptiveAvgPool2d,
    QuantAdaptiveAvgPool3d,
    QuantAvgPool1d,
    QuantAvgPool2d,
    QuantAvgPool3d,
)
from .rnn import QuantGRU, QuantGRUCell, QuantLSTM, QuantLSTMCell, QuantRNN, QuantRNNCell
from .weighted import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantEmbedding,
    QuantLinear,
)

__all__ = [
    "LayerQuantConfig", "QuantAdaptiveAvgPool1d", "QuantAdaptiveAvgPool2d", "QuantAdaptiveAvgPool3d",
    "Add", "QuantAdd", "QuantAvgPool1d", "QuantAvgPool2d", "QuantAvgPool3d", "QuantBMM", "QuantCat",
    "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantConvTranspose1d", "QuantConvTranspose2d",
    "QuantConvTranspose3d", "QuantEmbedding", "QuantGRU", "QuantGRUCell", "QuantLSTM", "QuantLSTMCell",
    "QuantLinear", "QuantMatMul", "QuantModule", "QuantMultiheadAttention", "QuantOp", "QuantRNN",
    "QuantRNNCell", "QuantTransformerEncoderLayer", "ScaledDotProductAttention",
]
