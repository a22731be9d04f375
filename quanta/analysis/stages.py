"""`compare_stages`: follow the same inputs through float → simulated → integer → ONNX Runtime
and say, for each hand-over, at which layer the two stages part.

- float → simulated: `compare` (quantization error itself); the layer that adds the most error
  is named (`CompareReport.ranked`);
- simulated → integer: `compare`; these should agree to rounding (quanta uses one set of
  numerics), so the first layer, in execution order, whose ``local_sqnr_db`` is under
  ``min_sqnr_db`` is where they part;
- integer → ONNX Runtime: `quanta.compare_onnx` on the exported file (per layer: largest
  difference, in quantization steps and relative to the layer's largest value); the first layer
  whose largest difference exceeds ``max_rel`` (default 1%) of its largest value is named. (Steps
  alone would flag healthy layers: one input value rounded to the other side of a tie moves a
  Linear's output by up to 127 accumulator steps, ~0.1% of its range.)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import ForwardFn, batches_of
from .compare import CompareReport, compare
from .onnx_parity import OnnxParityReport, compare_onnx


@dataclass
class StageReport:
    comparisons: dict[str, CompareReport]  # "float -> simulated", "simulated -> integer"
    onnx: OnnxParityReport | None = None  # integer (or simulated) -> ONNX Runtime
    located: dict[str, str | None] = field(default_factory=dict)  # hand-over -> layer where the stages part

    def to_dict(self) -> dict[str, Any]:
        return {"comparisons": {k: v.to_dict() for k, v in self.comparisons.items()},
                "onnx": None if self.onnx is None else self.onnx.to_dict(), "located": dict(self.located)}

    def __str__(self) -> str:
        parts = [f"{k}: {'no layer apart' if v is None else v}" for k, v in self.located.items()]
        for k, v in self.comparisons.items():
            parts += ["", f"== {k}", str(v)]
        if self.onnx is not None:
            parts += ["", str(self.onnx)]
        return "\n".join(parts)


def _first_tensor_batch(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError("the ONNX stage needs batches that are a tensor or (inputs, targets); "
                    f"got {type(batch).__name__}")


def compare_stages(float_model: nn.Module, simulated: nn.Module, data: Any, integer: nn.Module | None = None, *,
                   onnx_path: str | os.PathLike | None = None, forward_fn: ForwardFn | None = None,
                   min_sqnr_db: float = 30.0, max_rel: float = 0.01) -> StageReport:
    """Compare each stage with the next on ``data`` (see the module docstring). ``onnx_path``:
    the ONNX export of ``integer`` (or of ``simulated`` when there is no integer model), run on
    the first batch of ``data``. No model is modified."""
    batches = batches_of(data)
    comparisons = {"float -> simulated": compare(float_model, simulated, batches, forward_fn=forward_fn,
                                                 labels=("float", "simulated"))}
    ranked = comparisons["float -> simulated"].ranked()
    located: dict[str, str | None] = {"float -> simulated (most error added)": ranked[0].name if ranked else None}
    if integer is not None:
        report = compare(simulated, integer, batches, forward_fn=forward_fn, labels=("simulated", "integer"))
        comparisons["simulated -> integer"] = report
        apart = [r for r in report.rows if r.quantized and not math.isnan(r.local_sqnr_db)
                 and r.local_sqnr_db < min_sqnr_db]
        located["simulated -> integer"] = apart[0].name if apart else None
    onnx = None
    if onnx_path is not None:
        last = integer if integer is not None else simulated
        onnx = compare_onnx(last, onnx_path, _first_tensor_batch(batches[0]))
        off = [r for r in onnx.layers if r.max_rel_diff > max_rel]
        located[f"{'integer' if integer is not None else 'simulated'} -> ONNX Runtime"] = off[0].name if off else None
    return StageReport(comparisons, onnx, located)
