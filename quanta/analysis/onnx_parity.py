"""`compare_onnx`: run a quanta model and its ONNX export (in ONNX Runtime) on the same inputs.

Per model output, and per quantized layer that can be found in the ONNX graph, the report gives
the largest absolute difference, the fraction of elements that are identical (bit-equal float32),
and the largest difference in *quantization steps*. The step of a tensor is, in order:

1. the grid of its output quantizer (quanta's own scale; per token for dynamic ones, computed from
   quanta's tensor), or one bf16 / fp16 ulp for half-precision output casts;
2. for an integer convolution that hands uint8 codes to the next one, that code grid (both sides
   are then compared as codes: ONNX Runtime's float value put on the same grid);
3. otherwise the layer's accumulator unit ``input step × weight scale`` (per output channel, and
   per token for dynamic activations): the smallest change of an integer matmul's result.

A model output takes the step of the quantized layer that returned it; when float operations
follow the last quantized layer, the largest step of that layer's output is used (an estimate,
said so in the report). Layers are found by the module path ``torch.onnx`` records on each node;
their outputs are read from a second session with those values added as graph outputs (a value
that is a graph output cannot be fused away, so layer rows are never taken from the first run;
that session runs without ONNX Runtime's QDQPropagationTransformer, which would put an exposed
value on the next layer's input grid).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..core import Format, choose_qparams, compute_range
from ..integer.base import IntegerModule
from ..io.onnx_export import require_onnx
from ..io.onnx_forms import channel_view as _channel_view
from ..io.onnx_forms import inexact_reason, integer_step
from ..nn.modules.base import QuantModule
from ..nn.modules.functional import QuantBMM, QuantMatMul, QuantOp
from ..nn.tensor_quantizer import TensorQuantizer
from ..transforms.capture import evaluating, hooked

_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class ParityRow:
    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    frac_identical: float
    max_steps: float | None
    step: str
    max_rel_diff: float = 0.0  # max |diff| relative to the largest |value| quanta gives
    note: str = ""  # why this layer cannot be bit-exact in ONNX (see `onnx_forms.inexact_reason`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OnnxParityReport:
    path: str
    outputs: list[ParityRow]
    layers: list[ParityRow] = field(default_factory=list)

    def within(self, steps: float = 1.0, identical: float = 0.99) -> bool:
        """Every output within ``steps`` steps and at least ``identical`` of its elements identical."""
        # steps are float32 differences over float32 scales: one step can read 1.0000004
        return all(r.max_steps is not None and r.max_steps <= steps * (1 + 1e-5) and r.frac_identical >= identical
                   for r in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "outputs": [r.to_dict() for r in self.outputs],
                "layers": [r.to_dict() for r in self.layers]}

    def __str__(self) -> str:
        head = ("", "name", "shape", "max |diff|", "max rel", "identical", "max steps", "step")
        rows = [("output", r) for r in self.outputs] + [("layer", r) for r in self.layers]
        cells = [head] + [(kind, r.name, "x".join(map(str, r.shape)), f"{r.max_abs_diff:.3g}", f"{r.max_rel_diff:.3g}",
                           f"{100 * r.frac_identical:.2f}%", "n/a" if r.max_steps is None else f"{r.max_steps:.3g}",
                           r.step + (f"; {r.note}" if r.note else "")) for kind, r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]
        lines = [f"ONNX Runtime vs quanta: {self.path}"]
        for c in cells:
            lines.append("  ".join(v.ljust(w) for v, w in zip(c[:-1], widths)) + "  " + c[-1])
        return "\n".join(lines)


# ----------------------------------------------------------------------------- steps
def _ulp(a: Any, b: Any, fmt: Format) -> Any:
    """One ulp of ``fmt`` at the larger magnitude of the two values compared, elementwise."""
    import numpy as np

    info = torch.finfo(torch.bfloat16 if fmt is Format.BF16 else torch.float16)
    mag = np.maximum(np.abs(a), np.abs(b)).astype(np.float64)
    e = np.floor(np.log2(np.maximum(mag, info.smallest_normal)))
    return np.exp2(e - (7 if fmt is Format.BF16 else 10))


def _grid_step(spec: Any, y: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor | Format | None:
    if spec.format in (Format.BF16, Format.FP16):
        return spec.format
    if spec.format is not Format.INT:
        return None
    if spec.dynamic:
        return choose_qparams(*compute_range(y.float(), spec), spec)[0]
    return None if scale is None else scale.float()


def _grid_name(spec: Any) -> str:
    return f"one {spec.format.value} ulp (output cast)" if not spec.has_scale else "output quantizer"


def _step(mod: nn.Module, x: Any, y: torch.Tensor) -> tuple[torch.Tensor | Format | None, str]:
    """Step of ``mod``'s output ``y`` (see the module docstring) and where it comes from."""
    oq = getattr(mod, "output_quantizer", None)
    if isinstance(oq, TensorQuantizer) and oq.mode == "quantize":
        s = _grid_step(oq.spec, y, None if oq.spec.dynamic or not oq.spec.has_scale else oq.qparams()[0])
        return s, _grid_name(oq.spec)
    if getattr(mod, "output_spec", None) is not None and getattr(mod, "output_kind", "float") == "float":
        spec = mod.output_spec
        return _grid_step(spec, y, None if spec.dynamic else getattr(mod, "output_scale", None)), _grid_name(spec)
    registered = integer_step(mod, x, y)  # the integer class's own (quanta.io.onnx_forms)
    if registered is not None:
        return registered
    if isinstance(mod, (QuantMatMul, QuantBMM)):
        a, b = mod.input_quantizer, mod.other_quantizer
        if all(q is not None and q.mode == "quantize" and q.spec.format is Format.INT and not q.spec.dynamic
               and q.spec.granularity.value == "per_tensor" for q in (a, b)):
            return a.qparams()[0].float() * b.qparams()[0].float(), "accumulator unit"
    iq, wq = getattr(mod, "input_quantizer", None), getattr(mod, "weight_quantizer", None)
    if isinstance(mod, QuantModule) and iq is not None and wq is not None and iq.is_enabled and wq.is_enabled \
            and iq.spec.format is Format.INT and wq.spec.format is Format.INT and isinstance(x, torch.Tensor) \
            and wq.spec.granularity.value in ("per_tensor", "per_channel") and getattr(mod, "weight", None) is not None:
        xs = iq.qparams(x)[0].float()
        ws = wq.qparams(mod._parameters["weight"])[0].float()  # type: ignore[index]
        dim = -1 if isinstance(mod, nn.Linear) else 1
        return xs * _channel_view(ws, y, dim), "accumulator unit"
    return None, "no step (no output or input grid)"


# ----------------------------------------------------------------------------- comparison
def _row(name: str, a: Any, b: Any, step: torch.Tensor | Format | None, how: str,
         codes: tuple[float, int] | None = None) -> ParityRow:
    import numpy as np

    b = np.asarray(b)
    if codes is not None:  # quanta holds uint8 codes: put ONNX Runtime's float value on that grid
        s, z = codes
        b = (np.clip(np.round(b.astype(np.float32) / np.float32(s)) + z, 0, 255) - z) * np.float32(s)
        a = (a.detach().cpu().numpy().astype(np.float32) - z) * np.float32(s)
    else:
        a = a.detach().float().cpu().numpy()
    if a.shape != b.shape:
        raise ValueError(f"{name}: quanta gives shape {a.shape}, ONNX Runtime {b.shape}")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    steps = None
    if step is not None and diff.size:
        st = _ulp(a, b, step) if isinstance(step, Format) else np.broadcast_to(
            step.detach().double().cpu().numpy(), diff.shape)
        steps = float((diff / st).max())
    peak = float(np.abs(a).max()) if diff.size else 0.0
    rel = float(diff.max()) / peak if peak > 0 else 0.0
    return ParityRow(name, tuple(a.shape), float(diff.max()) if diff.size else 0.0,
                     float((a == b).mean()) if diff.size else 1.0, steps, how, rel)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose outputs get a row: integer modules, quantized ops, quantized weighted layers."""
    def wanted(m: nn.Module) -> bool:
        if isinstance(m, (IntegerModule, QuantOp)):
            return True
        return isinstance(m, QuantModule) and bool(m.weight_names) and not isinstance(m, nn.MultiheadAttention)

    return {n: m for n, m in model.named_modules() if wanted(m)}


_ELEMENTWISE = ("Relu", "Clip", "Identity")


def _layer_values(proto: Any, paths: Sequence[str]) -> dict[str, list[str]]:
    """Candidate ONNX values for each module's output, from the module paths recorded on the
    nodes: the one value leaving the module's nodes, then that value through up to two following
    Relu / Clip (the exporter's optimizer merges a layer's fused ReLU with the model's own ReLU
    module and keeps the latter's node)."""
    graph = proto.graph
    member: dict[str, set[int]] = {p: set() for p in paths}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for v in node.input:
            consumers.setdefault(v, []).append(i)
        meta = {p.key: p.value for p in node.metadata_props}
        if _SCOPES not in meta:
            continue
        for scope in ast.literal_eval(meta[_SCOPES])[:-1]:
            if scope in member:
                member[scope].add(i)
    outputs = {o.name for o in graph.output}
    found = {}
    for path, idx in member.items():
        made = {v for i in idx for v in graph.node[i].output}
        leaving = {v for v in made if v in outputs or any(j not in idx for j in consumers.get(v, ()))}
        if len(leaving) != 1:
            continue
        chain = [next(iter(leaving))]
        for _ in range(2):
            users = consumers.get(chain[-1], [])
            if len(users) != 1 or graph.node[users[0]].op_type not in _ELEMENTWISE:
                break
            chain.append(graph.node[users[0]].output[0])
        found[path] = chain
    return found


def compare_onnx(model: nn.Module, path: str | os.PathLike, inputs: torch.Tensor | Sequence[torch.Tensor], *,
                 layers: bool = True, providers: Sequence[str] | None = None,
                 session_options: Any = None) -> OnnxParityReport:
    """Run ``model`` (quanta, simulated or integer; in eval mode) and the ONNX file at ``path`` in
    ONNX Runtime (default session options) on ``inputs`` (a tensor or positional tensors) and
    report their agreement (see the module docstring for the step). ``layers=False`` skips the
    per-layer rows (one ONNX Runtime session instead of two)."""
    require_onnx()
    import onnx
    import onnxruntime as ort

    path = os.fspath(path)
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    layers = _layers(model)
    seen: dict[str, list[tuple[Any, Any]]] = {}
    ident: dict[str, list[Any]] = {}  # the returned objects themselves: which layer returned an output
    order: list[str] = []

    def record(name: str, mod: nn.Module, inp: tuple[Any, ...], kwargs: dict, out: Any) -> None:
        # copies: a later in-place op (nn.ReLU(inplace=True)) may overwrite what a layer returned
        x = inp[0].clone() if inp and isinstance(inp[0], torch.Tensor) else (inp[0] if inp else None)
        seen.setdefault(name, []).append((x, out.clone() if isinstance(out, torch.Tensor) else out))
        ident.setdefault(name, []).append(out)
        order.append(name)

    # eval mode: what the export computes (dropout off); modes and hooks restored in finally
    with hooked(layers, record), evaluating(model), torch.no_grad():
        result = model(*args)
    leaves = [result] if isinstance(result, torch.Tensor) else torch.utils._pytree.tree_leaves(result)
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    session = ort.InferenceSession(path, session_options, providers=providers)
    feed = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    got = session.run(None, feed)
    rows = []
    for i, (y, b) in enumerate(zip(leaves, got)):
        owner = next((n for n in reversed(order) if any(out is y for out in ident[n])), None)
        name = session.get_outputs()[i].name
        if owner is not None:
            x = seen[owner][next(k for k, out in enumerate(ident[owner]) if out is y)][0]
            step, how = _step(layers[owner], x, y)
            rows.append(_row(name, y, b, step, f"{how} of {owner!r}" if step is not None else
                             f"no step ({owner!r} has no output or input grid)"))
        elif order:
            last = order[-1]
            x, out = seen[last][-1]
            step, how = _step(layers[last], x, out) if isinstance(out, torch.Tensor) else (None, "")
            step = step.max() if isinstance(step, torch.Tensor) else step
            rows.append(_row(name, y, b, step, f"estimate: largest {how} of {last!r} (float ops follow it)"))
        else:
            rows.append(_row(name, y, b, None, "no step (no quantized layer ran)"))
    report = OnnxParityReport(path, rows)
    if layers:
        report.layers = _compare_layers(onnx, ort, path, layers, seen, feed, providers, session_options)
    return report


def _compare_layers(onnx: Any, ort: Any, path: str, layers: dict[str, nn.Module],
                    seen: dict[str, list[tuple[Any, Any]]], feed: dict[str, Any], providers: list[str],
                    session_options: Any) -> list[ParityRow]:
    proto = onnx.load(path)
    once = [p for p in layers if len(seen.get(p, ())) == 1 and isinstance(seen[p][0][1], torch.Tensor)]
    candidates = _layer_values(proto, once)
    known = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.output)}
    existing = {o.name for o in proto.graph.output}
    extra = {v for chain in candidates.values() for v in chain if v in known and v not in existing}
    proto.graph.output.extend([known[v] for v in sorted(extra)])
    # ONNX Runtime's QDQPropagationTransformer moves a QuantizeLinear up across Transpose / Reshape
    # onto the value before them even when that value is a graph output (exact for the model's own
    # outputs, not for an exposed intermediate), so this run goes without it.
    session = ort.InferenceSession(proto.SerializeToString(), session_options, providers=providers,
                                   disabled_optimizers=["QDQPropagationTransformer"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    rows = []
    for p, chain in candidates.items():
        x, y = seen[p][0]
        mod = layers[p]
        step, how = _step(mod, x, y)
        codes = (float(mod.emit_scale), int(mod.emit_zero_point)) if y.dtype == torch.uint8 else None
        options = []
        for v in chain:
            if v in got:
                try:
                    options.append(_row(p, y, got[v], step, how, codes))
                except ValueError:  # not this module's output after all (another shape)
                    continue
        if options:
            best = min(options, key=lambda r: (r.max_abs_diff, -r.frac_identical))
            rows.append(replace(best, note=inexact_reason(mod)))
    return rows
