"""AWQ (Lin et al. 2023), activation-aware weight scaling for weight-only int4.

Weights of the input channels that carry large activations matter most; AWQ scales them up before
the weights are rounded (``W·s``) and folds ``1/s`` into what produces the input (a norm, or Linear
A of a verified pair: `quanta.algorithms.norm_pairs`), so the float model is unchanged (checked).
Per group ``s = mean|X|^α``, normalized by ``sqrt(max(s)·min(s))``; α on the grid 0, 1/n, …, (n−1)/n
minimizing the output error of the group's Linears with weights quantized as the config says
(group-wise int4 for ``weight_only_int4``), on calibration rows. α = 0 is ``s = 1`` (no change).
The folding is SmoothQuant's (`quanta.algorithms.scale_migration`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .activation_scaling import GroupInput, best_alpha, migrate_scales
from .scale_migration import group_error
from .smoothquant import resolve_config


@dataclasses.dataclass(frozen=True)
class AWQOptions:
    """``grid``: α values searched per group (0, 1/grid, …); ``max_tokens``: input rows sampled per
    group to score them on; ``min_tokens``: fewer rows reaching a Linear is an error;
    ``linear_pairs``: also scale verified ``Linear → Linear`` pairs (``v_proj → o_proj``,
    ``up_proj → down_proj``), as AWQ does."""

    grid: int = 20
    max_tokens: int = 1024
    min_tokens: int = 32
    linear_pairs: bool = True

    def __post_init__(self) -> None:
        for name in ("grid", "max_tokens", "min_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AWQOptions.{name}: a positive int, got {v!r}")
        if not isinstance(self.linear_pairs, bool):
            raise TypeError(f"AWQOptions.linear_pairs: a bool, got {self.linear_pairs!r}")


def awq_scales(x_absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = mean|X|^α`` (at least 1e-4), divided by ``sqrt(max(s)·min(s))`` (float64)."""
    s = x_absmean.double().pow(alpha).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def _rule(options: AWQOptions) -> Callable[[GroupInput], tuple[torch.Tensor | None, dict]]:
    def choose(g: GroupInput) -> tuple[torch.Tensor | None, dict]:
        before = group_error(g.configs, g.x, g.weights, None)
        return best_alpha(g, [i / options.grid for i in range(1, options.grid)],
                          lambda alpha: awq_scales(g.stats.absmean, alpha), before)

    return choose


def run(model: nn.Module, ctx: Any) -> dict:
    """The pipeline entry (`quanta.algorithms.pipeline`): on the float model, with ``ctx.config``."""
    from ..transforms.calibrate import default_forward

    options = ctx.options or AWQOptions()
    return migrate_scales(model, list(ctx.data or []), ctx.forward_fn or default_forward, ctx.config,
                          _rule(options), algorithm="awq", max_tokens=options.max_tokens,
                          min_tokens=options.min_tokens, linear_pairs=options.linear_pairs)


def awq(model: nn.Module, data: Iterable[Any], config: Any = None, *,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None, **options: Any) -> dict:
    """AWQ, in place, on the float ``model`` for the weight-only ``config`` (a `QuantConfig` or preset
    name; default ``"weight_only_int4"``, group 128), with calibration batches ``data``. Returns the
    record (per group: α, scale range, output error before / after; skipped groups with the reason).
    More options: `AWQOptions`. Or: ``QuantConfig(algorithms=("awq",))``."""
    from ..transforms.calibrate import default_forward

    if not isinstance(model, nn.Module):
        raise TypeError(f"awq expects an nn.Module, got {type(model).__name__}")
    if isinstance(data, torch.Tensor):
        raise TypeError("data must be an iterable of batches (a list of tensors); wrap a single tensor as [tensor]")
    opts = AWQOptions(**options)
    return migrate_scales(model, list(data), forward_fn or default_forward, resolve_config(config, "weight_only_int4"),
                          _rule(opts), algorithm="awq", max_tokens=opts.max_tokens,
                          min_tokens=opts.min_tokens, linear_pairs=opts.linear_pairs)
