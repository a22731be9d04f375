"""Attention written out in a user block's ``forward`` becomes one `ScaledDotProductAttention` call.

Users (and ports of BERT / MiniLM / ViT code) write self-attention as::

    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)   # or * scale, or q @ ...
    scores = scores + mask                                                 # optional
    probs = scores.softmax(dim=-1)                                         # or F.softmax / nn.Softmax
    probs = self.dropout(probs)                                            # optional nn.Dropout
    ctx = torch.matmul(probs, v)

On CPU that is two batched matmuls on transposed views and a ``[B, H, S, S]`` tensor written and
read several times; quanta's integer Linears around it leave it the largest float cost of such a
model. `attention_chains` finds each such chain in the ``torch.fx`` graph of a block's own
forward (the trace `residual_adds` makes, under the same conditions: the same graph in train and
eval mode, no Python decision on an input); `rewrite` replaces it by a call of a new child
``fused_attention`` (``fused_attention_<k>`` for the k-th softmax of the forward). A chain whose
scores or probabilities are used anywhere else (returned attention weights, a second softmax)
stays as written. The child computes within float32 rounding of the ops it replaces, in the
simulated and the integer model alike; ``QuantConfig(module_types={"ScaledDotProductAttention":
None})`` or an exclusion covering the block keeps the user's ops.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.modules.fused_attention import ScaledDotProductAttention

MATMULS = (torch.matmul, operator.matmul, torch.bmm)
_SOFTMAX_FUNCTIONS = (torch.softmax, F.softmax)
_ADDS = (operator.add, torch.add)
#: the prefix of the rewritten chains' children
CHILD = "fused_attention"


@dataclass(frozen=True)
class Chain:
    """One matched attention: the nodes it replaces (first to last) and the call's arguments."""

    nodes: tuple[fx.Node, ...]
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    scale: float
    dropout_p: float
    transpose: fx.Node


def _call(node: Any, functions: tuple, method: str | None = None) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in functions)
        or (method is not None and node.op == "call_method" and node.target == method))


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return len(node.users) == 1 and user in node.users


def _softmax_input(node: fx.Node, mods: dict[str, nn.Module]) -> fx.Node | None:
    """The input of a ``softmax(dim=-1)`` node (function, method or ``nn.Softmax``), else None."""
    if node.op == "call_module":
        m = mods.get(str(node.target))
        ok = type(m) is nn.Softmax and m.dim == -1 and len(node.args) == 1 and not node.kwargs
        return node.args[0] if ok and isinstance(node.args[0], fx.Node) else None
    if not _call(node, _SOFTMAX_FUNCTIONS, "softmax") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    dims = list(node.args[1:]) + ([node.kwargs["dim"]] if "dim" in node.kwargs else [])
    extra = {k: v for k, v in node.kwargs.items() if k not in ("dim", "_stacklevel")}  # (F.softmax records these)
    return node.args[0] if dims == [-1] and extra in ({}, {"dtype": None}) else None


def _number(a: Any) -> float | None:
    return float(a) if isinstance(a, numbers.Real) and not isinstance(a, bool) else None


def _scale_of(node: fx.Node) -> tuple[fx.Node, float] | None:
    """``(scores, factor)`` of ``scores / c`` or ``scores * c`` (c a finite nonzero number)."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if _call(node, (operator.truediv, torch.div), "div") and isinstance(a, fx.Node):
        c = _number(b)
        return (a, 1.0 / c) if c is not None and c != 0 and abs(1.0 / c) < float("inf") else None
    if _call(node, (operator.mul, torch.mul), "mul"):
        node_arg, c = (a, _number(b)) if isinstance(a, fx.Node) else (b, _number(a))
        return (node_arg, c) if isinstance(node_arg, fx.Node) and c is not None and c != 0 else None
    return None


def _transposed(node: Any) -> fx.Node | None:
    """``k`` of ``k.transpose(-1, -2)`` / ``torch.transpose(k, -2, -1)``, else None."""
    if not _call(node, (torch.transpose,), "transpose") or node.kwargs or len(node.args) != 3:
        return None
    k, d0, d1 = node.args
    return k if isinstance(k, fx.Node) and {d0, d1} == {-1, -2} else None


def match(softmax: fx.Node, mods: dict[str, nn.Module]) -> Chain | str:
    """The attention chain around ``softmax``, or why there is none."""
    x = _softmax_input(softmax, mods)
    if x is None:
        return "not a softmax over the last dimension"
    nodes, mask = [softmax], None
    if _call(x, _ADDS, "add") and len(x.args) == 2 and not x.kwargs and _only_user(x, softmax):
        a, b = x.args
        scored = next((s for s, m in ((a, b), (b, a)) if isinstance(s, fx.Node) and isinstance(m, fx.Node)
                       and (_scale_of(s) or _call(s, MATMULS))), None)
        if scored is None:
            return "the softmax's input is an addition, not of scores and a mask"
        mask = b if scored is a else a
        nodes.insert(0, x)
        x = scored
    scale = 1.0
    scaled = _scale_of(x) if isinstance(x, fx.Node) else None
    if scaled is not None:
        if not _only_user(x, nodes[0]):
            return "the scaled scores are used elsewhere"
        nodes.insert(0, x)
        x, scale = scaled
    if not _call(x, MATMULS) or len(x.args) != 2 or x.kwargs or not _only_user(x, nodes[0]):
        return "the softmax's input is not the scores q · kᵀ (used only there)"
    q, kt = x.args
    k = _transposed(kt)
    if not isinstance(q, fx.Node) or k is None:
        return "the scores are not q · k.transpose(-1, -2)"
    nodes.insert(0, x)
    probs, dropout_p = softmax, 0.0
    if len(probs.users) == 1:
        user = next(iter(probs.users))
        m = mods.get(str(user.target)) if user.op == "call_module" else None
        if type(m) is nn.Dropout and len(user.args) == 1 and not user.kwargs:
            probs, dropout_p = user, float(m.p)
            nodes.append(user)
    if len(probs.users) != 1:
        return "the attention probabilities are used elsewhere"
    out = next(iter(probs.users))
    if not _call(out, MATMULS) or len(out.args) != 2 or out.kwargs or out.args[0] is not probs \
            or not isinstance(out.args[1], fx.Node):
        return "the probabilities are not multiplied by the values"
    nodes.append(out)
    return Chain(tuple(nodes), q, k, out.args[1], mask, scale, dropout_p, kt)


def softmax_nodes(graph: fx.Graph, mods: dict[str, nn.Module]) -> list[fx.Node]:
    """Every softmax of the graph, in order (their indices name the chains)."""
    return [n for n in graph.nodes if (n.op == "call_module" and type(mods.get(str(n.target))) is nn.Softmax)
            or _call(n, _SOFTMAX_FUNCTIONS, "softmax")]


def attention_chains(graph: fx.Graph, mod: nn.Module) -> dict[int, Chain | str]:
    """Per softmax index: its attention chain, or why it stays as written."""
    mods = dict(mod.named_modules())
    return {i: match(n, mods) for i, n in enumerate(softmax_nodes(graph, mods))}


def child_name(mod: nn.Module, index: int) -> str:
    name = CHILD if index == 0 else f"{CHILD}_{index}"
    while name in mod._modules or name in mod.__dict__ or hasattr(type(mod), name):
        name = "_" + name
    return name


def make_child(chain: Chain) -> ScaledDotProductAttention:
    return ScaledDotProductAttention(chain.scale, chain.dropout_p)


def rewrite(graph: fx.Graph, chains: list[tuple[Chain, str]]) -> None:
    """Replace each ``(chain, child name)`` of ``graph`` by a call of that child."""
    for chain, name in chains:
        last = chain.nodes[-1]
        args = (chain.q, chain.k, chain.v) + (() if chain.mask is None else (chain.mask,))
        with graph.inserting_before(last):
            new = graph.call_module(name, args)
        last.replace_all_uses_with(new)
        for node in reversed(chain.nodes):
            graph.erase_node(node)
        if not chain.transpose.users:
            graph.erase_node(chain.transpose)


def runs_fused(config: Any) -> Any:
    """For `rewrite_residual_adds`: whether ``config`` (a `QuantConfig`) lets the child named so be
    made (not when a type entry or an exclusion maps it, or the block, to None)."""

    def wanted(name: str) -> bool:
        decision = config.decide(name, ScaledDotProductAttention())
        return decision.config is not None or decision.reason == "default"

    return wanted


__all__ = ["CHILD", "Chain", "attention_chains", "child_name", "make_child", "match", "rewrite", "runs_fused"]
