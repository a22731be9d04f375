"""Integer execution modules: integer weights, integer kernels (see `IntegerModule`)."""

from __future__ import annotations

from .base import IntegerModule, storage_bytes


def lowering_classes() -> list[type]:
    """Integer classes `convert` tries, most specific first (each has ``accepts``/``from_simulated``)."""
    from . import add, attention, conv, dynamic_conv, embedding, linear, padded_conv, recurrent, weight_only

    classes: list[type] = []
    for mod, names in (
        (linear, ("Int8Linear",)),
        (weight_only, ("Int4WeightOnlyLinear", "Int8WeightOnlyLinear", "HalfLinear")),
        (conv, ("Int8Conv1d", "Int8Conv2d", "Int8Conv3d")),
        (padded_conv, ("Int8PaddedConv1d", "Int8PaddedConv2d", "Int8PaddedConv3d")),
        (dynamic_conv, ("DynamicInt8Conv1d", "DynamicInt8Conv2d", "DynamicInt8Conv3d")),
        (recurrent, ("DynamicInt8LSTM", "DynamicInt8GRU", "DynamicInt8RNN", "DynamicInt8LSTMCell",
                     "DynamicInt8GRUCell", "DynamicInt8RNNCell")),
        (embedding, ("Int8Embedding", "Int4Embedding")),
        (add, ("Int8Add",)),
        (attention, ("Int8MultiheadAttention",)),
    ):
        classes += [getattr(mod, n) for n in names]
    return classes


__all__ = ["IntegerModule", "lowering_classes", "storage_bytes"]
