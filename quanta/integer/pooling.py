"""Max pooling on uint8 activation codes (between integer layers).

Max pooling commutes with a monotone quantization, so it runs on codes as it does on values,
and `quanta.transforms.fuse` lets uint8 codes flow through a max-pool between integer layers.
torch 2.13's CPU max-pool on a channels-last uint8 / int8 tensor fails once ``H * W`` exceeds
255 (its index type is the element type), and integer convolutions produce channels-last
codes; these classes, which `fuse_activations` puts in place of a ``nn.MaxPoolNd`` on such a
path, pool 8-bit codes widened to int32 there (exact: a widening and a narrowing of the same
values; `quanta.kernels.codes.pool_widened`), and 2d codes through the op
`quanta.kernels.codes.max_pool2d_codes` (one native pass on channels-last uint8 codes).
Anything else goes to ``nn.MaxPoolNd`` unchanged.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from ..kernels.binding import Binding
from ..kernels.codes import max_pool2d_codes, max_pool2d_codes_call, pool_widened
from .validate import flag, geometry


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def _pool_codes(pool: nn.Module, x: torch.Tensor, forward) -> torch.Tensor:
    if x.dtype in (torch.uint8, torch.int8) and not pool.return_indices:
        return pool_widened(x, forward)  # (exact; measured on [1, 64, 112, 112] channels-last codes
        # 0.2 ms, where torch's own max-pool fails (channels-last) or takes 3 ms (contiguous))
    return forward(x)


class _CodesPool:
    """The range checks of a codes max-pool's settings."""

    dims = 2

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False) -> None:
        owner = type(self).__name__
        kernel, _, pad, _ = geometry(owner, self.dims, kernel_size, 1 if stride is None else stride, padding, dilation)
        if any(p > k // 2 for p, k in zip(pad, kernel)):
            raise ValueError(f"{owner}: padding {padding!r} must be at most half of kernel_size {kernel_size!r}")
        flag(owner, "return_indices", return_indices)
        flag(owner, "ceil_mode", ceil_mode)
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)  # type: ignore[call-arg]


class CodesMaxPool1d(_CodesPool, nn.MaxPool1d):
    dims = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pool_codes(self, x, super().forward)


class CodesMaxPool2d(_CodesPool, nn.MaxPool2d):
    """8-bit codes through `quanta.kernels.codes.max_pool2d_codes` (native on channels-last uint8,
    what integer convs emit; ``kernel_counts`` says which implementation ran)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.uint8, torch.int8) or self.return_indices:
            return super().forward(x)
        args = (x, *(_pair(v) for v in (self.kernel_size, self.stride or self.kernel_size, self.padding,
                                         self.dilation)), self.ceil_mode)
        if torch.compiler.is_compiling():  # (a graph mutates no module: the op's own choice, traced)
            return max_pool2d_codes(*args)
        binding, sig = self.binding, (x.dtype, x.device, x.shape, x.stride())
        settled = binding.calls.get(sig)
        if settled is None:  # the guards choose once per input signature, then the settled kernel runs
            impl = max_pool2d_codes.choose(*args)
            settled = (impl, max_pool2d_codes_call(impl, *args[1:]))
            binding.settle(sig, *settled)
        binding.counts[settled[0]] += 1
        return settled[1](x)

    @property
    def binding(self) -> Binding:
        """The settled kernel per input signature and the calls per implementation (made on first
        use: copies of a ``nn.MaxPool2d`` made by `codes_pool` skip the constructor)."""
        binding = self.__dict__.get("_binding")
        if binding is None:
            binding = self.__dict__["_binding"] = Binding(limit=8)
        return binding

    @property
    def kernel_counts(self) -> Counter[str]:
        return self.binding.counts

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_binding", None)  # (settled calls: a copy settles its own)
        return state


class CodesMaxPool3d(_CodesPool, nn.MaxPool3d):
    dims = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pool_codes(self, x, super().forward)


CODES_POOL = {nn.MaxPool1d: CodesMaxPool1d, nn.MaxPool2d: CodesMaxPool2d, nn.MaxPool3d: CodesMaxPool3d}


def codes_pool(pool: nn.Module) -> nn.Module:
    """The codes-safe copy of a ``nn.MaxPoolNd`` (same settings, same hooks); other modules as is."""
    cls = CODES_POOL.get(type(pool))
    if cls is None:
        return pool
    copy = cls.__new__(cls)
    copy.__dict__.update(pool.__dict__)
    return copy


__all__ = ["CodesMaxPool1d", "CodesMaxPool2d", "CodesMaxPool3d", "codes_pool"]
