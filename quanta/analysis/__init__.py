"""Error analysis: where quantization loses accuracy, layer by layer (`compare`) and by trial
(`sensitivity`)."""

from .auto import AutoQuantResult, Trial, auto_quantize
from .capture import Captured, capture_outputs
from .compare import CompareReport, LayerError, compare
from .report import ReportFiles, report
from .sensitivity import SensitivityReport, SensitivityRow, sensitivity
from .stages import StageReport, compare_stages

__all__ = [
           "AutoQuantResult",
           "Captured",
           "CompareReport",
           "LayerError",
           "ReportFiles",
           "SensitivityReport",
           "SensitivityRow",
           "StageReport",
           "Trial",
           "auto_quantize",
           "capture_outputs",
           "compare",
           "compare_stages",
           "report",
           "sensitivity",
]
