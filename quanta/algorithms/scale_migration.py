"""Per-channel scale migration, one implementation for SmoothQuant and AWQ: a group's source (a
norm's per-channel weight and bias, or Linear A's output rows) is divided by ``s`` and its
consumers' input columns multiplied by ``s``, so ``W·(x/s)·s = W·x`` and the float function is
unchanged; and the simulation of how a `QuantConfig` will quantize a consumer, to score a scale.

Consumers are ``nn.Linear`` (weight ``[out, in]``) and transformers' ``Conv1D`` (weight
``[in, out]``, GPT-2): `weight_2d` gives both as ``[out, in]``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import compact_shape
from ..nn.modules.base import LayerQuantConfig
from ..nn.modules.hf_conv1d import HF_CONV1D_PATH
from ..nn.tensor_quantizer import TensorQuantizer


def _is_hf_conv1d(module: nn.Module) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == HF_CONV1D_PATH for c in type(module).__mro__)


def is_consumer(module: nn.Module) -> bool:
    """A Linear-like layer whose input channels can take a scale: ``nn.Linear`` or ``Conv1D``."""
    return (isinstance(module, nn.Linear) or _is_hf_conv1d(module)) and module.weight.dim() == 2


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def in_features(module: nn.Module) -> int:
    return int(weight_2d(module).shape[1])


def out_features(module: nn.Module) -> int:
    return int(weight_2d(module).shape[0])


@torch.no_grad()
def apply_scale(source: nn.Module, kind: str, consumers: Iterable[nn.Module], s: torch.Tensor) -> None:
    """In place: ``source``'s output channel ``j`` divided by ``s_j`` (a norm's weight and bias, or
    Linear A's weight rows and bias; ``kind`` "norm" / "linear"), each consumer's input column ``j``
    multiplied by ``s_j``. Computed in float64 on the weights' device."""
    s = s.double().to(source.weight.device)
    if kind == "norm":
        source.weight.copy_((source.weight.double() / s).to(source.weight.dtype))
    elif kind == "linear":
        w = source.weight
        shaped = s[:, None] if isinstance(source, nn.Linear) else s[None, :]
        w.copy_((w.double() / shaped).to(w.dtype))
    else:
        raise ValueError(f"apply_scale: kind must be 'norm' or 'linear', got {kind!r}")
    bias = source._parameters.get("bias")
    if bias is not None:
        bias.copy_((bias.double() / s).to(bias.dtype))
    for mod in consumers:
        w = mod.weight
        shaped = s[None, :] if isinstance(mod, nn.Linear) else s[:, None]
        w.copy_((w.double() * shaped).to(w.dtype))


class Snapshot:
    """The parameters of some modules, copied, to restore bit for bit."""

    def __init__(self, modules: Iterable[nn.Module]):
        self.saved = [(p, p.detach().clone()) for m in modules for p in m._parameters.values() if p is not None]

    @torch.no_grad()
    def restore(self) -> None:
        for p, v in self.saved:
            p.copy_(v)


class ConsumerStats:
    """Statistics of one consumer's input over calibration: per channel max ``|x|`` and mean ``|x|``,
    rows seen, and up to ``max_rows`` rows sampled (a random subset of each call's rows, thinned
    again when more than four times that pile up) to score scales on. Consumers fed the same tensor
    keep its statistics once: the others count rows only and name the ``holder``."""

    def __init__(self, channels: int):
        self.holder: str | None = None
        self.sampled_rows = 0
        self.absmax = torch.zeros(channels, dtype=torch.float64)
        self.abssum = torch.zeros(channels, dtype=torch.float64)
        self.rows = 0
        self._samples: list[torch.Tensor] = []
        self._max_rows = 0
        self._gen: torch.Generator | None = None

    def add(self, x: torch.Tensor, max_rows: int, gen: torch.Generator) -> None:
        """``x``: ``[rows, channels]`` (kept on the CPU)."""
        x = x.detach().cpu()
        a = x.abs()
        self.sampled_rows += x.shape[0]
        self.absmax = torch.maximum(self.absmax, a.amax(0).double())
        self.abssum += a.sum(0, dtype=torch.float64)
        self.rows += x.shape[0]
        self._max_rows, self._gen = max_rows, gen
        self._samples.append(self._pick(x.float(), max_rows, gen))
        if sum(t.shape[0] for t in self._samples) > 4 * max_rows:
            self._samples = [self._pick(torch.cat(self._samples), max_rows, gen)]

    @staticmethod
    def _pick(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        if x.shape[0] <= n:
            return x.clone()
        return x[torch.randperm(x.shape[0], generator=gen)[:n].sort().values].clone()

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.rows, 1)

    def sample(self) -> torch.Tensor:
        x = torch.cat(self._samples) if self._samples else torch.zeros(0, self.absmax.numel())
        return self._pick(x, self._max_rows, self._gen) if self._gen is not None else x


def weight_fits(desc: Any, weight: torch.Tensor) -> bool:
    """Whether a weight quantizer of ``desc`` can take ``weight`` (``[out, in]``): else prepare leaves
    the layer float."""
    q = TensorQuantizer(desc, axis=0, group_axis=1, track_tensor=True)
    try:
        compact_shape(tuple(weight.shape), q.spec)
    except ValueError:
        return False
    return True


@torch.no_grad()
def quantized_linear(cfg: LayerQuantConfig | None, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (``weight`` ``[out, in]``) with the input and weight quantized as ``cfg``
    says (static input ranges calibrated on ``x`` itself with the descriptor's method; a weight whose
    shape ``cfg`` cannot take stays float, as in `quanta.prepare`). Output quantizers are not simulated."""
    if cfg is not None and cfg.input is not None:
        q = TensorQuantizer(cfg.input)
        if q.needs_calibration:
            q.disable_quant()
            q.enable_calib()
            q(x)
            q.disable_calib()
            q.load_calib_amax()
            q.enable_quant()
        x = q(x).float()
    if cfg is not None and cfg.weight is not None and weight_fits(cfg.weight, weight):
        weight = TensorQuantizer(cfg.weight, axis=0, group_axis=1, track_tensor=True)(weight).float()
    return F.linear(x, weight)


def group_error(cfgs: list[LayerQuantConfig | None], x: torch.Tensor, weights: list[torch.Tensor],
                s: torch.Tensor | None) -> float:
    """Sum over a group's consumers of the mean squared error between the quantized output on
    ``x / s`` with the weight ``W · s`` (``s=None``: as it is) and the float output ``x @ W.T``."""
    xs = x if s is None else (x.double() / s).float()
    total = 0.0
    for cfg, w in zip(cfgs, weights):
        ws = w if s is None else (w.double() * s).float()
        ref = F.linear(x, w.float())
        total += float((quantized_linear(cfg, xs, ws) - ref).double().pow(2).mean())
    return total
