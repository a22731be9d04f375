"""`compare`: run a float model and its quantized version on the same data and measure, layer by
layer (modules matched by name), how far each output is from the float one.

Each row gives SQNR (dB), cosine, relative L2 error and max abs error of the layer's output
(`quanta.analysis.metrics`), and ``local_sqnr_db``: the SQNR of the layer's output against the
first model's layer run on the very input the second model's layer got, i.e. the error this
layer *adds*; it ranks the layer that loses accuracy above the layers after it that only pass
its error on (`CompareReport.ranked`). (A simulated layer's hook sees its input before its input
quantizer, so that quantization counts as its own; an integer conv fed uint8 codes by the conv
before it got them already rounded to its grid, so there that rounding counts as the producer's.)

What the conversion changes in a model's structure is taken into account, not hidden:

- BatchNorm folded into the preceding conv (``quanta.prepare``): when the quantized model has an
  ``Identity`` where the float one has a BatchNorm, the reference is a copy of the float model
  with BatchNorm folded the same way (the float model itself is not touched);
- an activation fused into an integer layer (``post_op="relu"``, or the float ``Sequential(layer,
  ReLU)`` the speed check keeps): the activation is applied to the other side's output;
- ``convert`` puts an integer module in the place of a container that only wrapped it
  (``features.0.0`` -> ``features.0``): the container's output is compared with it, and the
  names with no counterpart are listed in ``unmatched`` with the reason, never skipped silently.

``separate=True`` (a simulated model: quantizers to toggle) adds the SQNR with only the weight
quantizers on, and with only the activation quantizers on.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..integer.base import IntegerModule
from ..nn.modules.base import QuantModule
from ..nn.modules.functional import QuantOp
from ..transforms.fold_bn import fold_batchnorm
from .capture import (
    Captured,
    ForwardFn,
    batches_of,
    capture_outputs,
    default_names,
    first_tensor,
)
from .metrics import ErrorStats
from .toggles import quant_layers, quantizing_only

OUTPUT = "(output)"
_POST_OPS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU)


@dataclass(frozen=True)
class LayerError:
    name: str
    kind_a: str  # class of the module in the reference (first) model
    kind_b: str  # class of the module in the compared (second) model
    sqnr_db: float
    cosine: float
    rel_error: float
    max_abs_error: float
    local_sqnr_db: float = math.inf  # error this layer adds to its input's (see the module docstring)
    sqnr_weights_only_db: float | None = None  # separate=True: only weight quantizers on
    sqnr_activations_only_db: float | None = None  # separate=True: only activation quantizers on
    note: str = ""
    quantized: bool = False  # a side's module is a quantized (simulated or integer) layer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompareReport:
    labels: tuple[str, str]
    rows: list[LayerError]
    unmatched_a: dict[str, str] = field(default_factory=dict)  # name only in the first model → why
    unmatched_b: dict[str, str] = field(default_factory=dict)  # name only in the second model → why
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> LayerError:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row named {name!r}")

    def ranked(self) -> list[LayerError]:
        """Quantized layers, the one that adds the most error first (lowest ``local_sqnr_db``;
        rows without one last, by their ``sqnr_db``)."""
        def key(r: LayerError) -> tuple[bool, float, float]:
            return (math.isnan(r.local_sqnr_db), 0.0 if math.isnan(r.local_sqnr_db) else r.local_sqnr_db, r.sqnr_db)
        return sorted((r for r in self.rows if r.quantized), key=key)

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "rows": [r.to_dict() for r in self.rows],
                "unmatched_a": dict(self.unmatched_a), "unmatched_b": dict(self.unmatched_b), "notes": list(self.notes)}

    def __str__(self) -> str:
        sep = any(r.sqnr_weights_only_db is not None for r in self.rows)
        head = ["layer", self.labels[0], self.labels[1], "SQNR dB", "local dB", "cosine", "rel err", "max abs"]
        head += ["W-only dB", "A-only dB"] if sep else []
        lines = [head]
        for r in self.rows:
            cells = [r.name, r.kind_a, r.kind_b, _num(r.sqnr_db, 1), _num(r.local_sqnr_db, 1), _num(r.cosine, 5),
                     _num(r.rel_error, 4), _num(r.max_abs_error, 4)]
            cells += [_num(r.sqnr_weights_only_db, 1), _num(r.sqnr_activations_only_db, 1)] if sep else []
            lines.append(cells + ([r.note] if r.note else []))
        widths = [max(len(c[i]) for c in lines if i < len(c)) for i in range(len(head))]
        out = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() + ("  " + cells[-1] if len(cells) > len(head) else "")
               for cells in lines]
        out.insert(1, "-" * len(out[0]))
        for side, names in ((self.labels[0], self.unmatched_a), (self.labels[1], self.unmatched_b)):
            for n, why in names.items():
                out.append(f"only in {side}: {n} ({why})")
        out += self.notes
        return "\n".join(out)


def _num(v: float | None, digits: int) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if math.isfinite(v) else str(v)


def fused_activation(mod: nn.Module) -> nn.Module | None:
    """The activation ``mod`` applies after its own op, fused by convert: an integer layer's
    ``post_op``, or the trailing activation of the float ``Sequential(layer, act)`` the speed
    check keeps in place of an integer layer."""
    post = getattr(mod, "post_op", "none")
    if isinstance(post, str) and post in _POST_OPS:
        return _POST_OPS[post]()
    if type(mod) is nn.Sequential and len(mod) == 2 and isinstance(mod[1], _ACTIVATIONS) \
            and not isinstance(mod[0], (_ACTIVATIONS, nn.Sequential)):
        return mod[1]
    return None


def _kind(mod: nn.Module) -> str:
    return type(mod).__name__


def _reference(model_a: nn.Module, model_b: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model_a``, or a copy with BatchNorm folded where ``model_b`` has an Identity for it."""
    mods_b = dict(model_b.named_modules())
    if any(isinstance(m, _BatchNorm) and type(mods_b.get(n)) is nn.Identity for n, m in model_a.named_modules()):
        folded = copy.deepcopy(model_a)
        pairs = fold_batchnorm(folded)
        return folded, [f"reference: a copy of the first model with BatchNorm folded ({len(pairs)} pairs), as quanta.prepare does"]
    return model_a, []


def _unmatched_reason(name: str, own: dict[str, nn.Module], other: dict[str, nn.Module]) -> str:
    parent = name.rpartition(".")[0]
    while parent and parent not in other:
        parent = parent.rpartition(".")[0]
    if parent and isinstance(other[parent], IntegerModule):
        return f"inside {parent!r}, which convert lowered into one integer module; compared as {parent!r}"
    if parent and type(own.get(parent)) is nn.Sequential and fused_activation(own[parent]) is not None:
        return f"part of {parent!r} (a float layer kept by the speed check with its activation); compared as {parent!r}"
    if parent and isinstance(own.get(parent), (IntegerModule, QuantModule, QuantOp)):
        return f"internal to {parent!r}; compared as {parent!r}"
    return "no module of that name in the other model"


_QUANTIZED = (QuantModule, QuantOp, IntegerModule)


def _nan_row(name: str, kinds: tuple[str, str], note: str, quantized: bool) -> LayerError:
    return LayerError(name, *kinds, math.nan, math.nan, math.nan, math.nan, math.nan, note=note, quantized=quantized)


def _local_sqnr(ma: nn.Module, inputs_b: list[torch.Tensor], outs_b: list[torch.Tensor], act: nn.Module | None) -> float:
    """SQNR of the second model's outputs against the first model's module run on the very
    inputs the second one got (the error this layer adds); NaN where that cannot run."""
    if not inputs_b or len(inputs_b) != len(outs_b):
        return math.nan
    modes = [(m, m.training) for m in ma.modules()]
    stats = ErrorStats()
    try:
        ma.eval()
        with torch.no_grad():
            for x, yb in zip(inputs_b, outs_b):
                ya = first_tensor(ma(x))
                if ya is None:
                    return math.nan
                stats.add(ya.float() if act is None else act(ya.float()), yb)
    except (RuntimeError, ValueError, TypeError):
        return math.nan
    finally:
        for m, mode in modes:
            m.training = mode
    return stats.sqnr_db


def _layer_row(name: str, mods_a: dict[str, nn.Module], mods_b: dict[str, nn.Module], a: Captured,
               b: Captured, local: bool = True) -> LayerError:
    ma, mb = mods_a[name], mods_b[name]
    outs_a, outs_b = a.outputs.get(name, []), b.outputs.get(name, [])
    kinds = (_kind(ma), _kind(mb))
    quantized = isinstance(ma, _QUANTIZED) or isinstance(mb, _QUANTIZED)
    for side, cap in (("first", a), ("second", b)):
        if name in cap.unknown_codes:
            return _nan_row(name, kinds, f"not compared: the {side} model returns integer codes of no known grid here", quantized)
    if not outs_a and not outs_b:
        return _nan_row(name, kinds, "not compared: never called as a module (its parent uses its weights directly)", quantized)
    if not outs_a or not outs_b:  # e.g. torch's MultiheadAttention reads out_proj's weights; the integer one calls it
        side = "first" if not outs_a else "second"
        return _nan_row(name, kinds, f"not compared: never called as a module in the {side} model (its parent "
                                     "uses its weights directly)", quantized)
    if len(outs_a) != len(outs_b):
        return _nan_row(name, kinds, f"not compared: called {len(outs_a)} vs {len(outs_b)} times", quantized)
    # the activation each side applies here: its own fused one, or that of the module whose
    # output it passes on (an Identity left where convert fused the activation)
    act_a = fused_activation(mods_a[a.aliases.get(name, name)])
    act_b = fused_activation(mods_b[b.aliases.get(name, name)])
    note, fuse_b = "", None
    if act_b is not None and act_a is None:
        fuse_b = act_b
        outs_a = [act_b(t) for t in outs_a]
        if name not in b.aliases:  # (said once, on the layer that fused it)
            note = f"{type(act_b).__name__} fused in the second model: applied to the first's output"
    elif act_a is not None and act_b is None:
        outs_b = [act_a(t) for t in outs_b]
        if name not in a.aliases:
            note = f"{type(act_a).__name__} fused in the first model: applied to the second's output"
    out = ErrorStats()
    try:
        for ra, rb in zip(outs_a, outs_b):
            out.add(ra, rb)
    except ValueError as e:
        return _nan_row(name, kinds, f"not compared: {e}", quantized)
    local_db = _local_sqnr(ma, b.inputs.get(name, []), outs_b, fuse_b) if local and type(mb) is not nn.Identity \
        else math.inf
    return LayerError(name, *kinds, out.sqnr_db, out.cosine, out.rel_error, out.max_abs, local_db, note=note,
                      quantized=quantized)


def _output_row(a: Captured, b: Captured) -> LayerError:
    stats = ErrorStats()
    for ra, rb in zip(a.final, b.final):
        stats.add(ra, rb)
    return LayerError(OUTPUT, "model", "model", stats.sqnr_db, stats.cosine, stats.rel_error, stats.max_abs)


def compare(float_model: nn.Module, quant_model: nn.Module, data: Any, *, forward_fn: ForwardFn | None = None,
            separate: bool = False, labels: tuple[str, str] = ("float", "quantized")) -> CompareReport:
    """Compare ``quant_model`` (simulated or integer; or any model with the same module names)
    with ``float_model`` (or any reference, e.g. the simulated model against its integer
    conversion) on ``data`` (a batch or an iterable of batches, fed as `quanta.calibrate` does,
    or by ``forward_fn(model, batch)``). Neither model is modified. See the module docstring."""
    for who, m in (("float_model", float_model), ("quant_model", quant_model)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"compare: {who} must be an nn.Module, got {type(m).__name__}")
    batches = batches_of(data)
    reference, notes = _reference(float_model, quant_model)
    mods_a, mods_b = dict(reference.named_modules()), dict(quant_model.named_modules())
    names_a, names_b = default_names(reference), default_names(quant_model)
    shared = [n for n in names_a if n in set(names_b)]
    a = capture_outputs(reference, batches, shared, forward_fn=forward_fn, inputs=True)
    b = capture_outputs(quant_model, batches, shared, forward_fn=forward_fn, inputs=True)
    rows = [_layer_row(n, mods_a, mods_b, a, b) for n in shared]
    rows.append(_output_row(a, b))
    if separate:
        rows = _separate(reference, quant_model, batches, shared, rows, a, forward_fn)
    only_a = {n: _unmatched_reason(n, mods_a, mods_b) for n in names_a if n not in mods_b}
    only_b = {n: _unmatched_reason(n, mods_b, mods_a) for n in names_b if n not in mods_a}
    return CompareReport(labels, rows, only_a, only_b, notes)


def _separate(reference: nn.Module, sim: nn.Module, batches: list[Any], shared: list[str], rows: list[LayerError],
              a: Captured, forward_fn: ForwardFn | None) -> list[LayerError]:
    if not quant_layers(sim):
        raise ValueError("compare(separate=True) needs a simulated model (quanta.prepare + calibrate) whose "
                         "quantizers it can switch; this model has no enabled quantizer")
    mods_a, mods_b = dict(reference.named_modules()), dict(sim.named_modules())
    alone = {}
    for what in ("weights", "activations"):
        with quantizing_only(sim, None, what):
            b = capture_outputs(sim, batches, shared, forward_fn=forward_fn, inputs=True)
        alone[what] = {n: _layer_row(n, mods_a, mods_b, a, b, local=False).sqnr_db for n in shared}
        alone[what][OUTPUT] = _output_row(a, b).sqnr_db
    return [LayerError(**{**r.to_dict(), "sqnr_weights_only_db": alone["weights"][r.name],
                          "sqnr_activations_only_db": alone["activations"][r.name]}) for r in rows]
