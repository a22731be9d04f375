"""Named quantization recipes for `quanta.quantize`."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..nn import LayerQuantConfig, QuantDescriptor, lookup
from .config import QuantConfig

#: weights: int8 symmetric narrow range, one scale per output channel (what the kernels use)
W8 = QuantDescriptor(per_channel=True, narrow_range=True)
#: ``weight_bits=7``: narrow [-63, 63] codes, within ±64, where oneDNN's u8 × s8 sums cannot saturate
#: on CPUs without VNNI (`quanta.kernels.u8s8_saturation`), so int8 layers run oneDNN there
W7 = dataclasses.replace(W8, num_bits=7)


def _weights(weight_bits: int) -> QuantDescriptor:
    if isinstance(weight_bits, bool) or weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 8 or 7 (7: exact on oneDNN without VNNI), got {weight_bits!r}")
    return W8 if weight_bits == 8 else W7


#: activations after ReLU etc.: affine uint8 per tensor, calibrated (what oneDNN/x86 int8 uses)
A8_STATIC = QuantDescriptor(unsigned=True, symmetric=False, calib_method="percentile", percentile=99.999)
A8_DYNAMIC_TOKEN = QuantDescriptor(per_token=True, symmetric=False, unsigned=True)
A8_DYNAMIC = QuantDescriptor(dynamic=True, symmetric=False, unsigned=True)

_RNN = ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell")
_FLOAT_ELSEWHERE = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                    "Embedding", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
                    "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "MultiheadAttention")
#: an encoder layer is swapped without quantizers of its own, so that its Linear layers are
#: quantized and torch's fused fast path (which would read their float weights) stays off
_ENCODER_LAYER = LayerQuantConfig(input=None, weight=None)


def _only_linear_and_rnn(linear: LayerQuantConfig, rnn: LayerQuantConfig | None) -> QuantConfig:
    types: dict[str, LayerQuantConfig | None] = {name: None for name in _FLOAT_ELSEWHERE}
    types["TransformerEncoderLayer"] = _ENCODER_LAYER
    for name in _RNN:
        types[name] = rnn
    return QuantConfig(default=linear, module_types=types, fold_bn=True)


def _attention_matmuls(attention_matmuls: bool) -> dict[str, LayerQuantConfig | None]:
    """The `QuantConfig.module_types` entry for ``attention_matmuls``: none when on (the default:
    `QuantMultiheadAttention` quantizes both matmul inputs on its input grid), ``QuantMatMul: None``
    when off (``Q·Kᵀ`` and ``softmax·V`` compute in float; `quanta.prepare`)."""
    if not isinstance(attention_matmuls, bool):
        raise ValueError(f"attention_matmuls must be True or False, got {attention_matmuls!r}")
    return {} if attention_matmuls else {"QuantMatMul": None}


def dynamic_int8(weight_bits: int = 8, attention_matmuls: bool = True) -> QuantConfig:
    """Linear (and MultiheadAttention's in/out projections): int8 per-channel weights × int8
    activations quantized per token at each call; Conv1d/2d/3d: int8 per-channel weights × uint8
    activations, one range per call (per tensor), on the int8 conv kernels; LSTM/GRU/RNN: int8
    weights, dynamic per-tensor activations. No calibration data needed. The rest stays float.
    ``weight_bits=7``: 7-bit weight codes (convs then run oneDNN on CPUs without VNNI; per-token
    Linears keep their kernels). ``attention_matmuls``: MultiheadAttention's ``Q·Kᵀ`` and
    ``softmax·V`` inputs quantized per token (simulated in float between the integer projections);
    ``False``: both matmuls in float."""
    W8 = _weights(weight_bits)
    matmuls = _attention_matmuls(attention_matmuls)
    config = _only_linear_and_rnn(LayerQuantConfig(input=A8_DYNAMIC_TOKEN, weight=W8),
                                  LayerQuantConfig(input=A8_DYNAMIC, weight=W8))
    conv = LayerQuantConfig(input=A8_DYNAMIC, weight=W8)
    # MultiheadAttention: its in/out projections on the integer Linear kernels, per token
    # (quanta.integer.attention; cross-attention too: each input gets its own per-token ranges)
    attention = LayerQuantConfig(input=A8_DYNAMIC_TOKEN, weight=W8)
    return dataclasses.replace(config, module_types={**config.module_types, "Conv1d": conv, "Conv2d": conv,
                                                     "Conv3d": conv, "MultiheadAttention": attention, **matmuls})


def static_int8(weight_bits: int = 8, attention_matmuls: bool = True) -> QuantConfig:
    """Conv and Linear: int8 per-channel weights × uint8 activations calibrated per tensor;
    BatchNorm folded; MultiheadAttention's in/out projections on the same grids (self-attention);
    pools and embeddings stay float; RNNs dynamic.
    ``weight_bits=7``: 7-bit weight codes, which oneDNN sums exactly on CPUs without VNNI (there
    int8 convs and Linears then run oneDNN instead of the slower exact paths).
    ``attention_matmuls``: MultiheadAttention's ``Q·Kᵀ`` and ``softmax·V`` inputs on calibrated
    grids (simulated in float between the integer projections); ``False``: both in float."""
    W8 = _weights(weight_bits)
    matmuls = _attention_matmuls(attention_matmuls)
    float_types: dict[str, LayerQuantConfig | None] = {
        name: None for name in ("Embedding", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
                                "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
                                "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")}
    float_types["TransformerEncoderLayer"] = _ENCODER_LAYER
    for name in _RNN:
        float_types[name] = LayerQuantConfig(input=A8_DYNAMIC, weight=W8)
    return QuantConfig(default=LayerQuantConfig(input=A8_STATIC, weight=W8), module_types={**float_types, **matmuls},
                       fold_bn=True)


#: weight-only layers run on bfloat16 activations and produce bfloat16 outputs (what torch's fast
#: CPU weight-only kernels compute); the simulation casts the same way, so the two agree
BF16 = QuantDescriptor(format="bf16", num_bits=16)


def weight_only_int8() -> QuantConfig:
    """Linear weights int8 per channel; activations and outputs bfloat16 (memory-bound decoding)."""
    return _only_linear_and_rnn(LayerQuantConfig(input=BF16, weight=W8, output=BF16), None)


def weight_only_int4(group_size: int = 128) -> QuantConfig:
    """Linear weights int4, asymmetric, one scale and zero point per ``group_size`` inputs;
    activations and outputs bfloat16."""
    if isinstance(group_size, bool) or group_size not in (32, 64, 128, 256):
        raise ValueError(f"group_size must be one of 32, 64, 128, 256, got {group_size}")
    w4 = QuantDescriptor(num_bits=4, group_size=group_size, symmetric=False)
    return _only_linear_and_rnn(LayerQuantConfig(input=BF16, weight=w4, output=BF16), None)


def w4a8() -> QuantConfig:
    """Linear weights int4 per channel (symmetric) × int8 activations per token, dynamic."""
    w4 = QuantDescriptor(num_bits=4, per_channel=True, narrow_range=True)
    return _only_linear_and_rnn(LayerQuantConfig(input=A8_DYNAMIC_TOKEN, weight=w4), None)


def _half(fmt: str) -> Callable[..., QuantConfig]:
    def build() -> QuantConfig:
        return _only_linear_and_rnn(LayerQuantConfig(input=None, weight=QuantDescriptor(format=fmt, num_bits=16)),
                                    None)

    build.__doc__ = f"Linear weights stored as {fmt}; activations float."
    return build


PRESETS: dict[str, Callable[..., QuantConfig]] = {
    "dynamic_int8": dynamic_int8,
    "static_int8": static_int8,
    "weight_only_int8": weight_only_int8,
    "weight_only_int4": weight_only_int4,
    "w4a8": w4a8,
    "fp16": _half("fp16"),
    "bf16": _half("bf16"),
}


_LINEAR_ONLY = "Linear layers (and transformers' Conv1D)"
#: what each preset quantizes, in words (for the error when a model has none of it)
COVERS: dict[str, str] = {
    "dynamic_int8": "Linear (and transformers' Conv1D), MultiheadAttention, Conv1d/2d/3d and LSTM/GRU/RNN layers",
    "static_int8": "Linear (and transformers' Conv1D), MultiheadAttention, Conv1d/2d/3d, quanta.nn.Add and "
                   "LSTM/GRU/RNN layers",
    "weight_only_int8": _LINEAR_ONLY, "weight_only_int4": _LINEAR_ONLY, "w4a8": _LINEAR_ONLY,
    "fp16": _LINEAR_ONLY, "bf16": _LINEAR_ONLY,
}


def quantizes_any(model: nn.Module, config: QuantConfig) -> bool:
    """Whether `quanta.prepare` with ``config`` would quantize some module of ``model`` (by the
    config's decisions and the registry; without copying the model)."""
    return any(lookup(m) is not None and config.decide(n, m).config is not None
               for n, m in model.named_modules())


#: options every preset takes (`QuantConfig.extended`): patterns that stay float, per-name rules,
#: PTQ algorithms the pipeline runs (`quanta.algorithms`) and their options
COMMON_OPTIONS = ("exclude", "rules", "algorithms", "algorithm_options")


def preset_options(name: str) -> tuple[str, ...]:
    """The options preset ``name`` takes (its own, then `COMMON_OPTIONS`)."""
    return tuple(inspect.signature(PRESETS[name]).parameters) + COMMON_OPTIONS


def preset(name: str, **options: Any) -> QuantConfig:
    """The `QuantConfig` of a named preset.

    Options: ``exclude=[names or globs]`` (those modules stay float), ``rules={name or glob:
    LayerQuantConfig or None}`` (they win over the preset's choices), ``algorithms=["cle",
    "bias_correction", ...]`` (`quanta.algorithms`) with ``algorithm_options={name: {option: value}}``,
    ``group_size=`` for ``weight_only_int4``, ``weight_bits=`` (8 or 7) and ``attention_matmuls=``
    (MultiheadAttention's ``Q·Kᵀ`` / ``softmax·V`` inputs quantized, the default, or float) for
    ``static_int8`` / ``dynamic_int8``. An option a preset does not take raises ``ValueError``.
    """
    if not isinstance(name, str):
        raise TypeError(f"preset name must be a str, got {type(name).__name__}")
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=2, cutoff=0.5)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint}; choose one of {sorted(PRESETS)}")
    takes = preset_options(name)
    unknown = [k for k in options if k not in takes]
    if unknown:
        users = [p for p in PRESETS if all(k in preset_options(p) for k in unknown)]
        hint = f"; {', '.join(map(repr, unknown))} applies to {', '.join(map(repr, users))}" if users else ""
        raise ValueError(f"preset {name!r} takes no option {', '.join(map(repr, unknown))} "
                         f"(its options: {', '.join(takes)}){hint}")
    common = {k: options.pop(k) for k in COMMON_OPTIONS if k in options}
    config = PRESETS[name](**options)
    return config.extended(**common) if common else config
