"""What an integer conv files for compiled graphs, and how a traced call runs it.

`_Int8ConvNd._settle` files, per input signature, the settled kernel's graph entry: its tensors
as they are and every other argument held in one `quanta.kernels.graph_ops.GraphConstants`, so
that the guards torch.compile checks before each call read the holder (its identity and token)
instead of each value (a native conv's 13 ints, 2 floats, kind: ~16 guards per conv, most of the
~2400 guards of a compiled TF MobileNet)::

    call, entry = settled_conv_call("native", args, None, "relu")   # eager: call(codes)
    y = run_conv_graph_entry(entry, codes)                          # traced: one graph node
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..kernels.codes import quantize_codes
from ..kernels.conv import onednn_call
from ..kernels.conv_native import compiled_run, make_plan, plan_call
from ..kernels.graph_ops import GraphConstants, graph_constants


def settled_conv_call(impl: str, args: tuple[Any, ...], quantize: tuple[Any, ...] | None, post_op: str
                      ) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple[tuple, GraphConstants]] | None:
    """``(eager call on uint8 codes, graph entry)`` of the conv ``impl`` settled on ``args``
    (`int8_conv`'s), None where graphs have no direct call for it. ``quantize``: a float input's
    settled ``(implementation, *quantize_codes arguments but the input)``, else None."""
    if impl == "native":  # ConvPlan.arguments(): wpack, corr, mult, bias, pad tensors; params, inv, z
        plan = make_plan(args[3], args[4], args[5], args[1], args[2], *args[6:13])
        arguments = plan.arguments()  # type: ignore[attr-defined]
        return plan_call(plan, args[0].dim()), (arguments[:5], GraphConstants(("native", quantize, *arguments[5:])))
    if impl == "onednn" and args[0].dim() in (4, 5) and (args[0].dim() == 4 or post_op == "none") and \
            args[-1] is not None:  # tensors: weight, w_scale, bias, packed
        constants = GraphConstants(("onednn", quantize, *args[1:3], *args[6:13]))
        return onednn_call(args[0].dim(), *args[1:]), ((args[3], args[4], args[5], args[13]), constants)
    return None


def run_conv_graph_entry(entry: tuple[tuple, GraphConstants], x: torch.Tensor) -> torch.Tensor:
    """The filed kernel on ``x`` (uint8 codes, or a float input quantized as eager settled)."""
    tensors, held = entry
    kind, quantize, *constants = graph_constants(held, held.token)
    codes = x if quantize is None else quantize_codes(x, *quantize[1:], impl=quantize[0], checked=True)
    if kind == "native":  # conv_packed(x, wpack, corr, mult, bias, pad, params, inv, z)
        return compiled_run(codes, (*tensors, *constants))
    weight, w_scale, bias, packed = tensors  # onednn_call(dim, x_scale, x_zp, weight, w_scale, bias, stride, ...)
    return onednn_call(codes.dim(), *constants[:2], weight, w_scale, bias, *constants[2:], packed)(codes)


__all__ = ["run_conv_graph_entry", "settled_conv_call"]
