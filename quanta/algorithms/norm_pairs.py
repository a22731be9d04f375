"""Find, on real activations, the groups whose Linears' inputs can be rescaled per channel without
changing what a float model computes: ``norm → Linear(s)`` and ``Linear → Linear``.

What is recognised (`find_groups`):

- a **norm group**: a module holding a 1-D per-channel ``weight`` (and optionally a 1-D ``bias``)
  and nothing else with parameters — ``nn.LayerNorm``, ``nn.RMSNorm``, HF ``LlamaRMSNorm``,
  ``T5LayerNorm``-style classes, whatever its name — whose output tensor is, on every calibration
  call, the very tensor object some Linears (or transformers' ``Conv1D``) receive as input: all those
  Linears form the group and share one scale (Llama: ``input_layernorm`` → ``q/k/v_proj``,
  ``post_attention_layernorm`` → ``gate/up_proj``; GPT-2: ``ln_1`` → ``attn.c_attn``, ``ln_2`` →
  ``mlp.c_fc``; BERT's post-LN ``attention.output.LayerNorm`` → the next layer's ``query/key/value``).
- a **Linear pair** ``A → B``: B's input is A's output tensor itself, or, for A and B under one
  parent or grandparent module with ``A.out == B.in`` and A called before B, B's input depends
  linearly per channel on A's output (attention's ``v_proj → o_proj``: softmax weights mix tokens,
  never channels; SwiGLU's ``up_proj → down_proj``: ``act(gate) · up`` is linear in ``up``).

Found pairings are candidates only. `verify_groups` proves each on a calibration batch: the norm
(or A) is divided and the consumers multiplied by a random per-channel scale, and the model's float
output must stay the same (relative max error ≤ `TOLERANCE`); a norm whose output does not scale
with its weight (``x·(1+w)``, Gemma-style), a norm output that also feeds a residual (BERT's post-LN
layers), a tied consumer weight, ``q_proj → o_proj`` (softmax) — all fail and are skipped with
the reason. Consumers' inputs are never matched by name alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .scale_migration import (
    ConsumerStats,
    Snapshot,
    apply_scale,
    in_features,
    is_consumer,
    out_features,
)

#: relative max error of the float output allowed after an exact rescaling (float32 round-off)
TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class Group:
    """``source`` (a norm, or Linear A) feeds ``consumers``, which share one input scale."""

    source: str
    kind: str  # "norm" | "linear"
    consumers: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.source} → {', '.join(self.consumers)}"


def is_norm_like(module: nn.Module) -> bool:
    """A module whose only parameters are a 1-D ``weight`` (and a 1-D ``bias`` of its size): the
    structure of a norm's per-channel affine. Its forward is proved multiplicative by `verify_groups`."""
    if is_consumer(module) or isinstance(module, nn.Embedding):
        return False
    w = module._parameters.get("weight")
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return False
    b = module._parameters.get("bias")
    if b is not None and (b.dim() != 1 or b.shape != w.shape):
        return False
    return all(n in ("weight", "bias") for n, _ in module.named_parameters())


@torch.no_grad()
def capture_groups(model: nn.Module, batches: list, forward: Callable[[nn.Module, Any], Any],
                   max_rows: int) -> tuple[list[Group], dict[str, ConsumerStats]]:
    """One pass over ``batches``: which Linears take a norm's (or another Linear's) output as their
    input on every call, and per Linear input statistics (`ConsumerStats`, ``max_rows`` sampled rows)."""
    names = {m: n for n, m in model.named_modules()}
    norms = {m for m in names if is_norm_like(m)}
    consumers = {m for m in names if is_consumer(m)}
    live: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (producer, output), one batch
    sampled: dict[int, tuple[str, torch.Tensor]] = {}  # id(input) -> (the consumer holding its statistics, input)
    fed_by: dict[str, set[str | None]] = {}
    order: list[str] = []
    stats: dict[str, ConsumerStats] = {}
    gen = torch.Generator().manual_seed(0)

    def norm_hook(mod: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            live[id(out)] = (names[mod], out)

    def linear_hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        name = names[mod]
        x = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else None
        if x is None or x.shape[-1] != in_features(mod):
            fed_by.setdefault(name, set()).add("?")
            return
        src = live.get(id(x))
        fed_by.setdefault(name, set()).add(src[0] if src is not None and src[1] is x else None)
        if name not in stats:
            order.append(name)
            stats[name] = ConsumerStats(x.shape[-1])
        rows = x.detach().reshape(-1, x.shape[-1])
        first = sampled.get(id(x))
        if first is not None and first[1] is x:  # q/k/v share one input: its statistics are kept once
            stats[name].rows += rows.shape[0]
            stats[name].holder = first[0]
        else:
            sampled[id(x)] = (name, x)
            stats[name].add(rows, max_rows, gen)
        if isinstance(out, torch.Tensor):
            live[id(out)] = (name, out)

    handles = [m.register_forward_hook(norm_hook) for m in norms]
    handles += [m.register_forward_hook(linear_hook, with_kwargs=True) for m in consumers]
    try:
        for batch in batches:
            forward(model, batch)
            live.clear()
            sampled.clear()
    finally:
        for h in handles:
            h.remove()
    by_source: dict[str, list[str]] = {}
    direct: set[str] = set()
    for name in order:
        srcs = fed_by.get(name, set())
        if len(srcs) == 1 and None not in srcs and "?" not in srcs:
            (src,) = srcs
            by_source.setdefault(src, []).append(name)
            direct.add(name)
    groups = [Group(src, "norm" if src not in stats else "linear", tuple(cs)) for src, cs in by_source.items()]
    groups += _structural_pairs(model, order, direct, {g.source for g in groups if g.kind == "linear"})
    return groups, stats


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _structural_pairs(model: nn.Module, order: list[str], taken: set[str], sources: set[str]) -> list[Group]:
    """Candidate ``A → B`` pairs among Linears under one parent or grandparent (see the module doc)."""
    out = []
    for j, b in enumerate(order):
        if b in taken:
            continue
        for a in order[:j]:
            if a in sources:
                continue
            near = _parent(a) == _parent(b) or (_parent(_parent(a)) == _parent(_parent(b)) != "")
            if near and out_features(model.get_submodule(a)) == in_features(model.get_submodule(b)):
                out.append(Group(a, "linear", (b,)))
    return out


def _tensors(out: Any) -> list[torch.Tensor]:
    """The float tensors of a model output (nested tuples / mappings / HF ModelOutput); the KV cache
    (``past_key_values``), which a Linear pair rescales internally, is left out."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for k, v in out.items() if k != "past_key_values" for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def output_error(reference: list[torch.Tensor], out: Any) -> float:
    """Largest relative max-abs difference between ``out``'s tensors and ``reference``'s."""
    now = _tensors(out)
    if len(now) != len(reference) or any(a.shape != b.shape for a, b in zip(now, reference)):
        return float("inf")
    worst = 0.0
    for a, b in zip(now, reference):
        scale = float(b.abs().max()) or 1.0
        worst = max(worst, float((a.double() - b.double()).abs().max()) / scale)
    return worst


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    seen: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = mod._parameters.get("weight")
        if isinstance(w, torch.Tensor):
            seen.setdefault(id(w), []).append(name)
    return seen


@torch.no_grad()
def _norm_scales_exactly(norm: nn.Module, x: torch.Tensor, s: torch.Tensor) -> bool:
    y0 = norm(x)
    snap = Snapshot([norm])
    try:
        apply_scale(norm, "norm", [], s)
        y1 = norm(x)
    finally:
        snap.restore()
    if not isinstance(y0, torch.Tensor) or y0.shape[-1] != s.numel():
        return False
    ref = (y0.double() / s.to(y0.device)).float()
    return float((y1 - ref).abs().max()) <= TOLERANCE * (float(ref.abs().max()) or 1.0)


@torch.no_grad()
def verify_groups(model: nn.Module, groups: list[Group], batch: Any,
                  forward: Callable[[nn.Module, Any], Any]) -> tuple[list[Group], list[dict]]:
    """The groups whose random per-channel rescaling leaves ``model``'s float output on ``batch``
    unchanged, and a ``{"group", "reason"}`` row for each other one. The model is left as it was."""
    reference = _tensors(forward(model, batch))
    if not reference:
        raise ValueError("the model's output holds no float tensor to check scale migration against")
    shared = _shared_weights(model)
    norm_inputs = _first_inputs(model, [g.source for g in groups if g.kind == "norm"], batch, forward)
    gen = torch.Generator().manual_seed(1)
    ok, skipped = [], []
    claimed: set[str] = set()
    for g in groups:
        src = model.get_submodule(g.source)
        mods = [model.get_submodule(c) for c in g.consumers]
        width = in_features(mods[0])
        reason = None
        if any(c in claimed for c in g.consumers):
            reason = "a consumer already belongs to a verified group"
        elif any(in_features(m) != width for m in mods):
            reason = "its Linears take inputs of different widths"
        elif g.kind == "norm" and src.weight.numel() != width:
            reason = f"the norm has {src.weight.numel()} channels, its Linears take {width}"
        tied = [n for m in mods for n in shared.get(id(m.weight), []) if len(shared[id(m.weight)]) > 1]
        if reason is None and tied:
            reason = f"a Linear's weight is shared ({', '.join(sorted(set(tied)))}): rescaling it would change the others"
        s = torch.exp(torch.empty(width, dtype=torch.float64).uniform_(-0.7, 0.7, generator=gen))
        if reason is None and g.kind == "norm":
            x = norm_inputs.get(g.source)
            if x is None or not _norm_scales_exactly(src, x, s):
                reason = f"{type(src).__name__}'s output does not scale with its weight per channel"
        if reason is None:
            snap = Snapshot([src, *mods])
            try:
                apply_scale(src, g.kind, mods, s)
                err = output_error(reference, forward(model, batch))
            finally:
                snap.restore()
            if not err <= TOLERANCE:
                what = "the norm's" if g.kind == "norm" else f"{g.source}'s"
                reason = (f"rescaling changes the model's float output (relative error {err:.2g}): {what} output "
                          "reaches more than these Linears, or not linearly per channel")
        if reason is None:
            ok.append(g)
            claimed.update(g.consumers)
        else:
            skipped.append({"group": g.describe(), "reason": reason})
    return ok, skipped


@torch.no_grad()
def _first_inputs(model: nn.Module, names: list[str], batch: Any,
                  forward: Callable[[nn.Module, Any], Any]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
            if name not in seen and len(args) == 1 and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen
