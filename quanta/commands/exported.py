"""Models from `torch.export` program files (``.pt2`` written by ``torch.export.save``).

``ExportedProgram.module()`` gives a graph module with no ``nn.Linear`` or ``nn.Conv2d`` left:
each layer became a call of ``aten.linear`` / ``aten.conv2d`` on parameters held by plain
``nn.Module`` containers, which quanta's prepare (a swap by module type) cannot see. So the
layers are recovered: where a plain container holds exactly the weight (and bias) of one such
call and nothing else, it is replaced by the ``nn.Linear`` / ``nn.ConvNd`` holding the same
parameters under the same names, and the call becomes a call of that module. What computes
stays what the program computes (the same op on the same tensors); parameter names stay those
of the model that was exported, so the state dict is unchanged.

The graph's own operations compute as they were exported (dropout, batch norm: export the
model in eval mode); ``.eval()`` / ``.train()`` of the returned module set the mode of the
recovered layers (and of quanta's modules that replace them), as on any model.

Calls not recovered (a weight computed in the graph or used twice, ``padding="same"`` given as
a string, transposed convolutions) stay graph operations and stay float.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch import fx, nn

from .errors import CommandError

_aten = torch.ops.aten
#: graph op → (module class, names of its arguments after input, weight, bias, with defaults)
_LAYER_OPS: dict[Any, tuple[type[nn.Module], tuple[tuple[str, Any], ...]]] = {
    _aten.linear.default: (nn.Linear, ()),
    **{op: (cls, (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)))
       for op, cls in ((_aten.conv1d.default, nn.Conv1d), (_aten.conv2d.default, nn.Conv2d),
                       (_aten.conv3d.default, nn.Conv3d))},
}


def load_exported(path: str | pathlib.Path) -> nn.Module:
    """The module of the program saved at ``path``, with its layers recovered as ``nn.Linear`` /
    ``nn.ConvNd`` (see the module docstring), in eval mode. Its example inputs (recorded by
    ``torch.export.export``) are kept as ``module.quanta_example_inputs``."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise CommandError(f"{path}: no such file")
    try:
        program = torch.export.load(file)
    except Exception as e:  # not a program file, or written by an incompatible torch
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CommandError(f"{path}: not a torch.export program file torch {torch.__version__} can read "
                           f"({type(e).__name__}: {first})") from e
    module = program.module()
    recovered = recover_layers(module)
    if not recovered:
        raise CommandError(f"{path}: the exported program has no linear or convolution on its own parameters "
                           "that quanta could turn back into a layer; pass the model's spec "
                           "(package.module:factory) instead")
    examples = program.example_inputs
    if examples is not None and not examples[1] and all(isinstance(a, torch.Tensor) for a in examples[0]):
        module.quanta_example_inputs = tuple(examples[0])  # type: ignore[assignment]
    for name in ("train", "eval"):  # torch refuses mode switches on the whole program (its graph's dropout
        module.__dict__.pop(name, None)  # and batch norm are fixed as exported); quanta's layers need them
    return module.eval()


def _arguments(node: fx.Node, names: tuple[tuple[str, Any], ...]) -> dict[str, Any] | None:
    """The node's layer arguments (stride, padding...) by name, or None if one is not a constant."""
    values: dict[str, Any] = {}
    for i, (name, default) in enumerate(names):
        value = node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(name, default)
        if isinstance(value, fx.Node) or not isinstance(value, (int, list, tuple)):
            return None
        values[name] = tuple(value) if isinstance(value, list) else value
    return values


def _owned_parameter(gm: fx.GraphModule, node: Any) -> tuple[str, str, nn.Parameter] | None:
    """``(owner path, attribute, parameter)`` when ``node`` reads one parameter, used once."""
    if not isinstance(node, fx.Node) or node.op != "get_attr" or len(node.users) != 1:
        return None
    owner, _, attr = str(node.target).rpartition(".")
    try:
        value = gm.get_parameter(str(node.target))
    except AttributeError:
        return None
    return owner, attr, value


def _layer_for(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    """The module that computes ``node`` (a linear / conv call), and where it goes, or None."""
    cls, names = _LAYER_OPS[node.target]
    weight = _owned_parameter(gm, node.args[1] if len(node.args) > 1 else None)
    bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bias = _owned_parameter(gm, bias_arg) if bias_arg is not None else None
    options = _arguments(node, names)
    if weight is None or (bias_arg is not None and bias is None) or options is None or not weight[0]:
        return None
    owner_name, weight_attr, w = weight
    if bias is not None and (bias[0] != owner_name or bias[1] != "bias") or weight_attr != "weight":
        return None
    owner = gm.get_submodule(owner_name)
    held = {n for n, _ in owner.named_parameters(recurse=False)} | {n for n, _ in owner.named_buffers()}
    if type(owner) is not nn.Module or held != ({"weight", "bias"} if bias else {"weight"}) \
            or any(True for _ in owner.children()):
        return None
    if cls is nn.Linear:
        if w.dim() != 2:
            return None
        layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    else:
        groups = options["groups"]
        if w.dim() != {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}[cls] or not isinstance(groups, int):
            return None
        layer = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=options["stride"],
                    padding=options["padding"], dilation=options["dilation"], groups=groups,
                    bias=bias is not None, device="meta")
    layer.weight = w
    if bias is not None:
        layer.bias = bias[2]
    return owner_name, layer


def recover_layers(gm: fx.GraphModule) -> list[str]:
    """Turn the graph's linear / convolution calls back into layers (in place); returns their
    names. See the module docstring for which calls qualify."""
    recovered: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LAYER_OPS:
            continue
        found = _layer_for(gm, node)
        if found is None:
            continue
        name, layer = found
        parent, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, layer)
        reads = [a for a in node.args[1:3] if isinstance(a, fx.Node)] + \
                [a for a in node.kwargs.values() if isinstance(a, fx.Node)]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (node.args[0],))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for read in reads:
            if not read.users:
                gm.graph.erase_node(read)
        recovered.append(name)
    if recovered:
        gm.graph.lint()
        gm.recompile()
    return recovered


def exported_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The shape of the example input a program was exported with (its only tensor input)."""
    examples = getattr(model, "quanta_example_inputs", None)
    if isinstance(examples, tuple) and len(examples) == 1:
        return tuple(examples[0].shape)
    return None
