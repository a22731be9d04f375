"""Range checks of integer-module constructor arguments, shared by every class (and by `quanta.io`,
which applies the geometry checks to float-module records too) so that no kernel ever sees a
stride of 0, a negative padding or a group count that does not divide the channels.

Each check raises ``ValueError`` (``TypeError`` for a wrong type) naming the owner and the argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

#: the largest size or geometry value accepted (native kernels index with 32-bit integers)
MAX_DIM = 2**31 - 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_at_least(owner: str, name: str, v: Any, minimum: int) -> int:
    """``v`` as an int in ``[minimum, MAX_DIM]``."""
    if not _is_int(v):
        raise TypeError(f"{owner}: {name} must be an int, got {v!r}")
    if not minimum <= v <= MAX_DIM:
        raise ValueError(f"{owner}: {name} must be in {minimum}..{MAX_DIM}, got {v!r}")
    return int(v)


def positive_int(owner: str, name: str, v: Any) -> int:
    return int_at_least(owner, name, v, 1)


def int_tuple(owner: str, name: str, v: int | Sequence[int], n: int, minimum: int) -> tuple[int, ...]:
    """An int (repeated ``n`` times) or ``n`` ints, each at least ``minimum``."""
    if _is_int(v):
        return (int_at_least(owner, name, v, minimum),) * n
    if not isinstance(v, (tuple, list)) or len(v) != n:
        raise ValueError(f"{owner}: {name} needs an int or {n} ints, got {v!r}")
    return tuple(int_at_least(owner, name, i, minimum) for i in v)


def geometry(owner: str, n: int, kernel_size: Any, stride: Any, padding: Any,
             dilation: Any) -> tuple[tuple[int, ...], ...]:
    """``(kernel_size, stride, padding, dilation)`` of an ``n``-d convolution or pooling:
    kernel ≥ 1, stride ≥ 1, padding ≥ 0, dilation ≥ 1."""
    return (int_tuple(owner, "kernel_size", kernel_size, n, 1), int_tuple(owner, "stride", stride, n, 1),
            int_tuple(owner, "padding", padding, n, 0), int_tuple(owner, "dilation", dilation, n, 1))


def groups_divide(owner: str, groups: Any, **channels: Any) -> int:
    groups = positive_int(owner, "groups", groups)
    for name, c in channels.items():
        if c % groups:
            raise ValueError(f"{owner}: {name} {c} must be divisible by groups={groups}")
    return groups


def flag(owner: str, name: str, v: Any) -> bool:
    """A boolean argument (``True`` / ``False`` only: ``"no"`` is not false)."""
    if not isinstance(v, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {v!r}")
    return v


def one_of(owner: str, name: str, v: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if not isinstance(v, (str, type(None))) or v not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {v!r}")
    return v


def bits_in(owner: str, name: str, v: Any, lo: int, hi: int) -> int:
    if not _is_int(v) or not lo <= v <= hi:
        raise ValueError(f"{owner}: {name} must be an int in {lo}..{hi}, got {v!r}")
    return int(v)


#: geometry keyword arguments of torch's conv / pool constructors and the least value each takes
GEOMETRY_MINIMUM = {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                    "in_channels": 1, "out_channels": 1, "in_features": 1, "out_features": 1,
                    "num_embeddings": 1, "embedding_dim": 1, "input_size": 1, "hidden_size": 1,
                    "num_layers": 1, "output_padding": 0}


def check_geometry_kwargs(owner: str, kwargs: dict[str, Any]) -> None:
    """The geometry arguments among ``kwargs`` (any constructor's, by name) are in range;
    ``padding`` may also be one of torch's strings. ``stride=None`` (pools: the kernel) passes."""
    for name, minimum in GEOMETRY_MINIMUM.items():
        v = kwargs.get(name)
        if v is None or (name == "padding" and v in ("same", "valid")):
            continue
        if isinstance(v, (list, tuple)):
            if not 1 <= len(v) <= 3:
                raise ValueError(f"{owner}: {name} needs 1 to 3 values, got {v!r}")
            for i in v:
                int_at_least(owner, name, i, minimum)
        else:
            int_at_least(owner, name, v, minimum)


__all__ = ["GEOMETRY_MINIMUM", "MAX_DIM", "bits_in", "check_geometry_kwargs", "flag", "geometry", "groups_divide",
           "int_at_least", "int_tuple", "one_of", "positive_int"]
