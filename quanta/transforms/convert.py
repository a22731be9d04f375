"""`convert`: a calibrated simulated model → an integer model calling integer kernels.

Each simulated module is replaced by the first integer class that accepts it (its
quantizers' specs decide); a module no integer class accepts stays simulated, which computes
the same numbers in float, and the report says why. A quantized module that calibration never
called (no range for any of its static quantizers) becomes float again, and the report says so;
so do layers `prepare` left float because their shape did not fit the config. Then
`fuse_activations` lets integer convolutions fuse a following ReLU/ReLU6 and hand uint8 codes
straight to the next integer convolution, so a CNN does not pay a dequantize/quantize pair at
every layer.

A user subclass with its own ``forward`` lowers only when that forward provably computes
constant zero padding then the conv op (`quanta.transforms.conv_subclass`: TF-style "same"
convs; asymmetric padding through `quanta.integer.padded_conv`); any other becomes the user's
float module again (simulating it would be slower than float), and the report says why.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..integer import lowering_classes
from ..integer.base import IntegerModule
from ..integer.padded_conv import PADDED
from ..nn.modules.base import QuantModule, float_class_of
from ..nn.modules.functional import Add, QuantAdd, QuantOp
from ..nn.tensor_quantizer import TensorQuantizer
from .conv_subclass import analyse_conv_subclass, plain_view
from .fuse import fuse_activations
from .prepare import DECISIONS_ATTR, UNSUPPORTED
from .restore_float import restore_float
from .simplify import collapse_wrappers
from .speed_check import SpeedChoice, keep_faster
from .tied import retie, tied_groups

REPORT_ATTR = "_quanta_convert_report"
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BACKENDS = ("auto", "cpu", "cuda", "reference")


@dataclass(frozen=True)
class Lowering:
    name: str
    simulated: str
    result: str  # integer class name, "simulated", or "float" (the integer kernel was slower)
    detail: str


def _calibration_gaps(model: nn.Module) -> tuple[dict[str, tuple[str, ...]], set[str], str | None]:
    """``(gaps, never_called, first_missing)``: per quantized module, the kinds of its static
    quantizers without a range; the modules none of whose static quantizers has one (calibration
    never called them: a block's unused residual addition, a head unused at inference); and the
    first quantizer without a range when no static quantizer of the model has one (nothing was
    calibrated: an error, not something to keep float)."""
    gaps: dict[str, tuple[str, ...]] = {}
    never_called: set[str] = set()
    first_missing, any_ranged = None, False
    for name, m in model.named_modules():
        if not isinstance(m, (QuantModule, QuantOp)):
            continue
        static = [(kind, q) for kind, q in m.quantizers() if q.is_enabled and q.spec.has_scale
                  and not q.spec.dynamic and not q.track_tensor]
        missing = tuple(kind for kind, q in static if q.needs_calibration)
        any_ranged = any_ranged or len(missing) < len(static)
        if missing:
            gaps[name] = missing
            if len(missing) == len(static):
                never_called.add(name)
            if first_missing is None:
                first_missing = f"{name}.{missing[0]}_quantizer" if name else f"{missing[0]}_quantizer"
    return gaps, never_called, None if any_ranged else first_missing


def _forward_overrider(module: nn.Module) -> str | None:
    """The name of the user class that overrides the quantized float class's ``forward`` (an
    ``nn.Linear`` subclass with its own logic), or None where the float class's own forward runs
    (a subclass that only adds attributes or an ``__init__``)."""
    float_type = getattr(module, "float_type", None)
    if not isinstance(module, QuantModule) or float_type is None:
        return None
    for klass in float_class_of(module).__mro__:
        if klass is float_type:
            return None
        if "forward" in vars(klass):
            return klass.__name__
    return None


def _float_twin(module: nn.Module) -> nn.Module:
    """The float twin of a never-calibrated quantized module: what it computes in float (its
    float class sharing its weights, a plain `Add`, or the op with its quantizers disabled).

    In quanta, a *float twin* is always this: the float module, sharing the weights, that stands
    for a quantized or integer layer (here, and where the speed check puts it back)."""
    if isinstance(module, QuantModule):
        return module.to_float()
    if isinstance(module, QuantAdd):
        twin = Add()
        twin.train(module.training)
        return twin
    for _, q in module.quantizers():  # type: ignore[attr-defined]
        q.disable()
    return module


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
    gaps, never_called, missing = _calibration_gaps(model)
    if missing is not None:
        raise ValueError(f"quantizer {missing!r} has no range: calibrate the model (quanta.calibrate) "
                         "before converting")
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    report = [Lowering(n, type(modules[n]).__name__, "float", r)  # (prepare could not take them)
              for n, r in getattr(model, DECISIONS_ATTR, {}).items() if r.startswith(UNSUPPORTED) and n in modules]
    twins: dict[str, nn.Module] = {}
    tied = tied_groups(target)  # (before lowering: which modules hold one weight together)
    walk = _Walk(lowering_classes(), report, twins, gaps, never_called)
    root = walk.lower(target, "")
    if root is not None:
        target = root
    else:
        walk.children(target, "")
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
    report += retie(target, tied)  # tied weights stay tied (one integer table) where they can
    if fuse:  # (after the speed check, which names layers as they were lowered)
        renamed = collapse_wrappers(target)
        report = [replace(r, name=renamed.get(r.name, r.name)) for r in report]
    for m in target.modules():  # the runtime (packed) forms, built once, after every change above
        if isinstance(m, IntegerModule):
            m.ensure_packed()
    setattr(target, REPORT_ATTR, report)
    # float containers (TransformerEncoderLayer) back where nothing inside stays integer: torch's fused path
    return restore_float(target)


def handles(cls: type, sim: nn.Module) -> bool:
    """Whether the lowering class ``cls`` is meant for ``sim``: ``sim`` is an instance of the
    class's declared ``simulated_type``; the padded convs lower only a padded view (one with
    ``extra_padding``, built by `plain_view` for an asymmetric subclass), the other convs never
    one. Only these classes' ``accepts`` is asked, so its refusal is about this module."""
    declared = getattr(cls, "simulated_type", None)
    if not isinstance(declared, type):
        raise TypeError(f"lowering class {cls.__name__} declares no simulated_type (the simulated class it lowers)")
    padded_view = any(getattr(sim, "extra_padding", None) or ())
    return isinstance(sim, declared) and (cls in _PADDED_CLASSES) == padded_view


_PADDED_CLASSES = frozenset(PADDED.values())


def _with_choice(lowering: Lowering, choice: SpeedChoice | None) -> Lowering:
    if choice is None:
        return lowering
    if choice.picked == "float":
        return Lowering(lowering.name, lowering.simulated, "float", f"integer kernel slower: {choice.report_detail()}")
    return Lowering(lowering.name, lowering.simulated, lowering.result,
                    f"{lowering.detail} ({choice.report_detail()})")


@dataclass
class _Walk:
    """One pass over the simulated tree: each quantized module lowered, kept simulated, or
    (never called during calibration) made float, with its report entry."""

    classes: list[type]
    report: list[Lowering]
    twins: dict[str, nn.Module]
    gaps: dict[str, tuple[str, ...]]
    never_called: set[str]

    def lower(self, module: nn.Module, name: str) -> nn.Module | None:
        if not isinstance(module, (QuantModule, QuantAdd)):
            return None
        overrider = _forward_overrider(module)
        if overrider is not None:  # lowering must not drop the user's code around the layer's op
            return self._lower_subclass(module, name, overrider)
        # a module stored another way than the integer classes read (transformers' Conv1D: a
        # transposed Linear) offers an equivalent view of itself to lower
        sim = module.linear_view() if callable(getattr(module, "linear_view", None)) else module
        return self._lower_as(sim, module, name, self.classes)

    def _lower_subclass(self, module: nn.Module, name: str, overrider: str) -> nn.Module | None:
        """A user subclass with its own forward: lowered when that forward provably pads with
        zeros and runs the conv (`conv_subclass`), else the user's float module, with the reason."""
        plan = analyse_conv_subclass(module) if isinstance(module, _CONVS) else \
            "its forward is not a padding followed by the convolution"
        if isinstance(plan, str):
            twin = module.to_float()  # type: ignore[attr-defined]
            self.report.append(Lowering(name or "(root)", type(module).__name__, "float",
                                        f"subclass {overrider} overrides forward and quanta cannot lower it "
                                        f"({plan}): kept float"))
            self.children(twin, name)  # (quantized modules inside it still lower)
            return twin
        return self._lower_as(plain_view(module, plan), module, name, self.classes)

    def _lower_as(self, sim: nn.Module, module: nn.Module, name: str, classes: list[type]) -> nn.Module | None:
        reasons = []
        for cls in (c for c in classes if handles(c, sim)):  # only the classes meant for this type explain
            reason = cls.accepts(sim)
            if reason is None:
                new = cls.from_simulated(sim)
                new.train(module.training)
                if name and isinstance(module, QuantModule):  # the float twin a speed check may put back
                    self.twins[name] = module.to_float()       # (sharing the float weights)
                self.report.append(Lowering(name or "(root)", type(module).__name__, type(new).__name__,
                                            new.extra_repr()))
                return new
            reasons.append(f"{cls.__name__}: {reason}")
        detail = "; ".join(reasons) or "no integer kernel for this module type"
        if name in self.gaps:  # (some inputs of a called module saw no data: e.g. self-attention's key)
            detail += f"; quantizer(s) {', '.join(self.gaps[name])} saw no calibration data"
        self.report.append(Lowering(name or "(root)", type(module).__name__, "simulated", detail))
        return None

    def children(self, module: nn.Module, prefix: str) -> None:
        for child_name, child in list(module.named_children()):
            if isinstance(child, (TensorQuantizer, IntegerModule)):
                continue
            full = f"{prefix}.{child_name}" if prefix else child_name
            if full in self.never_called:
                twin = _float_twin(child)
                setattr(module, child_name, twin)
                self.report.append(Lowering(full, type(child).__name__, "float",
                                            "never called during calibration (no range for "
                                            f"{', '.join(self.gaps[full])}): kept float"))
                self.children(twin, full)  # quantized modules inside were not called either
                continue
            new = self.lower(child, full)
            if new is not None:
                setattr(module, child_name, new)
                continue
            self.children(child, full)


def _walk(module: nn.Module, prefix: str, classes: list[type], report: list[Lowering],
          twins: dict[str, nn.Module]) -> None:
    """Lower every quantized module under ``module`` in place (no calibration gaps considered)."""
    _Walk(classes, report, twins, {}, set()).children(module, prefix)


def conversion_report(model: nn.Module) -> list[Any]:
    return list(getattr(model, REPORT_ATTR, []))
