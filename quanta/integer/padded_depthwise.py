"""A padded depthwise conv's asymmetric padding inside the native kernel (no ``F.pad`` copy).

A TF-style "same" depthwise conv with stride 2 pads its uint8 input codes by ``(0, 1, 0, 1)``
(`Int8PaddedConv2d`); ``F.pad`` writes the whole padded copy, which the conv then reads again:
on TF-ported MobileNetV2 at batch 8 the copy of the [8, 96, 112, 112] codes took as long as
the stride-2 conv itself. The native depthwise loop reads the zero-point pad pixel / row for any
tap outside the image, so it runs the asymmetric padding itself (`ConvPlan` with 4 padding
values: before H, W, then after H, W): the same sums and epilogue, bit for bit the padded
input's outputs.

Only after the padded input's first (eager) call settled on the native kernel (the guards'
choice stands). Filed in the module's binding under ``("unpadded", signature)``, so it goes where
the binding's settled calls go: the eager call, and for compiled graphs the plan's
``quanta_native::conv_packed`` arguments with the 4 padding values (`unpadded_graph_entry`; a
graph traced before any eager call keeps the ``F.pad`` path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..kernels.conv_native import make_plan, plan_call
from ..kernels.graph_ops import GraphConstants


def _key(mod: Any, x: torch.Tensor) -> tuple[Any, ...]:
    return ("unpadded", mod._signature(x))


def unpadded_call(mod: Any, x: torch.Tensor) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None:
    """The settled ``(kind, call)`` of unpadded uint8 codes ``x``, or None (always while torch.compile
    traces: the call is a pybind function dynamo cannot trace, and graphs keep the ``F.pad`` path)."""
    if torch.compiler.is_compiling():
        return None
    calls = mod.binding.calls
    return calls.get(_key(mod, x)) if calls else None


def unpadded_graph_entry(mod: Any, x: torch.Tensor) -> tuple[tuple, GraphConstants] | None:
    """While torch.compile traces: the graph entry (`quanta.integer.conv_graph.run_conv_graph_entry`)
    filed with the in-kernel padding for unpadded uint8 codes ``x``, or None."""
    return mod.binding.compiled.get(_key(mod, x))


def settle_unpadded(mod: Any, x: torch.Tensor, padded: torch.Tensor) -> None:
    """After ``mod`` ran ``padded`` (``x`` with its extra padding): where that settled on the native
    depthwise kernel, file a call that pads inside the kernel for ``x``'s signature."""
    if (x.dtype != torch.uint8 or x.dim() != 4 or mod.groups != mod.in_channels or mod.groups != mod.out_channels
            or torch.compiler.is_compiling()):
        return
    settled = mod.binding.calls.get(mod._signature(padded))
    if settled is None or settled[0] != "native":
        return
    left, right, top, bottom = mod.extra_padding
    ph, pw = (int(p) for p in mod.padding)
    out_scale, out_zp = mod._emit if mod.output_kind == "uint8" else (None, 0)
    plan = make_plan(mod.weight, mod.weight_scale, mod.bias, mod._x_scale, mod._x_zp, mod.stride,
                     [ph + top, pw + left, ph + bottom, pw + right], mod.dilation, mod.groups, mod.post_op, out_scale,
                     out_zp)
    arguments = plan.arguments()  # type: ignore[attr-defined]  (conv_packed's: 5 tensors, params, inv, z)
    mod.binding.settle(_key(mod, x), "native", plan_call(plan, 4),
                       compiled=(arguments[:5], GraphConstants(("native", None, *arguments[5:]))))


__all__ = ["settle_unpadded", "unpadded_call", "unpadded_graph_entry"]
