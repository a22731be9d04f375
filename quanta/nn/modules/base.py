"""The mixin every quantized module shares: its quantizers, `from_float`, and the weight swap."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...core import compact_shape
from ...core.dicts import check_keys, field_names
from ..descriptor import QUANT_DESC_8BIT_PER_TENSOR, QUANT_DESC_8BIT_WEIGHT_PER_CHANNEL, QuantDescriptor
from ..tensor_quantizer import TensorQuantizer
from .op_base import QuantOp

_DEFAULT: Any = object()


@dataclass(frozen=True)
class LayerQuantConfig:
    """Descriptors of one layer's quantizers; ``None`` leaves that tensor in float."""

    input: QuantDescriptor | None = QUANT_DESC_8BIT_PER_TENSOR
    weight: QuantDescriptor | None = QUANT_DESC_8BIT_WEIGHT_PER_CHANNEL
    output: QuantDescriptor | None = None

    def __post_init__(self) -> None:
        for name in ("input", "weight", "output"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, QuantDescriptor):
                raise TypeError(f"LayerQuantConfig.{name} must be a QuantDescriptor or None, got {type(v).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if getattr(self, k) is None else getattr(self, k).to_dict()) for k in field_names(type(self))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerQuantConfig:
        data = check_keys("LayerQuantConfig", data, field_names(cls))
        return cls(**{k: (None if v is None else QuantDescriptor.from_dict(v)) for k, v in data.items()})


_DYNAMIC_CLASSES: dict[tuple[type, type], type] = {}


def float_class_of(module: nn.Module) -> type:
    """The class a module was built as before quanta swapped it: for a quantized module (or the
    wrapper quanta made for a user's float subclass) the first non-quantized ``nn.Module``
    class of its MRO; for anything else its own class."""
    for klass in type(module).__mro__:
        if issubclass(klass, nn.Module) and not issubclass(klass, QuantModule):
            return klass
    return type(module)


def _only_quantizers(module: nn.Module) -> bool:
    """A TensorQuantizer, a quantized functional op, or a container of nothing else."""
    if isinstance(module, (TensorQuantizer, QuantOp)):
        return True
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return all(_only_quantizers(m) for m in module.children())
    return False


class _ThreadShadows(threading.local):
    """Per thread: ``id(module) -> {weight name: fake-quantized value}`` while that module's
    float ``forward`` runs in this thread (`QuantModule.quantized_weights`)."""

    def __init__(self) -> None:
        self.by_module: dict[int, dict[str, torch.Tensor]] = {}


_SHADOWS = _ThreadShadows()
_FLOAT_FORWARD: dict[type, bool] = {}


def runs_float_forward(cls: type) -> bool:
    """True when instances of the quantized class ``cls`` run torch's own forward of their
    ``float_type`` (no user subclass in between overrides ``forward``)."""
    known = _FLOAT_FORWARD.get(cls)
    if known is None:
        mro = cls.__mro__
        first = next(c for c in mro if "forward" in vars(c))
        after = mro[mro.index(QuantModule) + 1:] if QuantModule in mro else ()
        known = first is QuantModule and next(
            (c for c in after if "forward" in vars(c)), None) is getattr(cls, "float_type", None)
        _FLOAT_FORWARD[cls] = known
    return known


class QuantModule:
    """Mixin placed before a float module class in the MRO.

    The float class's own ``forward`` runs unchanged (torch's or a user subclass's): inputs are
    quantized on the way in, and while it runs, reading ``self.weight`` gives the fake-quantized
    weight (gradients flow to the real parameter). So a user's ``nn.Conv2d`` subclass that pads
    in its ``forward`` keeps doing so. A call never writes to the module: the quantized value is
    held per thread (`_SHADOWS`, read by ``__getattr__``), so concurrent calls are safe; classes
    that run torch's own forward pass it to the functional op directly (`forward_with`).
    """

    float_type: ClassVar[type]  # the torch.nn class this quantizes
    weight_channel_axis: ClassVar[int | None] = 0  # output-channel axis of `weight`
    weight_reduce_axis: ClassVar[int] = 1  # axis that per-group granularity splits
    quantize_input: ClassVar[bool] = True
    weight_names: ClassVar[tuple[str, ...]] = ("weight",)

    input_quantizer: TensorQuantizer | None
    weight_quantizer: TensorQuantizer | None
    output_quantizer: TensorQuantizer | None

    def __init__(self, *args: Any, quant_desc_input: Any = _DEFAULT, quant_desc_weight: Any = _DEFAULT,
                 quant_desc_output: QuantDescriptor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        defaults = LayerQuantConfig()
        self.init_quantizers(LayerQuantConfig(
            input=defaults.input if quant_desc_input is _DEFAULT else quant_desc_input,
            weight=defaults.weight if quant_desc_weight is _DEFAULT else quant_desc_weight,
            output=quant_desc_output,
        ))

    # ------------------------------------------------------------------ construction
    @classmethod
    def quant_class_for(cls, float_cls: type) -> type:
        """``cls`` for the exact float type; for a user subclass, a class that keeps its forward."""
        if float_cls is cls.float_type:
            return cls
        key = (cls, float_cls)
        if key not in _DYNAMIC_CLASSES:
            _DYNAMIC_CLASSES[key] = type(f"Quant{float_cls.__name__}", (cls, float_cls),
                                         {"__module__": float_cls.__module__, "__doc__": float_cls.__doc__})
        return _DYNAMIC_CLASSES[key]

    @classmethod
    def from_float(cls, module: nn.Module, config: LayerQuantConfig | None = None) -> nn.Module:
        """A quantized module sharing ``module``'s parameters, buffers, submodules and hooks."""
        if not isinstance(module, cls.float_type):
            raise TypeError(f"{cls.__name__}.from_float expects a {cls.float_type.__name__}, "
                            f"got {type(module).__name__}")
        qcls = cls.quant_class_for(type(module))
        new = qcls.__new__(qcls)
        new.__dict__.update({k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in module.__dict__.items()})
        new.init_quantizers(LayerQuantConfig() if config is None else config)
        return new

    def to_float(self) -> nn.Module:
        """The float module this one wraps (its float class, sharing parameters, buffers and
        hooks), without quantizers: the inverse of `from_float`."""
        cls = float_class_of(self)  # type: ignore[arg-type]
        twin = cls.__new__(cls)
        twin.__dict__.update({k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in self.__dict__.items()
                              if k != "quant_config"})
        for name, child in list(twin._modules.items()):
            if child is not None and _only_quantizers(child):
                del twin._modules[name]
        return twin

    def init_quantizers(self, config: LayerQuantConfig) -> None:
        self.quant_config = config
        mod: Any = self
        has_weight = bool(self.weight_names) and getattr(self, self.weight_names[0], None) is not None
        mod.input_quantizer = (TensorQuantizer(config.input)
                               if config.input is not None and self.quantize_input else None)
        mod.weight_quantizer = (
            TensorQuantizer(config.weight, axis=self.weight_channel_axis, group_axis=self.weight_reduce_axis,
                            track_tensor=True)
            if config.weight is not None and has_weight else None)
        mod.output_quantizer = TensorQuantizer(config.output) if config.output is not None else None
        if self.weight_quantizer is not None:  # fail now, not mid-forward, if the layout cannot fit
            for name in self.weight_names:
                w = self._parameters.get(name)  # type: ignore[attr-defined]
                if w is not None:
                    compact_shape(tuple(w.shape), self.weight_quantizer.spec)
        if self.weight_quantizer is not None and config.weight is not None and config.weight.learn_amax:
            self.weight_quantizer.init_from_tensor(self._parameters[self.weight_names[0]])  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ forward pieces
    def quantizers(self) -> Iterator[tuple[str, TensorQuantizer]]:
        for kind in ("input", "weight", "output"):
            q = getattr(self, f"{kind}_quantizer", None)
            if q is not None:
                yield kind, q

    def any_quantizer_active(self) -> bool:
        return any(q.active for _, q in self.quantizers())

    def fake_quantized_weights(self) -> dict[str, torch.Tensor]:
        """``{name: fake-quantized value}`` of each weight; empty when no weight quantizer is on."""
        wq = self.weight_quantizer
        if wq is None or not wq.is_enabled:
            return {}
        params = self._parameters  # type: ignore[attr-defined]
        return {name: wq(params[name]) for name in self.weight_names if params.get(name) is not None}

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not in the instance __dict__ (parameters, buffers, submodules).
        shadows = _SHADOWS.by_module
        if shadows:
            own = shadows.get(id(self))
            if own is not None and name in own:
                return own[name]
        return super().__getattr__(name)  # type: ignore[misc]

    @contextlib.contextmanager
    def quantized_weights(self, values: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
        """In this thread, reading a weight attribute gives its fake-quantized value (``values``,
        else `fake_quantized_weights`) for the duration of the block; other threads and the
        module itself are unaffected."""
        values = self.fake_quantized_weights() if values is None else values
        if not values:
            yield
            return
        shadows, key = _SHADOWS.by_module, id(self)
        previous = shadows.get(key)
        shadows[key] = values if previous is None else {**previous, **values}
        try:
            yield
        finally:
            if previous is None:
                del shadows[key]
            else:
                shadows[key] = previous

    def forward_with(self, weights: dict[str, torch.Tensor], x: Any) -> Any:
        """torch's forward of ``float_type`` on one input with ``weights`` in place of the
        parameters; ``NotImplemented`` where a class has no functional form (the generic path
        then runs the float forward under `quantized_weights`)."""
        return NotImplemented

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args and self.input_quantizer is not None and isinstance(args[0], torch.Tensor) \
                and args[0].is_floating_point():
            args = (self.input_quantizer(args[0]),) + args[1:]
        weights = self.fake_quantized_weights()
        out: Any = NotImplemented
        if weights and len(args) == 1 and not kwargs and runs_float_forward(type(self)):
            out = self.forward_with(weights, args[0])
        if out is NotImplemented:
            with self.quantized_weights(weights):
                out = super().forward(*args, **kwargs)  # type: ignore[misc]
        if self.output_quantizer is not None:
            out = self.output_quantizer(out)
        return out
