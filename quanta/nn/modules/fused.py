"""`FusedActivation`: what an activation module becomes once an integer kernel applies it (the
integer conv, addition or Linear before it computes ReLU / ReLU6 / GELU in its epilogue).

It passes its input through, like ``nn.Identity``, and says which activation it was and which
module's kernel applies it now, so that `quanta.coverage` reports it as fused rather than float
and a saved file keeps that (its constructor arguments are its attributes)."""

from __future__ import annotations

import torch
from torch import nn


class FusedActivation(nn.Identity):
    """An activation module (``activation``: its class name) applied by ``into``'s kernel."""

    def __init__(self, activation: str = "", into: str = "", original: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(activation, str) or not isinstance(into, str):
            raise TypeError("FusedActivation(activation, into) takes two strings")
        self.activation = activation
        self.into = into
        # the user's activation module, kept out of the module tree (no record, no state): what the
        # speed check puts back if ``into`` goes back to float (absent in a loaded model)
        object.__setattr__(self, "original", original)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, into={self.into!r}"
