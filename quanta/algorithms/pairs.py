"""Find the layer pairs the data-free algorithms work on: a conv/linear whose only consumer,
through ReLU / ReLU6 / identity, is another conv/linear; and each layer's BatchNorm statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.modules.op_base import QuantOp
from ..nn.tensor_quantizer import TensorQuantizer
from ..transforms.conv_subclass import runs_layer_op, traced_calls

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: activation modules / functions a pair may pass through, by kind
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Identity: "identity", nn.Dropout: "identity"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}


@dataclass(frozen=True)
class LayerPair:
    """``first`` feeds ``second`` through ``activation`` (``relu``, ``relu6`` or ``identity``)."""

    first: str
    second: str
    activation: str


def plain_forward(module: nn.Module) -> bool:
    """A conv/linear (or subclass) whose forward provably computes its layer op: torch's own, or
    a conv subclass that pads with constant zeros then convolves (`runs_layer_op`); per-channel
    scaling is exact through it. A subclass with any other ``forward`` is not."""
    return runs_layer_op(module)


def _act_kind(mod: nn.Module | None, node: torch.fx.Node) -> str | None:
    if node.op == "call_module" and mod is not None:
        for cls, kind in _ACT_MODULES.items():
            if type(mod) is cls:
                return kind
        return None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS and not node.kwargs.get("inplace", False) \
            and len(node.args) == 1:
        return _ACT_FUNCTIONS[node.target]
    return None


class _LeafTracer(torch.fx.Tracer):
    """Conv/linear layers (quantized ones too) are leaves: one node each; so are quantizers and
    quantized functional ops (a residual ``Add`` prepare made: tracing into it would run its
    quantizers before calibration)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_WEIGHTED, TensorQuantizer, QuantOp)) or super().is_leaf_module(m, qualname)


def find_pairs(model: nn.Module) -> tuple[list[LayerPair], list[str]]:
    """All pairs ``conv → act* → conv`` (any conv/linear class; callers check `plain_forward`)
    and notes on what could not be analysed. Traces with ``torch.fx``; a model that cannot be
    traced falls back to adjacency inside ``nn.Sequential``."""
    try:
        graph, mods, calls = traced_calls(model, _LeafTracer())
    except Exception as e:
        note = f"torch.fx could not trace the model ({type(e).__name__}); pairs found by nn.Sequential order only"
        return _pairs_sequential(model), [note]
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _WEIGHTED) or calls[node.target] != 1:
            continue
        kinds = []
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if not nxt.args or nxt.args[0] is not cur:
                break
            mod = mods.get(nxt.target) if nxt.op == "call_module" else None
            if isinstance(mod, _WEIGHTED):
                if calls[nxt.target] == 1:
                    pairs.append(LayerPair(node.target, nxt.target, _combine(kinds)))
                break
            kind = _act_kind(mod, nxt)
            if kind is None:
                break
            kinds.append(kind)
            cur = nxt
    return [p for p in pairs if p.activation != "mixed"], []


def _combine(kinds: list[str]) -> str:
    real = [k for k in kinds if k != "identity"]
    if not real:
        return "identity"
    return real[0] if len(real) == 1 or all(k == "relu" for k in real) else "mixed"


def _pairs_sequential(model: nn.Module) -> list[LayerPair]:
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{name}." if name else ""
        kids = list(seq.named_children())
        for i, (a, ma) in enumerate(kids):
            if not isinstance(ma, _WEIGHTED):
                continue
            kinds = []
            for b, mb in kids[i + 1:]:
                if isinstance(mb, _WEIGHTED):
                    kind = _combine(kinds)
                    if kind != "mixed":
                        pairs.append(LayerPair(prefix + a, prefix + b, kind))
                    break
                kind = next((k for c, k in _ACT_MODULES.items() if type(mb) is c), None)
                if kind is None:
                    break
                kinds.append(kind)
    return pairs


def channels_match(first: nn.Module, second: nn.Module) -> bool:
    out = first.out_features if isinstance(first, nn.Linear) else first.out_channels
    inp = second.in_features if isinstance(second, nn.Linear) else second.in_channels
    same_kind = isinstance(first, nn.Linear) == isinstance(second, nn.Linear)
    return out == inp and same_kind


def batchnorm_statistics(model: nn.Module, bn_pairs: list[tuple[str, str]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (mean, std)}`` of each layer's output after its BatchNorm (``β``, ``|γ|``), read
    before folding: the distribution of the pre-activation the data-free algorithms assume."""
    stats = {}
    for conv, bn_name in bn_pairs:
        bn = model.get_submodule(bn_name)
        if bn.weight is None or bn.bias is None:
            continue
        stats[conv] = (bn.bias.detach().double().clone(), bn.weight.detach().double().abs().clone())
    return stats


__all__ = ["LayerPair", "batchnorm_statistics", "channels_match", "find_pairs", "plain_forward"]


def bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The ``(layer, BatchNorm)`` pairs `quanta.fold_batchnorm` would fold."""
    from ..transforms.fold_bn import _pairs_fx, _pairs_sequential

    pairs = _pairs_fx(model)
    return _pairs_sequential(model) if pairs is None else pairs
