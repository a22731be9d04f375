"""What kind of value each node of a module's own traced ``forward`` provably holds.

`residual_adds` rewrites ``a + b`` into a `quanta.nn.Add` module only where both operands are
provably tensors and one of them comes from a convolution. This module proves it from the
data flow of a ``torch.fx`` trace of one module's own ``forward`` (its children are leaves),
without running the model:

- ``CONV``: a float tensor computed by a convolution, possibly through ops that keep it a
  tensor of the same kind (BatchNorm, ReLU/ReLU6/SiLU..., max pooling, dropout, Identity,
  additions of tensors);
- ``TENSOR``: a tensor (a Linear's or a norm's output, an input that a conv/linear/norm reads);
- ``UNKNOWN``: anything else (an input no layer reads, a parameter, ``x.shape[0]``, a tuple).

A child module's output kind is read from its type (torch's own layers), through
``nn.Sequential`` chains, or from the child's own traced ``forward`` (recursively); an input's
kind from what the callers pass (`propagate`) or from the layer that reads it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.modules.functional import Add, QuantAdd
from .conv_subclass import runs_layer_op

UNKNOWN, TENSOR, CONV = 0, 1, 2

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
#: torch modules whose output is a tensor of the kind of their (tensor) input
_KEEPING = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish,
            nn.GELU, nn.LeakyReLU, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.ELU, nn.Mish, nn.MaxPool1d, nn.MaxPool2d,
            nn.MaxPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_KEEPING_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.silu, F.hardswish, F.gelu, F.leaky_relu,
                      torch.sigmoid, F.sigmoid, torch.tanh, F.dropout, F.max_pool2d, torch.flatten}
_KEEPING_METHODS = {"relu", "sigmoid", "contiguous", "flatten", "clone"}
#: additions `residual_adds` may rewrite (``operator.iadd`` never appears: fx traces ``a += b`` as add)
ADD_FUNCTIONS = (operator.add, torch.add)

Tracer = Callable[[nn.Module], "fx.Graph | str"]


def defined_by_torch_or_quanta(cls: type, attr: str = "forward") -> bool:
    """Whether ``cls.<attr>`` comes from torch or quanta (not from a user's class)."""
    owner = next((k for k in cls.__mro__ if attr in vars(k)), object)
    return owner.__module__.split(".")[0] in ("torch", "quanta", "builtins")


def requires_tensor(mod: nn.Module) -> bool:
    """Whether ``mod``'s first input must be a tensor for its call to succeed."""
    if isinstance(mod, _CONVS + (nn.Linear,)):
        return runs_layer_op(mod)
    if isinstance(mod, _LAYERS + _KEEPING) and not isinstance(mod, nn.Identity):
        return defined_by_torch_or_quanta(type(mod))
    if type(mod).forward is nn.Sequential.forward and len(mod) > 0:
        return requires_tensor(mod[0])
    return False


def module_output(mod: nn.Module, inputs: Sequence[int], trace: Tracer, depth: int = 0) -> int:
    """The kind of what ``mod(*inputs)`` returns, given its inputs' kinds."""
    first = inputs[0] if inputs else UNKNOWN
    own_forward = not defined_by_torch_or_quanta(type(mod))
    if isinstance(mod, _CONVS) and runs_layer_op(mod):
        return CONV
    if isinstance(mod, nn.Linear) and runs_layer_op(mod):
        return TENSOR
    if isinstance(mod, (Add, QuantAdd)) and not own_forward:
        return max(inputs) if len(inputs) == 2 and min(inputs) >= TENSOR else UNKNOWN
    if own_forward:
        return traced_output(mod, inputs, trace, depth + 1) if depth < 32 else UNKNOWN
    if isinstance(mod, nn.Identity):
        return first
    if isinstance(mod, _LAYERS):
        return TENSOR
    if isinstance(mod, _KEEPING):
        return first if first >= TENSOR else TENSOR if requires_tensor(mod) else UNKNOWN
    if type(mod).forward is nn.Sequential.forward:
        kind = first
        for child in mod:
            kind = module_output(child, [kind], trace, depth + 1)
        return kind
    return UNKNOWN


def traced_output(mod: nn.Module, inputs: Sequence[int], trace: Tracer, depth: int = 0) -> int:
    graph = trace(mod)
    if isinstance(graph, str):
        return UNKNOWN
    kinds = node_kinds(graph, dict(mod.named_modules()), inputs, trace, depth)
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    return kinds.get(out, UNKNOWN) if isinstance(out, fx.Node) else UNKNOWN


def node_kinds(graph: fx.Graph, mods: dict[str, nn.Module], inputs: Sequence[int], trace: Tracer,
               depth: int = 0) -> dict[fx.Node, int]:
    """The kind of every node of ``graph`` (one module's own forward), its inputs of ``inputs``' kinds."""
    kinds: dict[fx.Node, int] = {}

    def kind(a: Any) -> int:
        return kinds.get(a, UNKNOWN) if isinstance(a, fx.Node) else UNKNOWN

    index = 0
    for node in graph.nodes:
        k = UNKNOWN
        if node.op == "placeholder":
            k = inputs[index] if index < len(inputs) else UNKNOWN
            index += 1
            if k == UNKNOWN and any(u.op == "call_module" and u.args[:1] == (node,)
                                    and requires_tensor(mods[str(u.target)]) for u in node.users):
                k = TENSOR  # a layer reads it: had it been no tensor, the layer would have raised
        elif node.op == "call_module":
            k = module_output(mods[str(node.target)], [kind(a) for a in node.args], trace, depth) \
                if not node.kwargs else UNKNOWN
        elif node.op == "call_function":
            args = [kind(a) for a in node.args]
            if node.target in ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
                k = max(args) if min(args) >= TENSOR else UNKNOWN
            elif node.target in (operator.mul, torch.mul) and len(node.args) == 2 and not node.kwargs:
                k = TENSOR if min(args) >= TENSOR else UNKNOWN
            elif node.target in _KEEPING_FUNCTIONS and args and args[0] >= TENSOR:
                k = args[0]
        elif node.op == "call_method" and node.target in _KEEPING_METHODS and node.args:
            k = kind(node.args[0]) if kind(node.args[0]) >= TENSOR else UNKNOWN
        kinds[node] = k
    return kinds


def call_sites(graph: fx.Graph, mods: dict[str, nn.Module], kinds: dict[fx.Node, int]
               ) -> list[tuple[nn.Module, list[int]]]:
    """Each child module ``graph`` calls, with the kinds of the inputs it passes (keyword
    arguments: unknown inputs, all of them)."""
    sites = []
    for node in graph.nodes:
        if node.op == "call_module":
            args = [kinds.get(a, UNKNOWN) if isinstance(a, fx.Node) else UNKNOWN for a in node.args]
            sites.append((mods[str(node.target)], [] if node.kwargs else args))
    return sites


__all__ = ["ADD_FUNCTIONS", "CONV", "TENSOR", "UNKNOWN", "call_sites", "defined_by_torch_or_quanta", "module_output",
           "node_kinds", "requires_tensor", "traced_output"]
