"""`MaxCalibrator`: the running minimum and maximum (per tensor or per kept axis)."""

from __future__ import annotations

from typing import Any

import torch

from .base import Calibrator


class MaxCalibrator(Calibrator):
    """Range = the smallest and largest value seen.

    ``axis=None``: one range, shape ``[]``. ``axis=a``: one range per index along the kept
    axis ``a`` (every other dimension is reduced), shape ``[x.shape[a]]``; e.g. NCHW
    activations with ``axis=1`` give ``[C]``.

    State: ``min``, ``max`` (float32). Merge takes the elementwise min / max, which is exact
    and order-independent (a distributed all-reduce with ``MIN`` / ``MAX``).
    """

    def _state_keys(self) -> tuple[str, ...]:
        return ("min", "max")

    def _update(self, x: torch.Tensor, axis: int | None) -> None:
        lo, hi = self._aminmax(x, axis)
        if not self._state:
            self._state = {"min": lo, "max": hi}
            return
        self._check_channels(lo, "min")
        self._state["min"] = torch.minimum(self._state["min"], lo)
        self._state["max"] = torch.maximum(self._state["max"], hi)

    def _merge(self, other_state: dict[str, torch.Tensor], other_batches: int) -> None:
        self._state["min"] = torch.minimum(self._state["min"], other_state["min"])
        self._state["max"] = torch.maximum(self._state["max"], other_state["max"])

    def _range(self, **method_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if method_kwargs:
            raise TypeError(f"{type(self).__name__}.compute_range takes no arguments, got {sorted(method_kwargs)}")
        return self._state["min"], self._state["max"]

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        self._check_range_state(state, ("min", "max"), torch.float32)
        if bool((state["min"] > state["max"]).any()):
            raise ValueError(f"{self.label}: state 'min' exceeds 'max'")
