"""Where scales live: reducing a tensor to its ranges and broadcasting parameters back.

Compact parameter shapes (what `compute_range` returns and `choose_qparams` keeps):

==============  ==============================  ======================================
granularity     x shape                         scale / zero_point shape
==============  ==============================  ======================================
per_tensor      any                             ``[]``
global          any (a set of tensors)          ``[]``
per_channel     ``[out, in]``, ``axis=0``       ``[out]``
per_group       ``[out, in]``, ``group_axis=-1``  ``[out, in // group_size]``
per_token       ``[b, t, h]``                   ``[b, t, 1]``
==============  ==============================  ======================================
"""

from __future__ import annotations

import torch

from .spec import Granularity, QuantSpec


def normalize_axis(axis: int, ndim: int, what: str = "axis") -> int:
    """Turn a possibly negative axis into ``0..ndim-1`` or raise naming the problem."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what} {axis} is out of range for a tensor with {ndim} dimension(s)")
    return axis % ndim


def check_float(x: torch.Tensor, what: str = "input") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")


def _group_view(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """``x`` with the group axis moved last and split into ``[..., n_groups, group_size]``."""
    if x.dim() == 0:
        raise ValueError("per_group quantization needs a tensor with at least one dimension")
    ga = normalize_axis(spec.group_axis, x.dim(), "group_axis")
    length = x.shape[ga]
    g = spec.group_size
    assert g is not None
    if length % g != 0:
        raise ValueError(
            f"group_size {g} does not divide the length {length} of axis {ga} (shape {tuple(x.shape)})"
        )
    moved = x.movedim(ga, -1)
    return moved.reshape(*moved.shape[:-1], length // g, g), ga


def compact_shape(x_shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """The shape of scale / zero_point for a tensor of ``x_shape`` under ``spec``."""
    g = spec.granularity
    if g in (Granularity.PER_TENSOR, Granularity.GLOBAL):
        return ()
    ndim = len(x_shape)
    if g is Granularity.PER_CHANNEL:
        assert spec.axis is not None
        return (x_shape[normalize_axis(spec.axis, ndim)],)
    if g is Granularity.PER_TOKEN:
        if ndim == 0:
            raise ValueError("per_token quantization needs a tensor with at least one dimension")
        return (*x_shape[:-1], 1)
    ga = normalize_axis(spec.group_axis, ndim, "group_axis")
    shape = list(x_shape)
    assert spec.group_size is not None
    if shape[ga] % spec.group_size:
        raise ValueError(
            f"group_size {spec.group_size} does not divide the length {shape[ga]} of axis {ga} "
            f"(shape {tuple(x_shape)})"
        )
    shape[ga] //= spec.group_size
    return tuple(shape)


def reduce_aminmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granularity ``(min, max)`` of ``x`` in the compact shape (float32)."""
    g = spec.granularity
    xf = x.detach().float()
    if g in (Granularity.PER_TENSOR, Granularity.GLOBAL):
        return torch.aminmax(xf)
    if g is Granularity.PER_CHANNEL:
        assert spec.axis is not None
        ax = normalize_axis(spec.axis, x.dim())
        flat = xf.movedim(ax, 0).reshape(x.shape[ax], -1)
        if flat.shape[1] == 0:
            raise ValueError("cannot compute a range of an empty tensor")
        return torch.aminmax(flat, dim=1)
    if g is Granularity.PER_TOKEN:
        if x.dim() == 0:
            raise ValueError("per_token quantization needs a tensor with at least one dimension")
        return torch.aminmax(xf, dim=-1, keepdim=True)
    view, ga = _group_view(xf, spec)
    lo, hi = torch.aminmax(view, dim=-1)
    return lo.movedim(-1, ga), hi.movedim(-1, ga)


class Layout:
    """How a tensor of one shape is viewed so that its parameters broadcast elementwise.

    ``to_work(x)`` reshapes ``x`` (per_group: moves the group axis last and splits it into
    ``[n_groups, group_size]``), ``to_param(p)`` reshapes a compact parameter to broadcast
    against the working view, ``restore(t)`` maps a working-view tensor back to ``x``'s shape.
    """

    def __init__(self, x_shape: tuple[int, ...], param_shape: tuple[int, ...], spec: QuantSpec):
        self.x_shape = tuple(x_shape)
        self.spec = spec
        self.param_shape = compact_shape(self.x_shape, spec)
        # Size-1 dims may differ ([C, 1, 1] for [C], [b, t] for [b, t, 1]); a mere equal numel
        # (a transposed [in // g, out] for [out, in // g]) would silently misassign the scales.
        if _squeeze(param_shape) != _squeeze(self.param_shape):
            raise ValueError(
                f"scale/zero_point of shape {tuple(param_shape)} do not fit a tensor of shape "
                f"{self.x_shape} under {spec.granularity.value} granularity (expected {self.param_shape})"
            )
        ndim = len(self.x_shape)
        g = spec.granularity
        self._bshape: tuple[int, ...] | None = None
        self._ga: int | None = None
        if g is Granularity.PER_CHANNEL:
            assert spec.axis is not None
            ax = normalize_axis(spec.axis, ndim)
            b = [1] * ndim
            b[ax] = self.x_shape[ax]
            self._bshape = tuple(b)
        elif g is Granularity.PER_TOKEN:
            self._bshape = self.param_shape
        elif g is Granularity.PER_GROUP:
            self._ga = normalize_axis(spec.group_axis, ndim, "group_axis")
        else:
            self._bshape = ()

    def to_work(self, x: torch.Tensor) -> torch.Tensor:
        if self._ga is None:
            return x
        return _group_view(x, self.spec)[0]

    def to_param(self, p: torch.Tensor) -> torch.Tensor:
        if self._ga is None:
            assert self._bshape is not None
            return p.reshape(self._bshape)
        return p.reshape(self.param_shape).movedim(self._ga, -1).unsqueeze(-1)

    def restore(self, t: torch.Tensor) -> torch.Tensor:
        if self._ga is None:
            return t
        moved = list(self.x_shape)
        moved.append(moved.pop(self._ga))
        return t.reshape(moved).movedim(-1, self._ga)


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(s) for s in shape if s != 1)
