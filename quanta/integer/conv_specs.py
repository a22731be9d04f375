"""What an integer convolution accepts: its specs, padding, output modes (shared by
`quanta.integer.conv` and the integer addition, `quanta.integer.add`)."""

from __future__ import annotations

import torch
from torch import nn

from ..core import Format, Granularity, QuantSpec, Rounding, quantize
from ..kernels.conv import POST_OPS
from .validate import one_of

#: default grids: unsigned asymmetric activations, symmetric narrow-range per-channel weights
DEFAULT_INPUT_SPEC = QuantSpec(bits=8, signed=False, symmetric=False)
DEFAULT_WEIGHT_SPEC = QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True,
                                granularity=Granularity.PER_CHANNEL, axis=0)
OUTPUT_KINDS = ("float", "uint8")


def input_spec_problem(spec: QuantSpec) -> str | None:
    if spec.format is not Format.INT or spec.bits != 8:
        return f"input spec {spec} is not an 8-bit integer grid"
    if spec.granularity is not Granularity.PER_TENSOR:
        return f"input spec {spec} is not per-tensor (the integer conv takes one activation scale)"
    if spec.dynamic:
        return f"input spec {spec} is dynamic (needs a calibrated, static range)"
    if spec.rounding is not Rounding.HALF_EVEN:
        return f"input spec {spec} rounds {spec.rounding.value}; oneDNN requantizes half-to-even"
    return None


def weight_spec_problem(spec: QuantSpec) -> str | None:
    # (codes of 2..7 bits are int8 codes too; 7-bit ones run oneDNN exactly without VNNI)
    if spec.format is not Format.INT or not 2 <= spec.bits <= 8 or not spec.signed or not spec.symmetric:
        return f"weight spec {spec} is not 2..8-bit signed symmetric"
    if spec.dynamic:
        return f"weight spec {spec} is dynamic"
    if spec.granularity is Granularity.PER_TENSOR:
        return None
    if spec.granularity is Granularity.PER_CHANNEL and spec.axis == 0:
        return None
    return f"weight spec {spec} is neither per-tensor nor per output channel (axis 0)"


def output_spec_problem(spec: QuantSpec) -> str | None:
    if spec.dynamic or spec.granularity is not Granularity.PER_TENSOR:
        return f"output spec {spec} is not static per-tensor"
    return None


def emit_grid(owner: nn.Module, kind: str, scale: float | torch.Tensor | None,
              zero_point: int | torch.Tensor | None) -> tuple[float, int] | None:
    """The validated uint8 output grid ``(scale, zero_point)`` of ``set_output(kind, scale,
    zero_point)`` on a uint8-emitting module (conv, addition); None for ``"float"``."""
    name = type(owner).__name__
    if kind != "uint8":
        if scale is not None or zero_point is not None:
            raise ValueError(f"{name}.set_output({kind!r}) takes no scale / zero_point")
        return None
    if scale is None or zero_point is None:
        raise ValueError(f"{name}.set_output('uint8') needs the consumers' scale and zero_point")
    s, z = float(scale), int(zero_point)
    if not (s > 0 and s < float("inf")):
        raise ValueError(f"{name}.set_output: scale must be positive and finite, got {s}")
    if not 0 <= z <= 255 or float(zero_point) != z:
        raise ValueError(f"{name}.set_output: uint8 zero_point must be an int in [0, 255], got {zero_point}")
    return s, z


def check_output_mode(owner: nn.Module, kind: str, post_op: str) -> None:
    """What a uint8-emitting integer module (conv, addition) may be set to output."""
    one_of(type(owner).__name__, "output kind", kind, OUTPUT_KINDS)
    one_of(type(owner).__name__, "post_op", post_op, POST_OPS)


def padding_of(sim: nn.Module, n: int) -> tuple[int, ...] | str:
    """Numeric padding of a torch conv, or the reason it has none (asymmetric 'same')."""
    pad = sim.padding
    if pad == "valid":
        return (0,) * n
    if pad == "same":
        out = []
        for d, k in zip(sim.dilation, sim.kernel_size):
            total = d * (k - 1)
            if total % 2:
                return f"padding='same' with kernel {tuple(sim.kernel_size)} pads asymmetrically"
            out.append(total // 2)
        return tuple(out)
    return tuple(int(p) for p in pad)


__all__ = ["DEFAULT_INPUT_SPEC", "DEFAULT_WEIGHT_SPEC", "OUTPUT_KINDS", "check_output_mode", "emit_grid", "input_spec_problem",
           "output_spec_problem", "padding_of", "weight_spec_problem"]


def conv_lowering_problem(sim: nn.Module, simulated_type: type, n: int) -> str | None:
    """Why ``sim`` cannot become an integer ``n``-d conv at all (wrong type, a user subclass,
    padding mode or padding), whatever its quantizers: the start of every conv ``accepts``."""
    if not isinstance(sim, simulated_type):
        return f"{type(sim).__name__} is not a {simulated_type.__name__}"
    if type(sim) is not simulated_type:
        return (f"{type(sim).__name__} subclasses {simulated_type.__name__} (a user forward the "
                "integer module would not reproduce)")
    if sim.padding_mode != "zeros":
        return f"padding_mode={sim.padding_mode!r} (only 'zeros' is supported)"
    pad = padding_of(sim, n)
    return pad if isinstance(pad, str) else None


def copy_conv_weights(mod: nn.Module, sim: nn.Module) -> None:
    """Fill an integer conv's canonical ``weight`` codes, ``weight_scale`` and ``bias`` from the
    simulated conv ``sim`` (its weight quantizer's codes and per-channel scales)."""
    wq = sim.weight_quantizer
    with torch.no_grad():
        ws, wzp = wq.qparams(sim.weight)
        mod.weight.copy_(quantize(sim.weight.detach().float(), ws, wzp, wq.spec))
        mod.weight_scale.copy_(ws.float().reshape(-1).expand(sim.out_channels))
        if sim.bias is not None:
            mod.bias.copy_(sim.bias.detach().float())
