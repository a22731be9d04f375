"""`Calibrator`: the base of every calibrator — input checks, counters, state and merging.

A calibrator sees tensors (``collect``) and proposes a clipping range (``compute_range``). Its
statistics are a small set of tensors (``state_dict``) that combine by sum / min / max, so that
calibrators that saw different shards of the data (other processes, other workers) can be
``merge``-d into the calibrator that saw all of it.

Shapes: with ``axis=None`` ranges are 0-d tensors (``[]``); with ``axis=a`` (the *kept* axis,
quanta's convention) one range per index along ``a``: a ``[out, in]`` weight with ``axis=0``
gives ranges of shape ``[out]``, an NCHW activation with ``axis=1`` gives ``[C]``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch

from quanta.core import check_finite, normalize_axis

STATE_VERSION = 1
_COUNTERS = ("num_batches", "num_samples")


class Calibrator(abc.ABC):
    """Base class: collects statistics of tensors and turns them into a ``(min, max)`` range.

    Subclasses keep their statistics in ``self._state`` (tensors, empty until the first batch)
    and implement `_state_keys`, `_update`, `_merge`, `_range` and `_check_state`; they extend
    `_config` with the settings that must agree for two calibrators to merge.

    Counters: ``num_batches`` is the number of ``collect`` calls, ``num_samples`` the number of
    *values* (tensor elements) seen.
    """

    def __init__(
        self, num_bits: int = 8, axis: int | None = None, unsigned: bool = False, name: str | None = None
    ) -> None:
        if isinstance(num_bits, bool) or not isinstance(num_bits, int):
            raise TypeError(f"num_bits must be an int, got {type(num_bits).__name__}")
        if not 1 <= num_bits <= 16:
            raise ValueError(f"num_bits must be in 1..16, got {num_bits}")
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"axis must be an int or None, got {type(axis).__name__}")
        if not isinstance(unsigned, bool):
            raise TypeError(f"unsigned must be a bool, got {type(unsigned).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        self._num_bits = num_bits
        self._axis = axis
        self._unsigned = unsigned
        self.name = name
        self._state: dict[str, torch.Tensor] = {}
        self._num_batches = 0
        self._num_samples = 0

    # ------------------------------------------------------------------ read-only settings
    @property
    def num_bits(self) -> int:
        return self._num_bits

    @property
    def axis(self) -> int | None:
        return self._axis

    @property
    def unsigned(self) -> bool:
        return self._unsigned

    @property
    def num_batches(self) -> int:
        """Number of batches collected (merged calibrators add theirs)."""
        return self._num_batches

    @property
    def num_samples(self) -> int:
        """Number of values (tensor elements) collected."""
        return self._num_samples

    @property
    def label(self) -> str:
        """How messages name this calibrator: ``calibrator 'encoder.fc1.input'`` or the class."""
        return f"calibrator {self.name!r}" if self.name else type(self).__name__

    # ------------------------------------------------------------------ public API
    def collect(self, x: torch.Tensor) -> None:
        """Add the statistics of one batch. ``x`` is never modified."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.label}: calibration data must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{self.label}: calibration data must be a floating-point tensor, got dtype {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"{self.label}: calibration batch is empty (shape {tuple(x.shape)})")
        axis = None if self._axis is None else normalize_axis(self._axis, x.dim(), f"{self.label}: axis")
        check_finite(x, f"{self.label}: calibration data")
        xf = x.detach()
        if self._state:
            xf = xf.to(next(iter(self._state.values())).device)
        xf = xf.float()
        if x.dtype == torch.float64 and not bool(torch.isfinite(xf).all()):
            raise ValueError(f"{self.label}: calibration data exceeds the float32 range")
        self._update(xf, axis)
        self._num_batches += 1
        self._num_samples += x.numel()

    def compute_range(self, **method_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)`` as float32 tensors of shape ``[]`` (per-tensor) or ``[C]`` (per-axis)."""
        if not self._num_batches:
            raise ValueError(f"{self.label} has seen no data; run calibration before computing a range")
        lo, hi = self._range(**method_kwargs)
        return lo.detach().to(torch.float32).clone(), hi.detach().to(torch.float32).clone()

    def compute_amax(self, **method_kwargs: Any) -> torch.Tensor:
        """``max(|min|, |max|)`` of `compute_range` (what a symmetric quantizer needs)."""
        lo, hi = self.compute_range(**method_kwargs)
        return torch.maximum(lo.abs(), hi.abs())

    def reset(self) -> None:
        """Forget all data (the settings are kept)."""
        self._state = {}
        self._num_batches = 0
        self._num_samples = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain settings (``type``, ``version``, config) plus the state as tensors.

        Tensor entries: ``num_batches``/``num_samples`` (int64, combined by sum) and the
        subclass's statistics (present only once data was seen). Settings are str/int/float/
        bool/None, so the dict maps onto a safetensors file (tensors) plus JSON metadata.
        """
        out: dict[str, Any] = {"type": type(self).__name__, "version": STATE_VERSION, **self._config()}
        out["num_batches"] = torch.tensor(self._num_batches, dtype=torch.int64)
        out["num_samples"] = torch.tensor(self._num_samples, dtype=torch.int64)
        out.update({k: v.clone() for k, v in self._state.items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this calibrator's data with ``state`` (from `state_dict` of a like calibrator)."""
        if state.get("type") != type(self).__name__:
            raise ValueError(f"{self.label}: state_dict is for {state.get('type')!r}, not {type(self).__name__!r}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.label}: state_dict version {state.get('version')!r} is not {STATE_VERSION}")
        config = self._config()
        for key, value in config.items():
            if key not in state or state[key] != value:
                raise ValueError(
                    f"{self.label}: state_dict has {key}={state.get(key)!r}, this calibrator {key}={value!r}"
                )
        counts = {k: int(_tensor(state, k, self.label)) for k in _COUNTERS}
        keys = self._state_keys() if counts["num_batches"] else ()
        expected = {"type", "version", *config, *_COUNTERS, *keys}
        unknown = sorted(set(state) - expected)
        if unknown:
            raise ValueError(f"{self.label}: unexpected state_dict key(s) {unknown}")
        new_state = {k: _tensor(state, k, self.label).detach().clone() for k in keys}
        if new_state:
            self._check_state(new_state)
        self._state = new_state
        self._num_batches, self._num_samples = counts["num_batches"], counts["num_samples"]

    def merge(self, other: Calibrator) -> None:
        """Add ``other``'s data to this calibrator, in place (``other`` is unchanged)."""
        if type(other) is not type(self):
            raise TypeError(f"{self.label}: cannot merge a {type(other).__name__} into a {type(self).__name__}")
        mine, theirs = self._config(), other._config()
        diff = [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
        if diff:
            raise ValueError(f"{self.label}: cannot merge calibrators with different settings ({'; '.join(diff)})")
        if not other._num_batches:
            return
        if not self._num_batches:
            self._state = {k: v.clone() for k, v in other._state.items()}
        else:
            for key, value in self._state.items():
                if value.shape != other._state[key].shape:
                    raise ValueError(
                        f"{self.label}: cannot merge state {key!r} of shape {tuple(value.shape)} with "
                        f"{tuple(other._state[key].shape)} (different number of channels along axis {self.axis})"
                    )
            device = next(iter(self._state.values())).device
            self._merge({k: v.to(device) for k, v in other._state.items()}, other._num_batches)
        self._num_batches += other._num_batches
        self._num_samples += other._num_samples

    def __repr__(self) -> str:
        fields = [f"{k}={v!r}" for k, v in self._config().items()]
        if self.name:
            fields.append(f"name={self.name!r}")
        fields.append(f"num_batches={self._num_batches}")
        return f"{type(self).__name__}({', '.join(fields)})"

    # ------------------------------------------------------------------ subclass hooks
    def _config(self) -> dict[str, Any]:
        """Settings that must agree for two calibrators to merge (plain values)."""
        return {"num_bits": self._num_bits, "axis": self._axis, "unsigned": self._unsigned}

    @abc.abstractmethod
    def _state_keys(self) -> tuple[str, ...]:
        """Names of the state tensors (present once a batch was collected)."""

    @abc.abstractmethod
    def _update(self, x: torch.Tensor, axis: int | None) -> None:
        """Add one batch: ``x`` is detached float32, finite, non-empty; ``axis`` normalized."""

    @abc.abstractmethod
    def _merge(self, other_state: dict[str, torch.Tensor], other_batches: int) -> None:
        """Combine ``other_state`` (same keys and shapes, on this device) into ``self._state``;
        called before the counters are added."""

    @abc.abstractmethod
    def _range(self, **method_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)`` from ``self._state`` (only called once data was seen)."""

    @abc.abstractmethod
    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` if a loaded state is inconsistent with this calibrator."""

    # ------------------------------------------------------------------ helpers
    def _aminmax(self, x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor (``[]``) or per-kept-axis (``[C]``) minimum and maximum of ``x``."""
        if axis is None:
            return torch.aminmax(x)
        return torch.aminmax(x.movedim(axis, 0).reshape(x.shape[axis], -1), dim=1)

    def _check_channels(self, new: torch.Tensor, key: str) -> None:
        """Per-axis batches must all have the same length along the kept axis."""
        old = self._state[key]
        if new.shape != old.shape:
            raise ValueError(
                f"{self.label}: axis {self.axis} has length {new.numel()} in this batch but "
                f"{old.numel()} in earlier batches"
            )

    def _check_range_state(self, state: dict[str, torch.Tensor], keys: tuple[str, str], dtype: torch.dtype) -> None:
        """A loaded pair of per-tensor / per-axis range tensors has the right shape and dtype."""
        lo, hi = state[keys[0]], state[keys[1]]
        want = 0 if self._axis is None else 1
        for key, t in zip(keys, (lo, hi)):
            if t.dtype != dtype or t.dim() != want:
                raise ValueError(
                    f"{self.label}: state {key!r} must be a {want}-d {dtype} tensor, got {t.dim()}-d {t.dtype}"
                )
        if lo.shape != hi.shape:
            raise ValueError(f"{self.label}: state {keys[0]!r} and {keys[1]!r} have different shapes")
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError(f"{self.label}: state {keys[0]!r}/{keys[1]!r} hold non-finite values")


def _tensor(state: Mapping[str, Any], key: str, label: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{label}: state_dict is missing {key!r}")
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{label}: state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
    return value
