"""Modules for operations models perform outside modules: matmul, bmm, add, cat.

Put them where a model calls ``torch.matmul`` / ``+`` / ``torch.cat`` so those operands are
quantized too (attention scores, attention × values, residual additions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..descriptor import QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor
from .base import LayerQuantConfig
from .op_base import QuantOp


class QuantMatMul(QuantOp):
    """``torch.matmul(quant(a), quant(b))``."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self._q("input", a), self._q("other", b))


class QuantBMM(QuantOp):
    """``torch.bmm(quant(a), quant(b))`` for 3-D batches."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self._q("input", a), self._q("other", b))


class Add(nn.Module):
    """``a + b`` as a module (float). Put it where a model adds a residual (like torch.ao's
    ``FloatFunctional``): `quanta.prepare` turns it into a `QuantAdd` on the config's activation
    grid, and `quanta.convert` into an integer addition (`quanta.integer.Int8Add`) that keeps a
    CNN's activations uint8 across the residual connection."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class QuantAdd(QuantOp):
    """``quant(a) + quant(b)``: a residual connection."""

    @classmethod
    def from_float(cls, module: nn.Module, config: Any = None) -> QuantAdd:
        """From an `Add`: both operands quantized with ``config.input`` (a `LayerQuantConfig`)."""
        if not isinstance(module, Add):
            raise TypeError(f"QuantAdd.from_float expects a quanta.nn.Add, got {type(module).__name__}")
        config = LayerQuantConfig() if config is None else config
        new = cls(config.input)
        new.train(module.training)
        return new

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._q("input", a) + self._q("other", b)


class QuantCat(QuantOp):
    """``torch.cat`` with one quantizer shared by all inputs (one grid for the result)."""

    operand_names = ("input",)

    def __init__(self, dim: int = 0, quant_desc_input: QuantDescriptor | None = QUANT_DESC_8BIT_PER_TENSOR) -> None:
        super().__init__(quant_desc_input, None)
        self.dim = dim

    def forward(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self._q("input", t) for t in tensors], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
