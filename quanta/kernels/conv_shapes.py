"""Output shape and memory layout of an integer convolution: shared by the reference, the native
implementation (`conv_native`) and the graph operators' fake kernels (`graph_ops`), so that none
imports another's module for them."""

from __future__ import annotations

from collections.abc import Sequence


def conv_output_shape(x_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """``[N, O, *spatial]`` of a convolution (the usual floor formula)."""
    spatial = [(s + 2 * p - d * (k - 1) - 1) // st + 1
               for s, k, st, p, d in zip(x_shape[2:], weight_shape[2:], stride, padding, dilation)]
    return [x_shape[0], weight_shape[0], *spatial]


def kernel_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Strides of the outputs every implementation returns: channels-last, the layout oneDNN
    produces and the next oneDNN conv wants (a 1d output is the squeezed 2d one: ``(C·L, 1, C)``).
    One layout for all, so that torch.compile's fake kernel can state it."""
    n_spatial = len(shape) - 2
    c = shape[1]
    strides = [0] * len(shape)
    strides[1] = 1
    step = c
    for i in range(len(shape) - 1, 1, -1):
        strides[i] = step
        step *= shape[i]
    strides[0] = step if n_spatial else c
    return tuple(strides)
