"""`MovingAverageCalibrator`: the average of the per-batch minima and maxima."""

from __future__ import annotations

from typing import Any

import torch

from .base import Calibrator


class MovingAverageCalibrator(Calibrator):
    """Range = an average over batches of each batch's ``(min, max)``.

    - ``momentum=None``: the arithmetic mean over all batches. State: ``min_sum``,
      ``max_sum`` (float64) and the batch count ``num_batches``; merge adds them. Float64
      sums of float32 extremes are exact (so merging is exact and order-independent) unless
      the extremes span more than about ``2^29 / num_batches`` in magnitude.
    - ``momentum=m`` in ``(0, 1]``: an exponential moving average,
      ``avg = avg + m * (batch - avg)`` starting from the first batch, exactly like
      ``torch.ao.quantization.MovingAverageMinMaxObserver(averaging_constant=m)``. State:
      ``min_avg``, ``max_avg`` (float32). An EMA depends on the order of the batches, so two
      EMA states cannot be merged exactly: `merge` takes their mean weighted by batch counts,
      an approximation (exact only when both saw batches with the same extremes).

    Per-tensor (``axis=None``, ranges ``[]``) or per kept axis (``axis=a``, ranges ``[C]``).
    """

    def __init__(
        self,
        momentum: float | None = None,
        num_bits: int = 8,
        axis: int | None = None,
        unsigned: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(num_bits=num_bits, axis=axis, unsigned=unsigned, name=name)
        if momentum is not None:
            if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
                raise TypeError(f"momentum must be a float or None, got {type(momentum).__name__}")
            momentum = float(momentum)
            if not 0.0 < momentum <= 1.0:
                raise ValueError(f"momentum must be in (0, 1] (or None for the plain mean), got {momentum}")
        self._momentum = momentum

    @property
    def momentum(self) -> float | None:
        return self._momentum

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "momentum": self._momentum}

    def _state_keys(self) -> tuple[str, ...]:
        return ("min_sum", "max_sum") if self._momentum is None else ("min_avg", "max_avg")

    def _update(self, x: torch.Tensor, axis: int | None) -> None:
        lo, hi = self._aminmax(x, axis)
        k_lo, k_hi = self._state_keys()
        if self._momentum is None:
            lo, hi = lo.double(), hi.double()
        if not self._state:
            self._state = {k_lo: lo, k_hi: hi}
            return
        self._check_channels(lo, k_lo)
        old_lo, old_hi = self._state[k_lo], self._state[k_hi]
        if self._momentum is None:
            self._state[k_lo], self._state[k_hi] = old_lo + lo, old_hi + hi
        else:  # same operations, in the same order, as torch's MovingAverageMinMaxObserver
            m = self._momentum
            self._state[k_lo] = old_lo + m * (lo - old_lo)
            self._state[k_hi] = old_hi + m * (hi - old_hi)

    def _merge(self, other_state: dict[str, torch.Tensor], other_batches: int) -> None:
        for key in self._state_keys():
            mine, theirs = self._state[key], other_state[key]
            if self._momentum is None:
                self._state[key] = mine + theirs
            else:
                n_a, n_b = float(self._num_batches), float(other_batches)
                mixed = (mine.double() * n_a + theirs.double() * n_b) / (n_a + n_b)
                self._state[key] = mixed.to(torch.float32)

    def _range(self, **method_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if method_kwargs:
            raise TypeError(f"{type(self).__name__}.compute_range takes no arguments, got {sorted(method_kwargs)}")
        k_lo, k_hi = self._state_keys()
        lo, hi = self._state[k_lo], self._state[k_hi]
        if self._momentum is None:
            lo, hi = lo / self._num_batches, hi / self._num_batches
        return lo.to(torch.float32), hi.to(torch.float32)

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        dtype = torch.float64 if self._momentum is None else torch.float32
        self._check_range_state(state, self._state_keys(), dtype)
