"""Take out the containers that, once a model is converted, only wrap one integer module.

A conv-BN-activation block written as ``nn.Sequential(conv, bn, act)`` (torchvision's
``Conv2dNormActivation``, MobileNet-style blocks) becomes ``Sequential(Int8Conv2d, Identity,
Identity)`` after BN folding and activation fusion: calling it costs four Python module calls
for one kernel. At batch 1 such calls are a large part of a CNN's time (MobileNetV2, 52 convs:
removing them measured 3.60 -> 3.20 ms). `collapse_wrappers` puts the integer module itself in
the container's place.

Only plain containers are touched: an ``nn.Sequential`` (or a subclass that keeps
``Sequential.forward``) without hooks whose children are ``nn.Identity`` modules and exactly one
integer module. Its slot in the parent keeps its name and position; the integer module's own
name loses the container's index (``features.0.0`` -> ``features.0``). Containers with two or
more working children keep every child, Identity ones included, so that positions within them
(``block[2]``) still mean what they meant.
"""

from __future__ import annotations

from torch import nn

from ..integer.base import IntegerModule
from ..nn.modules.fused import FusedActivation


def _sole_integer(mod: nn.Module) -> nn.Module | None:
    """The integer module ``mod`` only wraps, or None."""
    if not isinstance(mod, nn.Sequential) or type(mod).forward is not nn.Sequential.forward:
        return None
    if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks:
        return None
    children = list(mod.children())
    working = [c for c in children if type(c) not in (nn.Identity, FusedActivation)]
    if len(working) != 1 or not isinstance(working[0], IntegerModule):
        return None
    return working[0]


def collapse_wrappers(model: nn.Module) -> dict[str, str]:
    """Collapse ``model``'s containers that only wrap one integer module (innermost first);
    returns ``{old name: new name}`` of the integer modules that moved."""
    before = {id(m): n for n, m in model.named_modules() if isinstance(m, IntegerModule)}

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            visit(child)
            sole = _sole_integer(child)
            if sole is not None:
                setattr(parent, name, sole)

    visit(model)
    after = {id(m): n for n, m in model.named_modules() if isinstance(m, IntegerModule)}
    renamed = {before[i]: after[i] for i in before if i in after and before[i] != after[i]}
    for m in model.modules():  # a fused activation names the module whose kernel applies it
        if isinstance(m, FusedActivation) and m.into in renamed:
            m.into = renamed[m.into]
    return renamed
