"""Give the user's float container back where quanta's wrapper keeps nothing integer inside it.

The presets swap ``nn.TransformerEncoderLayer`` for `QuantTransformerEncoderLayer` so that its
Linear layers can be quantized and torch's fused inference fast path (which reads their float
weights directly) stays out of the way. When the speed check then keeps every Linear and the
attention of such a layer float (int8 slower on this machine), or rules exclude them, the wrapper
is all that is left: it computes the float layer through the *unfused* path, slower than the
user's own float layer (issue 25: 0.85x fp32 on a speech encoder on an AVX2 CPU).

`restore_float` puts the user's float class back in the place of every quantized container (a
`QuantModule` that wraps other layers: `QuantTransformerEncoderLayer`, a simulated
`QuantMultiheadAttention` left with nothing quantized, a user-registered container) when nothing
inside it runs integer, nothing is fused, and its only quantizers are the ones the wrapper itself
added (its own input/output quantizers and its quantized ops such as the residual ``sa_add`` /
``ff_add``). Those simulated ops quantize in float between float layers: without them the layer
computes the float model's output exactly, on torch's fast path. A container with an integer or
a simulated layer inside (a Linear the user asked to simulate) is left as it is: torch's fused
forward would bypass that layer. The float container shares the original weights and keeps the
hooks registered on the layer; the conversion report (and so `quanta.kept_float` and `coverage`)
says ``kept float: nothing inside runs integer on this machine``.

A float ``nn.MultiheadAttention`` never calls its ``out_proj`` as a module (its forward reads
``out_proj.weight``): a simulated ``out_proj`` left under a float attention (the speed check's
float twin of an integer attention holds the simulated one) computes nothing, so it is put back
to its float class too (the file then records the user's class).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from torch import nn

from ..nn.modules.base import QuantModule, _only_quantizers
from ..nn.modules.functional import QuantOp
from ..nn.modules.fused import FusedActivation
from ..nn.tensor_quantizer import TensorQuantizer
from .decisions import REPORT_ATTR

_log = logging.getLogger(__name__)

#: the conversion report's detail for a container given back in float (followed by what was dropped)
KEPT_FLOAT_DETAIL = "kept float: nothing inside runs integer on this machine"


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _runs_mha_forward(module: nn.Module) -> bool:
    """A float attention whose forward is torch's own (it reads ``out_proj``'s weights directly)."""
    return (isinstance(module, nn.MultiheadAttention) and not isinstance(module, QuantModule)
            and type(module).forward is nn.MultiheadAttention.forward)


def _restore_dead_out_projs(model: nn.Module) -> None:
    """A simulated ``out_proj`` under a float ``nn.MultiheadAttention`` (never called) → its float class."""
    for mod in list(model.modules()):
        out = getattr(mod, "out_proj", None) if _runs_mha_forward(mod) else None
        if isinstance(out, QuantModule) and all(_only_quantizers(c) for c in out.children()):
            mod.out_proj = out.to_float()


def _wraps_layers(module: nn.Module) -> bool:
    """A quantized container: a `QuantModule` with a child that is a layer (not only quantizers)."""
    return isinstance(module, QuantModule) and not getattr(module, "is_integer_module", False) and \
        any(not _only_quantizers(c) for c in module.children())


def _dropped_or_blocker(module: nn.Module) -> tuple[list[str], str | None]:
    """``(dropped, blocker)``: the wrapper's own active quantizers and quantized ops (what the float
    class does not have), and the first module inside that keeps the wrapper (integer, fused, or
    simulated), or None."""
    own_ops = {id(c) for c in module.children() if _only_quantizers(c)}
    dropped = [f"{kind} quantizer" for kind, q in module.quantizers() if q.active]  # type: ignore[attr-defined]
    own = {id(q) for _, q in module.quantizers()}  # type: ignore[attr-defined]
    for child_name, child in module.named_children():
        active = any(isinstance(q, TensorQuantizer) and q.active for q in child.modules())
        if id(child) in own_ops and id(child) not in own and active:
            dropped.append(child_name)
    for name, inner in module.named_modules():
        if not name or inner is module:
            continue
        top = module.get_submodule(name.split(".")[0])
        if id(top) in own_ops or id(top) in own:
            continue
        if getattr(inner, "is_integer_module", False):
            return dropped, f"{name} ({type(inner).__name__}) runs integer"
        if isinstance(inner, FusedActivation):
            return dropped, f"{name} is fused into {inner.into!r}"
        if isinstance(inner, (QuantModule, QuantOp)) or (isinstance(inner, TensorQuantizer) and inner.active):
            return dropped, f"{name} ({type(inner).__name__}) is simulated"
    return dropped, None


def restore_float(model: nn.Module) -> nn.Module:
    """Put the user's float container back where a quantized container keeps nothing integer
    inside (see the module docstring); returns the model (a new root when the root itself was
    such a container). Safe on any model: a model without quantized containers is unchanged.
    Runs at the end of `quanta.quantize`; call it after `quanta.convert` too."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"restore_float expects an nn.Module, got {type(model).__name__}")
    _restore_dead_out_projs(model)
    restored: dict[str, tuple[str, str]] = {}  # name -> (the quantized class, the report's detail)
    # deepest first, the root last: an inner container given back in float no longer keeps its outer one
    candidates = [(n, m) for n, m in model.named_modules() if _wraps_layers(m)]
    for name, mod in sorted(candidates, key=lambda item: -(item[0].count(".") + 1 if item[0] else 0)):
        dropped, blocker = _dropped_or_blocker(mod)
        if blocker is not None:
            _log.debug("quanta restore_float: %s stays %s: %s", name or "(root)", type(mod).__name__, blocker)
            continue
        float_layer = mod.to_float()  # type: ignore[attr-defined]  # (shares weights, submodules and hooks)
        if name:
            _set(model, name, float_layer)
        else:
            model = float_layer
        restored[name] = (type(mod).__name__, KEPT_FLOAT_DETAIL + (
            f" (its simulated {', '.join(dropped)} dropped: the float layer computes the float model's "
            "output exactly)" if dropped else ""))
    if restored:
        _report(model, restored)
    return model


def _report(model: nn.Module, restored: dict[str, tuple[str, str]]) -> None:
    """Each restored container's report row says float and why; rows of the wrapper's own ops
    (gone with it) are dropped."""
    rows = list(getattr(model, REPORT_ATTR, []))
    if not rows:
        return
    present = {n for n, _ in model.named_modules()}
    kept, seen = [], set()
    for row in rows:
        key = "" if row.name == "(root)" else row.name
        if key in restored:
            kept.append(replace(row, result="float", detail=restored[key][1]))
            seen.add(key)
        elif key in present or not any(key.startswith(f"{r}.") or not r for r in restored):
            kept.append(row)
    for name in sorted(restored.keys() - seen):
        simulated, detail = restored[name]
        kept.append(replace(rows[0], name=name or "(root)", simulated=simulated, result="float", detail=detail))
    setattr(model, REPORT_ATTR, kept)
