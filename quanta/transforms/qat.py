"""Quantization-aware training: `prepare_qat` → train as usual → `finalize_qat` → `convert`.

Example::

    model.train()
    qat = quanta.prepare_qat(model, quanta.QATConfig(config=my_4bit_config, freeze_bn_step=200),
                             data=calibration_batches)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-4)   # after prepare_qat: ranges are parameters
    for x, y in loader:
        opt.zero_grad(); loss_fn(qat(x), y).backward(); opt.step()
    quanta.finalize_qat(qat)        # BatchNorm folded for good, learned ranges fixed
    integer = quanta.convert(qat)

The model is fake-quantized with the straight-through estimator; each static symmetric range
(weights and activations) becomes an ``nn.Parameter`` trained with the LSQ gradient
(``learn_ranges=True``) after a short calibration on ``data`` initialised it. Conv→BatchNorm
pairs become `QATConvBn` (training-safe folding). A *step* is one forward of the model in
training mode: after ``freeze_bn_step`` steps the BatchNorm statistics freeze, after
``freeze_ranges_step`` steps the learned ranges stop learning. Before each step a learned range
that collapsed below ``min_amax`` (or went negative) is clamped to ``min_amax`` and reported
with a warning, so the scale never reaches zero (no NaN).

``torch.compile(qat)`` trains the same as eager, step for step: the step hook (counting,
freezing, clamping, and copying each Conv-BN's running variance into the tensor it folds with)
runs eagerly before each compiled forward. Compile the prepared model itself (a compiled
*submodule* of it would fold with the variance of the previous step's hook).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..nn import QuantDescriptor
from ..nn.modules.base import LayerQuantConfig
from ..nn.modules.conv_bn import QATConvBn
from ..nn.tensor_quantizer import TensorQuantizer
from .calibrate import calibrate, calibration_targets
from .config import QuantConfig
from .fold_bn import _pairs_fx, _pairs_sequential
from .prepare import check_float_model, prepare
from .presets import preset

QAT_ATTR = "_quanta_qat"


@dataclass(frozen=True)
class QATConfig:
    """What to quantize (``config``: a `QuantConfig` or a preset name) and how to train it."""

    config: QuantConfig | str = "static_int8"
    learn_ranges: bool = True
    calib_batches: int = 8
    freeze_bn_step: int | None = None
    freeze_ranges_step: int | None = None
    min_amax: float = 1e-5
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.config, (QuantConfig, str)):
            raise TypeError(f"QATConfig.config must be a QuantConfig or a preset name, got {type(self.config).__name__}")
        if not isinstance(self.learn_ranges, bool):
            raise TypeError(f"QATConfig.learn_ranges must be a bool, got {type(self.learn_ranges).__name__}")
        for name in ("calib_batches", "freeze_bn_step", "freeze_ranges_step"):
            v = getattr(self, name)
            if v is None and name != "calib_batches":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "calib_batches" else 0):
                raise ValueError(f"QATConfig.{name} must be a {'positive' if name == 'calib_batches' else 'non-negative'} "
                                 f"int{'' if name == 'calib_batches' else ' or None'}, got {v!r}")
        if isinstance(self.min_amax, bool) or not isinstance(self.min_amax, (int, float)) or not self.min_amax > 0:
            raise ValueError(f"QATConfig.min_amax must be a positive float, got {self.min_amax!r}")
        if self.version != 1:
            raise ValueError(f"QATConfig.version must be 1, got {self.version!r}")

    def quant_config(self) -> QuantConfig:
        """The `QuantConfig` to prepare with: BatchNorm is folded by QAT itself, and with
        ``learn_ranges`` every static symmetric integer descriptor gets ``learn_amax``."""
        config = preset(self.config) if isinstance(self.config, str) else self.config
        if not self.learn_ranges:
            return dataclasses.replace(config, fold_bn=False)
        return dataclasses.replace(
            config, fold_bn=False, default=_learned(config.default),
            module_types={k: _learned(v) for k, v in config.module_types.items()},
            rules={k: _learned(v) for k, v in config.rules.items()})


def _learnable(d: QuantDescriptor | None) -> QuantDescriptor | None:
    if d is None or d.learn_amax or d.dynamic or d.per_token or not d.symmetric or d.format != "int" \
            or d.group_size is not None or d.amax is not None:
        return d
    return dataclasses.replace(d, learn_amax=True)


def _learned(layer: LayerQuantConfig | None) -> LayerQuantConfig | None:
    if layer is None:
        return None
    descriptors = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)}
    return dataclasses.replace(layer, **{k: _learnable(d) for k, d in descriptors.items()
                                         if isinstance(d, QuantDescriptor)})


def _learned_ranges(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(n, q) for n, q in model.named_modules()
            if isinstance(q, TensorQuantizer) and isinstance(q.amax, nn.Parameter)]


class _Schedule:
    """Counts training steps (forwards in training mode) and applies the config's schedule."""

    def __init__(self, config: QATConfig):
        self.config = config
        self.step = 0
        self.clamped: dict[str, int] = {}

    @torch.compiler.disable  # host-side bookkeeping (step count, freezing, clamping, warnings): runs eagerly
    def __call__(self, model: nn.Module, args: Any) -> None:
        if not model.training:
            return
        cfg = self.config
        if cfg.freeze_bn_step is not None and self.step >= cfg.freeze_bn_step:
            freeze_bn(model)
        if cfg.freeze_ranges_step is not None and self.step >= cfg.freeze_ranges_step:
            freeze_ranges(model)
        self.clamp_collapsed(model)
        for m in model.modules():
            if isinstance(m, QATConvBn) and m.bn.training:
                m.sync_folding_var()
        self.step += 1

    @torch.no_grad()
    def clamp_collapsed(self, model: nn.Module) -> None:
        low = []
        for name, q in _learned_ranges(model):
            bad = ~(q.amax >= self.config.min_amax)  # also catches NaN and negative values
            if bool(bad.any()):
                q.amax.copy_(torch.where(bad, q.amax.abs().nan_to_num(0.0).clamp_min(self.config.min_amax), q.amax))
                self.clamped[name] = self.clamped.get(name, 0) + 1
                low.append(name)
        if low:
            warnings.warn(f"quanta QAT step {self.step}: {len(low)} learned range(s) collapsed below min_amax="
                          f"{self.config.min_amax:g} and were clamped: {', '.join(low[:6])}"
                          f"{' …' if len(low) > 6 else ''} (lower the learning rate of the ranges?)",
                          UserWarning, stacklevel=3)


def freeze_bn(model: nn.Module) -> None:
    """Freeze the running statistics of every QAT Conv-BN (they normalise with them from now on)."""
    for m in model.modules():
        if isinstance(m, QATConvBn) and not m.bn_frozen:
            m.freeze_bn()


def freeze_ranges(model: nn.Module) -> None:
    """Stop learning every learned range (they keep their values)."""
    for _, q in _learned_ranges(model):
        q.amax.requires_grad_(False)


def _wrap_conv_bn(model: nn.Module, pairs: list[tuple[str, str]]) -> list[str]:
    wrapped = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if getattr(conv, "weight_quantizer", None) is None or not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue  # stays float or is not a plain convolution: its BatchNorm trains as usual
        fused = QATConvBn(conv, bn)
        parent, _, leaf = conv_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, fused)
        parent, _, leaf = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
        if conv.weight_quantizer.desc.learn_amax:
            conv.weight_quantizer.init_from_tensor(fused.folded_weight().detach())
        wrapped.append(conv_name)
    return wrapped


def prepare_qat(model: nn.Module, config: QATConfig | QuantConfig | str = "static_int8",
                data: Iterable[Any] | None = None, *, forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                inplace: bool = False, **calibrate_kwargs: Any) -> nn.Module:
    """Return a copy of ``model`` (``inplace=True``: the model itself) ready for training with
    quantization in the loop; ``data`` (``config.calib_batches`` batches of it, on each rank
    under ``torch.distributed``) initialises the activation ranges. Create the optimizer after
    this call: learned ranges are new parameters."""
    check_float_model(model, "prepare_qat")
    if not isinstance(config, QATConfig):
        config = QATConfig(config=config)
    if not model.training:
        warnings.warn(f"quanta.prepare_qat: {type(model).__name__} is in eval mode; QAT trains it, so BatchNorm "
                      "would not update its statistics: call model.train() first (the model is prepared as is)",
                      UserWarning, stacklevel=2)
    quant_config = config.quant_config()
    pairs = _pairs_fx(model)
    pairs = _pairs_sequential(model) if pairs is None else pairs
    target = model if inplace else copy.deepcopy(model)
    prepare(target, quant_config, inplace=True)
    wrapped = _wrap_conv_bn(target, pairs)
    targets = calibration_targets(target)
    if targets:
        if data is None:
            raise ValueError(f"prepare_qat: {len(targets)} activation range(s) need initialising (e.g. "
                             f"{targets[0][0]!r}): pass data= (a few batches) or fixed amax descriptors")
        calibrate(target, data, num_batches=config.calib_batches, forward_fn=forward_fn, **calibrate_kwargs)
    schedule = _Schedule(config)
    handle = target.register_forward_pre_hook(schedule)
    setattr(target, QAT_ATTR, {"config": config, "schedule": schedule, "hook": handle, "conv_bn": wrapped})
    return target


def finalize_qat(model: nn.Module, group: Any = None) -> nn.Module:
    """End training: fold each Conv-BN for good, fix the learned ranges, drop the schedule.
    The model (changed in place, returned) is then ready for ``quanta.convert``.

    Under ``torch.distributed`` every buffer (BatchNorm statistics, fixed ranges) is first
    broadcast from the first rank of ``group``: DDP leaves each rank's last local BatchNorm
    update in place, and this makes the converted model the same on every rank."""
    state = getattr(model, QAT_ATTR, None)
    if state is None:
        raise ValueError(f"finalize_qat: {type(model).__name__} was not prepared with quanta.prepare_qat")
    sharded = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor" or
               type(getattr(p, "data", None)).__name__ == "DTensor"]
    if sharded:
        raise ValueError(f"finalize_qat: parameters such as {sharded[0]!r} are sharded (FSDP2 fully_shard); folding "
                         "and conversion need whole tensors: gather a full state dict (torch.distributed.checkpoint."
                         "state_dict.get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))), "
                         "load it into an unsharded prepare_qat copy and finalize that")
    if dist.is_available() and dist.is_initialized():
        src = dist.get_global_rank(group, 0) if group is not None else 0
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=src, group=group)
    state["hook"].remove()
    state["schedule"].clamp_collapsed(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, QATConvBn):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, m.fold())
    freeze_ranges(model)
    delattr(model, QAT_ATTR)
    return model.eval()
