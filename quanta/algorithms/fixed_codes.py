"""Learned weight codes (AdaRound, GPTQ) handed to lowering without re-rounding: the weight
quantizer's range is frozen, the weight written as ``(codes - zero_point) * scale``, and the frozen
quantizer checked to give back exactly those codes, so that the simulated model and
`quanta.convert` compute with the learned codes."""

from __future__ import annotations

from typing import Any

import torch

from ..core.quantize import quantize
from ..nn.tensor_quantizer import TensorQuantizer
from ..transforms.capture import CaptureError


def freeze_range(wq: TensorQuantizer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The weight quantizer's scale / zero point for ``w``, made independent of the weight (a
    tracked range is stored on the quantizer). Returns them and how to undo the freeze (None when
    there was nothing to freeze)."""
    scale, zp = (t.clone() for t in wq.qparams(w))
    if wq.amax is not None or not wq.track_tensor:
        return scale, zp, None
    wq.set_range(*wq.range_of(w))

    def undo() -> None:
        wq.amax, wq.amin, wq._cache = None, None, None

    return scale, zp, undo


def check_codes(wq: TensorQuantizer, w_new: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                codes: torch.Tensor, what: str) -> None:
    """Raise `CaptureError` unless the frozen ``wq`` keeps ``scale`` / ``zp`` for ``w_new`` and
    quantizes it to exactly ``codes`` (``what`` names them in the message)."""
    s2, z2 = wq.qparams(w_new)
    if not (torch.equal(s2, scale) and torch.equal(z2, zp)
            and torch.equal(quantize(w_new.float(), scale, zp, wq.spec).float(), codes)):
        raise CaptureError(f"its weight does not re-quantize to {what}")
