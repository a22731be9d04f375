"""Fuse ReLU/ReLU6 into integer convolutions and additions and keep uint8 activations between them;
fuse ReLU/GELU into integer Linears.

The model is traced with ``torch.fx`` (integer and simulated modules are leaves) only to
*read* its data flow; the model itself stays the user's eager module. For an integer conv
``P`` whose output reaches, through ops that act on uint8 codes as they do on values
(ReLU, ReLU6 once fused, max pooling, Identity, Dropout in eval; fused activation modules
called once become ``Identity`` there), only integer convs and integer
additions (`quanta.integer.Int8Add`, as either operand) that share one input grid, ``P`` is set
to emit uint8 codes on that grid with the activation fused in its kernel; the consumers take
those codes as they are. An integer addition is a producer too (a residual block's sum, ReLU
fused, handed to the next block's convs and addition). Anything else keeps float
interfaces (always correct). A model that cannot be traced keeps float interfaces everywhere.
`uint8_chains` names the groups of integer modules so linked (the speed check decides each group
as a whole), and `restore_float_pools` gives back the user's max-pools on a group gone float.

An integer Linear whose float output only an ``nn.ReLU`` / ``nn.GELU`` module reads applies that
activation in its kernel's epilogue (`quanta.integer.Int8Linear.post_op`): one pass over the
output instead of two, and the activation module becomes ``Identity``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..integer.base import IntegerModule
from ..integer.pooling import CODES_POOL, codes_pool
from ..nn.modules.base import QuantModule
from ..nn.modules.functional import QuantOp
from ..nn.modules.fused import FusedActivation
from ..nn.tensor_quantizer import TensorQuantizer
from .conv_subclass import traced_calls

LOG = logging.getLogger("quanta.transforms")

_RELU_FUNCS = {torch.relu, F.relu, torch.relu_, "relu", "relu_"}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (IntegerModule, QuantModule, QuantOp, TensorQuantizer, *_POOL_MODULES)):
            return True  # (a codes max-pool `fuse_activations` put in is a pool, not code to trace)
        return super().is_leaf_module(m, qualname)


def _is_conv(mod: Any) -> bool:
    return isinstance(mod, IntegerModule) and hasattr(mod, "set_output") and hasattr(mod, "input_code_qparams")


def _is_producer(mod: Any) -> bool:
    """An integer conv or integer addition: it can emit uint8 codes with an activation fused."""
    return _is_conv(mod) or (isinstance(mod, IntegerModule) and hasattr(mod, "set_output")
                             and hasattr(mod, "operand_code_qparams"))


def _consumer_grid(user: fx.Node, value: fx.Node, mods: dict[str, nn.Module]) -> tuple[float, int] | None:
    """The uint8 grid on which ``user`` takes ``value``: an integer conv's input grid, or an
    integer addition's grid for the operand(s) ``value`` is; None if it takes no codes there."""
    if user.op != "call_module" or user.kwargs:
        return None
    mod = mods.get(str(user.target))
    if _is_conv(mod):
        return _grid(mod) if len(user.args) == 1 and user.args[0] is value else None
    if mod is not None and _is_producer(mod) and len(user.args) == 2:
        grids = {(float(s), int(z)) for i, a in enumerate(user.args) if a is value
                 for s, z in [mod.operand_code_qparams(i)]}
        return next(iter(grids)) if len(grids) == 1 else None
    return None


def _classify(node: fx.Node, mods: dict[str, nn.Module], calls: dict[str, int]) -> str | None:
    """'relu', 'relu6', 'pool', 'identity', or None when the node is not transparent."""
    if node.op == "call_module":
        m = mods.get(str(node.target))
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val == 6.0):
            return "relu6" if calls[str(node.target)] == 1 else None
        if isinstance(m, _POOL_MODULES) and not m.return_indices:
            return "pool"
        if isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training):
            return "identity"
        return None
    if node.op in ("call_function", "call_method") and node.target in _RELU_FUNCS:
        return "relu"
    # (a functional max-pool is not transparent: torch's CPU max-pool fails on channels-last
    # uint8 codes past 255 positions, and a call cannot be swapped for `codes_pool` like a module)
    return None


def fuse_activations(model: nn.Module) -> list[tuple[str, str, str]]:
    """Apply the fusions; returns ``(producer, activation, output)`` triples, output being
    ``"uint8"`` or ``"float"``."""
    try:
        graph, mods, calls = traced_calls(model, _LeafTracer())
    except Exception as e:  # data-dependent control flow, unsupported constructs
        LOG.info("quanta: activation fusion skipped, the model cannot be traced by torch.fx: %s", e)
        return []
    done = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_producer(mods.get(str(node.target))) or calls[str(node.target)] != 1:
            continue
        producer = mods[str(node.target)]
        act, cur, relu6_nodes, pool_nodes = _transparent_path(node, mods, calls)
        grids = {_consumer_grid(u, cur, mods) for u in cur.users} if cur.users else {None}
        if len(grids) == 1 and None not in grids:
            scale, zp = next(iter(grids))  # type: ignore[misc]
            producer.set_output("uint8", scale=scale, zero_point=zp, post_op=act)
            for r in relu6_nodes:  # fused into the producer; on codes ReLU6 would clamp at code 6
                _fused(model, r, str(node.target))  # and ReLU would cost a pass for nothing
            for p in pool_nodes:  # pools channels-last codes where torch's own max-pool cannot
                _replace(model, str(p.target), codes_pool(mods[str(p.target)]))
            done.append((str(node.target), act, "uint8"))
        elif act != "none":
            producer.set_output("float", post_op=act)
            for r in relu6_nodes:  # applied by the producer's kernel: a second pass would change nothing
                _fused(model, r, str(node.target))
            done.append((str(node.target), act, "float"))
    done += _fuse_linear_activations(model, graph, mods, calls)
    return done


def _transparent_path(node: fx.Node, mods: dict[str, nn.Module], calls: dict[str, int],
                      ) -> tuple[str, fx.Node, list[fx.Node], list[fx.Node]]:
    """From a producer's ``node``, the ops after it that act on codes as on values, each the only
    user of the one before: ``(activation, last node, activation nodes to fuse, pool nodes)``."""
    act, cur, relu6_nodes, pool_nodes = "none", node, [], []
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        kind = _classify(nxt, mods, calls)
        if kind is None:
            break
        if kind in ("relu", "relu6"):
            act = "relu6" if kind == "relu6" or act == "relu6" else "relu"
            if kind == "relu6" or (nxt.op == "call_module" and calls[str(nxt.target)] == 1):
                relu6_nodes.append(nxt)  # (a ReLU module called once: dropped on a uint8 path)
        elif kind == "pool":
            pool_nodes.append(nxt)
        cur = nxt
    return act, cur, relu6_nodes, pool_nodes


def uint8_chains(model: nn.Module) -> list[list[str]]:
    """The groups of integer modules of a fused ``model`` that hand each other uint8 codes: each
    group is every producer set to emit codes (``output_kind == "uint8"``) together with the modules
    taking them, closed under that link (a connected component), names in model order. A member
    cannot go back to float alone: its neighbours compute on its codes. ``[]`` when the model cannot
    be traced (then `fuse_activations` linked nothing either)."""
    if not any(_is_producer(m) and getattr(m, "output_kind", "float") == "uint8" for m in model.modules()):
        return []  # (no codes anywhere: no trace needed)
    try:
        graph, mods, calls = traced_calls(model, _LeafTracer())
    except Exception:  # (as in fuse_activations)
        return []
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        parent.setdefault(name, name)
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in graph.nodes:
        mod = mods.get(str(node.target)) if node.op == "call_module" else None
        if not _is_producer(mod) or getattr(mod, "output_kind", "float") != "uint8":
            continue
        _, cur, _, _ = _transparent_path(node, mods, calls)
        for user in cur.users:
            if user.op == "call_module" and _is_producer(mods.get(str(user.target))):
                parent[root(str(user.target))] = root(str(node.target))
        root(str(node.target))
    order = {name: i for i, name in enumerate(mods)}
    groups: dict[str, list[str]] = {}
    for name in sorted(parent, key=order.__getitem__):
        groups.setdefault(root(name), []).append(name)
    return list(groups.values())


def restore_float_pools(model: nn.Module) -> list[str]:
    """Each codes max-pool (`codes_pool`) that no integer producer hands codes through any more (its
    chain went back to float: the speed check) becomes the user's ``nn.MaxPoolNd`` again, same
    settings and hooks; returns their names. Nothing changes in a model that cannot be traced."""
    try:
        graph, mods, calls = traced_calls(model, _LeafTracer())
    except Exception:  # (as in fuse_activations)
        return []
    on_codes = set()
    for node in graph.nodes:
        mod = mods.get(str(node.target)) if node.op == "call_module" else None
        if _is_producer(mod) and getattr(mod, "output_kind", "float") == "uint8":
            on_codes |= {str(p.target) for p in _transparent_path(node, mods, calls)[3]}
    plain = {codes: pool for pool, codes in CODES_POOL.items()}
    restored = []
    for name, mod in mods.items():
        cls = plain.get(type(mod))
        if cls is not None and name not in on_codes:
            pool = cls.__new__(cls)
            pool.__dict__.update(mod.__dict__)
            pool.__dict__.pop("_binding", None)  # (a codes pool's settled calls)
            _replace(model, name, pool)
            restored.append(name)
    return restored


def _linear_activation(m: nn.Module | None) -> str | None:
    """The `Int8Linear.post_op` that does what module ``m`` does, or None."""
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
    return None


def _fuse_linear_activations(model: nn.Module, graph: fx.Graph, mods: dict[str, nn.Module],
                             calls: dict[str, int]) -> list[tuple[str, str, str]]:
    """An integer Linear (called once, float output, no output quantizer) whose output only an
    activation module (ReLU, GELU; called once) reads: the Linear applies it in its epilogue and
    the module becomes ``Identity``. (A functional ``F.gelu`` cannot be taken out of the
    user's ``forward``, so it is left alone.)"""
    done = []
    for node in graph.nodes:
        mod = mods.get(str(node.target)) if node.op == "call_module" else None
        if not hasattr(mod, "set_post_op") or calls[str(node.target)] != 1 or len(node.users) != 1:
            continue
        if mod.post_op != "none" or mod.output_spec is not None:  # type: ignore[union-attr]
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or user.args != (node,) or user.kwargs or calls[str(user.target)] != 1:
            continue
        act = _linear_activation(mods.get(str(user.target)))
        if act is None:
            continue
        mod.set_post_op(act)  # type: ignore[union-attr]
        _fused(model, user, str(node.target))
        done.append((str(node.target), act, "float"))
    return done


def _grid(mod: Any) -> tuple[float, int] | None:
    qp = mod.input_code_qparams() if mod is not None and hasattr(mod, "input_code_qparams") else None
    if qp is None:
        return None
    scale, zp = qp
    return float(scale), int(zp)


def _fused(model: nn.Module, node: fx.Node, producer: str) -> None:
    """The activation module ``node`` calls, now applied by ``producer``'s kernel, becomes a
    `FusedActivation` (an identity that says so)."""
    old = model.get_submodule(str(node.target))
    _replace(model, str(node.target), FusedActivation(type(old).__name__, producer, old))


def _replace(model: nn.Module, target: str, new: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)

