"""Integer convolutions with asymmetric zero padding: ``Int8PaddedConv1d/2d/3d``.

A TF-style "same" convolution with stride 2 on an even input pads one more row and column
after than before (``(0, 1, 0, 1)``); the integer conv kernels take one padding per dimension.
These classes run the symmetric part inside the kernel (its ``padding``) and pad the rest
(``extra_padding``, ``F.pad`` order: last dimension first, before/after) onto the uint8 input
codes with the input's zero point, which is exactly the real value 0.0: the same numbers as
zero-padding the float input, then quantizing it. `quanta.transforms.conv_subclass` decides
which user subclasses compute that; `convert` builds these from its `plain_view`::

    m = Int8PaddedConv2d.from_simulated(view)  # view.extra_padding = (0, 1, 0, 1)
    y = m(x)                                    # == Int8Conv2d(padding=p) on F.pad(codes, extra, value=zp)

Everything else (uint8 hand-off, fused ReLU, save/load) is `quanta.integer.conv`'s; the
config adds ``extra_padding``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.graph_ops import settled_call
from .conv import Int8Conv1d, Int8Conv2d, Int8Conv3d, _Int8ConvNd
from .conv_graph import run_conv_graph_entry
from .padded_depthwise import settle_unpadded, unpadded_call, unpadded_graph_entry


class _PaddedMixin(_Int8ConvNd):
    def __init__(self, *args: Any, extra_padding: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra_padding = self._checked_extra(extra_padding)

    def _checked_extra(self, extra: Sequence[int] | None) -> tuple[int, ...]:
        n, name = self.dims, type(self).__name__
        if extra is None:
            return (0,) * (2 * n)
        if not isinstance(extra, (tuple, list)) or len(extra) != 2 * n or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in extra):
            raise ValueError(f"{name}: extra_padding must be {2 * n} non-negative ints (F.pad order), got {extra!r}")
        return tuple(extra)

    @classmethod
    def accepts(cls, sim: nn.Module) -> str | None:
        if not any(getattr(sim, "extra_padding", ())):
            return (f"{type(sim).__name__} is not a padded conv view (convert builds one for a user subclass "
                    "that pads asymmetrically: quanta.transforms.conv_subclass)")
        return super().accepts(sim)

    @classmethod
    def from_simulated(cls, sim: nn.Module) -> _Int8ConvNd:
        mod = super().from_simulated(sim)
        mod.extra_padding = mod._checked_extra(tuple(sim.extra_padding))  # type: ignore[attr-defined]
        return mod

    def config(self) -> dict[str, Any]:
        return super().config() | {"extra_padding": list(self.extra_padding)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != self.dims + 2:
            return super().forward(x)  # (its clear error)
        if self._stale:
            self.ensure_packed()
        if x.dtype == torch.uint8:
            if torch.compiler.is_compiling():  # (the same in a graph: the plan's conv_packed op with 4 pads)
                entry = unpadded_graph_entry(self, x)
                if entry is not None:
                    return self._output(run_conv_graph_entry(entry, x))
            settled = unpadded_call(self, x)  # (a depthwise conv: the native kernel pads, padded_depthwise)
            if settled is not None:
                self.kernel_counts[settled[0]] += 1
                return self._output(settled[1](x))
            codes, fill = x, self._x_zp
        elif x.dtype == torch.int8 and self.input_spec.signed:
            codes, fill = x, self._x_zp - 128
        elif x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            codes, fill = self.quantize_input(x), self._x_zp
        else:
            return super().forward(x)
        # the pad as eager runs it: traced, inductor's loop for channels-last uint8 codes took ~0.6 ms
        # where aten's pad takes ~0.05 ms ([1, 96, 112, 112], 2 AVX2 cores); so graphs call aten's
        extra = tuple(self.extra_padding)
        pad = self.binding.graph_call(("pad", extra, fill), lambda: _pad_call(extra, fill))
        if torch.compiler.is_compiling() and pad is not None:
            return super().forward(settled_call(codes, pad))
        padded = F.pad(codes, extra, value=fill)
        y = super().forward(padded)
        settle_unpadded(self, x, padded)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, extra_padding={self.extra_padding}"


def _pad_call(extra: tuple[int, ...], fill: int) -> tuple[Any, Any]:
    """(call, fake) of the constant pad of codes, for `Binding.graph_call` (the fake: the same
    aten pad on fake tensors, which states its layout)."""
    def pad(codes: torch.Tensor) -> torch.Tensor:
        return F.pad(codes, extra, value=fill)
    return pad, pad


class Int8PaddedConv1d(_PaddedMixin, Int8Conv1d):
    """`Int8Conv1d` with asymmetric zero padding (see the module docstring)."""


class Int8PaddedConv2d(_PaddedMixin, Int8Conv2d):
    """`Int8Conv2d` with asymmetric zero padding (see the module docstring)."""


class Int8PaddedConv3d(_PaddedMixin, Int8Conv3d):
    """`Int8Conv3d` with asymmetric zero padding (see the module docstring)."""


#: the padded class for each plain integer conv class
PADDED = {Int8Conv1d: Int8PaddedConv1d, Int8Conv2d: Int8PaddedConv2d, Int8Conv3d: Int8PaddedConv3d}

__all__ = ["PADDED", "Int8PaddedConv1d", "Int8PaddedConv2d", "Int8PaddedConv3d"]
