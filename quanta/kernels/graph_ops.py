"""The shape (fake) kernels of the native graph operators, registered once when the native
library loads (`quanta.kernels.native.ensure`).

The operators themselves (``quanta_native::*``, ``csrc/fused.cpp``'s ``TORCH_LIBRARY`` block) run
the same C++ functions as the eager calls; compiled graphs call them so that a settled integer
module costs one call from the graph straight to C++, with eager's numbers::

    conv_packed(x, wpack, corr, mult, bias, pad, params, inv, z)    a settled ConvPlan (conv.cpp; 2d)
    linear_packed(x, w, w_sum, w_scale, bias, ...)                   a settled int8 Linear (linear_op.cpp)
    add_codes(a, sa, za, b, sb, zb, post_op, out_inv, out_zp, lo, hi)  Int8Add on uint8 codes
    max_pool2d_codes(x, kernel, stride, padding, dilation)          max-pool of channels-last codes
    quantize_static(x, inv, zero_point, qmin, qmax, is_signed)       codes in x's memory order
    quantize_to_channels_last(x, inv, zero_point, qmin, qmax)        NCHW floats -> channels-last codes
    attention(q, k, v, mask, scale)                                  float attention (kernels/attention_float.py)

torch.compile traces each through its fake kernel (output shape, dtype and strides only).

A settled eager call that has no such operator (an integer Linear settled on oneDNN's
``qlinear_pointwise``, or on the native gemv with unsigned codes) reaches compiled graphs whole,
as ``quanta_graph::settled_call(x, handle)``: `register_settled_call` files the eager callable
(and a fake stating its output) under a handle that is never reused; the operator runs that very
callable, so the graph runs eager's kernels with eager's bits (where tracing it would re-express
the layer as inductor code, e.g. oneDNN's int8 GEMM as float32 GEMMs on the codes). A handle
lives as long as the `quanta.kernels.binding.Binding` that settled it (`release_settled_calls`);
a graph compiled against it guards on the handle, so a new binding recompiles instead of
calling a released one::

    handle = register_settled_call(run, lambda x: x.new_empty((x.shape[0], n)))
    y = settled_call(x, handle)          # eagerly: run(x); traced: one opaque graph node
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch


def _fake_conv_packed(x, wpack, corr, mult, bias, pad, params, inv, z):
    from .conv_shapes import kernel_strides
    # 13 values: symmetric padding (ph, pw); 15: ph, pw before and params[13:15] after (a TF "same" pad)
    out_ch, kh, kw, sh, sw, ph, pw, dh, dw = params[1:10]
    ph_after, pw_after = (params[13], params[14]) if len(params) == 15 else (ph, pw)
    oh = (x.shape[2] + ph + ph_after - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] + pw + pw_after - dw * (kw - 1) - 1) // sw + 1
    shape = [x.shape[0], out_ch, oh, ow]
    return x.new_empty_strided(shape, kernel_strides(shape), dtype=torch.uint8 if params[12] else torch.float32)


def _fake_linear_packed(x, w, w_sum, w_scale, *_):  # (w may be the dense-packed form: N from w_scale)
    return x.new_empty((x.shape[0], w_scale.shape[0]), dtype=torch.float32)


def _fake_add_codes(a, sa, za, b, sb, zb, post_op, out_inv, out_zp, lo, hi):
    # the kernel keeps a's memory order; uint8 codes when it emits them (out_inv > 0), else float32
    return a.new_empty_strided(a.shape, a.stride(), dtype=torch.uint8 if out_inv > 0 else torch.float32)


def _fake_max_pool2d_codes(x, kernel, stride, padding, dilation):
    n, c, h, w = x.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return x.new_empty((n, c, oh, ow), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)


def _fake_quantize_static(x, inv, zero_point, qmin, qmax, is_signed):
    return x.new_empty_strided(x.shape, x.stride(), dtype=torch.int8 if is_signed else torch.uint8)


def _fake_quantize_to_channels_last(x, inv, zero_point, qmin, qmax):
    return x.new_empty(x.shape, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)


def _fake_attention(q, k, v, mask, scale):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


FAKES = {"conv_packed": _fake_conv_packed, "linear_packed": _fake_linear_packed, "add_codes": _fake_add_codes,
         "max_pool2d_codes": _fake_max_pool2d_codes, "quantize_static": _fake_quantize_static,
         "quantize_to_channels_last": _fake_quantize_to_channels_last, "attention": _fake_attention}


class SettledGraphCall(NamedTuple):
    """What a `quanta.kernels.binding.Binding` holds for graphs where an eager call is run whole:
    the handle `settled_call` takes."""

    handle: int


#: handle -> (the settled eager call on one tensor, its fake: the output's shape, dtype, strides)
_SETTLED: dict[int, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {}
_HANDLES = itertools.count(1)


def register_settled_call(call: Callable[[torch.Tensor], torch.Tensor],
                          fake: Callable[[torch.Tensor], torch.Tensor]) -> SettledGraphCall:
    """File ``call`` (and ``fake``, the same output as an empty tensor) for compiled graphs."""
    if not callable(call) or not callable(fake):
        raise TypeError("register_settled_call: call and fake must be callables")
    handle = next(_HANDLES)
    _SETTLED[handle] = (call, fake)
    return SettledGraphCall(handle)


def release_settled_calls(handles: list[int]) -> None:
    """Forget these handles' calls (their binding is gone: the weights they hold are freed)."""
    for h in handles:
        _SETTLED.pop(h, None)


def _settled(handle: int, who: str):
    entry = _SETTLED.get(handle)
    if entry is None:
        raise RuntimeError(f"quanta_graph::{who}: settled call {handle} was released (its module repacked or "
                           "was deleted); call torch._dynamo.reset() or recompile")
    return entry


@torch.library.custom_op("quanta_graph::settled_call", mutates_args=())
def _settled_call_op(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _settled(handle, "settled_call")[0](x)


@_settled_call_op.register_fake
def _settled_call_fake(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _settled(handle, "settled_call")[1](x)


def settled_call(x: torch.Tensor, graph_call: SettledGraphCall) -> torch.Tensor:
    """Run the settled call filed under ``graph_call`` on ``x`` (as one graph node when traced)."""
    return torch.ops.quanta_graph.settled_call.default(x, graph_call.handle)


class GraphConstants:
    """The non-tensor arguments of a settled kernel call (ints, floats, strings, lists of them),
    held for compiled graphs: a graph reads them through `graph_constants`, which torch.compile
    runs while tracing and bakes in, guarding the holder (its identity and its never-reused
    ``token``) instead of each value: two guards per call site where a native conv's 13 ints, 2
    floats and kind took 16, and guards are evaluated on every compiled call. A holder is never
    changed: what it holds goes stale only with its binding, which a repack replaces (new holders,
    new tokens: the graph recompiles)::

        held = GraphConstants(("native", [64, 64, 3, 3, ...], 110.8, 0.0))
        kind, params, inv, z = graph_constants(held, held.token)   # traced: constants, 2 guards
    """

    __slots__ = ("token", "values")

    def __init__(self, values: tuple) -> None:
        if not isinstance(values, tuple):
            raise TypeError(f"GraphConstants: values must be a tuple, got {type(values).__name__}")
        self.values = values
        self.token = next(_TOKENS)

    def __repr__(self) -> str:
        return f"GraphConstants(#{self.token}, {self.values!r})"


_TOKENS = itertools.count(1)


@torch.compiler.assume_constant_result
def _held_values(held: GraphConstants, token: int) -> tuple:
    return held.values


def graph_constants(held: GraphConstants, token: int) -> tuple:
    """``held.values``; while torch.compile traces, constants guarded only through ``held`` and
    ``token`` (pass ``held.token``: read in the traced code, it is guarded by value, so that a new
    holder at a freed one's address still recompiles)."""
    if token != held.token:
        raise ValueError(f"graph_constants: token {token} is not this holder's ({held.token})")
    return _held_values(held, token)


def register_fakes() -> None:
    """Register every operator's fake kernel (once per process: the native library, which defines
    the operators, loads once)."""
    for name, fake in FAKES.items():
        torch.library.register_fake(f"quanta_native::{name}")(fake)


__all__ = ["FAKES", "GraphConstants", "SettledGraphCall", "graph_constants", "register_fakes", "register_settled_call",
           "release_settled_calls", "settled_call"]
