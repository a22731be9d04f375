"""Error analysis: where quantization loses accuracy, layer by layer (`compare`) and by trial
(`sensitivity`)."""

from .capture import Captured, capture_outputs
from .compare import CompareReport, LayerError, compare
from .sensitivity import SensitivityReport, SensitivityRow, sensitivity
from .stages import StageReport, compare_stages

__all__ = [
           "Captured",
           "CompareReport",
           "LayerError",
           "SensitivityReport",
           "SensitivityRow",
           "StageReport",
           "capture_outputs",
           "compare",
           "compare_stages",
           "sensitivity",
]
