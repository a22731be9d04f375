"""`HistogramCalibrator`: a histogram of ``|x|`` with exact, order-independent merging.

Binning: bins of width ``w = 2^k`` starting at 0, bin ``i`` covers ``[i*w, (i+1)*w)``; ``k`` is
the smallest integer with ``amax < num_bins * 2^k`` (``amax`` = the largest ``|x|`` seen). When
new data exceed the covered range, adjacent bins are summed in pairs until they fit (``w``
doubles each time). This is exact: ``x / 2^k`` is exact in float64 for every float32 ``x``,
and ``floor(x / 2w) == floor(floor(x / w) / 2)``. So the state is a function of the multiset
of values only: batches in any order, or split between calibrators and merged, give
bit-identical histograms.

Exact zeros (a ReLU's clamped half, zero pixels, padding) are also counted apart (``zeros``):
every grid represents 0 exactly, so they carry no evidence about where to clip, yet in bin 0
they form a spike that TensorRT's KL search can only reproduce with a group of one bin, i.e. at
its smallest candidate threshold. The entropy method therefore searches the histogram of the
non-zero values (NVIDIA's pytorch-quantization patches the same spike with ``bins[0] = bins[1]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from . import histogram_ranges as hr
from .base import Calibrator

_FLOAT32_LOG2_TINY = -149  # the smallest float32 subnormal is 2^-149


class HistogramCalibrator(Calibrator):
    """Collects a histogram of ``|x|`` (per tensor only) and picks a range from it.

    Ranges are ``(-amax, amax)`` if any negative value was seen, else ``(0, amax)``, with
    ``amax`` chosen by ``compute_range(method=...)`` (default: the constructor's ``method``):

    - ``"max"``: the exact largest ``|x|`` (tracked apart from the histogram);
    - ``"percentile"`` (``percentile=99.99``): upper edge of the bin where the CDF of ``|x|``
      reaches ``percentile`` %;
    - ``"mse"`` (``start_bin=1``, ``stride=1``): the bin edge minimising the expected squared
      error of quantizing the bin centres (symmetric ``num_bits`` grid, signed unless
      ``unsigned``), over edges ``start_bin, start_bin + stride, ...``;
    - ``"entropy"`` (``start_bin`` = the grid's levels on ``|x|``, ``stride=1``): TensorRT's
      KL-divergence threshold (see `histogram_ranges.kl_divergences`) on the histogram of the
      non-zero values (exact zeros: see the module docstring).

    ``amax`` never exceeds the largest ``|x|`` seen. The error models of ``mse``/``entropy``
    see ``|x|`` on the grid's levels per side of zero: ``2^bits`` when ``unsigned`` and no
    negative value was seen (range ``(0, amax)``), else ``2^(bits-1)`` (a signed grid, or an
    affine unsigned grid stretched over ``(-amax, amax)``).

    State: ``hist`` (int64 ``[num_bins]``), ``log2_width`` (int64, ``k``), ``amax`` (float32),
    ``has_negative`` (bool), ``zeros`` (int64, how many values were exactly 0; all in bin 0).
    Merge: coarsen both to the larger ``k``, add ``hist``; max of ``amax``; or of
    ``has_negative``; add ``zeros``.
    """

    def __init__(
        self,
        num_bins: int = 2048,
        *,
        method: str = "max",
        percentile: float = 99.99,
        start_bin: int | None = None,
        stride: int = 1,
        num_bits: int = 8,
        axis: int | None = None,
        unsigned: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(num_bits=num_bits, axis=axis, unsigned=unsigned, name=name)
        if axis is not None:
            raise ValueError(f"HistogramCalibrator is per-tensor only: axis must be None, got {axis}")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
        self._num_bins = num_bins
        self._method = _check_method(method)
        self._defaults = _method_kwargs(percentile=percentile, start_bin=start_bin, stride=stride)
        # Floor of k, reached only by all-zero data: below it no non-zero float32 fits.
        self._min_log2_width = _FLOAT32_LOG2_TINY - num_bins.bit_length()

    @property
    def num_bins(self) -> int:
        return self._num_bins

    @property
    def method(self) -> str:
        """The method `compute_range` uses when called without one."""
        return self._method

    @property
    def bin_width(self) -> float:
        """Current bin width ``2^k`` (raises before any data)."""
        if not self._state:
            raise ValueError(f"{self.label} has seen no data; the bin width is not set yet")
        return math.ldexp(1.0, int(self._state["log2_width"]))

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "num_bins": self._num_bins}

    def _state_keys(self) -> tuple[str, ...]:
        return ("hist", "log2_width", "amax", "has_negative", "zeros")

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", method={self._method!r})"

    # ------------------------------------------------------------------ binning
    def _log2_width_for(self, amax: float) -> int:
        """The smallest ``k`` (at least the floor) with ``amax < num_bins * 2^k``."""
        k = self._min_log2_width
        if amax > 0:  # frexp: 2^(e-1) <= amax < 2^e; start one step below the answer
            k = max(k, math.frexp(amax)[1] - self._num_bins.bit_length() - 1)
            while not amax < math.ldexp(self._num_bins, k):
                k += 1
        return k

    def _update(self, x: torch.Tensor, axis: int | None) -> None:
        magnitude = x.abs().reshape(-1)
        batch_amax = float(magnitude.max())
        negative = bool((x < 0).any())
        zeros = torch.count_nonzero(magnitude == 0)
        if self._state:
            amax = max(batch_amax, float(self._state["amax"]))
            negative = negative or bool(self._state["has_negative"])
            zeros = zeros + self._state["zeros"]
        else:
            amax = batch_amax
        k = self._log2_width_for(amax)
        if self._state:
            hist = _coarsen(self._state["hist"], k - int(self._state["log2_width"]))
        else:
            hist = torch.zeros(self._num_bins, dtype=torch.int64, device=x.device)
        index = torch.floor(magnitude.to(torch.float64) * math.ldexp(1.0, -k)).to(torch.int64)
        hist = hist + torch.bincount(index, minlength=self._num_bins)
        self._state = {
            "hist": hist,
            "log2_width": torch.tensor(k, dtype=torch.int64, device=x.device),
            "amax": torch.tensor(amax, dtype=torch.float32, device=x.device),
            "has_negative": torch.tensor(negative, device=x.device),
            "zeros": zeros.to(torch.int64),
        }

    def _merge(self, other_state: dict[str, torch.Tensor], other_batches: int) -> None:
        k_mine, k_theirs = int(self._state["log2_width"]), int(other_state["log2_width"])
        k = max(k_mine, k_theirs)
        self._state = {
            "hist": _coarsen(self._state["hist"], k - k_mine) + _coarsen(other_state["hist"], k - k_theirs),
            "log2_width": torch.maximum(self._state["log2_width"], other_state["log2_width"]),
            "amax": torch.maximum(self._state["amax"], other_state["amax"]),
            "has_negative": self._state["has_negative"] | other_state["has_negative"],
            "zeros": self._state["zeros"] + other_state["zeros"],
        }

    # ------------------------------------------------------------------ ranges
    def compute_range(self, method: str | None = None, **method_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)`` (0-d float32) by ``method`` (default: the constructor's), from the
        stored histogram; ``method_kwargs`` override the constructor's method parameters."""
        return super().compute_range(method=method, **method_kwargs)

    def compute_amax(self, method: str | None = None, **method_kwargs: Any) -> torch.Tensor:
        return super().compute_amax(method=method, **method_kwargs)

    def _range(self, method: str | None = None, **method_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        name = self._method if method is None else _check_method(method)
        allowed = _ALLOWED[name]
        extra = sorted(set(method_kwargs) - set(allowed))
        if extra:
            raise TypeError(f"{self.label}: method {name!r} takes {list(allowed) or 'no arguments'}, got {extra}")
        params = {**{k: self._defaults[k] for k in allowed}, **_method_kwargs(**method_kwargs)}
        amax = float(self._state["amax"])
        if amax > 0 and name != "max":
            width = self.bin_width
            amax = min(amax, _SOLVERS[name](self, amax / width, **params) * width)
        hi = torch.tensor(amax, dtype=torch.float32, device=self._state["amax"].device)
        lo = -hi if bool(self._state["has_negative"]) else torch.zeros_like(hi)
        return lo, hi

    @property
    def _levels_unsigned(self) -> bool:
        """Whether ``|x|`` gets all ``2^bits`` levels: an unsigned grid on data never negative."""
        return self.unsigned and not bool(self._state["has_negative"])

    def _percentile(self, amax_bins: float, percentile: float) -> float:
        return hr.percentile_bins(self._state["hist"].cpu(), percentile)

    def _mse(self, amax_bins: float, start_bin: int | None, stride: int) -> float:
        start = 1 if start_bin is None else start_bin
        hist = self._state["hist"].cpu()
        return hr.mse_bins(hist, amax_bins, self.num_bits, self._levels_unsigned, start, stride)

    def _entropy(self, amax_bins: float, start_bin: int | None, stride: int) -> float:
        nonzero = self._state["hist"].cpu().clone()
        nonzero[0] -= self._state["zeros"].cpu()  # exact zeros: see the module docstring
        return hr.entropy_bins(nonzero, self.num_bits, self._levels_unsigned, start_bin, stride)

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        hist, k, amax = state["hist"], state["log2_width"], state["amax"]
        if hist.dtype != torch.int64 or tuple(hist.shape) != (self._num_bins,) or bool((hist < 0).any()):
            raise ValueError(f"{self.label}: state 'hist' must be non-negative int64 counts of shape [{self._num_bins}]")
        if amax.dtype != torch.float32 or amax.dim() != 0 or not bool(torch.isfinite(amax)) or float(amax) < 0:
            raise ValueError(f"{self.label}: state 'amax' must be a finite non-negative float32 scalar")
        if k.dtype != torch.int64 or k.dim() != 0 or int(k) != self._log2_width_for(float(amax)):
            raise ValueError(f"{self.label}: state 'log2_width' does not match 'amax' and num_bins")
        if state["has_negative"].dtype != torch.bool or state["has_negative"].dim() != 0:
            raise ValueError(f"{self.label}: state 'has_negative' must be a bool scalar")
        zeros = state["zeros"]
        if zeros.dtype != torch.int64 or zeros.dim() != 0 or not 0 <= int(zeros) <= int(hist[0]):
            raise ValueError(f"{self.label}: state 'zeros' must be an int64 count between 0 and hist[0]")


def _coarsen(hist: torch.Tensor, steps: int) -> torch.Tensor:
    """Sum groups of ``2^steps`` adjacent bins (the bin width grows by ``2^steps``)."""
    if steps == 0:
        return hist
    n = hist.numel()
    out = torch.zeros_like(hist)
    if steps >= n.bit_length():  # 2^steps > n: everything lands in bin 0
        out[0] = hist.sum()
        return out
    factor = 1 << steps
    padded = torch.nn.functional.pad(hist, (0, (-n) % factor))
    grouped = padded.reshape(-1, factor).sum(1)
    out[: grouped.numel()] = grouped
    return out


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(map(repr, METHODS))}")
    return method


def _method_kwargs(**kwargs: Any) -> dict[str, Any]:
    """Validate the keyword arguments of the range methods."""
    if "percentile" in kwargs:
        p = kwargs["percentile"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {p!r}")
    if kwargs.get("start_bin") is not None:
        s = kwargs["start_bin"]
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"start_bin must be a positive int or None, got {s!r}")
    if "stride" in kwargs:
        s = kwargs["stride"]
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"stride must be a positive int, got {s!r}")
    return kwargs


#: the range rules a histogram computes, with the keyword arguments each takes
_ALLOWED: dict[str, tuple[str, ...]] = {
    "max": (),
    "percentile": ("percentile",),
    "mse": ("start_bin", "stride"),
    "entropy": ("start_bin", "stride"),
}
METHODS = tuple(_ALLOWED)
_SOLVERS: dict[str, Callable[..., float]] = {
    "percentile": HistogramCalibrator._percentile,
    "mse": HistogramCalibrator._mse,
    "entropy": HistogramCalibrator._entropy,
}
