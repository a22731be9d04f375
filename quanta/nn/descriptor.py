"""`QuantDescriptor`: how a `TensorQuantizer` quantizes and calibrates (NVIDIA-compatible names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..calib import CALIBRATION_METHODS
from ..core import QuantSpec
from ..core.dicts import check_keys, field_names

CALIB_METHODS = CALIBRATION_METHODS  # the calibrator registry's names (`quanta.calib.CALIBRATORS`)


def _check(name: str, value: Any, types: tuple[type, ...], optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) and bool not in types:
        raise TypeError(f"QuantDescriptor.{name} must be {'/'.join(t.__name__ for t in types)}, got bool")
    if not isinstance(value, types):
        raise TypeError(
            f"QuantDescriptor.{name} must be {'/'.join(t.__name__ for t in types)}, "
            f"got {type(value).__name__} ({value!r})"
        )


@dataclass(frozen=True)
class QuantDescriptor:
    """Configuration of one quantizer.

    Granularity: ``axis`` (the kept axis; an int, or a one-axis tuple ``(0,)`` as
    pytorch-quantization writes it) gives per-channel; ``per_channel=True`` lets the
    module pick its output-channel axis (0 for Linear/Conv weights, 1 for ConvTranspose);
    ``group_size`` gives per-group along the module's reduction axis; ``per_token`` gives one
    dynamic scale per row. Ranges come from calibration (``calib_method``), from a fixed
    ``amax``, or are computed per call (``dynamic``). ``learn_amax`` makes the range an
    ``nn.Parameter`` trained with the LSQ gradient.
    """

    num_bits: int = 8
    format: str = "int"
    axis: int | None = None
    per_channel: bool = False
    group_size: int | None = None
    per_token: bool = False
    unsigned: bool = False
    symmetric: bool = True
    narrow_range: bool = False
    rounding: str = "half_even"
    dynamic: bool = False
    amax: float | None = None
    learn_amax: bool = False
    fake_quant: bool = True
    calib_method: str = "max"
    percentile: float = 99.99
    num_bins: int = 2048
    name: str | None = None
    version: int = 1

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if isinstance(self.axis, (tuple, list)):  # pytorch-quantization's spelling: axis=(0,)
            if len(self.axis) != 1:
                raise ValueError(f"QuantDescriptor.axis: one kept axis is supported, got {tuple(self.axis)!r} "
                                 "(quanta keeps one axis: one scale per index along it)")
            object.__setattr__(self, "axis", self.axis[0])
        _check("num_bits", self.num_bits, (int,))
        _check("format", self.format, (str,))
        _check("axis", self.axis, (int,), optional=True)
        _check("group_size", self.group_size, (int,), optional=True)
        for flag in ("per_channel", "per_token", "unsigned", "symmetric", "narrow_range", "dynamic",
                     "learn_amax", "fake_quant"):
            _check(flag, getattr(self, flag), (bool,))
        _check("rounding", self.rounding, (str,))
        _check("amax", self.amax, (int, float), optional=True)
        _check("calib_method", self.calib_method, (str,))
        _check("percentile", self.percentile, (int, float))
        _check("num_bins", self.num_bins, (int,))
        _check("name", self.name, (str,), optional=True)
        _check("version", self.version, (int,))
        if self.version > self.VERSION:
            raise ValueError(f"QuantDescriptor.version {self.version} is newer than supported ({self.VERSION})")
        if self.calib_method not in CALIB_METHODS:
            raise ValueError(f"QuantDescriptor.calib_method: unknown {self.calib_method!r}; choose one of {CALIB_METHODS}")
        chosen = [n for n, on in (("axis", self.axis is not None), ("per_channel", self.per_channel),
                                  ("group_size", self.group_size is not None), ("per_token", self.per_token)) if on]
        if len(chosen) > 1:
            raise ValueError(f"QuantDescriptor: choose one granularity, got {' and '.join(chosen)}")
        if self.amax is not None and not (self.amax > 0 and self.amax < float("inf")):
            raise ValueError(f"QuantDescriptor.amax must be positive and finite, got {self.amax}")
        if self.learn_amax and (self.dynamic or self.per_token or not self.symmetric):
            raise ValueError("QuantDescriptor.learn_amax needs a static, symmetric quantizer")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"QuantDescriptor.percentile must be in (0, 100], got {self.percentile}")
        self.to_spec(axis=0 if self.per_channel else None)  # validates bits/format/rounding

    def to_spec(self, axis: int | None = None, group_axis: int = -1) -> QuantSpec:
        """The core `QuantSpec`; ``axis``/``group_axis`` resolve ``per_channel``/``group_size``."""
        if self.per_channel:
            if axis is None:
                raise ValueError("QuantDescriptor.per_channel needs the module's channel axis")
            gran, ax = "per_channel", axis
        elif self.axis is not None:
            gran, ax = "per_channel", self.axis
        elif self.group_size is not None:
            gran, ax = "per_group", None
        elif self.per_token:
            gran, ax = "per_token", None
        else:
            gran, ax = "per_tensor", None
        return QuantSpec(
            format=self.format, bits=self.num_bits, signed=not self.unsigned, symmetric=self.symmetric,
            narrow_range=self.narrow_range, granularity=gran, axis=ax, group_size=self.group_size,
            group_axis=group_axis if self.group_size is not None else -1, rounding=self.rounding,
            dynamic=self.dynamic or self.per_token,
        )

    def replace(self, **changes: Any) -> QuantDescriptor:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantDescriptor:
        return cls(**check_keys("QuantDescriptor", data, field_names(cls)))


#: 8-bit per-tensor activations calibrated by max (the usual input quantizer).
QUANT_DESC_8BIT_PER_TENSOR = QuantDescriptor()
#: 8-bit symmetric narrow-range weights, one scale per output channel.
QUANT_DESC_8BIT_WEIGHT_PER_CHANNEL = QuantDescriptor(per_channel=True, narrow_range=True)
