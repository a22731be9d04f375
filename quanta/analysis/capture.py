"""Record what each named module of a model returns for a batch (forward hooks).

`capture_outputs` hooks every module whose name is wanted, runs one forward pass per batch and
returns ``{name: [output of each call, ...]}`` as float tensors: the first tensor of a tuple or
list output (an ``nn.LSTM``'s ``output``, an attention's ``attn_output``), uint8 codes an integer
conv hands to the next one put back on their grid (``(q - zero_point) · scale``), copied so that
a later in-place op (``nn.ReLU(inplace=True)``) cannot change them. The hooks and the eval mode
are quanta's one capture utility (`quanta.transforms.capture`: `hooked`, `evaluating`): hooks
removed and every module's train/eval mode restored in ``finally``, whatever the forward pass
raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from ..nn.tensor_quantizer import TensorQuantizer
from ..transforms.calibrate import default_forward
from ..transforms.capture import ForwardFn, evaluating, hooked


class Captured(NamedTuple):
    outputs: dict[str, list[torch.Tensor]]  # module name → its output per call
    inputs: dict[str, list[torch.Tensor]]  # module name → its first input per call (if asked)
    final: list[torch.Tensor]  # the model's output per batch
    aliases: dict[str, str]  # module name → the hooked module whose very output tensor it returned
    unknown_codes: set[str]  # modules that returned integer codes of no known grid (not recorded)


def first_tensor(out: Any) -> torch.Tensor | None:
    """``out`` itself if a tensor, else the first tensor in a tuple / list (nested), else None."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def as_float(mod: nn.Module, t: torch.Tensor, role: str = "output") -> torch.Tensor:
    """A detached float32 copy of the value ``t`` stands for: uint8 codes an integer conv emits
    (``role="output"``) or takes (``role="input"``) put back on their grid."""
    t = t.detach()
    if t.dtype == torch.uint8 and role == "output" and getattr(mod, "output_kind", "float") == "uint8":
        return (t.float() - float(mod.emit_zero_point)) * float(mod.emit_scale)
    if t.dtype == torch.uint8 and role == "input" and hasattr(mod, "input_scale"):
        return (t.float() - float(mod.input_zero_point)) * float(mod.input_scale)
    if not t.is_floating_point():  # (token ids going into an embedding stay ids)
        return t.float() if role == "output" else t.clone()
    return t.float().clone()


def default_names(model: nn.Module) -> list[str]:
    """Every named module but the root and the quantizers (which belong to their layer)."""
    return [n for n, m in model.named_modules() if n and not isinstance(m, TensorQuantizer)]


def batches_of(data: Any) -> list[Any]:
    """``data`` as a list of batches: one tensor (or dict) is one batch; a tuple ``(inputs,
    targets)`` of tensors is one batch; any other iterable (a DataLoader, a list) is its batches."""
    if isinstance(data, (torch.Tensor, dict)):
        return [data]
    if isinstance(data, tuple) and data and all(isinstance(d, torch.Tensor) for d in data):
        return [data]
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a batch (tensor, dict) or an iterable of batches, got {type(data).__name__}")
    out = list(data)
    if not out:
        raise ValueError("data is empty: no batch was produced")
    return out


def capture_outputs(model: nn.Module, data: Any, names: Iterable[str] | None = None, *,
                    forward_fn: ForwardFn | None = None, inputs: bool = False) -> Captured:
    """Run ``model`` (in eval mode, without gradients) on each batch of ``data``; return the
    outputs of the modules named in ``names`` (default: `default_names`), one entry per call,
    their input (with ``inputs=True``, for modules called with one tensor; else empty lists),
    the model's own output (first tensor) per batch, and which module returned another's output
    tensor itself (``aliases``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture_outputs expects an nn.Module, got {type(model).__name__}")
    forward = forward_fn or default_forward
    modules = dict(model.named_modules())
    wanted = default_names(model) if names is None else list(names)
    missing = [n for n in wanted if n not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no module named {missing[0]!r}")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    seen_in: dict[str, list[torch.Tensor]] = {n: [] for n in wanted}
    # Which hooked module first returned each tensor object (a container, an Identity, return
    # their child's output itself): its grid gives the meaning of uint8 codes passed on.
    owner: dict[int, tuple[torch.Tensor, str]] = {}
    aliases: dict[str, str] = {}
    unknown: set[str] = set()

    def record(name: str, mod: nn.Module, inp: tuple, kwargs: dict, out: Any) -> None:
        t = first_tensor(out)
        if t is None:
            return
        held = owner.get(id(t))
        if held is not None and held[0] is t:
            aliases[name] = held[1]
        else:
            owner[id(t)] = (t, name)
        producer = modules[aliases.get(name, name)]
        if t.dtype == torch.uint8 and getattr(producer, "output_kind", "float") != "uint8":
            unknown.add(name)
            return
        seen[name].append(as_float(producer, t))
        if inputs and len(inp) == 1 and isinstance(inp[0], torch.Tensor) \
                and (inp[0].dtype != torch.uint8 or hasattr(mod, "input_scale")):
            seen_in[name].append(as_float(mod, inp[0], "input"))

    finals: list[torch.Tensor] = []
    with hooked({n: modules[n] for n in wanted}, record), evaluating(model), torch.no_grad():
        for batch in batches_of(data):
            owner.clear()
            out = first_tensor(forward(model, batch))
            if out is not None:
                finals.append(out.detach().float().clone())
    return Captured(seen, seen_in, finals, aliases, unknown)
