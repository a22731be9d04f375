"""Switch the quantizers of a simulated model on and off by layer and by kind, restoring them.

A *layer* is a quantized module (`QuantModule` or functional `QuantOp`) with quantizers; its
quantizers are of two kinds: ``weights`` (the weight quantizer) and ``activations`` (input,
output and other operand quantizers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator

from torch import nn

from ..nn.modules.base import QuantModule
from ..nn.modules.functional import QuantOp
from ..nn.tensor_quantizer import TensorQuantizer

WHAT = ("both", "weights", "activations")


def check_what(what: str) -> None:
    if what not in WHAT:
        raise ValueError(f"what must be one of {WHAT}, got {what!r}")


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized layers of ``model`` that have an enabled quantizer, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantModule, QuantOp))
            and any(q.is_enabled for _, q in m.quantizers())}


def _selected(kind: str, what: str) -> bool:
    return what == "both" or (what == "weights") == (kind == "weight")


@contextlib.contextmanager
def quantizing_only(model: nn.Module, layers: Collection[str] | None, what: str = "both") -> Iterator[nn.Module]:
    """Within the block, only the ``what`` quantizers of ``layers`` (None: of every layer) that
    were enabled stay enabled; every quantizer's state is restored on exit."""
    check_what(what)
    found = quant_layers(model)
    if layers is not None:
        unknown = sorted(set(layers) - set(found))
        if unknown:
            raise ValueError(f"{type(model).__name__} has no quantized layer named {unknown[0]!r}")
    before: list[tuple[TensorQuantizer, bool]] = []
    try:
        for name, layer in found.items():
            for kind, q in layer.quantizers():
                before.append((q, q.is_enabled))
                if not (q.is_enabled and (layers is None or name in layers) and _selected(kind, what)):
                    q.disable()
        yield model
    finally:
        for q, enabled in before:
            q.enable() if enabled else q.disable()
