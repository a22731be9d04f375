"""SmoothQuant (Xiao et al. 2023) for W8A8: move activation outliers into the weights.

For each verified group (a norm feeding Linears, `quanta.algorithms.norm_pairs`), per input channel
``s_j = max|X_j|^α / max|W_j|^(1−α)`` (``X``: the group's input on calibration data, ``W``: all its
Linears' weights stacked), ``X/s`` folded into the norm's weight and bias and ``W·s`` into the
Linears, so the float model is unchanged (checked) and the activations the int8 input quantizers
see have flatter channels. ``alpha="auto"``: per group, the α of a grid (or no migration at all)
with the smallest output error of its Linears quantized as the config says, on calibration rows."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .activation_scaling import GroupInput, best_alpha, migrate_scales
from .scale_migration import group_error


@dataclasses.dataclass(frozen=True)
class SmoothQuantOptions:
    """``alpha``: migration strength in [0, 1], or ``"auto"`` (searched per group over
    ``alpha_steps + 1`` values 0, 1/steps, …, 1, and no migration); ``max_tokens``: input rows
    sampled per group to score α on; ``min_tokens``: fewer rows reaching a Linear is an error;
    ``linear_pairs``: also scale verified ``Linear → Linear`` pairs (``v_proj → o_proj``)."""

    alpha: float | str = 0.5
    alpha_steps: int = 20
    max_tokens: int = 1024
    min_tokens: int = 32
    linear_pairs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise ValueError(f"SmoothQuantOptions.alpha: a number in [0, 1] or 'auto', got {self.alpha!r}")
        elif isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"SmoothQuantOptions.alpha: a number in [0, 1] or 'auto', got {self.alpha!r}")
        for name in ("alpha_steps", "max_tokens", "min_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SmoothQuantOptions.{name}: a positive int, got {v!r}")
        if not isinstance(self.linear_pairs, bool):
            raise TypeError(f"SmoothQuantOptions.linear_pairs: a bool, got {self.linear_pairs!r}")


def smoothing_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` (float64); a channel with no activation or no weight keeps 1,
    and scales stay within [1e-5, 1e5]."""
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).double()
    x_absmax = x_absmax.double()
    s = x_absmax.pow(alpha) / w_absmax.pow(1 - alpha)
    ok = (x_absmax > 0) & (w_absmax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(1e-5, 1e5)


def _rule(options: SmoothQuantOptions) -> Callable[[GroupInput], tuple[torch.Tensor | None, dict]]:
    def choose(g: GroupInput) -> tuple[torch.Tensor | None, dict]:
        before = group_error(g.configs, g.x, g.weights, None)
        if options.alpha != "auto":
            s = smoothing_scales(g.stats.absmax, g.weights, float(options.alpha))
            after = group_error(g.configs, g.x, g.weights, s)
            return s, {"alpha": float(options.alpha), "error_before": before, "error_after": after}
        return best_alpha(g, [i / options.alpha_steps for i in range(options.alpha_steps + 1)],
                          lambda alpha: smoothing_scales(g.stats.absmax, g.weights, alpha), before)

    return choose


def run(model: nn.Module, ctx: Any) -> dict:
    """The pipeline entry (`quanta.algorithms.pipeline`): on the float model, with ``ctx.config``."""
    from ..transforms.calibrate import default_forward

    options = ctx.options or SmoothQuantOptions()
    return migrate_scales(model, list(ctx.data or []), ctx.forward_fn or default_forward, ctx.config,
                          _rule(options), algorithm="smoothquant", max_tokens=options.max_tokens,
                          min_tokens=options.min_tokens, linear_pairs=options.linear_pairs)


def resolve_config(config: Any, default: str) -> Any:
    """A `QuantConfig`, a preset name, or None (``default``'s preset)."""
    from ..transforms.config import QuantConfig
    from ..transforms.presets import PRESETS

    config = default if config is None else config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r} (known: {', '.join(PRESETS)})")
        return PRESETS[config]()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig or a preset name, got {type(config).__name__}")
    return config


def smoothquant(model: nn.Module, data: Iterable[Any], config: Any = None, alpha: float | str = 0.5, *,
                forward_fn: Callable[[nn.Module, Any], Any] | None = None, **options: Any) -> dict:
    """SmoothQuant, in place, on the float ``model`` for the W8A8 ``config`` (a `QuantConfig` or
    preset name; default ``"static_int8"``; ``"dynamic_int8"`` for per-token activations), with
    calibration batches ``data`` (``forward_fn(model, batch)`` as in `quanta.calibrate`). Returns the
    record (per group: α, scale range, output error before / after; skipped groups with the reason).
    More options: `SmoothQuantOptions`. Or: ``QuantConfig(algorithms=("smoothquant",))``."""
    from ..transforms.calibrate import default_forward

    if not isinstance(model, nn.Module):
        raise TypeError(f"smoothquant expects an nn.Module, got {type(model).__name__}")
    if isinstance(data, torch.Tensor):
        raise TypeError("data must be an iterable of batches (a list of tensors); wrap a single tensor as [tensor]")
    opts = SmoothQuantOptions(alpha=alpha, **options)
    return migrate_scales(model, list(data), forward_fn or default_forward, resolve_config(config, "static_int8"),
                          _rule(opts), algorithm="smoothquant", max_tokens=opts.max_tokens,
                          min_tokens=opts.min_tokens, linear_pairs=opts.linear_pairs)
