"""Max pooling on uint8 activation codes (between integer layers).

Max pooling commutes with a monotone quantization, so it runs on codes as it does on values,
and `quanta.transforms.fuse` lets uint8 codes flow through a max-pool between integer layers.
torch 2.13's CPU max-pool on a channels-last uint8 / int8 tensor fails once ``H * W`` exceeds
255 (its index type is the element type), and integer convolutions produce channels-last
codes; these classes, which `fuse_activations` puts in place of a ``nn.MaxPoolNd`` on such a
path, pool 8-bit codes in int16 there (exact: a widening and a narrowing of the same values).
Anything else goes to ``nn.MaxPoolNd`` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import native
from .validate import flag, geometry


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def _pool_codes(pool: nn.Module, x: torch.Tensor, forward) -> torch.Tensor:
    if x.dtype in (torch.uint8, torch.int8) and not pool.return_indices:
        # 8-bit codes pooled as int32 (float32 for 1d, which has no integer kernel): exact, and
        # measured on [1, 64, 112, 112] channels-last codes 0.2 ms, where torch's own max-pool
        # fails (channels-last) or takes 3 ms (contiguous, a scalar loop)
        wide = x.float() if x.dim() == 3 else x.to(torch.int32)
        return forward(wide).to(x.dtype)
    return forward(x)


class _CodesPool:
    """The range checks of a codes max-pool's settings (the native kernel trusts them)."""

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
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8 and x.dim() == 4 and not self.ceil_mode and not self.return_indices and \
                x.device.type == "cpu" and native.ready() and x.is_contiguous(memory_format=torch.channels_last):
            # one pass in the native kernels (channels-last uint8 codes: what integer convs emit); a
            # compiled graph calls the same function as the quanta_native::max_pool2d_codes operator
            k, s, p, d = (_pair(v) for v in (self.kernel_size, self.stride or self.kernel_size, self.padding,
                                              self.dilation))
            pool = torch.ops.quanta_native.max_pool2d_codes.default if torch.compiler.is_compiling() \
                else native.module().max_pool2d_codes
            return pool(x, k, s, p, d)
        return _pool_codes(self, x, super().forward)


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
