"""Fold BatchNorm into the convolution or linear layer that feeds it (eval mode)."""

from __future__ import annotations

import torch
from torch import nn

from .conv_subclass import LayerLeafTracer, runs_layer_op, traced_calls

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, _BN) or bn.running_mean is None or bn.running_var is None:
        return False
    if isinstance(conv, _CONV_T):
        return conv.groups == 1 and conv.out_channels == bn.num_features
    if not runs_layer_op(conv):  # (a user subclass whose forward does more than its layer op)
        return False
    if isinstance(conv, nn.Linear):
        return conv.out_features == bn.num_features
    return isinstance(conv, _CONV) and conv.out_channels == bn.num_features


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    try:
        # (a user conv subclass that pads, then convolves: one node)
        graph, mods, calls = traced_calls(model, LayerLeafTracer())
    except Exception:  # data-dependent control flow etc.: fall back to Sequential adjacency
        return None
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _BN) or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[src.target] != 1 or calls[node.target] != 1:
            continue  # a shared module cannot absorb one call site's normalisation
        if _foldable(mods[src.target], mods[node.target]):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (a, ma), (b, mb) in zip(kids, kids[1:]):
                if _foldable(ma, mb):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


@torch.no_grad()
def fold_bn_into(conv: nn.Module, bn: nn.Module) -> None:
    """Rewrite ``conv``'s weight and bias so that ``bn(conv(x)) == conv'(x)`` (float64 math)."""
    w = conv.weight.double()
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    shape = [1] * w.dim()
    shape[1 if isinstance(conv, _CONV_T) else 0] = -1
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv_std)
    new_bias = (bias - bn.running_mean.double()) * factor + beta
    conv.weight = nn.Parameter((w * factor.reshape(shape)).to(conv.weight.dtype), conv.weight.requires_grad)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), conv.weight.requires_grad)


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold, in place, every BatchNorm that is the only consumer of a conv/linear output.

    Pairs are found by tracing the model with ``torch.fx`` (or, when it cannot be traced, by
    adjacency inside ``nn.Sequential``); each folded BatchNorm becomes ``nn.Identity``.
    Returns the ``(conv_name, bn_name)`` pairs folded.
    """
    if model.training:
        raise ValueError("BatchNorm folding needs the model in eval mode (it uses the running "
                         "statistics): call model.eval() first")
    pairs = _pairs_fx(model)
    if pairs is None:
        pairs = _pairs_sequential(model)
    for conv_name, bn_name in pairs:
        fold_bn_into(model.get_submodule(conv_name), model.get_submodule(bn_name))
        parent_name, _, leaf = bn_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, nn.Identity())
    return pairs
