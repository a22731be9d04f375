"""The driver SmoothQuant and AWQ share: capture calibration activations, find and verify the
groups (`norm_pairs`), ask the algorithm's rule for each group's scale, fold it (`scale_migration`),
and check that the float model still computes what it did (else undo that group)."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..nn.modules.base import LayerQuantConfig
from ..nn.tensor_quantizer import TensorQuantizer
from .norm_pairs import (
    TOLERANCE,
    Group,
    _tensors,
    capture_groups,
    output_error,
    verify_groups,
)
from .scale_migration import (
    ConsumerStats,
    Snapshot,
    apply_scale,
    group_error,
    weight_2d,
    weight_fits,
)


@dataclasses.dataclass
class GroupInput:
    """What a scale rule sees for one verified group."""

    group: Group
    stats: ConsumerStats  # of the group's (shared) input
    x: torch.Tensor  # sampled input rows [n, channels]
    weights: list[torch.Tensor]  # each consumer's weight as [out, in], float32 copies
    configs: list[LayerQuantConfig | None]  # how the config quantizes each consumer


#: rule(group input) -> (scale or None to leave the group as it is, record fields)
ScaleRule = Callable[[GroupInput], tuple[torch.Tensor | None, dict]]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _layer_config(config: Any, name: str, module: nn.Module) -> LayerQuantConfig | None:
    """How ``config`` quantizes the consumer ``name``; None where it stays float (excluded, or a
    weight shape its config cannot take, as `quanta.prepare` decides)."""
    cfg = None if config is None else config.decide(name, module).config
    if cfg is not None and cfg.weight is not None and not weight_fits(cfg.weight, weight_2d(module)):
        return None
    return cfg


def _quantized(cfg: LayerQuantConfig | None) -> bool:
    return cfg is not None and (cfg.input is not None or cfg.weight is not None)


def _range(s: torch.Tensor) -> dict:
    return {"scale_min": float(f"{float(s.min()):.6g}"), "scale_max": float(f"{float(s.max()):.6g}")}


@torch.no_grad()
def migrate_scales(model: nn.Module, batches: list, forward: Callable[[nn.Module, Any], Any], config: Any,
                   rule: ScaleRule, *, algorithm: str, max_tokens: int, min_tokens: int,
                   linear_pairs: bool) -> dict:
    """Scale, in place, every verified group of ``model`` (a float model) by ``rule`` and return the
    record: ``groups`` (one row per group the rule saw), ``skipped`` (group, reason), ``note``. Raises
    ``ValueError`` (the model untouched) when fewer than ``min_tokens`` rows reach a Linear."""
    if any(isinstance(m, TensorQuantizer) for m in model.modules()):
        raise ValueError(f"{algorithm} runs on the float model (before quanta.prepare, or through "
                         f"QuantConfig.algorithms): this model already holds quantizers")
    if not batches:
        raise ValueError(f"{algorithm} needs calibration data: the list of batches is empty")
    with _eval_mode(model):
        groups, stats = capture_groups(model, batches, forward, max_tokens)
        rows = max((st.rows for st in stats.values()), default=0)
        if stats and rows < min_tokens:
            raise ValueError(f"{algorithm}: too little calibration data: {rows} token(s) reached a Linear, "
                             f"it needs at least {min_tokens} (pass more or longer batches)")
        if not linear_pairs:
            groups = [g for g in groups if g.kind == "norm"]
        ok, skipped = verify_groups(model, groups, batches[0], forward) if groups else ([], [])
        reference = _tensors(forward(model, batches[0]))
        rows_out: list[dict] = []
        applied: list[tuple[Group, torch.Tensor, dict, Snapshot]] = []
        for g in ok:
            mods = [model.get_submodule(c) for c in g.consumers]
            cfgs = [_layer_config(config, c, m) for c, m in zip(g.consumers, mods)]
            if not any(_quantized(c) for c in cfgs):
                skipped.append({"group": g.describe(), "reason": "the config leaves its Linears in float"})
                continue
            st = stats[g.consumers[0]]
            st = stats[st.holder] if st.holder is not None and not st.sampled_rows else st
            weights = [weight_2d(m).detach().float().cpu().clone() for m in mods]  # scored on the CPU
            s, info = rule(GroupInput(g, st, st.sample(), weights, cfgs))
            row = {"source": g.source, "kind": g.kind, "consumers": list(g.consumers), **info}
            if s is not None:
                row.update(_range(s))
                snap = Snapshot([model.get_submodule(g.source), *mods])
                apply_scale(model.get_submodule(g.source), g.kind, mods, s)
                applied.append((g, s, row, snap))
            row["scaled"] = s is not None
            rows_out.append(row)
        if applied and not output_error(reference, forward(model, batches[0])) <= TOLERANCE:
            _undo_imprecise(model, batches[0], forward, reference, applied, skipped)
    scaled = sum(r["scaled"] for r in rows_out)
    if not groups:
        note = (f"no norm → Linear{' or Linear → Linear' if linear_pairs else ''} group in the model: "
                "it is unchanged")
    elif not ok:
        note = "no group passed the exactness check: the model is unchanged"
    else:
        note = f"{scaled} of {len(ok)} verified group(s) scaled"
    if scaled == 0:
        warnings.warn(f"quanta {algorithm}: {note}", UserWarning, stacklevel=3)
    return {"algorithm": algorithm, "groups": rows_out, "skipped": skipped, "note": note}


def _undo_imprecise(model: nn.Module, batch: Any, forward: Callable[[nn.Module, Any], Any],
                    reference: list[torch.Tensor], applied: list, skipped: list[dict]) -> None:
    """The scales together moved the float output: undo them all, then redo one at a time keeping
    those after which the output still matches."""
    for *_, snap in reversed(applied):
        snap.restore()
    for g, s, row, _ in applied:
        mods = [model.get_submodule(g.source)] + [model.get_submodule(c) for c in g.consumers]
        snap = Snapshot(mods)
        apply_scale(mods[0], g.kind, mods[1:], s)
        err = output_error(reference, forward(model, batch))
        if not err <= TOLERANCE:
            snap.restore()
            row["scaled"] = False
            skipped.append({"group": g.describe(), "reason": f"its scales ({row['scale_min']:.3g} .. "
                            f"{row['scale_max']:.3g}) move the float output by {err:.2g} (float32 round-off): undone"})


def best_alpha(g: Any, alphas: list[float], scales: Callable[[float], torch.Tensor],
               before: float) -> tuple[torch.Tensor | None, dict]:
    """Search ``alphas`` for the group ``g``: the scales ``scales(α)`` with the smallest output error of
    the group quantized as the config says, or no migration (``None``) when none beats ``before``."""
    best: tuple[float, float | None, torch.Tensor | None] = (before, None, None)
    for alpha in alphas:
        s = scales(alpha)
        err = group_error(g.configs, g.x, g.weights, s)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], {"alpha": best[1], "error_before": before, "error_after": best[0]}

