"""`convert`: a calibrated simulated model → an integer model calling integer kernels.

Each simulated module is replaced by the first integer class that accepts it (its
quantizers' specs decide); a module no integer class accepts stays simulated, which computes
the same numbers in float, and the report says why. Then `fuse_activations` lets integer
convolutions fuse a following ReLU/ReLU6 and hand uint8 codes straight to the next integer
convolution, so a CNN does not pay a dequantize/quantize pair at every layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..integer import lowering_classes
from ..integer.base import IntegerModule
from ..nn.modules.base import QuantModule
from ..nn.modules.functional import QuantOp
from ..nn.tensor_quantizer import TensorQuantizer
from .fuse import fuse_activations

REPORT_ATTR = "_quanta_convert_report"
BACKENDS = ("auto", "cpu", "cuda", "reference")


@dataclass(frozen=True)
class Lowering:
    name: str
    simulated: str
    result: str  # integer class name, or "simulated"
    detail: str


def _first_uncalibrated(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer) and m.needs_calibration:
            owner = name.rpartition(".")[0]
            owner_mod = model.get_submodule(owner) if owner else model
            if any(q is m for _, q in getattr(owner_mod, "quantizers", lambda: iter(()))()):
                return name
    return None


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False,
            fuse: bool = True) -> nn.Module:
    """Lower a calibrated simulated model to integer modules (a copy unless ``inplace``).

    ``backend``: ``"auto"`` (fast kernels where their guards accept, reference otherwise),
    ``"cpu"`` / ``"cuda"`` (require that device; the model's weights must be there),
    ``"reference"`` (the readable integer reference kernels only).
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
    classes = lowering_classes()
    root = _lower(target, classes, report, "")
    if root is not None:
        target = root
    else:
        _walk(target, "", classes, report)
    impl = "reference" if backend == "reference" else "auto"
    for m in target.modules():
        if isinstance(m, IntegerModule):
            m.impl = impl
            m.pack()
    if fuse:
        fuse_activations(target)
    setattr(target, REPORT_ATTR, report)
    return target


def _lower(module: nn.Module, classes: list[type], report: list[Lowering], name: str) -> nn.Module | None:
    if not isinstance(module, QuantModule):
        return None
    reasons = []
    for cls in classes:
        reason = cls.accepts(module)
        if reason is None:
            new = cls.from_simulated(module)
            new.train(module.training)
            report.append(Lowering(name or "(root)", type(module).__name__, type(new).__name__,
                                   new.extra_repr()))
            return new
        wrong_type = " is not a " in reason or reason.endswith(f"got {type(module).__name__}")
        if not wrong_type:  # only the classes meant for this module type explain
            reasons.append(f"{cls.__name__}: {reason}")
    report.append(Lowering(name or "(root)", type(module).__name__, "simulated",
                           "; ".join(reasons) or "no integer kernel for this module type"))
    return None


def _walk(module: nn.Module, prefix: str, classes: list[type], report: list[Lowering]) -> None:
    for child_name, child in list(module.named_children()):
        if isinstance(child, (TensorQuantizer, IntegerModule)):
            continue
        full = f"{prefix}.{child_name}" if prefix else child_name
        new = _lower(child, classes, report, full)
        if new is not None:
            setattr(module, child_name, new)
            continue
        _walk(child, full, classes, report)


def conversion_report(model: nn.Module) -> list[Any]:
    return list(getattr(model, REPORT_ATTR, []))
