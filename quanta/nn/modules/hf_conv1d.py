"""Hugging Face transformers' ``Conv1D`` (GPT-2, GPT, ...): a Linear whose weight is stored ``[in, out]``.

``Conv1D.forward`` is ``addmm(bias, x, weight)``: ``y = x @ W + b``, i.e. ``F.linear(x, W.T, b)``.
quanta quantizes it like a Linear: per output channel is axis 1 of ``W`` and groups run along
axis 0 (the inputs). The class is registered by its path (``transformers.pytorch_utils.Conv1D``),
so quanta never imports transformers: the quantized class is built the first time a model holding
a ``Conv1D`` is prepared (`quant_conv1d_class`). ``convert`` lowers it through `linear_view`, an
equivalent `QuantLinear` on the transposed weight, so every integer Linear kind applies.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from .base import QuantModule
from .weighted import QuantLinear

#: where transformers defines the class (also its import path)
HF_CONV1D_PATH = "transformers.pytorch_utils.Conv1D"
_NAME = "QuantHFConv1D"
_CLASSES: dict[type, type] = {}


class _HFConv1DMixin:
    """What the quantized ``Conv1D`` adds: its weight axes and its Linear view."""

    weight_channel_axis = 1  # W is [in, out]: one scale per output = per column
    weight_reduce_axis = 0

    def linear_view(self) -> QuantLinear:
        """A `QuantLinear` computing what this module computes: the transposed weight (a copy),
        the same bias, the same input / output quantizers (ranges included) and a weight
        quantizer of the same descriptor on the Linear's axes (the same scales)."""
        mod: Any = self
        w = mod.weight.detach()
        float_linear = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device="meta")
        float_linear.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
        if mod.bias is not None:
            float_linear.bias = nn.Parameter(mod.bias.detach(), requires_grad=False)
        view = QuantLinear.from_float(float_linear, mod.quant_config)
        view.input_quantizer, view.output_quantizer = mod.input_quantizer, mod.output_quantizer
        if mod.weight_quantizer is not None and not mod.weight_quantizer.is_enabled:
            view.weight_quantizer.disable()
        wq = mod.weight_quantizer
        if wq is not None and wq.amax is not None and view.weight_quantizer is not None:
            # a fixed weight range (e.g. frozen by GPTQ): the same range on the transposed axes
            turn = (lambda t: t.detach().t() if t.dim() == 2 else t.detach())  # [in // g, out] -> [out, in // g]
            view.weight_quantizer.set_range(None if wq.amin is None else turn(wq.amin), turn(wq.amax))
        view.train(mod.training)
        return view


def quant_conv1d_class(float_cls: type) -> type:
    """The quantized class of transformers' ``Conv1D`` (``float_cls``), built once."""
    if float_cls not in _CLASSES:
        cls = type(_NAME, (_HFConv1DMixin, QuantModule, float_cls),
                   {"float_type": float_cls, "__module__": __name__, "__qualname__": _NAME,
                    "__doc__": "transformers' Conv1D with quantized input and weight (see quanta.nn.modules.hf_conv1d)."})
        _CLASSES[float_cls] = cls
    return _CLASSES[float_cls]


def __getattr__(name: str) -> Any:
    # ``quanta.nn.modules.hf_conv1d.QuantHFConv1D`` (how pickle finds the class) once transformers is there
    if name == _NAME:
        module = sys.modules.get(HF_CONV1D_PATH.rpartition(".")[0])
        if module is None:
            import importlib

            module = importlib.import_module(HF_CONV1D_PATH.rpartition(".")[0])
        return quant_conv1d_class(getattr(module, HF_CONV1D_PATH.rpartition(".")[2]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
