"""`export_onnx`: a simulated or integer quanta model → an ONNX file in the QDQ layout.

The layout is the one ONNX Runtime and TensorRT read: every quantized activation is a
``QuantizeLinear → DequantizeLinear`` pair on the input of the op that consumes it (MatMul /
Gemm / Conv / the quantized matmuls and additions of attention), every quantized weight is an
integer initializer (int8, or INT4 / UINT4) followed by ``DequantizeLinear`` with its per-channel
``axis`` (or ``block_size`` for per-group scales). Everything else stays float.

How: on a deep copy, each quanta quantizer and integer module is replaced by an export-only module
(`quanta.io.onnx_qdq`; an integer class's is the one registered for it in `quanta.io.onnx_forms`)
whose forward computes the same numbers with two custom ops (`quanta.io.onnx_ops`), and the copy
goes through ``torch.onnx.export(..., dynamo=True)`` with translations of those ops. The opset is
the lowest the model needs: 18 (the exporter's own floor; per-channel int8 QDQ exists since 13),
21 for int4 weights, per-group weights or per-token (dynamic) activations.

Choices made so that ONNX Runtime's default graph optimizations keep quanta's numbers: biases are a
separate ``Add`` after Gemm / Conv (ORT would round a bias input onto the int32 grid), Linear
layers run on a 2-D ``[tokens, K]`` view (ORT mis-fuses per-token QDQ into 3-D MatMuls), and
dynamic per-token scales are computed in the graph with quanta's own float32 arithmetic.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..integer.base import IntegerModule
from ..nn.modules.base import QuantModule, runs_float_forward
from ..nn.modules.functional import QuantOp
from ..nn.modules.rnn_cells import _QuantRecurrent
from ..nn.tensor_quantizer import TensorQuantizer
from ..transforms.decisions import REPORT_ATTR
from . import onnx_ops
from . import onnx_qdq as Q
from .onnx_forms import from_integer
from .onnx_ops import OPSET_BLOCKED, OPSET_MIN

_DEPENDENCIES = ("onnx", "onnxruntime", "onnxscript")


def require_onnx() -> None:
    """Raise ImportError naming the missing packages and the extra that installs them."""
    missing = []
    for name in _DEPENDENCIES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export and comparison need {', '.join(missing)} (not installed): "
                          'pip install "quanta[onnx]"')


@dataclass
class OnnxExportReport:
    """What `export_onnx` wrote. ``os.fspath(report)`` is the file's path."""

    path: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool
    #: (module path, quanta class, ONNX form) per exported quantized module
    layers: list[tuple[str, str, str]] = field(default_factory=list)
    #: count per op type of the graph's nodes
    op_counts: dict[str, int] = field(default_factory=dict)

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        lines = [f"ONNX export: {self.path} (opset {self.opset}, inputs {self.input_names}, outputs "
                 f"{self.output_names}{', dynamic batch' if self.dynamic_batch else ''})",
                 f"  QuantizeLinear {self.op_counts.get('QuantizeLinear', 0)}, DequantizeLinear "
                 f"{self.op_counts.get('DequantizeLinear', 0)}, nodes {sum(self.op_counts.values())}"]
        width = max((len(p) for p, _, _ in self.layers), default=0)
        lines += [f"  {p:<{width}}  {cls}: {form}" for p, cls, form in self.layers]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the export copy
def _describe(part: nn.Module, direct: bool = False) -> str:
    """The ONNX forms of the export parts in ``part`` (only its direct children when ``direct``)."""
    mods = part.named_children() if direct else part.named_modules()
    return "; ".join(f"{n or 'self'}: {m.form}" for n, m in mods if getattr(m, "form", ""))


def export_model(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str, str]], list[tuple[int, str, str]]]:
    """A deep copy of ``model`` with quanta's modules replaced by export modules, the list of
    ``(path, quanta class, form)`` it replaced, and the ``(opset, what, path)`` requirements."""
    if not any(isinstance(m, (QuantModule, QuantOp, IntegerModule)) for m in model.modules()):
        if getattr(model, REPORT_ATTR, None):  # converted, and every layer kept float
            raise ValueError(f"every layer of this converted {type(model).__name__} was kept float (quanta.kept_float "
                             "says why): there is nothing quantized to export; export it with torch.onnx.export")
        raise ValueError(f"{type(model).__name__} has no quantized modules: run quanta.prepare + quanta.calibrate "
                         "(a simulated model) or quanta.quantize / quanta.convert (an integer model) first")
    layers: list[tuple[str, str, str]] = []
    # Integer modules are not copied (their packed oneDNN weights cannot be): the copy refers to
    # them until each is replaced by an export module built from (never changing) them.
    memo: dict[int, Any] = {id(m): m for m in model.modules() if isinstance(m, IntegerModule)}
    root = copy.deepcopy(model, memo)
    new = _layer(root, "")
    if new is not None:
        layers.append(("(root)", type(root).__name__, _describe(new)))
        root = new
    else:
        _swap(root, "", layers)
        if isinstance(root, (QuantModule, QuantOp)):
            layers.append(("(root)", type(root).__name__, _describe(root, direct=True)))
    needs = [(m.requirement[0], m.requirement[1], p or "(root)") for p, m in root.named_modules()
             if isinstance(m, Q._ExportPart) and m.requirement[1]]
    return root.eval(), layers, needs


def _layer(module: nn.Module, path: str) -> nn.Module | None:
    if isinstance(module, IntegerModule):
        return from_integer(module, path)
    return from_simulated(module, path) if isinstance(module, QuantModule) else None


def _swap(module: nn.Module, prefix: str, layers: list[tuple[str, str, str]]) -> None:
    if isinstance(module, _QuantRecurrent):
        raise onnx_ops.unsupported(prefix, f"{type(module).__name__} quantizes inside the recurrence, at every time "
                                    "step; ONNX's LSTM / GRU / RNN operators take float weights and have no place "
                                    "for that. Keep the layer float (QuantConfig(exclude=...)) to export the model")
    for name, child in list(module.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        new = _layer(child, path)
        if new is not None:
            setattr(module, name, new)
            layers.append((path, type(child).__name__, _describe(new)))
        elif isinstance(child, TensorQuantizer):
            if name == "weight_quantizer" and isinstance(module, QuantModule):
                setattr(module, name, _weight_export(module, child, path))
            else:
                setattr(module, name, Q.from_quantizer(child, path))
        else:
            _swap(child, path, layers)
            if isinstance(child, (QuantModule, QuantOp)):
                form = _describe(child, direct=True)
                if form:
                    layers.append((path, type(child).__name__, form))


def _weight_export(owner: QuantModule, wq: TensorQuantizer, path: str) -> nn.Module | None:
    params = [n for n in owner.weight_names if owner._parameters.get(n) is not None]  # type: ignore[attr-defined]
    if len(params) > 1:
        raise onnx_ops.unsupported(path, f"one weight quantizer serves {len(params)} weights ({', '.join(params)}); "
                                  "export handles one quantized weight per module")
    if not params:
        return None
    return Q.from_weight_quantizer(wq, owner._parameters[params[0]], path)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- layers
def from_simulated(mod: Any, path: str) -> Q._ExportPart | None:
    """An `ExportLinear` / `ExportConv` for a simulated QuantLinear / QuantConvNd that runs torch's own
    forward with zero padding; None for anything else (its quantizers are then swapped one by one)."""
    from ..nn.modules.weighted import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear

    kinds = {QuantLinear: 0, QuantConv1d: 1, QuantConv2d: 2, QuantConv3d: 3}
    dims = next((d for cls, d in kinds.items() if isinstance(mod, cls)), None)
    if dims is None or (dims and mod.padding_mode != "zeros") or not runs_float_forward(type(mod)):
        return None
    w = mod.weight.detach()
    wq = mod.weight_quantizer
    weight = None if wq is None else Q.from_weight_quantizer(wq, w, f"{path}.weight_quantizer")
    weight = Q.ExportWeight(w.float(), None, None) if weight is None else weight  # a float weight
    inp, out = (None if q is None else Q.from_quantizer(q, f"{path}.{kind}_quantizer")
                for kind, q in (("input", mod.input_quantizer), ("output", mod.output_quantizer)))
    if dims == 0:
        return Q.ExportLinear(weight, mod.bias, inp, out)
    return Q.ExportConv(dims, vars(mod), weight, mod.bias, inp, out)


# ----------------------------------------------------------------------------- export
def _choose_opset(opset: int | None, needs: list[tuple[int, str, str]]) -> int:
    need = max([OPSET_MIN] + [n for n, _, _ in needs])
    if opset is None:
        return need
    if opset < OPSET_MIN:
        raise ValueError(f"opset {opset}: torch.onnx's exporter (dynamo=True) writes opset {OPSET_MIN} and later "
                         f"(its version converter cannot lower these graphs); use opset >= {OPSET_MIN}")
    short = [f"{p} ({what}, opset {n})" for n, what, p in needs if n > opset]
    if short:
        raise ValueError(f"opset {opset} cannot express: {'; '.join(short[:5])}"
                         f"{' ...' if len(short) > 5 else ''}. INT4 tensors and blocked Quantize/DequantizeLinear "
                         f"arrive in opset {OPSET_BLOCKED}: pass opset=None (automatic) or {need}")
    return opset


def _fold_int4_casts(model: Any) -> None:
    """Replace ``Cast(to=INT4/UINT4)`` of an initializer (how the ``dequantize`` translation marks
    4-bit codes) by an INT4 / UINT4 initializer of the same name."""
    import ml_dtypes
    from onnxscript import ir

    graph = model.graph
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        to = node.attributes["to"].as_int()
        src = node.inputs[0]
        if to not in (ir.DataType.INT4, ir.DataType.UINT4) or src is None or src.const_value is None:
            continue
        np_dtype = ml_dtypes.int4 if to == ir.DataType.INT4 else ml_dtypes.uint4
        new = ir.Value(name=None, const_value=ir.Tensor(src.const_value.numpy().astype(np_dtype),
                                                        dtype=ir.DataType(to)))
        node.outputs[0].replace_all_uses_with(new)
        graph.remove(node, safe=True)
        name = src.name
        if src.is_initializer() and not src.uses() and name is not None:
            graph.initializers.pop(name)
            new.name = name
        else:
            new.name = f"{name}_int4"
        graph.register_initializer(new)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings and log lines (torchvision absent, folding skipped)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], path: str | os.PathLike,
                *, opset: int | None = None, dynamic_batch: bool = False, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None) -> OnnxExportReport:
    """Export a quanta model to ONNX with QuantizeLinear / DequantizeLinear (see the module docstring).

    ``model``: simulated (after `quanta.prepare` + `quanta.calibrate`) or integer (after
    `quanta.convert` / `quanta.quantize`), not modified. ``example_inputs``: a tensor or a tuple
    of positional tensors. ``opset``: None picks the lowest that works (18, or 21 for int4 /
    per-group / per-token); a lower one than needed raises, naming the modules that need more.
    ``dynamic_batch``: axis 0 of every input (and so of the outputs) is named ``batch`` and left
    free; the example batch must then be at least 2. Raises ``ValueError`` naming the module for
    anything ONNX cannot express faithfully, ``ImportError`` without onnx / onnxruntime / onnxscript.
    """
    require_onnx()
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example_inputs must be a tensor or a sequence of tensors")
    if dynamic_batch and any(a.dim() == 0 or a.shape[0] < 2 for a in args):
        raise ValueError("dynamic_batch=True needs example inputs with a batch (axis 0) of at least 2: "
                         "torch.export fixes an axis of size 1")
    exp, layers, needs = export_model(model)
    chosen = _choose_opset(opset, needs)
    with torch.no_grad():  # eager run: errors name their module here, and the outputs are counted
        outputs = exp(*args)
    n_out = 1 if isinstance(outputs, torch.Tensor) else len(torch.utils._pytree.tree_leaves(outputs))
    if output_names is None:
        output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    dynamic = tuple({0: "batch"} for _ in args) if dynamic_batch else None
    with _quiet(), torch.no_grad():
        try:
            program = torch.onnx.export(exp, args, dynamo=True, opset_version=chosen, verbose=False, optimize=False,
                                        input_names=list(input_names) if input_names else None,
                                        output_names=list(output_names), dynamic_shapes=dynamic,
                                        custom_translation_table=onnx_ops.translation_table(chosen))
            assert program is not None
            _fold_int4_casts(program.model)  # before the optimizer folds small ones under generated names
            program.optimize()
        except Exception as e:  # the exporter's own error, with what was being exported
            raise RuntimeError(f"torch.onnx.export failed on the export copy of {type(model).__name__}: {e}") from e
    graph = program.model.graph
    if dynamic_batch:
        fixed = [v.name for v in graph.inputs if v.shape is not None and isinstance(v.shape[0], int)]
        if fixed:
            raise ValueError(f"the batch axis of input(s) {fixed} could not be left free: the model fixes it "
                             "(e.g. a reshape to a constant batch); export with dynamic_batch=False")
    path = os.fspath(path)
    program.save(path)
    counts: dict[str, int] = {}
    for node in graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return OnnxExportReport(path, chosen, [v.name or "" for v in graph.inputs], [v.name or "" for v in graph.outputs],
                            dynamic_batch, layers, counts)
