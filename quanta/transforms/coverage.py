"""`coverage`: which modules of a prepared model are quantized, excluded, or float."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..integer.base import IntegerModule
from ..kernels.attention_float import available as attention_available
from ..nn.modules.base import QuantModule
from ..nn.modules.functional import QuantOp
from ..nn.modules.fused import FusedActivation
from ..nn.modules.fused_attention import ScaledDotProductAttention
from ..nn.tensor_quantizer import TensorQuantizer
from .decisions import DECISIONS_ATTR, UNSUPPORTED
from .float_dtype import FLOAT_DTYPES, float_dtype_of
from .residual_adds import FLOAT_ADDS
from .speed_check import kept_float

_DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


@dataclass(frozen=True)
class CoverageEntry:
    name: str
    type: str
    status: str  # "integer" | "quantized" (simulated) | "fused" (into an integer kernel) | "excluded" | "float"
    detail: str


@dataclass(frozen=True)
class CoverageReport:
    entries: tuple[CoverageEntry, ...]

    def by_status(self, status: str) -> list[CoverageEntry]:
        return [e for e in self.entries if e.status == status]

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(e.status for e in self.entries)
        return {k: c.get(k, 0) for k in ("integer", "quantized", "fused", "excluded", "float")}

    def __str__(self) -> str:
        w = max([len(e.name) for e in self.entries] + [6])
        t = max([len(e.type) for e in self.entries] + [4])
        lines = [f"{'module':<{w}}  {'type':<{t}}  {'status':<9}  detail", "-" * (w + t + 30)]
        lines += [f"{e.name or '(root)':<{w}}  {e.type:<{t}}  {e.status:<9}  {e.detail}" for e in self.entries]
        c = self.counts
        floats = Counter(e.type for e in self.by_status("float"))
        kinds = ", ".join(f"{k}×{v}" for k, v in floats.most_common())
        head = f"{c['integer']} integer, " if c["integer"] else ""
        head += f"{c['fused']} activation(s) fused into them, " if c["fused"] else ""
        slower = sum(1 for e in self.by_status("float") if e.detail.startswith("integer kernel slower"))
        why = "no quantized version" + (f" or slower in integer ({slower})" if slower else "")
        lines.append(f"{head}{c['quantized']} quantized, {c['excluded']} excluded by rule, "
                     f"{c['float']} float ({why}{': ' + kinds if kinds else ''})")
        return "\n".join(lines)


def _describe(mod: nn.Module) -> str:
    parts = []
    for kind, q in mod.quantizers():  # type: ignore[attr-defined]
        state = str(q.spec) if q.is_enabled else "off"
        parts.append(f"{kind}: {state}")
    return "; ".join(parts) if parts else "no quantizers"


def _module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def coverage(model: nn.Module) -> CoverageReport:
    """List every module: quantized (with its quantizers), excluded by a rule, or float
    because nothing quantizes its type. Unsupported modules are never an error."""
    decisions: dict[str, str] = getattr(model, DECISIONS_ATTR, {})
    kept = {k.name: k.reason for k in kept_float(model)}
    entries: list[CoverageEntry] = []
    skip: list[str] = []
    for name, mod in model.named_modules():
        quantized = isinstance(mod, (QuantModule, QuantOp, IntegerModule))
        if (not name and not quantized) or isinstance(mod, TensorQuantizer):
            continue  # the root is listed only when it is itself a quantized layer (name "")
        if not quantized and any(name.startswith(s + ".") for s in skip):
            continue  # inside an excluded module (but a more specific rule may quantize some)
        tname = type(mod).__name__
        if isinstance(mod, FusedActivation):
            into = _module_or_none(model, mod.into)
            if isinstance(into, IntegerModule):
                entries.append(CoverageEntry(name, mod.activation or tname, "fused",
                                             f"applied by {mod.into!r} ({type(into).__name__}) in its kernel"))
            else:  # the speed check put the producer's float twin back, which applies it again
                entries.append(CoverageEntry(name, mod.activation or tname, "float",
                                             f"applied by {mod.into!r} (kept float)"))
        elif isinstance(mod, IntegerModule):
            ran = ", ".join(f"{k}×{v}" for k, v in mod.kernel_counts.most_common()) or "not run yet"
            entries.append(CoverageEntry(name or "(root)", tname, "integer", f"{mod.extra_repr()}; kernels: {ran}"))
        elif isinstance(mod, QuantOp) and decisions.get(name) == f"type:{tname}" and not any(True for _ in mod.quantizers()):
            # an op its quantized parent made, switched off by type (the presets' attention_matmuls=False)
            entries.append(CoverageEntry(name, tname, "excluded", f"type:{tname} mapped to None: computes in float"))
        elif quantized:
            entries.append(CoverageEntry(name, tname, "quantized", _describe(mod)))
        elif isinstance(mod, ScaledDotProductAttention):
            entries.append(CoverageEntry(name, tname, "float", f"the forward's attention as one call ({mod.extra_repr()})"
                                         f"; float kernel: {'native' if attention_available() else 'torch ops'}"))
        elif name in kept:
            entries.append(CoverageEntry(name, tname, "float", kept[name]))
        elif decisions.get(name, "").startswith((UNSUPPORTED, FLOAT_ADDS)):  # (FLOAT_ADDS: a block, not a leaf)
            entries.append(CoverageEntry(name, tname, "float", decisions[name]))
        elif name in decisions and decisions[name].startswith(("exclude", "rule", "type")):
            entries.append(CoverageEntry(name, tname, "excluded", decisions[name]))
            skip.append(name)
        elif not any(True for _ in mod.children()) and not isinstance(mod, _CONTAINERS):
            # (an empty container, e.g. a quantized LSTM's unused proj_quantizers, is no layer)
            entries.append(CoverageEntry(name, tname, "float", f"no quantized {tname}"))
    dtype = float_dtype_of(model)
    if dtype != torch.float32:  # `run_float_work_in`: say which layers compute in it
        said = {"float": f"computes in {_DTYPE_NAMES[dtype]}", "excluded": f"computes in {_DTYPE_NAMES[dtype]}",
                "integer": f"{_DTYPE_NAMES[dtype]} in and out"}
        entries = [replace(e, detail=f"{e.detail}; {said[e.status]}") if e.status in said else e for e in entries]
    return CoverageReport(tuple(entries))
