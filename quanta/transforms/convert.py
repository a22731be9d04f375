"""`convert`: a calibrated simulated model → an integer model calling integer kernels.

Each simulated module is replaced by the first integer class that accepts it (its
quantizers' specs decide); a module no integer class accepts stays simulated, which computes
the same numbers in float, and the report says why. Then `fuse_activations` lets integer
convolutions fuse a following ReLU/ReLU6 and hand uint8 codes straight to the next integer
convolution, so a CNN does not pay a dequantize/quantize pair at every layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn

from ..integer import lowering_classes
from ..integer.base import IntegerModule
from ..nn.modules.base import QuantModule
from ..nn.modules.functional import QuantAdd, QuantOp
from ..nn.tensor_quantizer import TensorQuantizer
from .fuse import fuse_activations
from .simplify import collapse_wrappers
from .speed_check import SpeedChoice, keep_faster

REPORT_ATTR = "_quanta_convert_report"
BACKENDS = ("auto", "cpu", "cuda", "reference")


@dataclass(frozen=True)
class Lowering:
    name: str
    simulated: str
    result: str  # integer class name, "simulated", or "float" (the integer kernel was slower)
    detail: str


def _first_uncalibrated(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer) and m.needs_calibration:
            owner = name.rpartition(".")[0]
            owner_mod = model.get_submodule(owner) if owner else model
            if any(q is m for _, q in getattr(owner_mod, "quantizers", lambda: iter(()))()):
                return name
    return None


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False, fuse: bool = True, *,
            example: Any = None, forward_fn: Callable[[nn.Module, Any], Any] | None = None,
            speed_check: bool = True) -> nn.Module:
    """Lower a calibrated simulated model to integer modules (a copy unless ``inplace``).

    ``backend``: ``"auto"`` (fast kernels where their guards accept, reference otherwise),
    ``"cpu"`` / ``"cuda"`` (require that device; the model's weights must be there),
    ``"reference"`` (the readable integer reference kernels only).

    ``example``: one batch of real inputs (a tensor, a tuple whose first item is the input, a
    dict of keyword arguments, or anything ``forward_fn(model, batch)`` takes). With it (and
    ``speed_check``), each integer layer is timed against its float twin on the input it gets,
    and layers whose integer kernel is slower stay float (see `speed_check.keep_faster`); the
    report says which and by how much.

    ``fuse``: fuse activations into integer layers (uint8 hand-off between integer convs,
    `quanta.transforms.fuse`), then put an integer module in the place of a container that only
    wraps it (`quanta.transforms.simplify`: ``Sequential(conv, Identity, Identity)`` after BN
    folding and fusion; its name loses the container's index, ``features.0.0`` -> ``features.0``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda" and not torch.cuda.is_available():
        raise ValueError("backend 'cuda' needs a CUDA device and none is available; "
                         "use backend='auto' to run on the CPU")
    if not any(isinstance(m, (QuantModule, QuantOp)) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no quantized modules: run quanta.prepare "
                         "(and quanta.calibrate for static activations) first")
    missing = _first_uncalibrated(model)
    if missing is not None:
        raise ValueError(f"quantizer {missing!r} has no range: calibrate the model (quanta.calibrate) "
                         "before converting")
    target = model if inplace else copy.deepcopy(model)
    report: list[Lowering] = []
    twins: dict[str, nn.Module] = {}
    classes = lowering_classes()
    root = _lower(target, classes, report, "", twins)
    if root is not None:
        target = root
    else:
        _walk(target, "", classes, report, twins)
    impl = "reference" if backend == "reference" else "auto"
    for m in target.modules():
        if isinstance(m, IntegerModule):
            m.impl = impl
            m.pack()
    if fuse:
        fuse_activations(target)
    if example is not None and speed_check and backend != "reference" and twins:
        choices = {c.name: c for c in keep_faster(target, twins, example, forward_fn=forward_fn)}
        report = [_with_choice(r, choices.get(r.name)) for r in report]
    if fuse:  # (after the speed check, which names layers as they were lowered)
        renamed = collapse_wrappers(target)
        report = [replace(r, name=renamed.get(r.name, r.name)) for r in report]
    setattr(target, REPORT_ATTR, report)
    return target


def _with_choice(lowering: Lowering, choice: SpeedChoice | None) -> Lowering:
    if choice is None:
        return lowering
    if choice.picked == "float":
        return Lowering(lowering.name, lowering.simulated, "float", f"integer kernel slower: {choice.describe()}")
    return Lowering(lowering.name, lowering.simulated, lowering.result,
                    f"{lowering.detail} ({choice.integer_ms:.3f} ms vs float {choice.float_ms:.3f} ms)")


def _lower(module: nn.Module, classes: list[type], report: list[Lowering], name: str,
           twins: dict[str, nn.Module]) -> nn.Module | None:
    if not isinstance(module, (QuantModule, QuantAdd)):
        return None
    reasons = []
    for cls in classes:
        reason = cls.accepts(module)
        if reason is None:
            new = cls.from_simulated(module)
            new.train(module.training)
            if name and isinstance(module, QuantModule):  # the float twin a speed check may put back
                twins[name] = module.to_float()            # (sharing the float weights)
            report.append(Lowering(name or "(root)", type(module).__name__, type(new).__name__,
                                   new.extra_repr()))
            return new
        wrong_type = " is not a " in reason or reason.endswith(f"got {type(module).__name__}")
        if not wrong_type:  # only the classes meant for this module type explain
            reasons.append(f"{cls.__name__}: {reason}")
    report.append(Lowering(name or "(root)", type(module).__name__, "simulated",
                           "; ".join(reasons) or "no integer kernel for this module type"))
    return None


def _walk(module: nn.Module, prefix: str, classes: list[type], report: list[Lowering],
          twins: dict[str, nn.Module]) -> None:
    for child_name, child in list(module.named_children()):
        if isinstance(child, (TensorQuantizer, IntegerModule)):
            continue
        full = f"{prefix}.{child_name}" if prefix else child_name
        new = _lower(child, classes, report, full, twins)
        if new is not None:
            setattr(module, child_name, new)
            continue
        _walk(child, full, classes, report, twins)


def conversion_report(model: nn.Module) -> list[Any]:
    return list(getattr(model, REPORT_ATTR, []))
