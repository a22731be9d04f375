"""`QuantOp`: the base of functional-op modules (matmul, add, ...), in its own module so that
`base.py` can recognise them without importing `functional.py` (which builds on `base.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..descriptor import QUANT_DESC_8BIT_PER_TENSOR, QuantDescriptor
from ..tensor_quantizer import TensorQuantizer


class QuantOp(nn.Module):
    """Base of functional-op modules: named input quantizers, no parameters."""

    operand_names: tuple[str, ...] = ("input", "other")

    def __init__(self, quant_desc_input: QuantDescriptor | None = QUANT_DESC_8BIT_PER_TENSOR,
                 quant_desc_other: QuantDescriptor | None | Any = "same") -> None:
        super().__init__()
        other = quant_desc_input if quant_desc_other == "same" else quant_desc_other
        descs = (quant_desc_input, other)
        for name, desc in zip(self.operand_names, descs):
            setattr(self, f"{name}_quantizer", None if desc is None else TensorQuantizer(desc))

    def quantizers(self) -> Iterator[tuple[str, TensorQuantizer]]:
        for name in self.operand_names:
            q = getattr(self, f"{name}_quantizer", None)
            if q is not None:
                yield name, q

    def any_quantizer_active(self) -> bool:
        return any(q.active for _, q in self.quantizers())

    def _q(self, name: str, t: torch.Tensor) -> torch.Tensor:
        q = getattr(self, f"{name}_quantizer", None)
        return t if q is None else q(t)
