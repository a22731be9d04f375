"""`QuantSpec`: the frozen, validated description of one quantization.

A spec says *how* a tensor is quantized (format, bits, sign, symmetry, granularity,
rounding); the *values* of the parameters (scale, zero point) are tensors computed from a
range by :func:`quanta.core.qparams.choose_qparams`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from .dicts import check_keys, field_names


class Format(str, Enum):
    """Number format of the quantized values."""

    INT = "int"  # affine integer grid, 1..16 bits (1 bit signed = binary {-1, +1})
    FP8_E4M3 = "fp8_e4m3"  # torch.float8_e4m3fn with a scale
    FP8_E5M2 = "fp8_e5m2"  # torch.float8_e5m2 with a scale
    FP16 = "fp16"  # plain cast, no scale
    BF16 = "bf16"  # plain cast, no scale
    POW2 = "pow2"  # power-of-two (log2) levels: 0 and ±scale·2^-k


class Granularity(str, Enum):
    """How many scales a tensor gets, and along which axes."""

    PER_TENSOR = "per_tensor"  # one scale
    PER_CHANNEL = "per_channel"  # one scale per index of the kept `axis`
    PER_GROUP = "per_group"  # one scale per `group_size` consecutive values along `group_axis`
    PER_TOKEN = "per_token"  # one scale per row: reduce the last axis, keep the leading ones
    GLOBAL = "global"  # one range shared by a set of tensors


class Rounding(str, Enum):
    HALF_EVEN = "half_even"  # torch.round / ONNX / nearbyint: ties to even
    HALF_AWAY = "half_away"  # ties away from zero (C's round())
    FLOOR = "floor"
    STOCHASTIC = "stochastic"  # floor(v) + Bernoulli(v - floor(v)); unbiased


_ENUMS = {"format": Format, "granularity": Granularity, "rounding": Rounding}
_SCALED_FLOAT = (Format.FP8_E4M3, Format.FP8_E5M2)
_CAST_FLOAT = (Format.FP16, Format.BF16)


def _enum(cls: type[Enum], name: str, value: Any) -> Enum:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value.lower())
        except ValueError:
            pass
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"QuantSpec.{name}: unknown {name} {value!r}; choose one of {choices}")
    raise TypeError(f"QuantSpec.{name} must be a str or {cls.__name__}, got {type(value).__name__}")


def _check_type(name: str, value: Any, types: type | tuple[type, ...], optional: bool = False) -> None:
    if optional and value is None:
        return
    # bool is an int subclass: refuse it where an int is meant, and vice versa.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise TypeError(f"QuantSpec.{name} must be {_tname(types)}, got bool")
    if not isinstance(value, types):
        raise TypeError(f"QuantSpec.{name} must be {_tname(types)}, got {type(value).__name__} ({value!r})")


def _tname(types: type | tuple[type, ...]) -> str:
    if isinstance(types, tuple):
        return " or ".join(t.__name__ for t in types)
    return types.__name__


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Conventions (see README "Numerics"): ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``
    and ``x_hat = (q - zero_point) * scale``. ``axis`` is the axis that is *kept* for
    per-channel granularity: a Linear weight ``[out, in]`` per output channel has ``axis=0`` and
    scales of shape ``[out]``. Per-group granularity splits ``group_axis`` (default the last, the
    reduction axis) into groups of ``group_size``: ``[out, in]`` gives scales ``[out, in // g]``.
    Per-token keeps every leading axis and reduces the last: ``[b, t, h]`` gives ``[b, t, 1]``.
    """

    format: Format = Format.INT
    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = Granularity.PER_TENSOR
    axis: int | None = None
    group_size: int | None = None
    group_axis: int = -1
    rounding: Rounding = Rounding.HALF_EVEN
    dynamic: bool = False
    version: int = field(default=1)

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for name, cls in _ENUMS.items():
            object.__setattr__(self, name, _enum(cls, name, getattr(self, name)))
        _check_type("bits", self.bits, int)
        for name in ("signed", "symmetric", "narrow_range", "dynamic"):
            _check_type(name, getattr(self, name), bool)
        _check_type("axis", self.axis, int, optional=True)
        _check_type("group_size", self.group_size, int, optional=True)
        _check_type("group_axis", self.group_axis, int)
        _check_type("version", self.version, int)
        if self.version > self.VERSION:
            raise ValueError(
                f"QuantSpec.version {self.version} is newer than this quanta understands ({self.VERSION})"
            )
        self._validate_bits()
        self._validate_granularity()
        if self.format is not Format.INT and self.rounding not in (Rounding.HALF_EVEN,):
            raise ValueError(
                f"QuantSpec.rounding: format {self.format.value!r} supports only 'half_even' rounding, "
                f"got {self.rounding.value!r}"
            )

    def _validate_bits(self) -> None:
        fmt = self.format
        if fmt is Format.INT or fmt is Format.POW2:
            low = 1 if fmt is Format.INT else 2
            if not low <= self.bits <= 16:
                raise ValueError(f"QuantSpec.bits must be in {low}..16 for format {fmt.value!r}, got {self.bits}")
            if fmt is Format.POW2 and not self.symmetric:
                raise ValueError("QuantSpec.symmetric: format 'pow2' is symmetric only")
            if fmt is Format.INT and self.bits == 1 and self.signed and not self.symmetric:
                raise ValueError("QuantSpec.symmetric: 1-bit signed (binary) quantization is symmetric only")
        else:
            expected = 8 if fmt in _SCALED_FLOAT else 16
            if self.bits != expected:
                raise ValueError(f"QuantSpec.bits must be {expected} for format {fmt.value!r}, got {self.bits}")
            if not self.signed or not self.symmetric:
                raise ValueError(f"QuantSpec: format {fmt.value!r} is signed and symmetric")

    def _validate_granularity(self) -> None:
        g = self.granularity
        if g is Granularity.PER_CHANNEL and self.axis is None:
            raise ValueError("QuantSpec.axis is required for per_channel granularity (the kept axis)")
        if g is not Granularity.PER_CHANNEL and self.axis is not None:
            raise ValueError(f"QuantSpec.axis is only meaningful for per_channel granularity, not {g.value!r}")
        if g is Granularity.PER_GROUP:
            if self.group_size is None or self.group_size < 1:
                raise ValueError(f"QuantSpec.group_size must be a positive int for per_group, got {self.group_size}")
        elif self.group_size is not None:
            raise ValueError(f"QuantSpec.group_size is only meaningful for per_group granularity, not {g.value!r}")
        if g is Granularity.PER_TOKEN and not self.dynamic:
            object.__setattr__(self, "dynamic", True)  # per-token ranges are computed per call
        if self.format in _CAST_FLOAT and g is not Granularity.PER_TENSOR:
            raise ValueError(f"QuantSpec.granularity: format {self.format.value!r} is a plain cast (per_tensor)")

    # ----------------------------------------------------------------- derived values
    @property
    def is_integer(self) -> bool:
        return self.format is Format.INT

    @property
    def has_scale(self) -> bool:
        return self.format not in _CAST_FLOAT

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed, self.narrow_range)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed, self.narrow_range)[1]

    def replace(self, **changes: Any) -> QuantSpec:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, Enum) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        return cls(**check_keys("QuantSpec", data, field_names(cls)))

    def __str__(self) -> str:
        parts = [f"{self.format.value}{self.bits}" if self.format in (Format.INT, Format.POW2) else self.format.value]
        if self.format is Format.INT:
            parts.append("s" if self.signed else "u")
            parts.append("sym" if self.symmetric else "asym")
            if self.narrow_range:
                parts.append("narrow")
        g = self.granularity.value
        if self.granularity is Granularity.PER_CHANNEL:
            g += f"(axis={self.axis})"
        elif self.granularity is Granularity.PER_GROUP:
            g += f"(g={self.group_size}, axis={self.group_axis})"
        parts.append(g)
        if self.rounding is not Rounding.HALF_EVEN:
            parts.append(self.rounding.value)
        if self.dynamic:
            parts.append("dynamic")
        return " ".join(parts)


def qrange(bits: int, signed: bool, narrow_range: bool = False) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-wide grid.

    Signed: ``[-2^(b-1), 2^(b-1) - 1]``, narrow ``[-(2^(b-1) - 1), 2^(b-1) - 1]``;
    unsigned: ``[0, 2^b - 1]``, narrow ``[0, 2^b - 2]``. One signed bit is the binary grid
    ``{-1, +1}`` (reported as ``(-1, 1)``; zero is not a level).
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if signed:
        if bits == 1:
            return -1, 1
        qmax = 2 ** (bits - 1) - 1
        return (-qmax if narrow_range else -qmax - 1), qmax
    qmax = 2**bits - 1
    return 0, qmax - 1 if narrow_range else qmax
