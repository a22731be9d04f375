"""Cross-layer equalization and high-bias absorption (Nagel et al. 2019, data-free quantization)
on a float model whose BatchNorm is folded."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .pairs import LayerPair, channels_match, find_pairs, plain_forward

#: how many sweeps over the pairs (a chain a→b→c needs a few to settle)
SWEEPS = 8


def _grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[out, in/g, *k]`` → ``[g, out/g, in/g, *k]``."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def _in_ranges(layer: nn.Module) -> torch.Tensor:
    """Max |weight| per input channel of ``layer`` (what scales with that channel)."""
    w = layer.weight.detach().double()
    groups = getattr(layer, "groups", 1)
    g = _grouped(w, groups).abs()
    per = g.transpose(1, 2).reshape(groups, g.shape[2], -1).amax(dim=2)  # [g, in/g]
    return per.reshape(-1)


def _out_ranges(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().double().abs().reshape(layer.weight.shape[0], -1).amax(dim=1)


@torch.no_grad()
def _scale_pair(first: nn.Module, second: nn.Module, s: torch.Tensor) -> None:
    """``first``'s output channel ``i`` divided by ``s_i``; ``second``'s input channel ``i`` × ``s_i``."""
    shape = [-1] + [1] * (first.weight.dim() - 1)
    first.weight.copy_((first.weight.double() / s.reshape(shape)).to(first.weight.dtype))
    if first.bias is not None:
        first.bias.copy_((first.bias.double() / s).to(first.bias.dtype))
    groups = getattr(second, "groups", 1)
    w = _grouped(second.weight.double(), groups)
    s_g = s.reshape(groups, 1, -1, *([1] * (w.dim() - 3)))
    second.weight.copy_((w * s_g).reshape(second.weight.shape).to(second.weight.dtype))


def equalizable_pairs(model: nn.Module) -> tuple[list[LayerPair], list[str]]:
    """The pairs CLE may scale, and why the others were skipped."""
    pairs, notes = find_pairs(model)
    ok = []
    for p in pairs:
        a, b = model.get_submodule(p.first), model.get_submodule(p.second)
        if p.activation == "relu6":
            notes.append(f"{p.first} → {p.second}: through ReLU6, whose clipping at 6 is not scale-equivariant "
                         "(skipped, the float function is kept)")
        elif not (plain_forward(a) and plain_forward(b)):
            who = p.first if not plain_forward(a) else p.second
            notes.append(f"{p.first} → {p.second}: {who} ({type(model.get_submodule(who)).__name__}) has its own "
                         "forward, which CLE cannot prove linear per channel (skipped)")
        elif not channels_match(a, b) or getattr(b, "padding_mode", "zeros") != "zeros" \
                or getattr(a, "padding_mode", "zeros") != "zeros":
            notes.append(f"{p.first} → {p.second}: channel layout or padding mode does not allow scaling (skipped)")
        else:
            ok.append(p)
    return ok, notes


def cross_layer_equalization(model: nn.Module, sweeps: int = SWEEPS,
                             statistics: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """Equalize, in place, the weight ranges of consecutive conv/linear pairs of a float model.

    For each pair ``first → (ReLU | identity) → second`` (depthwise → pointwise included), output
    channel ``i`` of ``first`` is divided by ``s_i = sqrt(r1_i · r2_i) / r2_i`` and input channel
    ``i`` of ``second`` multiplied by it (``r1``, ``r2``: the channel's weight ranges), so both
    layers end with range ``sqrt(r1_i · r2_i)`` and the float function is unchanged (ReLU is
    positively homogeneous). Pairs through ReLU6 are skipped (its clipping is not scale-equivariant),
    as are convs whose class overrides torch's forward. Fold BatchNorm first.

    ``statistics`` (``{layer: (mean, std)}`` of pre-activations, from BatchNorm) are rescaled along.
    Returns a record: ``pairs`` (names, activation, min/max scale), ``skipped`` (reasons), ``note``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"cross_layer_equalization expects an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in model.modules()):
        skipped_bn = "the model still has BatchNorm layers: pairs through them are not equalized (fold them first)"
    else:
        skipped_bn = ""
    pairs, notes = equalizable_pairs(model)
    if skipped_bn:
        notes.append(skipped_bn)
    if not pairs:
        return {"algorithm": "cle", "pairs": [], "skipped": notes,
                "note": "no equalizable conv/linear pair: the model is unchanged"}
    total = {p: torch.ones(_out_ranges(model.get_submodule(p.first)).shape, dtype=torch.float64) for p in pairs}
    for _ in range(sweeps):
        for p in pairs:
            a, b = model.get_submodule(p.first), model.get_submodule(p.second)
            r1, r2 = _out_ranges(a), _in_ranges(b)
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 * r2) / r2.clamp_min(1e-300), torch.ones_like(r1))
            _scale_pair(a, b, s)
            total[p] *= s
            if statistics is not None and p.first in statistics:
                mean, std = statistics[p.first]
                statistics[p.first] = (mean / s, std / s)
    rows = [{"first": p.first, "second": p.second, "activation": p.activation,
             "scale_min": round(float(total[p].min()), 6), "scale_max": round(float(total[p].max()), 6)}
            for p in pairs]
    return {"algorithm": "cle", "pairs": rows, "skipped": notes, "note": f"{len(rows)} pair(s) equalized"}


@torch.no_grad()
def absorb_high_bias(model: nn.Module, statistics: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     sigmas: float = 3.0) -> dict:
    """Move, in place, the part of each ReLU layer's bias that is almost always positive into the
    next layer: ``c_i = max(0, β_i − sigmas·γ_i)`` (pre-activation mean ``β``, std ``γ`` from
    BatchNorm), ``b1 −= c``, ``b2 += W2 · c``. Exact where the pre-activation stays above ``c``
    (for 99.87% of a normal at 3σ) and, for padded convs, away from the border. Needs
    ``statistics`` (see `quanta.algorithms.batchnorm_statistics`), which it updates."""
    pairs, _ = equalizable_pairs(model)
    rows = []
    for p in pairs:
        if p.first not in statistics:
            continue
        a, b = model.get_submodule(p.first), model.get_submodule(p.second)
        if a.bias is None or p.activation != "relu":
            continue
        mean, std = statistics[p.first]
        c = (mean - sigmas * std).clamp_min(0)
        if not bool((c != 0).any()):
            continue
        shift = expected_output(b, b.weight.double(), c)
        a.bias.copy_((a.bias.double() - c).to(a.bias.dtype))
        if b.bias is None:
            b.bias = nn.Parameter(torch.zeros(b.weight.shape[0], dtype=b.weight.dtype))
        b.bias.copy_((b.bias.double() + shift).to(b.bias.dtype))
        statistics[p.first] = (mean - c, std)
        rows.append({"first": p.first, "second": p.second, "channels": int((c != 0).sum()),
                     "absorbed_max": round(float(c.max()), 6)})
    note = f"{len(rows)} layer(s) absorbed bias" if rows else "no bias to absorb (no BatchNorm statistics or no high bias)"
    return {"algorithm": "high_bias_absorption", "pairs": rows, "note": note}


def expected_output(layer: nn.Module, weight: torch.Tensor, mean_in: torch.Tensor) -> torch.Tensor:
    """``E[layer_weight · x]`` per output channel for an input with per-channel mean ``mean_in``
    (padding ignored): a constant input over one kernel window."""
    if isinstance(layer, nn.Linear):
        return weight @ mean_in
    spatial = weight.dim() - 2
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[spatial]
    dil = layer.dilation
    size = [d * (k - 1) + 1 for d, k in zip(dil, weight.shape[2:])]
    x = mean_in.reshape(1, -1, *([1] * spatial)).expand(1, -1, *size).to(weight.dtype)
    return conv(x, weight, None, 1, 0, dil, layer.groups).reshape(-1)


def run_cle(model: nn.Module, ctx: Any) -> dict:
    """Pipeline entry (`pipeline.REGISTRY`): CLE with the BatchNorm statistics of the folded layers."""
    return cross_layer_equalization(model, statistics=ctx.statistics)


def run_absorption(model: nn.Module, ctx: Any) -> dict:
    """Pipeline entry: high-bias absorption from the BatchNorm statistics."""
    return absorb_high_bias(model, ctx.statistics)
